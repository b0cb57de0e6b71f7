"""Per-layer SQNR of the rotated 4-bit linears on ref-dit: where the rotation matters.

Quantizes every linear inside the blocks (AdaLN modulation and time embeddings included) with each
rotation and prints the w4a4 pass's measured output SQNR per layer kind, averaged over the blocks
(inputs: one denoiser call on `--batch` example inputs).

    python benchmarks/quant_layers.py
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

from tabulate import tabulate

import diffopt
from diffopt import zoo
from diffopt.config import Config, QuantConfig

ROTATIONS = ("regular", "sylvester", "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    reference = zoo.load("ref-dit")
    inputs = reference.make_inputs(batch=args.batch)
    sqnr: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rotation in ROTATIONS:
        quant = QuantConfig(rotation=rotation, exclude=[], min_sqnr=0)
        report = diffopt.inspect(reference.model, inputs, Config(inner="eager", quant=quant))
        w4a4 = next(p for p in report.passes if p.name == "w4a4")
        for entry in w4a4.rewritten:
            found = re.search(r"transformer_blocks\.\d+\.(\S+?):?\s.*SQNR ([\d.]+)",
                              f"{entry.where} {entry.what}")  # fmt: skip
            if found:
                sqnr[found.group(1)][rotation].append(float(found.group(2)))
    rows = [[layer, *(f"{sum(v[r]) / len(v[r]):.1f}" for r in ROTATIONS)]
            for layer, v in sqnr.items()]  # fmt: skip
    print(tabulate(rows, ["layer", *(f"{r} dB" for r in ROTATIONS)], tablefmt="github"))


if __name__ == "__main__":
    main()
