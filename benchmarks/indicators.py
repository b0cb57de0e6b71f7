"""Which cheap indicator predicts when a whole step's block stack can be reused?

Runs ref-dit's 50-step sampling once with forward hooks and records, at every step, the
relative L1 change (vs the previous step) of: the stream entering block 0, block 0's residual,
and the residual of the whole block stack — the quantity step reuse gets wrong. Prints how well
each cheap indicator tracks the stack's change (Pearson and Spearman over steps) and the per-step
profile, and writes a plot.

    python benchmarks/indicators.py --images 20 --plot indicators.png
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from diffopt.evaluation import zoo


def rel_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    return ((now - before).abs().mean() / before.abs().mean()).item()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.argsort().argsort().float() for x in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--plot")
    args = parser.parse_args()

    reference = zoo.load("ref-dit")
    blocks = reference.model.transformer_blocks
    record: dict[str, list[torch.Tensor]] = {"stream in": [], "block 0 residual": [], "stack": []}
    entering: dict[str, torch.Tensor] = {}

    def first_in(module, args, kwargs):
        entering["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def first_out(module, args, kwargs, output):
        record["stream in"].append(entering["x"])
        record["block 0 residual"].append(output - entering["x"])

    def last_out(module, args, kwargs, output):
        record["stack"].append(output - entering["x"])

    blocks[0].register_forward_pre_hook(first_in, with_kwargs=True)
    blocks[0].register_forward_hook(first_out, with_kwargs=True)
    blocks[-1].register_forward_hook(last_out, with_kwargs=True)
    labels = torch.arange(args.images) % 10
    reference.sample(labels, range(args.images), steps=args.steps)

    changes = {
        name: torch.tensor([rel_l1(v[i], v[i - 1]) for i in range(1, len(v))])
        for name, v in record.items()
    }
    target = changes["stack"]
    rows = [
        [name, torch.corrcoef(torch.stack([c, target]))[0, 1].item(), spearman(c, target)]
        for name, c in changes.items()
        if name != "stack"
    ]
    print(tabulate(rows, ["indicator", "Pearson vs stack change", "Spearman"], floatfmt=".3f"))
    profile = [[i + 1, *(f"{changes[n][i]:.4f}" for n in changes)] for i in range(len(target))]
    print(tabulate(profile, ["step", *changes], tablefmt="simple"))

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, c in changes.items():
            ax.plot(range(1, len(c) + 1), c, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("relative L1 change vs previous step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
