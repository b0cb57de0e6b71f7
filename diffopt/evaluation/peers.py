"""Adapters that run other libraries in `diffopt bench`, on the same seeds as diffopt.

Caches: the diffusers cache hooks (FirstBlockCache, MagCache, TaylorSeerCache, FasterCache,
PyramidAttentionBroadcast) and cache-dit's DBCache. Each runs on its own copy of the model,
eagerly (the hooks decide in Python around each block), with the settings its authors suggest
as a starting point; state is reset before every run.

Quantizers (``pip install -e ".[peers]"``): torchao, optimum-quanto and comfy-kitchen's
ConvRot W4A4, each with the configs that run on CPU, applied in place to the linears a
`select(name)` function picks (the ones diffopt's quantize pass would rewrite), run eagerly.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
from collections.abc import Callable
from typing import Any

import torch

from diffopt.evaluation.bench import Variant


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


def _timestep_tracker(model: torch.nn.Module) -> Callable[[], int]:
    """The timestep of the call in progress, for hooks that schedule by timestep (PAB)."""
    current = {"t": 1000}

    def remember(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        current["t"] = int(kwargs["timestep"].flatten()[0])

    model.register_forward_pre_hook(remember, with_kwargs=True)
    return lambda: current["t"]


def _hook_variant(name: str, apply: Callable[[torch.nn.Module], None]) -> Variant:
    def build(model: torch.nn.Module, inner: str) -> _InCacheContext:
        apply(model)
        return _InCacheContext(model)

    return Variant(name, build, family="peer", reset=_InCacheContext.reset)


def first_block_cache(threshold: float = 0.05) -> Variant:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    return _hook_variant(
        f"diffusers FBCache {threshold}",
        lambda m: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=threshold)),
    )


def taylorseer_cache(interval: int = 5) -> Variant:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    # whole blocks: the default patterns ("^transformer_blocks.*attn", full match) miss DiT's attn1
    config = TaylorSeerCacheConfig(
        cache_interval=interval,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"^transformer_blocks\.\d+$"],
    )
    return _hook_variant(
        f"diffusers TaylorSeer {interval}", lambda m: apply_taylorseer_cache(m, config)
    )


def pyramid_attention_broadcast(skip_range: int = 2) -> Variant:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    def apply(model: torch.nn.Module) -> None:
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip_range,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=_timestep_tracker(model),
        )
        apply_pyramid_attention_broadcast(model, config)

    return _hook_variant(f"diffusers PAB {skip_range}", apply)


def faster_cache(skip_range: int = 2) -> Variant:
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    def apply(model: torch.nn.Module) -> None:
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=skip_range,
            spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=_timestep_tracker(model),
            attention_weight_callback=lambda _: 0.3,
            tensor_format="BFCHW",
            is_guidance_distilled=True,  # our CFG batch is [cond, uncond]; no uncond-branch skip
        )
        apply_faster_cache(model, config)

    return _hook_variant(f"diffusers FasterCache {skip_range}", apply)


def mag_cache(
    sample: Callable[[torch.nn.Module], Any], steps: int, threshold: float = 0.06
) -> Variant:
    """MagCache needs per-model magnitude ratios: calibrated with one run of `sample(model)`."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    def apply(model: torch.nn.Module) -> None:
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
        for name in list(registry.hooks):
            registry.remove_hook(name)
        config = MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=ratios)
        apply_mag_cache(model, config)

    return _hook_variant(f"diffusers MagCache {threshold}", apply)


class _CacheDiT:
    """A model under cache-dit, whose context is refreshed before each sampling run."""

    def __init__(self, model: torch.nn.Module, steps: int) -> None:
        self.model, self.steps = model, steps

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def reset(self) -> None:
        import cache_dit

        cache_dit.refresh_context(self.model, num_inference_steps=self.steps)


def db_cache(steps: int, threshold: float = 0.08, front: int = 1, back: int = 0) -> Variant:
    """cache-dit's DBCache (F`front`B`back`) on a diffusers DiT, through cache-dit's DiT patch.

    The patch is needed because DiT's forward reads ``transformer_blocks[0].norm1`` after its
    block loop, which cache-dit's block wrapper hides.
    """
    import cache_dit
    from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern
    from cache_dit.caching.patch_functors.functor_dit import DiTPatchFunctor

    def build(model: torch.nn.Module, inner: str) -> _CacheDiT:
        adapter = BlockAdapter(
            transformer=model,
            blocks=model.transformer_blocks,
            forward_pattern=ForwardPattern.Pattern_3,  # hidden_states in, hidden_states out
            patch_functor=DiTPatchFunctor(),
        )
        config = DBCacheConfig(
            Fn_compute_blocks=front,
            Bn_compute_blocks=back,
            residual_diff_threshold=threshold,
            num_inference_steps=steps,
        )
        cache_dit.enable_cache(adapter, cache_config=config)
        return _CacheDiT(model, steps)

    return Variant(f"cache-dit DBCache F{front}B{back} {threshold}", build, "peer", _CacheDiT.reset)


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
