"""diffopt's cache guards against every caching peer on a reference model, each over its own knob.

For each step count: diffopt calibrated with ``cache="auto"`` at several PSNR budgets (on
calibration seeds disjoint from the benchmark's), with inductor regions and with eager regions
(the caching policy alone), against diffusers' FBCache, MagCache, TaylorSeer, FasterCache, PAB
and cache-dit's DBCache at several settings each. All variants sample the same images; timing
rounds are interleaved and the median kept. Writes a table (markdown, JSON) and a speed-vs-PSNR
plot per step count: ``cache-sweep-STEPS.*`` for ref-dit, ``cache-sweep-MODEL-STEPS.*`` for the
others.

    python benchmarks/cache_sweep.py --steps 50 28 --images 300
    python benchmarks/cache_sweep.py --model ref-flux --steps 28 --images 300

Under the table, each peer against diffopt at the peer's PSNR (`at_peer_quality`);
``--summarize FILE.json…`` prints that comparison for sweeps already written. ``--calibrated
DIR`` saves each budget's chosen config there (``found.save``) and, when a later run finds them
all, times those instead of calibrating again (the calibration is seeded: a re-timing, e.g. with
more ``--repeats``, gets the same settings without the half hour; no calibration table then).
``--refine`` also searches where each budget's full steps fall (`Calibration.refine`, tens of
extra sampling runs per budget), the plans it tried in the calibration table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

import diffopt
from diffopt.calibration import Calibration
from diffopt.config import CacheConfig
from diffopt.evaluation import bench, peers, zoo

MODELS = ("ref-dit", "ref-flux", "ref-wan")
PEER_KNOBS = {
    "fbcache": (0.05, 0.1, 0.2, 0.3),
    "magcache": (0.06, 0.12, 0.24, 0.5),
    "taylorseer": (3, 5, 8),
    "taylorseer2": (3, 4, 5),  # max_order=2: 2-3 dB under order 1 on ref-flux at 28 steps
    "fastercache": (2, 4),
    "pab": (2, 5),
    "dbcache": (0.08, 0.16, 0.32),
}


def variants_for(
    reference: zoo.Reference,
    steps: int,
    targets: list[float],
    peer_names: list[str],
    calibration_table: Path | None = None,
    calibrated: Path | None = None,
    refine: bool = False,
) -> list:
    """The rows of one sweep; `calibration_table`: where to write every setting the calibration
    tried, with its estimate and work (the evidence behind diffopt's rows); `calibrated`: where
    each budget's chosen config is saved, and read from instead of calibrating when all are
    there; `refine`: search where each budget's full steps fall (`Calibration.refine`)."""
    labels, seeds = torch.arange(20) % 10, list(range(10_000, 10_020))

    def calibration_run(denoiser):
        return reference.sample(labels, seeds, denoiser=denoiser, steps=steps)

    # diffopt without a cache is a point too: full quality at the region-compiled speed
    out = [
        bench.baseline(),
        bench.torch_compile_variant(),
        bench.diffopt_variant("diffopt no cache"),
    ]
    name = f"{reference.name}-{steps}-{{:g}}dB{'-refined' if refine else ''}.json"
    saved = {t: calibrated / name.format(t) for t in targets} if calibrated else {}
    if saved and all(path.exists() for path in saved.values()):
        chosen = {t: CacheConfig(**json.loads(path.read_text())) for t, path in saved.items()}
    else:
        found = calibrations(
            reference.model, calibration_run, steps, targets, calibration_table, refine
        )
        for target, calibration in found.items():
            if saved:
                saved[target].parent.mkdir(parents=True, exist_ok=True)
                calibration.save(saved[target])
        chosen = {target: calibration.config for target, calibration in found.items()}
    for target, config in chosen.items():
        out.append(bench.cached_variant(f"diffopt cache {target:g}dB", config))
        if target == min(targets):  # the caching policy alone, regions run eagerly like peers
            name = f"diffopt cache {target:g}dB eager"
            out.append(bench.cached_variant(name, config, "eager"))
    # MagCache's magnitude-ratio calibration: seeds disjoint from the benchmark's (from 0)
    small = (torch.arange(10), list(range(10_020, 10_030)))

    def peer_calibration(denoiser):
        return reference.sample(*small, denoiser=denoiser, steps=steps)

    makers = {
        "fbcache": peers.first_block_cache,
        "magcache": lambda t: peers.mag_cache(peer_calibration, steps, t),
        "taylorseer": peers.taylorseer_cache,
        "taylorseer2": lambda t: peers.taylorseer_cache(t, max_order=2),
        "fastercache": peers.faster_cache,
        "pab": peers.pyramid_attention_broadcast,
        "dbcache": lambda t: peers.db_cache(steps, t),
    }
    for name in peer_names:
        out += [makers[name](knob) for knob in PEER_KNOBS[name]]
    return out


def calibrations(
    model: torch.nn.Module,
    run: Callable[[Any], torch.Tensor],
    steps: int,
    targets: list[float],
    calibration_table: Path | None,
    refine: bool = False,
) -> dict[float, Calibration]:
    """`calibrate(cache="auto")` once (the settings tried do not depend on the budget), then the
    setting chosen for each budget (with `refine`, `Calibration.refine` for it: the plans tried
    for one budget join the next one's trials; where no setting of full and reused steps keeps
    the budget, the choice is taken as it is); a budget no setting meets is printed, not
    raised."""
    try:
        trials = diffopt.calibrate(model, run, steps=steps, cache="auto", target_psnr=min(targets))
    except diffopt.ConfigError as e:
        print(f"{steps} steps, {min(targets)} dB: {e}")
        return {}
    chosen = {}
    for target in targets:
        try:
            found = trials.retarget(target)
        except diffopt.ConfigError as e:
            print(f"{steps} steps, {target} dB: {e}")
            continue
        if refine:
            try:
                found = trials.refine(target)
            except diffopt.ConfigError as e:  # nothing refine can move: taken as it is
                print(f"{steps} steps, {target} dB, not refined: {e}")
        print(f"{steps} steps, {target} dB: {found.chosen.describe()}")
        chosen[target] = found
        trials = found if refine else trials
    if calibration_table is not None:
        calibration_table.write_text(trials.table() + "\n")
    return chosen


def result_stem(model: str, steps: int) -> str:
    """Output files' name: ref-dit's keep the name they were committed under."""
    return f"cache-sweep-{steps}" if model == "ref-dit" else f"cache-sweep-{model}-{steps}"


def family_of(name: str) -> str:
    """The method behind a row: its name without the knob value."""
    return re.sub(r" [\d.]+(dB)?( eager)?$", lambda m: " eager" if m.group(2) else "", name)


def at_peer_quality(rows: list[dict]) -> list[dict]:
    """Each peer row against diffopt at the peer's PSNR, from diffopt's measured rows on the
    sweep's inner backend, cached and not (`rows` as `BenchResult.to_dict` writes them):
    - ``diffopt ≥ PSNR``: the fastest diffopt row at least as good, as measured (diffopt without
      a cache is exact: above its best cached row, it is the one);
    - ``interpolated``: time and FLOPs linear in PSNR between the two cached rows that bracket
      the peer's (none outside their range: a setting in between is assumed to exist).
    Ratios are diffopt over the peer: below 1, diffopt is faster at that quality."""
    diffopt_rows = ("diffopt cache", "diffopt no cache")
    ours = sorted(
        (r for r in rows if r["name"].startswith(diffopt_rows) and " eager" not in r["name"]),
        key=lambda r: r["psnr"],
    )
    table = []
    for peer in (r for r in rows if r["family"] == "peer" and r["flops_ratio"] < 1):
        psnr = peer["psnr"]
        better = [r for r in ours if r["psnr"] >= psnr]
        fastest = min(better, key=lambda r: r["time_ratio"], default=None)
        below = [r for r in ours if r["psnr"] < psnr]
        cached_better = [r for r in better if math.isfinite(r["psnr"])]
        time = flops = None
        if below and cached_better:
            low, high = below[-1], min(cached_better, key=lambda r: r["psnr"])
            share = (psnr - low["psnr"]) / (high["psnr"] - low["psnr"])
            time, flops = (
                low[k] + share * (high[k] - low[k]) for k in ("time_ratio", "flops_ratio")
            )
        table.append(
            {
                "peer": peer["name"],
                "PSNR dB": round(psnr, 1),
                "peer time": round(peer["time_ratio"], 3),
                "diffopt ≥ PSNR": "none"
                if fastest is None
                else f"{fastest['psnr']:.1f} dB at {fastest['time_ratio']:.3f}",
                "time ratio (measured)": None
                if fastest is None
                else round(fastest["time_ratio"] / peer["time_ratio"], 3),
                "time ratio (interpolated)": None
                if time is None
                else round(time / peer["time_ratio"], 3),
                "FLOPs ratio (interpolated)": None
                if flops is None
                else round(flops / peer["flops_ratio"], 3),
            }
        )
    return table


def peer_comparison(rows: list[dict]) -> str:
    """`at_peer_quality` as a markdown table under its caption."""
    caption = "Each peer against diffopt at the peer's PSNR (ratios: diffopt / peer)"
    return f"{caption}\n\n{tabulate(at_peer_quality(rows), headers='keys', tablefmt='github')}"


def plot(result: bench.BenchResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[bench.Row]] = {}
    for row in result.rows[1:]:
        families.setdefault(family_of(row.name), []).append(row)
    for family, rows in families.items():
        rows = sorted(rows, key=lambda r: r.psnr)
        xs = [min(r.psnr, 60) for r in rows]
        ys = [1 / r.time_ratio for r in rows]
        style = "o-" if family.startswith("diffopt") else "^--"
        ax.plot(xs, ys, style, label=family, linewidth=2 if family.startswith("diffopt") else 1)
    ax.axvline(30, color="gray", linestyle=":", linewidth=1)
    ax.axhline(4, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("PSNR vs uncached run, dB (60 = identical)")
    ax.set_ylabel("speedup over the uncached eager run")
    ax.set_title(f"{result.model}, {result.steps} steps, {result.images} images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="ref-dit")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 28])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", type=float, nargs="+", default=[40, 34, 31])
    parser.add_argument("--peers", nargs="+", choices=sorted(PEER_KNOBS), default=list(PEER_KNOBS))
    parser.add_argument("--inner", default="inductor")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--summarize", type=Path, nargs="+", help="written sweeps (.json): compare, run nothing"
    )
    parser.add_argument(
        "--calibrated", type=Path, help="save the chosen configs here; reuse them when all exist"
    )
    parser.add_argument(
        "--refine", action="store_true", help="search where each budget's full steps fall"
    )
    args = parser.parse_args()
    if args.summarize:
        for path in args.summarize:
            print(f"{path}:\n{peer_comparison(json.loads(path.read_text())['rows'])}\n")
        return

    reference = zoo.load(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for steps in args.steps:
        stem = result_stem(args.model, steps)
        variants = variants_for(
            reference,
            steps,
            args.targets,
            args.peers,
            out / f"{stem}-calibration.md",
            args.calibrated,
            args.refine,
        )
        result = bench.run(
            reference,
            variants,
            images=args.images,
            repeats=args.repeats,
            steps=steps,
            inner=args.inner,
            memory=False,
        )
        table = result.markdown() + "\n\n" + peer_comparison(result.to_dict()["rows"])
        print(table)
        (out / f"{stem}.md").write_text(table + "\n")
        (out / f"{stem}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print("wrote", plot(result, out / f"{stem}.png"))


if __name__ == "__main__":
    main()
