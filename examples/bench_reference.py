"""Compare diffopt against the baseline and one peer on the bundled reference model.

Run: python examples/bench_reference.py [--images 30] [--steps 50]
"""

import argparse

from diffopt.evaluation import bench, peers, zoo

parser = argparse.ArgumentParser()
parser.add_argument("--images", type=int, default=30)
parser.add_argument("--steps", type=int, default=50)
args = parser.parse_args()

reference = zoo.load("ref-dit")  # a trained DiT on 16×16 digits; no download
variants = [
    bench.baseline(),
    *bench.diffopt_variants(),
    peers.first_block_cache(threshold=0.05),  # diffusers' FirstBlockCache
]
result = bench.run(reference, variants, images=args.images, steps=args.steps, inner="aot_eager")
print(result.markdown())
bench.save_grid(result.samples["baseline"], "baseline.png")
print("wrote", result.plot("speed_quality.png"), "and baseline.png")
