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
from torch.utils import _pytree as pytree

from diffopt.config import ConfigError

Denoiser = Callable[..., Any]
Conditioning = dict[str, Any]
"""The denoiser's keyword inputs besides latents and timestep: tensors, or containers (dicts,
lists, tuples) of tensors and None, as pipelines pass them (PixArt's ``added_cond_kwargs``)."""


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """One [C, H, W] noise tensor per seed, stacked: [len(seeds), *shape]."""
    return torch.stack(
        [torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def sample(
    denoiser: Denoiser,
    scheduler: Any,
    noise: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None = None,
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
    inputs = guidance_batch(cond, uncond, noise.shape[0]) if guided else cond
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
    cond: Conditioning, uncond: Conditioning, batch: int | None = None
) -> Conditioning:
    """Conditional and unconditional inputs as one batch of two, conditional first.

    Conditioning may nest, as pipelines pass it (PixArt's ``added_cond_kwargs``, a dict of
    tensors or None): tensors at the same place in both are concatenated on the batch axis; any
    other leaf (None, a flag, a scale) must be equal in both and is passed once. With `batch`
    (the latents' batch size), a tensor whose leading size is not `batch` has no batch axis
    (Flux's ``img_ids`` and ``txt_ids``, one row per token): it is shared, must be equal in both
    (checked when running eagerly; a compiled graph cannot branch on values) and is passed once.
    Raises `ConfigError` naming the keys where the two differ.
    """

    def pair(path: tuple[Any, ...], c: Any, u: Any) -> Any:
        where = pytree.keystr(path)
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            if batch is None or (c.ndim > 0 and c.shape[0] == batch):
                return torch.cat([c, u])
            if c is not u and not torch.compiler.is_compiling() and not torch.equal(c, u):
                raise ConfigError(
                    f"cond{where} and uncond{where} differ but have no batch axis (leading size "
                    f"{c.shape[0] if c.ndim else 'none'}, the latents' batch is {batch}): a "
                    "tensor without one is shared by the guidance batch, so pass the same tensor "
                    "in both, or give it a batch axis"
                )
            return c
        if isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor) or c != u:
            raise ConfigError(
                f"cond{where} is {_short(c)} but uncond{where} is {_short(u)}: a guidance batch "
                "concatenates tensors and passes other values once, so give both a tensor of "
                "the same shape, or the same non-tensor value"
            )
        return c

    try:
        return pytree.tree_map_with_path(pair, cond, uncond)
    except ConfigError:
        raise
    except ValueError as e:  # pytree's: the two nest differently
        raise ConfigError(_structure_difference(cond, uncond, e)) from e


def _structure_difference(cond: Conditioning, uncond: Conditioning, error: ValueError) -> str:
    """Which keys one of cond and uncond has and the other lacks, for a clear error."""
    paths = [
        {pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(tree)[0]}
        for tree in (cond, uncond)
    ]
    only_cond, only_uncond = sorted(paths[0] - paths[1]), sorted(paths[1] - paths[0])
    keys = [
        f"only {name} has {', '.join(v)}"
        for name, v in [("cond", only_cond), ("uncond", only_uncond)]
        if v
    ]
    # the same keys: another container (a tuple for a list), which pytree's message names
    detail = "; ".join(keys) or str(error)
    return (
        f"cond and uncond must nest the same way to batch them for guidance: {detail}; build "
        "uncond as cond is built, with None where cond has None"
    )


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


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
