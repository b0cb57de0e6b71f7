"""ONNX engines: one file per region, a manifest, and a loader that runs them with onnxruntime.

An engine directory holds what the torch runtime runs, with the regions swapped for ONNX files:

- ``region_<i>_<name>.onnx``, one per region when the graph has cache guards (the runtime decides
  between regions), or a single ``model.onnx`` when nothing is cached;
- ``manifest.json``: the config (the calibrated cache schedule included), the regions in order with
  their value slots, the guards, the graph's inputs (names, shapes, dtypes) and output structure,
  the diffopt and opset versions, and a SHA-256 of every file.

`load` rebuilds the same executor the torch backend would build (`RegionExecutor`, or the
`CachingExecutor` with the same controller) over onnxruntime sessions, so a cached run through an
engine makes the same compute / reuse decisions as the torch runtime.

Weights dynamo lifted into graph inputs are baked back in as constants of the region that reads
them, so an engine's inputs are the denoiser's own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffopt.backend import build_executor, capture, input_slots
from diffopt.config import Config, ConfigError
from diffopt.passes.graph import Guard, Region, example_value
from diffopt.runtime.executor import RegionExecutor
from diffopt.runtime.lowering import RegionProgram, Slot

FORMAT = "diffopt-engine"
FORMAT_VERSION = 2
"""2: per-region export shapes (TensorRT profiles), per-axis size ranges, token variants."""
QUANT_FORMS = {"integer": 18, "qdq": 21, "qdq_static": 21, "custom": 18}
"""How `diffopt::w4a4_linear` is written, and the ONNX opset each form needs:

- ``integer``: standard ops with exact integer arithmetic (MatMulInteger on the packed int4
  weight, unpacked in the graph); the same numbers as the torch op, on any ONNX runtime;
- ``qdq``: int4 / int8 weight initializers behind blocked DequantizeLinear, per-token
  QuantizeLinear / DequantizeLinear on the rotated activation and a float MatMul (opset 21);
  runtimes may fuse the pattern into integer kernels (onnxruntime CPU kept it as is here);
- ``qdq_static``: as ``qdq`` with one constant activation scale per layer, calibrated on the
  export's example inputs (the absmax of the rotated activation; larger values clip at run
  time): TensorRT's explicit quantization, which needs constant scales (INT8 activations);
- ``custom``: one ``ai.diffopt::W4A4Linear`` node per linear, with the integer form as its
  model-local function: a runtime with that kernel runs it, any other inlines the function.
"""
EXTERNAL_DATA_BYTES = 100 * 2**20
"""Regions whose constants pass this size keep their weights in a side file."""


class ExportError(ValueError):
    """The graph holds something the exporter cannot express; the message names it."""


class _RecordingExecutor(RegionExecutor):
    """Runs the regions eagerly once, keeping each region's inputs as export examples."""

    def __init__(self, program: RegionProgram) -> None:
        super().__init__(program)
        self.examples: dict[int, list[Any]] = {}

    def run_region(self, index: int, region: Any, inputs: list[Any]) -> Sequence[Any]:
        self.examples[index] = list(inputs)
        return region(*inputs)


class _Baked(nn.Module):
    """A region as an engine sees it: its weight inputs become constants, and the sizes dynamo
    passed it (dynamic shapes) are read off its tensor inputs; only tensors come in."""

    def __init__(self, module: nn.Module, inputs: list[Any], plan: _RegionInputs) -> None:
        super().__init__()
        self.module, self.plan = module, plan
        for i in sorted(plan.weights):
            self.register_buffer(f"w{i}", inputs[i].detach())

    def forward(self, *activations: torch.Tensor) -> Any:
        by_position = dict(zip(self.plan.kept, activations, strict=True))
        args = []
        for i in range(self.plan.count):
            if i in self.plan.weights:
                args.append(getattr(self, f"w{i}"))
            elif i in self.plan.sizes:
                tensor, dim = self.plan.sizes[i]
                args.append(by_position[tensor].shape[dim])
            else:
                args.append(by_position[i])
        return self.module(*args)


@dataclasses.dataclass
class _RegionInputs:
    """Which of a region's inputs are weights, which are sizes of another input, which stay."""

    count: int
    weights: set[int]
    sizes: dict[int, tuple[int, int]]
    """Input position → (position of a tensor input, dimension) it is the size of."""
    dynamic: dict[int, dict[int, Any]]
    """Kept position → {dimension: Dim.DYNAMIC} for its symbolic dimensions."""

    @property
    def kept(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.weights and i not in self.sizes]


def _graph_module(module: nn.Module) -> torch.fx.GraphModule:
    """A region's fx graph module (a single-region engine wraps it in `_FlatOutputs`)."""
    return module if isinstance(module, torch.fx.GraphModule) else module.gm


def _plan_inputs(lowered: Any, weights: set[int]) -> _RegionInputs:
    graph = _graph_module(lowered.module).graph
    fakes = [example_value(n) for n in graph.nodes if n.op == "placeholder"]
    positions = {i for i, s in enumerate(lowered.inputs) if s in weights}
    sizes, dynamic = {}, {}
    for i, fake in enumerate(fakes):
        if i in positions:
            continue
        if isinstance(fake, torch.Tensor):
            symbolic = {
                d: torch.export.Dim.DYNAMIC
                for d, n in enumerate(fake.shape)
                if isinstance(n, torch.SymInt)
            }
            if symbolic:
                dynamic[i] = symbolic
        elif isinstance(fake, torch.SymInt):
            sizes[i] = next(
                (
                    (j, d)
                    for j, other in enumerate(fakes)
                    if j not in positions and isinstance(other, torch.Tensor)
                    for d, n in enumerate(other.shape)
                    if isinstance(n, torch.SymInt) and n.node.expr == fake.node.expr
                ),
                None,
            )
            if sizes[i] is None:
                raise ExportError(
                    f"region {lowered.region.name!r} takes the size {fake} that is no dimension "
                    "of its tensor inputs; export with static shapes (dynamic_batch=False)"
                )
    return _RegionInputs(len(fakes), positions, sizes, dynamic)


def export(
    model: nn.Module,
    example_inputs: dict[str, Any] | tuple[Any, ...],
    config: Config | dict[str, Any] | None = None,
    *,
    out: str | Path,
    format: str = "onnx",
    dynamic_batch: bool = False,
    dynamic_resolution: bool = False,
    quant_form: str = "integer",
) -> Path:
    """Capture `model` on `example_inputs`, run diffopt's passes with `config`, and write an
    engine directory to `out` (see the module doc). ``format="tensorrt"`` also builds TensorRT
    engines from the ONNX files (the ``diffopt[tensorrt]`` extra). `dynamic_batch` exports the
    batch dimension as a dynamic axis, `dynamic_resolution` the latents' spatial (or token) axes;
    either is a clear error if the model's code fixes that size. Sizes a model accepts only in a
    range (SD3's largest position embedding) are recorded and checked by the loaded engine.

    `quant_form`: how quantized linears are written (`QUANT_FORMS`)."""
    if format not in ("onnx", "tensorrt"):
        raise ConfigError(f"format must be 'onnx' or 'tensorrt', not {format!r}")
    if quant_form not in QUANT_FORMS:
        raise ConfigError(f"quant_form must be one of {sorted(QUANT_FORMS)}, not {quant_form!r}")
    config = dataclasses.replace(Config.coerce(config), inner="eager")
    if format == "tensorrt":
        from .tensorrt import import_tensorrt

        _check_tensorrt_quant(config, quant_form)
        import_tensorrt()  # fail before the export work, with the install hint
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    captured = capture(
        model,
        example_inputs,
        config,
        dynamic_batch=dynamic_batch,
        dynamic_resolution=dynamic_resolution,
    )
    result, flat = captured.result, captured.inputs
    graph = result.graph
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    timestep_slot, weights = input_slots(graph)
    if not graph.guards:  # nothing for a runtime to decide between regions: one file
        program = _single_region(result.program, graph.gm, len(placeholders))
    else:
        program = result.program
    recorder = _RecordingExecutor(program)
    with torch.no_grad():
        graph_outputs = recorder(*flat)
        returned = _returned_structure(model, example_inputs, graph_outputs)

    shorts = _token_refresh_runs(program, config, graph.guards, timestep_slot, weights, flat)
    regions = []
    for index, lowered in enumerate(program.regions):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", lowered.region.name)
        name = "model.onnx" if len(program.regions) == 1 else f"region_{index}_{slug}.onnx"
        plan = _plan_inputs(lowered, weights)
        _export_region(lowered, recorder.examples[index], plan, out / name, quant_form)
        inputs = [lowered.inputs[i] for i in plan.kept]
        regions.append(
            {
                "name": lowered.region.name,
                "kind": lowered.region.kind,
                "group": lowered.region.group,
                "file": name,
                "inputs": inputs,
                "outputs": lowered.outputs,
                # the sizes the region saw at export: TensorRT profiles are built around them
                "shapes": [list(recorder.examples[index][i].shape) for i in plan.kept],
                "token_variants": {},
            }
        )
        if index in shorts:  # the same region on the tokens a token refresh recomputes
            count, examples = shorts[index]
            short = name.replace(".onnx", f"_tokens{count}.onnx")
            _export_region(
                lowered,
                examples,
                plan,
                out / short,
                quant_form,
                calibration=recorder.examples[index],
            )
            regions[-1]["token_variants"][str(count)] = {
                "file": short,
                "shapes": [list(examples[i].shape) for i in plan.kept],
            }
    batch = next(
        (
            v.shape[0]
            for i, v in enumerate(flat)
            if isinstance(v, torch.Tensor) and v.ndim and i not in weights
        ),
        None,
    )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "diffopt": _version(),
        "opset": QUANT_FORMS[quant_form],
        "quant_form": quant_form,
        "model": type(model).__name__,
        "config": config.to_dict(),
        "inputs": [
            _describe_input(i, captured.sources[i], example_value(placeholders[i]), batch)
            for i in range(len(placeholders))
            if i not in weights
        ],
        "dynamic_batch": dynamic_batch,
        "dynamic_resolution": dynamic_resolution,
        "batch": batch,
        "num_inputs": len(placeholders),
        "num_slots": program.num_slots,
        "regions": regions,
        "release": program.release,
        "output": _encode(program.output),
        "returns": returned,
        "guards": [dataclasses.asdict(g) for g in graph.guards],
        "timestep_slot": timestep_slot,
    }
    manifest["hashes"] = {f.name: sha256(f) for f in sorted(out.iterdir()) if f.suffix != ".json"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if format == "tensorrt":
        from .tensorrt import build_engines

        build_engines(out)
    return out


def _check_tensorrt_quant(config: Config, quant_form: str) -> None:
    """TensorRT parses Q/DQ with constant scales, INT8 activations: refuse what it cannot build."""
    if config.quant is None:
        return
    if quant_form != "qdq_static":
        raise ConfigError(
            f"TensorRT cannot build quantized layers in the {quant_form!r} form (integer "
            "matmuls or custom nodes); export with quant_form='qdq_static'"
        )
    if config.quant.act_bits != 8:
        raise ConfigError(
            f"TensorRT has no {config.quant.act_bits}-bit activations (INT4 is weight-only "
            "there); use quant='w8a8' for a TensorRT engine"
        )


def _token_refresh_runs(
    program: RegionProgram,
    config: Config,
    guards: list[Guard],
    timestep_slot: int | None,
    weights: set[int],
    flat: list[Any],
) -> dict[int, tuple[int, list[Any]]]:
    """Region index → (token count, inputs) of the shorter-sequence runs a token refresh makes.

    The torch runtime compiles those variants when it first needs them; an engine cannot, so the
    exporter runs the torch runtime through a planned request with one token refresh and records
    them.
    """
    cache = config.cache
    refreshes = cache is not None and (cache.polish == "token" or cache.mode == "plan")
    if not refreshes or timestep_slot is None or not any(g.kind == "token" for g in guards):
        return {}  # a request that asks for token refreshes anyway is told to export again
    from diffopt.runtime.cache import request

    executor = build_executor(
        program, config, guards, timestep_slot=timestep_slot, param_slots=weights
    )
    runs: dict[int, tuple[int, list[Any]]] = {}

    def record(index: int, count: int, examples: list[Any]) -> Any:
        runs[index] = (count, list(examples))
        return program.regions[index]

    executor.token_variant = record  # type: ignore[method-assign]
    plan = ["full", "full", "token", "full"]  # the last step of a request always runs in full
    # an uncalibrated cache has no change profile; a planned request only needs one to exist
    settings = dataclasses.replace(
        config.cache, mode="plan", plan=plan, profile=config.cache.profile or [1.0] * len(plan)
    )
    start = flat[timestep_slot]
    fall = (0.1 * start.abs().max()).clamp(min=1).ceil()  # a whole step for int timesteps
    with torch.no_grad(), request(steps=len(plan), cache=settings):
        for step in range(len(plan) - 1):  # a falling timestep: one request
            inputs = list(flat)
            inputs[timestep_slot] = (start - step * fall).to(start.dtype)
            executor(*inputs)
    return runs


def _returned_structure(model: nn.Module, example_inputs: Any, graph_outputs: Any) -> str | None:
    """How the model packs the graph's outputs (a pytree spec), when it is a plain container of
    exactly those tensors; None keeps the graph's own tuple."""
    from torch.utils import _pytree as pytree

    args, kwargs = (
        ((), example_inputs) if isinstance(example_inputs, dict) else (example_inputs, {})
    )
    leaves, spec = pytree.tree_flatten(model(*args, **kwargs))
    if len(leaves) != len(graph_outputs) or not all(isinstance(v, torch.Tensor) for v in leaves):
        return None
    try:
        return pytree.treespec_dumps(spec)
    except (TypeError, NotImplementedError):  # an output class pytree cannot serialize
        return None


def _single_region(program: RegionProgram, gm: torch.fx.GraphModule, inputs: int) -> RegionProgram:
    """The whole graph as one region over the same input slots."""
    from diffopt.runtime.lowering import LoweredRegion

    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    count = len(torch.utils._pytree.tree_leaves(output))
    outputs = list(range(inputs, inputs + count))
    slots = iter(outputs)
    structure = torch.utils._pytree.tree_map(lambda _: Slot(next(slots)), output)
    whole = LoweredRegion(Region("model", "block"), _FlatOutputs(gm), list(range(inputs)), outputs)
    return RegionProgram(inputs, inputs + count, [whole], structure, [[]])


class _FlatOutputs(nn.Module):
    """A graph module whose outputs are flattened to a tuple, as a region's are."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any) -> tuple[Any, ...]:
        return tuple(torch.utils._pytree.tree_leaves(self.gm(*args)))


def _export_region(
    lowered: Any,
    examples: list[Any],
    plan: _RegionInputs,
    path: Path,
    quant_form: str,
    calibration: list[Any] | None = None,
) -> None:
    """Export one region, traced on `examples`; ``qdq_static`` scales come from `calibration`
    (default: the examples), so a token variant keeps its full region's scales."""
    activations = tuple(examples[i] for i in plan.kept)
    bad = [type(v).__name__ for v in activations if not isinstance(v, torch.Tensor)]
    if bad:
        raise ExportError(
            f"region {lowered.region.name!r} takes non-tensor inputs {bad}, which an engine "
            "cannot feed; export with static shapes (dynamic_batch=False)"
        )
    inner = lowered.module
    if quant_form == "qdq_static":
        inner = _with_static_scales(inner, calibration or examples)
    module = _Baked(inner, examples, plan).eval()
    quantized = any(
        n.target is torch.ops.diffopt.w4a4_linear.default
        for gm in module.modules()
        if isinstance(gm, torch.fx.GraphModule)
        for n in gm.graph.nodes
    )
    size = sum(b.numel() * b.element_size() for b in module.buffers())
    # one spec for the *activations varargs: a tuple with one entry per activation
    dynamic = (tuple(plan.dynamic.get(i) for i in plan.kept),) if plan.dynamic else None
    try:
        program = torch.onnx.export(
            module,
            activations,
            input_names=[f"slot_{lowered.inputs[i]}" for i in plan.kept],
            output_names=[f"slot_{s}" for s in lowered.outputs],
            opset_version=QUANT_FORMS[quant_form],
            dynamo=True,
            external_data=size > EXTERNAL_DATA_BYTES,
            verbose=False,
            custom_translation_table=_translations(quant_form),
            dynamic_shapes=dynamic,
            # the integer forms keep the int4 weight packed: the optimizer would fold its unpack
            # into int8 weights; the Q/DQ forms want it folded (into int4 initializers)
            optimize=not quantized or quant_form.startswith("qdq"),
        )
    except Exception as e:  # the exporter's own errors name the op; add where it sits
        raise ExportError(f"region {lowered.region.name!r} could not be exported: {e}") from e
    if quant_form == "custom" and quantized:
        import onnx

        from .w4a4_onnx import as_custom_nodes

        proto = program.model_proto
        if not as_custom_nodes(proto):  # never a silent integer-form file
            raise ExportError(
                f"region {lowered.region.name!r}: no ONNX nodes of its w4a4_linear ops were found "
                "(the exporter's pkg.torch.onnx.fx_node metadata is missing in this torch?); "
                "export with quant_form='integer'"
            )
        onnx.save(
            proto,
            str(path),
            save_as_external_data=size > EXTERNAL_DATA_BYTES,
            location=f"{path.name}.data",
        )
    else:
        program.save(str(path), external_data=size > EXTERNAL_DATA_BYTES)


def _translations(quant_form: str) -> dict[Any, Any]:
    """diffopt's own ops, written in ONNX ops."""
    import diffopt.kernels.ops  # noqa: F401  (registers torch.ops.diffopt)

    from .w4a4_onnx import w4a4_linear, w4a4_linear_qdq, w4a4_linear_qdq_static

    linear = w4a4_linear_qdq if quant_form == "qdq" else w4a4_linear
    return {
        torch.ops.diffopt.w4a4_linear.default: linear,
        torch.ops.diffopt.w4a4_linear_static.default: w4a4_linear_qdq_static,
    }


def _with_static_scales(module: nn.Module, examples: list[Any]) -> nn.Module:
    """A copy of a region whose `w4a4_linear` ops become `w4a4_linear_static`, each with one
    activation scale: the absmax of its rotated input on `examples`, over qmax."""
    import copy

    from diffopt.kernels import rotate
    from diffopt.kernels.reference import qmax

    linear = torch.ops.diffopt.w4a4_linear.default
    if not any(n.target is linear for n in _graph_module(module).graph.nodes):
        return module  # nothing quantized in this region: no calibration run
    module = copy.deepcopy(module)
    gm = _graph_module(module)
    absmax: dict[str, float] = {}

    class Calibrate(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            if node.target is linear:
                x, rotation = self.env[node.args[0]], node.args[4] and self.env[node.args[4]]
                rows = x.detach().reshape(-1, x.shape[-1]).float()
                absmax[node.name] = float(rotate(rows, rotation).abs().max())
            return super().run_node(node)

    with torch.no_grad():
        Calibrate(gm).run(*examples)
    for node in gm.graph.nodes:
        if node.target is linear:
            x, weight, scale, bias, rotation, act_bits, weight_bits = node.args
            act_scale = max(absmax[node.name], 1e-12) / qmax(act_bits)
            node.target = torch.ops.diffopt.w4a4_linear_static.default
            node.args = (x, weight, scale, bias, rotation, act_scale, act_bits, weight_bits)
    gm.recompile()
    return module


def _describe_input(slot: int, source: str, fake: Any, batch: int | None) -> dict[str, Any]:
    """Where an engine finds graph input `slot` among the call's inputs: a (nested) keyword, or
    the size of one (``L['hidden_states'].size()[0]`` under dynamic shapes)."""
    source, _, size = source.partition(".size()")
    path = [a or b for a, b in re.findall(r"\['([^']*)'\]|\[(\d+)\]", source)]
    if path[:1] == ["kwargs"]:  # a forward wrapped by a decorator taking **kwargs (Flux)
        path = path[1:]
    if size:
        return {"slot": slot, "path": path, "size": int(re.findall(r"\d+", size)[0])}
    tensor = fake if isinstance(fake, torch.Tensor) else None
    return {
        "slot": slot,
        "path": path,
        "shape": None
        if tensor is None
        else [n if isinstance(n, int) else None for n in tensor.shape],  # None: a dynamic axis
        "dtype": None if tensor is None else str(tensor.dtype).removeprefix("torch."),
        # no range on the batch axis: the one dynamo finds there comes from fake-tensor layout
        # heuristics (conv picks channels-last below a batch of 16), not from the model
        "ranges": None
        if tensor is None
        else [
            None if d == 0 and _hint(n) == batch else _size_range(n)
            for d, n in enumerate(tensor.shape)
        ],
    }


def _hint(size: int | torch.SymInt) -> int:
    return size if isinstance(size, int) else size.node.hint


def _size_range(size: int | torch.SymInt) -> list[int | None] | None:
    """[low, high] a dynamic axis may take (high None: unbounded), as dynamo's shape analysis of
    the model's code found it; None for a static axis."""
    if isinstance(size, int):
        return None
    bounds = size.node.shape_env.var_to_range.get(size.node.expr)
    if bounds is None:  # an expression of several symbols: no simple range
        return [0, None]
    from torch.utils._sympy.numbers import int_oo

    return [int(bounds.lower), None if bounds.upper == int_oo else int(bounds.upper)]


def _encode(structure: Any) -> Any:
    """The output structure as JSON: a slot is {"slot": i}, tuples and lists are lists."""
    if isinstance(structure, Slot):
        return {"slot": structure.index}
    if isinstance(structure, list | tuple):
        return [_encode(v) for v in structure]
    if isinstance(structure, dict):
        return {"dict": {k: _encode(v) for k, v in structure.items()}}
    return {"constant": structure}


def _decode(structure: Any) -> Any:
    if isinstance(structure, list):
        return tuple(_decode(v) for v in structure)
    if "slot" in structure:
        return Slot(structure["slot"])
    if "dict" in structure:
        return {k: _decode(v) for k, v in structure["dict"].items()}
    return structure["constant"]


def sha256(path: Path) -> str:
    """The SHA-256 of a file, as the manifest records it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version() -> str:
    import diffopt

    return diffopt.__version__


_NUMPY_DTYPES = {
    t: torch.empty(0, dtype=t).numpy().dtype
    for t in (
        torch.float32,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
"""The element types an engine binds (bfloat16 has no numpy type: binding it is an error)."""

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class _SessionRegion:
    """A region run by an onnxruntime session; quacks like `LoweredRegion` for the executors.

    Tensors go in and out through I/O binding: onnxruntime reads the inputs' memory and its
    outputs become torch tensors by DLPack, with no copy when they sit on the session's device
    (the GPU for the CUDA and TensorRT providers).
    """

    def __init__(
        self,
        region: Region,
        session: Any,
        inputs: list[int],
        outputs: list[int],
        device: torch.device,
    ) -> None:
        self.region, self.session, self.device = region, session, device
        self.inputs, self.outputs = inputs, outputs
        self.names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.token_variants: dict[int, _SessionRegion] = {}
        """Token count → the region exported for a token refresh of that many tokens."""

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        kept = [a.detach().to(self.device).contiguous() for a in args]  # alive through the run
        index = self.device.index or 0
        for name, value in zip(self.names, kept, strict=True):
            if value.dtype not in _NUMPY_DTYPES:
                raise TypeError(
                    f"an engine cannot bind {value.dtype} tensors (no numpy type); "
                    "export with float32 or float16 inputs"
                )
            binding.bind_input(
                name,
                self.device.type,
                index,
                _NUMPY_DTYPES[value.dtype],
                list(value.shape),
                value.data_ptr(),
            )
        for name in self.output_names:
            binding.bind_output(name, self.device.type, index)
        if self.device.type == "cuda":  # onnxruntime's stream must see what torch's wrote
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        # outputs stay on the session's device; the engine moves the final ones to the caller's
        return [_as_tensor(v) for v in binding.get_outputs()]


def _as_tensor(value: Any) -> torch.Tensor:
    """An onnxruntime OrtValue as a torch tensor: by DLPack, without a copy, where this
    onnxruntime supports it; through numpy (host memory) where it does not."""
    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    return torch.from_numpy(value.numpy())


class Engine:
    """A loaded engine: call it like the denoiser (same keyword inputs), get its outputs."""

    def __init__(
        self, manifest: dict[str, Any], executor: RegionExecutor, device: torch.device
    ) -> None:
        self.manifest, self.executor, self.device = manifest, executor, device
        """The sessions' device: inputs move there once, outputs come back to the caller's."""

    def __call__(self, **inputs: Any) -> Any:
        flat: list[Any] = [None] * self.manifest["num_inputs"]
        caller: torch.device | None = None
        for spec in self.manifest["inputs"]:
            value: Any = inputs
            try:
                for key in spec["path"]:
                    value = value[int(key)] if isinstance(value, list | tuple) else value[key]
            except (KeyError, IndexError) as e:
                raise TypeError(f"the engine needs input {'.'.join(spec['path'])}") from e
            if "size" in spec:
                flat[spec["slot"]] = value.shape[spec["size"]]
                continue
            if isinstance(value, torch.Tensor):
                self._check(spec, value)
                caller = caller or value.device
                value = value.to(self.device)
            flat[spec["slot"]] = value
        from torch.utils import _pytree as pytree

        outputs = self.executor(*flat)
        if caller is not None:
            outputs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(caller), outputs)
        if self.manifest.get("returns") is None:
            return outputs

        return pytree.tree_unflatten(list(outputs), pytree.treespec_loads(self.manifest["returns"]))

    def _check(self, spec: dict[str, Any], value: torch.Tensor) -> None:
        """An input's dtype, static sizes and dynamic-axis ranges, as the manifest records them."""
        name, expected = ".".join(spec["path"]), spec["shape"]
        if str(value.dtype).removeprefix("torch.") != spec["dtype"]:
            raise TypeError(
                f"input {name} is {value.dtype}; this engine was exported for "
                f"torch.{spec['dtype']} (cast it, or export with inputs of the dtype you serve)"
            )
        if value.ndim != len(expected) or any(
            e is not None and e != n for e, n in zip(expected, value.shape, strict=False)
        ):
            hints = [
                f"{flag}=True"
                for flag in ("dynamic_batch", "dynamic_resolution")
                if not self.manifest.get(flag)
            ]
            raise ValueError(
                f"input {name} has shape {list(value.shape)}; this engine was exported for "
                f"{expected} (None: dynamic); export again with example inputs of the shape you "
                f"serve{', or with ' + ' / '.join(hints) if hints else ''}"
            )
        for dim, bounds in enumerate(spec.get("ranges") or []):
            low, high = bounds or (0, None)
            if value.shape[dim] < low or (high is not None and value.shape[dim] > high):
                raise ValueError(
                    f"input {name} has size {value.shape[dim]} in dim {dim}; the model's code "
                    f"accepts {low}..{'' if high is None else high} there "
                    "(found when it was traced): use a size in that range"
                )


def load_engine(path: str | Path, provider: str = "cpu") -> Engine:
    """An engine directory written by `export`, ready to call like the denoiser.

    `provider`: "cpu", "cuda" or "tensorrt" (onnxruntime's execution providers). Refuses a
    manifest from a newer diffopt format and any file whose hash does not match.
    """
    import onnxruntime as ort

    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(
            f"{path} is not a diffopt engine (manifest format {manifest.get('format')!r})"
        )
    if manifest["format_version"] > FORMAT_VERSION:
        raise ConfigError(
            f"{path} was written by diffopt {manifest['diffopt']} (engine format "
            f"{manifest['format_version']}); this diffopt reads format {FORMAT_VERSION}: upgrade"
        )
    for name, digest in manifest["hashes"].items():
        if not (path / name).exists() or sha256(path / name) != digest:
            raise ConfigError(
                f"{path / name} does not match its hash in manifest.json: the "
                "engine was modified or is incomplete; export it again"
            )
    if provider not in PROVIDERS:
        raise ConfigError(f"provider must be one of {sorted(PROVIDERS)}, not {provider!r}")
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise ConfigError(f"onnxruntime here has no {PROVIDERS[provider]} (available: {available})")
    options = ort.SessionOptions()
    if len(manifest["regions"]) > 1:
        # onnxruntime's worker threads spin after each run; with one session per region the idle
        # sessions' spinning threads starve the busy one (a cached ref-dit run was 3x slower)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if provider == "cpu":
        device, providers = torch.device("cpu"), [PROVIDERS["cpu"]]
    else:  # one GPU, named to both: torch's current device
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        device, providers = (
            torch.device("cuda", index),
            [(PROVIDERS[provider], {"device_id": index})],
        )

    def session(file: str) -> Any:
        return ort.InferenceSession(str(path / file), options, providers=providers)

    regions = []
    for r in manifest["regions"]:
        region = Region(r["name"], r["kind"], r["group"])
        lowered = _SessionRegion(region, session(r["file"]), r["inputs"], r["outputs"], device)
        if r.get("token_variants"):  # a token-guarded region's shorter runs
            lowered.token_variants = {
                int(count): _SessionRegion(
                    region, session(variant["file"]), r["inputs"], r["outputs"], device
                )
                for count, variant in r["token_variants"].items()
            }
        regions.append(lowered)
    program = RegionProgram(
        manifest["num_inputs"],
        manifest["num_slots"],
        regions,
        _decode(manifest["output"]),
        manifest["release"],
    )
    config = Config.from_dict(manifest["config"])
    guards = [Guard(g["kind"], tuple(g["regions"]), g["why"]) for g in manifest["guards"]]
    executor = build_executor(
        program, config, guards, timestep_slot=manifest["timestep_slot"], param_slots=set()
    )
    return Engine(manifest, executor, device)
