"""Train `ref-wan`, diffopt's video reference, on moving digits with flow matching.

A diffusers `WanTransformer3DModel` (6 blocks, hidden 128 = 2 heads of 64, 3D rotary positions,
patches of 1 × 2 × 2) over clips of 8 frames of 16×16 made by `ref_wan.moving_digits` (a digit
that drifts, turns and changes size between two random poses; fresh motion every batch),
conditioned on a class through 4 learned text tokens (`encoder_hidden_states`). The loop is
`diffopt.evaluation.training`'s (flow matching, logit-normal σ, 10 % null labels, warm-up and
cosine, EMA weights); the shipped weights are stored in fp16.

    python benchmarks/train_ref_wan.py       # writes diffopt/evaluation/assets/ref-wan/
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffopt.evaluation import metrics, ref_wan, training, zoo
from diffopt.evaluation.data import NUM_CLASSES, digits

OUT = Path(__file__).parent.parent / "diffopt" / "evaluation" / "assets" / ref_wan.NAME
IMAGES, LABELS = digits("all")


def build() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = ref_wan.architecture()
    return model, ref_wan.class_embeddings(model)


def draw(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.randint(0, len(IMAGES), (batch,), generator=gen)
    return ref_wan.moving_digits(IMAGES[index], gen), LABELS[index]


def velocity(
    model: torch.nn.Module, xt: torch.Tensor, sigma: torch.Tensor, condition: dict
) -> torch.Tensor:
    return model(hidden_states=xt, timestep=sigma * 1000, **condition, return_dict=False)[0]


def evaluate(folder: Path, count: int, guidances: list[float]) -> None:
    """Per-frame class accuracy, temporal consistency and video ref-FID of `count` clips at the
    default schedule, on seeds from 100,000, against as many real clips."""
    steps = zoo.SHIPPED[ref_wan.NAME][1]
    reference = ref_wan.load(guidances[0], steps, folder)
    labels = torch.arange(count) % NUM_CLASSES
    real, _ = ref_wan.clips(max(count, 300), seed=1)
    for guidance in guidances:
        start = time.time()
        samples = reference.sample(labels, range(100_000, 100_000 + count), guidance=guidance)
        print(
            f"{folder}: {count} clips, {steps} steps, guidance {guidance}: "
            f"frame accuracy {metrics.frame_accuracy(samples, labels):.3f}, "
            f"temporal consistency {metrics.temporal_consistency(samples, real):.3f}, "
            f"video ref-FID {metrics.ref_fid(samples, real):.2f} ({time.time() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    training.command_line(
        __doc__,
        out=OUT,
        build=build,
        draw=draw,
        velocity=velocity,
        evaluate=evaluate,
        default_guidance=zoo.SHIPPED[ref_wan.NAME][0],
        steps=1400,
        batch=16,
    )
