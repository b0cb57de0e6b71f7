"""ONNX engines on onnxruntime (CPU) vs torch eager and torch.compile, with and without caching.

For each model (ref-dit, and dit-s2 for DiT-S size), one whole sampling run of the same images is
timed with: torch eager; plain torch.compile (inductor); the diffopt backend (inductor regions);
the exported ONNX engine on onnxruntime's CPU provider; and, with cache guards calibrated on other
seeds, the diffopt backend and the cached engine (same controller, same decisions). Ratios are to
torch eager, medians of interleaved runs in one process.

    python benchmarks/engine_speed.py --images 20 --steps 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

import diffopt
from diffopt.evaluation import metrics, zoo

RESULTS = Path(__file__).parent / "results"


def variants(name: str, images: int, steps: int, folder: Path) -> dict[str, Callable]:
    reference = zoo.load(name)
    labels = torch.arange(images) % 10
    batch = 2 * images  # the guidance batch of two

    def run(denoiser: Callable) -> Callable[[], torch.Tensor]:
        def sample() -> torch.Tensor:
            with diffopt.request(steps=steps):
                return reference.sample(labels, range(images), denoiser=denoiser, steps=steps)

        return sample

    def calibration_run(denoiser: Callable) -> torch.Tensor:
        return reference.sample(
            labels, range(10_000, 10_000 + images), denoiser=denoiser, steps=steps
        )

    cache = diffopt.calibrate(
        reference.model, calibration_run, steps=steps, cache=diffopt.CacheConfig(polish="block")
    ).config
    inputs = reference.make_inputs(batch=batch)
    plain = diffopt.load_engine(
        diffopt.export(reference.model, inputs, {}, out=folder / name / "plain")
    )
    cached = diffopt.load_engine(
        diffopt.export(reference.model, inputs, {"cache": cache}, out=folder / name / "cached")
    )
    model = reference.model
    diffopt_cached = torch.compile(model, backend="diffopt", options={"cache": cache})
    return {
        "torch eager": run(model),
        "torch.compile (inductor)": run(torch.compile(model)),
        "diffopt (inductor regions)": run(torch.compile(model, backend="diffopt")),
        "onnxruntime engine": run(plain),
        "diffopt cached (inductor regions)": run(diffopt_cached),
        "onnxruntime engine, cached": run(cached),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ref-dit", "dit-s2"])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "engine-speed")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    table = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            runs = variants(name, args.images if name == "ref-dit" else 2, args.steps, Path(folder))
            samples = {label: run() for label, run in tqdm(runs.items(), desc=f"{name} warm-up")}
            times: dict[str, list[float]] = {label: [] for label in runs}
            for _ in tqdm(range(args.repeats), desc=f"{name} timing"):
                for label, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[label].append(time.perf_counter() - start)
            base = statistics.median(times["torch eager"])
            for label in runs:
                seconds = statistics.median(times[label])
                reference = (
                    "torch eager"
                    if "cached" not in label
                    else label.replace(
                        "onnxruntime engine, cached", "diffopt cached (inductor regions)"
                    )
                )
                table.append(
                    {
                        "model": name,
                        "runtime": label,
                        "seconds": round(seconds, 3),
                        "time / torch eager": round(seconds / base, 3),
                        "max |diff| vs torch twin": float(
                            (samples[label] - samples[reference]).abs().max()
                        ),
                        "PSNR vs torch eager": round(
                            metrics.psnr(samples[label], samples["torch eager"]), 1
                        ),
                    }
                )
    caption = f"{args.steps} steps, median of {args.repeats} interleaved runs"
    print(
        f"{caption}; ref-dit {args.images} images (batch {2 * args.images}), dit-s2 2 (batch 4)\n"
    )
    print(tabulate(table, headers="keys", tablefmt="github"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
