"""`diffopt.unroll`: a whole few-step sampling schedule as one module, so one static graph.

The forward is the sampling loop written out step by step: latents and conditioning in, final
latents out. Nothing in it depends on Python state that changes from step to step, so dynamo traces
it into one graph (``torch.compile(sampler, backend="diffopt", fullgraph=True)``) and
``torch.export`` / ONNX take it whole.

Scheduler arithmetic: every single-step diffusers scheduler (flow-match Euler, Euler, DDIM with
η = 0, LCM/TCD consistency sampling) moves the latents by an affine map of the latents, the model
output and, for consistency samplers, fresh noise. `scheduler_steps` measures those coefficients by
calling the scheduler itself on probe tensors, checks the map really is affine, and the forward
inlines them as multiply-adds: the scheduler's own numbers, no re-implementation of its formulas.

Fractional ("1.x-step") schedules: a `Partial` step runs the prologue and the first k blocks of the
stack, and adds the residual the remaining blocks produced in the last full step, passed through a
small per-step `Compensation` (fit with `diffopt.fit_compensation`). In the unrolled graph that
residual is a plain dataflow edge from one step to the next: no cache, no runtime decisions.
Dual-stream blocks (Flux, SD3), which return the pair (text, image), work the same way: the taps
and the stand-in carry both streams (`Streams`), and the compensation maps the image stream.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from diffopt.config import ConfigError

from .compensation import Compensation
from .sampler import Conditioning, guidance_batch, mix_guidance, set_schedule


@dataclass(frozen=True)
class Full:
    """A step that runs the whole denoiser."""

    def __str__(self) -> str:
        return "full"


@dataclass(frozen=True)
class Partial:
    """A step that runs the prologue and the first `blocks` blocks, and reuses the rest.

    The reused blocks contribute the residual they added in the last full step, through this
    step's compensation.
    """

    blocks: int

    def __str__(self) -> str:
        return f"partial(blocks={self.blocks})"


Step = Full | Partial
full = Full()
"""The step that runs everything: ``diffopt.unroll(..., [diffopt.full, diffopt.partial(5)])``."""
partial = Partial


@dataclass(frozen=True)
class StepCoefficients:
    """One scheduler step as the affine map the forward inlines:

    ``model_in = input_scale · x``; ``x ← latents · x + output · model(model_in, timestep)
    + noise · ε`` (ε fresh Gaussian noise; 0 for deterministic schedulers)."""

    timestep: float
    input_scale: float
    latents: float
    output: float
    noise: float


def scheduler_steps(scheduler: Any, steps: int | Sequence[float]) -> list[StepCoefficients]:
    """Measure each step of `scheduler` (a step count, or explicit sigmas) as `StepCoefficients`.

    Raises `ConfigError` for a scheduler whose step is not affine in latents and model output
    (clipping, thresholding, multistep solvers that remember earlier outputs).
    """
    for flag in ("clip_sample", "thresholding"):
        if getattr(scheduler.config, flag, False):
            raise ConfigError(
                f"{type(scheduler).__name__} has {flag}=True, which clamps inside its step, so the "
                f"step cannot be unrolled as arithmetic; build it with {flag}=False"
            )
    scheduler = copy.deepcopy(scheduler)
    set_schedule(scheduler, steps)
    shape = (64,)
    probe = torch.Generator().manual_seed(0)
    x_probe, v_probe = torch.randn(shape, generator=probe), torch.randn(shape, generator=probe)
    seed = 1234
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def scale_input(state: Any, t: Any, latents: torch.Tensor) -> torch.Tensor:
        scale = getattr(state, "scale_model_input", None)  # flow matching has none
        return latents if scale is None else scale(latents, t)

    def run(state: Any, t: Any, output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        trial = copy.deepcopy(state)  # a step advances the scheduler; probe a copy
        scale_input(trial, t, latents)
        generator = torch.Generator().manual_seed(seed)
        return trial.step(output, t, latents, generator=generator, return_dict=False)[0]

    found = []
    zeros, ones = torch.zeros(shape), torch.ones(shape)
    for index, t in enumerate(scheduler.timesteps):
        scale = scale_input(copy.deepcopy(scheduler), t, ones)
        noise_term = run(scheduler, t, zeros, zeros)
        noise = float((noise_term @ eps) / (eps @ eps))
        coefficients = StepCoefficients(
            timestep=float(t),
            input_scale=float(scale.mean()),
            latents=float((run(scheduler, t, zeros, ones) - noise_term).mean()),
            output=float((run(scheduler, t, ones, zeros) - noise_term).mean()),
            noise=noise,
        )
        expected = _apply(coefficients, x_probe, v_probe, eps)
        actual = run(scheduler, t, v_probe, x_probe)
        affine = (
            torch.allclose(actual, expected, rtol=1e-4, atol=1e-5)
            and torch.allclose(noise_term, noise * eps, rtol=1e-4, atol=1e-5)  # no memory
            and torch.allclose(scale, torch.full_like(scale, coefficients.input_scale))
        )
        if not affine:
            raise ConfigError(
                f"{type(scheduler).__name__} step {index} (timestep {float(t):g}) is not an affine "
                "map of latents and model output (a multistep solver or a stochastic sampler "
                "with churn?); unroll supports single-step schedulers: FlowMatchEulerDiscrete, "
                "EulerDiscrete, DDIM (eta=0), LCM, TCD"
            )
        found.append(coefficients)
        # advance on non-zero values: a solver that remembers them shows it at the next step
        scale_input(scheduler, t, x_probe)
        scheduler.step(v_probe, t, x_probe, generator=torch.Generator(), return_dict=False)
    return found


def _apply(c: StepCoefficients, x: torch.Tensor, out: torch.Tensor, eps: Any) -> torch.Tensor:
    x = c.latents * x + c.output * out
    return x + c.noise * eps if c.noise else x


def parse_schedule(steps: int | float | str | Sequence[Step], num_blocks: int | None) -> list[Step]:
    """Steps from a count (``4``), a fractional count (``"1.67"``) or an explicit list.

    A fractional count x runs ⌊x⌋ full steps and one partial step running ⌊frac(x) · blocks⌋
    blocks, so its effective NFE is about x: the prologue, epilogue and compensation add a little
    (`UnrolledSampler.effective_nfe` counts it exactly).
    """
    if isinstance(steps, Sequence) and not isinstance(steps, str):
        schedule = list(steps)
        bad = [s for s in schedule if not isinstance(s, Full | Partial)]
        if bad:
            raise ConfigError(f"schedule entries must be diffopt.full or diffopt.partial(k): {bad}")
    else:
        count = float(steps)
        if count < 1:
            raise ConfigError(f"a schedule needs at least one full step, got {steps!r}")
        whole, fraction = int(count), count - int(count)
        schedule = [full] * whole
        if fraction > 1e-9:
            if num_blocks is None:
                raise ConfigError("a fractional schedule needs the denoiser's block stack")
            schedule.append(Partial(int(fraction * num_blocks)))
    if not schedule or not isinstance(schedule[0], Full):
        raise ConfigError("the first step must be full: a partial step reuses a full step's blocks")
    for step in schedule:
        if (
            isinstance(step, Partial)
            and num_blocks is not None
            and not 0 <= step.blocks < num_blocks
        ):
            raise ConfigError(
                f"{step} must run between 0 and {num_blocks - 1} of {num_blocks} blocks"
            )
    return schedule


class Streams(NamedTuple):
    """What a dual-stream block (Flux, SD3 and their successors) carries from one block to the
    next: the image tokens and the text tokens, each updated by the block.

    Such a block returns the pair as a tuple, in an order of its own (diffusers' Flux and SD3:
    ``(encoder_hidden_states, hidden_states)``; HunyuanVideo and CogVideoX the other way); the
    order is read off the shapes (the image stream keeps the shape of the block's
    ``hidden_states``) and kept here so that a partial step returns what the block would. SD3's
    last block drops the text stream: `encoder` is None there.
    """

    hidden: torch.Tensor
    encoder: torch.Tensor | None
    hidden_first: bool


def _difference(end: Any, start: Any) -> Any:
    """The residual between two taps: a tensor, or the residual of each of two streams."""
    if not isinstance(end, Streams):
        return end - start
    text = None if end.encoder is None or start.encoder is None else end.encoder - start.encoder
    return Streams(end.hidden - start.hidden, text, end.hidden_first)


def _inner(block: nn.Module) -> nn.Module:
    """The block a tap wraps (taps may nest)."""
    while isinstance(block, _Tap):
        block = block.block
    return block


def _stream_names(block: nn.Module) -> list[str]:
    """The block's parameter names in order, to find its streams among positional arguments."""
    return list(inspect.signature(_inner(block).forward).parameters)


def _stream_inputs(
    names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (hidden_states, encoder_hidden_states) a block call was given, by keyword or place."""
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    hidden = given["hidden_states"] if "hidden_states" in given else args[0]  # a user's block(h)
    return hidden, given.get("encoder_hidden_states")


def _streams(out: tuple[Any, ...], hidden_in: torch.Tensor, block: nn.Module) -> Streams:
    """A dual-stream block's output as `Streams`: the image stream has the input's shape."""
    name = type(_inner(block)).__name__
    if len(out) != 2:
        raise ConfigError(
            f"partial steps take blocks returning hidden states or a pair (image, text); {name} "
            f"returns a tuple of {len(out)}"
        )
    shaped = [isinstance(o, torch.Tensor) and o.shape == hidden_in.shape for o in out]
    if shaped.count(True) != 1:
        what = ", ".join("None" if o is None else str(tuple(o.shape)) for o in out)
        raise ConfigError(
            f"a partial step tells {name}'s image stream from its text stream by shape (the "
            f"image keeps the shape of hidden_states, {tuple(hidden_in.shape)}), but it returns "
            f"({what})"
            + ("; give the text a token count other than the image's" if all(shaped) else "")
        )
    hidden_first = shaped[0]
    return Streams(out[0 if hidden_first else 1], out[1 if hidden_first else 0], hidden_first)


class _StandIn(nn.Module):
    """A module in a block's place. Public attributes it lacks come from that block: models read
    their blocks' parts (DiT's forward takes block 0's ``norm1.emb``, Qwen-Image 2.1's every
    block's ``attn.processor``). Private ones do not: diffusers finds a module's hooks by its
    ``_diffusers_hook``, and the stand-in must not pass for the block it wraps there (under
    context parallelism the block's split and gather would run twice)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.__dict__["_stands_for"] = block  # not registered: a view's weights stay the model's

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "_stands_for" not in self.__dict__:
                raise
            return getattr(self.__dict__["_stands_for"], name)


class _Tap(_StandIn):
    """Wraps a block of a full step; keeps its input or output, the boundary of a residual:
    a tensor, or `Streams` for a dual-stream block."""

    def __init__(self, block: nn.Module, keep: str) -> None:
        super().__init__(block)
        self.block, self.keep, self.value = block, keep, None
        self.names = _stream_names(block)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden, encoder = _stream_inputs(self.names, args, kwargs)
        out = self.block(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self.value = hidden if self.keep == "input" else out
        elif isinstance(out, tuple):
            streams = _streams(out, hidden, self.block)
            if self.keep == "input":
                streams = Streams(hidden, encoder, streams.hidden_first)
            self.value = streams
        else:
            raise ConfigError(
                f"partial steps need blocks that return hidden states (DiT, PixArt) or a tuple "
                f"of image and text states (Flux, SD3); {type(_inner(self.block)).__name__} "
                f"returns {type(out).__name__}"
            )
        return out


class _Reuse(_StandIn):
    """Stands in for the skipped blocks of a partial step: hidden + compensation(residual).

    For a dual-stream block it returns the pair in the block's order, and only the image stream
    goes through the compensation; the text stream gets its residual as it was. The image stream
    is the one the model's output reads: the stacks a 1.x schedule skips the end of (Flux's and
    ref-flux's single-stream stack, SD3's joint stack) discard the text stream after their last
    block (SD3's returns None for it), so a map fit on the text residual there would be fit on
    a tensor nothing reads. One map per partial step also keeps the fit, its error table and the
    saved files the same for single- and dual-stream models. (Skipping the end of Flux's
    dual-stream stack, which its single-stream blocks then read, reuses the text residual
    uncompensated.)
    """

    def __init__(self, compensation: Compensation, first_skipped: nn.Module) -> None:
        super().__init__(first_skipped)
        self.compensation, self.residual = compensation, None
        self.names = _stream_names(first_skipped)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden, encoder = _stream_inputs(self.names, args, kwargs)
        residual = self.residual
        if not isinstance(residual, Streams):
            return hidden + self.compensation(residual)
        hidden = hidden + self.compensation(residual.hidden)
        encoder = None if residual.encoder is None else encoder + residual.encoder
        return (hidden, encoder) if residual.hidden_first else (encoder, hidden)


def _with_blocks(denoiser: nn.Module, attribute: str, blocks: list[nn.Module]) -> nn.Module:
    """A shallow copy of `denoiser` sharing its weights, with another block list."""
    view = copy.copy(denoiser)
    view._modules = dict(denoiser._modules)
    view._modules[attribute] = nn.ModuleList(blocks)
    if "forward" in denoiser.__dict__:  # a hook wrapped the model's own forward, bound to it
        view.forward = _hooked_forward(view, denoiser)
    return view


def _hooked_forward(view: nn.Module, model: nn.Module) -> Callable[..., Any]:
    """`view`'s own forward through the hooks diffusers put on `model`'s (context parallelism
    splits the inputs there): the copied wrapper would run `model`'s forward, every block."""
    registry = getattr(model, "_diffusers_hook", None)
    hooks = [registry.hooks[name] for name in registry._hook_order] if registry else []
    if registry is None or any(hasattr(hook, "new_forward") for hook in hooks):
        raise ConfigError(
            f"partial steps cannot run {type(model).__name__}: its forward is wrapped (by "
            f"{'a hook that replaces it' if registry else 'something other than diffusers hooks'}"
            "), so a view of it with fewer blocks would still run them all; unroll whole steps"
        )
    own = type(view).forward.__get__(view)

    def forward(*args: Any, **kwargs: Any) -> Any:
        for hook in reversed(hooks):  # the last one registered wraps the others
            args, kwargs = hook.pre_forward(view, *args, **kwargs)
        out = own(*args, **kwargs)
        for hook in hooks:
            out = hook.post_forward(view, out)
        return out

    return forward


def find_block_stack(denoiser: nn.Module, attribute: str | None = None) -> str:
    """The attribute holding the blocks that partial steps cut: `attribute`, the denoiser's
    only `ModuleList`, or of several, the stack its output head reads, where that is clear.

    Candidates are stacks of one attention block class that keep the stream's resolution (a
    UNet's up and down blocks resample it). Of several: the single-stream stack a dual-stream
    model runs last (``single_transformer_blocks``: Flux, HunyuanVideo, AuraFlow; HiDream's
    ``single_stream_blocks``), else the one longer than every other (Lumina 2's ``layers``
    after its refiners, Wan's ``blocks`` beside VACE's). Anything else (Latte's spatial and
    temporal stacks, run interleaved) is refused, naming the stacks."""
    name = type(denoiser).__name__
    if attribute is not None:
        if not isinstance(getattr(denoiser, attribute, None), nn.ModuleList):
            raise ConfigError(f"{name}.{attribute} is not an nn.ModuleList")
        return attribute
    lists = {n: c for n, c in denoiser.named_children() if isinstance(c, nn.ModuleList)}
    if len(lists) == 1:
        return next(iter(lists))
    stacks = {n: len(c) for n, c in lists.items() if _attention_blocks(c)}
    single = [n for n in stacks if n.startswith("single_")]
    longest = [n for n, size in stacks.items() if size == max(stacks.values(), default=0)]
    if len(stacks) == 1 or len(single) == 1 or len(longest) == 1:
        return (list(stacks) if len(stacks) == 1 else single or longest)[0]
    raise ConfigError(
        f"partial steps cut one block stack, and which of {name}'s ModuleLists {list(lists)} its "
        f"output reads is not clear (stacks of attention blocks: {stacks or 'none'}): pass "
        "blocks='<name>'"
    )


def _attention_blocks(stack: nn.ModuleList) -> bool:
    """Whether every member of `stack` is one class of attention block that keeps the stream's
    resolution (not a container: Stable Cascade's stacks are lists of lists; not a UNet's up or
    down block, which resamples: Kandinsky 3's ``UpSampleBlock``)."""
    kinds = {type(block) for block in stack}
    if len(kinds) != 1:
        return False
    kind = kinds.pop()
    return (
        not issubclass(kind, (nn.ModuleList, nn.Sequential, nn.ModuleDict))
        and not re.search(r"(Up|Down)(Sample)?Block", kind.__name__)
        and any("Attention" in type(m).__name__ for m in stack[0].modules())
    )


class UnrolledSampler(nn.Module):
    """The whole schedule as one forward; build it with `diffopt.unroll`."""

    def __init__(
        self,
        denoiser: nn.Module,
        coefficients: list[StepCoefficients],
        schedule: list[Step],
        *,
        guidance: float,
        guidance_input: str | None,
        blocks: str | None,
        compensation: str,
        rank: int,
        channel_axis: int = 1,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.channel_axis = channel_axis
        """The latents' channel axis: where `forward`'s ``concat`` joins them (SVD's
        [B, F, C, H, W] latents: 2)."""
        self.latents_input = _latents_keyword(denoiser)
        self.coefficients, self.schedule = coefficients, schedule
        self.guidance, self.guidance_input = guidance, guidance_input
        self.stack = blocks
        """The denoiser's attribute holding the block stack its partial steps cut (None when
        the schedule has none)."""
        partial_steps = [i for i, s in enumerate(schedule) if isinstance(s, Partial)]
        self.compensation = nn.ModuleDict()
        parallel = getattr(denoiser, "_parallel_config", None)  # diffusers' enable_parallelism
        context = getattr(parallel, "context_parallel_config", None)
        self.group = context._flattened_mesh.get_group() if context is not None else None
        """The ranks holding shards of the tokens (context parallelism): a compensation fit
        sums over all of them."""
        # Built once: the views share the denoiser's weights and are not registered as children,
        # so parameters and state_dict list every weight once.
        self._views: dict[int, nn.Module] = {}
        self._plain: Callable[..., Any] = denoiser  # what a step without views calls
        self._taps: dict[int | str, _Tap] = {}
        if not partial_steps:
            return
        stack = getattr(denoiser, blocks)
        width = _hidden_width(stack)
        starts = sorted({schedule[i].blocks for i in partial_steps})
        tapped = list(stack)
        for k, where, keep in [
            *((k, max(k - 1, 0), "output" if k else "input") for k in starts),
            ("end", len(stack) - 1, "output"),
        ]:
            tapped[where] = self._taps[k] = _Tap(tapped[where], keep)  # taps may nest
        full_view = _with_blocks(denoiser, blocks, tapped)
        self._reuse: dict[int, _Reuse] = {}
        for i, step in enumerate(schedule):
            if isinstance(step, Partial):
                self.compensation[str(i)] = Compensation(width, kind=compensation, rank=rank)
                self._reuse[i] = _Reuse(self.compensation[str(i)], stack[step.blocks])
                self._views[i] = _with_blocks(
                    denoiser, blocks, [*stack[: step.blocks], self._reuse[i]]
                )
            else:
                self._views[i] = full_view

    @property
    def noisy_steps(self) -> int:
        """How many steps add fresh noise (consistency samplers): the first dim of `noise`."""
        return sum(1 for c in self.coefficients if c.noise)

    def forward(
        self,
        latents: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning | None = None,
        noise: torch.Tensor | None = None,
        *,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final latents from starting `latents`, conditioning `cond` (the denoiser's keyword
        inputs, nested as pipelines pass them) and, with guidance by a batch of two, `uncond`.
        `noise`: [noisy_steps, *latents shape] for consistency samplers (drawn fresh when None).
        `concat`: channels an image-to-video pipeline joins onto the latents at every step (Wan
        I2V's condition, HunyuanVideo 1.5's image latents and mask), after the input scaling,
        on the channel axis; the denoiser predicts the latents' channels only."""
        return self._run(latents, cond, uncond, noise, concat=concat)[0]

    def _run(
        self,
        latents: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning | None,
        noise: torch.Tensor | None,
        collect: int | None = None,
        concat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The loop; with `collect` = a partial step's index, also runs that step in full and
        returns (reused residual, the residual the skipped blocks really produce) there."""
        guided, inputs = self._inputs(latents, cond, uncond)
        if noise is not None and tuple(noise.shape) != (self.noisy_steps, *latents.shape):
            raise ConfigError(
                f"noise has shape {tuple(noise.shape)}; this schedule adds noise at "
                f"{self.noisy_steps} steps: pass [{self.noisy_steps}, *latents.shape]"
            )
        x, residuals, pair, noisy = latents, {}, None, 0
        axis = self.channel_axis
        for i, (c, step) in enumerate(zip(self.coefficients, self.schedule, strict=True)):
            batch = self._model_input(c.input_scale * x, concat, guided)
            timestep = batch.new_full((batch.shape[0],), c.timestep)
            if isinstance(step, Partial):
                if i == collect:
                    self._call(self._views[0], batch, timestep, inputs)  # the truth, for fitting
                    pair = (_image(residuals[step.blocks]), _image(self._residual(step.blocks)))
                self._reuse[i].residual = residuals[step.blocks]
            out = self._call(self._views.get(i, self._plain), batch, timestep, inputs)
            if isinstance(step, Partial):
                self._reuse[i].residual = None
            elif self._views:
                residuals = {k: self._residual(k) for k in self._taps if k != "end"}
            if out.shape[axis] < x.shape[axis]:
                raise ConfigError(
                    f"the denoiser predicts {out.shape[axis]} channels for latents of "
                    f"{x.shape[axis]} (axis {axis}): its input carries conditioning channels "
                    f"(image-to-video); pass the latents' {out.shape[axis]} channels as latents "
                    "and the rest as concat="
                )
            out = out.narrow(axis, 0, x.shape[axis])  # learned sigma appends variance channels
            if guided:
                out = mix_guidance(out, self.guidance)
            eps = None
            if c.noise:
                eps = torch.randn_like(x) if noise is None else noise[noisy]
                noisy += 1
            x = _apply(c, x, out, eps)
        for tap in self._taps.values():
            tap.value = None  # hold no activations between calls
        return x, pair

    def _model_input(
        self, latents: torch.Tensor, concat: torch.Tensor | None, guided: bool
    ) -> torch.Tensor:
        """One step's denoiser input: the scaled latents with the `concat` channels, doubled
        for guidance by a batch of two."""
        if concat is not None:
            latents = torch.cat([latents, concat], dim=self.channel_axis)
        return torch.cat([latents, latents]) if guided else latents

    def _inputs(
        self,
        latents: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning | None,
    ) -> tuple[bool, dict[str, Any]]:
        """Whether guidance runs as a batch of two, and the denoiser's keyword inputs."""
        guided = uncond is not None and self.guidance != 1.0 and self.guidance_input is None
        inputs = guidance_batch(cond, uncond, latents.shape[0]) if guided else dict(cond)
        if self.guidance_input is not None:
            inputs[self.guidance_input] = latents.new_full((latents.shape[0],), self.guidance)
        return guided, inputs

    def effective_nfe(
        self,
        latents: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning | None = None,
        *,
        concat: torch.Tensor | None = None,
    ) -> float:
        """FLOPs of one sampler call over the FLOPs of one full step, counted on these inputs."""
        from torch.utils.flop_counter import FlopCounterMode

        guided, inputs = self._inputs(latents, cond, uncond)
        batch = self._model_input(latents, concat, guided)
        timestep = batch.new_full((batch.shape[0],), self.coefficients[0].timestep)
        with torch.no_grad(), FlopCounterMode(display=False) as whole:
            self(latents, cond, uncond, concat=concat)
        with torch.no_grad(), FlopCounterMode(display=False) as step:
            self._call(self.denoiser, batch, timestep, inputs)
        return whole.get_total_flops() / step.get_total_flops()

    def _residual(self, start: int) -> torch.Tensor | Streams:
        return _difference(self._taps["end"].value, self._taps[start].value)

    def _call(self, denoiser: nn.Module, x: torch.Tensor, t: torch.Tensor, inputs: dict) -> Any:
        latents = {self.latents_input: x}
        return denoiser(**latents, timestep=t, **inputs, return_dict=False)[0]

    def as_step_loop(self, compile: Callable[[nn.Module], Callable[..., Any]]) -> UnrolledSampler:
        """A copy that runs the same schedule as a loop of separately compiled denoiser calls
        (``compile(denoiser_view)`` per distinct step), with the step arithmetic in Python:
        the un-unrolled baseline, to measure what unrolling buys. Shares the weights."""
        loop = copy.copy(self)
        compiled = {id(v): compile(v) for v in {id(v): v for v in self._views.values()}.values()}
        loop._views = {i: compiled[id(v)] for i, v in self._views.items()}
        loop._plain = compile(self.denoiser)
        return loop

    def describe(self) -> str:
        """The schedule in words: ``full@t=1000, partial(blocks=5)@t=500``."""
        pairs = zip(self.schedule, self.coefficients, strict=True)
        return ", ".join(f"{step}@t={c.timestep:g}" for step, c in pairs)

    def extra_repr(self) -> str:
        return f"schedule=[{self.describe()}], guidance={self.guidance}"


def _image(residual: torch.Tensor | Streams) -> torch.Tensor:
    """The residual a partial step's compensation maps: a dual-stream block's image stream."""
    return residual.hidden if isinstance(residual, Streams) else residual


def _latents_keyword(denoiser: nn.Module) -> str:
    """The keyword a denoiser takes its latents by: ``hidden_states`` (transformers) or
    ``sample`` (UNets)."""
    parameters = inspect.signature(denoiser.forward).parameters
    found = next((k for k in ("hidden_states", "sample") if k in parameters), None)
    if found is None:
        raise ConfigError(
            f"{type(denoiser).__name__}.forward takes neither hidden_states nor sample; unroll "
            "calls denoiser(hidden_states=..., timestep=..., **cond, return_dict=False)"
        )
    return found


def _hidden_width(stack: nn.ModuleList) -> int:
    """The hidden size of a block stack: what the first attention's query projection reads
    (``to_q``, ``to_query``, a fused ``qkv``), else the width most of the block's linears read.
    Not what the last linear writes: Lumina-Next's feed-forward defines its up projection after
    the down one, and LTX-2's blocks end with their audio stream's layers."""
    named = [(n.rsplit(".", 1)[-1], m) for n, m in stack[0].named_modules()]
    linears = [(n, m) for n, m in named if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("partial steps need transformer blocks (found no nn.Linear in block 0)")
    queries = [m for n, m in linears if n in ("to_q", "to_query", "q_proj") or "qkv" in n]
    if queries:
        return queries[0].in_features
    return collections.Counter(m.in_features for _, m in linears).most_common(1)[0][0]


def unroll(
    denoiser: nn.Module,
    scheduler: Any,
    steps: int | float | str | Sequence[Step] = 1,
    *,
    sigmas: Sequence[float] | None = None,
    guidance: float = 1.0,
    guidance_input: str | None = None,
    blocks: str | None = None,
    compensation: str = "affine",
    rank: int = 8,
    timestep_scale: float = 1.0,
    channel_axis: int = 1,
) -> UnrolledSampler:
    """The whole sampling schedule of `denoiser` under `scheduler` as one module.

    Args:
        steps: a step count, a fractional count such as ``"1.67"`` (⌊x⌋ full steps and one
            partial step), or explicit steps ``[diffopt.full, diffopt.partial(blocks=5)]``.
        sigmas: explicit sigmas for the scheduler (one per step), for few-step students.
        guidance: classifier-free guidance scale. With `guidance_input` unset and an `uncond`
            passed to the forward, each step runs cond and uncond as a batch of two.
        guidance_input: the denoiser's keyword for a guidance-distilled scale (Flux: "guidance").
        blocks: the attribute holding the block stack that partial steps cut (default: the
            denoiser's only ModuleList; of several, the one its output head reads where that
            is clear, e.g. Flux's ``single_transformer_blocks``: `find_block_stack`).
        compensation: "affine" (per channel) or "lowrank" (affine plus a rank-`rank` map) on the
            reused residual of each partial step; identity until `diffopt.fit_compensation`.
        timestep_scale: multiplies the scheduler's timesteps before the denoiser sees them, for
            models that take another scale (diffusers' Flux transformer takes t / 1000: 1e-3).
        channel_axis: the latents' channel axis (1; SVD's [B, F, C, H, W]: 2): where the
            forward's ``concat`` channels join them and learned-sigma outputs are cut.
    """
    explicit = isinstance(steps, Sequence) and not isinstance(steps, str)
    if explicit:
        needs_blocks = any(isinstance(s, Partial) for s in steps)
    else:
        needs_blocks = not float(steps).is_integer()
    stack = find_block_stack(denoiser, blocks) if needs_blocks else None
    schedule = parse_schedule(steps, len(getattr(denoiser, stack)) if stack else None)
    if sigmas is not None:
        sigmas = [float(v) for v in sigmas]
        if len(sigmas) != len(schedule):
            raise ConfigError(f"{len(sigmas)} sigmas for a {len(schedule)}-step schedule")
    coefficients = scheduler_steps(scheduler, sigmas if sigmas is not None else len(schedule))
    if len(coefficients) != len(schedule):
        raise ConfigError(
            f"{type(scheduler).__name__} made {len(coefficients)} steps for a {len(schedule)}-step "
            "schedule; pass sigmas= explicitly"
        )
    if timestep_scale != 1.0:
        coefficients = [
            dataclasses.replace(c, timestep=c.timestep * timestep_scale) for c in coefficients
        ]
    return UnrolledSampler(
        denoiser,
        coefficients,
        schedule,
        guidance=guidance,
        guidance_input=guidance_input,
        blocks=stack if needs_blocks else None,
        compensation=compensation,
        rank=rank,
        channel_axis=channel_axis,
    )
