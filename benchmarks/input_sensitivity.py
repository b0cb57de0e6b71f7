"""Which fresh inputs sink a calibrated cache, and can a change indicator see them coming?

On ref-dit under one sampling condition (default the robustness benchmark's worst, Euler at
28 steps, guidance 4, shift 3), two measurements on fresh inputs (seeds from 0):

1. **Sensitivity.** The uncached run, then one run per step k in which step k reuses the previous
   step's whole model output (both guidance branches) and every other step runs in full. Each
   input's PSNR against the uncached run, per k: how far below the median input it falls is its
   sensitivity to a reuse at step k. Beside it, what an online check could observe without extra
   compute: each input's step-to-step relative change of the guided velocity (and of each
   branch) over the first 10 steps, and its correlation with the sensitivity.
2. ``--grid``: ``diffopt.calibrate(cache="auto")`` on 12 calibration inputs (seeds from 10 000),
   then every setting it tried on the fresh inputs; per setting, the inputs that fall
   ``--gap`` dB or more below the median input (the "flips" of the robustness benchmark) and
   which inputs they are.

    python benchmarks/input_sensitivity.py --fresh 40
    python benchmarks/input_sensitivity.py --fresh 80 --grid --skip-sensitivity

Writes benchmarks/results/input-sensitivity{,-grid}.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cache_robustness import CONDITIONS, Condition, Fresh
from tabulate import tabulate

from diffopt import quality
from diffopt.calibration import calibrate
from diffopt.evaluation import zoo
from diffopt.evaluation.metrics import DATA_RANGE


class Recorder:
    """The model as the sampler calls it, keeping every output; at call `stale_at` it returns the
    previous call's output instead (a reuse of the whole step)."""

    def __init__(self, model: torch.nn.Module, stale_at: int | None = None) -> None:
        self.model, self.stale_at, self.outputs = model, stale_at, []

    def __call__(self, **inputs: Any) -> tuple[torch.Tensor]:
        out = self.model(**inputs)[0]
        if len(self.outputs) == self.stale_at:
            out = self.outputs[-1]
        self.outputs.append(out)
        return (out,)


def relative_change(values: torch.Tensor) -> np.ndarray:
    """[steps - 1, inputs]: ‖v_t − v_{t−1}‖ / ‖v_{t−1}‖ per input."""
    flat = values.flatten(2)
    return ((flat[1:] - flat[:-1]).norm(dim=2) / flat[:-1].norm(dim=2)).numpy()


def velocities(outputs: torch.Tensor, inputs: int, guidance: float) -> dict[str, torch.Tensor]:
    """The guided velocity [steps, inputs, ...] of the model's outputs per step, and with a
    guidance batch ([steps, 2 × inputs, ...]: cond, then uncond) each branch's; guidance 1 runs
    none (the sampler calls the model on the inputs alone), and the output is the velocity."""
    if outputs.shape[1] == inputs:
        return {"guided": outputs}
    cond, uncond = outputs[:, :inputs], outputs[:, inputs:]
    return {"guided": uncond + guidance * (cond - uncond), "cond": cond, "uncond": uncond}


def sensitivity(reference: zoo.Reference, condition: Condition, fresh: int) -> dict[str, Any]:
    """Per step and input, the PSNR of a one-step reuse; per input, the observable changes."""
    labels, seeds = torch.arange(fresh) % 10, list(range(fresh))
    uncached = Recorder(reference.model)
    images = reference.sample(labels, seeds, denoiser=uncached, steps=condition.steps)
    observed = velocities(torch.stack(uncached.outputs), fresh, condition.guidance)
    psnr = []
    for step in range(1, condition.steps):
        stale = Recorder(reference.model, stale_at=step)
        reused = reference.sample(labels, seeds, denoiser=stale, steps=condition.steps)
        mse = quality.mse_per_sample(reused, images)
        psnr.append(quality.to_psnr(mse, DATA_RANGE).tolist())
    below = np.median(psnr, axis=1, keepdims=True) - np.array(psnr)  # dB below the median input
    changes = {name: relative_change(values)[:10].mean(0) for name, values in observed.items()}
    return {
        "psnr_reuse_at_step": psnr,
        "sensitivity_db": below.mean(0).tolist(),
        "change_first_10": {k: v.tolist() for k, v in changes.items()},
    }


def sensitivity_markdown(result: dict[str, Any], condition: Condition) -> str:
    """The most sensitive inputs, with what a change indicator sees of each, and the
    correlation of the observable changes with the sensitivity."""
    db = np.array(result["sensitivity_db"])
    psnr = np.array(result["psnr_reuse_at_step"])
    order = np.argsort(-db)
    lines = [
        f"## {condition.name}: a one-step reuse, per input ({len(db)} fresh inputs)",
        "",
        "Sensitivity: mean dB below the median input over the steps a single reuse was placed "
        "at. Change: the input's mean step-to-step relative change over the first 10 steps (what a "
        "change indicator sees), as a z-score among the inputs.",
        "",
    ]
    changes = {k: np.array(v) for k, v in result["change_first_10"].items()}
    z = {k: (v - v.mean()) / v.std() for k, v in changes.items()}
    rows = [
        [int(i), f"{db[i]:.1f}", f"{psnr[:, i].min():.1f}"] + [f"{z[k][i]:+.2f}" for k in z]
        for i in order[:8]
    ]
    headers = ["input (seed)", "sensitivity dB", "worst one-step PSNR"]
    headers += [f"{k} change z" for k in z]
    lines.append(tabulate(rows, headers, tablefmt="github"))
    lines.append("")
    for name, values in changes.items():
        r = np.corrcoef(values, db)[0, 1]
        lines.append(f"- correlation of the {name} change with sensitivity: {r:+.2f}")
    return "\n".join(lines) + "\n"


def grid(
    reference: zoo.Reference, condition: Condition, fresh: int, gap: float
) -> list[dict[str, Any]]:
    """Every setting `calibrate` tries, on the calibration inputs and on the fresh ones."""
    labels, seeds = torch.arange(12) % 10, list(range(10_000, 10_012))

    def run(denoiser: Any) -> torch.Tensor:
        return reference.sample(labels, seeds, denoiser=denoiser, steps=condition.steps)

    found = calibrate(reference.model, run, steps=condition.steps, cache="auto", target_psnr=26)
    measured = Fresh(reference, condition, fresh)
    rows = []
    for trial in found.trials:
        images, work, _ = measured.sample(trial.config)
        mse = quality.mse_per_sample(images, measured.images)
        per_input = quality.to_psnr(mse, DATA_RANGE).numpy()
        low = np.flatnonzero(per_input < np.median(per_input) - gap)
        rows.append(
            {
                "settings": trial.settings,
                "work": work,
                "calibration": trial.stats.mean,
                "calibration_worst": trial.stats.minimum,
                "fresh": quality.PsnrStats.from_mse(mse, DATA_RANGE).mean,
                "fresh_median": float(np.median(per_input)),
                "flips": {int(i): round(float(per_input[i]), 1) for i in low},
            }
        )
    return rows


def grid_markdown(rows: list[dict[str, Any]], condition: Condition, gap: float) -> str:
    """Every setting's PSNR on calibration and fresh inputs, and the fresh inputs that fall
    `gap` dB or more behind the median; which inputs do so most often."""
    counts = Counter(i for row in rows for i in row["flips"])
    table = [
        [
            json.dumps(r["settings"]),
            f"{r['work']:.3f}",
            f"{r['calibration']:.1f}",
            f"{r['calibration_worst']:.1f}",
            f"{r['fresh']:.1f}",
            f"{r['fresh_median']:.1f}",
            ", ".join(f"{i}: {db}" for i, db in r["flips"].items()),
        ]
        for r in rows
    ]
    headers = ["settings", "work", "calib. dB", "calib. worst", "fresh dB", "fresh median"]
    headers.append(f"fresh inputs ≥ {gap:g} dB below the median (seed: dB)")
    often = ", ".join(f"seed {i} in {n}" for i, n in counts.most_common(6))
    return (
        f"## {condition.name}: every setting calibration tried, on fresh inputs\n\n"
        f"{tabulate(table, headers, tablefmt='github')}\n\n"
        f"Inputs that fall behind most often (of {len(rows)} settings): {often}.\n"
    )


def main() -> None:
    """Measure, write JSON and markdown, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--condition", default="euler-28 g4 s3 b16")
    parser.add_argument("--fresh", type=int, default=40)
    parser.add_argument("--grid", action="store_true", help="also every calibration setting")
    parser.add_argument("--skip-sensitivity", action="store_true")
    parser.add_argument("--gap", type=float, default=8.0, help="dB below the median input")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 256
    condition = next((c for c in CONDITIONS if c.name == args.condition), None)
    if condition is None:
        parser.error(f"--condition: one of {[c.name for c in CONDITIONS]}")
    reference = condition.reference(zoo.load("ref-dit"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_sensitivity:
        result = sensitivity(reference, condition, args.fresh)
        (out / "input-sensitivity.json").write_text(json.dumps(result) + "\n")
        text = sensitivity_markdown(result, condition)
        (out / "input-sensitivity.md").write_text(text)
        print(text)
    if args.grid:
        rows = grid(reference, condition, args.fresh, args.gap)
        (out / "input-sensitivity-grid.json").write_text(json.dumps(rows) + "\n")
        text = grid_markdown(rows, condition, args.gap)
        (out / "input-sensitivity-grid.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
