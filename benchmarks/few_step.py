"""Few-step sampling on ref-dit: the teacher's loop against unrolled students and 1.x schedules.

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
interleaved runs in one process.

    python benchmarks/few_step.py --images 300
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
from diffusers import DiTTransformer2DModel
from distill_ref_dit import JOINT_FRACTIONS, joint_sampler
from tabulate import tabulate
from tqdm import tqdm

import diffopt
from diffopt.evaluation import metrics, zoo
from diffopt.evaluation.bench import _real_digits
from diffopt.fewstep.compensation import load_compensation
from diffopt.fewstep.sampler import initial_noise, sample
from diffopt.quality import psnr_stats

RESULTS = Path(__file__).parent / "results"
CALIBRATION_SEEDS = range(10_000, 10_020)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", default="inductor", choices=["eager", "inductor"])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.25, 1.5, 1.67])
    parser.add_argument("--out", type=Path, default=RESULTS / "few-step")
    args = parser.parse_args()

    teacher, one, two = (zoo.load(n) for n in ("ref-dit", "ref-dit-1step", "ref-dit-2step"))
    labels = torch.arange(args.images) % 10
    noise = initial_noise((1, 16, 16), range(args.images))
    cond = {"class_labels": labels}
    uncond = {"class_labels": torch.full_like(labels, teacher.null_class)}
    options = {"inner": args.inner}

    def compiled(sampler: torch.nn.Module) -> Callable[[], torch.Tensor]:
        engine = torch.compile(sampler, backend="diffopt", options=options, fullgraph=True)
        return lambda: engine(noise, cond)

    def step_loop(sampler: diffopt.UnrolledSampler) -> Callable[[], torch.Tensor]:
        loop = sampler.as_step_loop(
            lambda step: torch.compile(step, backend="diffopt", options=options)
        )
        return lambda: loop(noise, cond)

    def teacher_loop(steps: int) -> Callable[[], torch.Tensor]:
        return lambda: sample(
            teacher.model,
            teacher.scheduler,
            noise,
            cond,
            uncond,
            steps=steps,
            guidance=teacher.guidance,
        )

    rows: dict[str, tuple[Callable[[], torch.Tensor], float]] = {}
    guided_nfe = 2.0  # the teacher's cond + uncond batch: two model evaluations per step
    rows["teacher, 50-step loop"] = (teacher_loop(50), 50 * guided_nfe)
    rows["teacher, 28-step loop"] = (teacher_loop(28), 28 * guided_nfe)
    students = [
        ("1-step student", one, [1.0]),
        ("2-step student", two, [1.0, 0.5]),
        ("2-step student on 4 steps", two, [1.0, 0.75, 0.5, 0.25]),
    ]
    for name, student, sigmas in students:
        sampler = diffopt.unroll(student.model, student.scheduler, len(sigmas), sigmas=sigmas)
        rows[f"{name}, unrolled"] = (compiled(sampler), float(len(sigmas)))
    calibration = initial_noise((1, 16, 16), CALIBRATION_SEEDS)
    calibration_cond = {"class_labels": torch.arange(len(calibration)) % 10}
    fits = {}
    for fraction in args.fractions:
        sampler = diffopt.unroll(two.model, two.scheduler, str(fraction), sigmas=[1.0, 0.5])
        nfe = sampler.effective_nfe(noise[:10], {"class_labels": labels[:10]})
        k = sampler.schedule[1].blocks
        rows[f"1.x: 2-step student, step 2 runs {k}/8 blocks, no compensation"] = (
            compiled(copy.deepcopy(sampler)),
            nfe,
        )
        fits[fraction] = diffopt.fit_compensation(sampler, calibration, calibration_cond)
        rows[f"1.x: 2-step student, step 2 runs {k}/8 blocks, unrolled"] = (compiled(sampler), nfe)
        if fraction == max(args.fractions):
            rows[f"1.x: 2-step student, step 2 runs {k}/8 blocks, step loop"] = (
                step_loop(sampler),
                nfe,
            )

    joint = [(f, kind) for f in JOINT_FRACTIONS for kind in ("affine", "lowrank")]
    for fraction, kind in joint:  # written by distill_ref_dit.py --joint
        folder = zoo.ASSETS / f"ref-dit-{fraction}step-{kind}"
        if not folder.exists():
            continue
        student = DiTTransformer2DModel.from_pretrained(folder).eval().requires_grad_(False)
        sampler = joint_sampler(student, two.scheduler, kind, fraction)
        load_compensation(sampler, folder / "compensation.safetensors")
        nfe = sampler.effective_nfe(noise[:10], {"class_labels": labels[:10]})
        k = sampler.schedule[1].blocks
        rows[f"1.x: jointly trained ({kind}), step 2 runs {k}/8 blocks, unrolled"] = (
            compiled(sampler),
            nfe,
        )

    samples = {}
    for name, (run, _) in tqdm(rows.items(), desc="warm-up and quality"):
        with torch.no_grad():
            samples[name] = run()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in tqdm(range(args.repeats), desc="timing rounds"):
        for name, (run, _) in rows.items():  # interleaved: drift hits every row alike
            start = time.perf_counter()
            with torch.no_grad():
                run()
            times[name].append(time.perf_counter() - start)

    real, _ = _real_digits()
    base = statistics.median(times["teacher, 50-step loop"])
    loop_1x = next((n for n in rows if n.endswith("blocks, step loop")), None)
    table = []
    for name, (_, nfe) in rows.items():
        seconds = statistics.median(times[name])
        to_teacher = psnr_stats(samples[name], samples["teacher, 50-step loop"], metrics.DATA_RANGE)
        table.append(
            {
                "schedule": name,
                "effective NFE": round(nfe, 3),
                "ref-FID": round(metrics.ref_fid(samples[name], real), 2),
                "accuracy": round(metrics.class_accuracy(samples[name], labels), 3),
                "PSNR vs teacher-50 dB": round(to_teacher.mean, 1),
                "p5 dB": round(to_teacher.p5, 1),
                "SSIM vs teacher-50": round(
                    metrics.ssim(samples[name], samples["teacher, 50-step loop"]), 4
                ),
                "PSNR vs 2-step dB": round(
                    metrics.psnr(samples[name], samples["2-step student, unrolled"]), 1
                ),
                "seconds": round(seconds, 3),
                "time / teacher-50": round(seconds / base, 4),
            }
        )
    print(
        f"ref-dit few-step sampling: {args.images} images, median of {args.repeats} "
        f"interleaved runs, inner={args.inner}\n"
    )
    print(tabulate(table, headers="keys", tablefmt="github"))
    for fraction, fit in fits.items():
        print(f"\ncompensation fit for {fraction}:\n{fit.table()}")
    if loop_1x:
        unrolled_1x = loop_1x.replace("blocks, step loop", "blocks, unrolled")
        ratio = statistics.median(times[loop_1x]) / statistics.median(times[unrolled_1x])
        print(
            f"\nunrolling the 1.x schedule: {ratio:.2f}x faster than its step loop; "
            f"{base / statistics.median(times[unrolled_1x]):.1f}x faster than the teacher's "
            "50-step loop"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": table}, indent=2) + "\n"
    )
    plot(table, args.out.with_suffix(".png"))


def plot(table: list[dict], path: Path) -> None:
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
    ax.set_title("ref-dit: teacher vs few-step students")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
