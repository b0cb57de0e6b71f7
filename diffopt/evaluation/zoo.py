"""Built-in models and the ways a user names a model on the command line.

The tiny models are the five diffusers families at toy size, built in code with fixed seeds, so
tests and demos never download anything. `example_inputs` makes a call's keyword arguments for
any of these classes from the model's own config, which is also how a local diffusers folder
gets its inputs.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffopt.config import ConfigError

if TYPE_CHECKING:
    from diffopt.fewstep.unroll import UnrolledSampler

ExampleInputs = dict[str, Any] | tuple[Any, ...]


def _tiny_flux() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )


def _tiny_sd3() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
    )


def _tiny_dit() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )


def _tiny_pixart() -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=32,
        use_additional_conditions=False,
    )


def _tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )


ASSETS = Path(__file__).parent / "assets"


@dataclass
class Reference:
    """A denoiser and what it takes to use it: scheduler, inputs, class-conditioned sampling."""

    name: str
    model: torch.nn.Module
    scheduler: Any
    make_inputs: Callable[..., dict[str, Any]]
    """``make_inputs(batch=2, seed=0)``: keyword arguments of one denoiser call."""
    null_class: int
    guidance: float
    """Classifier-free guidance scale the model was tuned for."""
    steps: int | Sequence[float] = 50
    """Default schedule: a step count, or a few-step student's explicit sigmas."""

    def sample(
        self,
        labels: torch.Tensor,
        seeds: Sequence[int],
        *,
        denoiser: Callable[..., Any] | None = None,
        steps: int | Sequence[float] | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Images [len(labels), C, H, W] in about [-1, 1], one seed per image.

        `denoiser` defaults to the model; pass an optimized one to compare on the same seeds.
        """
        latents = self.latents(labels, seeds, denoiser=denoiser, steps=steps, guidance=guidance)
        return self.images(latents)

    def latents(
        self,
        labels: torch.Tensor,
        seeds: Sequence[int] | None = None,
        *,
        noise: torch.Tensor | None = None,
        denoiser: Callable[..., Any] | None = None,
        steps: int | Sequence[float] | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """`sample`'s final latents before `images` (what a student distilled from this model
        learns to land on), from the initial latents `noise` (what ``noise(seeds)`` makes) or
        from those of `seeds`."""
        from diffopt.fewstep.sampler import sample

        if (seeds is None) == (noise is None):
            raise TypeError("latents() takes seeds or noise (one of them)")
        with torch.no_grad():
            cond = self.condition(labels)
            uncond = self.condition(torch.full_like(labels, self.null_class))
        return sample(
            self.calling(self.model if denoiser is None else denoiser),
            self.scheduler,
            self.noise(seeds) if noise is None else noise,
            cond,
            uncond,
            steps=steps or self.steps,
            guidance=self.guidance if guidance is None else guidance,
        )

    # what a model class changes about sampling (`ref_flux.FluxReference` overrides these)

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """The initial latents, one seed per image."""
        from diffopt.fewstep.sampler import initial_noise

        config = self.model.config
        return initial_noise((config.in_channels, config.sample_size, config.sample_size), seeds)

    def condition(self, labels: torch.Tensor) -> dict[str, Any]:
        """The denoiser's conditioning keywords for these class labels."""
        return {"class_labels": labels}

    def calling(self, denoiser: Callable[..., Any]) -> Callable[..., Any]:
        """`denoiser` in the sampler's calling convention."""
        return denoiser

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampler's final latents as images."""
        return latents

    def unroll(
        self, model: torch.nn.Module, steps: int | float | str, **options: Any
    ) -> UnrolledSampler:
        """`diffopt.unroll` of `model` (this reference's architecture: the model or a student
        of it) under this reference's scheduler, in this reference's calling convention; the
        sampler's conditioning is `unrolled_condition`."""
        from diffopt.fewstep.unroll import unroll

        return unroll(model, self.scheduler, steps, **options)

    def unrolled_condition(self, labels: torch.Tensor) -> dict[str, Any]:
        """`condition` as `unroll`'s sampler takes it: with `shared_condition`, which `calling`
        adds to every call of the loop."""
        return {**self.condition(labels), **self.shared_condition()}

    def shared_condition(self) -> dict[str, Any]:
        """The denoiser's inputs without a batch axis, the same for every image (Flux's rotary
        ids): `diffopt.train_schedule`'s `shared`."""
        return {}

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """Write `model` (this reference's architecture) as a diffusers folder, which
        ``load(name, folder)`` reads back (`name`: the reference or student it holds)."""
        model.save_pretrained(folder, safe_serialization=True)


EMBEDDINGS_FILE = "class_embeddings.safetensors"
"""The class prompts of a trained reference, beside its diffusers transformer folder."""


def load_trained(
    model_class: type,
    folder: Path,
    embeddings_for: Callable[[torch.nn.Module], ClassEmbeddings],
    made_by: str | None = None,
) -> tuple[torch.nn.Module, ClassEmbeddings]:
    """A trained reference's transformer and class prompts from `folder` (fp16 on disk, fp32
    here, both frozen). The model is built from its config and its weights file rather than
    with ``from_pretrained``, which keeps Wan's fp32 modules only through accelerate, not a
    dependency of diffopt; the folder still loads with ``from_pretrained`` where accelerate is.
    `made_by`: the command that writes the folder, for the error when it is missing (default:
    ``benchmarks/train_<folder name>.py``)."""
    if not (folder / "config.json").exists():
        script = made_by or f"benchmarks/train_{folder.name.replace('-', '_')}.py"
        raise FileNotFoundError(f"{folder} is missing; make it with {script}")
    model = model_class.from_config(model_class.load_config(folder))
    embeddings = embeddings_for(model)
    load_weights(model, embeddings, folder)
    return model.eval().requires_grad_(False), embeddings.eval().requires_grad_(False)


def load_weights(model: torch.nn.Module, embeddings: torch.nn.Module, folder: Path) -> None:
    """Load a trained reference's weights and class prompts from `folder` (fp16 on disk) into
    `model` and `embeddings` in fp32; the architectures must match the folder's."""
    from safetensors.torch import load_file

    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    state = load_file(folder / EMBEDDINGS_FILE)
    embeddings.load_state_dict({k: v.float() for k, v in state.items()})


class ClassEmbeddings(torch.nn.Module):
    """A class label's "prompt": `tokens` learned text tokens (``encoder_hidden_states``) and,
    for models that take one, a learned pooled vector (``pooled_projections``); one row per
    class plus the null class (the last row) for classifier-free guidance."""

    def __init__(self, tokens: int, token_dim: int, pooled_dim: int | None = None) -> None:
        from diffopt.evaluation.data import NUM_CLASSES

        super().__init__()
        self.tokens = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, tokens, token_dim))
        self.pooled = None
        if pooled_dim is not None:
            self.pooled = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, pooled_dim))

    def forward(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` [N, tokens, token_dim] (and ``pooled_projections``)."""
        condition = {"encoder_hidden_states": self.tokens[labels]}
        if self.pooled is not None:
            condition["pooled_projections"] = self.pooled[labels]
        return condition


SHIPPED = {
    "ref-dit": (1.5, 50),  # guidance 1.0 is already 99 % accurate; 1.5 keeps the batch of two
    "ref-dit-1step": (1.0, [1.0]),  # students are guidance-distilled: one call per step
    "ref-dit-2step": (1.0, [1.0, 0.5]),
    "ref-flux": (2.0, 28),  # Flux, `ref_flux`: 100 % accurate at 28 steps (100 images)
    "ref-flux-1step": (1.0, [1.0]),  # `distill_ref_dit.py --model ref-flux` (the docstring's
    # hour-scale commands), shipped with its jointly trained ``ref-flux-1.5step-affine``
    "ref-flux-2step": (1.0, [1.0, 0.5]),
    "ref-wan": (4.0, 50),  # Wan, `ref_wan`: clips of 8 frames, 98 % of frames right (40 clips)
}
"""Trained models in `ASSETS`: name → (guidance, default schedule)."""
TRAINED = ("ref-flux", "ref-wan")
"""The references with a module of their own (`ref_flux`, `ref_wan`), each with a ``load``."""


def load(name: str, folder: Path | None = None) -> Reference:
    """A reference model by name: ``"ref-dit"`` (trained on digits, ships with diffopt), its
    few-step students ``"ref-dit-1step"`` and ``"ref-dit-2step"`` (distilled from it, also
    shipped), ``"ref-flux"`` (a Flux transformer trained on digits, shipped: `ref_flux`), its
    students ``"ref-flux-1step"`` and ``"ref-flux-2step"`` (shipped; ``benchmarks/distill_ref_dit.py
    --model ref-flux`` writes them), ``"ref-wan"`` (a Wan video transformer trained on moving
    digits, shipped: `ref_wan`) or ``"dit-s2"`` (DiT-S/2 size, random weights, for timing only).

    `folder`: read a trained model's weights from there instead of ``ASSETS / name``
    (``"dit-s2"`` has no weights to read: a ConfigError)."""
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    family = next((f for f in TRAINED if name in (f, f"{f}-1step", f"{f}-2step")), None)
    if family is not None and name in SHIPPED:  # a reference trained by `training`, or its student
        module = importlib.import_module(f"diffopt.evaluation.{family.replace('-', '_')}")
        if name == family:
            return module.load(*SHIPPED[name], folder)
        return module.load(*SHIPPED[name], folder, name=name)
    if name in SHIPPED:
        folder = folder or ASSETS / name
        if not (folder / "config.json").exists():
            script = "train_ref_dit.py" if name == "ref-dit" else "distill_ref_dit.py"
            raise FileNotFoundError(f"{folder} is missing; make it with benchmarks/{script}")
        model = DiTTransformer2DModel.from_pretrained(
            folder, local_files_only=True, low_cpu_mem_usage=False
        )
        guidance, steps = SHIPPED[name]
    elif name == "dit-s2":
        if folder is not None:
            raise ConfigError(
                f"dit-s2 has no weights to read (seeded random ones, for timing): drop "
                f"folder={str(folder)!r}; a folder is for the trained models {sorted(SHIPPED)}"
            )
        torch.manual_seed(0)
        model, guidance, steps = _dit_s2(), 1.5, 50
    else:
        raise KeyError(f"unknown reference model {name!r}; choose one of {[*SHIPPED, 'dit-s2']}")
    model = model.eval().requires_grad_(False)

    def make_inputs(batch: int = 2, seed: int = 0) -> dict[str, Any]:
        return example_inputs(model, batch=batch, seed=seed)

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    null_class = model.config.num_embeds_ada_norm  # DiT's label table has one extra, null, row
    return Reference(name, model, scheduler, make_inputs, null_class, guidance, steps)


def _dit_s2() -> torch.nn.Module:
    """DiT-S/2 size: 12 blocks, hidden 384, 256 tokens (32×32×4 latents, 2×2 patches)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        num_layers=12,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )


def ref_dit_architecture() -> torch.nn.Module:
    """The untrained `ref-dit`: DiT with 8 blocks, hidden 64, 64 tokens, 10 classes + null."""
    from diffusers import DiTTransformer2DModel

    from diffopt.evaluation.data import IMAGE_SIZE, NUM_CLASSES

    return DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=1,
        out_channels=1,
        num_layers=8,
        sample_size=IMAGE_SIZE,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
    )


TINY_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "tiny-flux": _tiny_flux,
    "tiny-sd3": _tiny_sd3,
    "tiny-dit": _tiny_dit,
    "tiny-pixart": _tiny_pixart,
    "tiny-unet": _tiny_unet,
}


def build(
    name: str, *, batch: int = 2, seed: int = 0, size: tuple[int, int] | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A built-in model (eval mode, seeded weights) and example inputs for it (`example_inputs`).

    The other ``tiny-*`` names are `families` (every diffusers denoiser class): those come with
    their own inputs (batch 2), so `batch` and `size` do not apply to them."""
    if name not in TINY_MODELS:
        from diffopt.evaluation import families

        if name not in families.FAMILIES:
            known = sorted({*TINY_MODELS, *families.FAMILIES})
            raise KeyError(f"unknown built-in model {name!r}; choose one of {known}")
        if size is not None:
            raise ValueError(f"{name} has fixed example inputs; size= is for {sorted(TINY_MODELS)}")
        return families.build(name, seed=seed)
    torch.manual_seed(seed)
    model = TINY_MODELS[name]().eval()
    return model, example_inputs(model, batch=batch, seed=seed, size=size)


def example_inputs(
    model: torch.nn.Module, *, batch: int = 2, seed: int = 0, size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Keyword arguments for one denoiser call, shaped from the model's config.

    `size`: the latents' (height, width), in latent pixels (Flux: in packed tokens); the config's
    sample size by default."""
    kind = type(model).__name__
    if kind not in _INPUTS:
        raise TypeError(
            f"no example inputs known for {kind}; known classes: {sorted(_INPUTS)}. "
            "Pass a 'package.module:factory' that returns (model, example_inputs) instead."
        )
    gen = torch.Generator().manual_seed(seed)
    return _INPUTS[kind](model.config, batch, gen, size)


Size = tuple[int, int] | None


def _latents(cfg: Any, batch: int, gen: torch.Generator, size: Size) -> torch.Tensor:
    height, width = size or (cfg.sample_size, cfg.sample_size)
    return torch.randn(batch, cfg.in_channels, height, width, generator=gen)


def _timestep(batch: int, gen: torch.Generator, scale: float = 1000.0) -> torch.Tensor:
    return (torch.rand(batch, generator=gen) * scale).round()


def _flux_inputs(cfg: Any, batch: int, gen: torch.Generator, size: Size) -> dict[str, Any]:
    (height, width), text = size or (4, 4), 8
    ids = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(height * width, 1), ids.reshape(-1, 2).float()], dim=1)
    return {
        "hidden_states": torch.randn(batch, height * width, cfg.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
        "timestep": torch.rand(batch, generator=gen),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def _sd3_inputs(cfg: Any, batch: int, gen: torch.Generator, size: Size) -> dict[str, Any]:
    return {
        "hidden_states": _latents(cfg, batch, gen, size),
        "encoder_hidden_states": torch.randn(batch, 6, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
        "timestep": _timestep(batch, gen),
        "return_dict": False,
    }


def _dit_inputs(cfg: Any, batch: int, gen: torch.Generator, size: Size) -> dict[str, Any]:
    return {
        "hidden_states": _latents(cfg, batch, gen, size),
        "timestep": _timestep(batch, gen),
        "class_labels": torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=gen),
        "return_dict": False,
    }


def _pixart_inputs(cfg: Any, batch: int, gen: torch.Generator, size: Size) -> dict[str, Any]:
    inputs = {
        "hidden_states": _latents(cfg, batch, gen, size),
        "encoder_hidden_states": torch.randn(batch, 6, cfg.caption_channels, generator=gen),
        "timestep": _timestep(batch, gen),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }
    if cfg.use_additional_conditions:
        size = float(cfg.sample_size * 8)
        inputs["added_cond_kwargs"] = {
            "resolution": torch.tensor([[size, size]] * batch),
            "aspect_ratio": torch.ones(batch, 1),
        }
    return inputs


def _unet_inputs(cfg: Any, batch: int, gen: torch.Generator, size: Size) -> dict[str, Any]:
    return {
        "sample": _latents(cfg, batch, gen, size),
        "timestep": _timestep(batch, gen),
        "encoder_hidden_states": torch.randn(batch, 6, cfg.cross_attention_dim, generator=gen),
        "return_dict": False,
    }


_INPUTS: dict[str, Callable[[Any, int, torch.Generator, Size], dict[str, Any]]] = {
    "FluxTransformer2DModel": _flux_inputs,
    "SD3Transformer2DModel": _sd3_inputs,
    "DiTTransformer2DModel": _dit_inputs,
    "PixArtTransformer2DModel": _pixart_inputs,
    "UNet2DConditionModel": _unet_inputs,
}


def resolve(spec: str) -> tuple[torch.nn.Module, ExampleInputs]:
    """A model named on the command line: a built-in name, a local diffusers model folder
    (loaded with ``from_pretrained``, never downloaded), or ``package.module:factory`` returning
    ``(model, example_inputs)``."""
    from diffopt.evaluation.families import FAMILIES  # every diffusers denoiser class, tiny

    if spec in TINY_MODELS or spec in FAMILIES:
        return build(spec)
    if spec in SHIPPED or spec == "dit-s2":
        reference = load(spec)
        return reference.model, reference.make_inputs()
    path = Path(spec)
    if path.is_dir():
        return _from_folder(path)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules next to the user
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load factory {spec!r}: {e}") from e
        model, inputs = factory()
        return model.eval(), inputs
    raise ValueError(
        f"{spec!r} is not a built-in model "
        f"({', '.join([*SHIPPED, 'dit-s2', *sorted(TINY_MODELS)])}), "
        "a local diffusers model folder, or a 'package.module:factory'"
    )


def _from_folder(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    import diffusers

    config_file = path / "config.json"
    if not config_file.exists():
        raise ValueError(f"{path} has no config.json; is it a diffusers model folder?")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    cls = getattr(diffusers, class_name or "", None)
    if cls is None:
        raise ValueError(f"{config_file} names class {class_name!r}, which diffusers lacks")
    model = cls.from_pretrained(path, local_files_only=True).eval()
    return model, example_inputs(model)
