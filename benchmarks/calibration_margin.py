"""What the fresh-input bound passes over: a budget's choice and its neighbours on fresh inputs.

`diffopt.calibrate(cache="auto", target_psnr=T)` on ref-dit picks the least-work setting whose
bootstrap lower bounds (mean-MSE PSNR, p5 sample) from the calibration inputs keep T. This
samples the chosen setting and the extrapolated push-only settings around it on fresh
seeds (0..N-1, calibration on 10 000..10 019) and prints, for each, the calibration figure and
bound beside the fresh mean, p5 and minimum and the block work: a neighbour that keeps T on
fresh inputs with less work is speed the bound's margin cost.

    python benchmarks/calibration_margin.py --steps 28 --target 40 --fresh 100
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from tabulate import tabulate

import diffopt
from diffopt import quality
from diffopt.evaluation import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--target", type=float, default=40.0)
    parser.add_argument("--fresh", type=int, default=100)
    parser.add_argument("--criticals", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    args = parser.parse_args()

    ref, steps = zoo.load("ref-dit"), args.steps
    labels = torch.arange(20) % 10

    def calibration_run(denoiser):
        return ref.sample(labels, range(10_000, 10_020), denoiser=denoiser, steps=steps)

    found = diffopt.calibrate(
        ref.model, calibration_run, steps=steps, cache="auto", target_psnr=args.target
    )
    fresh_labels = torch.arange(args.fresh) % 10
    reference = ref.sample(fresh_labels, range(args.fresh), steps=steps)
    options = {"inner": "eager", "cache": found.config}
    compiled = torch.compile(ref.model, backend="diffopt", options=options)
    rows = []
    for critical in args.criticals:
        settings = {"early": critical, "critical": critical, "polish": "none"}
        config = dataclasses.replace(found.config, **settings, extrapolate=True)
        with diffopt.request(steps=steps, cache=config) as req:
            images = ref.sample(fresh_labels, range(args.fresh), denoiser=compiled, steps=steps)
        stats = quality.psnr_stats(images, reference, 2.0)
        trial = next((t for t in found.trials if t.settings == settings), None)
        rows.append(
            {
                "extrapolated critical": critical,
                "chosen": "*" if found.chosen is trial else "",
                "calibration dB": round(trial.psnr, 1) if trial else None,
                "fresh bound dB": round(trial.fresh.low, 1) if trial else None,
                "fresh dB": round(stats.mean, 1),
                "fresh p5 dB": round(stats.p5, 1),
                "fresh min dB": round(stats.minimum, 1),
                "work": round(req.compute(), 3),
            }
        )
    print(
        f"ref-dit, {steps} steps, target {args.target} dB, 20 calibration inputs, "
        f"{args.fresh} fresh\n"
    )
    print(tabulate(rows, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
