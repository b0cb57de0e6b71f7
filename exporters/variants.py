"""Token-refresh variants: the shorter-sequence runs of regions an engine must carry.

`token_refresh_runs` drives the cache runtime to record them; the exporter writes each next to
its region (``<file>_tokens<count>.onnx``, see `manifest`), and a loaded engine's caching executor
runs them where the torch runtime would compile them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from diffopt.backend import build_executor
from diffopt.config import Config
from diffopt.guards import Guard
from diffopt.runtime.lowering import RegionProgram


def token_refresh_runs(
    program: RegionProgram,
    config: Config,
    guards: list[Guard],
    timestep_slot: int | None,
    weights: set[int],
    flat: list[Any],
) -> dict[int, tuple[int, list[Any]]]:
    """Region index → (token count, inputs) of the shorter-sequence runs a token refresh makes.

    The torch runtime compiles those variants when it first needs them; an engine cannot, so the
    exporter runs the torch runtime through a planned request with one token refresh and records
    them.
    """
    cache = config.cache
    refreshes = cache is not None and (cache.polish == "token" or cache.mode == "plan")
    if not refreshes or timestep_slot is None or not any(g.kind == "token" for g in guards):
        return {}  # a request that asks for token refreshes anyway is told to export again
    from diffopt.runtime.cache import request

    runs: dict[int, tuple[int, list[Any]]] = {}

    def record(index: int, count: int, examples: list[Any]) -> Any:
        runs[index] = (count, list(examples))
        return program.regions[index]

    executor = build_executor(
        program, config, guards, timestep_slot=timestep_slot, param_slots=weights, variants=record
    )
    plan = ["full", "full", "token", "full"]  # a token refresh between full steps
    # an uncalibrated cache has no change profile; a planned request only needs one to exist
    settings = dataclasses.replace(
        config.cache, mode="plan", plan=plan, profile=config.cache.profile or [1.0] * len(plan)
    )
    start = flat[timestep_slot]
    fall = (0.1 * start.abs().max()).clamp(min=1).ceil()  # a whole step for int timesteps
    with torch.no_grad(), request(steps=len(plan), cache=settings):
        for step in range(len(plan)):  # a falling timestep: one whole request (a shorter one
            # would warn the user that its last step was not protected)
            inputs = list(flat)
            inputs[timestep_slot] = (start - step * fall).to(start.dtype)
            executor(*inputs)
    return runs
