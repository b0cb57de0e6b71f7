"""On paper: step time against GPU count under Ulysses context parallelism, FLUX.1 and Wan 2.1.

Nothing here ran on a GPU. The FLOPs of one denoiser call are counted by `FlopCounterMode` on
the real diffusers classes at their published sizes, built on the meta device (no weights);
the all-to-all volume is Ulysses' (per attention layer, each GPU exchanges its shard of q, k, v
and the output: 4 · B · S/N · D values, (N−1)/N of them leave the GPU). The time model:

    t(N) = F / (N · R) + exchange(N)          (no overlap: an upper bound)
    t(N) = max(F / (N · R), exchange(N))      (full overlap: a lower bound)

with R the per-GPU throughput (default: H100 SXM bf16 dense, 989 TFLOP/s, at 45 % utilization),
NVLink 450 GB/s per GPU and direction inside a node of 8, and 50 GB/s per GPU (400 Gb/s
InfiniBand) for the share of the exchange that crosses nodes. `--step-time` replaces F / R by a
step time measured on one GPU (the GPU session prints one). Cache reuse skips whole steps, so it
divides both terms alike and composes with this table unchanged.

    python benchmarks/parallel_scaling.py
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).parent / "results"
NODE = 8


@dataclass
class Workload:
    name: str
    tokens: int
    """The attention sequence every layer sees (image + text where they are joined)."""
    width: int
    attention_layers: int
    """Layers whose sequence is sharded (each does Ulysses' four all-to-alls)."""
    flops: float


def flux() -> Workload:
    """FLUX.1-dev at 1024² (4,096 image + 512 text tokens), batch 1 (guidance distilled)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
        )
        inputs = {
            "hidden_states": torch.randn(1, 4096, 64),
            "encoder_hidden_states": torch.randn(1, 512, 4096),
            "pooled_projections": torch.randn(1, 768),
            "timestep": torch.ones(1),
            "guidance": torch.ones(1),
            "img_ids": torch.zeros(4096, 3),
            "txt_ids": torch.zeros(512, 3),
        }
    return Workload("FLUX.1-dev, 1024², batch 1", 4096 + 512, 3072, 19 + 38, count(model, inputs))


def wan() -> Workload:
    """Wan 2.1 14B at 720p, 81 frames (21 × 90 × 160 latents in 1×2×2 patches: 75,600 video
    tokens; 512 text tokens through cross-attention, not sharded), batch 1 per guidance call."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=40,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )
        inputs = {
            "hidden_states": torch.randn(1, 16, 21, 90, 160),
            "encoder_hidden_states": torch.randn(1, 512, 4096),
            "timestep": torch.ones(1),
        }
    return Workload(
        "Wan 2.1 14B, 720p × 81 frames, batch 1", 21 * 45 * 80, 5120, 40, count(model, inputs)
    )


def count(model: torch.nn.Module, inputs: dict) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, return_dict=False)
    return float(counter.get_total_flops())


def exchange_seconds(work: Workload, gpus: int, nvlink: float, network: float) -> float:
    """Ulysses' all-to-alls of one call: bf16 q, k, v and output shards, per GPU."""
    if gpus == 1:
        return 0.0
    leaving = 4 * work.tokens / gpus * work.width * 2 * (gpus - 1) / gpus * work.attention_layers
    across = max(gpus - NODE, 0) / (gpus - 1)  # the share of peers on other nodes
    return max(leaving * (1 - across) / nvlink, leaving * across / network)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflops", type=float, default=989.0, help="per-GPU peak, bf16 dense")
    parser.add_argument("--utilization", type=float, default=0.45)
    parser.add_argument("--nvlink", type=float, default=450e9, help="bytes/s per GPU, in node")
    parser.add_argument("--network", type=float, default=50e9, help="bytes/s per GPU, across")
    parser.add_argument("--step-time", type=float, nargs=2, metavar=("FLUX_S", "WAN_S"))
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--out", type=Path, default=RESULTS / "parallel-scaling")
    args = parser.parse_args()

    rate = args.tflops * 1e12 * args.utilization
    rows = []
    for i, work in enumerate((flux(), wan())):
        one = args.step_time[i] if args.step_time else work.flops / rate
        for gpus in args.gpus:
            compute = one / gpus
            exchange = exchange_seconds(work, gpus, args.nvlink, args.network)
            rows.append(
                {
                    "workload": work.name,
                    "TFLOP per call": round(work.flops / 1e12, 1),
                    "GPUs": gpus,
                    "compute s": round(compute, 4),
                    "all-to-all s": round(exchange, 4),
                    "step s, no overlap": round(compute + exchange, 4),
                    "speed-up, no overlap": round(one / (compute + exchange), 2),
                    "speed-up, full overlap": round(one / max(compute, exchange), 2),
                }
            )
    source = (
        "measured step time"
        if args.step_time
        else (f"{args.tflops:.0f} TFLOP/s at {args.utilization:.0%}")
    )
    caption = (
        f"On paper, Ulysses context parallelism: {source}; NVLink {args.nvlink / 1e9:.0f} GB/s "
        f"per GPU in a node of {NODE}, {args.network / 1e9:.0f} GB/s per GPU across nodes"
    )
    table = tabulate(rows, headers="keys", tablefmt="github")
    print(caption + "\n\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(caption + "\n\n" + table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"), caption)


def plot(rows: list[dict], path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == name]
        gpus = [r["GPUs"] for r in mine]
        ax.plot(gpus, [r["speed-up, no overlap"] for r in mine], "o-", label=f"{name}")
        ax.plot(gpus, [r["speed-up, full overlap"] for r in mine], "--", color="gray", lw=0.8)
    ax.plot(gpus, gpus, ":", color="black", lw=0.8, label="linear")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("GPUs (Ulysses degree)")
    ax.set_ylabel("speed-up over one GPU")
    ax.set_title("on paper; dashed: full compute/exchange overlap", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
