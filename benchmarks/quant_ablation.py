"""Which part of the W4A4 recipe buys what: an ablation on a reference model, on two schedules.

Each diffopt setting is captured (and, for smoothing and GPTQ, calibrated) on one denoiser
call at the first step of calibration seeds (20,000 on), then samples the benchmark's seeds
(0 on), which no calibration saw; quality is PSNR (mean-MSE, 5th percentile and worst sample)
and SSIM against the float model on the same seeds. The peers at the same bits run on the same
linears: comfy-kitchen's ConvRot W4A4 and optimum-quanto's W4A8 (calibrated on seeds 10,000 on).
Quality only: no timing (on CPU the ops run their PyTorch references).

    python benchmarks/quant_ablation.py --model ref-flux --images 10

Writes ``quant-ablation-MODEL.md`` / ``.json`` (``-TAG`` with ``--tag``) to benchmarks/results.
The clipping rows (``-clip`` files):

    python benchmarks/quant_ablation.py --model ref-flux --images 10 \
        --only "rotation only" ConvRot \
        --tag clip
    python benchmarks/quant_ablation.py --model ref-dit --images 24 --schedules 28:1.5 20:3 \
        --only "rotation only" "+ GPTQ" W4A8 --tag clip

The 8-bit group scales (``-8bit-scales`` files; ``--layers``: per-layer SQNR, no sampling):

    python benchmarks/quant_ablation.py --model ref-flux --images 10 --first-seed 100 \
        --only "+ group scales 64, int8 branch" "+ GPTQ, int8 branch" --tag 8bit-scales
    python benchmarks/quant_ablation.py --model ref-flux \
        --only "+ group scales 64, int8 branch" "+ GPTQ, int8 branch" --tag 8bit-scales --layers
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from quant_quality import quantized_layers
from tabulate import tabulate

from diffopt.config import QuantConfig
from diffopt.evaluation import bench, metrics, peers, zoo
from diffopt.quality import STATS_HEADERS, psnr_per_sample, psnr_stats

SETTINGS = {  # row name -> quant settings (QuantConfig fields)
    "rotation only (w4a4)": {},
    "rotation only, clipping on the weight error": {"weight_clip": "weight"},
    "rotation only, no clipping": {"weight_clip": "none"},
    "low-rank only (rtn, rank 32)": {"rotation": "none", "rank": 32},
    "rotation + low-rank": {"rank": 32},
    "+ group scales 64": {"scale_group": 64, "rank": 32},
    "+ smoothing α 0.5": {"scale_group": 64, "rank": 32, "smooth_alpha": 0.5},
    "+ GPTQ": {"scale_group": 64, "rank": 32, "gptq": True},
    # the branch in int8: half its bytes, the residual absorbing its rounding
    "rotation + low-rank, int8 branch": {"rank": 32, "branch_bits": 8},
    "+ group scales 64, int8 branch": {"scale_group": 64, "rank": 32, "branch_bits": 8},
    "+ GPTQ, int8 branch": {"scale_group": 64, "rank": 32, "gptq": True, "branch_bits": 8},
    # and the group scales in 8 bits (a uint8 multiple of a float32 scale per row)
    "+ group scales 64, int8 branch, 8-bit scales": {
        "scale_group": 64,
        "scale_bits": 8,
        "rank": 32,
        "branch_bits": 8,
    },
    "+ GPTQ, int8 branch, 8-bit scales": {
        "scale_group": 64,
        "scale_bits": 8,
        "rank": 32,
        "gptq": True,
        "branch_bits": 8,
    },
    "+ smoothing + GPTQ": {"scale_group": 64, "rank": 32, "smooth_alpha": 0.5, "gptq": True},
    "group scales + GPTQ, no branch": {"scale_group": 64, "gptq": True},
    "NVFP4": {"format": "nvfp4"},
    "NVFP4 + rank 32": {"format": "nvfp4", "rank": 32},
    "MXFP4": {"format": "mxfp4"},
    "W4A8 (w4a8)": {"act_bits": 8},
    "W4A8 g64 r32 + GPTQ": {"act_bits": 8, "scale_group": 64, "rank": 32, "gptq": True},
}
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("ref-dit", "ref-flux", "ref-wan"), default="ref-flux")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the benchmark's seeds are FIRST_SEED on (calibration stays at 20,000 on)",
    )
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=None,
        help="STEPS:GUIDANCE pairs (default: the shipped schedule and 12 steps at guidance 3)",
    )
    parser.add_argument("--only", nargs="+", help="keep the rows whose name contains one of these")
    parser.add_argument("--tag", default="", help="results file suffix: quant-ablation-MODEL-TAG")
    parser.add_argument(
        "--layers",
        action="store_true",
        help="no sampling: each setting's per-layer output SQNR on one call (quant-ablation-"
        "MODEL-TAG-layers.md), paired against the row it extends",
    )
    args = parser.parse_args()

    reference = zoo.load(args.model)
    stem = f"quant-ablation-{args.model}" + (f"-{args.tag}" if args.tag else "")
    if args.layers:
        text = layer_sqnr_text(reference, args.only)
        print(text)
        (RESULTS / f"{stem}-layers.md").write_text(text)
        return
    guidance, steps = zoo.SHIPPED[args.model]
    schedules = [tuple(map(float, s.split(":"))) for s in args.schedules or []] or [
        (steps, guidance),
        (12, 3.0),
    ]
    layers = quantized_layers(reference.model, reference.make_inputs(batch=2), "w4a4")
    select = {e.where for e in layers.rewritten}.__contains__
    labels = torch.arange(args.images) % 10
    seeds = list(range(args.first_seed, args.first_seed + args.images))
    calib_seeds = list(range(20_000, 20_000 + args.images))
    quanto_seeds = list(range(10_000, 10_000 + args.images))

    rows, record = [], {}
    for steps, guidance in schedules:
        steps = int(steps)

        def sample(denoiser, seeds=seeds, steps=steps, guidance=guidance):
            return reference.sample(
                labels, seeds, denoiser=denoiser, steps=steps, guidance=guidance
            )

        def capture(compiled, guidance=guidance):  # one call on calibration seeds
            reference.sample(labels, calib_seeds, denoiser=compiled, steps=1, guidance=guidance)

        builds = {
            name: bench.diffopt_variant(name, {"quant": q}, warmup=capture)
            for name, q in SETTINGS.items()
        }
        builds["peer: comfy-kitchen ConvRot W4A4"] = peers.convrot_quant(select)
        builds["peer: optimum-quanto W4A8"] = peers.quanto_quant(
            "w4a8", select, lambda m, steps=steps: sample(m, seeds=quanto_seeds, steps=steps)
        )
        if args.only:
            builds = {n: b for n, b in builds.items() if any(o in n for o in args.only)}
        expected = sample(reference.model)
        for name, variant in builds.items():
            torch._dynamo.reset()
            start = time.perf_counter()
            images = sample(variant.build(copy.deepcopy(reference.model), "eager"))
            stats = psnr_stats(images, expected, metrics.DATA_RANGE)
            per_sample = psnr_per_sample(images, expected, metrics.DATA_RANGE).tolist()
            ssim = metrics.ssim(images, expected)
            schedule = f"{steps} steps, guidance {guidance:g}"
            sd = statistics.stdev(per_sample) if len(per_sample) > 1 else 0.0
            rows.append([schedule, name, *stats.cells(), f"{sd:.1f}", f"{ssim:.4f}"])
            record.setdefault(schedule, {})[name] = {
                **dataclasses.asdict(stats),
                "ssim": ssim,
                "psnr_per_sample": per_sample,
            }
            print(
                f"{schedule} | {name}: {stats}, SSIM {ssim:.4f}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )

    headers = ["schedule", "setting", *STATS_HEADERS, "sample sd dB", "SSIM"]
    table = tabulate(rows, headers, tablefmt="github")
    last = args.first_seed + args.images - 1
    text = (
        f"{command_line()}\n\n"
        f"W4A4 ablation on {args.model}, {args.images} images (seeds {args.first_seed}–{last}), "
        f"against the float model on the same seeds; diffopt settings calibrated on one call at "
        f"seeds 20,000–{20_000 + args.images - 1}. sample sd: the standard deviation of the "
        f"per-sample PSNRs.\n\n{table}\n"
    )
    paired = paired_rows(record)
    if paired:
        headers = ["schedule", "setting", "against", "Δ PSNR dB (mean ± sd)", "Δ min", "Δ max"]
        text += (
            "\nPaired per-sample PSNR differences (same seeds) of each setting against the row it "
            f"extends:\n\n{tabulate(paired, headers, tablefmt='github')}\n"
        )
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")


def command_line() -> str:
    """How this file was made: the command and the commit it ran at."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"`python benchmarks/quant_ablation.py {shlex.join(sys.argv[1:])}`, at `{commit}`."


def layer_sqnr_text(reference: zoo.Reference, only: list[str] | None) -> str:
    """Each diffopt setting's per-layer output SQNR (the quantize pass's measurement on one
    denoiser call at batch 2), its mean, and each setting's paired difference against the row
    it extends, layer by layer: a measurement without the sampling's amplified seed noise."""
    inputs = reference.make_inputs(batch=2)
    per_layer = {}
    for name, settings in SETTINGS.items():
        if only and not any(o in name for o in only):
            continue
        layers = quantized_layers(reference.model, inputs, QuantConfig(**settings))
        per_layer[name] = {
            e.where: float(re.search(r"SQNR ([-\d.]+) dB", e.what).group(1))
            for e in layers.rewritten
        }
        torch._dynamo.reset()
    rows = []
    for name, sqnr in per_layer.items():
        row = [name, len(sqnr), f"{statistics.fmean(sqnr.values()):.2f}", "", "", ""]
        paired = paired_delta(name, per_layer, digits=3)
        if paired is not None:
            row[3:] = paired[1]
        rows.append(row)
    headers = ["setting", "layers", "mean SQNR dB", "Δ vs the row it extends", "Δ min", "Δ max"]
    return (
        f"{command_line()}\n\nPer-layer output SQNR of the quantized linears on "
        f"{reference.name}, one denoiser call (batch 2, the model's example inputs); Δ: paired "
        f"per layer, mean ± sd.\n\n{tabulate(rows, headers, tablefmt='github')}\n"
    )


def paired_rows(record: dict) -> list[list[str]]:
    """Each row named ``BASE, EXTRA`` whose ``BASE`` ran too: its per-sample PSNR minus
    BASE's on the same seeds, mean ± standard deviation, least and largest."""
    rows = []
    for schedule, settings in record.items():
        per_sample = {name: result["psnr_per_sample"] for name, result in settings.items()}
        for name in settings:
            paired = paired_delta(name, per_sample)
            if paired is not None:
                base, cells = paired
                rows.append([schedule, name, base, *cells])
    return rows


def paired_delta(
    name: str, values: dict[str, Any], digits: int = 2
) -> tuple[str, list[str]] | None:
    """The row `name` extends (``BASE`` of a row named ``BASE, EXTRA``) when `values` has it
    too, and `name`'s paired differences against it: ``mean ± sd`` (to `digits` places), least
    and largest. A row's values are a list (per sample: paired by position, same seeds) or a
    dict (per layer: paired over the keys both have); None for a row that extends none."""
    base = name.rsplit(", ", 1)[0]
    if base == name or base not in values:
        return None
    ours, theirs = values[name], values[base]
    if isinstance(ours, dict):
        delta = [ours[k] - theirs[k] for k in ours if k in theirs]
    else:
        delta = [a - b for a, b in zip(ours, theirs, strict=True)]
    sd = statistics.stdev(delta) if len(delta) > 1 else 0.0
    mean = f"{statistics.fmean(delta):+.{digits}f} ± {sd:.{digits}f}"
    return base, [mean, f"{min(delta):+.2f}", f"{max(delta):+.2f}"]


if __name__ == "__main__":
    main()
