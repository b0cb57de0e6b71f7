"""Distill `ref-dit` into few-step students by rectified-flow reflow, on 2 CPU cores.

1. The teacher (guidance 1.5, 28 Euler steps) maps seeded noise ε to images x; these (ε, label, x)
   pairs are the straight paths x_σ = (1 − σ)·x + σ·ε the students learn, velocity ε − x.
2. Reflow: one student, initialized from the teacher, learns those straight paths at every σ.
   It is guidance-distilled: one call per step, no unconditional batch.
3. Two specializations of it: the 1-step student trains only at σ = 1 (it must land on x in one
   Euler step); the 2-step student trains at σ ∈ {1, 0.5}, where half of the σ = 0.5 inputs come
   from its own first step, so the second step learns to correct the first one's error.

Seeded; about 25 minutes. Writes ``diffopt/evaluation/assets/ref-dit-1step/`` and
``ref-dit-2step/``, which ``zoo.load("ref-dit-1step")`` and ``("ref-dit-2step")`` load.

4. ``--joint``: 1.x-Distill's joint training of a fractional schedule. From the 2-step student,
   the 1.5-step schedule (step 2 runs 4 of 8 blocks and reuses the rest's residual through a
   compensation; ``--joint-fraction 1.67``: 5 of 8) is fit in closed form, then trained end to
   end on the teacher pairs (`diffopt.train_schedule`: the student's weights and the
   compensation together, through the partial step). Writes ``ref-dit-FRACTIONstep-COMPENSATION/``
   (the student and ``compensation.safetensors``) for each ``--compensation``. ``--feature-weight
   W`` adds W times the squared distance in the digits classifier's features (ref-FID's feature
   space) to the loss (`diffopt.train_schedule`'s ``features``).

    python benchmarks/distill_ref_dit.py
    python benchmarks/distill_ref_dit.py --joint --compensation affine lowrank

The shipped ``ref-dit-1.5step-affine`` (50.0 min on the 2-core sandbox, beside CI):
``--joint --compensation affine --pairs 6000 --joint-steps 3000 --batch 64``; the shipped
``-lowrank`` is the earlier, shorter run (``--pairs 2000 --joint-steps 500 --batch 64``).
The shipped ``ref-dit-1.67step-affine``: the 1.5's command with ``--joint-fraction 1.67``
(105.7 min beside other jobs), then the same with ``--resume --joint-lr-schedule cosine`` (3,000
steps more from those weights, the rate annealed to zero; 80.3 min beside other jobs).

``--model ref-flux``: the same steps on `ref-flux` (guidance 2.0; packed 256×4 latents, class
prompts), all through its `Reference` hooks (``noise``, ``latents``, ``condition``, ``calling``,
``unroll``, ``save``). Writes ``ref-flux-1step/``, ``ref-flux-2step/`` (``zoo.load`` reads them)
and ``ref-flux-FRACTIONstep-COMPENSATION/``, each in fp16 with the teacher's class prompts beside
it, as ref-flux ships. A partial step runs the dual-stream block and the first 3 (1.5) or 4
(1.67) of the 7 single-stream blocks. ``--pairs-file`` keeps the teacher pairs for the next run
(``--joint`` is a run of its own).

Cost (measured on 46bf5d7 with this option: one thread, other jobs on the cores): a teacher pair
is 4.4 s (28 guided steps), a training step of batch 128 is 37.5 s (reflow; 10.6 GB resident), of
64: 17.8 s (reflow), 16.6 s (2-step), 21.4 s (``--joint`` 1.5). The defaults would take about 39
hours on one thread (6000 pairs: 7.3 h; reflow: 15.6 h; the two specializations: 16 h) and
``--joint`` 7 h more per compensation. What fits in an hour on 2 quiet cores (81 and 72 min on
one thread; the 2-core figures assume 2 threads run 1.5× one, not measured): a twentieth of
ref-dit's pairs, a thirtieth of its training images (a fifteenth of the shipped 1.5's joint run):

    python benchmarks/distill_ref_dit.py --model ref-flux --pairs 300 --batch 32 \
        --reflow-steps 180 --specialize-steps 110 --pairs-file out/ref-flux-pairs.pt  # ~54 min
    python benchmarks/distill_ref_dit.py --model ref-flux --pairs 300 --batch 32 --joint \
        --compensation affine --joint-steps 400 --pairs-file out/ref-flux-pairs.pt  # ~48 min
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.models.embeddings import LabelEmbedding
from safetensors.torch import load_file
from tqdm import tqdm, trange

import diffopt
from diffopt.evaluation import metrics, zoo
from diffopt.fewstep.compensation import load_compensation, save_compensation

ASSETS = Path(__file__).parent.parent / "diffopt" / "evaluation" / "assets"
PAIR_SEEDS = 100_000  # disjoint from the benchmark (0…) and calibration (10 000…) seeds
MODELS = ("ref-dit", "ref-flux")
PAIR_BATCH = {"ref-dit": 500, "ref-flux": 100}  # images per teacher call (memory only)


def teacher_pairs(
    teacher: zoo.Reference, count: int, steps: int, batch: int
) -> tuple[torch.Tensor, ...]:
    """(noise, labels, latents) from the teacher's guided sampling loop, through its own hooks
    (`Reference.noise` and `Reference.latents`: ref-flux's are packed tokens)."""
    labels = torch.arange(count) % 10
    noises, latents = [], []
    for start in tqdm(range(0, count, batch), desc="teacher pairs"):
        seeds = range(PAIR_SEEDS + start, PAIR_SEEDS + min(count, start + batch))
        noise = teacher.noise(seeds)
        noises.append(noise)
        latents.append(
            teacher.latents(labels[start : start + len(noise)], noise=noise, steps=steps)
        )
    return torch.cat(noises), labels, torch.cat(latents)


def cached_pairs(args: argparse.Namespace, teacher: zoo.Reference) -> tuple[torch.Tensor, ...]:
    """`teacher_pairs`, read from ``--pairs-file`` when an earlier run wrote it for the same
    model, count and teacher steps (written there otherwise)."""
    key = {"model": args.model, "pairs": args.pairs, "teacher_steps": args.teacher_steps}
    path = args.pairs_file
    if path is not None and path.exists():
        saved = torch.load(path)
        if saved["key"] == key:
            print(f"teacher pairs from {path}")
            return saved["pairs"]
        print(f"{path} holds pairs for {saved['key']}, not {key}: making them again")
    start = time.time()
    pairs = teacher_pairs(teacher, args.pairs, args.teacher_steps, PAIR_BATCH[args.model])
    seconds = time.time() - start
    print(f"teacher pairs: {seconds:.0f} s, {seconds / args.pairs:.3f} s an image")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "pairs": pairs}, path)
    return pairs


def train(
    reference: zoo.Reference,
    student: torch.nn.Module,
    pairs: tuple[torch.Tensor, ...],
    *,
    steps: int,
    sigmas: list[float] | None,
    lr: float,
    batch: int,
    seed: int,
    desc: str,
) -> torch.nn.Module:
    """Fit velocities on the straight paths; `sigmas=None` draws σ uniformly, else from the list.

    With a list, an input at a σ below the first one comes half the time from the student's own
    Euler step from the σ before it (its own trajectory), with the velocity that lands on x.
    """
    noise, labels, images = pairs
    student = student.train().requires_grad_(True)
    for module in student.modules():  # labels are never dropped: guidance is distilled
        if isinstance(module, LabelEmbedding):  # DiT's; ref-flux's prompts have no dropout
            module.dropout_prob = 0.0
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    call = reference.calling(student)

    def velocity(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        condition = reference.condition(y)
        return call(hidden_states=x, timestep=sigma * 1000, **condition, return_dict=False)[0]

    def per_image(values: torch.Tensor) -> torch.Tensor:  # [B] → [B, 1, …] against the latents
        return values.reshape(-1, *[1] * (noise.dim() - 1))

    bar = trange(steps, desc=desc)
    for step in bar:
        index = torch.randint(0, len(labels), (batch,), generator=gen)
        eps, y, x0 = noise[index], labels[index], images[index]
        if sigmas is None:
            sigma = torch.rand(batch, generator=gen)
        else:
            sigma = torch.tensor(sigmas)[torch.randint(0, len(sigmas), (batch,), generator=gen)]
        s = per_image(sigma)
        xt = (1 - s) * x0 + s * eps
        if sigmas is not None and len(sigmas) > 1:
            own = (sigma < sigmas[0]) & (torch.rand(batch, generator=gen) < 0.5)
            if own.any():  # one Euler step of the student from the previous σ in the list
                prev = torch.tensor([sigmas[sigmas.index(v) - 1] for v in sigma[own].tolist()])
                p = per_image(prev)
                start = (1 - p) * x0[own] + p * eps[own]
                with torch.no_grad():
                    xt[own] = start + (s[own] - p) * velocity(start, prev, y[own])
        target = (xt - x0) / s  # the velocity from x_σ straight to x: ε − x on the path
        loss = (velocity(xt, sigma, y) - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), student.parameters(), strict=True):
                e.lerp_(p, 1 - min(0.995, (1 + step) / (10 + step)))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = bar.format_dict["elapsed"]
    each = seconds / max(steps, 1)
    print(f"{desc}: {steps} steps of {batch} in {seconds:.0f} s, {each:.2f} s a step")
    return ema


JOINT_FRACTIONS = ("1.5", "1.67")
"""ref-dit: step 2 runs 4 or 5 of the 8 blocks (1.50 or 1.63 NFE); ref-flux: its dual-stream
block and 3 or 4 of the 7 single-stream ones (`FluxReference.unroll`)."""
JOINT_SIGMAS = [1.0, 0.5]


def joint_sampler(
    student: zoo.Reference,
    compensation: str,
    fraction: str = "1.5",
    model: torch.nn.Module | None = None,
) -> diffopt.UnrolledSampler:
    """The fractional schedule of the 2-step `student` (its model, or `model` of the same
    architecture) that ``--joint`` trains (and few_step.py rebuilds to load what it wrote)."""
    return student.unroll(
        student.model if model is None else model,
        fraction,
        sigmas=JOINT_SIGMAS,
        compensation=compensation,
        rank=8,
    )


def command(model: str, out: Path, *options: str) -> str:
    """The command line of this script that writes `model`'s students (with `options`) to `out`:
    for the messages that name a missing folder."""
    parts = ["python benchmarks/distill_ref_dit.py", "--model", model, *options]
    if Path(out).resolve() != ASSETS.resolve():
        parts += ["--out", str(out)]
    return " ".join(parts)


def joint_command(model: str, out: Path, fraction: str, compensation: str) -> str:
    """The ``--joint`` run that writes ``MODEL-FRACTIONstep-COMPENSATION/`` to `out`."""
    options = ("--joint", "--joint-fraction", fraction, "--compensation", compensation)
    return command(model, out, *options)


def two_step_folder(args: argparse.Namespace) -> Path:
    """The folder of the 2-step student ``--joint`` starts from: ``--out``'s if a run wrote it
    there, else the shipped one; neither is a FileNotFoundError naming both."""
    name = f"{args.model}-2step"
    folders = [args.out / name]
    if args.out.resolve() != zoo.ASSETS.resolve():
        folders.append(zoo.ASSETS / name)
    found = next((f for f in folders if (f / "config.json").exists()), None)
    if found is None:
        where = (
            f"neither {folders[0]} nor {folders[1]}" if len(folders) > 1 else f"not {folders[0]}"
        )
        raise FileNotFoundError(
            f"--joint starts from the 2-step student {name}, in {where}: pass the --out "
            f"of the run that wrote it, or write it with {command(args.model, args.out)}"
        )
    return found


def two_step(args: argparse.Namespace) -> zoo.Reference:
    """The 2-step student ``--joint`` starts from (`two_step_folder`)."""
    folder = two_step_folder(args)
    print(f"--joint from {folder}")
    return zoo.load(f"{args.model}-2step", folder)


def joint_folder(args: argparse.Namespace, compensation: str) -> Path:
    """Where ``--joint`` writes (and ``--resume`` reads) the schedule for `compensation`."""
    return args.out / f"{args.model}-{args.joint_fraction}step-{compensation}"


RESUMED = ("diffusion_pytorch_model.safetensors", "compensation.safetensors")
"""What ``--resume`` reads from each `joint_folder`."""


def check_resume(args: argparse.Namespace) -> None:
    """``--resume`` reads what an earlier ``--joint`` run wrote: a missing file is a
    FileNotFoundError naming the run that writes it (before the teacher pairs are made)."""
    for kind in args.compensation:
        folder = joint_folder(args, kind)
        missing = [f for f in RESUMED if not (folder / f).exists()]
        if missing:
            run = joint_command(args.model, args.out, args.joint_fraction, kind)
            raise FileNotFoundError(
                f"--resume continues from {folder / missing[0]}, which is missing; {run} writes it"
            )


def train_joint(args: argparse.Namespace, pairs: tuple[torch.Tensor, ...]) -> None:
    """Step 4: closed-form fit, then end-to-end training, per compensation form."""
    noise, labels, latents = pairs
    fit_on = slice(0, 200)
    for seed, kind in enumerate(args.compensation, start=10):
        two = two_step(args)
        out = joint_folder(args, kind)
        if args.resume:  # continue from what an earlier --joint run wrote (`check_resume`)
            weights = load_file(out / RESUMED[0])
            two.model.load_state_dict(weights)  # ref-flux's fp16 file into fp32 weights
        sampler = joint_sampler(two, kind, args.joint_fraction)
        if args.resume:
            load_compensation(sampler, out / RESUMED[1])
        else:
            diffopt.fit_compensation(sampler, noise[fit_on], two.unrolled_condition(labels[fit_on]))
        start = time.time()
        losses = diffopt.train_schedule(
            sampler,
            noise,
            two.condition(labels),
            latents,
            steps=args.joint_steps,
            lr=args.joint_lr,
            lr_schedule=args.joint_lr_schedule,
            batch=args.batch,
            seed=seed + 100 * args.resume,  # a resumed run draws other batches
            shared=two.shared_condition(),
            **feature_term(two, args.feature_weight),
        )
        each = (time.time() - start) / max(args.joint_steps, 1)
        two.save(two.model, out)
        save_compensation(sampler, out / "compensation.safetensors")
        window = min(20, len(losses))
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        print(
            f"{kind}: loss {first:.5f} -> {last:.5f}; {each:.2f} s a step "
            f"of {min(args.batch, len(labels))}; wrote {out}"
        )


def feature_term(student: zoo.Reference, weight: float) -> dict[str, Any]:
    """``--feature-weight``'s options of `diffopt.train_schedule`: the digits classifier's
    features (ref-FID's feature space) of the student's images, or none at weight 0."""
    if weight == 0:
        return {}
    classify = metrics.classifier()

    def features(latents: torch.Tensor) -> torch.Tensor:
        return classify.features(student.images(latents).clamp(-1, 1))

    return {"features": features, "feature_weight": weight}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="ref-dit", help="the teacher")
    parser.add_argument("--joint", action="store_true", help="step 4 only (see the docstring)")
    parser.add_argument("--compensation", nargs="+", default=["affine", "lowrank"])
    parser.add_argument("--joint-fraction", choices=JOINT_FRACTIONS, default="1.5")
    parser.add_argument("--joint-steps", type=int, default=600)
    parser.add_argument(
        "--resume", action="store_true", help="--joint from the weights it wrote, not the fit"
    )
    parser.add_argument("--joint-lr", type=float, default=1e-4)
    parser.add_argument(
        "--feature-weight",
        type=float,
        default=0.0,
        help="--joint: add this times the squared distance in the classifier's features",
    )
    parser.add_argument("--joint-lr-schedule", choices=["constant", "cosine"], default="constant")
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument(
        "--pairs-file",
        type=Path,
        help="keep the teacher pairs here: read when an earlier run wrote the same ones",
    )
    parser.add_argument("--teacher-steps", type=int, default=28)
    parser.add_argument("--reflow-steps", type=int, default=1500)
    parser.add_argument("--specialize-steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    if args.resume and not args.joint:
        parser.error("--resume continues a --joint run: add --joint (without it, the reflow runs)")
    if args.joint:  # what --joint reads, before the teacher pairs
        two_step_folder(args)
        if args.resume:
            check_resume(args)

    torch.manual_seed(0)
    start = time.time()
    teacher = zoo.load(args.model)
    pairs = cached_pairs(args, teacher)
    if args.joint:
        train_joint(args, pairs)
        print(f"trained in {(time.time() - start) / 60:.1f} min")
        return
    common = {"lr": args.lr, "batch": args.batch}
    reflow = train(
        teacher,
        copy.deepcopy(teacher.model),
        pairs,
        steps=args.reflow_steps,
        sigmas=None,
        seed=1,
        desc="reflow",
        **common,
    )
    names = (f"{args.model}-1step", f"{args.model}-2step")
    students = {name: zoo.SHIPPED[name][1] for name in names}  # the sigmas `zoo.load` gives
    for seed, (name, sigmas) in enumerate(students.items(), start=2):
        student = train(
            teacher,
            copy.deepcopy(reflow),
            pairs,
            steps=args.specialize_steps,
            sigmas=sigmas,
            seed=seed,
            desc=name,
            **common,
        )
        teacher.save(student, args.out / name)
    print(f"distilled in {(time.time() - start) / 60:.1f} min; wrote {sorted(students)}")


if __name__ == "__main__":
    main()
