"""Quantization formats: how a linear's weight is stored, and which op computes with it.

The `quantize` pass looks `QuantConfig.format` up here, hands each eligible linear's weight to
the format's `prepare` (once, at compile time) and replaces the linear with the call it returns.
Built in: ``int``, the rotated integer linear (``diffopt::quant_linear``, `kernels/ops.py`).

A new format (group scales, NVFP4, MXFP4, ...) is one file: its op (a ``torch.library``
custom op with a fake implementation) and one registration::

    def prepare(weight: torch.Tensor, config: QuantConfig, inputs) -> QuantizedLinear:
        packed, scales = my_quantize(weight)  # raise Unsupported(why) to keep a layer as it is
        return QuantizedLinear(
            torch.ops.mylib.fp4_linear.default,
            (X, Constant("qweight", packed), Constant("qscale", scales), BIAS),
            f"fp4 linear {tuple(weight.shape)}",
        )

    register_quant_format(QuantFormat("fp4", prepare))

after which ``QuantConfig(format="fp4")`` selects it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from diffopt.config import ConfigError

from . import ops  # noqa: F401  (registers diffopt::quant_linear, which "int" emits)
from .gptq import rotated_hessian, smoothing
from .hadamard import default_group, hadamard
from .reference import low_rank_split, quantize_weight

if TYPE_CHECKING:
    from diffopt.config import QuantConfig


class _Operand:
    """Where the linear's own input or bias goes among a format op's arguments."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


X = _Operand("X")
"""The linear's input, in a `QuantizedLinear`'s arguments."""
BIAS = _Operand("BIAS")
"""The linear's bias (``None`` when it has none), in a `QuantizedLinear`'s arguments."""


@dataclass(frozen=True)
class Constant:
    """A tensor a format op reads, kept in the graph as a constant (``None``: the argument is
    None)."""

    name: str
    """Its name: per layer (``qweight`` becomes ``<module path>.qweight``), or with `shared`
    one constant for every layer that uses the name (a rotation block)."""
    value: torch.Tensor | None
    shared: bool = False


class Unsupported(ValueError):
    """Raised by `QuantFormat.prepare`: this linear stays in high precision, for the reason given
    (the pass reports it as a skip)."""


class LinearInputs:
    """What one linear saw on the capture's inputs, for formats that calibrate on it.

    Under context parallelism each rank holds a shard of the sequence: the statistics are
    reduced over the sequence's process group (`group`), so every rank prepares the same
    weight, the one a single process would. Rows every rank holds alike (tokens the plan does
    not shard, such as Flux's text tokens in its single-stream blocks) count once, not once
    per rank."""

    def __init__(self, rows: torch.Tensor, group: Any = None) -> None:
        self.rows = rows
        """float32 [M, K]: this rank's rows."""
        self.group = group

    @cached_property
    def absmax(self) -> torch.Tensor:
        """float32 [K]: each input channel's largest magnitude."""
        return self._reduced(self.rows.abs().amax(dim=0), "max")

    @cached_property
    def gram(self) -> torch.Tensor:
        """float64 [K, K]: XᵀX of the rows (GPTQ's Hessian, up to a factor)."""
        rows = self.rows.double()
        if self.group is not None:
            rows = rows * self._row_weights().sqrt()[:, None]
        return self._reduced(rows.T @ rows, "sum")

    def _row_weights(self) -> torch.Tensor:
        """1 / ranks for a row equal on every rank (same place, same values), else 1."""
        import torch.distributed as dist

        ranks = dist.get_world_size(self.group)
        sizes = torch.tensor([self.rows.shape[0], -self.rows.shape[0]])
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=self.group)
        if sizes[0] != -sizes[1]:  # shards of different lengths: nothing lines up
            return torch.ones(self.rows.shape[0], dtype=torch.float64)
        high, low = self.rows.clone(), self.rows.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        alike = (high == low).all(dim=1)
        return torch.where(alike, 1.0 / ranks, 1.0).double()

    def _reduced(self, value: torch.Tensor, how: str) -> torch.Tensor:
        if self.group is not None:
            import torch.distributed as dist

            op = dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM
            dist.all_reduce(value, op=op, group=self.group)
        return value


@dataclass(frozen=True)
class QuantizedLinear:
    """One linear as a format stores it: the op call that replaces it."""

    op: torch._ops.OpOverload
    args: tuple[Any, ...]
    """The op's arguments: `X` and `BIAS` for the linear's input and bias, a `Constant` for each
    stored tensor, anything else (bit widths, say) as it is."""
    summary: str
    """What the report says of the layer, e.g. ``w4a4-regular linear (16, 16), group 16``."""

    def bind(self, x: Any, bias: Any, constant: Callable[[Constant], Any]) -> tuple[Any, ...]:
        """The arguments with the input, the bias and each `Constant` replaced by the caller's
        values for them (graph nodes in the pass, tensors when it measures the error)."""
        return tuple(
            x if a is X else bias if a is BIAS else constant(a) if isinstance(a, Constant) else a
            for a in self.args
        )

    @property
    def stored_bytes(self) -> int:
        """Bytes of this layer's own constants (shared ones are not counted)."""
        return sum(
            a.value.nbytes
            for a in self.args
            if isinstance(a, Constant) and a.value is not None and not a.shared
        )


@dataclass(frozen=True)
class QuantFormat:
    """A quantization format, registered under `name` (`QuantConfig.format`)."""

    name: str
    prepare: Callable[[torch.Tensor, QuantConfig, LinearInputs | None], QuantizedLinear]
    """Offline, once per linear: store `weight` [N, K] as the config says and name the op call;
    raise `Unsupported` to keep this linear in high precision. The third argument is what the
    linear saw on the capture's inputs (`LinearInputs`), for formats that calibrate on it;
    ``None`` when the capture has no real inputs (fake tensors)."""


_FORMATS: dict[str, QuantFormat] = {}


def register_quant_format(fmt: QuantFormat) -> QuantFormat:
    """Make `fmt` selectable as ``QuantConfig(format=fmt.name)``; a name is registered once."""
    if fmt.name in _FORMATS:
        raise ValueError(f"a quantization format named {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def quant_formats() -> list[str]:
    """The registered format names, in registration order (``int`` first)."""
    return list(_FORMATS)


def quant_format(name: str) -> QuantFormat:
    """The format registered as `name`; an unknown name is an error that lists the known ones."""
    if name not in _FORMATS:
        raise ConfigError(
            f"quant.format={name!r} is not a registered format; use one of {list(_FORMATS)}"
        )
    return _FORMATS[name]


@dataclass(frozen=True)
class PreparedWeight:
    """A weight after what every format may do before storing it (`prepare_weight`)."""

    weight: torch.Tensor
    """The [N, K] weight left to store: smoothed, minus the branch, not yet rotated."""
    rotation: torch.Tensor | None
    """The Hadamard block to rotate it (and the activation) by along K; None: no rotation."""
    group: int | None
    smooth: torch.Tensor | None
    """[K] factors the activation is multiplied by (SmoothQuant's 1 / s), or None."""
    down: torch.Tensor | None
    """The low-rank branch [K, r] and [r, N] (float16, or int8 with `branch_scale`), or None."""
    up: torch.Tensor | None
    branch_scale: torch.Tensor | None = None
    """[r] float32 scales of an int8 branch (``quant.branch_bits=8``), else None."""

    def rotation_constant(self, config: QuantConfig) -> Constant:
        """The rotation block, one constant shared by every layer that uses it."""
        return Constant(f"rotation_{config.rotation}_{self.group}", self.rotation, shared=True)

    def tail(self, *after: Constant) -> tuple[Constant, ...]:
        """The op's trailing (branch, smoothing, branch scale) arguments, as far as any is set,
        then `after` (a format's own, e.g. the ``int`` format's scale per row) if any is set."""
        tail = (
            Constant("lowrank_down", self.down),
            Constant("lowrank_up", self.up),
            Constant("smooth", self.smooth),
            Constant("lowrank_scale", self.branch_scale),
            *after,
        )
        while tail and tail[-1].value is None:  # unset trailing arguments: left out
            tail = tail[:-1]
        return tail

    def describe(self, config: QuantConfig) -> list[str]:
        """The report's words for the branch and the smoothing."""
        said = []
        if self.down is not None:
            scale = self.branch_scale
            kib = self.down.nbytes + self.up.nbytes + (scale.nbytes if scale is not None else 0)
            bits = "int8" if scale is not None else "float16"
            said.append(f"rank {self.down.shape[1]} {bits} (+{kib / 2**10:.1f} KiB)")
        if self.smooth is not None:
            said.append(f"smoothed (α {config.smooth_alpha:g})")
        return said


def prepare_weight(
    weight: torch.Tensor, config: QuantConfig, inputs: LinearInputs | None
) -> PreparedWeight:
    """Smooth `weight` [N, K] against `inputs` (``smooth_alpha``), split off its top-`rank` SVD
    part (``rank``) and pick the rotation block (``rotation``, ``group``); raise `Unsupported`
    where the layer's shape (or a capture without real inputs) does not allow it."""
    n, k = weight.shape
    calibrated = [
        f for f, on in (("smooth_alpha", config.smooth_alpha), ("gptq", config.gptq)) if on
    ]
    if calibrated and inputs is None:
        raise Unsupported(
            f"quant.{' and quant.'.join(calibrated)} calibrate on the layer's inputs, and this "
            "capture has no real ones (fake example inputs): capture with real tensors, or turn "
            "them off"
        )
    group = config.group or default_group(k)
    if config.rotation != "none" and (group is None or k % group):
        raise Unsupported(
            f"K={k} is not a multiple of the rotation group ({group or '16, 64 or 256'}); "
            "use quant.rotation='none' for it or exclude it"
        )
    if 2 * config.rank > min(n, k):
        raise Unsupported(
            f"quant.rank={config.rank} is over half of min(N, K)={min(n, k)}: the branch would "
            "hold most of the layer (lower the rank or exclude it)"
        )
    group = group if config.rotation != "none" else None
    rotation = hadamard(config.rotation, group) if group else None
    smooth = down = up = branch_scale = None
    if config.smooth_alpha is not None:
        smooth, weight = smoothing(inputs.absmax, weight, config.smooth_alpha)
    if config.rank:
        down, up, branch_scale, weight = low_rank_split(weight, config.rank, config.branch_bits)
    return PreparedWeight(weight, rotation, group, smooth, down, up, branch_scale)


def _prepare_int(
    weight: torch.Tensor, config: QuantConfig, inputs: LinearInputs | None
) -> QuantizedLinear:
    """The ``int`` format: the weight (`prepare_weight`) rotated along K with the group Hadamard
    and quantized per output channel (or per `scale_group` along K; 4-bit values packed two a
    byte; GPTQ-rounded on `inputs` with `gptq`); `diffopt::quant_linear` rotates and quantizes
    the activation per token (and group), multiplies in integers and dequantizes."""
    k = weight.shape[1]
    if config.weight_bits == 4 and k % 2:
        raise Unsupported(f"K={k} is odd; 4-bit packing needs an even K (exclude it)")
    if config.scale_group and k % config.scale_group:
        raise Unsupported(f"K={k} is not a multiple of quant.scale_group={config.scale_group}")
    prepared = prepare_weight(weight, config, inputs)
    hessian = None
    # clipping scored on the output needs the layer's inputs (without them: on the weight);
    # "auto" scores there only where it measured better (results page, "Clipping scored on the
    # output"): per output channel, on rotated weights, without GPTQ. GPTQ rounds against the
    # inputs itself (ref-dit: worst sample 35.7 dB scored on the output, 38.1 on the weight);
    # with group scales it was mixed (ref-flux g64 r32, 12 steps: worst 31.3 against 35.8, but
    # +4 dB with smoothing); unrotated, the tail lost (ref-flux rank 32: worst 33.3 against 36.7)
    measured_better = not (config.gptq or config.scale_group or config.rotation == "none")
    by_output = inputs is not None and (
        config.weight_clip == "output" or (config.weight_clip == "auto" and measured_better)
    )
    if config.gptq or by_output:
        hessian = rotated_hessian(inputs.gram, prepared.smooth, prepared.rotation)
    stored, scale, *row_scale = quantize_weight(
        prepared.weight,
        config.weight_bits,
        prepared.rotation,
        config.weight_clip != "none",
        config.scale_group,
        hessian if config.gptq else None,
        hessian if by_output else None,
        config.scale_bits if config.scale_group else 16,
    )
    row_scale = Constant("qscale_row", row_scale[0] if row_scale else None)
    args = (
        X,
        Constant("qweight", stored),
        Constant("qscale", scale),
        BIAS,
        prepared.rotation_constant(config),
        config.act_bits,
        config.weight_bits,
        *prepared.tail(row_scale),
    )
    extras = []
    if config.scale_group:  # the scales' bytes (a scale per row: a few bytes a layer)
        scale_bytes = scale.nbytes + (row_scale.value.nbytes if row_scale.value is not None else 0)
        bits = "uint8 × row float32" if row_scale.value is not None else "float16"
        extras.append(
            f"scales per {config.scale_group} along K {bits} (+{scale_bytes / 2**10:.1f} KiB)"
        )
    extras += prepared.describe(config) + (["GPTQ-rounded"] if config.gptq else [])
    if config.weight_clip in ("auto", "output") and inputs is None:
        extras.append("clipping scored on the weight (the capture has no real inputs)")
    return QuantizedLinear(
        torch.ops.diffopt.quant_linear.default,
        args,
        f"{config.label} linear {tuple(weight.shape)}, group {prepared.group or '-'}"
        + "".join(f", {e}" for e in extras),
    )


register_quant_format(QuantFormat("int", _prepare_int))
