"""Few-step sampling on ref-dit (or ref-flux): the teacher's loop against unrolled students and 1.x
schedules.

Rows, all on the same labels and seeds:
- the teacher (guidance 1.5, a batch of two per step) at 50 and 28 Euler steps, its Python loop;
- the distilled students (guidance-distilled, one call per step), each as one unrolled graph:
  1 step, 2 steps, 4 steps (the 2-step student on sigmas 1, .75, .5, .25), and fractional "1.x"
  schedules of the 2-step student, whose second step runs the first k blocks and reuses the rest
  through a compensation fit on 20 calibration seeds (10 000…);
- the same 1.x schedule as a step loop (each step's denoiser compiled on its own, scheduler
  arithmetic in Python): what unrolling itself buys.

Effective NFE is computed FLOPs over the FLOPs of one single-batch call; the teacher's guidance
batch of two counts 2 per step (the 1.x-Distill paper's "28 × 2"). Quality: ref-FID and class
accuracy from the digits classifier; wall time as ratios to the teacher's 50-step loop, median of
interleaved runs in one process. Beside each ref-FID, its bootstrap spread and its difference from
the 2-step student's with the paired spread of that difference (the same seeds' images resampled
together, `metrics.ref_fid_difference`): what a "ref-FID ≤ the 2-step student's" claim needs.
ref-FID is to the real digits; "FID to teacher-N" is the same Fréchet distance to the reference
rows' own images (the first ``--teacher-steps``), with its paired difference from the 2-step
student's: distance to the output the schedules approximate, as PSNR and SSIM measure it.

    python benchmarks/few_step.py --images 300

``--model ref-flux``: the same rows for ref-flux (guidance 2.0) and the students
``distill_ref_dit.py --model ref-flux`` writes (``--assets``: the folder it wrote them to, its
``--out``); a 1.x step runs the dual-stream block and the first k of the 7 single-stream blocks.
The 1- and 2-step students of both models ship (missing, they are an error naming the
``distill_ref_dit.py`` command that writes them); a jointly trained 1.x schedule whose folder is
missing is left out, printed with the folder and the command that writes it. A ref-flux call
costs about 20× a ref-dit one (0.08 s an image on one thread): the default teacher rows alone
(300 images, 50 and 28 guided steps, run once for quality and ``--repeats`` times) take about 4
hours on one thread, and ``--images 100 --repeats 1`` about 35 minutes; ``--repeats 0`` measures
quality only.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from distill_ref_dit import JOINT_FRACTIONS, MODELS, command, joint_command, joint_sampler
from tabulate import tabulate
from tqdm import tqdm

import diffopt
from diffopt.evaluation import metrics, zoo
from diffopt.evaluation.bench import _real_digits
from diffopt.fewstep.compensation import load_compensation
from diffopt.quality import psnr_stats

RESULTS = Path(__file__).parent / "results"
CALIBRATION_SEEDS = range(10_000, 10_020)
JOINT_KINDS = ("affine", "lowrank")


def left_out(row: str, folder: Path, run: str) -> None:
    """Say which row a missing `folder` leaves out, and the command `run` that writes it."""
    print(f"left out ({folder} is missing; {run} writes it): {row}")


def load_student(model: str, steps: str, assets: Path) -> zoo.Reference:
    """`model`'s ``steps`` ("1step", "2step") student from `assets`. Both models'
    students ship with diffopt: a missing one is a FileNotFoundError naming the command that
    writes it."""
    name = f"{model}-{steps}"
    folder = assets / name
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"{folder} is missing: {name} ships with diffopt (check --assets); "
            f"{command(model, assets)} writes it"
        )
    return zoo.load(name, folder)


def joint_folders(model: str, assets: Path) -> list[tuple[str, str, Path]]:
    """(fraction, compensation, folder) of the schedules ``distill_ref_dit.py --joint`` wrote to
    `assets`; the missing ones are printed as left out (`left_out`)."""
    found = []
    for fraction in JOINT_FRACTIONS:
        for kind in JOINT_KINDS:
            folder = assets / f"{model}-{fraction}step-{kind}"
            if folder.exists():
                found.append((fraction, kind, folder))
            else:
                row = f"1.x: jointly trained ({kind}), {fraction} steps"
                left_out(row, folder, joint_command(model, assets, fraction, kind))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="ref-dit", help="the teacher")
    parser.add_argument(
        "--assets", type=Path, default=zoo.ASSETS, help="the students' folders (distill --out)"
    )
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timing rounds; 0: quality only, no times"
    )
    parser.add_argument("--inner", default="inductor", choices=["eager", "inductor"])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.25, 1.5, 1.67])
    parser.add_argument(
        "--teacher-steps",
        type=int,
        nargs="+",
        default=[50, 28],
        help="the teacher's loops; the first is what the students are measured against",
    )
    parser.add_argument("--out", type=Path, help="default: results/few-step[-MODEL]")
    args = parser.parse_args()
    if args.out is None:
        suffix = "" if args.model == "ref-dit" else f"-{args.model}"
        args.out = RESULTS / f"few-step{suffix}"

    teacher = zoo.load(args.model)
    one = load_student(args.model, "1step", args.assets)
    two = load_student(args.model, "2step", args.assets)
    labels = torch.arange(args.images) % 10
    noise = teacher.noise(range(args.images))
    cond = teacher.unrolled_condition(labels)  # with Flux's ids: what an unrolled sampler takes
    options = {"inner": args.inner}
    blocks = "blocks" if args.model == "ref-dit" else "single-stream blocks"

    def compiled(sampler: torch.nn.Module) -> Callable[[], torch.Tensor]:
        engine = torch.compile(sampler, backend="diffopt", options=options, fullgraph=True)
        return lambda: engine(noise, cond)

    def step_loop(sampler: diffopt.UnrolledSampler) -> Callable[[], torch.Tensor]:
        loop = sampler.as_step_loop(
            lambda step: torch.compile(step, backend="diffopt", options=options)
        )
        return lambda: loop(noise, cond)

    def teacher_loop(steps: int) -> Callable[[], torch.Tensor]:
        return lambda: teacher.latents(labels, noise=noise, steps=steps)

    def fraction_label(sampler: diffopt.UnrolledSampler) -> str:
        k, n = sampler.schedule[1].blocks, len(getattr(sampler.denoiser, sampler.stack))
        return f"step 2 runs {k}/{n} {blocks}"

    rows: dict[str, tuple[Callable[[], torch.Tensor], float]] = {}
    guided_nfe = 2.0  # the teacher's cond + uncond batch: two model evaluations per step
    for steps in args.teacher_steps:
        rows[f"teacher, {steps}-step loop"] = (teacher_loop(steps), steps * guided_nfe)
    reference = f"teacher, {args.teacher_steps[0]}-step loop"
    versus = f"teacher-{args.teacher_steps[0]}"
    students = [
        ("1-step student", one, [1.0]),
        ("2-step student", two, [1.0, 0.5]),
        ("2-step student on 4 steps", two, [1.0, 0.75, 0.5, 0.25]),
    ]
    for name, model, sigmas in students:
        sampler = model.unroll(model.model, len(sigmas), sigmas=sigmas)
        rows[f"{name}, unrolled"] = (compiled(sampler), float(len(sigmas)))
    calibration = teacher.noise(CALIBRATION_SEEDS)
    calibration_cond = teacher.unrolled_condition(torch.arange(len(calibration)) % 10)
    fits = {}
    for fraction in args.fractions:
        sampler = two.unroll(two.model, str(fraction), sigmas=[1.0, 0.5])
        nfe = sampler.effective_nfe(noise[:10], teacher.unrolled_condition(labels[:10]))
        label = fraction_label(sampler)
        rows[f"1.x: 2-step student, {label}, no compensation"] = (
            compiled(copy.deepcopy(sampler)),
            nfe,
        )
        fits[fraction] = diffopt.fit_compensation(sampler, calibration, calibration_cond)
        rows[f"1.x: 2-step student, {label}, unrolled"] = (compiled(sampler), nfe)
        if fraction == max(args.fractions):
            rows[f"1.x: 2-step student, {label}, step loop"] = (step_loop(sampler), nfe)

    for fraction, kind, folder in joint_folders(args.model, args.assets):
        trained = zoo.load(f"{args.model}-2step", folder)  # a 2-step student, trained further
        sampler = joint_sampler(trained, kind, fraction)
        load_compensation(sampler, folder / "compensation.safetensors")
        nfe = sampler.effective_nfe(noise[:10], teacher.unrolled_condition(labels[:10]))
        rows[f"1.x: jointly trained ({kind}), {fraction_label(sampler)}, unrolled"] = (
            compiled(sampler),
            nfe,
        )

    samples = {}
    for name, (run, _) in tqdm(rows.items(), desc="warm-up and quality"):
        with torch.no_grad():
            samples[name] = teacher.images(run())
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in tqdm(range(args.repeats), desc="timing rounds"):
        for name, (run, _) in rows.items():  # interleaved: drift hits every row alike
            start = time.perf_counter()
            with torch.no_grad():
                run()
            times[name].append(time.perf_counter() - start)

    real, _ = _real_digits()
    timed = args.repeats > 0
    base = statistics.median(times[reference]) if timed else None
    two_steps = samples["2-step student, unrolled"]
    loop_1x = next((n for n in rows if n.endswith("blocks, step loop")), None)
    table = []
    for name, (_, nfe) in rows.items():
        seconds = statistics.median(times[name]) if timed else None
        to_teacher = psnr_stats(samples[name], samples[reference], metrics.DATA_RANGE)
        gap, gap_sd = metrics.ref_fid_difference(samples[name], two_steps, real)
        # the same distance to the teacher's images instead of the real digits
        to_ref, to_ref_gap_sd = metrics.ref_fid_difference(
            samples[name], two_steps, samples[reference]
        )
        table.append(
            {
                "schedule": name,
                "effective NFE": round(nfe, 3),
                "ref-FID": round(metrics.ref_fid(samples[name], real), 2),
                "ref-FID sd": round(metrics.ref_fid_spread(samples[name], real), 2),
                "ref-FID - 2-step": round(gap, 2),
                "paired sd": round(gap_sd, 2),
                f"FID to {versus}": round(metrics.ref_fid(samples[name], samples[reference]), 2),
                f"FID to {versus} - 2-step": round(to_ref, 2),
                f"FID to {versus} paired sd": round(to_ref_gap_sd, 2),
                "accuracy": round(metrics.class_accuracy(samples[name], labels), 3),
                f"PSNR vs {versus} dB": round(to_teacher.mean, 1),
                "p5 dB": round(to_teacher.p5, 1),
                f"SSIM vs {versus}": round(metrics.ssim(samples[name], samples[reference]), 4),
                "PSNR vs 2-step dB": round(metrics.psnr(samples[name], two_steps), 1),
                "seconds": round(seconds, 3) if timed else None,
                f"time / {versus}": round(seconds / base, 4) if timed else None,
            }
        )
    print(
        f"{args.model} few-step sampling: {args.images} images, "
        f"{f'median of {args.repeats} interleaved runs' if timed else 'not timed'}, "
        f"inner={args.inner}\n"
    )
    print(tabulate(table, headers="keys", tablefmt="github"))
    for fraction, fit in fits.items():
        print(f"\ncompensation fit for {fraction}:\n{fit.table()}")
    if loop_1x and timed:
        unrolled_1x = loop_1x.replace("blocks, step loop", "blocks, unrolled")
        ratio = statistics.median(times[loop_1x]) / statistics.median(times[unrolled_1x])
        print(
            f"\nunrolling the 1.x schedule: {ratio:.2f}x faster than its step loop; "
            f"{base / statistics.median(times[unrolled_1x]):.1f}x faster than the teacher's "
            f"{args.teacher_steps[0]}-step loop"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "args": vars(args) | {"out": str(args.out), "assets": str(args.assets)},
                "rows": table,
            },
            indent=2,
        )
        + "\n"
    )
    plot(table, args.out.with_suffix(".png"), args.model)


def plot(table: list[dict], path: Path, model: str = "ref-dit") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in table:
        ax.scatter(row["effective NFE"], row["ref-FID"], s=40)
        label = row["schedule"].removesuffix(", unrolled").replace("1.x: 2-step student, ", "1.x: ")
        ax.annotate(
            label,
            (row["effective NFE"], row["ref-FID"]),
            fontsize=6,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("effective NFE (computed FLOPs / one full step)")
    ax.set_ylabel("ref-FID (lower is better)")
    ax.set_title(f"{model}: teacher vs few-step students")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
