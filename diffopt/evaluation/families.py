"""A tiny, seeded instance of every denoiser class in the installed diffusers.

Each family is a builder that returns ``(model, inputs)``: the model built in code from a config
as small as its class allows (two blocks where it has a block stack, hidden widths of 32 so that
the quantization pass has rotation groups to work with), and the keyword arguments of one
denoiser call (latents, timestep, text states, pooled projections, rotary ids, image sizes ...).
Nothing is downloaded. The whole catalogue builds in seconds.

`denoiser_classes()` lists the classes diffusers ships under ``diffusers.models.transformers``
and ``diffusers.models.unets``; `EXCLUDED` names those that are not denoisers and why, and
`missing()` is what a new diffusers release added without a tiny config here (a test fails on
it, so the catalogue grows with diffusers). The names are reachable as built-in models:
``diffopt inspect tiny-wan``, ``zoo.build("tiny-wan")``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffopt.backend import SIZES_FROM_DATA

Inputs = dict[str, Any]
Builder = Callable[[torch.Generator], tuple[nn.Module, Inputs]]

B = 2
"""Batch of the example call: two samples, so per-sample cache state is exercised."""


@dataclass(frozen=True)
class Family:
    """One diffusers denoiser class at toy size."""

    name: str
    """``tiny-wan``: the name `zoo.build` and the command line know it by."""
    cls: str
    """The diffusers class name."""
    builder: Builder
    timestep: str | None = "timestep"
    """The input that carries the noise level (``None``: the class takes none)."""
    timestep_scale: float = 1000.0
    """The noise level's range: 1000 (DDPM-style timesteps) or 1 (flow-matching sigmas)."""
    latents: str | None = "hidden_states"
    """The input that carries the noisy latents (what a sampler updates)."""
    note: str = ""
    """Why an input looks the way it does, where the class is unusual."""
    dynamo: dict[str, Any] = field(default_factory=dict, hash=False)
    """Dynamo settings the class needs under torch.compile for its blocks to land in one graph
    (``torch._dynamo.config.patch(**dynamo)``): HunyuanVideo 1.5 indexes with boolean masks in
    a for loop, where a graph break makes dynamo skip the frame and compile each block alone."""

    def build(self, seed: int = 0) -> tuple[nn.Module, Inputs]:
        """The model (eval mode, weights from `seed`) and one call's keyword arguments.

        Weight tensors the class initializes to zero (adaLN-zero modulation, zero-init output
        projections and gates, learned position tables) are drawn small and random instead: a
        zero gate makes its block the identity whatever the timestep, which would hide what a
        cache or a quantizer does to it. So are parameters the class leaves uninitialized."""
        torch.manual_seed(seed)
        model, inputs = self.builder(torch.Generator().manual_seed(seed))
        _redraw_zero_weights(model, torch.Generator().manual_seed(seed + 1))
        return model.eval().requires_grad_(False), inputs


def _redraw_zero_weights(model: nn.Module, g: torch.Generator) -> None:
    """Zero weight tensors, and parameters left uninitialized (``torch.empty``: diffusers fills
    some, such as stacked MoE experts, only when it loads a checkpoint), get small random
    values."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.numel():
                continue
            zero = parameter.ndim >= 2 and not parameter.any()
            garbage = not torch.isfinite(parameter).all() or parameter.abs().max() > 1e3
            if zero or garbage:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.02)


FAMILIES: dict[str, Family] = {}


def family(name: str, cls: str, **fields: Any) -> Callable[[Builder], Builder]:
    """Register the decorated builder as family `name` of diffusers class `cls`."""

    def register(builder: Builder) -> Builder:
        if name in FAMILIES:
            raise ValueError(f"family {name!r} is registered twice")
        FAMILIES[name] = Family(name, cls, builder, **fields)
        return builder

    return register


def build(name: str, *, seed: int = 0) -> tuple[nn.Module, Inputs]:
    """Family `name`'s model and example inputs."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name].build(seed)


# --- the installed classes -------------------------------------------------------------------

EXCLUDED: dict[str, str] = {
    "MotionAdapter": "an adapter: motion-module weights loaded into UNetMotionModel (no forward)",
    "MiniMaxMusic3RVQDepthDecoder": (
        "an autoregressive decoder of residual-VQ codes (inputs_embeds only, no noise level); "
        "the MiniMax-Music-3 denoiser is MiniMaxMusic3Transformer1DModel, which is covered"
    ),
    "UVit2DModel": (
        "aMUSEd's masked-token transformer: predicts logits of masked VQ tokens from token ids, "
        "with no noise level or continuous latents"
    ),
}
"""Classes under diffusers' transformers / unets packages that are not denoisers, and why."""

_PACKAGES = ("diffusers.models.transformers", "diffusers.models.unets")


def denoiser_classes() -> dict[str, type]:
    """Every `ModelMixin` subclass defined in diffusers' transformers and unets packages (a
    module that fails to import is skipped: diffusers gates some behind optional packages)."""
    from diffusers.models.modeling_utils import ModelMixin

    found: dict[str, type] = {}
    for package_name in _PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            try:
                module = importlib.import_module(f"{package_name}.{info.name}")
            except Exception:  # an optional dependency is missing
                continue
            for attr, value in vars(module).items():
                if (
                    inspect.isclass(value)
                    and issubclass(value, ModelMixin)
                    and value.__module__ == module.__name__
                ):
                    found[attr] = value
    return dict(sorted(found.items()))


def missing() -> list[str]:
    """Installed denoiser classes with neither a family nor an `EXCLUDED` reason."""
    covered = {f.cls for f in FAMILIES.values()} | set(EXCLUDED)
    return [name for name in denoiser_classes() if name not in covered]


# --- input helpers ---------------------------------------------------------------------------


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _steps(g: torch.Generator, batch: int = B, scale: float = 1000.0) -> torch.Tensor:
    """Noise levels in the class's range: integers below 1000, or sigmas in (0, 1)."""
    t = torch.rand(batch, generator=g) * 0.8 + 0.1
    return (t * scale).round() if scale > 1 else t


def _grid_ids(height: int, width: int, axes: int = 3, frame: int = 0) -> torch.Tensor:
    """Flux-style position ids [h*w, axes]: (frame, row, column[, 0])."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ids = [torch.full_like(rows, frame), rows, cols][:axes]
    ids += [torch.zeros_like(rows)] * (axes - len(ids))
    return torch.stack(ids, -1).reshape(-1, axes).float()


# --- the zoo's five families ------------------------------------------------------------------


def _zoo(name: str) -> Builder:
    def builder(g: torch.Generator) -> tuple[nn.Module, Inputs]:
        from diffopt.evaluation import zoo

        model = zoo.TINY_MODELS[name]()
        return model, zoo.example_inputs(model, batch=B, seed=int(g.initial_seed()))

    return builder


family("tiny-dit", "DiTTransformer2DModel")(_zoo("tiny-dit"))
family("tiny-pixart", "PixArtTransformer2DModel")(_zoo("tiny-pixart"))
family("tiny-sd3", "SD3Transformer2DModel")(_zoo("tiny-sd3"))
family("tiny-flux", "FluxTransformer2DModel", timestep_scale=1.0)(_zoo("tiny-flux"))
family("tiny-unet", "UNet2DConditionModel", latents="sample")(_zoo("tiny-unet"))


# --- image transformers ----------------------------------------------------------------------


@family("tiny-transformer-2d", "Transformer2DModel", note="the patched AdaLN-Zero (DiT) path")
def _transformer_2d(g):
    from diffusers import Transformer2DModel

    model = Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    return model, {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "timestep": _steps(g),
        "class_labels": torch.tensor([1, 3]),
        "return_dict": False,
    }


@family("tiny-auraflow", "AuraFlowTransformer2DModel", timestep_scale=1.0)
def _auraflow(g):
    from diffusers import AuraFlowTransformer2DModel

    model = AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
    )
    return model, {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "timestep": _steps(g, scale=1.0),
        "return_dict": False,
    }


@family("tiny-hunyuan-dit", "HunyuanDiT2DModel")
def _hunyuan_dit(g):
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    model = HunyuanDiT2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        patch_size=2,
        sample_size=8,
        hidden_size=32,
        num_layers=2,
        cross_attention_dim=32,
        cross_attention_dim_t5=32,
        pooled_projection_dim=16,
        text_len=6,
        text_len_t5=8,
        use_style_cond_and_image_meta_size=False,
    )
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    return model, {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "text_embedding_mask": torch.ones(B, 6, dtype=torch.long),
        "encoder_hidden_states_t5": _randn(g, B, 8, 32),
        "text_embedding_mask_t5": torch.ones(B, 8, dtype=torch.long),
        "image_rotary_emb": rope,
        "return_dict": False,
    }


@family("tiny-lumina-next", "LuminaNextDiT2DModel", timestep_scale=1.0)
def _lumina_next(g):
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    model = LuminaNextDiT2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        learn_sigma=True,
        qk_norm=True,
        cross_attention_dim=32,
    )
    return model, {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "timestep": _steps(g, scale=1.0),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "encoder_mask": torch.ones(B, 6, dtype=torch.bool),
        "image_rotary_emb": get_2d_rotary_pos_embed_lumina(16, 8, 8),
        "cross_attention_kwargs": {},
        "return_dict": False,
    }


@family("tiny-lumina2", "Lumina2Transformer2DModel", timestep_scale=1.0)
def _lumina2(g):
    from diffusers import Lumina2Transformer2DModel

    model = Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(32, 32, 32),
        cap_feat_dim=32,
    )
    return model, {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "timestep": _steps(g, scale=1.0),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "encoder_attention_mask": torch.ones(B, 6, dtype=torch.bool),
        "return_dict": False,
    }


@family("tiny-sana", "SanaTransformer2DModel")
def _sana(g):
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=8,
        patch_size=1,
    )
    return model, {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "timestep": _steps(g),
        "return_dict": False,
    }


def _cogview_inputs(g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "timestep": _steps(g),
        "original_size": torch.tensor([[64.0, 64.0]] * B),
        "target_size": torch.tensor([[64.0, 64.0]] * B),
        "crop_coords": torch.zeros(B, 2),
        "return_dict": False,
    }


@family("tiny-cogview3plus", "CogView3PlusTransformer2DModel")
def _cogview3(g):
    from diffusers import CogView3PlusTransformer2DModel

    model = CogView3PlusTransformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        out_channels=4,
        text_embed_dim=32,
        time_embed_dim=16,
        condition_dim=8,
        pos_embed_max_size=8,
        sample_size=8,
    )
    return model, _cogview_inputs(g)


@family("tiny-cogview4", "CogView4Transformer2DModel")
def _cogview4(g):
    from diffusers import CogView4Transformer2DModel

    model = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=16,
        condition_dim=8,
        pos_embed_max_size=8,
        sample_size=8,
        rope_axes_dim=(8, 8),
    )
    return model, _cogview_inputs(g)


@family("tiny-glm-image", "GlmImageTransformer2DModel")
def _glm_image(g):
    from diffusers import GlmImageTransformer2DModel

    model = GlmImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=16,
        condition_dim=8,
        prior_vq_quantizer_codebook_size=64,
    )
    return model, {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "prior_token_id": torch.randint(0, 64, (B, 16), generator=g),
        "prior_token_drop": torch.zeros(B, dtype=torch.bool),
        "timestep": _steps(g),
        "target_size": torch.tensor([[8.0, 8.0]] * B),
        "crop_coords": torch.zeros(B, 2),
        "return_dict": False,
    }


def _flux_like(g: torch.Generator, *, pooled: int | None, guidance: bool = False) -> Inputs:
    """Flux's packed [B, h*w, C] latents (4×4 tokens of 16 channels), 8 text tokens of 32."""
    inputs: Inputs = {
        "hidden_states": _randn(g, B, 16, 16),
        "encoder_hidden_states": _randn(g, B, 8, 32),
        "timestep": _steps(g, scale=1.0),
        "img_ids": _grid_ids(4, 4),
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }
    if pooled:
        inputs["pooled_projections"] = _randn(g, B, pooled)
    if guidance:
        inputs["guidance"] = torch.full((B,), 3.5)
    return inputs


_FLUX_SIZES = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}


@family("tiny-bria", "BriaTransformer2DModel", timestep_scale=1.0)
def _bria(g):
    from diffusers import BriaTransformer2DModel

    return BriaTransformer2DModel(**_FLUX_SIZES), _flux_like(g, pooled=None)


@family("tiny-chroma", "ChromaTransformer2DModel", timestep_scale=1.0)
def _chroma(g):
    from diffusers import ChromaTransformer2DModel

    model = ChromaTransformer2DModel(
        **_FLUX_SIZES,
        approximator_num_channels=8,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    return model, _flux_like(g, pooled=None)


@family("tiny-longcat-image", "LongCatImageTransformer2DModel", timestep_scale=1.0)
def _longcat_image(g):
    from diffusers import LongCatImageTransformer2DModel

    model = LongCatImageTransformer2DModel(**_FLUX_SIZES, pooled_projection_dim=32)
    return model, _flux_like(g, pooled=None)


@family("tiny-ovis-image", "OvisImageTransformer2DModel", timestep_scale=1.0)
def _ovis_image(g):
    from diffusers import OvisImageTransformer2DModel

    model = OvisImageTransformer2DModel(**_FLUX_SIZES, out_channels=16)
    return model, _flux_like(g, pooled=None)


@family("tiny-bria-fibo", "BriaFiboTransformer2DModel", timestep_scale=1.0)
def _bria_fibo(g):
    from diffusers import BriaFiboTransformer2DModel

    model = BriaFiboTransformer2DModel(**_FLUX_SIZES, text_encoder_dim=16)
    inputs = _flux_like(g, pooled=None)
    # one hidden-state tensor per text-encoder layer the blocks read (num_layers + single layers)
    inputs["text_encoder_layers"] = [_randn(g, B, 8, 16) for _ in range(3)]
    return model, inputs


@family("tiny-flux2", "Flux2Transformer2DModel", timestep_scale=1.0)
def _flux2(g):
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=16,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True,
    )
    inputs = _flux_like(g, pooled=None, guidance=True)
    inputs["img_ids"] = _grid_ids(4, 4, axes=4)
    inputs["txt_ids"] = torch.zeros(8, 4)
    return model, inputs


@family("tiny-flux3", "Flux3Transformer2DModel", timestep_scale=1.0)
def _flux3(g):
    from diffusers import Flux3Transformer2DModel

    model = Flux3Transformer2DModel(
        in_channels=16,
        cond_in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_channels=16,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
    )
    inputs = _flux_like(g, pooled=None)
    inputs["img_ids"] = _grid_ids(4, 4, axes=4)
    inputs["txt_ids"] = torch.zeros(8, 4)
    return model, inputs


@family("tiny-hidream", "HiDreamImageTransformer2DModel", timestep="timesteps")
def _hidream(g):
    from diffusers import HiDreamImageTransformer2DModel

    model = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=[16, 8],
        text_emb_dim=16,
        num_routed_experts=2,
        num_activated_experts=2,
        axes_dims_rope=(8, 4, 4),
        max_resolution=(8, 8),
        llama_layers=(0, 1),
        force_inference_output=True,
    )
    return model, {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "timesteps": _steps(g),
        "encoder_hidden_states_t5": _randn(g, B, 6, 16),
        # [llama layers, B, L, D]: one hidden-state tensor per llama layer the blocks read
        "encoder_hidden_states_llama3": _randn(g, 2, B, 6, 8),
        "pooled_embeds": _randn(g, B, 16),
        "return_dict": False,
    }


@family("tiny-qwenimage", "QwenImageTransformer2DModel", timestep_scale=1.0)
def _qwenimage(g):
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    return model, {
        "hidden_states": _randn(g, B, 16, 16),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "encoder_hidden_states_mask": torch.ones(B, 6, dtype=torch.long),
        "timestep": _steps(g, scale=1.0),
        "img_shapes": [(1, 4, 4)] * B,
        "return_dict": False,
    }


@family("tiny-qwenimage21", "QwenImage21Transformer2DModel", timestep_scale=1.0)
def _qwenimage21(g):
    from diffusers import QwenImage21Transformer2DModel

    model = QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=32,
        mlp_ratio=2,
        axes_dims_rope=(4, 6, 6),
    )
    text, height, width = 4, 4, 4
    img_mask = torch.zeros(B, text + height * width // 4, dtype=torch.bool)
    img_mask[:, text:] = True  # one vision slot per 2×2 group of target latents, after the text
    return model, {
        "hidden_states": _randn(g, B, height * width, 4),
        "encoder_hidden_states": _randn(g, B, text, 32),
        "encoder_hidden_states_mask": torch.ones(B, text, dtype=torch.long),
        "timestep": _steps(g, scale=1.0),
        "img_shapes": [[(1, height, width)]] * B,
        "img_mask": img_mask,
        "return_dict": False,
    }


@family("tiny-nucleusmoe-image", "NucleusMoEImageTransformer2DModel", timestep_scale=1.0)
def _nucleusmoe(g):
    from diffusers import NucleusMoEImageTransformer2DModel

    model = NucleusMoEImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        mlp_ratio=6.0,  # the dense MLP's width is rounded down to 128s: 32 · 6 · 2/3 = 128
        moe_enabled=True,
        dense_moe_strategy="leave_first_block_dense",  # one dense block, one mixture of experts
        num_experts=4,
        moe_intermediate_dim=32,
        capacity_factors=1.0,  # expert-choice routing: capacity = factor · tokens / experts
    )
    with torch.no_grad():  # the stacked experts are torch.empty until a checkpoint fills them
        for name, parameter in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                parameter.copy_(_randn(g, *parameter.shape) * 0.02)
    return model, {
        "hidden_states": _randn(g, B, 16, 16),
        "img_shapes": [(1, 4, 4)] * B,
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "encoder_hidden_states_mask": torch.ones(B, 6, dtype=torch.long),
        "timestep": _steps(g, scale=1.0),
        "return_dict": False,
    }


@family("tiny-ernie-image", "ErnieImageTransformer2DModel", timestep_scale=1.0)
def _ernie_image(g):
    from diffusers import ErnieImageTransformer2DModel

    model = ErnieImageTransformer2DModel(
        hidden_size=32,
        num_attention_heads=2,
        num_layers=2,
        ffn_hidden_size=64,
        in_channels=16,
        out_channels=16,
        patch_size=1,
        text_in_dim=16,
        rope_axes_dim=(8, 4, 4),
    )
    return model, {
        "hidden_states": _randn(g, B, 16, 4, 4),
        "timestep": _steps(g, scale=1.0),
        "text_bth": _randn(g, B, 8, 16),
        "text_lens": torch.full((B,), 8),
        "return_dict": False,
    }


@family("tiny-ideogram4", "Ideogram4Transformer2DModel", timestep_scale=1.0)
def _ideogram4(g):
    from diffusers import Ideogram4Transformer2DModel
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
    )

    model = Ideogram4Transformer2DModel(
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        intermediate_size=64,
        adaln_dim=16,
        llm_features_dim=24,
        rope_theta=10_000,
        mrope_section=(4, 2, 2),
    )
    text, image = 4, 16  # one sequence: 4 text rows, then a 4×4 image
    seq = text + image
    hidden = torch.zeros(B, seq, 16)
    hidden[:, text:] = _randn(g, B, image, 16)
    llm = torch.zeros(B, seq, 24)
    llm[:, :text] = _randn(g, B, text, 24)
    positions = torch.zeros(B, seq, 3, dtype=torch.long)
    positions[:, :text] = torch.arange(text)[:, None]
    grid = _grid_ids(4, 4).long() + IMAGE_POSITION_OFFSET
    positions[:, text:] = grid
    indicator = torch.full((B, seq), OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
    indicator[:, :text] = LLM_TOKEN_INDICATOR
    return model, {
        "hidden_states": hidden,
        "timestep": _steps(g, scale=1.0),
        "encoder_hidden_states": llm,
        "position_ids": positions,
        "segment_ids": torch.ones(B, seq, dtype=torch.long),
        "indicator": indicator,
        "return_dict": False,
    }


@family("tiny-krea2", "Krea2Transformer2DModel", timestep_scale=1.0)
def _krea2(g):
    from diffusers import Krea2Transformer2DModel

    model = Krea2Transformer2DModel(
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        timestep_embed_dim=16,
        text_hidden_dim=16,
        num_text_layers=3,
        text_num_attention_heads=2,
        text_num_key_value_heads=1,
        text_intermediate_size=32,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(8, 4, 4),
    )
    text, image = 4, 16
    positions = torch.zeros(text + image, 3)
    positions[text:] = _grid_ids(4, 4)
    return model, {
        "hidden_states": _randn(g, B, image, 16),
        "encoder_hidden_states": _randn(g, B, text, 3, 16),  # [B, L, text layers, D]
        "timestep": _steps(g, scale=1.0),
        "position_ids": positions,
        "encoder_attention_mask": torch.ones(B, text, dtype=torch.bool),
        "return_dict": False,
    }


@family("tiny-prx", "PRXTransformer2DModel", timestep_scale=1.0)
def _prx(g):
    from diffusers import PRXTransformer2DModel

    model = PRXTransformer2DModel(
        in_channels=4,
        patch_size=2,
        context_in_dim=32,
        hidden_size=32,
        mlp_ratio=2.0,
        num_heads=2,
        depth=2,
        axes_dim=[8, 8],
    )
    return model, {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "timestep": _steps(g, scale=1.0),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "return_dict": False,
    }


@family("tiny-z-image", "ZImageTransformer2DModel", timestep_scale=1.0, latents="x", timestep="t")
def _z_image(g):
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=16,
        axes_dims=[8, 4, 4],
        axes_lens=[64, 16, 16],
    )
    # lists: one [C, F, H, W] latent and one [L, D] caption per sample
    return model, {
        "x": [_randn(g, 16, 1, 8, 8) for _ in range(B)],
        "t": _steps(g, scale=1.0),
        "cap_feats": [_randn(g, 8, 16) for _ in range(B)],
        "return_dict": False,
    }


@family("tiny-bria-fibo2", "BriaFibo2Transformer2DModel", timestep_scale=1.0)
def _bria_fibo2(g):
    from diffusers import BriaFibo2Transformer2DModel

    model = BriaFibo2Transformer2DModel(
        in_channels=4,
        patch_size=2,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        cap_feat_dim=24,
        injection_layer_ids=(1,),
        perceiver_num_layers=1,
        min_num_gist_tokens=4,
        max_num_gist_tokens=8,
        gist_step=4,
        gist_min_text_len=4,
        gist_max_text_len=16,
        axes_dims=(8, 4, 4),
        axes_lens=(16, 16, 16),
    )
    return model, {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "timestep": _steps(g, scale=1.0),
        # [B, bundles, L, D]: one text bundle for the perceiver plus one per injection block
        "encoder_hidden_states": _randn(g, B, 2, 6, 24),
        "return_dict": False,
    }


@family("tiny-omnigen", "OmniGenTransformer2DModel", timestep_scale=1.0)
def _omnigen(g):
    from diffusers import OmniGenTransformer2DModel

    model = OmniGenTransformer2DModel(
        in_channels=4,
        patch_size=2,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        num_layers=2,
        pad_token_id=0,
        vocab_size=64,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8},  # Phi-3 style
        pos_embed_max_size=16,
        time_step_dim=16,
    )
    text, image = 6, 16  # text tokens, then the time token, then 4×4 latent patches
    seq = text + 1 + image
    return model, {
        "hidden_states": _randn(g, B, 4, 8, 8),
        "timestep": _steps(g, scale=1.0),
        "input_ids": torch.randint(1, 64, (B, text), generator=g),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": torch.ones(B, seq, seq),
        "position_ids": torch.arange(seq).expand(B, seq),
        "return_dict": False,
    }


@family("tiny-prior", "PriorTransformer", note="unCLIP's prior: denoises CLIP image embeddings")
def _prior(g):
    from diffusers import PriorTransformer

    model = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        embedding_dim=32,
        num_embeddings=6,
        additional_embeddings=4,
    )
    return model, {
        "hidden_states": _randn(g, B, 32),
        "timestep": _steps(g),
        "proj_embedding": _randn(g, B, 32),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "attention_mask": torch.ones(B, 6, dtype=torch.bool),
        "return_dict": False,
    }


# --- video transformers ----------------------------------------------------------------------

_WAN_SIZES = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 16,
    "ffn_dim": 64,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}


def _video(g: torch.Generator, channels: int = 4, frames: int = 2, size: int = 8) -> torch.Tensor:
    """[B, C, F, H, W] video latents."""
    return _randn(g, B, channels, frames, size, size)


def _wan_inputs(g: torch.Generator) -> Inputs:
    return {
        "hidden_states": _video(g),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 16),
        "return_dict": False,
    }


@family("tiny-wan", "WanTransformer3DModel")
def _wan(g):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**_WAN_SIZES), _wan_inputs(g)


@family("tiny-chronoedit", "ChronoEditTransformer3DModel")
def _chronoedit(g):
    from diffusers import ChronoEditTransformer3DModel

    return ChronoEditTransformer3DModel(**_WAN_SIZES), _wan_inputs(g)


@family("tiny-skyreels-v2", "SkyReelsV2Transformer3DModel")
def _skyreels_v2(g):
    from diffusers import SkyReelsV2Transformer3DModel

    return SkyReelsV2Transformer3DModel(**_WAN_SIZES), _wan_inputs(g)


@family("tiny-wan-vace", "WanVACETransformer3DModel")
def _wan_vace(g):
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(**_WAN_SIZES, vace_layers=[0, 1], vace_in_channels=8)
    inputs = _wan_inputs(g)
    inputs["control_hidden_states"] = _video(g, channels=8)
    return model, inputs


@family("tiny-helios", "HeliosTransformer3DModel")
def _helios(g):
    from diffusers import HeliosTransformer3DModel

    sizes = {k: v for k, v in _WAN_SIZES.items() if k != "rope_max_seq_len"}
    model = HeliosTransformer3DModel(**sizes, rope_dim=(4, 6, 6))
    return model, _wan_inputs(g)


@family("tiny-wan-animate", "WanAnimateTransformer3DModel")
def _wan_animate(g):
    from diffusers import WanAnimateTransformer3DModel

    sizes = dict(_WAN_SIZES, in_channels=12)  # noisy latents + reference and mask channels
    model = WanAnimateTransformer3DModel(
        **sizes,
        latent_channels=4,
        image_dim=16,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16, "32": 16},
        motion_encoder_size=16,
        motion_style_dim=16,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=32,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=1,
        motion_encoder_batch_size=2,
    )
    inputs = _wan_inputs(g)
    inputs["hidden_states"] = _video(g, channels=12)
    inputs["encoder_hidden_states_image"] = _randn(g, B, 4, 16)
    inputs["pose_hidden_states"] = _video(g, channels=4, frames=1)
    inputs["face_pixel_values"] = _randn(g, B, 3, 1, 16, 16)
    return model, inputs


@family("tiny-wan-animate2", "WanAnimate2Transformer3DModel", note="reference (extract) pass")
def _wan_animate2(g):
    from diffusers import WanAnimate2Transformer3DModel
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    model = WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2),
        text_len=8,
        in_dim=8,
        dim=32,
        ffn_dim=64,
        freq_dim=16,
        text_dim=16,
        out_dim=4,
        num_heads=2,
        num_layers=2,
        use_img_emb=False,
    )
    # one sample, as lists of unbatched [C, F, H, W] tensors (the pipeline's layout)
    return model, {
        "hidden_states": [_randn(g, 4, 2, 8, 8)],
        "timestep": _steps(g, batch=1),
        "encoder_hidden_states": [_randn(g, 6, 16)],
        "condition_latents": [_randn(g, 4, 2, 8, 8)],
        "kv_cache": WanAnimate2KVCache(2),
        "kv_cache_mode": "extract",
        "seq_len": 2 * 4 * 4,
        "offset_grid_sizes": torch.tensor([[2, 4, 4]]),
        "return_dict": False,
    }


@family("tiny-anyflow", "AnyFlowTransformer3DModel")
def _anyflow(g):
    from diffusers import AnyFlowTransformer3DModel

    sizes = {k: v for k, v in _WAN_SIZES.items()}
    model = AnyFlowTransformer3DModel(**sizes)
    return model, {
        "hidden_states": _randn(g, B, 2, 4, 8, 8),  # [B, F, C, H, W]
        "timestep": torch.full((B, 2), 500.0),  # per frame
        "r_timestep": torch.full((B, 2), 250.0),
        "encoder_hidden_states": _randn(g, B, 6, 16),
        "return_dict": False,
    }


@family("tiny-anyflow-far", "AnyFlowFARTransformer3DModel")
def _anyflow_far(g):
    from diffusers import AnyFlowFARTransformer3DModel

    model = AnyFlowFARTransformer3DModel(**_WAN_SIZES, compressed_patch_size=(1, 4, 4))
    return model, {
        "hidden_states": _randn(g, B, 4, 4, 8, 8),  # [B, F, C, H, W]: 2 compressed + 2 full frames
        "timestep": torch.full((B, 4), 500.0),
        "r_timestep": torch.full((B, 4), 250.0),
        "encoder_hidden_states": _randn(g, B, 6, 16),
        "chunk_partition": [2, 2],
        "return_dict": False,
    }


@family("tiny-cogvideox", "CogVideoXTransformer3DModel")
def _cogvideox(g):
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
    )
    return model, {
        "hidden_states": _randn(g, B, 2, 4, 8, 8),  # [B, F, C, H, W]
        "encoder_hidden_states": _randn(g, B, 8, 32),
        "timestep": _steps(g),
        "return_dict": False,
    }


@family("tiny-consisid", "ConsisIDTransformer3DModel")
def _consisid(g):
    from diffusers import ConsisIDTransformer3DModel

    model = ConsisIDTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
    )
    return model, {
        "hidden_states": _randn(g, B, 2, 4, 8, 8),  # [B, F, C, H, W]
        "encoder_hidden_states": _randn(g, B, 8, 32),
        "timestep": _steps(g),
        "return_dict": False,
    }


@family("tiny-latte", "LatteTransformer3DModel")
def _latte(g):
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=32,
        video_length=2,
    )
    return model, {
        "hidden_states": _video(g),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "return_dict": False,
    }


@family("tiny-allegro", "AllegroTransformer3DModel")
def _allegro(g):
    from diffusers import AllegroTransformer3DModel

    model = AllegroTransformer3DModel(
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=48,
        sample_height=8,
        sample_width=8,
        sample_frames=2,
        caption_channels=32,
    )
    return model, {
        "hidden_states": _video(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "timestep": _steps(g),
        "return_dict": False,
    }


@family("tiny-easyanimate", "EasyAnimateTransformer3DModel")
def _easyanimate(g):
    from diffusers import EasyAnimateTransformer3DModel

    model = EasyAnimateTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        sample_width=8,
        sample_height=8,
        num_layers=2,
        mmdit_layers=2,
        time_embed_dim=16,
        text_embed_dim=32,
    )
    return model, {
        "hidden_states": _video(g),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "return_dict": False,
    }


@family("tiny-cosmos", "CosmosTransformer3DModel")
def _cosmos(g):
    from diffusers import CosmosTransformer3DModel

    model = CosmosTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2.0,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False,  # True resizes the mask with torchvision, not a dependency
        extra_pos_embed_type="learnable",
    )
    return model, {
        "hidden_states": _video(g),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "fps": 24,
        "return_dict": False,
    }


@family("tiny-mochi", "MochiTransformer3DModel")
def _mochi(g):
    from diffusers import MochiTransformer3DModel

    model = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        text_embed_dim=32,
        time_embed_dim=16,
        max_sequence_length=8,
    )
    return model, {
        "hidden_states": _video(g),
        "encoder_hidden_states": _randn(g, B, 8, 32),
        "timestep": _steps(g),
        "encoder_attention_mask": torch.ones(B, 8, dtype=torch.bool),
        "return_dict": False,
    }


@family("tiny-ltx", "LTXVideoTransformer3DModel")
def _ltx(g):
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    return model, {
        "hidden_states": _randn(g, B, 2 * 4 * 4, 8),  # packed [B, F*H*W, C]
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "timestep": _steps(g),
        "encoder_attention_mask": torch.ones(B, 6, dtype=torch.long),
        "num_frames": 2,
        "height": 4,
        "width": 4,
        "return_dict": False,
    }


_LTX2_SIZES = {
    "in_channels": 8,
    "out_channels": 8,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "cross_attention_dim": 32,
    "audio_in_channels": 4,
    "audio_out_channels": 4,
    "audio_num_attention_heads": 2,
    "audio_attention_head_dim": 8,
    "audio_cross_attention_dim": 16,
    "num_layers": 2,
    "caption_channels": 32,
}


@family("tiny-ltx2", "LTX2VideoTransformer3DModel")
def _ltx2(g):
    from diffusers import LTX2VideoTransformer3DModel

    model = LTX2VideoTransformer3DModel(**_LTX2_SIZES)
    return model, {
        "hidden_states": _randn(g, B, 2 * 4 * 4, 8),  # packed [B, F*H*W, C]
        "audio_hidden_states": _randn(g, B, 5, 4),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "audio_encoder_hidden_states": _randn(g, B, 6, 32),
        "timestep": _steps(g),
        "encoder_attention_mask": torch.ones(B, 6, dtype=torch.long),
        "audio_encoder_attention_mask": torch.ones(B, 6, dtype=torch.long),
        "num_frames": 2,
        "height": 4,
        "width": 4,
        "audio_num_frames": 5,
        "return_dict": False,
    }


@family("tiny-sana-wm-refiner", "SanaWMLTX2RefinerTransformer3DModel")
def _sana_wm_refiner(g):
    from diffusers import SanaWMLTX2RefinerTransformer3DModel

    model = SanaWMLTX2RefinerTransformer3DModel(**_LTX2_SIZES)
    tokens = 2 * 4 * 4
    cos = torch.ones(B, tokens, 32)
    return model, {
        "hidden_states": _randn(g, B, tokens, 8),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "timestep": _steps(g),
        "video_rotary_emb": (cos, torch.zeros_like(cos)),
        "return_dict": False,
    }


_HUNYUAN_VIDEO_SIZES = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 1,
    "num_single_layers": 2,
    "num_refiner_layers": 1,
    "mlp_ratio": 2.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "text_embed_dim": 32,
    "pooled_projection_dim": 16,
    "rope_axes_dim": (4, 6, 6),
}


@family("tiny-hunyuan-video", "HunyuanVideoTransformer3DModel")
def _hunyuan_video(g):
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(**_HUNYUAN_VIDEO_SIZES, guidance_embeds=True)
    return model, {
        "hidden_states": _video(g),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "encoder_attention_mask": torch.ones(B, 6, dtype=torch.long),
        "pooled_projections": _randn(g, B, 16),
        "guidance": torch.full((B,), 6000.0),
        "return_dict": False,
    }


@family("tiny-hunyuan-video-framepack", "HunyuanVideoFramepackTransformer3DModel")
def _framepack(g):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model = HunyuanVideoFramepackTransformer3DModel(
        **_HUNYUAN_VIDEO_SIZES,
        guidance_embeds=True,
        has_image_proj=True,
        image_proj_dim=16,
        has_clean_x_embedder=True,  # without it the forward calls a missing embedder
    )
    return model, {
        "hidden_states": _video(g),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "encoder_attention_mask": torch.ones(B, 6, dtype=torch.long),
        "pooled_projections": _randn(g, B, 16),
        "image_embeds": _randn(g, B, 4, 16),
        # the frames being denoised and the clean, 2×- and 4×-compressed history around them,
        # each with its frame indices in the whole video (FramePack's packed context)
        "indices_latents": torch.tensor([1, 2]),
        "latents_clean": _video(g),
        "indices_latents_clean": torch.tensor([0, 3]),
        "latents_history_2x": _video(g),
        "indices_latents_history_2x": torch.tensor([4, 5]),
        "latents_history_4x": _video(g, frames=4),
        "indices_latents_history_4x": torch.arange(6, 10),
        "guidance": torch.full((B,), 6000.0),
        "return_dict": False,
    }


@family(
    "tiny-hunyuan-video15",
    "HunyuanVideo15Transformer3DModel",
    dynamo=SIZES_FROM_DATA,
)
def _hunyuan_video15(g):
    from diffusers import HunyuanVideo15Transformer3DModel

    model = HunyuanVideo15Transformer3DModel(
        in_channels=9,  # noisy latents + condition latents + mask
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=32,
        text_embed_2_dim=16,
        image_embed_dim=16,
        rope_axes_dim=(4, 6, 6),
        target_size=64,
        task_type="t2v",
    )
    return model, {
        "hidden_states": _video(g, channels=9, size=4),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "encoder_attention_mask": torch.ones(B, 6, dtype=torch.long),
        "encoder_hidden_states_2": _randn(g, B, 4, 16),
        "encoder_attention_mask_2": torch.ones(B, 4, dtype=torch.long),
        "image_embeds": torch.zeros(B, 4, 16),
        "return_dict": False,
    }


@family("tiny-hunyuanimage", "HunyuanImageTransformer2DModel")
def _hunyuanimage(g):
    from diffusers import HunyuanImageTransformer2DModel

    model = HunyuanImageTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=(1, 1),
        text_embed_dim=32,
        rope_axes_dim=(8, 8),
    )
    return model, {
        "hidden_states": _randn(g, B, 4, 4, 4),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "encoder_attention_mask": torch.ones(B, 6, dtype=torch.long),
        "return_dict": False,
    }


@family("tiny-motif-video", "MotifVideoTransformer3DModel")
def _motif_video(g):
    from diffusers import MotifVideoTransformer3DModel

    model = MotifVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=2,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=32,
        rope_axes_dim=(4, 6, 6),
    )
    return model, {
        "hidden_states": _video(g),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "encoder_attention_mask": torch.ones(B, 6, dtype=torch.long),
        "return_dict": False,
    }


@family("tiny-sana-video", "SanaVideoTransformer3DModel")
def _sana_video(g):
    from diffusers import SanaVideoTransformer3DModel

    model = SanaVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=8,
        patch_size=(1, 2, 2),
        rope_max_seq_len=32,
    )
    return model, {
        "hidden_states": _video(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "timestep": _steps(g),
        "return_dict": False,
    }


@family("tiny-sana-wm", "SanaWMTransformer3DModel")
def _sana_wm(g):
    from diffusers import SanaWMTransformer3DModel

    model = SanaWMTransformer3DModel(
        in_channels=4,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        softmax_every_n=2,
        linear_head_dim=16,
        chunk_plucker_channels=8,
        chunk_plucker_post_attn_blocks=2,
        image_size=64,
        caption_channels=32,
        mlp_ratio=2.0,
    )
    return model, {
        "hidden_states": _video(g),
        "timestep": _steps(g)[:, None, None].expand(B, 1, 2),  # per frame: [B, 1, F]
        "encoder_hidden_states": _randn(g, B, 1, 6, 32),  # [B, 1, L, D]
        "mask": torch.ones(B, 6),
        "return_dict": False,
    }


@family("tiny-joyimage-edit", "JoyImageEditTransformer3DModel")
def _joyimage(g):
    from diffusers import JoyImageEditTransformer3DModel

    model = JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2],
        in_channels=4,
        hidden_size=32,
        num_attention_heads=2,
        text_dim=32,
        mlp_width_ratio=2.0,
        num_layers=2,
        rope_dim_list=[4, 6, 6],
    )
    return model, {
        "hidden_states": _video(g, frames=1),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "return_dict": False,
    }


@family("tiny-joyimage-edit-plus", "JoyImageEditPlusTransformer3DModel")
def _joyimage_plus(g):
    from diffusers import JoyImageEditPlusTransformer3DModel

    model = JoyImageEditPlusTransformer3DModel(
        patch_size=[1, 2, 2],
        in_channels=4,
        hidden_size=32,
        num_attention_heads=2,
        text_dim=32,
        mlp_width_ratio=2.0,
        num_layers=2,
        rope_dim_list=[4, 6, 6],
    )
    # pre-patchified [B, patches, C, pt, ph, pw]: a 1×4×4 patch grid of the 8×8 target latents
    return model, {
        "hidden_states": _randn(g, B, 16, 4, 1, 2, 2),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "encoder_hidden_states_mask": torch.ones(B, 6),
        "shape_list": [[(1, 4, 4)]] * B,
        "return_dict": False,
    }


@family("tiny-kandinsky5", "Kandinsky5Transformer3DModel")
def _kandinsky5(g):
    from diffusers import Kandinsky5Transformer3DModel

    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4,
        in_text_dim=32,
        in_text_dim2=16,
        time_dim=16,
        out_visual_dim=4,
        patch_size=(1, 2, 2),
        model_dim=32,
        ff_dim=64,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
    )
    return model, {
        "hidden_states": _randn(g, B, 2, 8, 8, 4),  # [B, F, H, W, C]
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "timestep": _steps(g),
        "pooled_projections": _randn(g, B, 16),
        "visual_rope_pos": [torch.arange(2), torch.arange(4), torch.arange(4)],
        "text_rope_pos": torch.arange(6),
        "return_dict": False,
    }


@family("tiny-kandinsky6", "Kandinsky6Transformer3DModel")
def _kandinsky6(g):
    from diffusers import Kandinsky6Transformer3DModel

    model = Kandinsky6Transformer3DModel(
        in_visual_dim=4,
        out_visual_dim=4,
        in_text_dim=32,
        in_text_dim2=16,
        time_dim=16,
        patch_size=(1, 2, 2),
        model_dim=32,
        ff_dim=64,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
        visual_cond=False,
    )
    return model, {
        "hidden_states": _randn(g, B, 2, 8, 8, 4),  # [B, F, H, W, C]
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "pooled_projections": _randn(g, B, 16),
        "timestep": _steps(g),
        "return_dict": False,
    }


@family("tiny-kandinsky6-sr", "Kandinsky6SRTransformer3DModel")
def _kandinsky6_sr(g):
    from diffusers import Kandinsky6SRTransformer3DModel

    model = Kandinsky6SRTransformer3DModel(
        in_visual_dim=4,
        out_visual_dim=4,
        time_dim=16,
        patch_size=(1, 1, 1),
        model_dim=32,
        ff_dim=64,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
    )
    # its sparse (NABLA) attention needs a token grid divisible by 8
    return model, {
        "hidden_states": _randn(g, B, 2, 8, 8, 2 * 4 + 1),  # noisy + low-res latents + mask
        "timestep": _steps(g),
        "return_dict": False,
    }


@family("tiny-minimax-h3", "MiniMaxH3Transformer3DModel", timestep_scale=1.0)
def _minimax_h3(g):
    from diffusers import MiniMaxH3Transformer3DModel

    model = MiniMaxH3Transformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        ffn_dim=64,
        in_channels=4,
        audio_in_channels=6,
        patch_size=(1, 2, 2),
        text_dim=8,
        freq_dim=8,
        time_embed_hidden_dim=32,
        time_embed_dim=16,
        rope_freq_dim=2,
    )
    text, audio, video = 4, 6, 8  # one packed sequence: text rows, audio rows, video rows
    seq = text + audio + video
    text_idx = torch.arange(text)
    audio_idx = torch.arange(text, text + audio)
    video_idx = torch.arange(text + audio, seq)
    tags = torch.zeros(seq, dtype=torch.long)
    tags[text_idx], tags[audio_idx] = 1, 2  # 0 video, 1 text, 2 audio
    step_of = torch.zeros(seq, dtype=torch.long)
    step_of[audio_idx] = 1
    positions = torch.zeros(seq, 3)
    positions[:, 0] = torch.arange(seq).float()
    positions[video_idx, 1] = (torch.arange(video) % 4).float()
    positions[video_idx, 2] = (torch.arange(video) % 2).float()
    return model, {
        "hidden_states": _randn(g, B, video, 16),
        "audio_hidden_states": _randn(g, B, audio, 6),
        "encoder_hidden_states": _randn(g, B, text, 8),
        "timestep": torch.tensor([0.7, 0.3]),  # one per schedule, addressed by timestep_indices
        "timestep_indices": step_of,
        "token_tags": tags,
        "position_ids": positions,
        "video_indices": video_idx,
        "audio_indices": audio_idx,
        "text_indices": text_idx,
        "return_dict": False,
    }


@family(
    "tiny-cosmos3",
    "Cosmos3OmniTransformer",
    timestep="vision_timesteps",
    timestep_scale=1.0,
    latents="vision_tokens",
)
def _cosmos3(g):
    from diffusers import Cosmos3OmniTransformer

    model = Cosmos3OmniTransformer(
        head_dim=16,
        hidden_act="relu2",
        hidden_size=32,
        intermediate_size=64,
        latent_channel=4,
        latent_patch_size=1,
        num_attention_heads=2,
        num_hidden_layers=2,
        num_key_value_heads=1,
        patch_latent_dim=4,
        qk_norm_for_text=False,
        rope_axes_dim=[4, 2, 2],
        vocab_size=32,
    )
    text, height, width = 2, 2, 2  # one packed sequence: 2 text tokens, then 2×2 vision tokens
    vision = height * width
    seq = text + vision
    vision_idx = torch.arange(text, seq)
    return model, {
        "input_ids": torch.tensor([1, 2]),
        "text_indexes": torch.arange(text),
        "position_ids": torch.zeros(3, seq, dtype=torch.long),
        "und_len": text,
        "sequence_length": seq,
        "vision_tokens": [_randn(g, 1, 4, 1, height, width)],
        "vision_token_shapes": [(1, height, width)],
        "vision_sequence_indexes": vision_idx,
        "vision_mse_loss_indexes": vision_idx,
        "vision_timesteps": torch.full((vision,), 0.6),
        "vision_noisy_frame_indexes": [torch.tensor([0])],
        "return_dict": False,
    }


# --- audio and other sequences ---------------------------------------------------------------


@family("tiny-stable-audio", "StableAudioDiTModel")
def _stable_audio(g):
    from diffusers import StableAudioDiTModel
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    model = StableAudioDiTModel(
        sample_size=8,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        out_channels=4,
        cross_attention_dim=32,
        time_proj_dim=16,
        global_states_input_dim=32,
        cross_attention_input_dim=32,
    )
    length = 8
    rope = get_1d_rotary_pos_embed(8, length + 1, use_real=True, repeat_interleave_real=False)
    return model, {
        "hidden_states": _randn(g, B, 4, length),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "global_hidden_states": _randn(g, B, 1, 32),
        "rotary_embedding": rope,
        "return_dict": False,
    }


@family("tiny-stable-audio3", "StableAudio3DiTModel", timestep_scale=1.0)
def _stable_audio3(g):
    from diffusers import StableAudio3DiTModel

    model = StableAudio3DiTModel(
        io_channels=4,
        patch_size=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
        cond_token_dim=16,
        global_cond_dim=16,
        local_add_cond_dim=5,
        timestep_features_dim=16,
        ff_mult=2.0,
        num_memory_tokens=4,
    )
    return model, {
        "hidden_states": _randn(g, B, 4, 8),
        "timestep": _steps(g, scale=1.0),
        "encoder_hidden_states": _randn(g, B, 6, 16),
        "global_hidden_states": _randn(g, B, 16),
        "return_dict": False,
    }


@family("tiny-ace-step", "AceStepTransformer1DModel", timestep_scale=1.0)
def _ace_step(g):
    from diffusers import AceStepTransformer1DModel

    model = AceStepTransformer1DModel(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        in_channels=24,  # latents + context latents (2 × acoustic dim)
        audio_acoustic_hidden_dim=8,
        patch_size=2,
        rope_theta=10000.0,
        sliding_window=16,
    )
    return model, {
        "hidden_states": _randn(g, B, 8, 8),
        "timestep": _steps(g, scale=1.0),
        "timestep_r": _steps(g, scale=1.0),
        "encoder_hidden_states": _randn(g, B, 10, 32),
        "context_latents": _randn(g, B, 8, 16),
        "return_dict": False,
    }


@family("tiny-longcat-audio-dit", "LongCatAudioDiTTransformer", timestep_scale=1.0)
def _longcat_audio(g):
    from diffusers import LongCatAudioDiTTransformer

    model = LongCatAudioDiTTransformer(
        dit_dim=32,
        dit_depth=2,
        dit_heads=2,
        dit_text_dim=16,
        latent_dim=8,
        ff_mult=2.0,
    )
    return model, {
        "hidden_states": _randn(g, B, 8, 8),
        "encoder_hidden_states": _randn(g, B, 6, 16),
        "encoder_attention_mask": torch.ones(B, 6, dtype=torch.bool),
        "timestep": _steps(g, scale=1.0),
        "latent_cond": torch.zeros(B, 8, 8),
        "return_dict": False,
    }


@family("tiny-minimax-music3", "MiniMaxMusic3Transformer1DModel", timestep_scale=1.0)
def _minimax_music3(g):
    from diffusers import MiniMaxMusic3Transformer1DModel

    model = MiniMaxMusic3Transformer1DModel(
        in_channels=8,
        condition_dim=16,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        ff_inner_dim=64,
        rotary_dim=8,
        fourier_embedding_dim=16,
    )
    return model, {
        "hidden_states": _randn(g, B, 8, 8),
        "timestep": _steps(g, scale=1.0),
        "encoder_hidden_states": _randn(g, B, 8, 16),
        "return_dict": False,
    }


@family(
    "tiny-t5-film",
    "T5FilmDecoder",
    timestep="decoder_noise_time",
    timestep_scale=1.0,
    latents="decoder_input_tokens",
    note="spectrogram diffusion's decoder: encodings of the notes in, a spectrogram out",
)
def _t5_film(g):
    from diffusers import T5FilmDecoder

    model = T5FilmDecoder(
        input_dims=8,
        targets_length=8,
        d_model=32,
        num_layers=2,
        num_heads=2,
        d_kv=16,
        d_ff=64,
        dropout_rate=0.0,
    )
    return model, {
        "encodings_and_masks": [(_randn(g, B, 6, 32), torch.ones(B, 6, dtype=torch.bool))],
        "decoder_input_tokens": _randn(g, B, 8, 8),
        "decoder_noise_time": _steps(g, scale=1.0),
    }


@family(
    "tiny-rfd4-proteina",
    "RFD4ProteinaTransformer",
    timestep="bb_ca_time",
    timestep_scale=1.0,
    latents="bb_ca",
    note="protein structure flow matching: backbone coordinates and latents per residue",
)
def _rfd4(g):
    from diffusers import RFD4ProteinaTransformer

    model = RFD4ProteinaTransformer(
        nlayers=2,
        token_dim=32,
        nheads=2,
        dim_cond=16,
        pair_repr_dim=16,
        latent_dim=8,
        token_type_emb_dim=8,
        cath_emb_dim=8,
        t_emb_dim=16,
        seq_sep_dim=8,
        xt_pair_dist_dim=8,
        tri_mult_c=16,
        # the noisy structure and time only: the released feature set reads atom-level annotations
        feats_seq=("xt_bb_ca", "xt_local_latents", "token_type"),
        feats_cond_seq=("time_emb_bb_ca", "time_emb_local_latents"),
        feats_pair_repr=("xt_bb_ca_pair_dists",),
    )
    residues = 8
    return model, {
        "bb_ca": _randn(g, B, residues, 3),
        "local_latents": _randn(g, B, residues, 8),
        "bb_ca_time": _steps(g, scale=1.0),
        "local_latents_time": _steps(g, scale=1.0),
        "padding_mask": torch.ones(B, residues, dtype=torch.bool),
        "token_type": torch.zeros(B, residues, dtype=torch.long),
        "conditioning": {
            "is_in_context_conditioning": torch.zeros(B, residues, dtype=torch.bool),
            "supports_local_latent": torch.ones(B, residues, dtype=torch.bool),
        },
        "return_dict": False,
    }


# --- UNets and temporal blocks ---------------------------------------------------------------


@family(
    "tiny-transformer-temporal",
    "TransformerTemporalModel",
    timestep=None,
    note="a temporal block of the video UNets, run alone: no noise-level input",
)
def _transformer_temporal(g):
    from diffusers import TransformerTemporalModel

    model = TransformerTemporalModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=32,
        num_layers=2,
        norm_num_groups=8,
    )
    return model, {
        "hidden_states": _randn(g, B * 2, 32, 4, 4),
        "num_frames": 2,
        "return_dict": False,
    }


@family(
    "tiny-dreamlite-transformer",
    "DreamLiteTransformer2DModel",
    timestep=None,
    note="the spatial transformer of DreamLite's UNet, run alone: no noise-level input",
)
def _dreamlite_transformer(g):
    from diffusers import DreamLiteTransformer2DModel

    model = DreamLiteTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=32,
        num_layers=2,
        norm_num_groups=8,
        cross_attention_dim=32,
    )
    return model, {
        "hidden_states": _randn(g, B, 32, 4, 4),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "return_dict": False,
    }


_UNET_2D = {
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


@family("tiny-unet-2d", "UNet2DModel", latents="sample")
def _unet_2d(g):
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
        **_UNET_2D,
    )
    return model, {"sample": _randn(g, B, 3, 8, 8), "timestep": _steps(g), "return_dict": False}


@family("tiny-unet-1d", "UNet1DModel", latents="sample")
def _unet_1d(g):
    from diffusers import UNet1DModel

    model = UNet1DModel(
        sample_size=64,
        in_channels=2,
        out_channels=2,
        extra_in_channels=16,  # the Fourier time features, concatenated to the sample
        time_embedding_dim=16,
        block_out_channels=(32, 32, 64),  # its 1-D attention has channels // 32 heads
        norm_num_groups=8,
    )
    return model, {"sample": _randn(g, B, 2, 64), "timestep": _steps(g), "return_dict": False}


@family("tiny-unet-3d", "UNet3DConditionModel", latents="sample")
def _unet_3d(g):
    from diffusers import UNet3DConditionModel

    model = UNet3DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        **_UNET_2D,
    )
    return model, {
        "sample": _video(g),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "return_dict": False,
    }


@family("tiny-i2vgen-xl", "I2VGenXLUNet", latents="sample")
def _i2vgen(g):
    from diffusers import I2VGenXLUNet

    model = I2VGenXLUNet(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        num_attention_heads=None,
        **_UNET_2D,
    )
    return model, {
        "sample": _video(g),
        "timestep": _steps(g),
        "fps": torch.full((B,), 16),
        "image_latents": _video(g),
        "image_embeddings": _randn(g, B, 32),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "return_dict": False,
    }


@family("tiny-unet-motion", "UNetMotionModel", latents="sample")
def _unet_motion(g):
    from diffusers import UNetMotionModel

    model = UNetMotionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        cross_attention_dim=32,
        num_attention_heads=2,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
        **_UNET_2D,
    )
    return model, {
        "sample": _video(g),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B * 2, 6, 32),  # one copy per frame, as AnimateDiff
        "return_dict": False,
    }


@family("tiny-svd", "UNetSpatioTemporalConditionModel", latents="sample")
def _svd(g):
    from diffusers import UNetSpatioTemporalConditionModel

    model = UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,  # noisy latents + the conditioning image's latents
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),  # its group norms have 32 groups
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
        layers_per_block=1,
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        num_frames=2,
    )
    return model, {
        "sample": _randn(g, B, 2, 8, 8, 8),  # [B, F, C, H, W]
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 1, 32),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * B),
        "return_dict": False,
    }


@family("tiny-kandinsky3-unet", "Kandinsky3UNet", latents="sample")
def _kandinsky3(g):
    from diffusers import Kandinsky3UNet

    model = Kandinsky3UNet(
        in_channels=4,
        time_embedding_dim=16,
        groups=8,
        attention_head_dim=8,
        layers_per_block=2,  # 1 mismatches the conditional group norms' widths
        block_out_channels=(16, 32),
        cross_attention_dim=16,
        encoder_hid_dim=32,
    )
    return model, {
        "sample": _randn(g, B, 4, 8, 8),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "encoder_attention_mask": torch.ones(B, 6, dtype=torch.long),
        "return_dict": False,
    }


@family("tiny-dreamlite-unet", "DreamLiteUNetModel", latents="sample")
def _dreamlite_unet(g):
    from diffusers import DreamLiteUNetModel

    model = DreamLiteUNetModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "DreamLiteCrossAttnNoSelfAttnDownBlock2D",
            "DreamLiteCrossAttnDownBlock2D",
        ),
        mid_block_type="DreamLiteUNetMidBlock2DCrossAttn",
        up_block_types=("DreamLiteCrossAttnUpBlock2D", "DreamLiteUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        **_UNET_2D,
    )
    return model, {
        "sample": _randn(g, B, 4, 8, 8),
        "timestep": _steps(g),
        "encoder_hidden_states": _randn(g, B, 6, 32),
        "return_dict": False,
    }


@family(
    "tiny-stable-cascade",
    "StableCascadeUNet",
    timestep="timestep_ratio",
    timestep_scale=1.0,
    latents="sample",
)
def _stable_cascade(g):
    from diffusers import StableCascadeUNet

    model = StableCascadeUNet(
        in_channels=4,
        out_channels=4,
        timestep_ratio_embedding_dim=16,
        patch_size=1,
        conditioning_dim=32,
        block_out_channels=(32, 32),
        num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        clip_text_pooled_in_channels=16,
        clip_seq=2,
        dropout=(0.0, 0.0),
        self_attn=True,
        timestep_conditioning_type=("sca",),
    )
    return model, {
        "sample": _randn(g, B, 4, 8, 8),
        "timestep_ratio": _steps(g, scale=1.0),
        "clip_text_pooled": _randn(g, B, 1, 16),
        "return_dict": False,
    }
