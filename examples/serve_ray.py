"""Serve a diffusers FluxPipeline on Ray Serve, its transformer compiled by diffopt.

Each replica builds ref-flux's `FluxPipeline` (a trained Flux transformer bundled with diffopt;
no download) with the transformer compiled with cache guards and W4A4, warms it up (compile +
cache calibration), then serves requests, any number in flight at once, each with its own
cache state. On a cluster, `ray start --head` on one machine and `ray start --address=...` on
the others, then run this with `--address auto`: Ray places the replicas on any node.

Run: python examples/serve_ray.py [--replicas 1] [--requests 16] [--steps 28] [--address auto]
"""

import argparse
import functools
import time

import ray
import torch
from ray import serve

from diffopt.evaluation import metrics
from diffopt.serving import ray_app, reference_service

parser = argparse.ArgumentParser()
parser.add_argument("--replicas", type=int, default=1)
parser.add_argument("--requests", type=int, default=16)
parser.add_argument("--steps", type=int, default=28)
parser.add_argument("--quant", default="w4a4", help="a diffopt quant preset, or 'none'")
parser.add_argument("--address", default=None, help="an existing Ray cluster ('auto')")
args = parser.parse_args()

options = {"inner": "eager", "cache": {"steps": args.steps}}
if args.quant != "none":
    options["quant"] = args.quant
ray.init(address=args.address, num_cpus=None if args.address else 2, include_dashboard=False)
serve.start(proxy_location="Disabled")  # Python handles here; HTTP: serve.start() defaults
build = functools.partial(reference_service, "ref-flux", options, steps=args.steps)
handle = serve.run(ray_app(build, replicas=args.replicas), name="ref-flux")

requests = [{"label": i % 10, "seed": i} for i in range(args.requests)]
start = time.perf_counter()
replies = [handle.remote(r) for r in requests]  # all in flight together
images = torch.cat([reply.result(timeout_s=600) for reply in replies])
elapsed = time.perf_counter() - start
labels = torch.tensor([r["label"] for r in requests])
print(f"{len(requests)} requests in {elapsed:.1f} s ({len(requests) / elapsed:.2f} requests/s)")
print(f"class accuracy {metrics.class_accuracy(images, labels):.2f}")
again = handle.remote(requests[3]).result(timeout_s=600)
print(f"request 3 alone gives the same image: {torch.equal(again, images[3:4])}")
serve.shutdown()
ray.shutdown()
