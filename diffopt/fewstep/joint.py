"""`diffopt.train_schedule`: train a fractional schedule end to end, its partial steps inside.

A compensation fit after the fact (`fit_compensation`) corrects the reused residual in
isolation; the student never saw its own partial step. 1.x-Distill trains the student with the
block-cached step in the loop and the compensation learned jointly with it. The unrolled
sampler is one differentiable module, so that is plain gradient descent on it: from teacher
pairs (noise, conditioning → the teacher's final latents), the loss is the squared distance of
the sampler's final latents to the teacher's, and the gradient reaches the student's weights
through every step, the partial one included, and each partial step's compensation. A feature
term (``features=``: a frozen network, e.g. the classifier behind ref-FID) adds the distance of
the sampler's final latents to the teacher's in that network's feature space, where a squared
distance in latents weighs every pixel alike.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm import trange

from diffopt.config import ConfigError

if TYPE_CHECKING:
    from .sampler import Conditioning
    from .unroll import UnrolledSampler


def train_schedule(
    sampler: UnrolledSampler,
    latents: torch.Tensor,
    cond: Conditioning,
    targets: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-4,
    lr_schedule: Literal["constant", "cosine"] = "constant",
    batch: int = 64,
    seed: int = 0,
    train_denoiser: bool = True,
    ema: float = 0.99,
    progress: bool = True,
    shared: Conditioning | None = None,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    feature_weight: float = 1.0,
) -> list[float]:
    """Train `sampler` so that ``sampler(latents[i], cond[i])`` lands on ``targets[i]``.

    `latents` [N, ...] are the starting noises, `cond` the denoiser's conditioning with the
    same N first (nested as `UnrolledSampler.forward` takes it), `targets` the teacher's final
    latents from the same noises. `shared`: conditioning without a batch axis, passed whole
    with every batch (Flux's ``img_ids`` and ``txt_ids``: inside `cond`, a tensor whose leading
    size happened to equal N would be indexed as if batched). The compensation of every partial
    step trains, and with `train_denoiser` the student's weights too (AdamW, gradients clipped
    to norm 1; `lr_schedule` ``"constant"`` or ``"cosine"``, annealed to zero over `steps`); at
    the end both hold the exponential moving average (`ema`) of the trained values.
    `features`: a frozen map of final latents to features (ref-flux: the digits classifier's
    ``features`` of ``reference.images(latents)``); the loss then adds `feature_weight` times
    the mean squared distance between the sampler's features and the targets'.
    Guidance-distilled students only: no unconditional batch. Returns the loss of each step.
    """
    count = latents.shape[0]
    if targets.shape != latents.shape:
        raise ConfigError(
            f"targets {tuple(targets.shape)} must be the final latents of each starting noise "
            f"{tuple(latents.shape)}"
        )
    if lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', not {lr_schedule!r}")
    if features is not None and not feature_weight > 0:
        raise ConfigError(f"feature_weight must be positive with features, not {feature_weight}")
    if not sampler.compensation and not train_denoiser:
        raise ConfigError("nothing to train: no partial step and train_denoiser=False")
    trained = list(sampler.compensation.parameters())
    if train_denoiser:
        trained += list(sampler.denoiser.parameters())
    for p in trained:
        p.requires_grad_(True)
    average = [p.detach().clone() for p in trained]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    annealing = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        if lr_schedule == "cosine"
        else None
    )
    gen = torch.Generator().manual_seed(seed)
    losses = []
    # eval mode on purpose: no dropout (a DiT's class embedder would drop labels in train mode)
    bar = trange(steps, desc="train schedule", disable=not progress)
    try:
        for step in bar:
            index = torch.randint(0, count, (min(batch, count),), generator=gen)
            out = sampler(latents[index], {**_take(cond, index, count), **(shared or {})})
            loss = (out - targets[index]).pow(2).mean()
            if features is not None:
                with torch.no_grad():
                    goal = features(targets[index])
                loss = loss + feature_weight * (features(out) - goal).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            if annealing is not None:
                annealing.step()
            decay = min(ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for a, p in zip(average, trained, strict=True):
                    a.lerp_(p, 1 - decay)
            losses.append(loss.item())
            if step % 25 == 0:
                bar.set_postfix(loss=f"{loss.item():.5f}")
    finally:
        with torch.no_grad():
            for a, p in zip(average, trained, strict=True):
                p.copy_(a)
        for p in trained:
            p.requires_grad_(False)
    return losses


def _take(cond: Any, index: torch.Tensor, count: int) -> Any:
    """`cond` with every tensor whose first dimension is `count` indexed by `index`."""
    if isinstance(cond, torch.Tensor):
        return cond[index] if cond.dim() and cond.shape[0] == count else cond
    if isinstance(cond, Mapping):
        return {k: _take(v, index, count) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_take(v, index, count) for v in cond)
    return copy.copy(cond)
