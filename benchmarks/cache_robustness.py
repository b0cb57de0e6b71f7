"""Does a calibrated cache keep its quality promise on inputs calibration never saw?

For each sampling condition on ref-dit (scheduler, step count, guidance, shift, serving batch):
``diffopt.calibrate(cache="auto")`` runs its grid once on a few calibration inputs; each target is
then chosen two ways from the same trials: today's edge-picking (the calibration inputs' own
PSNR reaches the target) and the fresh-input selection (bootstrap lower bounds of the mean-MSE
PSNR and of the 5th-percentile sample). Both choices, and every setting edge-picking would take at
other targets (its speed frontier), sample fresh inputs at the serving batch and are scored
against the uncached run of the same inputs: mean-MSE PSNR, per-sample p5, min and median, block
work and wall time. `--check stack` also runs the fresh-input choice with the online per-sample
check turned on (as chosen, not recalibrated). `--transfer` also runs the settings chosen at the
first condition under the others, to see how far a profile carries.

    python benchmarks/cache_robustness.py --calibration 12 --fresh 40 --targets 26 30 34
    python benchmarks/cache_robustness.py --model ref-flux --calibration 12 --fresh 40

``--model ref-flux`` / ``ref-wan`` runs the trained modern references under their own conditions
(`MODEL_CONDITIONS`: the shipped schedule first, then other step counts, guidance scales and
shifts, at serving batches that fit a 2-core CPU).

Writes benchmarks/results/cache-robustness.{json,md,png} (`-MODEL` for the modern references; or
--out and --stem).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import diffopt
from diffopt import quality
from diffopt.calibration import Calibration, Selection, calibrate
from diffopt.config import CacheConfig, ConfigError
from diffopt.evaluation import zoo

FRONTIER_TARGETS = tuple(range(20, 50, 2))
"""Budgets edge-picking is asked for to trace its fresh-PSNR-vs-work frontier."""
METHODS = ("old", "new", "new+check")
"""Edge-picking on the calibration figure; the fresh-input selection; the same with the online
check turned on (``--check``)."""


@dataclass(frozen=True)
class Condition:
    """One way of sampling ref-dit: what a user might run instead of the README's schedule."""

    name: str
    scheduler: str
    """``euler`` (FlowMatchEulerDiscrete) or ``dpm`` (DPM-Solver++ 2M with flow sigmas)."""
    steps: int
    guidance: float
    shift: float
    batch: int
    """Images per sampling run when serving (the calibration run samples all its inputs at once)."""

    def reference(self, base: zoo.Reference) -> zoo.Reference:
        """`base` with this condition's scheduler and guidance scale."""
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

        if self.scheduler == "euler":
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.shift)
        else:  # ref-dit predicts flow: the solver takes flow sigmas (DDIM and VP-Euler cannot)
            scheduler = DPMSolverMultistepScheduler(
                num_train_timesteps=1000,
                prediction_type="flow_prediction",
                use_flow_sigmas=True,
                flow_shift=self.shift,
            )
        return dataclasses.replace(base, scheduler=scheduler, guidance=self.guidance)


CONDITIONS = [
    Condition("euler-50 g1.5 s1 b16", "euler", 50, 1.5, 1.0, 16),  # the README's schedule
    Condition("euler-28 g4 s3 b16", "euler", 28, 4.0, 3.0, 16),
    Condition("euler-25 g4 s2 b1", "euler", 25, 4.0, 2.0, 1),
    Condition("euler-20 g2 s1 b16", "euler", 20, 2.0, 1.0, 16),
    Condition("euler-40 g2.5 s1 b16", "euler", 40, 2.5, 1.0, 16),
    Condition("euler-30 g3 s3 b1", "euler", 30, 3.0, 3.0, 1),
    Condition("euler-50 g1 s1 b16", "euler", 50, 1.0, 1.0, 16),  # no guidance batch
    Condition("dpm-20 g2 s1 b16", "dpm", 20, 2.0, 1.0, 16),
    Condition("dpm-28 g3 s2 b16", "dpm", 28, 3.0, 2.0, 16),
]
MODEL_CONDITIONS = {
    "ref-dit": CONDITIONS,
    # the modern references: their shipped schedule first (what `--transfer` carries elsewhere)
    "ref-flux": [
        Condition("euler-28 g2 s1 b4", "euler", 28, 2.0, 1.0, 4),
        Condition("euler-20 g3.5 s2 b4", "euler", 20, 3.5, 2.0, 4),
        Condition("euler-40 g2 s3 b1", "euler", 40, 2.0, 3.0, 1),
    ],
    "ref-wan": [
        Condition("euler-50 g4 s1 b2", "euler", 50, 4.0, 1.0, 2),
        Condition("euler-30 g4 s1 b2", "euler", 30, 4.0, 1.0, 2),
        Condition("euler-30 g2.5 s3 b1", "euler", 30, 2.5, 3.0, 1),
    ],
}
"""Conditions per reference model (``--model``); ref-dit's nine are `CONDITIONS`."""


@dataclass
class Measured:
    """One setting sampled on the fresh inputs."""

    settings: dict[str, Any]
    stats: quality.PsnrStats
    work: float
    wall_ratio: float
    """Wall time against the same executor running every step in full (eager regions)."""


class Fresh:
    """The fresh inputs of one condition, sampled at its serving batch by one compiled model."""

    def __init__(self, reference: zoo.Reference, condition: Condition, images: int) -> None:
        self.reference, self.condition = reference, condition
        self.labels = torch.arange(images) % 10
        self.seeds = list(range(images))  # calibration seeds start at 10_000
        base = CacheConfig(steps=condition.steps)
        options = {"inner": "eager", "cache": base}
        self.denoiser = torch.compile(reference.model, backend="diffopt", options=options)
        full = dataclasses.replace(base, early=0.0, critical=0.0, profile=[1.0] * condition.steps)
        for _ in range(2):  # warm-up: a second batch size recompiles once more, as dynamic
            self.sample(full)
        self.images, _, self.seconds = self.sample(full)
        self.cache: dict[str, Measured] = {}

    def sample(self, cache: CacheConfig) -> tuple[torch.Tensor, float, float]:
        """All fresh images under `cache` (one request per serving batch): the images, the block
        work (weighted by images) and the seconds."""
        steps, batch = self.condition.steps, self.condition.batch
        out, work = [], 0.0
        start = time.perf_counter()
        for i in range(0, len(self.seeds), batch):
            labels, seeds = self.labels[i : i + batch], self.seeds[i : i + batch]
            with diffopt.request(steps=steps, cache=cache, trial=True) as req:
                out.append(
                    self.reference.sample(labels, seeds, denoiser=self.denoiser, steps=steps)
                )
            work += req.compute() * len(seeds)
        return torch.cat(out), work / len(self.seeds), time.perf_counter() - start

    def measure(self, config: CacheConfig, settings: dict[str, Any]) -> Measured:
        """`config` on the fresh inputs (measured once per distinct setting)."""
        key = json.dumps(dataclasses.asdict(config), sort_keys=True)
        if key not in self.cache:
            images, work, seconds = self.sample(config)
            stats = quality.psnr_stats(images, self.images, 2.0)
            self.cache[key] = Measured(settings, stats, work, seconds / self.seconds)
        return self.cache[key]


def choose(found: Calibration, target: float, by: Selection) -> Calibration | None:
    try:
        return found.retarget(target, by=by)
    except ConfigError:
        return None


def frontier(points: Sequence[Measured]) -> list[Measured]:
    """The cheapest point at each fresh PSNR: work falls as PSNR falls."""
    best: list[Measured] = []
    for point in sorted(points, key=lambda p: (-p.stats.mean, p.work)):
        if not best or point.work < best[-1].work:
            best.append(point)
    return best


def work_at(points: Sequence[Measured], psnr: float, field: str = "work") -> float:
    """Edge-picking's work (or wall ratio) at fresh PSNR `psnr`, interpolated on its frontier
    (nan outside it)."""
    line = sorted(frontier(points), key=lambda p: p.stats.mean)
    for low, high in itertools.pairwise(line):
        if low.stats.mean <= psnr <= high.stats.mean:
            share = (psnr - low.stats.mean) / (high.stats.mean - low.stats.mean)
            return getattr(low, field) + share * (getattr(high, field) - getattr(low, field))
    return math.nan


def run_condition(
    base: zoo.Reference, condition: Condition, args: argparse.Namespace
) -> dict[str, Any]:
    """Calibrate under `condition` (without, and with `--check`, with the online check), choose
    each target both ways, and measure the choices and edge-picking's frontier on fresh inputs."""
    reference = condition.reference(base)
    labels = torch.arange(args.calibration) % 10
    seeds = list(range(10_000, 10_000 + args.calibration))

    def run(denoiser: Callable[..., Any]) -> torch.Tensor:
        return reference.sample(labels, seeds, denoiser=denoiser, steps=condition.steps)

    def calibrated(settings: CacheConfig | str) -> Calibration:
        return calibrate(
            reference.model,
            run,
            steps=condition.steps,
            cache=settings,
            target_psnr=min(args.targets),
            confidence=args.confidence,
        )

    started = time.perf_counter()
    found = calibrated("auto")
    calibration_seconds = time.perf_counter() - started
    fresh = Fresh(reference, condition, args.fresh)
    old_points = []
    for target in FRONTIER_TARGETS:
        picked = choose(found, target, "calibration")
        if picked is not None:
            old_points.append(fresh.measure(picked.config, picked.chosen.settings))
    rows = []
    for target in args.targets:
        row: dict[str, Any] = {"target": target}
        for method, by in (("old", "calibration"), ("new", "fresh")):
            picked = choose(found, target, by)
            row[method] = None if picked is None else _measured(fresh, picked)
        if args.check and row["new"] is not None:  # the safety net on top of the new choice
            picked = choose(found, target, "fresh")
            check = {"check": args.check, "check_tolerance": args.tolerance}
            picked.config = dataclasses.replace(picked.config, **check)
            row["new+check"] = _measured(fresh, picked)
        for method in METHODS[1:]:
            if row.get(method) is not None:  # edge-picking's cost at the same fresh PSNR
                psnr = row[method]["fresh"]["mean"]
                row[method]["old_work_at_this_psnr"] = work_at(old_points, psnr)
                row[method]["old_wall_at_this_psnr"] = work_at(old_points, psnr, "wall_ratio")
        rows.append(row)
    return {
        "condition": dataclasses.asdict(condition),
        "calibration_seconds": calibration_seconds,
        "seconds": time.perf_counter() - started,
        "uncached_seconds": fresh.seconds,
        "rows": rows,
        "old_frontier": [_point(p) for p in old_points],
        "chosen_new": {
            str(t): dataclasses.asdict(c.config)
            for t in args.targets
            if (c := choose(found, t, "fresh")) is not None
        },
    }


def _measured(fresh: Fresh, picked: Calibration) -> dict[str, Any]:
    measured = fresh.measure(picked.config, picked.chosen.settings)
    return {
        "settings": picked.chosen.settings,
        "calibration": dataclasses.asdict(picked.chosen.stats),
        "estimate": dataclasses.asdict(picked.chosen.fresh),
        **_point(measured),
    }


def _point(measured: Measured) -> dict[str, Any]:
    return {
        "settings": measured.settings,
        "fresh": dataclasses.asdict(measured.stats),
        "work": measured.work,
        "wall_ratio": measured.wall_ratio,
    }


def transfer(
    base: zoo.Reference, source: dict[str, Any], conditions: Sequence[Condition], fresh: int
) -> list[dict[str, Any]]:
    """The settings chosen under `source`'s condition, used unchanged under each of the others."""
    out = []
    for condition in conditions:
        measured = Fresh(condition.reference(base), condition, fresh)
        for target, config in source["chosen_new"].items():
            config = CacheConfig(**{**config, "steps": condition.steps})
            point = measured.measure(config, {})
            out.append(
                {
                    "from": source["condition"]["name"],
                    "to": condition.name,
                    "target": float(target),
                    "fresh": dataclasses.asdict(point.stats),
                    "work": point.work,
                }
            )
    return out


def markdown(results: list[dict[str, Any]], transfers: list[dict[str, Any]]) -> str:
    """Per condition and target: old (edge-picking) against new (fresh-input selection)."""
    from tabulate import tabulate

    headers = [
        "condition",
        "target",
        "method",
        "calib. dB",
        "fresh dB",
        "p5",
        "min",
        "median",
        "work",
        "wall",
        "edge-picking work / wall at this fresh dB",
    ]
    table = []
    for result in results:
        for row in result["rows"]:
            for method in METHODS:
                if method not in row:
                    continue
                m = row[method]
                if m is None:
                    table.append([result["condition"]["name"], row["target"], method, "none"])
                    continue
                f = m["fresh"]
                matched = ""
                if method != "old":
                    work, wall = m["old_work_at_this_psnr"], m["old_wall_at_this_psnr"]
                    matched = f"{work:.3f} / {wall:.3f}"
                table.append(
                    [
                        result["condition"]["name"],
                        row["target"],
                        method,
                        f"{m['calibration']['mean']:.1f}",
                        f"{f['mean']:.1f}",
                        f"{f['p5']:.1f}",
                        f"{f['minimum']:.1f}",
                        f"{f['median']:.1f}",
                        f"{m['work']:.3f}",
                        f"{m['wall_ratio']:.3f}",
                        matched,
                    ]
                )
    text = tabulate(table, headers, tablefmt="github")
    text += "\n\n" + tabulate(summary(results), SUMMARY_HEADERS, tablefmt="github")
    if transfers:
        rows = [
            [t["from"], t["to"], t["target"], *_db(t["fresh"]), f"{t['work']:.3f}"]
            for t in transfers
        ]
        headers = ["calibrated at", "used at", "target", "fresh dB", "p5", "min", "work"]
        text += "\n\n" + tabulate(rows, headers, tablefmt="github")
    return text


def _db(stats: dict[str, float]) -> list[str]:
    return [f"{stats[k]:.1f}" for k in ("mean", "p5", "minimum")]


SUMMARY_HEADERS = [
    "target",
    "method",
    "mean fresh dB over conditions",
    "worst condition dB",
    "conditions with p5 >= target - 3",
    "mean work",
    "work / edge-picking's at same fresh dB",
]


def summary(results: list[dict[str, Any]]) -> list[list[Any]]:
    """Per target and method: the promise over all conditions."""
    rows = []
    for target in sorted({r["target"] for result in results for r in result["rows"]}):
        for method in METHODS:
            chosen = [
                r[method]
                for result in results
                for r in result["rows"]
                if r["target"] == target and r.get(method) is not None
            ]
            if not chosen:
                continue
            fresh = [c["fresh"]["mean"] for c in chosen]
            tails = sum(c["fresh"]["p5"] >= target - quality.TAIL_MARGIN_DB for c in chosen)
            ratios = [
                r[method]["work"] / r[method]["old_work_at_this_psnr"]
                for result in results
                for r in result["rows"]
                if r["target"] == target
                and r.get(method) is not None
                and math.isfinite(r[method].get("old_work_at_this_psnr", math.nan))
            ]
            rows.append(
                [
                    target,
                    method,
                    f"{sum(fresh) / len(fresh):.1f}",
                    f"{min(fresh):.1f}",
                    f"{tails} / {len(chosen)}",
                    f"{sum(c['work'] for c in chosen) / len(chosen):.3f}",
                    f"{sum(ratios) / len(ratios):.2f} ({len(ratios)})" if ratios else "",
                ]
            )
    return rows


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Left: fresh PSNR minus target per condition, old vs new. Right: work against fresh PSNR,
    edge-picking's frontier and the new choices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = [r["condition"]["name"] for r in results]
    targets = sorted({r["target"] for result in results for r in result["rows"]})
    for k, target in enumerate(targets):
        for method, marker in zip(METHODS, "xos", strict=True):
            xs, ys = [], []
            for i, result in enumerate(results):
                for r in result["rows"]:
                    if r["target"] == target and r.get(method) is not None:
                        xs.append(i + 0.15 * (k - 1))
                        ys.append(r[method]["fresh"]["mean"] - target)
            if xs:
                left.scatter(xs, ys, marker=marker, color=f"C{k}", label=f"{target:g} dB, {method}")
    left.axhline(0, color="0.3", lw=0.8)
    left.axhline(-1.5, color="0.6", lw=0.8, ls=":")
    left.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
    left.set_ylabel("fresh mean-MSE PSNR - target (dB)")
    left.legend(fontsize=7, ncol=2)
    left.grid(alpha=0.3)
    for i, result in enumerate(results):
        line = sorted(result["old_frontier"], key=lambda p: p["fresh"]["mean"])
        right.plot(
            [p["fresh"]["mean"] for p in line],
            [p["work"] for p in line],
            "-",
            color=f"C{i}",
            alpha=0.5,
            label=result["condition"]["name"],
        )
        new = [r["new"] for r in result["rows"] if r["new"] is not None]
        right.scatter([n["fresh"]["mean"] for n in new], [n["work"] for n in new], color=f"C{i}")
    right.set_xlabel("fresh mean-MSE PSNR (dB)")
    right.set_ylabel("block work (share of uncached)")
    right.set_title(
        "lines: edge-picking at budgets 20-48 dB; dots: fresh-input choices", fontsize=9
    )
    right.legend(fontsize=6)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_CONDITIONS), default="ref-dit")
    parser.add_argument("--calibration", type=int, default=12, help="calibration inputs")
    parser.add_argument("--fresh", type=int, default=40, help="fresh inputs per condition")
    parser.add_argument("--targets", type=float, nargs="+", default=[26, 30, 34])
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--check", help="also run the fresh-input choice with this cache.check")
    parser.add_argument("--tolerance", type=float, default=1.2, help="cache.check_tolerance")
    parser.add_argument("--conditions", nargs="+", help="names (default: all)")
    parser.add_argument("--transfer", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", help="results name (default: cache-robustness[-MODEL])")
    parser.add_argument("--resume", action="store_true", help="keep conditions already written")
    parser.add_argument("--report", action="store_true", help="only rewrite table and plot")
    parser.add_argument("--merge", nargs="+", default=[], help="JSON files to join (--report)")
    parser.add_argument("--threads", type=int, help="torch threads (run conditions in parallel)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch._dynamo.config.recompile_limit = 256  # one model, many settings and batch sizes
    base = zoo.load(args.model)
    args.stem = args.stem or "cache-robustness" + (
        "" if args.model == "ref-dit" else f"-{args.model}"
    )
    available = MODEL_CONDITIONS[args.model]
    unknown = set(args.conditions or []) - {c.name for c in available}
    if unknown:
        parser.error(
            f"--conditions {sorted(unknown)}: {args.model} has {[c.name for c in available]}"
        )
    conditions = [c for c in available if not args.conditions or c.name in args.conditions]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / f"{args.stem}.json"
    kept = json.loads(saved.read_text()) if (args.resume or args.report) and saved.exists() else {}
    results, transfers = kept.get("results", []), kept.get("transfers", [])
    for path in args.merge:  # conditions run by parallel processes, each with its own --stem
        joined = json.loads(Path(path).read_text())
        results += joined["results"]
        transfers += joined["transfers"]
    done = {r["condition"]["name"] for r in results}
    for condition in [] if args.report else conditions:
        if condition.name in done:
            continue
        results.append(run_condition(base, condition, args))
        print(f"{condition.name}: {results[-1]['seconds']:.0f} s", flush=True)
        _save(out, args, results, transfers)
    order = [c.name for c in available]
    results.sort(key=lambda r: order.index(r["condition"]["name"]))
    source = next((r for r in results if r["condition"]["name"] == order[0]), None)
    if args.transfer and source is not None and not transfers:  # the README's schedule's choice
        others = [c for c in conditions if c.name != order[0]]
        transfers = transfer(base, source, others, args.fresh)
    text = _save(out, args, results, transfers)
    print(text)
    print("wrote", plot(results, out / f"{args.stem}.png"))


def _save(out: Path, args: argparse.Namespace, results: list, transfers: list) -> str:
    """Write the JSON and markdown so far (a long run can be read while it goes)."""
    record = {"args": vars(args), "results": results, "transfers": transfers}
    (out / f"{args.stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = markdown(results, transfers)
    (out / f"{args.stem}.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
