"""Cache state and the caching executor: run guarded regions, or re-add cached residuals.

The executor walks the regions like `RegionExecutor`, except across the guarded span of blocks,
where the controller's action for this step decides what runs. Each action is a `Strategy`
registered by name (`STRATEGIES`), runnable only where its guard applied (`diffopt.guards`):

- ``full``: every region runs; the span's residuals (and each guarded block's) are cached;
- ``reuse`` (step guard): the span is skipped, its outputs are its fresh inputs + cached residual;
- ``block`` (block guard): the blocks whose residual changed most run, the others re-add theirs;
- ``token`` (token guard): the most-changed tokens run through the span as a shorter sequence
  and are scattered into the cached output.

State lives here, never in the compiled regions: one `Branch` per request, model and guidance
branch, with per-sample accumulators. A request starts when `diffopt.request()` is entered, when
the timestep turns back (against the direction the schedule moved in: falling for most models,
rising for Z-Image's ``t = 1 - sigma``), or after `steps` steps; calls that repeat the previous
call's timestep are further guidance branches of the same step. Inside a `diffopt.request()`
scope, steps are counted by the request, across the executors and models that run in it: a model
that takes over half-way (Wan 2.2's second expert) starts its own state at the request's step, not
at step 0. Outside a scope each compiled graph counts its own requests.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffopt.config import CacheConfig, ConfigError, InnerBackend
from diffopt.guards import (
    ACTION_GUARD,
    ACTIONS,
    CacheAction,
    Guard,
    GuardKind,
    action_applies,
    pair_residuals,
    per_sample,
    polish_action,
    refresh_count,
    residual_path,
    token_axes,
)
from diffopt.passes.graph import process_group

from . import profiles
from .controller import Controller, resample_profile, share
from .executor import RegionExecutor, counting_graph_calls
from .lowering import RegionProgram, compile_region
from .profiles import Condition, ModelProfile


@dataclass(eq=False)
class Request:
    """One sampling run: its step count, its controller settings, and what the guards did.

    Each request holds its own cache state (`runs`), so requests in flight at the same time
    (threads, or asyncio tasks between denoiser calls) through one compiled model never share
    a cache: each scope (`diffopt.request`) is its own request.
    """

    steps: int | None = None
    cache: CacheConfig | None = None
    """Controller settings for this request only (thresholds, mode, plan); guards are fixed."""
    calibrate: bool = False
    """Run every step in full and record the indicator (the executor then uses it)."""
    trial: bool = False
    """A setting diffopt's own search tries (`diffopt.calibrate`): guards that never fire are
    the search's finding, not the user's to fix, so they are not warned about."""
    actions: dict[int, list[CacheAction]] = field(default_factory=dict)
    """Per guidance branch, the action taken at each step. Branch k is the k-th call of a step,
    whichever graph or model runs it (LTX-2's three guidance calls are three graphs, and three
    branches; Wan 2.2's experts take turns in the same branches)."""
    vetoes: dict[int, list[int]] = field(default_factory=dict)
    """Per guidance branch, how many samples the check held to a full step at each step."""
    fit: list[float] = field(default_factory=list)
    """At each full step (first branch): the batch's measured residual change per step against
    what the calibrated profile expects (1 where the profile describes this request)."""
    work: dict[int, list[float]] = field(default_factory=dict)
    """Per guidance branch, each step's guarded block work as a share of a full step's."""
    recorded: dict[str, list[float | None]] = field(default_factory=dict)
    """Indicator per step (``"stack"``, ``"curvature"``, ``"block0"``) when this request
    calibrated, and what it ran under: the ``"timestep"`` and the stream's change
    (``"stream"``) at each step, its ``"batch"``, distinct ``"inputs"`` and ``"tokens"``
    (`diffopt.runtime.profiles.Condition.from_recorded`)."""
    step: int = -1
    """The index of the step running now, counted over every executor and model in the request
    (-1 before the first call)."""
    branch: int = 0
    """The call running now: how many calls this step made before it (the key of `actions`)."""
    calls: dict[Any, int] = field(default_factory=dict, repr=False)
    """This step's calls so far per caching executor. A graph's guidance branch is its own
    count: the graphs a break splits the blocks into each see every guidance branch."""
    step_t: float | None = None
    """The noise level of the step running now (None where no graph reads one)."""
    timesteps: list[float] = field(default_factory=list)
    """The noise level of each step so far."""
    stream: list[float | None] = field(default_factory=list)
    """The first branch's stream change at each early step (`_observe`; None where inexact)."""
    runs: dict[tuple[Any, int | None], Run] = field(default_factory=dict, repr=False)
    """The state of each (caching executor, model) in this request (`Run`), dropped when it
    ends: models of one class share an executor (Wan 2.2's two experts), each its own state."""
    active: dict[Any, Run] = field(default_factory=dict, repr=False)
    """Each executor's run of the call in progress."""

    def close(self, failed: bool = False) -> None:
        """End the request: each executor keeps what it calibrated and warns about guards that
        never fired, unless the request `failed` half-way; then its cache state is freed."""
        for (executor, _), run in list(self.runs.items()):
            executor.finish(run, failed)
        self.runs.clear()
        self.active.clear()

    def start_over(self) -> None:
        """A new request inside the same scope (the timestep turned back): the runs end and the
        step count restarts; the actions taken go on accumulating."""
        self.close()
        self.recorded = {}
        self.step, self.branch, self.step_t = -1, 0, None
        self.timesteps, self.stream = [], []

    def hit_rates(self) -> dict[CacheAction, float]:
        """The share of steps (over all branches) that took each action."""
        taken = Counter(a for steps in self.actions.values() for a in steps)
        total = sum(taken.values()) or 1
        return {a: taken[a] / total for a in ACTIONS}

    def compute(self) -> float:
        """Guarded block work done, as a share of running every step in full."""
        steps = [w for branch in self.work.values() for w in branch]
        return sum(steps) / max(1, len(steps))


_REQUEST: contextvars.ContextVar[Request | None] = contextvars.ContextVar("diffopt_request")
_TIMESTEP: contextvars.ContextVar[float | None] = contextvars.ContextVar("diffopt_timestep")
"""The noise level of the denoiser call running now, as the graph that reads it saw it: a graph
dynamo split off after a graph break (HunyuanVideo 1.5's prologue branches on data) gets only
the embedding, and tells steps and guidance branches apart by this, in a request scope or not.
The graph that starts each call sets it (None without a timestep input), so no call reads the
value an earlier call, or another model, left."""


@contextlib.contextmanager
def request(
    steps: int | None = None,
    cache: CacheConfig | None = None,
    *,
    calibrate: bool = False,
    trial: bool = False,
) -> Iterator[Request]:
    """Scope one sampling run: a fresh cache, an explicit step count, optional settings.

    ``with diffopt.request(steps=50) as req: pipe(...)``, then ``req.hit_rates()``.
    ``calibrate=True`` runs the request in full and records the change profile; ``trial=True``
    marks a setting tried by a search (no warning about guards that never fired).
    """
    req = Request(steps, cache, calibrate, trial)
    token = _REQUEST.set(req)
    # a noise level recorded by another model's graphs before this scope is not this request's:
    # a graph that reads it but has no recorder of its own would take every call for one step
    timestep = _TIMESTEP.set(None)
    failed = True
    try:
        with counting_graph_calls() as calls:
            yield req
        failed = False
    finally:
        _REQUEST.reset(token)
        _TIMESTEP.reset(timestep)
        req.close(failed)
    if not calls[0]:
        warnings.warn(
            "no diffopt graph ran inside this diffopt.request(): the denoiser ran without "
            "diffopt (no cache, no quantization). Either it was not compiled with "
            "backend='diffopt', or dynamo stopped compiling it: after "
            "torch._dynamo.config.recompile_limit compiles of one code object (8 by default; "
            "diffusers' forward wrapper is one code object for most model classes, so each "
            "compiled model, shape and config counts) dynamo runs it eagerly. Raise "
            "torch._dynamo.config.recompile_limit or compile fewer variants in one process",
            stacklevel=3,
        )


class Trend:
    """One cached residual: its latest estimate, and its per-step slope between full steps."""

    def __init__(self) -> None:
        self.latest: torch.Tensor | None = None
        self.at_step = 0
        self.full: torch.Tensor | None = None
        self.full_step = 0
        self.slope: torch.Tensor | None = None
        self.gap = 1
        """Steps between the last two full steps (what `slope` is measured over)."""

    def record_full(self, value: torch.Tensor, step: int) -> None:
        # sizes a region passes on under dynamic shapes are ints: held, never extrapolated
        if isinstance(value, torch.Tensor) and self.full is not None and step > self.full_step:
            self.gap = step - self.full_step
            self.slope = (value - self.full) / self.gap
        self.full = self.latest = value
        self.full_step = self.at_step = step

    def record(self, value: torch.Tensor, step: int) -> None:
        """A partial refresh: a better estimate now, same slope."""
        self.latest, self.at_step = value, step

    def at(self, step: int, extrapolate: bool, damping: float = 1.0) -> torch.Tensor:
        if not extrapolate or self.slope is None or damping == 0:
            return self.latest
        return self.latest + self.slope * (damping * (step - self.at_step))

    def change(self, group: Any = None) -> float:
        """Relative L1 change per step at the last full step (0 before there were two); with
        `group`, of the whole sequence its ranks hold shards of (`relative_change`)."""
        if self.slope is None:
            return 0.0
        if group is None:
            return float(self.slope.abs().mean() / self.full.abs().mean().clamp_min(1e-12))
        slope, full = self.slope.reshape(1, -1), self.full.reshape(1, -1)
        return float(_reduced_ratio(slope.abs().sum(1), full.abs().sum(1), group)[0])

    def change_per_sample(self, group: Any = None) -> torch.Tensor:
        """Each sample's relative L1 change per step between the last two full steps [B]."""
        return relative_change(self.slope + self.full, self.full, group)


def relative_change(new: torch.Tensor, old: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Per sample: mean |new − old| / mean |old|, shape [B].

    With `group` (a `torch.distributed` process group: the ranks that hold shards of one
    sequence under context parallelism), the sums over every rank's shard are reduced first, so
    each rank gets the change of the whole sequence, the value one process measures, and the
    decisions made from it are the same on every rank. Measured without it (tiny-flux, Ulysses
    2, 8 steps): the ranks' own stack profiles differ by up to 4 % (block 0's change by 12 %),
    which splits their decisions at 70 of 1,220 (early, critical) settings; and a rank that
    skips the blocks while the other runs them leaves their collectives unmatched.
    """
    if group is None:
        moved = (new - old).abs().flatten(1).mean(1)
        return moved / old.abs().flatten(1).mean(1).clamp_min(1e-12)
    return _reduced_ratio((new - old).abs().flatten(1).sum(1), old.abs().flatten(1).sum(1), group)


def _reduced_ratio(moved: torch.Tensor, size: torch.Tensor, group: Any) -> torch.Tensor:
    """Σ moved / Σ size over the ranks of `group` (sums, so shards may differ in length)."""
    both = torch.stack([moved, size])
    torch.distributed.all_reduce(both, group=group)
    return both[0] / both[1].clamp_min(1e-12)


@dataclass
class Boundary:
    """A span of regions as value slots: what it reads, what it leaves, and residual bases."""

    start: int
    stop: int
    entries: list[int]
    exits: list[int]
    bases: list[int | None] = field(default_factory=list)
    """For each exit, the entry slot it is a residual of (None: cached as a value)."""
    strides: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Each exit's strides when the span runs: compiled consumers check them."""

    def laid_out(self, slot: int, value: torch.Tensor) -> torch.Tensor:
        """`value` with the strides the span's own output has at `slot`."""
        if not isinstance(value, torch.Tensor):
            return value
        stride = self.strides[slot]
        if value.stride() == stride:
            return value
        out = torch.empty_strided(value.shape, stride, dtype=value.dtype, device=value.device)
        return out.copy_(value)


@dataclass
class Branch:
    """The cache of one guidance branch of one model in one request."""

    controller: Controller | None
    calibrating: bool = False
    stack: dict[int, Trend] = field(default_factory=dict)
    blocks: dict[int, dict[int, Trend]] = field(default_factory=dict)
    probe: torch.Tensor | None = None
    """Block 0's residual at the previous step (block-0 indicator)."""
    last_stack: torch.Tensor | None = None
    """The first exit's residual at the previous step (calibration)."""
    token: TokenAnchor | None = None
    token_source: tuple[list[Any], dict[int, torch.Tensor]] | None = None
    """The last full step's values at the span's start and its exits: the token anchor is built
    from them on the first token refresh (its short run costs a share of a step, wasted when
    no token refresh follows)."""
    profile: list[float] | None = None
    curvature: list[float] | None = None
    earlier_stack: torch.Tensor | None = None
    """The first exit's residual two steps back (calibration of the curvature)."""
    drifting: torch.Tensor | None = None
    """[B] samples the check found moving more than the profile expects (`cache.check`)."""
    last_stream: torch.Tensor | None = None
    """The stream entering the blocks at the previous step (its early speed, `Condition`)."""
    last_action: CacheAction | None = None
    """What this branch ran at its previous step."""


@dataclass(eq=False)
class Run:
    """What one caching executor holds for one model in one request: its guidance branches
    (by the request's branch index) and whose model it is (models of one class share a
    compiled graph)."""

    request: Request
    branches: dict[int, Branch] = field(default_factory=dict)
    weights: list[torch.Tensor] = field(default_factory=list)
    """The parameters of the model: whose calibrated profile applies."""
    calibrated: ModelProfile | None = None
    """That model's calibrated profile (`runtime.profiles`), if it has one."""
    seen: tuple[int, int | None] = (0, None)
    """The request's batch and token count (the condition a calibration records)."""
    inputs: int = 0
    """How many distinct inputs the batch holds (0 until an exact early step measured it): a
    classifier-free-guidance batch repeats each input's stream, the same change row for row."""
    last_step: int = -1
    """The last step of the request this model ran."""
    kept: bool = False
    """A calibrating run whose profile is stored already."""

    @property
    def calibrating(self) -> bool:
        return any(branch.calibrating for branch in self.branches.values())


@dataclass
class TokenAnchor:
    """What a token refresh compares against, set at each full step."""

    chosen: torch.Tensor
    """[B, k] the tokens each sample refreshes: the most-changed between the last full steps."""
    outputs: dict[int, torch.Tensor]
    """The full step's span outputs at the chosen tokens."""
    short: dict[int, torch.Tensor]
    """The span run on the chosen tokens alone, at the full step."""
    tokens: int
    """How many tokens the refreshed stream has."""


@dataclass
class SpanCall:
    """One denoiser call at the guarded span: what an action's strategy reads and fills in."""

    branch: Branch
    values: list[Any]
    """The value slots; the strategy leaves the span's exits in them."""
    entries: dict[int, Any]
    """The span's inputs at this step."""
    step: int
    config: CacheConfig


@dataclass(frozen=True)
class Strategy:
    """How the guarded span runs under one cache action, and when it can."""

    action: CacheAction
    run: Callable[[CachingExecutor, SpanCall], float]
    """Runs the span (or rebuilds its exits); returns the guarded block work done, as a share
    of a full step's."""
    ready: Callable[[CachingExecutor, Branch], bool]
    """Whether the branch holds what the action reads (false until enough full steps ran)."""

    @property
    def guard(self) -> GuardKind | None:
        """The guard the action needs applied (`diffopt.guards.ACTION_GUARD`)."""
        return ACTION_GUARD[self.action]

    def can(self, executor: CachingExecutor, branch: Branch) -> bool:
        """Whether the action can run now: its guard applied and its cache is filled."""
        return action_applies(self.action, executor.kinds) and self.ready(executor, branch)


STRATEGIES: dict[CacheAction, Strategy] = {}
"""Each cache action's strategy, by name; `CachingExecutor` dispatches through it."""


def strategy(
    action: CacheAction, *, ready: Callable[[CachingExecutor, Branch], bool] | None = None
) -> Callable[[Callable[[CachingExecutor, SpanCall], float]], Callable[..., float]]:
    """Register the decorated function as how the executor runs `action` (a name in
    `diffopt.guards.ACTIONS`); `ready` says when the branch's cache can serve it."""
    if action not in ACTIONS:
        raise ValueError(f"{action!r} is not a cache action in diffopt.guards; add it there first")

    def register(run: Callable[[CachingExecutor, SpanCall], float]) -> Callable[..., float]:
        STRATEGIES[action] = Strategy(action, run, ready or (lambda executor, branch: True))
        return run

    return register


TOKENS_UNDER_CONTEXT_PARALLELISM = (
    "token refresh (cache.polish='token', the default, or 'token' in a cache.plan) cannot run "
    "under context parallelism: each rank holds a shard of the sequence, a token refresh reruns "
    "the tokens that changed most in the whole sequence, so the ranks would hold different "
    "numbers of them, while the blocks' all-to-all needs every rank to pass the same number "
    "(and each rank's own top tokens are not the ones one process refreshes). Set "
    "cache.polish='block' (rerun the blocks that changed most, decided alike on every rank) "
    "or 'none' (reuse only), e.g. options={'cache': {'steps': N, 'polish': 'block'}}"
)
"""Why a context-parallel model refuses token refresh, and what to use instead."""


VariantProvider = Callable[[int, int, list[Any]], Callable[..., Sequence[Any]]]
"""``(region index, token count, example inputs) -> region``: what runs a guarded region on a
token refresh's shorter sequence."""


class TimestepRecorder(RegionExecutor):
    """A graph without guards that reads the noise level (the part of a forward before a graph
    break): it records each call's timestep for the guarded graph after it. One with no timestep
    input that starts the call (`timestep_slot` None) clears the value instead: what is there was
    left by an earlier call, maybe of another model, and is not this call's noise level."""

    def __init__(self, program: RegionProgram, timestep_slot: int | None) -> None:
        super().__init__(program)
        self.timestep_slot = timestep_slot

    def run(self, args: Sequence[Any]) -> Any:
        noise_level(args, self.timestep_slot, starts_call=True)
        return super().run(args)


def noise_level(values: Sequence[Any], slot: int | None, starts_call: bool) -> float | None:
    """This call's noise level: read from the graph's input at `slot`, or else recorded by a
    graph before this one in the call; None in a graph that starts the call without one. A
    graph that reads it from its input or starts the call records it for the graphs after it
    (clearing what an earlier call, maybe another model's, left)."""
    if slot is None and not starts_call:
        return _TIMESTEP.get(None)
    t = None if slot is None else float(values[slot].reshape(-1)[0])
    _TIMESTEP.set(t)
    return t


class CachingExecutor(RegionExecutor):
    """Runs a `RegionProgram` with the cache guards the passes marked.

    `variants` supplies the regions a token refresh runs on its shorter sequence (an exporter
    records them this way); by default they are compiled on first use, or taken from an engine's
    exported variants (`token_variant`).

    `group` names the process group the graph's collectives run over (`diffopt.passes.graph
    .collective_groups`): under context parallelism each rank holds a shard of the sequence, so
    every change the decisions read is reduced over it (`relative_change`) and all ranks take
    the same action at every step; token refresh is refused (`_refuse_tokens`).
    """

    def __init__(
        self,
        program: RegionProgram,
        config: CacheConfig,
        guards: Sequence[Guard],
        *,
        timestep_slot: int | None,
        param_slots: set[int],
        inner: InnerBackend,
        variants: VariantProvider | None = None,
        group: str | None = None,
        starts_call: bool = True,
    ) -> None:
        super().__init__(program)
        self.starts_call = starts_call
        """Whether this graph runs first in each call of the compiled function (no graph before
        it in the call could have recorded the noise level)."""
        self.variants = variants
        self.group = process_group(group)
        self._refuse_tokens(config)  # at compile time already, for the compiled settings
        self.config = config
        self.inner = inner
        self.timestep_slot = timestep_slot
        self.param_slots = param_slots
        index = {lowered.region.name: i for i, lowered in enumerate(program.regions)}
        spans = {g.kind: (index[g.regions[0]], index[g.regions[-1]] + 1) for g in guards}
        self.kinds = {g.kind for g in guards}
        span = spans.get("step") or spans.get("token")
        if span is None:
            raise ConfigError("no step or token guard applied; see the step_guard pass report")
        self.span = self._boundary(*span)
        self.token_span = spans.get("token")
        token = next((g for g in guards if g.kind == "token"), None)
        self.joint = token.joint if token else (0, 0)
        """Where the refreshed stream sits in the blocks' joint sequence (`Guard.joint`)."""
        self.stream_tokens = token.tokens if token else 0
        """How many tokens the refreshed stream holds (`Guard.tokens`; 0: not recorded)."""
        self.block_spans = {
            index[g.regions[0]]: self._boundary(index[g.regions[0]], index[g.regions[0]] + 1)
            for g in guards
            if g.kind == "block"
        }
        self.probe = self._boundary(span[0] - 1, span[0]) if config.indicator == "block0" else None
        self._variants: dict[tuple[int, int], Any] = {}
        self._compiling = threading.Lock()
        """Held while a token variant compiles (concurrent requests may ask for it at once)."""
        self._implicit: Request | None = None
        """The request of calls outside any `diffopt.request` scope: one at a time, ended when
        the timestep turns back or after `steps` steps."""
        self._direction = 0.0
        """Which way the timestep moves from step to step: -1 falling (sigmas, DDPM timesteps),
        +1 rising (Z-Image's pipeline passes ``1 - sigma``), 0 until the first move is seen.
        Assuming it falls made every Z-Image step a new request, so its cache never reused."""
        self._key_slot: int | None = None
        """Where the model's first weight comes in (-1: no weights among the inputs, an engine):
        the tensor there tells the models sharing this graph apart."""
        self._own_profile: ModelProfile | None = None
        """Where a model without parameter inputs (an engine) keeps its profile."""
        self._warned: set[tuple[Condition, str]] = set()
        """Transfer warnings given (once per calibration and kind of difference)."""

    # ---- structure -------------------------------------------------------------------------

    def _boundary(self, start: int, stop: int) -> Boundary:
        regions = self.program.regions
        produced: set[int] = set()
        entries: dict[int, None] = {}
        for lowered in regions[start:stop]:
            entries.update((s, None) for s in lowered.inputs if s not in produced)
            produced.update(lowered.outputs)
        later = {s for lowered in regions[stop:] for s in lowered.inputs}
        later |= {s.index for s in _slots_in(self.program.output)}
        exits = [s for lowered in regions[start:stop] for s in lowered.outputs if s in later]
        user = [s for s in entries if s not in self.param_slots]
        return Boundary(start, stop, user, exits)

    def _bind(self, boundary: Boundary, inputs: dict[int, Any], values: list[Any]) -> None:
        """Pair each exit with its residual base, from the real shapes of a run (once); where
        several entries have an exit's shape, the one its chain of additions across the span's
        regions starts from (`RegionProgram.residual_operands`)."""
        if boundary.bases:
            return
        shapes = [_shape(inputs[s]) for s in boundary.entries]
        exits = [_shape(values[s]) for s in boundary.exits]
        operands = self.program.residual_operands
        bases = pair_residuals(
            boundary.exits, boundary.entries, exits, shapes, lambda s: operands.get(s, ())
        )
        pairs = [
            (out, None if b is None else boundary.entries[b])
            for out, b in zip(boundary.exits, bases, strict=True)
        ]
        # the refreshed stream (or the joint sequence) first, residual exits before the rest:
        # exits[0] is what a token refresh scores (sizes may exit too, dynamic=True)
        lengths = {self.stream_tokens, self.stream_tokens + sum(self.joint)}

        def other_stream(out: int) -> bool:
            shape = _shape(values[out])
            if not self.stream_tokens:  # an engine that did not record it: the order as paired
                return False
            return shape is None or len(shape) < 2 or shape[1] not in lengths

        pairs.sort(key=lambda pair: (other_stream(pair[0]), pair[1] is None))
        boundary.exits = [out for out, _ in pairs]
        boundary.strides = {
            s: values[s].stride() for s in boundary.exits if isinstance(values[s], torch.Tensor)
        }
        boundary.bases = [base for _, base in pairs]  # last: a concurrent call checks it

    # ---- requests and branches -------------------------------------------------------------

    @property
    def _run(self) -> Run:
        """The state of the model running the current call in its request (set by
        `_current_branch`)."""
        ctx = _REQUEST.get(None)
        return (ctx if ctx is not None else self._implicit).active[self]

    def _current_branch(self, values: list[Any]) -> Branch:
        """Place the call in its request (which step, which guidance branch) and return the
        state of the model that runs it there."""
        ctx = _REQUEST.get(None)
        t = noise_level(values, self.timestep_slot, self.starts_call)
        req = ctx if ctx is not None else self._implicit
        if req is None:
            req = self._implicit = Request()
        if t is not None and t == req.step_t:
            req.branch += 1  # another guidance branch of this step
        else:
            if req.step >= 0 and self._starts_over(req, t, implicit=ctx is None):
                if ctx is None:
                    req.close()
                    req = self._implicit = Request()
                else:
                    req.start_over()
            req.step, req.branch, req.step_t, req.calls = req.step + 1, 0, t, {}
            if t is not None:
                req.timesteps.append(t)
        guidance = req.calls.get(self, 0)
        req.calls[self] = guidance + 1
        key = self._model_key(values)
        run = req.runs.get((self, key))
        if run is None:  # this model's first call in the request: its own state from here on
            run = req.runs[(self, key)] = self._start_run(req, values)
        req.active[self] = run
        branch = run.branches.get(guidance)
        if branch is None:
            branch = run.branches[guidance] = self._new_branch(run, req.step)
        return branch

    def _starts_over(self, req: Request, t: float | None, implicit: bool) -> bool:
        """Whether a call at a new timestep `t` begins another request: outside a scope, once
        `steps` steps ran; anywhere, when the timestep turns back against the schedule."""
        steps = self._steps(None if implicit else req)
        if implicit and steps is not None and req.step + 1 >= steps:
            return True
        if t is None or req.step_t is None:
            return False
        move = t - req.step_t
        if not self._direction:  # the first move tells which way this model's schedule runs
            self._direction = math.copysign(1.0, move)
            return False
        return move * self._direction < 0

    def _model_key(self, values: list[Any]) -> int | None:
        """Which model this call runs (the id of its first weight; None for an engine)."""
        if self._key_slot is None:
            weights = profiles.model_weights(values[s] for s in sorted(self.param_slots))
            slots = (s for s in sorted(self.param_slots) if weights and values[s] is weights[0])
            self._key_slot = next(slots, -1)
        return id(values[self._key_slot]) if self._key_slot >= 0 else None

    def _start_run(self, req: Request, values: list[Any]) -> Run:
        """A model's state in a request: whose weights run it, and that model's profile."""
        weights = profiles.model_weights(values[s] for s in sorted(self.param_slots))
        calibrated = profiles.lookup(weights) if weights else self._own_profile
        return Run(req, weights=weights, calibrated=calibrated)

    def _observe(
        self, branch: Branch, values: dict[int, Any], step: int, steps: int | None
    ) -> None:
        """The condition this request runs under (first guidance branch; `values`: the span's
        inputs): recorded when it calibrates, else compared with the calibration's."""
        run = self._run
        req = run.request
        stream = self._stream(values)
        if not run.seen[0]:
            run.seen = (stream.shape[0], stream.shape[1] if stream.dim() >= 3 else None)
        early = steps is not None and step <= max(steps // 3, 2)
        if early:  # a host read per step, in the first third only
            last = branch.last_stream
            # the stream moved by the velocity of the last step: exact only if that ran in full
            # (in this model: a model taking over has no last stream of its own)
            exact = last is not None and branch.last_action == "full"
            req.stream.extend([None] * (step - len(req.stream)))
            changes = relative_change(stream, last).tolist() if exact else None
            req.stream.append(sum(changes) / len(changes) if changes else None)
            if changes and not run.inputs:
                run.inputs = len({f"{change:.6g}" for change in changes})
            branch.last_stream = stream
        else:
            branch.last_stream = None
        if branch.calibrating:
            recorded = req.recorded
            recorded["timestep"] = req.timesteps
            recorded["stream"] = req.stream
            recorded["batch"], recorded["tokens"] = [run.seen[0]], [run.seen[1] or 0]
            recorded["inputs"] = [run.inputs]
            return
        calibrated = self._calibration_condition()
        if calibrated is None or steps is None:
            return
        now = Condition(
            steps,
            run.seen[0],
            run.seen[1],
            tuple(req.timesteps),
            profiles.early_speed(req.stream, steps),
            run.inputs or None,
            tuple(req.stream),
        )
        for kind, difference in calibrated.differences(now).items():
            self._warn_transfer(calibrated, kind, difference, steps)

    def _calibration_condition(self) -> Condition | None:
        """What the profile in use was measured on: the request's settings' (from
        `diffopt.calibrate`), else the model's own calibration."""
        settings = self._settings()
        if settings.profile is not None:
            known = settings.calibrated_on
            return Condition.from_dict(known) if known else None
        calibrated = self._run.calibrated
        return calibrated.condition if calibrated is not None else None

    def _warn_transfer(self, calibrated: Condition, kind: str, difference: str, steps: int) -> None:
        """Once per executor, calibration and kind of difference: the calibrated quality may not
        hold here."""
        key = (calibrated, kind)
        if key in self._warned:
            return
        self._warned.add(key)
        fix = (
            f"recalibrate for this schedule: diffopt.calibrate(model, run, steps={steps}, "
            "cache='auto', target_psnr=...) with `run` sampling as you serve"
        )
        if self._settings().profile is None:
            fix += ", or diffopt.runtime.profiles.forget(model) so the next request calibrates"
        warnings.warn(
            f"cache profile calibrated at {calibrated.describe()} is used for a request with "
            f"{difference}: the quality calibration measured does not carry over (on ref-dit "
            f"the same thresholds moved PSNR by 4-18 dB across step counts and guidance "
            f"scales); {fix}",
            stacklevel=4,
        )

    def _stream(self, values: list[Any] | dict[int, Any]) -> torch.Tensor:
        """The token stream entering the guarded span, once the regions before it ran: the input
        its first exit is a residual of (known after the span first ran); before that, its input
        with the most dimensions ([B, N, D]; conditioning vectors beside it are [B, D]; a
        boolean attention mask [B, 1, 1, N] is no stream), tables broadcast over the batch and
        another axis last (Wan's rotary cos/sin, [1, N, 1, d], are no stream either: taken for
        it, their batch of 1 broke the per-sample check and the block-0 indicator on Wan).
        Of the inputs the exits' chains of additions reach (`RegionProgram.residual_operands`),
        where known: those are what the exits will be paired with, so the stream (and the batch
        the decisions are per sample of) does not change once the span ran (Ernie-Image's
        [S, B, H] stream beside [B, S, 1, d] rotary tables did)."""
        span = self.span
        if span.bases and span.bases[0] is not None:  # the stream the blocks add residuals to
            return values[span.bases[0]]
        operands = self.program.residual_operands
        reached = residual_path(span.exits, lambda s: operands.get(s, ()), set(span.entries))
        slots = [s for found in reached for s in found] or span.entries
        tensors = [values[s] for s in slots if isinstance(values[s], torch.Tensor)]
        candidates = [t for t in tensors if t.dtype != torch.bool]
        return max(candidates, key=lambda t: (_sample(t), t.dim(), t.numel()))

    def _steps(self, req: Request | None = None) -> int | None:
        """The step count of `req` (by default the request in scope), else the compiled one."""
        req = req if req is not None else _REQUEST.get(None)
        return (req.steps if req is not None else None) or self.config.steps

    def _settings(self, req: Request | None = None) -> CacheConfig:
        """The settings of `req` (by default the request in scope), else the compiled ones."""
        req = req if req is not None else _REQUEST.get(None)
        settings = (req.cache if req is not None else None) or self.config
        if settings.indicator != self.config.indicator:
            raise ConfigError(
                f"a request cannot switch cache.indicator ({self.config.indicator!r} was compiled "
                f"in, the request asks {settings.indicator!r}): the guards differ; recompile"
            )
        return settings

    def _refuse_tokens(self, config: CacheConfig) -> None:
        """Under context parallelism, a request that would refresh tokens is an error."""
        if self.group is not None and config.mode == "online" and config.polish == "token":
            raise ConfigError(TOKENS_UNDER_CONTEXT_PARALLELISM)

    def _new_branch(self, run: Run, step: int) -> Branch:
        """A guidance branch's state, from `step` of the request on (a model taking over
        half-way starts with nothing cached: its first `warmup` steps run in full)."""
        config = self._settings()
        config.check_profile()  # a profile's indicator changed after the config was built
        self._refuse_tokens(config)
        # a model calibrated under the other indicator has no calibration of this one's to read
        measured = run.calibrated.recorded.get(self._indicator_key) if run.calibrated else None
        uncalibrated = config.profile is None and not measured and config.mode == "online"
        if uncalibrated or run.request.calibrate:
            return Branch(None, calibrating=True)  # this request runs in full and calibrates
        steps = self._steps()
        if steps is None:
            raise ConfigError(
                "cache guards need the step count: set options={'cache': {'steps': N}} or run "
                "sampling inside `with diffopt.request(steps=N):`"
            )
        controller = Controller(config, steps, self._polish(config), start=step)
        if self.group is not None and "token" in (controller.plan or ()):
            raise ConfigError(TOKENS_UNDER_CONTEXT_PARALLELISM)
        return Branch(controller)

    def _polish(self, config: CacheConfig) -> CacheAction:
        action = polish_action(config.polish)
        # a plan names its own actions: the polish setting is not used, nothing to warn about
        if action == "reuse" or config.mode == "plan" or action_applies(action, self.kinds):
            return action
        warnings.warn(
            f"cache.polish={config.polish!r} but the {ACTION_GUARD[action]}_guard pass did not "
            "apply (see its report); polish steps run in full",
            stacklevel=3,
        )
        return "full"

    def _armed(self, action: CacheAction, config: CacheConfig) -> bool:
        """Whether this request may take `action`, so its full steps keep what it reads."""
        may_take = polish_action(config.polish) == action or config.mode == "plan"
        return may_take and action_applies(action, self.kinds)

    @property
    def _indicator_key(self) -> str:
        """What the calibration records as the profile: block 0's change, or the stack's."""
        return "block0" if self.probe is not None else "stack"

    def _recorded(self, key: str) -> list[float] | None:
        """The current model's calibrated `key` indicator (None before it calibrated)."""
        calibrated = self._run.calibrated
        return calibrated.recorded.get(key) if calibrated is not None else None

    def _keep_profile(self, run: Run) -> None:
        """After a calibrating request (at its last step, or when it ends): its profile now
        belongs to the model that ran it, whichever graph runs that model next. Models that take
        turns in one request (Wan 2.2's experts) each keep the whole request's profile and read
        it at the steps they run."""
        req = run.request
        if run.kept or not req.recorded.get(self._indicator_key):
            return
        run.kept = True
        condition = Condition.from_recorded(req.recorded, req.step + 1)
        weights = run.weights
        owner = (
            f"the model with {len(weights)} parameter tensors "
            f"({sum(w.numel() for w in weights):,} weights)"
            if weights
            else "this engine"
        )
        keys = (self._indicator_key, "curvature")
        recorded = {k: list(req.recorded[k]) for k in keys if k in req.recorded}
        found = ModelProfile(recorded, condition, profiles.fingerprint(weights), owner)
        if weights:
            profiles.store(weights, found)
        else:
            self._own_profile = found
        run.calibrated = found

    def finish(self, run: Run, failed: bool = False) -> None:
        """End `run`'s request: keep a calibrated profile, warn about idle guards (neither for a
        request that `failed` half-way: its partial record is no calibration)."""
        req = run.request
        if not run.branches or failed:
            return
        steps = self._steps(req)  # the closed request's own settings, not the next one's
        if run.calibrating:
            self._keep_profile(run)
            return
        if run.last_step < req.step:
            return  # it handed over to another model (Wan 2.2's first expert): the request went on
        done = req.step + 1
        if steps is not None and done < steps:
            warnings.warn(
                f"a request ended after {done} of steps={steps} steps, so its last step was not "
                "protected; give the real step count",
                stacklevel=3,
            )
        if req.trial:
            return
        rates = req.hit_rates()
        config = self._settings(req)
        polish = next(iter(run.branches.values())).controller.polish
        armed = dict.fromkeys(("reuse", polish))
        idle = [a for a in armed if a != "full" and action_applies(a, self.kinds) and not rates[a]]
        if idle and config.mode == "online":
            warnings.warn(
                f"cache guard action(s) {idle} never fired in a {done}-step request; "
                "raise cache.early / cache.critical or calibrate (diffopt.calibrate)",
                stacklevel=3,
            )

    # ---- one denoiser call -----------------------------------------------------------------

    def run(self, args: Sequence[Any]) -> Any:
        """One denoiser call: the regions before the span, the span as this step's action's
        strategy runs it, then the rest."""
        program = self.program
        values: list[Any] = list(args) + [None] * (program.num_slots - len(args))
        branch = self._current_branch(values)
        run = self._run
        req = run.request
        step = req.step  # the request's: a model taking over goes on from where the last left
        steps = self._steps()
        if steps is not None and step >= steps and not branch.calibrating:
            raise ConfigError(f"more than steps={steps} denoiser calls in one request")
        span = self.span
        config = self._settings()

        probe_inputs = None
        for index in range(span.start):
            if self.probe is not None and index == self.probe.start:
                probe_inputs = {s: values[s] for s in self.probe.entries}
            self.step(index, values)
        change = self._indicator(branch, values, step, probe_inputs)
        if branch.calibrating:
            action: CacheAction = "full"
        else:
            curvature = self._curvature(branch, step, change)
            action = branch.controller.decide(step, change, curvature, branch.drifting)
            if branch.drifting is not None:
                vetoes = req.vetoes.setdefault(req.branch, [])
                vetoes.append(int(branch.drifting.sum()))
        chosen = STRATEGIES[action]
        if not chosen.can(self, branch):
            # its guard did not apply, or nothing is cached yet (before the second full step)
            chosen = STRATEGIES["full"]
        entries = {s: values[s] for s in span.entries}
        work = chosen.run(self, SpanCall(branch, values, entries, step, config))
        if req.branch == 0:  # after the span: its first run told which input is the stream
            self._observe(branch, entries, step, steps)
        for index in range(span.stop, len(program.regions)):
            self.step(index, values)

        req.actions.setdefault(req.branch, []).append(chosen.action)
        req.work.setdefault(req.branch, []).append(work)
        branch.last_action, run.last_step = chosen.action, step
        if branch.calibrating and req.branch == 0 and step + 1 == steps:
            # stored now: a new batch size's request next runs in another graph's executor
            self._keep_profile(run)
        return self.outputs(values)

    def _indicator(
        self, branch: Branch, values: list[Any], step: int, probe_inputs: dict[int, Any] | None
    ) -> torch.Tensor:
        """Each sample's change this step, as a share of the calibrated whole-run change."""
        stream = self._stream(values)
        batch, device = stream.shape[0], stream.device
        if not branch.calibrating and not branch.controller.reads_indicator:
            return torch.zeros(batch, device=device)  # a plan: no profile needed
        if self.probe is not None:  # block 0 just ran: its residual's change
            probe = self.probe
            self._bind(probe, probe_inputs, values)
            if probe.bases[0] is None:
                raise ConfigError(
                    "the block-0 indicator needs block 0's output to be a residual of its input; "
                    "use cache.indicator='profile'"
                )
            residual = values[probe.exits[0]] - probe_inputs[probe.bases[0]]
            raw = (
                relative_change(residual, branch.probe, self.group)
                if branch.probe is not None
                else torch.zeros(batch, device=device)
            )
            branch.probe = residual
            if branch.calibrating:
                self._record(branch, "block0", raw, step)
                return raw
            return raw / max(sum(self._profile(branch)), 1e-12)
        if branch.calibrating:
            return torch.zeros(batch, device=device)
        profile = self._profile(branch)
        return torch.full((batch,), share(profile, step), device=device)

    def _curvature(self, branch: Branch, step: int, like: torch.Tensor) -> torch.Tensor | None:
        """With extrapolated reuse: this step's share of the calibrated curvature."""
        settings = self._settings()
        curvature = settings.curvature or self._recorded("curvature")
        planned = not branch.controller.reads_indicator
        if not settings.extrapolate or not curvature or self.probe is not None or planned:
            return None
        if branch.curvature is None:
            branch.curvature = resample_profile(curvature, branch.controller.steps)
        return torch.full_like(like, share(branch.curvature, step))

    def _profile(self, branch: Branch) -> list[float]:
        if branch.profile is None:  # resampled once per request and branch
            profile = self._settings().profile or self._recorded(self._indicator_key)
            branch.profile = resample_profile(profile, branch.controller.steps)
        return branch.profile

    def _against_profile(self, branch: Branch, step: int) -> torch.Tensor | None:
        """At a full step: each sample's measured stack-residual change per step since the
        previous full step, as a ratio to what the calibrated profile expects over those steps
        (1: the profile describes this sample; None before two full steps or without a
        profile-driven controller)."""
        trend = branch.stack[self.span.exits[0]]
        controller = branch.controller
        if trend.slope is None or controller is None or not controller.reads_indicator:
            return None
        if self.probe is not None:
            return None  # the block-0 indicator's profile is block 0's, not the stack's
        expected = sum(self._profile(branch)[step - trend.gap + 1 : step + 1]) / trend.gap
        return trend.change_per_sample(self.group) / max(expected, 1e-12)

    def _record(self, branch: Branch, key: str, change: torch.Tensor | None, step: int) -> None:
        """One calibration entry a step (`change` None: this model has nothing to compare with
        yet, e.g. an expert taking over half-way: the last entry carries on, not a false 0)."""
        req = self._run.request
        if req.branch == 0:  # the request's first branch, whichever model runs it: one entry a step
            recorded = req.recorded.setdefault(key, [])
            last = recorded[-1] if recorded else 0.0
            recorded.extend([last] * (step - len(recorded)))
            if step == 0:
                recorded.append(0.0)
            else:
                recorded.append(float(change.mean()) if change is not None else last)

    # ---- what the action strategies share ----------------------------------------------------

    def _record_stack(self, branch: Branch, value: torch.Tensor, step: int) -> None:
        """Calibration: the residual's change (first difference) and curvature (second)."""
        last, earlier = branch.last_stack, branch.earlier_stack
        group = self.group
        self._record(
            branch, "stack", relative_change(value, last, group) if last is not None else None, step
        )
        bent = (value - last) - (last - earlier) if earlier is not None else None
        curvature = relative_change(bent + last, last, group) if bent is not None else None
        self._record(branch, "curvature", curvature, step)
        branch.earlier_stack, branch.last_stack = last, value

    def _rebuild(self, trend: Trend, base: int | None, entries: dict[int, Any], step, config):
        cached = trend.at(step, config.extrapolate, config.damping)
        return entries[base] + cached if base is not None else cached

    def _release(self, span: Boundary, values: list[Any]) -> None:
        for index in range(span.start, span.stop):
            for slot in self.program.release[index]:
                values[slot] = None

    def _set_anchor(self, branch: Branch, before: list[Any], values: list[Any]) -> None:
        """After a full step: keep what a token refresh will compare against."""
        trend = branch.stack[self.span.exits[0]]
        branch.token = None
        exits = {out: values[out] for out in self.span.exits}
        branch.token_source = (before, exits) if trend.slope is not None else None

    def _anchor(self, branch: Branch) -> TokenAnchor:
        """The anchor of the last full step: its most-changed tokens, run alone (built once)."""
        if branch.token is None:
            before, exits = branch.token_source
            slope = branch.stack[self.span.exits[0]].slope
            batch, rows = slope.shape[:2]
            # the first exit is the stream, or the joint sequence where the span joins them
            joined = self.span.bases[0] is None
            tokens = rows - sum(self.joint) if joined else rows
            first = self.joint[0] if joined else 0
            # [B, N]: each token's change between the last two full steps
            scores = slope[:, first : first + tokens].abs().mean(-1)
            if self._shared_by_batch(before, batch, tokens):  # one set of tokens for all
                scores = scores.mean(0, keepdim=True).expand_as(scores)
            chosen = scores.topk(refresh_count(self._settings().token_ratio, tokens), dim=1)
            chosen = chosen.indices
            chosen = chosen.sort(dim=1).values
            outputs = {
                out: _take(value, chosen, 1, tokens, self.joint) for out, value in exits.items()
            }
            short = self._run_short(before, chosen, tokens)
            branch.token = TokenAnchor(chosen, outputs, short, tokens)
        return branch.token

    def _shared_by_batch(self, values: list[Any], batch: int, tokens: int) -> bool:
        """Whether an input the span gathers has no batch axis (a rotary table), so the
        batch refreshes one set of tokens."""
        return any(
            self._token_axes(values[slot], batch, tokens)
            and not per_sample(_shape(values[slot]), batch)
            for slot in self.span.entries
        )

    def _token_axes(self, value: Any, batch: int, tokens: int) -> list[int]:
        """`diffopt.guards.token_axes` of a value the span reads."""
        mask = isinstance(value, torch.Tensor) and value.dtype == torch.bool
        return token_axes(_shape(value), batch, tokens, self.joint, mask=mask)

    def _run_short(
        self, values: list[Any], chosen: torch.Tensor, tokens: int
    ) -> dict[int, torch.Tensor]:
        """The span run on the `chosen` of its `tokens` tokens of each sample only: its exits,
        [B, k, ...] (and the other streams' rows, where an exit holds them)."""
        span = self.span
        batch, count = chosen.shape
        short = list(values)
        for slot in span.entries:
            value = values[slot]
            axes = self._token_axes(value, batch, tokens)
            if axes:
                short[slot] = _take(value, chosen, axes[0], tokens, self.joint)
        for index in range(span.start, span.stop):
            lowered = self.program.regions[index]
            inputs = [short[s] for s in lowered.inputs]
            outputs = self.token_variant(index, count, inputs)(*inputs)
            for slot, value in zip(lowered.outputs, outputs, strict=True):
                short[slot] = value
        return {out: short[out] for out in span.exits}

    def token_variant(self, index: int, count: int, examples: list[Any]) -> Any:
        """Region `index` for a `count`-token sequence: from the `variants` provider when one
        was given; else compiled on first use, or for an engine region (which cannot be
        recompiled) the variant exported with it."""
        if self.variants is not None:
            return self.variants(index, count, examples)
        key = (index, count)
        with self._compiling:
            if key not in self._variants:
                self._variants[key] = self._token_variant(index, count, examples)
        return self._variants[key]

    def _token_variant(self, index: int, count: int, examples: list[Any]) -> Any:
        lowered = self.program.regions[index]
        exported = getattr(lowered, "token_variants", None)
        if exported is None:
            return compile_region(lowered, examples, self.inner)
        if count in exported:
            return exported[count]
        raise ConfigError(
            f"this engine's region {lowered.region.name!r} was exported for token "
            f"refreshes of {sorted(exported) or 'no'} tokens, not {count}: export again "
            "with cache.polish='token' and the cache.token_ratio and resolution you serve"
        )


# ---- the actions, each a strategy registered by name --------------------------------------------


def _stack_cached(executor: CachingExecutor, branch: Branch) -> bool:
    """Every exit of the span has a cached residual (from the first full step on)."""
    return all(out in branch.stack for out in executor.span.exits)


@strategy("full")
def _full(executor: CachingExecutor, call: SpanCall) -> float:
    """Run the span; cache its residuals and what the request's refresh action will read."""
    span, branch, values, entries, step = (
        executor.span,
        call.branch,
        call.values,
        call.entries,
        call.step,
    )
    track_blocks = executor._armed("block", call.config)
    before = list(values)  # keeps parameters alive for the short run after the span
    for index in range(span.start, span.stop):
        block = executor.block_spans.get(index) if track_blocks else None
        inputs = {s: values[s] for s in block.entries} if block else None
        executor.step(index, values)
        if block:
            executor._bind(block, inputs, values)
            trends = branch.blocks.setdefault(index, {})
            for out, base in zip(block.exits, block.bases, strict=True):
                value = values[out] - inputs[base] if base is not None else values[out]
                trends.setdefault(out, Trend()).record_full(value, step)
    executor._bind(span, entries, values)
    for out, base in zip(span.exits, span.bases, strict=True):
        value = values[out] - entries[base] if base is not None else values[out]
        trend = branch.stack.setdefault(out, Trend())
        if branch.calibrating and out == span.exits[0]:
            executor._record_stack(branch, value, step)
        trend.record_full(value, step)
    if executor._armed("token", call.config):
        executor._set_anchor(branch, before, values)
    ratio = executor._against_profile(branch, step)
    if ratio is not None:
        if call.config.check == "stack":
            branch.drifting = ratio > call.config.check_tolerance
        req = executor._run.request
        if req.branch == 0:
            req.fit.append(float(ratio.mean()))
    return 1.0


@strategy("reuse", ready=_stack_cached)
def _reuse(executor: CachingExecutor, call: SpanCall) -> float:
    """Skip the span: each exit is its fresh input plus the cached residual."""
    span, branch = executor.span, call.branch
    for out, base in zip(span.exits, span.bases, strict=True):
        rebuilt = executor._rebuild(branch.stack[out], base, call.entries, call.step, call.config)
        call.values[out] = span.laid_out(out, rebuilt)
    executor._release(span, call.values)
    return 0.0


@strategy(
    "block",
    ready=lambda executor, branch: _stack_cached(executor, branch) and bool(branch.blocks),
)
def _refresh_blocks(executor: CachingExecutor, call: SpanCall) -> float:
    """Run the blocks whose residual changed most; the others re-add their cached residual."""
    span, branch, values, step, config = (
        executor.span,
        call.branch,
        call.values,
        call.step,
        call.config,
    )
    group = executor.group  # every rank ranks the blocks alike: they run the same ones
    ranked = sorted(branch.blocks, key=lambda i: -_block_change(branch.blocks[i], group))
    run = set(ranked[: math.ceil(config.block_ratio * len(ranked))])
    for index in range(span.start, span.stop):
        trends = branch.blocks.get(index)
        if trends is None or index in run:
            executor.step(index, values)
            continue
        block = executor.block_spans[index]
        inputs = {s: values[s] for s in block.entries}
        for out, base in zip(block.exits, block.bases, strict=True):
            rebuilt = executor._rebuild(trends[out], base, inputs, step, config)
            values[out] = block.laid_out(out, rebuilt)
        executor._release(block, values)
    for out, base in zip(span.exits, span.bases, strict=True):
        value = values[out] - call.entries[base] if base is not None else values[out]
        branch.stack[out].record(value, step)
    return len(run) / len(ranked)


@strategy(
    "token",
    ready=lambda executor, branch: (
        _stack_cached(executor, branch) and branch.token_source is not None
    ),
)
def _refresh_tokens(executor: CachingExecutor, call: SpanCall) -> float:
    """Refresh the anchor's tokens: their output moves as the short run's output moves.

    The short run sees only the chosen tokens, so its attention misses the others; using
    its change since the anchor (not its value) cancels that to first order.
    """
    span, branch, values, entries = executor.span, call.branch, call.values, call.entries
    anchor = executor._anchor(branch)
    current = executor._run_short(values, anchor.chosen, anchor.tokens)
    for out, base in zip(span.exits, span.bases, strict=True):
        full = executor._rebuild(branch.stack[out], base, entries, call.step, call.config)
        full = full.clone()
        moved = anchor.outputs[out] + current[out] - anchor.short[out]
        rows = _rows(anchor.chosen, full.shape[1], anchor.tokens, executor.joint)
        full.scatter_(1, _expand(rows, full), moved)
        branch.stack[out].record(full - entries[base] if base is not None else full, call.step)
        values[out] = span.laid_out(out, full)
    executor._release(span, values)
    return anchor.chosen.shape[1] / anchor.tokens


def _sample(value: torch.Tensor) -> bool:
    """Whether `value` may hold samples: not a table broadcast over batch and another axis."""
    return value.dim() < 3 or value.shape[0] != 1 or 1 not in value.shape[1:-1]


def _shape(value: Any) -> tuple[int, ...] | None:
    """A tensor's shape; None for the sizes dynamic shapes pass as inputs."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _block_change(trends: dict[int, Trend], group: Any = None) -> float:
    return max(t.change(group) for t in trends.values())


def _take(
    value: torch.Tensor,
    chosen: torch.Tensor,
    axis: int,
    tokens: int,
    joint: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """`value` at the `chosen` [B, k] of its `tokens` tokens along `axis`: each sample's own
    where it has a batch axis, else the batch's one set (`chosen`'s rows are equal then)."""
    chosen = _rows(chosen, value.shape[axis], tokens, joint)
    if not per_sample(tuple(value.shape), len(chosen)):
        return value.index_select(axis, chosen[0])
    shape = [1] * value.dim()
    shape[0], shape[axis] = len(chosen), chosen.shape[1]
    index = chosen.view(shape).expand(
        *value.shape[:axis], chosen.shape[1], *value.shape[axis + 1 :]
    )
    # gather takes the index's strides; compiled regions expect dense rows
    return value.gather(axis, index).contiguous()


def _rows(chosen: torch.Tensor, length: int, tokens: int, joint: tuple[int, int]) -> torch.Tensor:
    """The rows of an axis of `length` that hold the `chosen` [B, k] of `tokens` tokens: those,
    or on an axis over the joint sequence (`Guard.joint`) those and every other stream's row,
    or on another stream's own axis (an exit that passes whole) all of its rows."""
    if length == tokens:
        return chosen
    if length != tokens + sum(joint):  # another stream's axis, which a refresh passes whole
        return torch.arange(length, device=chosen.device).expand(len(chosen), -1)
    before = joint[0]
    rows = torch.arange(length, device=chosen.device).expand(len(chosen), -1)
    return torch.cat([rows[:, :before], before + chosen, rows[:, before + tokens :]], 1)


def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, k] token indices broadcast over `like`'s trailing dimensions, for gather/scatter."""
    return index.view(*index.shape, *[1] * (like.dim() - 2)).expand(-1, -1, *like.shape[2:])


def _slots_in(structure: Any) -> list[Any]:
    import torch.fx as fx

    from .lowering import Slot

    found: list[Any] = []
    fx.node.map_aggregate(structure, lambda v: found.append(v) if isinstance(v, Slot) else None)
    return found
