"""The configuration tree: plain dataclasses that round-trip through dicts and JSON.

An engine directory or a benchmark row records the exact `Config` that produced it, so every
field is a JSON-friendly value and unknown keys are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffopt.guards import CacheAction

InnerBackend = Literal["eager", "aot_eager", "inductor"]


class ConfigError(ValueError):
    """A configuration value or key that diffopt cannot accept."""


@dataclass
class CleanupConfig:
    """Options of the `remove_noops` pass (drops ops that provably return their input)."""

    dropout: bool = True
    """Drop `dropout` calls that run with `training=False` or `p=0`."""
    squeeze: bool = True
    """Drop `squeeze(dim)` on a dimension whose size is not 1 (it exports as a failing Squeeze)."""
    same_shape_views: bool = True
    """Drop `view`/`reshape` to the shape the tensor already has."""
    same_dtype_casts: bool = True
    """Drop `.to(dtype)` / `.type(dtype)` to the dtype the tensor already has."""


@dataclass
class FoldConfig:
    """Options of the `fold_constants` pass: values computed from the weights with ops an engine
    cannot run are evaluated once (WanAnimate's QR of a weight). `diffopt.export` turns it on."""

    ops: tuple[str, ...] = (
        "linalg_qr",
        "linalg_svd",
        "linalg_eigh",
        "linalg_eig",
        "linalg_inv",
        "linalg_pinv",
        "linalg_solve",
        "linalg_cholesky",
    )
    """Ops (by their torch name) whose constant results are folded: none has an ONNX function."""


@dataclass
class RealRotaryConfig:
    """Options of the `real_rotary` pass: complex rotary embeddings (Qwen-Image, Z-Image) written
    in real arithmetic, since ONNX has no complex tensors. `diffopt.export` turns it on; a model
    compiled with the backend keeps its complex ops."""

    max_table_bytes: int = 256 * 2**20
    """The largest complex table the pass folds into constants of the graph (and the engine)."""


@dataclass
class CacheConfig:
    """Cache-reuse guards and the dual-threshold "push then polish" controller.

    The controller adds up a per-step change indicator since the last full step. Below `early`
    it reuses the whole block stack (step guard); between `early` and `critical` it polishes
    (recomputes some blocks, or the most-changed tokens); past `critical` it runs a full step.
    Thresholds are fractions of the whole run's calibrated change, so they transfer across
    models and step counts. Without a `profile`, the first request runs in full and calibrates.
    """

    steps: int | None = None
    """Denoiser calls per request; or give it per request with `diffopt.request(steps=...)`."""
    mode: Literal["online", "plan"] = "online"
    """``online``: decide each step from the indicator; ``plan``: follow `plan` step by step."""
    indicator: Literal["profile", "block0"] = "profile"
    """``profile``: the calibrated per-step change of the block stack's residual (free at run
    time); ``block0``: the measured change of block 0's residual, per sample (block 0 always
    runs), as a share of its calibrated whole-run change. Each reads its own calibration: a
    model calibrated under one calibrates again on its first request under the other, and a
    `profile` calibrated under one is refused under the other (`profile_indicator`)."""
    early: float = 0.25
    """Early-warning line: reuse whole steps while the accumulated change stays below it."""
    critical: float = 0.5
    """Critical line: run a full step (and restart the accumulator) once the change reaches it."""
    polish: Literal["token", "block", "none"] = "token"
    """How steps between the two lines are refreshed."""
    token_ratio: float = 0.25
    """Token refresh: the fraction of tokens (highest recent change) that are recomputed."""
    block_ratio: float = 0.5
    """Block refresh: the fraction of blocks (highest recent change) that are recomputed."""
    extrapolate: bool = True
    """Reused residuals are extended linearly from the last two full steps (else held); the
    controller then accumulates the calibrated curvature, weighted by the distance from the last
    full step (the error a linear extrapolation makes), instead of the change."""
    damping: float = 1.0
    """With `extrapolate`, a reused residual moves by ``damping`` times its slope between the
    last two full steps (1: linear; 0: held). Below 1 it allows for the trajectory bending
    between full steps: on ref-flux at 28 steps (12 calibration seeds) 0.85 raised an every-3
    plan from 49.0 to 50.5 dB and a 10-full-step plan from 44.9 to 47.7 dB, where 0.55 lost.
    `Calibration.refine` searches it (`DAMPING_GRID`)."""
    warmup: int = 1
    """The first steps always compute (the last step does too, except under a plan: the plan
    was measured with the action it names there)."""
    max_reuse: int = 8
    """Cap on consecutive steps that are not full."""
    check: Literal["none", "stack"] = "none"
    """The online safety net, per sample: ``stack`` measures, at every full step, how far each
    sample's block-stack residual moved per step since the last full step (free: the executor
    holds both), against what the calibrated profile expects; a sample that moved more than
    `check_tolerance` times that runs full steps (and with it its batch) until a full step
    finds it back within tolerance. The profile decides everywhere else, and its own full steps
    stay where they were: the check only adds full steps."""
    check_tolerance: float = 1.2
    """Ratio of a sample's measured residual change to the profile's above which the check
    vetoes reuse for it."""
    profile: list[float] | None = None
    """The calibrated per-step indicator (from `diffopt.calibrate`), resampled to `steps`."""
    curvature: list[float] | None = None
    """The calibrated per-step second difference of the stack residual: with `extrapolate`, the
    controller accumulates the error of a linear extrapolation from it instead of `profile`."""
    calibrated_on: dict[str, Any] | None = None
    """What `profile` was measured on (`diffopt.runtime.profiles.Condition` as a dict: steps,
    batch, tokens, timesteps, early stream speed; `diffopt.calibrate` sets it): a request that
    differs in a way that moves quality is warned about, with the command that recalibrates."""
    profile_indicator: Literal["profile", "block0"] | None = None
    """The `indicator` `profile` was measured with (`diffopt.calibrate` sets it): the stack's
    change and block 0's are different measurements, so a profile is used only under its own
    (`check_profile`). None: not recorded (a profile saved before diffopt recorded it, or one
    given by hand), taken as it is."""
    plan: list[CacheAction] | str | None = None
    """For ``mode="plan"``: one action per step, or the path of a JSON file holding the list."""
    step_guard: bool = True
    block_guard: bool = True
    token_guard: bool = True

    def __post_init__(self) -> None:
        _check_choice("cache.mode", self.mode, ("online", "plan"))
        _check_choice("cache.indicator", self.indicator, ("profile", "block0"))
        _check_choice("cache.polish", self.polish, ("token", "block", "none"))
        _check_choice("cache.check", self.check, ("none", "stack"))
        if self.profile_indicator is not None:
            _check_choice("cache.profile_indicator", self.profile_indicator, ("profile", "block0"))
        self.check_profile()
        if self.check != "none" and self.indicator != "profile":
            raise ConfigError(
                "cache.check compares the measured residual change with the calibrated profile; "
                "it needs cache.indicator='profile' (block0 measures every step already)"
            )
        if self.check_tolerance <= 0:
            raise ConfigError(f"cache.check_tolerance must be > 0, got {self.check_tolerance}")
        if not 0 <= self.early <= self.critical:
            raise ConfigError(
                f"cache thresholds need 0 <= early <= critical, got early={self.early}, "
                f"critical={self.critical}"
            )
        if not 0 <= self.damping <= 1.5:
            raise ConfigError(f"cache.damping must be in [0, 1.5], got {self.damping}")
        for name in ("token_ratio", "block_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"cache.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"cache.steps must be a positive step count, got {self.steps}")
        if self.mode == "plan" and self.plan is None:
            raise ConfigError(
                'cache.mode="plan" needs cache.plan: a list of actions per step or a JSON file '
                "(diffopt.calibrate(...).plan writes one)"
            )

    def check_profile(self) -> None:
        """Refuse a calibrated `profile` measured with another indicator than `indicator`
        (its `profile_indicator`; an unrecorded one is taken as it is; ``mode="plan"`` reads
        no profile)."""
        measured = self.profile_indicator
        if self.profile is None or measured in (None, self.indicator) or self.mode == "plan":
            return
        raise ConfigError(
            f"cache.profile was calibrated with indicator={measured!r} "
            f"({_INDICATORS[measured]}) but is used with indicator={self.indicator!r} "
            f"({_INDICATORS[self.indicator]}): its thresholds would read the wrong measurement; "
            f"recalibrate with that indicator (diffopt.calibrate(model, run, steps=N, "
            f"cache=CacheConfig(indicator={self.indicator!r}, ...))), or pass "
            f"indicator={measured!r}, the one the profile was calibrated with"
        )


_INDICATORS = {"profile": "the block stack's change", "block0": "block 0's change"}
"""What each cache indicator's profile measures, in words."""


QUANT_PRESETS: dict[str, dict[str, Any]] = {
    "w4a4": {},
    "w4a4-rht": {},  # rotated (regular Hadamard transform): the default under its design name
    "w4a4-rtn": {"rotation": "none"},
    "w4a4-sylvester": {"rotation": "sylvester"},
    "w4a8": {"act_bits": 8},
    "w8a8": {"weight_bits": 8, "act_bits": 8},
    "w4a4-g64": {"scale_group": 64},  # scales per 64 values along K (weights and activations)
    "w4a4-r32": {"rank": 32},  # SVDQuant's 16-bit rank-32 branch, the residual in 4 bits
    "w4a4-g64-r32": {"scale_group": 64, "rank": 32},  # both: SVDQuant's layout, rotated
    "w4a8-g64-r32": {"act_bits": 8, "scale_group": 64, "rank": 32},
    # the branch in int8 (one scale per rank): half its bytes (results page, "Weight memory")
    "w4a4-r32-b8": {"rank": 32, "branch_bits": 8},
    "w4a4-g64-r32-b8": {"scale_group": 64, "rank": 32, "branch_bits": 8},
    # and the group scales in 8 bits (a uint8 multiple of a float32 scale per row)
    "w4a4-g64q8-r32-b8": {"scale_group": 64, "scale_bits": 8, "rank": 32, "branch_bits": 8},
    # the best measured recipe (benchmarks/quant_ablation.py): GPTQ rounding on the capture's
    # inputs on top of the branch and group scales
    "w4a4-g64-r32-gptq": {"scale_group": 64, "rank": 32, "gptq": True},
    "w4a8-g64-r32-gptq": {"act_bits": 8, "scale_group": 64, "rank": 32, "gptq": True},
    "nvfp4": {"format": "nvfp4"},  # e2m1 in blocks of 16, e4m3 scales (kernels/fp4.py)
    "mxfp4": {"format": "mxfp4"},  # e2m1 in blocks of 32, power-of-two scales
    "nvfp4-r32": {"format": "nvfp4", "rank": 32},  # SVDQuant's NVFP4 layout, rotated
}
"""Named settings accepted as ``quant="w4a4"`` etc. (rotation ``regular`` unless named)."""


@dataclass
class QuantConfig:
    """Low-bit linears (the `quantize` pass). The default ``int`` format: group-wise Hadamard
    rotation, symmetric int weights and per-token int activations, integer GEMM, dequantization.

    Each eligible linear becomes one op of its format (``diffopt::quant_linear`` for ``int``).
    Weights are rotated and quantized once, at compile time; activations are rotated and
    quantized inside the op.
    """

    format: str = "int"
    """The quantization format (`diffopt.kernels.formats`): how weights are stored and which op
    computes with them. ``int``: the rotated integer linear the other fields describe."""
    weight_bits: Literal[4, 8] = 4
    act_bits: Literal[4, 8] = 4
    rotation: Literal["regular", "sylvester", "none"] = "regular"
    """``regular``: the Kronecker power of the 4×4 Hadamard whose rows sum to 1 (ConvRot);
    ``sylvester``: the classic Hadamard; ``none``: plain round-to-nearest."""
    group: int | None = None
    """Rotation group along K (a power of 4); ``None``: the largest of 256 / 64 / 16 dividing K."""
    scale_group: int | None = None
    """Scales per group of this many values along K (32, 64, 128 or 256) for weights and
    activations, instead of one per output channel and one per token: finer scales, more bytes
    (SVDQuant uses 64)."""
    scale_bits: Literal[16, 8] = 16
    """Bits of the group scales (with `scale_group`): 16 (float16), or 8 (double quantization,
    as QLoRA's: each group scale an unsigned 8-bit multiple of one float32 scale per output
    row, ``scale_g = q_g · s_row`` with ``s_row`` the row's largest group scale / 255 and
    ``q_g`` rounded up, the 4-bit values quantized against that stored scale): 8 bits a group
    and 32 a row instead of 16 a group (per group of 64: 9.8 bits at K = 1152, 8.4 at 4608),
    what takes ``w4a4-g64-r32-b8`` over a DiT-XL/2 block's linears from 3.49× to 3.57× under
    fp16 (a square K = 1152 layer alone: 3.41× → 3.48×)."""
    rank: int = 0
    """Rank of SVDQuant's low-rank branch: the weight's top-`rank` SVD part stays in 16 bits
    (``x · down · up`` beside the GEMM) and only the residual is quantized; 0: no branch."""
    branch_bits: Literal[16, 8] = 16
    """Bits of the branch's factors: 16 (float16), or 8 (int8 with one scale per rank, the
    residual quantized against the rounded branch, so it absorbs that rounding): half the
    branch's bytes, which a rank-32 branch needs to stay ≥ 3.5× under fp16 at K = 1152."""
    smooth_alpha: float | None = None
    """SmoothQuant's migration strength α in (0, 1]: each input channel j is divided by
    s_j = max|x_j|^α / max|W_j|^(1-α) before rotation, the weight's column multiplied by it,
    so activation outliers move into the weight (SVDQuant uses 0.5). Calibrated on the
    capture's inputs; ``None``: no smoothing."""
    gptq: bool = False
    """Round weights with GPTQ's error feedback on the capture's inputs (the Hessian XᵀX of each
    layer's rotated input) instead of to nearest; same stored layout, slower to prepare."""
    weight_clip: Literal["auto", "output", "weight", "none"] = "auto"
    """Each output channel's (scale group's) clipping ratio, searched in 0.5–1 × absmax.
    ``output``: for the least squared error of the layer's output on the capture's inputs
    (δᵀ XᵀX δ; per scale group its diagonal block of XᵀX); ``weight``: for the least squared
    weight error; ``none``: plain absmax / qmax. ``auto``: ``output`` for per-channel scales of
    rotated weights without `gptq`, where it measured best (plain ``w4a4`` and ``w4a8``, with
    or without the branch, on ref-flux and ref-dit, fresh seeds,
    `benchmarks/quant_ablation.py`), else ``weight``. Without real capture inputs both score
    on the weight, and the report says so. ``True`` / ``False`` mean ``weight`` / ``none``."""
    scope: Literal["blocks", "all"] = "blocks"
    """``blocks``: only linears inside the repeated blocks, so embedders and the final norm and
    projection (which live outside them) stay in high precision; ``all``: every linear."""
    include: list[str] = field(default_factory=lambda: ["*"])
    """fnmatch patterns on a linear's module path (``transformer_blocks.0.attn1.to_q``)."""
    exclude: list[str] = field(default_factory=lambda: ["*norm*", "*emb*"])
    """Patterns kept in high precision: by default the AdaLN modulation linears (under
    ``norm1`` etc.) and time-embedding projections (``time_emb_proj``)."""
    min_sqnr: float | None = 10.0
    """Per-layer fallback: a layer whose output SQNR (dB) on the capture's inputs falls below
    this stays in high precision, and the report says so. ``None`` skips the measurement."""

    def __post_init__(self) -> None:
        _check_choice("quant.weight_bits", self.weight_bits, (4, 8))
        _check_choice("quant.act_bits", self.act_bits, (4, 8))
        _check_choice("quant.rotation", self.rotation, ("regular", "sylvester", "none"))
        _check_choice("quant.scope", self.scope, ("blocks", "all"))
        if isinstance(self.weight_clip, bool):  # the field's earlier form
            self.weight_clip = "weight" if self.weight_clip else "none"
        _check_choice("quant.weight_clip", self.weight_clip, ("auto", "output", "weight", "none"))
        from diffopt.kernels.formats import quant_format  # here: the formats import torch

        quant_format(self.format)  # an unknown name raises, listing the registered ones
        if self.group is not None and self.group not in (16, 64, 256):
            raise ConfigError(f"quant.group must be 16, 64 or 256 (a power of 4), not {self.group}")
        if self.scale_group is not None and self.scale_group not in (32, 64, 128, 256):
            raise ConfigError(
                f"quant.scale_group must be 32, 64, 128 or 256 (or None), not {self.scale_group}"
            )
        if self.smooth_alpha is not None and not 0 < self.smooth_alpha <= 1:
            raise ConfigError(
                f"quant.smooth_alpha must be in (0, 1] (or None: no smoothing), not "
                f"{self.smooth_alpha}"
            )
        _check_choice("quant.scale_bits", self.scale_bits, (16, 8))
        if self.scale_bits != 16 and not self.scale_group:
            raise ConfigError(
                f"quant.scale_bits={self.scale_bits} sets the bits of group scales, and "
                "quant.scale_group is unset (one float16 scale per output channel): set "
                "quant.scale_group (e.g. 64) or leave scale_bits at 16"
            )
        if self.rank < 0:
            raise ConfigError(f"quant.rank must be >= 0 (0: no low-rank branch), not {self.rank}")
        _check_choice("quant.branch_bits", self.branch_bits, (16, 8))
        if self.branch_bits != 16 and not self.rank:
            raise ConfigError(
                f"quant.branch_bits={self.branch_bits} sets the low-rank branch's bits, and "
                "quant.rank=0 has no branch: set quant.rank (e.g. 32) or leave branch_bits at 16"
            )

    @property
    def label(self) -> str:
        """``w4a4-regular`` (``nvfp4-regular`` for an FP4 format): bits and rotation, as tables
        and reports show them."""
        extras = f"-g{self.scale_group}" if self.scale_group else ""
        extras += "q8" if self.scale_group and self.scale_bits == 8 else ""
        extras += f"-r{self.rank}" if self.rank else ""
        extras += "-b8" if self.rank and self.branch_bits == 8 else ""
        extras += f"-s{self.smooth_alpha:g}" if self.smooth_alpha is not None else ""
        extras += "-gptq" if self.gptq else ""
        bits = f"w{self.weight_bits}a{self.act_bits}" if self.format == "int" else self.format
        return f"{bits}-{self.rotation}{extras}"

    @classmethod
    def preset(cls, name: str) -> QuantConfig:
        """The settings behind ``quant="w4a4"``, ``"w4a4-rtn"``, ``"w4a8"``, ``"w8a8"`` ..."""
        if name not in QUANT_PRESETS:
            raise ConfigError(
                f"quant={name!r} is not a known preset; use one of {sorted(QUANT_PRESETS)} "
                "or a dict of QuantConfig fields"
            )
        return cls(**QUANT_PRESETS[name])


def _check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not a known choice; use one of {allowed}")


_SECTIONS: dict[str, type] = {}
"""Config sections of passes from outside diffopt, by name (`register_section`)."""


def register_section(name: str, kind: type) -> None:
    """Let `Config` hold a pass's settings under `name`: a `kind` dataclass, or ``None`` (the
    default: the pass is off).

    The section then works like the built-in ones: a keyword (``Config(name=kind(...))``), an
    attribute, and a key of `Config.from_dict`, `Config.to_dict` and JSON. Registering the same
    kind again does nothing. `diffopt.passes.register_pass(..., section=kind)` calls this.
    """
    if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
        raise ConfigError(f"config section {name!r} must be a dataclass, not {kind!r}")
    taken = config_sections().get(name)
    if taken is kind:
        return
    if taken is not None:
        raise ConfigError(f"config section {name!r} already holds {taken.__name__}")
    if not name.isidentifier() or name in Config.__dataclass_fields__ or hasattr(Config, name):
        raise ConfigError(f"{name!r} cannot name a config section: Config has it or it is no name")
    _SECTIONS[name] = kind


def config_sections() -> dict[str, type]:
    """Every section `Config` holds, by name, with its settings dataclass: the built-in
    ``cleanup``, ``cache`` and ``quant``, then those registered with `register_section`."""
    return {name: kind for name, kind in _field_kinds(Config).items() if kind is not None}


def _section_keywords(cls: type) -> type:
    """Wrap a dataclass __init__ so that registered sections are keywords too (into `sections`)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **options: Any) -> None:
        _check_keys(options, {**_field_kinds(cls), "sections": None}, "Config")
        sections = dict(options.pop("sections", None) or {})
        sections.update({name: options.pop(name) for name in list(options) if name in _SECTIONS})
        init(self, *args, sections=sections, **options)

    cls.__init__ = __init__
    return cls


@_section_keywords
@dataclass
class Config:
    """Everything that decides what diffopt does to a denoiser.

    Pass configs set to ``None`` disable that pass. Build one directly, from a dict
    (`Config.from_dict`), or from JSON (`Config.load`); `torch.compile(..., options=...)` accepts
    either a `Config` or a dict of the same keys. Passes from outside diffopt add their own
    sections (`register_section`), which behave like ``cleanup``, ``cache`` and ``quant``.
    """

    inner: InnerBackend = "inductor"
    """How each region is finally compiled: ``"eager"``, ``"aot_eager"`` or ``"inductor"``."""
    strict: bool = False
    """Turn every skipped rewrite (a pass that could not apply somewhere) into an error."""
    cleanup: CleanupConfig | None = field(default_factory=CleanupConfig)
    """The `remove_noops` pass; ``None`` disables it."""
    fold: FoldConfig | None = None
    """The `fold_constants` pass (weights' QR and kin evaluated once); `diffopt.export` sets it."""
    rotary: RealRotaryConfig | None = None
    """The `real_rotary` pass (complex rotary products in real pairs); `diffopt.export` sets it."""
    cache: CacheConfig | None = None
    """Cache-reuse guards (step, block and token granularity); ``None`` disables them."""
    quant: QuantConfig | None = None
    """Low-bit linears (a `QuantConfig`, or a preset name such as ``"w4a4"``)."""
    sections: dict[str, Any] = field(default_factory=dict)
    """Sections registered with `register_section`, by name (``None`` where off). Give them as
    keywords, ``Config(my_pass=MySettings())``, read them as attributes, ``config.my_pass``;
    `to_dict` puts them beside the built-in sections."""

    def __post_init__(self) -> None:
        _check_choice("inner", self.inner, typing.get_args(InnerBackend))
        if self.cache == "auto":
            raise ConfigError(
                'cache="auto" searches settings on calibration inputs, which a compile call does '
                "not have: run diffopt.calibrate(model, run, target_psnr=...) and pass its .config"
            )
        if isinstance(self.quant, str):
            self.quant = QuantConfig.preset(self.quant)
        _check_keys(self.sections, _SECTIONS, "Config.sections")
        for name in _SECTIONS:
            self.sections.setdefault(name, None)
        for name, kind in config_sections().items():
            value = getattr(self, name)
            if isinstance(value, dict):  # what the error below promises: a dict of its fields
                value = _from_dict(kind, value, path=name)
                setattr(self, name, value)
            if value is not None and not isinstance(value, kind):
                raise ConfigError(
                    f"{name} must be a {kind.__name__}, a dict of its fields or None, not {value!r}"
                )

    def __getattr__(self, name: str) -> Any:
        # reached only when the normal lookup fails: registered sections live in `sections`
        if name in _SECTIONS:
            return self.__dict__.get("sections", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SECTIONS:
            self.sections[name] = value
        else:
            super().__setattr__(name, value)

    @classmethod
    def coerce(cls, options: Config | dict[str, Any] | None) -> Config:
        """Accept what `torch.compile(options=...)` may carry: None, a dict or a Config."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if isinstance(options, dict):
            return cls.from_dict(options)
        raise ConfigError(
            f"options must be a dict or a diffopt.Config, not {type(options).__name__}"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build a Config from nested dicts; unknown keys raise and list the valid ones."""
        return _from_dict(cls, data, path="options")

    def to_dict(self) -> dict[str, Any]:
        """Nested dicts of plain values: `from_dict` rebuilds the same Config."""
        data = dataclasses.asdict(self)
        data.update(data.pop("sections"))  # registered sections sit beside the built-in ones
        return data

    def to_json(self) -> str:
        """`to_dict` as indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        """Write `to_json` to `path` (what ``diffopt export --config`` reads)."""
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a Config saved by `save`; bad JSON and unknown keys are errors."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a dict of {cls.__name__} fields, got {data!r}")
    kinds = _field_kinds(cls)
    _check_keys(data, kinds, path)
    kwargs = {}
    for name, value in data.items():
        if kinds[name] is not None and isinstance(value, dict):
            value = _from_dict(kinds[name], value, f"{path}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _check_keys(given: Any, valid: Any, path: str) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {path}; valid keys are: {sorted(valid)}")


def _field_kinds(cls: type) -> dict[str, type | None]:
    """The keys `cls` takes, each with the dataclass a dict under it becomes (or None). Config's
    registered sections are keys too; its `sections` holder is not."""
    hints = _type_hints(cls)
    kinds = {f.name: _dataclass_in(hints[f.name]) for f in dataclasses.fields(cls)}
    if cls is Config:
        del kinds["sections"]
        kinds.update(_SECTIONS)
    return kinds


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass in a hint such as ``CleanupConfig | None``, if there is one."""
    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)
