"""What does cutting a denoiser into regions cost per call?

Compares, per tiny model, three callables measured interleaved in one run (median of rounds):
eager PyTorch, `torch.compile(backend=INNER)` on the whole graph, and the diffopt backend with the
same inner backend on each region and no passes but cleanups. Prints a table, writes a plot.

    python benchmarks/region_overhead.py --inner aot_eager --rounds 15 --plot region_overhead.png
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from diffopt.evaluation import zoo


def per_call_ms(fn, inputs: dict, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(**inputs)
    return (time.perf_counter() - start) * 1e3 / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inner", default="aot_eager", choices=["eager", "aot_eager", "inductor"])
    parser.add_argument("--models", nargs="+", default=sorted(zoo.TINY_MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10, help="calls per timed round")
    parser.add_argument("--plot", help="write a bar chart of the ratios here (needs matplotlib)")
    args = parser.parse_args()

    table = Table(title=f"per-call time, inner={args.inner}, median of {args.rounds} rounds")
    for column in ("model", "eager ms", f"{args.inner} ms", "diffopt ms", "diffopt / whole"):
        table.add_column(column, justify="right")
    ratios = {}
    for name in args.models:
        model, inputs = zoo.build(name)
        torch._dynamo.reset()
        candidates = {
            "eager": model,
            "whole": torch.compile(model, backend=args.inner),
            "diffopt": torch.compile(
                model, backend="diffopt", options={"inner": args.inner, "cleanup": None}
            ),
        }
        times: dict[str, list[float]] = {key: [] for key in candidates}
        with torch.no_grad():
            for fn in candidates.values():
                fn(**inputs)  # compile and warm up
            for _ in range(args.rounds):  # interleaved, so drift hits all three alike
                for key, fn in candidates.items():
                    times[key].append(per_call_ms(fn, inputs, args.calls))
        median = {key: statistics.median(values) for key, values in times.items()}
        ratios[name] = median["diffopt"] / median["whole"]
        table.add_row(
            name,
            f"{median['eager']:.3f}",
            f"{median['whole']:.3f}",
            f"{median['diffopt']:.3f}",
            f"{ratios[name]:.2f}x",
        )
    Console().print(table)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
        f" torch {torch.__version__}"
    )

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(ratios), list(ratios.values()))
        ax.axhline(1.0, color="gray", linewidth=1)
        ax.set_ylabel(f"diffopt / whole-graph {args.inner}")
        ax.set_title("region split overhead per call (lower is better)")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
