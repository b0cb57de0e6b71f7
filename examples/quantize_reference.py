"""Quantize the reference model's block linears to rotated W4A4, inspect, sample, compare.

Run: python examples/quantize_reference.py [--quant w4a4] [--steps 50] [--images 20]
"""

import argparse

import torch

import diffopt
from diffopt.evaluation import metrics, zoo

parser = argparse.ArgumentParser()
parser.add_argument("--quant", default="w4a4", help="w4a4, w4a4-sylvester, w4a4-rtn, w4a8, w8a8")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--images", type=int, default=20)
args = parser.parse_args()

ref = zoo.load("ref-dit")  # a trained DiT on 16×16 digits; no download

# What the quantize pass does: which linears become diffopt::quant_linear, their SQNR, the memory.
config = diffopt.Config(inner="eager", quant=args.quant)
report = diffopt.inspect(ref.model, ref.make_inputs(batch=2), config)
w4a4 = next(p for p in report.passes if p.name == "quantize")
print(w4a4.summary(), "|", w4a4.notes[-1])
for entry in w4a4.rewritten[:6]:
    print(f"  {entry.where}: {entry.what}")

model = torch.compile(ref.model, backend="diffopt", options={"inner": "eager", "quant": args.quant})
labels, seeds = torch.arange(args.images) % 10, range(args.images)
full = ref.sample(labels, seeds, steps=args.steps)
quantized = ref.sample(labels, seeds, denoiser=model, steps=args.steps)
print(f"PSNR against the unquantized model: {metrics.psnr(quantized, full):.1f} dB")
print(f"class accuracy: {metrics.class_accuracy(quantized, labels):.2f}")
