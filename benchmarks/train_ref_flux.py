"""Train `ref-flux`, diffopt's MMDiT reference, on scikit-learn's digits with flow matching.

A diffusers `FluxTransformer2DModel` (1 dual-stream + 7 single-stream blocks, hidden 256 = 4 heads
of 64, rotary ids for image and text tokens, no guidance embedding) over 32×32 digits packed in
2×2 patches (256 tokens of 4 channels), conditioned on a class through 4 learned text tokens
(`encoder_hidden_states`) and a learned pooled vector (`pooled_projections`). The loop is
`diffopt.evaluation.training`'s (flow matching, logit-normal σ, 10 % null labels, adaLN-Zero,
warm-up and cosine, EMA weights); the shipped weights are stored in fp16 (18.5 MiB).
Seeded; 101 minutes on one thread of the 2-core sandbox while other jobs shared its cores (760
steps of batch 24, 2.7 images/s, loss 0.071 over the last 100 steps); evaluation runs after.

    python benchmarks/train_ref_flux.py      # writes diffopt/evaluation/assets/ref-flux/
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffopt.evaluation import metrics, ref_flux, training, zoo
from diffopt.evaluation.data import NUM_CLASSES, digits

OUT = Path(__file__).parent.parent / "diffopt" / "evaluation" / "assets" / ref_flux.NAME
IMAGES, LABELS = ref_flux.digits32("all")


def build() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = ref_flux.architecture()
    return model, ref_flux.class_embeddings(model)


def draw(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.randint(0, len(IMAGES), (batch,), generator=gen)
    return ref_flux.pack(IMAGES[index]), LABELS[index]


def velocity(
    model: torch.nn.Module, xt: torch.Tensor, sigma: torch.Tensor, condition: dict
) -> torch.Tensor:
    return model(
        hidden_states=xt,
        timestep=sigma,  # Flux takes σ in [0, 1] and scales it by 1000 itself
        **condition,
        img_ids=ref_flux.image_ids(),
        txt_ids=ref_flux.text_ids(),
        return_dict=False,
    )[0]


def evaluate(folder: Path, images: int, guidances: list[float]) -> None:
    """Class accuracy and ref-FID of `images` samples at the default schedule, on seeds from
    100,000 (training draws its noise from one generator; sampling seeds are per image)."""
    steps = zoo.SHIPPED[ref_flux.NAME][1]
    reference = ref_flux.load(guidances[0], steps, folder)
    labels, real = torch.arange(images) % NUM_CLASSES, digits("all")[0]
    for guidance in guidances:
        start = time.time()
        samples = reference.sample(labels, range(100_000, 100_000 + images), guidance=guidance)
        print(
            f"{folder}: {images} images, {steps} steps, guidance {guidance}: "
            f"accuracy {metrics.class_accuracy(samples, labels):.3f}, "
            f"ref-FID {metrics.ref_fid(samples, real):.2f} ({time.time() - start:.0f} s)",
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
        default_guidance=zoo.SHIPPED[ref_flux.NAME][0],
        steps=760,
        batch=24,
    )
