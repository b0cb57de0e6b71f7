"""The onnxruntime runtime: a loaded engine directory, called like the denoiser.

`load_engine` rebuilds the same executor the torch backend would build (`RegionExecutor`, or the
`CachingExecutor` with the same controller) over onnxruntime sessions, so a cached run through an
engine makes the same compute / reuse decisions as the torch runtime.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from diffopt.backend import build_executor
from diffopt.config import Config, ConfigError
from diffopt.guards import Guard
from diffopt.passes.graph import Region
from diffopt.runtime.executor import RegionExecutor
from diffopt.runtime.lowering import RegionProgram

from .manifest import bind, decode_structure, read_manifest

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
        self,
        manifest: dict[str, Any],
        executor: RegionExecutor,
        device: torch.device,
        checks: _SessionRegion | None = None,
    ) -> None:
        self.manifest, self.executor, self.device = manifest, executor, device
        """The sessions' device: inputs move there once, outputs come back to the caller's."""
        self.checks = checks
        """The conditions of the reads of data the engine was specialized on (`checks.onnx`)."""

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
                value = bind(value, spec)  # a complex input: its real pairs
            flat[spec["slot"]] = value
        from torch.utils import _pytree as pytree

        if self.checks is not None:
            self._check_branches(flat)
        outputs = self.executor(*flat)
        if caller is not None:
            outputs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(caller), outputs)
        if self.manifest.get("returns") is None:
            return outputs

        return pytree.tree_unflatten(list(outputs), pytree.treespec_loads(self.manifest["returns"]))

    def _check_branches(self, flat: list[Any]) -> None:
        """Refuse a call whose inputs go another way than the example's at a branch on a tensor
        value that the engine holds only one way of (`diffopt.specialization`)."""
        assert self.checks is not None
        held = self.checks(*(flat[i] for i in self.checks.inputs))
        # one host read for every check: each bool() would wait on the device on its own
        held = torch.stack([torch.as_tensor(c).reshape(()).bool() for c in held]).tolist()
        for condition, message in zip(held, self.manifest["checks"]["messages"], strict=True):
            if not condition:
                raise ValueError(
                    f"{message}; this call's inputs go another way there. Export an engine "
                    "with example inputs that go that way (one engine per way), or run the model "
                    "under torch.compile(backend='diffopt'), which follows every way"
                )

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


def missing_kernel(file: Path, provider: str, error: str) -> str:
    """onnxruntime's "Could not find an implementation for Where(16) node with name 'X'" with
    the node's input types and the line of the exported graph it was written from."""
    import onnx

    found = re.search(r"node with name '([^']+)'", error)
    model = onnx.load(str(file), load_external_data=False)
    node = next((n for n in model.graph.node if found and n.name == found.group(1)), None)
    if node is None:
        return error
    typed = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.value_info, *typed.input]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    kinds = sorted({onnx.TensorProto.DataType.Name(types[i]) for i in node.input if i in types})
    trace = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.stack_trace", "")
    code = trace.strip().splitlines()[-1].strip() if trace.strip() else "?"
    return (
        f"onnxruntime's {provider} provider has no {node.op_type} kernel for "
        f"{' / '.join(kinds) or 'these'} inputs (node {node.name!r} of {file.name}, written from "
        f"`{code}`): run the engine with a provider that has one, or change the model's code "
        f"there to another dtype ({error.strip().splitlines()[0][:200]})"
    )


def load_engine(path: str | Path, provider: str = "cpu") -> Engine:
    """An engine directory written by `export`, ready to call like the denoiser.

    `provider`: "cpu", "cuda" or "tensorrt" (onnxruntime's execution providers). Refuses a
    manifest from a newer diffopt format and any file whose hash does not match.
    """
    import onnxruntime as ort

    path = Path(path)
    manifest = read_manifest(path)
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
        try:
            return ort.InferenceSession(str(path / file), options, providers=providers)
        except Exception as e:  # onnxruntime names only the ONNX node: say what it holds
            if "NOT_IMPLEMENTED" not in str(e):
                raise
            # from None: the message carries onnxruntime's own line, and tools that report an
            # error's innermost cause would otherwise show only that line
            raise RuntimeError(missing_kernel(path / file, provider, str(e))) from None

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
        decode_structure(manifest["output"]),
        manifest["release"],
        # absent from an engine written before it was recorded: exits pair by shape alone
        {int(k): v for k, v in manifest.get("residual_operands", {}).items()},
    )
    config = Config.from_dict(manifest["config"])
    guards = [
        Guard(
            g["kind"],
            tuple(g["regions"]),
            g["why"],
            tuple(g.get("joint", (0, 0))),
            g.get("tokens", 0),
        )
        for g in manifest["guards"]
    ]
    executor = build_executor(
        program, config, guards, timestep_slot=manifest["timestep_slot"], param_slots=set()
    )
    checks = manifest.get("checks")
    if checks:
        checks = _SessionRegion(
            Region("checks", "block"),
            session(checks["file"]),
            checks["inputs"],
            checks["outputs"],
            device,
        )
    return Engine(manifest, executor, device, checks)
