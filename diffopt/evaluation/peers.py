"""Adapters that run other libraries in `diffopt bench`, on the same seeds as diffopt.

Caches: the diffusers cache hooks (FirstBlockCache, MagCache, TaylorSeerCache, FasterCache,
PyramidAttentionBroadcast) and cache-dit's DBCache. Each runs on its own copy of the model,
eagerly (the hooks decide in Python around each block), with the settings its authors suggest
as a starting point; state is reset before every run. They run on diffusers' DiT, Flux and Wan
transformers: `LAYOUTS` says which block lists each has and what scale its timestep is on, and
cache-dit brings its own adapter for each; another class is refused with an error naming the
peer and the class.

Quantizers (``pip install -e ".[peers]"``): torchao, optimum-quanto and comfy-kitchen's
ConvRot W4A4, each with the configs that run on CPU, applied in place to the linears a
`select(name)` function picks (the ones diffopt's quantize pass would rewrite), run eagerly.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffopt.evaluation.bench import Variant


@dataclass(frozen=True)
class Layout:
    """What the cache peers need to know about a transformer class."""

    blocks: tuple[str, ...]
    """Attributes holding its block lists, in the order its forward runs them."""
    timestep_scale: float
    """Its ``timestep`` argument times this is the 0-1000 scale the timestep ranges of PAB and
    FasterCache are written in (diffusers' defaults, tuned on DDPM-style timesteps)."""
    tensor_format: str | None
    """Its output's layout in FasterCache's names (None: none of them; Flux returns packed
    tokens [B, S, C], which diffusers' FasterCache does not support)."""


LAYOUTS = {
    "DiTTransformer2DModel": Layout(("transformer_blocks",), 1.0, "BCHW"),
    # the sampler's timestep (σ · 1000) reaches Flux as σ (`ref_flux.flux_call`)
    "FluxTransformer2DModel": Layout(
        ("transformer_blocks", "single_transformer_blocks"), 1000.0, None
    ),
    "WanTransformer3DModel": Layout(("blocks",), 1.0, "BCFHW"),
}
"""Known transformer classes, by class name (a subclass gets its base's layout)."""


def layout(model: torch.nn.Module, peer: str) -> Layout:
    """`model`'s `Layout`; a `TypeError` naming `peer` where the class has none."""
    for cls in type(model).__mro__:
        if cls.__name__ in LAYOUTS:
            return LAYOUTS[cls.__name__]
    raise TypeError(
        f"{peer} cannot run on {type(model).__name__}: the peer adapters know the block lists "
        f"and timestep scale of {', '.join(sorted(LAYOUTS))} only; add the class to "
        "diffopt.evaluation.peers.LAYOUTS"
    )


def _block_patterns(spec: Layout, suffix: str = "") -> list[str]:
    """Regexes for every block of `spec`'s block lists (`suffix` appended: a submodule)."""
    return [rf"^{re.escape(name)}\.\d+{suffix}" for name in spec.blocks]


class _InCacheContext:
    """Calls the hooked model inside a diffusers cache context, as its pipelines do.

    One context for the whole call: the sampler batches the cond and uncond branches together.
    `CacheMixin.cache_context` only needs a module, so it serves models without the mixin (DiT).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from diffusers.models.cache_utils import CacheMixin

        with CacheMixin.cache_context(self.model, "diffopt-bench"):
            return self.model(*args, **kwargs)

    def reset(self) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks()


def _timestep_tracker(model: torch.nn.Module, scale: float) -> Callable[[], float]:
    """The timestep of the call in progress on the 0-1000 scale (the model's times `scale`),
    for hooks that schedule by timestep (PAB, FasterCache)."""
    current = {"t": 1000.0}

    def remember(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        current["t"] = float(timestep.flatten()[0]) * scale

    model.register_forward_pre_hook(remember, with_kwargs=True)
    return lambda: current["t"]


def _hook_variant(name: str, apply: Callable[[torch.nn.Module, Layout], None]) -> Variant:
    def build(model: torch.nn.Module, inner: str) -> _InCacheContext:
        apply(model, layout(model, name))
        return _InCacheContext(model)

    return Variant(name, build, family="peer", reset=_InCacheContext.reset)


def _check_hooked(model: torch.nn.Module, spec: Layout, peer: str) -> None:
    """FBCache and MagCache find the block lists themselves: they must find `spec`'s."""
    from diffusers.hooks import HookRegistry

    for name in spec.blocks:
        for index, block in enumerate(getattr(model, name)):
            registry = HookRegistry.check_if_exists_or_initialize(block)
            if not registry.hooks:
                raise RuntimeError(
                    f"{peer} left {type(model).__name__}.{name}.{index} unhooked: this diffusers "
                    "version looks for block lists under other names"
                )


def first_block_cache(threshold: float = 0.05) -> Variant:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    name = f"diffusers FBCache {threshold}"

    def apply(model: torch.nn.Module, spec: Layout) -> None:
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
        _check_hooked(model, spec, name)

    return _hook_variant(name, apply)


def taylorseer_cache(interval: int = 5, max_order: int = 1) -> Variant:
    """diffusers' TaylorSeer on every block, a full step every `interval`; `max_order`: the
    Taylor expansion's order (diffusers' default 1)."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    def apply(model: torch.nn.Module, spec: Layout) -> None:
        # whole blocks: the default patterns ("^transformer_blocks.*attn", full match) miss
        # DiT's attn1 and Wan's attn1 / attn2
        config = TaylorSeerCacheConfig(
            cache_interval=interval,
            max_order=max_order,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=[pattern + "$" for pattern in _block_patterns(spec)],
        )
        apply_taylorseer_cache(model, config)

    order = f" order {max_order}" if max_order != 1 else ""
    return _hook_variant(f"diffusers TaylorSeer {interval}{order}", apply)


def pyramid_attention_broadcast(skip_range: int = 2) -> Variant:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    def apply(model: torch.nn.Module, spec: Layout) -> None:
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip_range,
            spatial_attention_timestep_skip_range=(100, 800),
            spatial_attention_block_identifiers=tuple(_block_patterns(spec, r"\.")),
            current_timestep_callback=_timestep_tracker(model, spec.timestep_scale),
        )
        apply_pyramid_attention_broadcast(model, config)

    return _hook_variant(f"diffusers PAB {skip_range}", apply)


def faster_cache(skip_range: int = 2) -> Variant:
    """FasterCache's attention reuse. Its unconditional-branch approximation stays off
    (``is_guidance_distilled``): it assumes the batch is [uncond, cond], and the sampler's is
    [cond, uncond]. That approximation is the only reader of ``tensor_format``, so a class
    without one (Flux) runs, with the config's default format, which nothing reads."""
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    def apply(model: torch.nn.Module, spec: Layout) -> None:
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=skip_range,
            spatial_attention_timestep_skip_range=(-1, 681),
            spatial_attention_block_identifiers=tuple(_block_patterns(spec, r"\.")),
            current_timestep_callback=_timestep_tracker(model, spec.timestep_scale),
            attention_weight_callback=lambda _: 0.3,
            tensor_format=spec.tensor_format or FasterCacheConfig.tensor_format,
            is_guidance_distilled=True,
        )
        apply_faster_cache(model, config)

    return _hook_variant(f"diffusers FasterCache {skip_range}", apply)


def mag_cache(
    sample: Callable[[torch.nn.Module], Any], steps: int, threshold: float = 0.06
) -> Variant:
    """MagCache needs per-model magnitude ratios: calibrated with one run of `sample(model)`."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    name = f"diffusers MagCache {threshold}"

    def apply(model: torch.nn.Module, spec: Layout) -> None:
        from diffusers.hooks import HookRegistry

        apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=steps))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            sample(_InCacheContext(model))
        lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
        if not lists:
            raise RuntimeError(
                "MagCache calibration printed no ratios; this diffusers version reports them "
                f"differently. Its output was: {printed.getvalue()[-500:]!r}"
            )
        ratios = ast.literal_eval(lists[-1])
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for hook in list(registry.hooks):
            registry.remove_hook(hook)
        config = MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=ratios)
        apply_mag_cache(model, config)
        _check_hooked(model, spec, name)

    return _hook_variant(name, apply)


class _CacheDiT:
    """A model under cache-dit, whose context is refreshed before each sampling run."""

    def __init__(self, model: torch.nn.Module, steps: int) -> None:
        self.model, self.steps = model, steps

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def reset(self) -> None:
        import cache_dit

        cache_dit.refresh_context(self.model, num_inference_steps=self.steps)


def db_cache(
    steps: int, threshold: float = 0.08, front: int = 1, back: int = 0, warmup: int = 8
) -> Variant:
    """cache-dit's DBCache (F`front`B`back`; no caching in the first `warmup` steps, cache-dit's
    default 8, so runs of 8 steps or fewer cache nothing) through the `BlockAdapter` cache-dit
    registers for the model's class, the one its ``enable_cache(pipe.transformer)`` picks: DiT's
    (with its patch functor: DiT's forward reads ``transformer_blocks[0].norm1`` after the block
    loop, which the block wrapper hides), Flux's (both block lists run as one, through Flux's
    patch functor) and Wan's.

    CFG: the sampler batches cond and uncond in one call, so ``enable_separate_cfg`` is off, also
    where cache-dit's adapter expects a pipeline that calls them one after the other (Wan)."""
    import cache_dit
    from cache_dit import DBCacheConfig

    name = f"cache-dit DBCache F{front}B{back} {threshold}"

    def build(model: torch.nn.Module, inner: str) -> _CacheDiT:
        from cache_dit.caching.block_adapters import BlockAdapterRegister

        if not BlockAdapterRegister.is_supported(model):
            raise TypeError(
                f"{name} cannot run on {type(model).__name__}: cache-dit "
                f"{cache_dit.__version__} registers no BlockAdapter for the class"
            )
        config = DBCacheConfig(
            Fn_compute_blocks=front,
            Bn_compute_blocks=back,
            residual_diff_threshold=threshold,
            num_inference_steps=steps,
            max_warmup_steps=warmup,
            enable_separate_cfg=False,
        )
        cache_dit.enable_cache(BlockAdapterRegister.get_adapter(model), cache_config=config)
        return _CacheDiT(model, steps)

    return Variant(name, build, "peer", _CacheDiT.reset)


def all_peers(sample: Callable[[torch.nn.Module], Any], steps: int) -> list[Variant]:
    """Every peer, with default settings; cache-dit's only when it is installed."""
    peers = [
        first_block_cache(),
        mag_cache(sample, steps),
        taylorseer_cache(),
        faster_cache(),
        pyramid_attention_broadcast(),
    ]
    if importlib.util.find_spec("cache_dit") is not None:
        peers.append(db_cache(steps))
    return peers


# Quantization peers ---------------------------------------------------------------------------

Select = Callable[[str], bool]


def _linears(model: torch.nn.Module, select: Select) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and select(name)
    }


def torchao_quant(scheme: str, select: Select) -> Variant:
    """torchao's CPU-capable configs: ``"w8a8"`` (int8 dynamic per-token activations) or
    ``"w4a8"`` (int4 per-channel weights, int8 dynamic activations)."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        PerAxis,
        quantize_,
    )

    configs = {
        "w8a8": Int8DynamicActivationInt8WeightConfig,
        "w4a8": lambda: Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerAxis(0)
        ),
    }

    def build(model: torch.nn.Module, inner: str) -> torch.nn.Module:
        chosen = set(_linears(model, select).values())
        quantize_(model, configs[scheme](), filter_fn=lambda module, fqn: module in chosen)
        return model

    return Variant(f"torchao {scheme.upper()}", build, family="peer")


def quanto_quant(scheme: str, select: Select, calibrate: Callable[[Any], Any]) -> Variant:
    """optimum-quanto ``"w4a8"`` / ``"w8a8"``: static per-tensor int8 activations, calibrated
    by one `calibrate(model)` run (quanto's scales start at 1 without it)."""
    from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

    weights = {"w4a8": qint4, "w8a8": qint8}[scheme]

    def build(model: torch.nn.Module, inner: str) -> torch.nn.Module:
        quantize(model, weights=weights, activations=qint8, include=list(_linears(model, select)))
        with torch.no_grad(), Calibration():
            calibrate(model)
        freeze(model)
        return _Dequantized(model)

    return Variant(f"optimum-quanto {scheme.upper()}", build, family="peer")


class _Dequantized:
    """quanto may return quantized tensors from a model whose last layer it quantized."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        return (sample.dequantize() if hasattr(sample, "dequantize") else sample,)


def convrot_quant(select: Select) -> Variant:
    """comfy-kitchen's ConvRot W4A4 (regular Hadamard, per-row int4 scales), its CPU path; the
    rotation group is the largest of 256 / 64 that divides K, as it requires."""
    from comfy_kitchen.tensor import QuantizedTensor

    def build(model: torch.nn.Module, inner: str) -> torch.nn.Module:
        for module in _linears(model, select).values():
            k = module.in_features
            group = 256 if k % 256 == 0 else 64
            packed = QuantizedTensor.from_float(
                module.weight.data, "TensorCoreConvRotW4A4Layout", convrot_groupsize=group
            )
            module.weight = torch.nn.Parameter(packed, requires_grad=False)
        return model

    return Variant("comfy-kitchen ConvRot W4A4", build, family="peer")
