"""The flow-matching training loop the modern references share (`ref_flux`, `ref_wan`).

A denoiser learns the velocity ε − x₀ of x_σ = (1 − σ)·x₀ + σ·ε with σ drawn logit-normal (as SD3
and ref-dit); 10 % of labels become the null class so classifier-free guidance works. adaLN
modulations and the output projection start at zero (DiT's adaLN-Zero), the learning rate warms up
and then decays on a cosine, and the result is an exponential moving average of the weights and of
the class embeddings. Everything random comes from one seeded generator, so a run reproduces.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from diffopt.evaluation.data import NUM_CLASSES
from diffopt.evaluation.zoo import EMBEDDINGS_FILE, load_weights

Batch = Callable[[torch.Generator, int], tuple[torch.Tensor, torch.Tensor]]
"""``draw(generator, batch) -> (x0, labels)``: a training batch of clean latents and labels."""
Velocity = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
"""``velocity(model, x_sigma, sigma, condition) -> v``: the model's call in its own convention."""


@dataclass
class Schedule:
    """Optimizer and averaging settings of one training run."""

    steps: int
    lr: float = 5e-4
    warmup: int = 40
    ema: float = 0.995
    seed: int = 0
    log_every: int = 25


def zero_modulations(model: nn.Module) -> None:
    """adaLN-Zero: every block starts as the identity and the output as zero (the output
    projection is ``proj_out``; the modulations, where a block has them as layers (Flux), are the
    ``linear`` layers of its norms)."""
    for name, module in model.named_modules():
        if name == "proj_out" or (name.endswith("linear") and "norm" in name):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)


def train(
    model: nn.Module,
    embeddings: nn.Module,
    draw: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
    velocity: Velocity,
    schedule: Schedule,
    *,
    checkpoint: Callable[[nn.Module, nn.Module], None] | None = None,
    checkpoint_every: int = 200,
    from_scratch: bool = True,
) -> tuple[nn.Module, nn.Module, list[float]]:
    """Train `model` and `embeddings` (labels → conditioning keywords) together.

    `from_scratch` starts the modulations at zero (adaLN-Zero); pass False to go on training
    weights that are already trained.

    Returns the averaged model, the averaged embeddings and the loss of every step. `checkpoint`
    receives the averages every `checkpoint_every` steps, so a stopped run leaves weights behind.
    """
    if not 2 <= schedule.warmup <= schedule.steps - 2:  # OneCycleLR's phases need 2 steps each
        raise ValueError(
            f"warmup ({schedule.warmup} steps) must be at least 2 steps and end at least 2 steps "
            f"before the run ({schedule.steps} steps); pass another --warmup or more --steps"
        )
    if from_scratch:
        zero_modulations(model)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    ema_embeddings = copy.deepcopy(embeddings).requires_grad_(False)
    params = [*model.parameters(), *embeddings.parameters()]
    ema_params = [*ema_model.parameters(), *ema_embeddings.parameters()]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=schedule.lr,
        total_steps=schedule.steps,
        pct_start=schedule.warmup / schedule.steps,
    )
    gen = torch.Generator().manual_seed(schedule.seed)
    start, losses = time.time(), []
    for step in range(schedule.steps):
        x0, labels = draw(gen)
        batch = len(labels)
        labels = labels.clone()
        labels[torch.rand(batch, generator=gen) < 0.1] = NUM_CLASSES  # the null class
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))
        s = sigma.reshape(-1, *[1] * (x0.dim() - 1))
        xt = (1 - s) * x0 + s * noise
        loss = (velocity(model, xt, sigma, embeddings(labels)) - (noise - x0)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr.step()
        decay = min(schedule.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params, strict=True):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % schedule.log_every == 0 or step == 0:
            recent = losses[-schedule.log_every :]
            elapsed = time.time() - start
            print(
                f"step {step + 1:5d}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {lr.get_last_lr()[0]:.2e}  {elapsed / 60:5.1f} min  "
                f"{(step + 1) * batch / elapsed:.2f} samples/s",
                flush=True,
            )
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            checkpoint(ema_model, ema_embeddings)
    return ema_model, ema_embeddings, losses


def save_fp16(model: nn.Module, embeddings: nn.Module, out: Path) -> None:
    """The diffusers folder of `model` and the class embeddings beside it, both in fp16."""
    copy.deepcopy(model).half().save_pretrained(out, safe_serialization=True)
    state = {k: v.detach().half().contiguous() for k, v in embeddings.state_dict().items()}
    save_file(state, out / EMBEDDINGS_FILE)


def command_line(
    doc: str,
    *,
    out: Path,
    build: Callable[[], tuple[nn.Module, nn.Module]],
    draw: Batch,
    velocity: Velocity,
    evaluate: Callable[[Path, int, list[float]], None],
    default_guidance: float,
    **defaults: float,
) -> None:
    """The command line of a reference's training script: train (``build()`` gives the untrained
    model and class embeddings), save in fp16 to ``--out``, then ``evaluate(folder, images,
    guidances)``; ``--evaluate FOLDER`` only evaluates. `defaults` override `Schedule`'s fields
    and the batch size ``batch``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=int(defaults.get("steps", 760)))
    parser.add_argument("--batch", type=int, default=int(defaults.get("batch", 24)))
    parser.add_argument("--lr", type=float, default=defaults.get("lr", 5e-4))
    parser.add_argument("--warmup", type=int, default=int(defaults.get("warmup", 40)))
    parser.add_argument("--ema", type=float, default=defaults.get("ema", 0.995))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument(
        "--checkpoint", type=Path, help="also write the EMA weights here every --every steps"
    )
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument(
        "--resume",
        type=Path,
        help="go on training the weights in this trained folder (a new warm-up and cosine)",
    )
    parser.add_argument("--evaluate", type=Path, help="only evaluate this trained folder")
    parser.add_argument("--eval-images", type=int, default=100, help="0: no evaluation")
    parser.add_argument("--guidance", type=float, nargs="+", help="default: the shipped scale")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    guidances = args.guidance or [default_guidance]
    if args.evaluate:
        evaluate(args.evaluate, args.eval_images, guidances)
        return
    torch.manual_seed(args.seed)
    model, embeddings = build()
    if args.resume:
        load_weights(model, embeddings, args.resume)
    print(
        f"{out.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{args.steps} steps of batch {args.batch}, {args.threads} thread(s)"
        + (f", resuming {args.resume}" if args.resume else ""),
        flush=True,
    )
    schedule = Schedule(args.steps, args.lr, args.warmup, args.ema, args.seed)
    start = time.time()
    checkpoint = None
    if args.checkpoint:

        def checkpoint(model: nn.Module, embeddings: nn.Module) -> None:
            save_fp16(model, embeddings, args.checkpoint)

    model, embeddings, losses = train(
        model,
        embeddings,
        lambda gen: draw(gen, args.batch),
        velocity,
        schedule,
        checkpoint=checkpoint,
        checkpoint_every=args.every,
        from_scratch=args.resume is None,
    )
    save_fp16(model, embeddings, args.out)
    final = sum(losses[-100:]) / len(losses[-100:])
    print(
        f"trained {args.steps} steps in {(time.time() - start) / 60:.1f} min; "
        f"final loss (last 100 steps) {final:.4f}\nwrote {args.out}",
        flush=True,
    )
    if args.eval_images:
        evaluate(args.out, args.eval_images, guidances)
