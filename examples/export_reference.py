"""Export the reference model as ONNX engines and run them with onnxruntime.

1. a cached engine: cache guards calibrated with torch, exported with a dynamic batch, run with
   the same controller and compared with the torch runtime;
2. a quantized engine (rotated W4A4) in the custom-node form: ``ai.diffopt::W4A4Linear`` nodes
   whose decomposition onnxruntime inlines.

Run: python examples/export_reference.py [--out engines] [--images 8] [--steps 50]
"""

import argparse
from pathlib import Path

import torch

import diffopt
from diffopt.config import CacheConfig
from diffopt.evaluation import metrics, zoo

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, default=Path("engines"))
parser.add_argument("--images", type=int, default=8)
parser.add_argument("--steps", type=int, default=50)
args = parser.parse_args()

ref = zoo.load("ref-dit")  # a trained DiT on 16×16 digits; no download
labels, seeds = torch.arange(args.images) % 10, range(args.images)


def run(denoiser):
    """One whole sampling run on calibration seeds."""
    return ref.sample(labels, range(100, 100 + args.images), denoiser=denoiser, steps=args.steps)


# 1. calibrate the cache with torch, export it (one ONNX file per region), run it with onnxruntime
settings = CacheConfig(early=0.1, critical=0.3, polish="block")
cache = diffopt.calibrate(ref.model, run, steps=args.steps, cache=settings).config
folder = diffopt.export(
    ref.model,
    ref.make_inputs(batch=8),
    {"cache": cache},
    out=args.out / "cached",
    dynamic_batch=True,
)
engine = diffopt.load_engine(folder, provider="cpu")
torch_runtime = torch.compile(
    ref.model, backend="diffopt", options={"inner": "eager", "cache": cache}
)
actions, images = {}, {}
for name, denoiser in (("torch", torch_runtime), ("onnxruntime", engine)):
    with diffopt.request(steps=args.steps) as req:
        images[name] = ref.sample(labels, seeds, denoiser=denoiser, steps=args.steps)
    actions[name] = req.actions[0]
print(
    f"cached engine: {len(list(folder.glob('*.onnx')))} ONNX files; same decisions as torch: "
    f"{actions['onnxruntime'] == actions['torch']}; "
    f"max |diff| {(images['onnxruntime'] - images['torch']).abs().max():.1e}"
)
print(f"block work {req.compute():.2f} of an uncached run; actions {actions['onnxruntime']}")

# 2. rotated W4A4 in the custom-node form
folder = diffopt.export(
    ref.model,
    ref.make_inputs(batch=2),
    {"quant": "w4a4"},
    out=args.out / "w4a4",
    quant_form="custom",
    dynamic_batch=True,
)
quantized = ref.sample(labels, seeds, denoiser=diffopt.load_engine(folder), steps=args.steps)
full = ref.sample(labels, seeds, steps=args.steps)
print(f"W4A4 engine: PSNR against the unquantized model {metrics.psnr(quantized, full):.1f} dB")
