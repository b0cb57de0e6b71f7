"""How many samples do quality numbers need? ref-FID and accuracy of ref-dit across seed sets.

Samples N images (labels 0..9 in turn) from two disjoint seed sets for several N and prints how
far ref-FID and class accuracy move between them, beside the floor: ref-FID of real held-out
digits against all real digits.

    python benchmarks/metric_noise.py --sizes 100 300 --steps 50
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from diffopt.evaluation import metrics, zoo
from diffopt.evaluation.data import digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    reference = zoo.load("ref-dit")
    real, _ = digits("all")
    test, _ = digits("test")
    rows = [["real held-out digits", len(test), "", f"{metrics.ref_fid(test, real):.2f}", ""]]
    for n in args.sizes:
        labels = torch.arange(n) % 10
        for first_seed in (0, 100_000):
            images = reference.sample(labels, range(first_seed, first_seed + n), steps=args.steps)
            rows.append(
                [
                    f"ref-dit, seeds from {first_seed}",
                    n,
                    args.steps,
                    f"{metrics.ref_fid(images, real):.2f}",
                    f"{metrics.class_accuracy(images, labels):.3f}",
                ]
            )
    print(tabulate(rows, ["images", "N", "steps", "ref-FID", "accuracy"], tablefmt="github"))


if __name__ == "__main__":
    main()
