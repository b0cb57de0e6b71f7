"""Calibrate cache guards on the reference model, then sample with them.

Run: python examples/cache_reference.py [--steps 50] [--target-psnr 30] [--images 20]
"""

import argparse

import torch

import diffopt
from diffopt.evaluation import metrics, zoo

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--target-psnr", type=float, default=30.0)
parser.add_argument("--images", type=int, default=20)
args = parser.parse_args()

ref = zoo.load("ref-dit")  # a trained DiT on 16×16 digits; no download
labels = torch.arange(args.images) % 10
calibration_seeds = range(10_000, 10_000 + args.images)


def run(denoiser):
    """One whole sampling run on the calibration inputs."""
    return ref.sample(labels, calibration_seeds, denoiser=denoiser, steps=args.steps)


found = diffopt.calibrate(
    ref.model, run, steps=args.steps, cache="auto", target_psnr=args.target_psnr
)
print(found.table())
print("chosen:", found.chosen.describe())  # controller lines, or a plan (f full, r reuse)

model = torch.compile(
    ref.model, backend="diffopt", options={"inner": "eager", "cache": found.config}
)
seeds = range(args.images)  # fresh seeds: does the setting transfer?
uncached = ref.sample(labels, seeds, steps=args.steps)
with diffopt.request(steps=args.steps) as req:
    cached = ref.sample(labels, seeds, denoiser=model, steps=args.steps)
print(f"PSNR on fresh seeds: {metrics.psnr(cached, uncached):.1f} dB")
print(f"hit rates: {req.hit_rates()}; block work: {req.compute():.2f} of uncached")
