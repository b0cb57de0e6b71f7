"""`ref-wan`: a trained diffusers `WanTransformer3DModel` on moving digits, the video reference.

Clips are 8 frames of 16×16 (1 channel, latents = pixels): a digit from `data.digits` that drifts,
turns and grows or shrinks along a straight path between two random poses (at most 1.5 px of
shift, 12° of rotation and a scale of 0.95–1.1 at either end, the range in which the shipped
digits classifier still reads 98 % of the frames). `moving_digits` makes them; they are generated,
never downloaded. Wan's 3D patches (1, 2, 2) make 8 · 8 · 8 = 512 tokens with 3D rotary
positions; the class's "prompt" is 4 learned text tokens through ``encoder_hidden_states`` (class
10 is the null prompt for classifier-free guidance). Blocks: 6, hidden 128 (2 heads of 64).

Wan takes the timestep in [0, 1000] as the sampler passes it, so sampling is `zoo.Reference`'s with
5D noise; the video metrics are `metrics.frame_accuracy`, `metrics.temporal_consistency` and
`metrics.ref_fid` on clips.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffopt.evaluation.data import IMAGE_SIZE, NUM_CLASSES
from diffopt.evaluation.zoo import ASSETS, ClassEmbeddings, Reference, load_trained

NAME = "ref-wan"
FRAMES = 8
TEXT_TOKENS = 4
MOTION = {"shift": 1.5, "degrees": 12.0, "scale": (0.95, 1.1)}
"""The poses a clip starts and ends in are drawn uniformly within these bounds."""


def architecture() -> nn.Module:
    """The untrained `ref-wan` transformer (fp32): 6 blocks, hidden 128, 512 tokens a clip."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=64,
        in_channels=1,
        out_channels=1,
        text_dim=128,
        freq_dim=64,
        ffn_dim=512,
        num_layers=6,
        rope_max_seq_len=64,
    )


def class_embeddings(model: nn.Module) -> ClassEmbeddings:
    """Untrained class prompts shaped for `model`: 4 text tokens, no pooled vector."""
    return ClassEmbeddings(TEXT_TOKENS, model.config.text_dim)


def moving_digits(
    images: torch.Tensor, generator: torch.Generator, frames: int = FRAMES
) -> torch.Tensor:
    """Clips [N, 1, frames, H, W] in [-1, 1]: each image moved along a straight path in pose
    space (shift, rotation, scale) between two poses drawn from `MOTION` with `generator`."""
    n, _, height, width = images.shape
    path = torch.linspace(0, 1, frames)

    def between(low: float, high: float) -> torch.Tensor:  # [n, frames]
        ends = torch.rand(n, 2, generator=generator) * (high - low) + low
        return ends[:, :1] + (ends[:, 1:] - ends[:, :1]) * path

    shift, degrees = MOTION["shift"], MOTION["degrees"]
    angle = between(-degrees, degrees) * math.pi / 180
    scale = between(*MOTION["scale"])
    tx = between(-shift, shift) * 2 / width  # affine_grid works in [-1, 1] coordinates
    ty = between(-shift, shift) * 2 / height
    # affine_grid maps output to input coordinates: the inverse pose, R(−a)(p − t) / s
    cos, sin = angle.cos() / scale, angle.sin() / scale
    row0 = torch.stack([cos, sin, -(cos * tx + sin * ty)], -1)
    row1 = torch.stack([-sin, cos, -(-sin * tx + cos * ty)], -1)
    theta = torch.stack([row0, row1], -2).reshape(n * frames, 2, 3)
    grid = F.affine_grid(theta, [n * frames, 1, height, width], align_corners=False)
    source = (images + 1).repeat_interleave(frames, 0)  # background 0 where the grid leaves it
    clips = F.grid_sample(source, grid, align_corners=False) - 1
    return clips.reshape(n, frames, 1, height, width).transpose(1, 2)


def clips(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` real clips (cycling through the digits) and their labels, seeded: the data side
    of the video metrics."""
    from diffopt.evaluation.data import digits

    images, labels = digits("all")
    index = torch.arange(count) % len(images)
    return moving_digits(images[index], torch.Generator().manual_seed(seed)), labels[index]


@dataclass
class WanReference(Reference):
    """`Reference` for a Wan transformer: labels become prompt tokens, latents are clips."""

    embeddings: ClassEmbeddings = field(default_factory=lambda: class_embeddings(architecture()))

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        from diffopt.fewstep.sampler import initial_noise

        return initial_noise((1, FRAMES, IMAGE_SIZE, IMAGE_SIZE), seeds)

    def condition(self, labels: torch.Tensor) -> dict[str, Any]:
        return self.embeddings(labels)

    def pipeline(self, transformer: nn.Module | None = None) -> Any:
        """A diffusers `WanPipeline` around `transformer` (default: the model) with no VAE and no
        text encoder: call it with `pipeline_inputs`; its ``.frames`` are latent clips
        [N, 1, 8, 16, 16], which are the images. Cond and uncond run one after the other."""
        from diffusers import WanPipeline

        return WanPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            scheduler=copy.deepcopy(self.scheduler),
            transformer=self.model if transformer is None else transformer,
        )

    def pipeline_inputs(self, labels: torch.Tensor, steps: int, seed: int) -> dict[str, Any]:
        """`WanPipeline` keywords for a batch of classes: class and null prompts as embeddings,
        the shipped guidance, 8 latent frames of 16×16 (the pipeline assumes Wan's VAE: 4×
        in time, 8× in space, so 29 frames of 128×128 pixels)."""
        uncond = torch.full_like(labels, self.null_class)
        return {
            "prompt_embeds": self.condition(labels)["encoder_hidden_states"],
            "negative_prompt_embeds": self.condition(uncond)["encoder_hidden_states"],
            "guidance_scale": self.guidance,
            "height": IMAGE_SIZE * 8,
            "width": IMAGE_SIZE * 8,
            "num_frames": (FRAMES - 1) * 4 + 1,
            "num_inference_steps": steps,
            "generator": torch.Generator().manual_seed(seed),
            "output_type": "latent",
        }


def load(guidance: float, steps: int | Sequence[float], folder: Path | None = None) -> Reference:
    """The shipped `ref-wan` (fp32 in memory, fp16 on disk)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    model, embeddings = load_trained(
        WanTransformer3DModel, folder or ASSETS / NAME, class_embeddings
    )

    def make_inputs(batch: int = 2, seed: int = 0) -> dict[str, Any]:
        """One denoiser call as `WanPipeline` makes it: a latent clip, timestep, prompt."""
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
        shape = (batch, 1, FRAMES, IMAGE_SIZE, IMAGE_SIZE)
        return {
            "hidden_states": torch.randn(shape, generator=gen),
            "timestep": (torch.rand(batch, generator=gen) * 1000).round(),
            **embeddings(labels),
            "return_dict": False,
        }

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return WanReference(
        NAME, model, scheduler, make_inputs, NUM_CLASSES, guidance, steps, embeddings=embeddings
    )
