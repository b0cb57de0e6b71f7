"""Where a cached run's time goes: wall time per denoiser call, diffopt against TaylorSeer.

On a reference model, diffusers' TaylorSeer at interval N and diffopt's interval plan that runs
the same full steps (``interval_plan(steps, N, warmup=3, phase=1)``: steps 0–2, then 4, 4 + N,
…, as TaylorSeer's schedule falls), beside the uncached model and diffopt without a cache. Each
call is timed on its own; rounds are interleaved and each step's median kept. The table splits
each run into its full steps and its reuse steps: at equal FLOPs the two caches differ only in
what a full step and a reuse step cost.

    python benchmarks/step_times.py --model ref-wan --steps 50 --every 8 --images 10 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate

from diffopt.evaluation import peers, zoo
from diffopt.runtime.controller import interval_plan


def timed(denoiser: Callable[..., Any], times: list[float]) -> Callable[..., Any]:
    """`denoiser`, appending each call's seconds to `times`."""

    def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = denoiser(*args, **kwargs)
        times.append(time.perf_counter() - start)
        return out

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("ref-dit", "ref-flux", "ref-wan"), default="ref-wan")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    reference = zoo.load(args.model)
    labels, seeds = torch.arange(args.images) % 10, list(range(args.images))
    plan = interval_plan(args.steps, args.every, warmup=3, phase=1)
    taylorseer = peers.taylorseer_cache(args.every)
    eager = {"inner": "eager"}
    cached = {**eager, "cache": {"steps": args.steps, "mode": "plan", "plan": plan}}
    hooked = f"diffusers TaylorSeer {args.every}"
    runs = {
        "uncached": reference.model,
        "diffopt, no cache": torch.compile(
            copy.deepcopy(reference.model), backend="diffopt", options=eager
        ),
        hooked: taylorseer.build(copy.deepcopy(reference.model), "eager"),
        f"diffopt, every-{args.every} plan": torch.compile(
            copy.deepcopy(reference.model), backend="diffopt", options=cached
        ),
    }
    times: dict[str, list[list[float]]] = {name: [] for name in runs}
    for _ in range(args.rounds + 1):  # the first round warms up (compiles) and is dropped
        for name, denoiser in runs.items():
            if name == hooked:  # its Taylor factors start over each run
                taylorseer.reset(denoiser)
            calls: list[float] = []
            with torch.no_grad():
                reference.sample(labels, seeds, denoiser=timed(denoiser, calls), steps=args.steps)
            times[name].append(calls)
    rows = []
    for name, rounds in times.items():
        per_step = [statistics.median(step) for step in zip(*rounds[1:], strict=True)]
        full = [t for t, action in zip(per_step, plan, strict=True) if action == "full"]
        reuse = [t for t, action in zip(per_step, plan, strict=True) if action != "full"]
        rows.append(
            {
                "run": name,
                "seconds": round(sum(per_step), 2),
                "full steps: ms each": round(1000 * statistics.median(full), 1),
                "reuse steps: ms each": round(1000 * statistics.median(reuse), 1),
                "in reuse steps": f"{sum(reuse) / sum(per_step):.1%}",
            }
        )
    print(
        f"{args.model}, {args.images} images, {args.steps} steps, plan "
        f"{''.join(a[0] for a in plan)} ({plan.count('full')} full), median of {args.rounds} "
        "interleaved rounds; uncached runs are split at the plan's steps too\n"
    )
    print(tabulate(rows, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
