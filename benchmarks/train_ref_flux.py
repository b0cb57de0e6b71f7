"""Train `ref-flux`, diffopt's MMDiT reference, on scikit-learn's digits with flow matching.

A diffusers `FluxTransformer2DModel` (1 dual-stream + 7 single-stream blocks, hidden 256 = 4 heads
of 64, rotary ids for image and text tokens, no guidance embedding) over 32×32 digits packed in
2×2 patches (256 tokens of 4 channels), conditioned on a class through 4 learned text tokens
(`encoder_hidden_states`) and a learned pooled vector (`pooled_projections`). It predicts the
velocity ε − x₀ of x_σ = (1 − σ)·x₀ + σ·ε with σ drawn logit-normal (as SD3 and ref-dit); 10 % of
labels become the null class so classifier-free guidance works. adaLN modulations and the output
projection start at zero (DiT's adaLN-Zero), the learning rate warms up and then decays on a
cosine, and the shipped weights are an exponential moving average, stored in fp16 (18.5 MiB).
Seeded; 101 minutes on one thread of the 2-core sandbox while other jobs shared its cores (760
steps of batch 24, 2.7 images/s, loss 0.071 over the last 100 steps); evaluation runs after.

    python benchmarks/train_ref_flux.py      # writes diffopt/evaluation/assets/ref-flux/
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffopt.evaluation import metrics, ref_flux, zoo
from diffopt.evaluation.data import NUM_CLASSES, digits

OUT = Path(__file__).parent.parent / "diffopt" / "evaluation" / "assets" / ref_flux.NAME


def zero_modulations(model: torch.nn.Module) -> None:
    """adaLN-Zero: every block starts as the identity and the output as zero."""
    for name, module in model.named_modules():
        if name == "proj_out" or (name.endswith("linear") and "norm" in name):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def save(model: torch.nn.Module, embeddings: torch.nn.Module, out: Path) -> None:
    copy.deepcopy(model).half().save_pretrained(out, safe_serialization=True)
    state = {k: v.detach().half().contiguous() for k, v in embeddings.state_dict().items()}
    save_file(state, out / ref_flux.EMBEDDINGS_FILE)


def evaluate(folder: Path, images: int, guidances: list[float]) -> None:
    """Class accuracy and ref-FID of `images` samples at the default schedule, on seeds from
    100,000 (training draws its noise from one generator; sampling seeds are per image)."""
    steps = zoo.SHIPPED[ref_flux.NAME][1]
    reference = ref_flux.load(guidances[0], steps, folder)
    labels, real = torch.arange(images) % NUM_CLASSES, digits("all")[0]
    for guidance in guidances:
        start = time.time()
        samples = reference.sample(labels, range(100_000, 100_000 + images), guidance=guidance)
        print(
            f"{folder}: {images} images, {steps} steps, guidance {guidance}: "
            f"accuracy {metrics.class_accuracy(samples, labels):.3f}, "
            f"ref-FID {metrics.ref_fid(samples, real):.2f} ({time.time() - start:.0f} s)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=760)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--checkpoint", type=Path, help="also write the EMA weights here every --every steps"
    )
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--evaluate", type=Path, help="only evaluate this trained folder")
    parser.add_argument("--eval-images", type=int, default=100, help="0: no evaluation")
    parser.add_argument("--guidance", type=float, nargs="+", help="default: the shipped scale")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    guidances = args.guidance or [zoo.SHIPPED[ref_flux.NAME][0]]
    if args.evaluate:
        evaluate(args.evaluate, args.eval_images, guidances)
        return
    torch.manual_seed(args.seed)
    images, labels = ref_flux.digits32("all")
    model = ref_flux.architecture()
    zero_modulations(model)
    config = model.config
    embeddings = ref_flux.ClassEmbeddings(config.joint_attention_dim, config.pooled_projection_dim)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    ema_embeddings = copy.deepcopy(embeddings).requires_grad_(False)
    params = [*model.parameters(), *embeddings.parameters()]
    ema_params = [*ema_model.parameters(), *ema_embeddings.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=args.warmup / args.steps
    )
    img_ids, txt_ids = ref_flux.image_ids(), ref_flux.text_ids()
    gen = torch.Generator().manual_seed(args.seed)
    print(
        f"ref-flux: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{args.steps} steps of batch {args.batch}, {args.threads} thread(s)",
        flush=True,
    )
    start, losses = time.time(), []
    for step in range(args.steps):
        index = torch.randint(0, len(images), (args.batch,), generator=gen)
        x0, y = ref_flux.pack(images[index]), labels[index].clone()
        y[torch.rand(args.batch, generator=gen) < 0.1] = NUM_CLASSES  # the null class
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen))
        s = sigma[:, None, None]
        xt = (1 - s) * x0 + s * noise
        velocity = model(
            hidden_states=xt,
            timestep=sigma,  # Flux takes σ in [0, 1] and scales it by 1000 itself
            **embeddings(y),
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = (velocity - (noise - x0)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params, strict=True):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 25 == 0 or step == 0:
            recent = sum(losses[-25:]) / len(losses[-25:])
            elapsed = time.time() - start
            print(
                f"step {step + 1:5d}  loss {recent:.4f}  lr {schedule.get_last_lr()[0]:.2e}  "
                f"{elapsed / 60:5.1f} min  {(step + 1) * args.batch / elapsed:.2f} samples/s",
                flush=True,
            )
        if args.checkpoint and (step + 1) % args.every == 0:
            save(ema_model, ema_embeddings, args.checkpoint)
    save(ema_model, ema_embeddings, args.out)
    minutes = (time.time() - start) / 60
    final = sum(losses[-100:]) / len(losses[-100:])
    print(
        f"trained {args.steps} steps in {minutes:.1f} min; final loss (last 100 steps) {final:.4f}"
    )
    print(f"wrote {args.out}")
    if args.eval_images:
        evaluate(args.out, args.eval_images, guidances)


if __name__ == "__main__":
    main()
