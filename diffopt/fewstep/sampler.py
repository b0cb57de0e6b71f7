"""Flow-matching sampling with classifier-free guidance: the loop every optimization is judged in.

One denoiser call per step on the conditional and unconditional batch together (the usual CFG
batching), Euler steps from diffusers' `FlowMatchEulerDiscreteScheduler`. Each sample's starting
noise comes from its own seed, so any subset of a batch reproduces exactly.
"""

from __future__ import annotations

import copy
import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

Denoiser = Callable[..., Any]


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """One [C, H, W] noise tensor per seed, stacked: [len(seeds), *shape]."""
    return torch.stack(
        [torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def sample(
    denoiser: Denoiser,
    scheduler: Any,
    noise: torch.Tensor,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None = None,
    *,
    steps: int | Sequence[float] = 50,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Integrate from `noise` to images.

    `steps` is a step count, or the explicit sigmas of a few-step schedule (``[1.0, 0.5]``).

    `denoiser(hidden_states=..., timestep=..., **cond, return_dict=False)[0]` must return the
    velocity. With `uncond` and `guidance` ≠ 1, each step runs cond and uncond as one batch and
    mixes them as uncond + guidance · (cond − uncond). The scheduler is copied, never mutated.
    """
    scheduler = copy.deepcopy(scheduler)
    set_schedule(scheduler, steps)
    guided = uncond is not None and guidance != 1.0
    inputs = guidance_batch(cond, uncond) if guided else cond
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            batch = torch.cat([x, x]) if guided else x
            timestep = t.expand(batch.shape[0]).to(batch.dtype)
            out = denoiser(hidden_states=batch, timestep=timestep, **inputs, return_dict=False)
            velocity = out[0][:, : x.shape[1]]  # learned-sigma DiTs append variance channels
            if guided:
                velocity = mix_guidance(velocity, guidance)
            x = scheduler.step(velocity, t, x, return_dict=False)[0]
    return x


def guidance_batch(
    cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Conditional and unconditional inputs as one batch of two, conditional first."""
    return {k: torch.cat([cond[k], uncond[k]]) for k in cond}


def mix_guidance(output: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance on a batch of two: uncond + guidance · (cond − uncond)."""
    v_cond, v_uncond = output.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


def set_schedule(scheduler: Any, steps: int | Sequence[float]) -> None:
    """`scheduler.set_timesteps` from a step count or from explicit sigmas."""
    if isinstance(steps, numbers.Integral):
        scheduler.set_timesteps(int(steps))
    elif "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(sigmas=[float(v) for v in steps])
    else:
        raise ValueError(
            f"{type(scheduler).__name__} takes a step count, not explicit sigmas; use a scheduler "
            "that accepts sigmas (FlowMatchEulerDiscrete, EulerDiscrete) or pass a step count"
        )
