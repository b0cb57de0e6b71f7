"""`ref-flux`: a trained diffusers `FluxTransformer2DModel` on the digits, the MMDiT reference.

The model sees what FLUX.1 sees, at toy size: a 1-channel 32×32 image packed into 2×2 patches
(256 image tokens of 4 channels, the packing of `FluxPipeline`), rotary position ids for image and
text tokens, and a class's "prompt" as 4 learned text tokens (`encoder_hidden_states`) plus a
learned pooled vector (`pooled_projections`). Blocks: 1 dual-stream and 7 single-stream, hidden 256
(4 heads of 64). Class 10 is the null prompt for classifier-free guidance. The class embeddings
ship next to the transformer (``class_embeddings.safetensors``), so the transformer folder itself
loads with ``FluxTransformer2DModel.from_pretrained`` and the embeddings can be handed to
`FluxPipeline` as ``prompt_embeds`` / ``pooled_prompt_embeds``.

Sampling reuses `diffopt.fewstep.sampler.sample`; `flux_call` adapts a Flux denoiser to its calling
convention (Flux takes σ ∈ [0, 1] as its timestep and needs the ids).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from diffopt.evaluation.data import NUM_CLASSES
from diffopt.evaluation.zoo import ASSETS, ClassEmbeddings, Reference, load_trained

if TYPE_CHECKING:
    from diffopt.fewstep.unroll import UnrolledSampler

NAME = "ref-flux"
IMAGE_SIZE = 32
"""Side of the images, in pixels; 2×2 packing makes (32 / 2)² = 256 image tokens."""
TEXT_TOKENS = 4


def architecture() -> nn.Module:
    """The untrained `ref-flux` transformer (fp32): 1 + 7 blocks, hidden 256, 4 channels a token."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=7,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=256,
        pooled_projection_dim=128,
        guidance_embeds=False,
        axes_dims_rope=(16, 24, 24),
    )


def class_embeddings(model: nn.Module) -> ClassEmbeddings:
    """Untrained class prompts shaped for `model`: 4 text tokens and a pooled vector."""
    config = model.config
    return ClassEmbeddings(TEXT_TOKENS, config.joint_attention_dim, config.pooled_projection_dim)


def pack(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] → [N, H/2 · W/2, 4C] tokens, as `FluxPipeline._pack_latents`."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of `pack` for square images: [N, (size/2)², 4C] → [N, C, size, size]."""
    n, _, d = tokens.shape
    c, side = d // 4, size // 2
    x = tokens.reshape(n, side, side, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, size, size)


def image_ids(size: int = IMAGE_SIZE) -> torch.Tensor:
    """Rotary ids of the packed image tokens, [(size/2)², 3]: (0, row, column), as Flux."""
    side = size // 2
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
    return torch.cat([torch.zeros(side * side, 1), grid.reshape(-1, 2).float()], dim=1)


def text_ids(tokens: int = TEXT_TOKENS) -> torch.Tensor:
    """Rotary ids of the text tokens: zeros, as Flux."""
    return torch.zeros(tokens, 3)


def digits32(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """`data.digits` upsampled (bilinear) to 32×32: [N, 1, 32, 32] in [-1, 1], labels [N]."""
    from diffopt.evaluation.data import digits

    images, labels = digits(split)
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return images.clamp(-1, 1), labels


def flux_call(denoiser: Callable[..., Any]) -> Callable[..., Any]:
    """`denoiser` (a Flux transformer, compiled or not) in the sampler's calling convention: the
    sampler's timestep (σ · 1000) becomes Flux's σ, and the image and text ids are added."""
    img, txt = image_ids(), text_ids()

    def call(*, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> Any:
        return denoiser(
            hidden_states=hidden_states,
            timestep=timestep / 1000,
            img_ids=img,
            txt_ids=txt,
            **kwargs,
        )

    return call


@dataclass
class FluxReference(Reference):
    """`Reference` for a Flux transformer: labels become prompt embeddings, latents are packed."""

    embeddings: ClassEmbeddings = field(default_factory=lambda: class_embeddings(architecture()))

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        from diffopt.fewstep.sampler import initial_noise

        return pack(initial_noise((1, IMAGE_SIZE, IMAGE_SIZE), seeds))

    def condition(self, labels: torch.Tensor) -> dict[str, Any]:
        return self.embeddings(labels)

    def calling(self, denoiser: Callable[..., Any]) -> Callable[..., Any]:
        return flux_call(denoiser)

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [N, 1, 32, 32] from packed latents."""
        return unpack(latents)

    def unroll(self, model: nn.Module, steps: int | float | str, **options: Any) -> UnrolledSampler:
        """`diffopt.unroll` in `flux_call`'s convention (Flux takes σ: timesteps × 1e-3). A
        fractional step runs the first blocks of the single-stream stack, 7 of the 8 blocks:
        the dual-stream stack is one block, so a partial step there would still run all seven
        single-stream blocks; on the single-stream tail a step of k of 7 costs about
        (1 + k) / 8 of a full one, the granularity of ref-dit's 8 blocks, and the image stream
        its compensation maps is all the model's output reads after that stack."""
        # the stack pinned, though it is also unroll's default for Flux (the single_* stack run
        # last): deliberate, so the students' schedules (JOINT_FRACTIONS in distill_ref_dit.py,
        # their compensation files) do not move if that default does
        options = {"timestep_scale": 1e-3, "blocks": "single_transformer_blocks", **options}
        return super().unroll(model, steps, **options)

    def shared_condition(self) -> dict[str, Any]:
        """The rotary ids `flux_call` adds to every call."""
        return {"img_ids": image_ids(), "txt_ids": text_ids()}

    def save(self, model: nn.Module, folder: Path) -> None:
        """`model` (a student of ref-flux) in fp16 as ref-flux ships, with these class prompts
        beside it: `load` reads the folder back."""
        from diffopt.evaluation.training import save_fp16

        save_fp16(model, self.embeddings, folder)

    def pipeline(self, transformer: nn.Module | None = None) -> Any:
        """A diffusers `FluxPipeline` around `transformer` (default: the model) with no VAE and no
        text encoders: call it with `pipeline_inputs` (prompt embeddings, ``output_type="latent"``)
        and `images` turns its packed latents into digits. It calls the cond and uncond branches
        one after the other (`true_cfg_scale`), as FLUX.1 pipelines do."""
        from diffusers import FluxPipeline

        none = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        return FluxPipeline(
            scheduler=copy.deepcopy(self.scheduler),
            transformer=self.model if transformer is None else transformer,
            **none,
        )

    def pipeline_inputs(self, labels: torch.Tensor, steps: int, seed: int) -> dict[str, Any]:
        """`FluxPipeline` keywords for a batch of classes: the class prompts and null prompts as
        embeddings, the shipped guidance, 32×32 latents (the pipeline assumes an 8× VAE: 256 px)."""
        cond = self.condition(labels)
        uncond = self.condition(torch.full_like(labels, self.null_class))
        return {
            "prompt_embeds": cond["encoder_hidden_states"],
            "pooled_prompt_embeds": cond["pooled_projections"],
            "negative_prompt_embeds": uncond["encoder_hidden_states"],
            "negative_pooled_prompt_embeds": uncond["pooled_projections"],
            "true_cfg_scale": self.guidance,
            "height": IMAGE_SIZE * 8,
            "width": IMAGE_SIZE * 8,
            "num_inference_steps": steps,
            "generator": torch.Generator().manual_seed(seed),
            "output_type": "latent",
        }


def load(
    guidance: float,
    steps: int | Sequence[float],
    folder: Path | None = None,
    *,
    name: str = NAME,
) -> Reference:
    """The shipped `ref-flux` (fp32 in memory, fp16 on disk), or with `name` one of its
    students (``ref-flux-1step``, ``ref-flux-2step``: shipped; ``benchmarks/distill_ref_dit.py
    --model ref-flux`` writes them) from ``folder or ASSETS / name``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    made_by = None if name == NAME else "python benchmarks/distill_ref_dit.py --model ref-flux"
    model, embeddings = load_trained(
        FluxTransformer2DModel, folder or ASSETS / name, class_embeddings, made_by
    )
    config = model.config

    def make_inputs(batch: int = 2, seed: int = 0) -> dict[str, Any]:
        """One denoiser call as `FluxPipeline` makes it: packed latents, σ, prompt, ids."""
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
        tokens = (IMAGE_SIZE // 2) ** 2
        return {
            "hidden_states": torch.randn(batch, tokens, config.in_channels, generator=gen),
            "timestep": torch.rand(batch, generator=gen),
            **embeddings(labels),
            "img_ids": image_ids(),
            "txt_ids": text_ids(),
            "return_dict": False,
        }

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return FluxReference(
        name, model, scheduler, make_inputs, NUM_CLASSES, guidance, steps, embeddings=embeddings
    )
