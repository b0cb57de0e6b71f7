"""Rotations where they matter: ref-dit given activation outlier channels, function unchanged.

Large DiTs (DiT-XL, PixArt, FLUX) carry a few activation channels far larger than the rest; the
tiny ref-dit does not, so on it every rotation lands near the same W4A4 quality (see
benchmarks/quant_layers.py). This script gives ref-dit such channels without changing what it
computes, the inverse of SmoothQuant's migration: in every block, a few channels of the AdaLN
output that feeds attention and MLP (its shift and scale rows) and of the attention values are
multiplied by `alpha`, and the columns of the linears that read them are divided by `alpha`.
The float model's samples stay the same (checked), while the inputs of to_q / to_k / to_v,
to_out.0 and ff.net.0.proj gain outlier channels `alpha` times their neighbours' size.

For each `alpha` it samples the same images with the float model and with W4A4 under each
rotation, and prints per-layer SQNR and end-to-end PSNR / ref-FID / accuracy against float.

    python benchmarks/quant_outliers.py --images 50 --steps 25   # alphas 1, 4, 16, 64
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch
from quant_layers import layer_sqnr  # benchmarks/ is on sys.path when run as a script
from tabulate import tabulate

from diffopt.evaluation import bench, zoo

ROTATIONS = ("regular", "sylvester", "none")
RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def add_outlier_channels(
    model: torch.nn.Module, alpha: float, channels: int = 2, seed: int = 0
) -> torch.nn.Module:
    """A copy of a DiT (AdaLN-zero blocks) computing the same function, with `channels`
    activation channels per block scaled up by `alpha` at the inputs of its linears."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for block in model.transformer_blocks:
        width = block.attn1.to_q.in_features
        picked = torch.randperm(width, generator=gen)[:channels]
        # AdaLayerNormZero emits shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp;
        # the block computes norm(x) · (1 + scale) + shift for attention and for the MLP.
        modulation = block.norm1.linear
        for chunk in (0, 3):  # shifts: scale the whole term
            rows = chunk * width + picked
            modulation.weight[rows] *= alpha
            modulation.bias[rows] *= alpha
        for chunk in (1, 4):  # scales: α(1 + s) - 1 keeps 1 + s' = α(1 + s)
            rows = chunk * width + picked
            modulation.weight[rows] *= alpha
            modulation.bias[rows] = alpha * modulation.bias[rows] + (alpha - 1)
        for reader in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.ff.net[0].proj):
            reader.weight[:, picked] /= alpha
        # attention output channel c is a mix of value channel c: scale v, unscale to_out.0
        block.attn1.to_v.weight[picked] *= alpha
        block.attn1.to_v.bias[picked] *= alpha
        block.attn1.to_out[0].weight[:, picked] /= alpha
    return model


def quant(rotation: str) -> dict:
    """W4A4 with `rotation` on the default layers, none kept in float for a low SQNR: every
    rotation quantizes the same layers."""
    return {"rotation": rotation, "min_sqnr": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 4.0, 16.0, 64.0])
    parser.add_argument("--channels", type=int, default=2, help="outlier channels per block")
    args = parser.parse_args()

    reference = zoo.load("ref-dit")
    inputs = reference.make_inputs(batch=8)
    labels, seeds = torch.arange(args.images) % 10, range(args.images)
    original = reference.sample(labels, seeds, steps=args.steps)
    sqnr_rows, e2e_rows, results = [], [], []
    for alpha in args.alphas:
        model = add_outlier_channels(reference.model, alpha, args.channels)
        same = reference.sample(labels, seeds, denoiser=model, steps=args.steps)
        drift = (same - original).abs().max().item()
        if drift > 1e-3:
            raise RuntimeError(f"alpha={alpha} changed the float model's samples by {drift:.1e}")
        sqnr = {rotation: layer_sqnr(model, inputs, quant(rotation)) for rotation in ROTATIONS}
        for kind in sqnr["regular"]:
            sqnr_rows.append([alpha, kind, *(f"{sqnr[r][kind]:.1f}" for r in ROTATIONS)])
        variants = [bench.baseline()] + [
            bench.diffopt_variant(f"W4A4 {rotation}", {"quant": quant(rotation)})
            for rotation in ROTATIONS
        ]
        scaled = dataclasses.replace(reference, model=model)
        result = bench.run(
            scaled,
            variants,
            images=args.images,
            repeats=1,
            steps=args.steps,
            inner="eager",
            memory=False,
            progress=False,
        )
        for row in result.rows[1:]:
            e2e_rows.append(
                [alpha, row.name, f"{row.psnr:.1f}", f"{row.ref_fid:.1f}", f"{row.accuracy:.3f}"]
            )
        results.append(
            {
                "alpha": alpha,
                "float_drift": drift,
                "layer_sqnr": sqnr,
                "end_to_end": result.to_dict()["rows"][1:],
            }
        )
        torch._dynamo.reset()

    headers = ["alpha", "layer", *(f"{r} dB" for r in ROTATIONS)]
    text = (
        f"ref-dit with {args.channels} outlier channels per block scaled by alpha (float samples "
        f"unchanged); {args.images} images, {args.steps} steps; SQNR on one batch-8 call.\n\n"
        "Per-layer output SQNR, W4A4:\n\n"
        + tabulate(sqnr_rows, headers, tablefmt="github")
        + "\n\nEnd to end against the float model:\n\n"
        + tabulate(
            e2e_rows, ["alpha", "variant", "PSNR dB", "ref-FID", "accuracy"], tablefmt="github"
        )
        + "\n"
    )
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant-outliers.md").write_text(text)
    (RESULTS / "quant-outliers.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
