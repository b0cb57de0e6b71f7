"""How far reuse should follow the residual's slope: `CacheConfig.damping` on fixed plans.

Each plan (full steps ``f``, reused steps ``r``, extrapolated reuse) samples the calibration
seeds (10,000 on) at each damping; PSNR (mean-MSE and 5th percentile) against the uncached run
on the same seeds. What `Calibration.refine`'s `DAMPING_GRID` was chosen from.

    python benchmarks/extrapolation_damping.py --model ref-flux --steps 28 --images 12
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

import diffopt
from diffopt.config import CacheConfig
from diffopt.evaluation import zoo
from diffopt.quality import psnr_stats

PLANS = {  # ref-flux at 28 steps: the best every-3 plan (11 full steps), and 10-full ones
    "every 3 (11 full)": "fffrrfrrfrrfrrfrrfrrfrrfrrfr",
    "step 17 reused (10 full)": "fffrrfrrfrrfrrfrrrrrfrrfrrfr",
    "step 14 reused (10 full)": "fffrrfrrfrrfrrrrrfrrfrrfrrfr",
    "every 4 (10 full)": "fffrrrfrrrfrrrfrrrfrrrfrrrfr",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("ref-dit", "ref-flux", "ref-wan"), default="ref-flux")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--dampings", type=float, nargs="+", default=[1.0, 0.85, 0.7, 0.55])
    args = parser.parse_args()
    plans = {name: p for name, p in PLANS.items() if len(p) == args.steps}
    if not plans:
        raise SystemExit(f"the plans here are for 28 steps; --steps {args.steps} has none")
    reference = zoo.load(args.model)
    labels = torch.arange(args.images) % 10
    seeds = list(range(10_000, 10_000 + args.images))
    uncached = reference.sample(labels, seeds, steps=args.steps)
    options = {"inner": "eager", "cache": CacheConfig(steps=args.steps)}
    denoiser = torch.compile(reference.model, backend="diffopt", options=options)
    rows = []
    for name, letters in plans.items():
        plan = ["full" if c == "f" else "reuse" for c in letters]
        row = [name, letters]
        for damping in args.dampings:
            config = CacheConfig(steps=args.steps, mode="plan", plan=plan, damping=damping)
            with diffopt.request(steps=args.steps, cache=config):
                samples = reference.sample(labels, seeds, denoiser=denoiser, steps=args.steps)
            stats = psnr_stats(samples, uncached, 2.0)
            row.append(f"{stats.mean:.2f} ({stats.p5:.2f})")
        rows.append(row)
        print(rows[-1], flush=True)
    headers = ["plan", "actions", *(f"damping {d:g}: dB (p5)" for d in args.dampings)]
    print(f"\n{args.model}, {args.steps} steps, {args.images} calibration seeds\n")
    print(tabulate(rows, headers, tablefmt="github"))


if __name__ == "__main__":
    main()
