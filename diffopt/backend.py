"""The ``diffopt`` torch.compile backend: analyze → passes → lower → region executor.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="diffopt", options={...})`` works without ``import diffopt``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
import threading
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import orig_code_map

from diffopt.config import Config, ConfigError
from diffopt.guards import Guard
from diffopt.passes import DenoiserGraph, PassReport, analyze, run_passes
from diffopt.passes.graph import INPUT_KEY, collective_groups, sequence_group
from diffopt.runtime import RegionExecutor, RegionProgram, lower, split_regions
from diffopt.runtime.cache import CachingExecutor, TimestepRecorder, VariantProvider
from diffopt.specialization import (
    Checks,
    recorded_reads,
    specialized,
    split_checks,
)

SIZES_FROM_DATA = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
"""Dynamo settings that keep an op whose output size comes from data (a boolean mask's nonzero,
``tolist()``) in the graph as an unbacked size instead of breaking there: a break inside a loop
makes dynamo skip the whole frame and compile each block alone (HunyuanVideo 1.5)."""


@dataclass
class Optimized:
    """Everything one backend call produced, for the executor and for `inspect`."""

    graph: DenoiserGraph
    reports: list[PassReport]
    """Region analysis first, then one report per pass that ran."""
    program: RegionProgram
    before: RegionProgram | None = None
    """The regions as captured, before any pass (kept only when asked for)."""


def optimize(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    config: Config,
    *,
    keep_before: bool = False,
    compile_regions: bool = True,
) -> Optimized:
    """Run diffopt's pipeline on one dynamo graph."""
    graph, analysis = analyze(gm, example_inputs)
    if config.strict:
        analysis.raise_if_skipped()
    before = split_regions(graph) if keep_before else None
    graph, reports = run_passes(graph, config)
    program = lower(graph, config.inner) if compile_regions else split_regions(graph)
    return Optimized(graph, [analysis, *reports], program, before)


@dataclass
class Captured:
    """One call of a model, captured and rewritten, with what it was called with."""

    result: Optimized
    inputs: list[Any]
    """The call's flat graph inputs: the user's tensors and the weights dynamo lifted, ready for
    ``RegionExecutor(result.program)(*inputs)``."""
    sources: list[str]
    """Where each graph input came from, as dynamo names it (``L['hidden_states']``)."""
    graphs: int = 1
    """How many graphs dynamo split the call into (graph breaks); this one holds the blocks."""
    checks: Checks | None = None
    """The reads of tensor values this one graph was specialized on (`specialization`)."""


def capture(
    model: Any,
    example_inputs: dict[str, Any] | tuple[Any, ...],
    config: Config,
    *,
    keep_before: bool = False,
    dynamic_batch: bool = False,
    dynamic_resolution: bool = False,
    one_graph: bool = True,
) -> Captured:
    """Capture `model` on one call with dynamo and run diffopt's passes; the regions stay
    uncompiled. `dynamic_batch` keeps the inputs' first dimension symbolic,
    `dynamic_resolution` the latents' spatial (or token) dimensions (`mark_dynamic_axes`).

    Dynamo is asked for one graph first. Where it cannot make one, with `one_graph` (what an
    engine needs) the break is an error naming it; without, the call splits into several graphs,
    as under `torch.compile`, and the one holding the most blocks is returned (`Captured.graphs`
    says how many there were)."""
    import inspect
    import re

    import torch
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code
    from torch.fx.experimental.symbolic_shapes import (
        ConstraintViolationError,
        GuardOnDataDependentSymNode,
    )

    captured: list[Captured] = []

    def backend(gm: fx.GraphModule, inputs: list[Any]) -> Any:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        sources = [
            _user_source(n.meta["grapharg"].source.name if "grapharg" in n.meta else n.name)
            for n in placeholders
        ]
        for node, source in zip(placeholders, sources, strict=True):
            # name user inputs as dynamo names them when it compiles the model itself
            # (l_timestep_), not after our frame's *args / **kwargs (l_args_1_)
            keyword = re.fullmatch(r"L\['(\w+)'\]", source)
            if keyword and node.name != f"l_{keyword.group(1)}_":
                node._rename(f"l_{keyword.group(1)}_")
        gm.recompile()
        checks = split_checks(gm)  # the branches a specialized capture fixed, with their checks
        result = optimize(gm, inputs, config, keep_before=keep_before, compile_regions=False)
        executor = RegionExecutor(result.program)

        def run(*args: Any) -> Any:
            captured.append(Captured(result, list(args), sources, checks=checks))
            return executor(*args)

        return run

    args, kwargs = (
        ((), example_inputs) if isinstance(example_inputs, dict) else (tuple(example_inputs), {})
    )
    names = list(inspect.signature(model.forward).parameters)

    def _user_source(source: str) -> str:
        """A graph input's source as the model's own keyword: our frame's ``L['args'][0]`` is
        the model's first parameter, ``L['kwargs']['x']`` its keyword ``x``."""
        positional = re.match(r"L\['args'\]\[(\d+)\]", source)  # args of `call` after model
        if positional and int(positional.group(1)) < len(names):
            return f"L['{names[int(positional.group(1))]}']" + source[positional.end() :]
        return re.sub(r"^L\['kwargs'\]", "L", source)

    mark_dynamic_axes(args, kwargs, batch=dynamic_batch, resolution=dynamic_resolution)
    asked = " and ".join(
        a for a, on in (("batch", dynamic_batch), ("resolution", dynamic_resolution)) if on
    )

    def call(model: Any, *args: Any, **kwargs: Any) -> Any:  # our own frame and cache entry
        return model(*args, **kwargs)

    # a graph break compiles the model's own frames too; drop them afterwards unless the user
    # had compiled that code already (dynamo keys entries by backend, so theirs stay apart)
    forward = getattr(inspect.unwrap(type(model).forward), "__code__", None)  # not a decorator
    own_frames = forward is not None and not _debug_get_cache_entry_list(forward)

    def trace(fullgraph: bool, sizes_from_data: bool = False) -> None:
        # dynamic only where asked: dynamo would otherwise make sizes that differ from an earlier
        # capture in this process dynamic ("automatic dynamic"), since `call` is one code object
        settings: dict[str, bool] = {"automatic_dynamic_shapes": False}
        if sizes_from_data:
            settings |= SIZES_FROM_DATA
        with torch.no_grad(), torch._dynamo.config.patch(**settings):
            torch.compile(call, backend=backend, fullgraph=fullgraph)(model, *args, **kwargs)

    def trace_specialized() -> Exception | None:
        """One graph with each branch on a tensor's value taken as an eager run of the example
        takes it, and where that is not enough, each value read into Python (``tolist()``)
        read as it was there; the engine checks both. Else what stops it."""
        start_over()
        with torch.no_grad(), recorded_reads() as reads:
            model(*args, **kwargs)
        for values in (False, True):  # values only where needed: sizes stay dynamic otherwise
            try:
                with specialized(reads, values=values):
                    trace(fullgraph=True, sizes_from_data=True)
                return None
            except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
                start_over()
                failure = e
        return failure

    def trace_across_breaks() -> None:
        """Several graphs, as under torch.compile, keeping the capture whose graph holds more
        blocks: with sizes from data kept in the graph (unbacked) or without.

        A break at a mask's nonzero inside a loop makes dynamo skip the whole frame and compile
        each block alone (HunyuanVideo 1.5's per-sample text reordering): with such sizes kept
        in the graph the blocks can stay one stack. Kept where it finds more blocks, or as many
        in fewer graphs (Z-Image: its blocks then share a graph with the noise level):
        elsewhere it moves the breaks (Lumina2's main blocks left its graph) or fails on the
        size's value (Qwen-Image 2.1's tolist())."""
        start_over()
        trace(fullgraph=False)
        plain = captured[:]
        start_over()
        try:
            trace(fullgraph=False, sizes_from_data=True)
        except (
            torch._dynamo.exc.Unsupported,
            torch._dynamo.exc.UserError,
            GuardOnDataDependentSymNode,
        ):
            captured.clear()
        if _most_blocks(captured) <= _most_blocks(plain):
            captured[:] = plain

    def forget_frames() -> None:
        # what this capture compiled, and the resume functions dynamo made at its breaks: it
        # keeps them, compiled or marked skipped (a break in a loop), for the next attempt
        for code in _frames_of(call.__code__) + (_frames_of(forward) if own_frames else []):
            reset_code(code)

    def start_over() -> None:
        captured.clear()
        forget_frames()

    try:
        try:  # one graph where dynamo can make one: fullgraph traces ops it would otherwise
            trace(fullgraph=True)  # break at (Mochi's nonzero becomes an unbacked size)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError):
            # UserError: a size the one graph would need from data (Lumina2's, HiDream's routing)
            if not one_graph:
                trace_across_breaks()
            elif (failure := trace_specialized()) is not None:  # an engine needs one graph
                where = model_line(str(failure))
                raise ValueError(
                    f"an engine needs the denoiser as one graph; {type(model).__name__} has a "
                    f"graph break or a size taken from data"
                    + (f" at `{where[0]}` ({where[1]})" if where else "")
                    + ". `diffopt.inspect` and torch.compile(backend='diffopt') run across "
                    "breaks; to export, remove the break there, or compute that size from the "
                    "inputs' shapes instead of their values (a branch on a tensor's value or a "
                    "value read with tolist() needs no change where it is the one obstacle: the "
                    "engine takes it as the example does and checks it). Dynamo's message: "
                    f"{failure}"
                ) from failure
    except ConstraintViolationError as e:  # mark_dynamic on a size the model specializes
        raise ValueError(
            f"{type(model).__name__} does not allow a dynamic {asked} (its code fixes that "
            f"size); export with that axis static: {e}"
        ) from e
    finally:
        # drop only this capture's compiled frames: a global dynamo reset would also throw away
        # the user's compiled models (and with them their calibrated cache state)
        forget_frames()
    if not captured:
        raise RuntimeError("dynamo ran the model without compiling it (recompile limit reached?)")
    if asked:
        _check_guards_at_double_size(type(model).__name__, captured[0].result.graph.gm, asked)
    main = max(captured, key=lambda c: len(c.result.graph.blocks))  # the first, on a tie
    return dataclasses.replace(main, graphs=len(captured))


def _frames_of(code: Any) -> list[Any]:
    """`code` and the resume functions dynamo generated from it at graph breaks (and theirs)."""
    from torch._dynamo.resume_execution import ContinueExecutionCache

    found, todo = [], [code]
    while todo:
        code = todo.pop()
        found.append(code)
        if code in ContinueExecutionCache.cache:
            todo.extend(ContinueExecutionCache.cache[code].values())
    return found


def _most_blocks(captured: list[Captured]) -> tuple[int, int]:
    """How many blocks the graph holding the most of them holds (0: no graph), then how few
    graphs hold the call: the better capture compares higher."""
    return max((len(c.result.graph.blocks) for c in captured), default=0), -len(captured)


def model_line(message: str) -> tuple[str, str] | None:
    """The model's own line in the user stack dynamo writes into its errors: ``(code,
    file:line)`` of the deepest frame that is neither torch's nor diffopt's, else None."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.+)', message)  # <lambda> too
    own = [f for f in frames if not any(p in f[0] for p in ("/torch/", "/diffopt/", "peft_utils"))]
    if not own:
        return None
    path, line, code = own[-1]
    return code.strip(), f"{path.split('site-packages/')[-1]}:{line}"


def _check_guards_at_double_size(model: str, gm: fx.GraphModule, asked: str) -> None:
    """Refuse dynamic axes the traced graph does not hold at.

    Dynamo's shape guards are the conditions under which the graph it traced is the model's code.
    A model that builds a fixed-size position embedding guards ``H//2 == 4``, which H = 8 and 9
    both meet, so no constraint error is raised; evaluating the guards with every
    dynamic size doubled finds it. One-axis bounds are left to the ranges the engine checks;
    relations between axes that doubling keeps (``H == W``) are not recorded.
    """
    import sympy
    import torch

    from diffopt.passes.graph import INPUT_KEY, example_value

    fakes = [
        example_value(n)
        for n in gm.graph.nodes
        if n.op == "placeholder" and n.meta.get(INPUT_KEY) == "user"
    ]
    tensors = [v for v in fakes if isinstance(v, torch.Tensor) and v.ndim]
    sizes = [(d, n) for t in tensors for d, n in enumerate(t.shape) if isinstance(n, torch.SymInt)]
    if not sizes:
        return
    env = sizes[0][1].node.shape_env
    axes = {n.node.expr for _, n in sizes if n.node.expr.is_Symbol}
    hints = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val  # < 2.13
    values = {s: sympy.Integer(v) for s, v in hints.items()}
    values.update({s: 2 * values[s] for s in axes if s in values})
    for guard in env.guards:
        expr = env.replace(guard.expr)  # in the symbols the inputs carry (s35 → s22)
        if len(expr.free_symbols) == 1 and not expr.atoms(sympy.Eq, sympy.Ne):
            continue  # one axis's bounds (SD3's largest crop): a recorded range the engine checks
        if expr.free_symbols & axes and expr.xreplace(values) is sympy.false:
            raise ValueError(
                f"{model} does not allow a dynamic {asked}: the traced graph holds only while "
                f"{expr} (the dynamic sizes are {sorted(map(str, axes))}), e.g. a position "
                "embedding of fixed size; export with that axis static"
            )


def mark_dynamic_axes(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, batch: bool, resolution: bool
) -> None:
    """Mark the axes an engine may vary as dynamic for dynamo.

    The latents are the first tensor input. `batch`: dim 0 of every tensor input whose dim 0 is
    the batch (Flux's position ids and a sampler's per-step noise keep their sizes). `resolution`:
    the latents' dims after the channels ([B, C, H, W]; frames too for [B, C, F, H, W]), or for
    packed token latents ([B, N, C], Flux) the token dim and dim 0 of [N, k] inputs (the position
    ids; a text-id tensor whose length happens to equal the token count is marked as well).
    """
    import torch

    tensors = [
        v
        for v in torch.utils._pytree.tree_leaves((args, kwargs))
        if isinstance(v, torch.Tensor) and v.ndim
    ]
    if not tensors:
        return
    latents = tensors[0]
    first = next(
        v for v in (*args, *kwargs.values()) if torch.utils._pytree.tree_any(torch.is_tensor, v)
    )
    if batch and isinstance(first, list | tuple):  # dim 0 of each item is not the batch
        raise ValueError(
            "the latents come as a list of per-sample tensors (Z-Image's x), so the batch is "
            "the list's length, which an engine's inputs cannot vary; export with a static "
            "batch (dynamic_batch=False)"
        )
    if batch:
        for value in tensors:
            if value.shape[0] == latents.shape[0]:
                torch._dynamo.mark_dynamic(value, 0)
    if not resolution:
        return
    if latents.ndim >= 4:
        for dim in range(2, latents.ndim):
            torch._dynamo.mark_dynamic(latents, dim)
    elif latents.ndim == 3:
        tokens = latents.shape[1]
        torch._dynamo.mark_dynamic(latents, 1)
        for value in tensors[1:]:
            if value.ndim == 2 and value.shape[0] == tokens:
                torch._dynamo.mark_dynamic(value, 0)
    else:
        raise ValueError(
            f"dynamic resolution needs latents of shape [B, C, H, W] or [B, N, C]; the first "
            f"tensor input has shape {list(latents.shape)}"
        )


def diffopt_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: Config | dict[str, Any] | None = None,
    **unsupported: Any,
) -> RegionExecutor | PerModel:
    """torch.compile backend entry point; `options` is a `diffopt.Config` or a dict of its keys."""
    if unsupported:
        raise ConfigError(
            f"the diffopt backend takes options=..., not {sorted(unsupported)}; "
            "pass settings as options={'inner': 'inductor', ...}"
        )
    config = Config.coerce(options)
    starts_call = _starts_call()
    key = (*_graph_key(gm, example_inputs, config), starts_call)
    with _BUILDING:  # requests arriving together before the first compile finished
        built = _BUILT.get(key)
        if built is None:
            weights = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
            if config.quant is not None and weights:
                built = PerModel(gm, example_inputs, config, weights[0], starts_call)
            else:
                built = _build(gm, example_inputs, config, starts_call)
            _BUILT[key] = built
    return built


class PerModel:
    """A graph whose passes bake the weights in (the quantize pass) while dynamo lifts them to
    inputs: dynamo runs one compiled graph for every instance of a class, so each model the
    graph is called with gets an executor of its own, built on that call's weights (and built
    again after its weights change in place). Measured before: two tiny-dit instances compiled
    with ``quant="w4a4"``, the second ran the first's quantized weights, 0.29 away from its
    own quantized output, against a quantization error of 0.12."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: list[Any],
        config: Config,
        weight_slot: int,
        starts_call: bool,
    ) -> None:
        self.graph = copy.deepcopy(gm)  # the passes rewrite the graph they are given
        self.config, self.weight_slot, self.starts_call = config, weight_slot, starts_call
        self.built: dict[int, tuple[int, RegionExecutor]] = {}
        """By the id of a model's first weight (dropped with it): its version, its executor.
        (Not a WeakKeyDictionary: it compares tensors with ==.)"""
        self._building = threading.Lock()
        self.executor(example_inputs)  # the first model now: its errors are compile errors

    def executor(self, args: Sequence[Any]) -> RegionExecutor:
        """The executor for the model whose weights `args` hold (built on first sight)."""
        weight = args[self.weight_slot]
        found = self.built.get(id(weight))
        if found is None or found[0] != weight._version:
            with self._building:
                found = self.built.get(id(weight))
                if found is None or found[0] != weight._version:
                    if found is None:
                        weakref.finalize(weight, self.built.pop, id(weight), None)
                    graph = copy.deepcopy(self.graph)
                    built = _build(graph, list(args), self.config, self.starts_call)
                    found = self.built[id(weight)] = (weight._version, built)
        return found[1]

    def __call__(self, *args: Any) -> Any:
        return self.executor(args)(*args)


_BUILT: weakref.WeakValueDictionary[tuple, RegionExecutor | PerModel] = (
    weakref.WeakValueDictionary()
)
"""The executors built and still in use, by `_graph_key`: a graph dynamo hands over again (each
thread that called the model before the first compile finished compiles it once more) gets the
same executor, so a request that runs its calls through either dynamo cache entry keeps one
cache state. Measured before (ref-flux `FluxPipeline`, 16 requests on threads right after
`torch._dynamo.reset()`): 9 executors built, and the requests' images differed from the same
requests one by one."""
_BUILDING = threading.Lock()


def _graph_key(gm: fx.GraphModule, example_inputs: list[Any], config: Config) -> tuple:
    """What makes two graphs dynamo hands over the same program: code, the inputs' layout, the
    tensors it holds (by storage: the same module's weights, or another trace's constants
    miss), settings. Weights dynamo lifts to inputs count by layout: the executor keeps each
    model's state apart by its weights (`runtime.cache.Run`)."""

    def layout(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), value.stride(), value.dtype, value.device)
        return str(value)

    attributes = tuple(
        (node.target, layout(held), held.data_ptr())
        for node in gm.graph.nodes
        if node.op == "get_attr" and isinstance(held := getattr(gm, node.target), torch.Tensor)
    )
    inputs = tuple(layout(x) for x in example_inputs)
    return (gm.code, inputs, attributes, repr(config), _global_state())


def _global_state() -> str:
    """What dynamo compiles a frame anew for besides the graph: grad and inference mode,
    autocast, the default dtype... (a region inductor built without grad drops it)."""
    inference = f"inference_mode={torch.is_inference_mode_enabled()}"
    try:
        return torch._C._dynamo.guards.GlobalStateGuard().__getstate__() + inference
    except AttributeError:  # a torch without the serialized form
        autocast = [torch.is_autocast_enabled(d) for d in ("cpu", "cuda")]
        return f"grad={torch.is_grad_enabled()} autocast={autocast} {inference}"


def _starts_call() -> bool:
    """Whether the graph dynamo compiles now runs first in each call of the compiled function:
    no frame on the stack runs code dynamo compiled. A resume function after a graph break, or
    a frame dynamo compiles on its own inside the call (a block whose forward breaks), runs
    above the frame that started the call. (A function whose first line breaks starts with no
    graph: its first graph is a resume function's.)"""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in orig_code_map:
            return False
        frame = frame.f_back
    return True


def _build(
    gm: fx.GraphModule, example_inputs: list[Any], config: Config, starts_call: bool = True
) -> RegionExecutor:
    optimized = optimize(gm, example_inputs, config)
    if config.cache is not None and not optimized.graph.blocks and collective_groups(gm):
        warnings.warn(
            "the diffopt backend got a graph that exchanges tensors between ranks (context "
            "parallelism) but holds no block stack, so the cache cannot skip anything here: "
            "dynamo split the forward. diffusers' context-parallel hooks look up the signature "
            "of the module they split at (Wan: blocks.0) on its first call, which dynamo cannot "
            "trace, and the forward then runs as one frame per block for good; call the model "
            "once before torch.compile (or before its first compiled call), e.g. one step",
            stacklevel=4,
        )
    return executor_for(optimized, config, starts_call)


def executor_for(optimized: Optimized, config: Config, starts_call: bool = True) -> RegionExecutor:
    """The plain region executor, or the caching one when cache guards applied."""
    timestep_slot, weight_slots = input_slots(optimized.graph)
    return build_executor(
        optimized.program,
        config,
        optimized.graph.guards,
        timestep_slot=timestep_slot,
        param_slots=weight_slots,
        group=sequence_group(optimized.graph),
        starts_call=starts_call,
    )


def input_slots(graph: DenoiserGraph) -> tuple[int | None, set[int]]:
    """The graph input slot of the timestep, and the slots of the weights dynamo lifted."""
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    timestep = graph.roles.timestep.node if graph.roles.timestep else None
    return (
        next((i for i, n in enumerate(placeholders) if n.name == timestep), None),
        {i for i, n in enumerate(placeholders) if n.meta.get(INPUT_KEY) in ("param", "buffer")},
    )


def build_executor(
    program: RegionProgram,
    config: Config,
    guards: list[Guard],
    *,
    timestep_slot: int | None,
    param_slots: set[int],
    variants: VariantProvider | None = None,
    group: str | None = None,
    starts_call: bool = True,
) -> RegionExecutor:
    """`RegionExecutor`, or `CachingExecutor` when there is a cache config and guards; the
    regions may be compiled torch code or engine sessions. `variants` supplies the regions a
    token refresh runs (`CachingExecutor`'s argument; an exporter records them with it);
    `group` the process group of a context-parallel graph (`sequence_group`); `starts_call`:
    whether the graph runs first in each call (an engine's one graph does)."""
    if config.cache is not None and not guards and (timestep_slot is not None or starts_call):
        return TimestepRecorder(program, timestep_slot)  # for a guarded graph after a break
    if config.cache is None or not guards:
        return RegionExecutor(program)
    return CachingExecutor(
        program,
        config.cache,
        guards,
        timestep_slot=timestep_slot,
        param_slots=param_slots,
        inner=config.inner,
        variants=variants,
        group=group,
        starts_call=starts_call,
    )
