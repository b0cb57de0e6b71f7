"""Helpers for the cache-guard tests: a denoising loop over any tiny family."""

from __future__ import annotations

import torch

from diffopt.evaluation import zoo

from .conftest import first_output


def latent_key(inputs: dict) -> str:
    return "sample" if "sample" in inputs else "hidden_states"


def denoise(denoiser, inputs: dict, steps: int, start: float | None = None) -> torch.Tensor:
    """`steps` Euler-like steps with a decreasing timestep; returns the final latents."""
    *_, x = stepping(denoiser, inputs, steps, start)
    return x


def stepping(denoiser, inputs: dict, steps: int, start: float | None = None):
    """`denoise` one step at a time: yields the latents after each step (a caller can pause
    between denoiser calls, as an asyncio server does, or stop half-way)."""
    key = latent_key(inputs)
    x = inputs[key].clone()
    top = float(inputs["timestep"].max()) if start is None else start
    for t in torch.linspace(top, top / steps, steps):
        call = {**inputs, key: x, "timestep": t.expand(x.shape[0]).to(x.dtype)}
        with torch.no_grad():
            v = first_output(denoiser(**call))
        x = x - v[:, : x.shape[1]] / steps
        yield x


def build(name: str = "tiny-dit", batch: int = 2):
    model, inputs = zoo.build(name, batch=batch)
    inputs = {k: v for k, v in inputs.items() if k != "return_dict"}
    return model, inputs


def cached(model, steps: int | None = 12, **settings):
    """The model compiled with cache guards (eager regions), as one graph (no graph breaks)."""
    cache = {"steps": steps, **settings}
    options = {"inner": "eager", "cache": cache}
    return torch.compile(model, backend="diffopt", options=options, fullgraph=True)
