"""Per-layer SQNR of the rotated 4-bit linears on ref-dit: where the rotation matters.

Quantizes every linear inside the blocks (AdaLN modulation and time embeddings included) with each
rotation and prints the quantize pass's measured output SQNR per layer kind, averaged over blocks
(inputs: one denoiser call on `--batch` example inputs).

    python benchmarks/quant_layers.py
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import torch
from tabulate import tabulate

import diffopt
from diffopt.config import Config, QuantConfig
from diffopt.evaluation import zoo

ROTATIONS = ("regular", "sylvester", "none")
RESULTS = Path(__file__).parent / "results"


def layer_sqnr(model: torch.nn.Module, inputs: dict, quant: QuantConfig | dict) -> dict[str, float]:
    """The quantize pass's measured output SQNR per layer kind (its name inside a block), averaged
    over the blocks."""
    report = diffopt.inspect(model, inputs, Config(inner="eager", quant=quant))
    per_kind: dict[str, list[float]] = defaultdict(list)
    for entry in next(p for p in report.passes if p.name == "quantize").rewritten:
        found = re.search(
            r"transformer_blocks\.\d+\.(\S+?):?\s.*SQNR ([\d.]+)", f"{entry.where} {entry.what}"
        )
        if found:
            per_kind[found.group(1)].append(float(found.group(2)))
    return {kind: sum(v) / len(v) for kind, v in per_kind.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    reference = zoo.load("ref-dit")
    inputs = reference.make_inputs(batch=args.batch)
    sqnr = {
        rotation: layer_sqnr(
            reference.model, inputs, QuantConfig(rotation=rotation, exclude=[], min_sqnr=0)
        )
        for rotation in ROTATIONS
    }
    rows = [[kind, *(f"{sqnr[r][kind]:.1f}" for r in ROTATIONS)] for kind in sqnr["regular"]]
    table = tabulate(rows, ["layer", *(f"{r} dB" for r in ROTATIONS)], tablefmt="github")
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant-layers.md").write_text(
        f"ref-dit, W4A4 output SQNR per layer kind (mean over blocks), one batch-{args.batch} "
        f"call, every linear in the blocks quantized:\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
