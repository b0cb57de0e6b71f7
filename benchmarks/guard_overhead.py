"""What the cache guards cost when they skip nothing: indicator, residual bookkeeping, host read.

Runs ref-dit's sampling loop with diffopt's regions (no cache) and with cache guards whose
thresholds are 0 (every step runs in full, but the executor still reads the timestep, asks the
controller, and records the residuals the next reuse would need). Rounds are interleaved and
the median kept; the difference, per step, is the guards' overhead.

    python benchmarks/guard_overhead.py --images 100 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

import diffopt
from diffopt.evaluation import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", default="inductor")
    args = parser.parse_args()

    reference = zoo.load("ref-dit")
    labels, seeds = torch.arange(args.images) % 10, list(range(args.images))
    never = {"steps": args.steps, "early": 0.0, "critical": 0.0}
    setups = {
        "diffopt, no cache": {},
        "cache guards, polish none": {"cache": {**never, "polish": "none"}},
        "cache guards, block0 indicator": {
            "cache": {**never, "polish": "none", "indicator": "block0"}
        },
        "cache guards, token polish armed": {"cache": {**never, "polish": "token"}},
        # the online check measures every full step here (its most expensive case)
        "cache guards, check stack": {"cache": {**never, "polish": "none", "check": "stack"}},
    }
    denoisers = {}
    for name, options in setups.items():
        torch._dynamo.reset()
        model = torch.compile(
            reference.model, backend="diffopt", options={"inner": args.inner, **options}
        )
        reference.sample(labels, seeds, denoiser=model, steps=args.steps)  # compile, calibrate
        denoisers[name] = model
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, model in denoisers.items():
            start = time.perf_counter()
            with diffopt.request(steps=args.steps):
                reference.sample(labels, seeds, denoiser=model, steps=args.steps)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["diffopt, no cache"])
    rows = [
        [
            name,
            f"{statistics.median(t):.3f}",
            f"{statistics.median(t) / base - 1:+.1%}",
            f"{(statistics.median(t) - base) / args.steps * 1e3:+.2f}",
        ]
        for name, t in times.items()
    ]
    print(
        f"ref-dit, {args.images} images, {args.steps} steps, inner={args.inner}, "
        f"median of {args.rounds} interleaved rounds"
    )
    print(tabulate(rows, ["setup", "seconds", "overhead", "ms per step"], tablefmt="github"))


if __name__ == "__main__":
    main()
