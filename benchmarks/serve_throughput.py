"""Requests per second through Ray Serve: 1 replica against 2, ref-flux with diffopt's cache.

Both applications are deployed side by side (each replica builds ref-flux's `FluxPipeline`, its
transformer compiled with cache guards, warms up and calibrates), then timed in interleaved
rounds: each round sends `--requests` requests at once to one application and waits for all;
the median round counts. A replica runs torch on one thread (`threads=1`): the single-threaded
workload, so that 2 replicas on 2 cores can at best double it. With `--workers` above 1 a
replica runs that many requests at once on its threads, whose ops then spread over both cores
already (16 workers: 1 replica 0.93 requests/s, 2 replicas 1.13, 1.2×). Replicas reserve half
a CPU each in Ray's accounting, only so that both applications fit on 2 cores at once; the one
not being timed is idle. A replica takes at most `--max-ongoing` requests at a time (default
`--workers`); Ray Serve holds the rest and hands each to the first replica free. With 16 let
in at once (`--max-ongoing 16`) the router split them unevenly (1 worker: 1.41×).

    python benchmarks/serve_throughput.py --requests 16 --rounds 3 --steps 28 --workers 1
    python benchmarks/serve_throughput.py --rounds 3 --steps 28 --workers 1 --max-ongoing 16
    python benchmarks/serve_throughput.py --requests 16 --rounds 3 --steps 28 --workers 16
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import ray
import torch
from ray import serve
from tabulate import tabulate

from diffopt.serving import ray_app, reference_service

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--workers", type=int, default=1, help="requests a replica runs at once (its threads)"
    )
    parser.add_argument(
        "--max-ongoing", type=int, help="requests let into a replica at once (default: --workers)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "serve-throughput")
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    options = {"inner": "eager", "cache": {"steps": args.steps}}
    build = functools.partial(
        reference_service, "ref-flux", options, steps=args.steps, workers=args.workers
    )
    ongoing = args.max_ongoing or args.workers
    handles = {
        n: serve.run(
            ray_app(build, replicas=n, cpus=0.5, max_ongoing_requests=ongoing),
            name=f"r{n}",
            route_prefix=None,
        )
        for n in args.replicas
    }
    requests = [{"label": i % 10, "seed": i} for i in range(args.requests)]
    expected = {}
    seconds: dict[int, list[float]] = {n: [] for n in args.replicas}
    for _ in range(args.rounds):
        for n, handle in handles.items():
            start = time.perf_counter()
            replies = [handle.remote(r) for r in requests]
            images = [reply.result(timeout_s=3600) for reply in replies]
            seconds[n].append(time.perf_counter() - start)
            expected.setdefault("images", images)
            same = all(torch.equal(a, b) for a, b in zip(images, expected["images"], strict=True))
            assert same, f"{n} replicas gave other images than the first application"
    serve.shutdown()
    ray.shutdown()

    base = statistics.median(seconds[args.replicas[0]])
    table = [
        {
            "replicas": n,
            "requests/s": round(args.requests / statistics.median(seconds[n]), 3),
            "seconds per round (median)": round(statistics.median(seconds[n]), 2),
            "rounds": [round(s, 2) for s in seconds[n]],
            f"× {args.replicas[0]} replica": round(base / statistics.median(seconds[n]), 2),
        }
        for n in args.replicas
    ]
    caption = (
        f"ref-flux FluxPipeline, {args.steps} steps, cache guards, {args.requests} requests in "
        f"flight per round, {args.workers} at a time per replica ({ongoing} let in), median of "
        f"{args.rounds} interleaved rounds, torch on 1 thread per replica, Ray on 2 CPUs"
    )
    print(caption + "\n")
    print(tabulate(table, headers="keys", tablefmt="github"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    markdown = caption + "\n\n" + tabulate(table, headers="keys", tablefmt="github") + "\n"
    args.out.with_suffix(".md").write_text(markdown)
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n")
    plot(table, args.out.with_suffix(".png"), caption)


def plot(table: list[dict], path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    replicas = [str(row["replicas"]) for row in table]
    ax.bar(replicas, [row["requests/s"] for row in table], color="tab:blue")
    ax.set_xlabel("Ray Serve replicas (1 torch thread each, 2 CPU cores)")
    ax.set_ylabel("requests / s")
    ax.set_title(caption.split(",")[0] + ", cache guards", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
