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
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from quant_quality import quantized_layers
from tabulate import tabulate

from diffopt.evaluation import bench, metrics, peers, zoo
from diffopt.quality import STATS_HEADERS, psnr_stats

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
        "--schedules",
        nargs="+",
        default=None,
        help="STEPS:GUIDANCE pairs (default: the shipped schedule and 12 steps at guidance 3)",
    )
    parser.add_argument("--only", nargs="+", help="keep the rows whose name contains one of these")
    parser.add_argument("--tag", default="", help="results file suffix: quant-ablation-MODEL-TAG")
    args = parser.parse_args()

    reference = zoo.load(args.model)
    guidance, steps = zoo.SHIPPED[args.model]
    schedules = [tuple(map(float, s.split(":"))) for s in args.schedules or []] or [
        (steps, guidance),
        (12, 3.0),
    ]
    layers = quantized_layers(reference.model, reference.make_inputs(batch=2), "w4a4")
    select = {e.where for e in layers.rewritten}.__contains__
    labels = torch.arange(args.images) % 10
    seeds = list(range(args.images))
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
            ssim = metrics.ssim(images, expected)
            schedule = f"{steps} steps, guidance {guidance:g}"
            rows.append([schedule, name, *stats.cells(), f"{ssim:.4f}"])
            record.setdefault(schedule, {})[name] = {**dataclasses.asdict(stats), "ssim": ssim}
            print(
                f"{schedule} | {name}: {stats}, SSIM {ssim:.4f}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )

    table = tabulate(rows, ["schedule", "setting", *STATS_HEADERS, "SSIM"], tablefmt="github")
    text = (
        f"W4A4 ablation on {args.model}, {args.images} images (seeds 0–{args.images - 1}), "
        f"against the float model on the same seeds; diffopt settings calibrated on one call at "
        f"seeds 20,000–{20_000 + args.images - 1}.\n\n{table}\n"
    )
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = f"quant-ablation-{args.model}" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
