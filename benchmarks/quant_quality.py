"""Rotated low-bit linears on a reference model: quality against the float model, memory, peers.

Samples the same images (same labels and seeds) with the unquantized model, diffopt's w4a4
pass in each setting (regular / Sylvester / no rotation at W4A4, group scales and the low-rank
branch, W4A8, W8A8) and the peer quantizers that run on CPU (torchao, optimum-quanto,
comfy-kitchen ConvRot), all applied to the same linears. Quality: PSNR and SSIM against the
unquantized images, ref-FID and class accuracy from the digits classifier. Memory: the
quantized layers' bytes against fp16, on the reference and on a 2-block model of DiT-XL/2 width
(K = 1152 and 4608), scales included.
Writes ``quant-quality.*`` for ref-dit, ``quant-quality-MODEL.*`` for the others.

Wall time is printed, but on CPU the op runs its PyTorch reference (unpack + integer matmul),
so it is not a speed claim; see benchmarks/w4a4_gpu.py for the kernels.

    python benchmarks/quant_quality.py --images 300
    python benchmarks/quant_quality.py --model ref-flux --images 40
    python benchmarks/quant_quality.py --model ref-wan --images 10 --only "W4A4 g64, clip" \
        --weight-clip output
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from tabulate import tabulate

import diffopt
from diffopt.config import Config, QuantConfig
from diffopt.evaluation import bench, peers, zoo

SETTINGS = {  # variant name -> quant preset
    "diffopt W4A4 regular": "w4a4",
    "diffopt W4A4 Sylvester": "w4a4-sylvester",
    "diffopt W4A4 no rotation": "w4a4-rtn",
    "diffopt W4A4 g64": "w4a4-g64",
    "diffopt W4A4 rank 32": "w4a4-r32",
    "diffopt W4A4 g64 rank 32": "w4a4-g64-r32",
    "diffopt W4A4 g64 rank 32 GPTQ": "w4a4-g64-r32-gptq",
    "diffopt W4A8 regular": "w4a8",
    "diffopt W4A8 g64 rank 32": "w4a8-g64-r32",
    "diffopt W4A8 g64 rank 32 GPTQ": "w4a8-g64-r32-gptq",
    "diffopt W8A8 regular": "w8a8",
}
RESULTS = Path(__file__).parent / "results"


def quantized_layers(model: torch.nn.Module, inputs: dict, preset: str | QuantConfig):
    report = diffopt.inspect(model, inputs, Config(inner="eager", quant=preset))
    return next(p for p in report.passes if p.name == "quantize")


MEMORY_PRESETS = ("w4a4", "w4a4-r32", "w4a4-r32-b8", "w4a4-g64-r32", "w4a4-g64-r32-b8")
MEMORY_PRESETS += ("w4a4-g64q8-r32-b8", "w8a8")
MEMORY_HEADERS = ["model", "setting", "layers", "fp16 KiB", "quantized KiB", "layers ratio"]
MEMORY_HEADERS += ["whole model ratio"]


def memory_rows(name: str, reference: zoo.Reference) -> list[list[str]]:
    torch.manual_seed(0)
    dit_xl = DiTTransformer2DModel(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        num_layers=2,
        sample_size=8,
        num_embeds_ada_norm=10,
    ).eval()
    models = {
        name: (reference.model, reference.make_inputs(batch=2)),
        "DiT-XL/2 width, 2 blocks": (dit_xl, zoo.example_inputs(dit_xl, batch=2)),
    }
    rows = []
    for model_name, (model, inputs) in models.items():
        fp16_model = sum(p.numel() for p in model.parameters()) * 2
        for preset in MEMORY_PRESETS:
            # bytes do not depend on the clipping rule: the cheapest one (no Hessian at K = 4608)
            setting = dataclasses.replace(QuantConfig.preset(preset), weight_clip="none")
            stats = quantized_layers(model, inputs, setting).stats
            whole = fp16_model - stats["fp16_weight_bytes"] + stats["weight_bytes"]
            rows.append(
                [
                    model_name,
                    preset,
                    int(stats["layers"]),
                    f"{stats['fp16_weight_bytes'] / 2**10:.0f}",
                    f"{stats['weight_bytes'] / 2**10:.0f}",
                    f"{stats['fp16_weight_bytes'] / stats['weight_bytes']:.2f}×",
                    f"{fp16_model / whole:.2f}×",
                ]
            )
        torch._dynamo.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("ref-dit", "ref-flux", "ref-wan"), default="ref-dit")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--inner", default="eager")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the weight-memory table (quant-memory.md; no sampling)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        help="keep the variants whose name contains one of these (and the baseline)",
    )
    parser.add_argument(
        "--weight-clip",
        choices=("auto", "output", "weight", "none"),
        help="every diffopt setting with this quant.weight_clip (default: each preset's own)",
    )
    args = parser.parse_args()

    reference = zoo.load(args.model)
    if args.memory_only:
        memory = tabulate(memory_rows(args.model, reference), MEMORY_HEADERS, tablefmt="github")
        print(memory)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "quant-memory.md").write_text(
            "Weight memory against fp16 (scales and branch included; "
            f"`python benchmarks/quant_quality.py --model {args.model} --memory-only`):\n\n"
            f"{memory}\n"
        )
        return
    layers = quantized_layers(reference.model, reference.make_inputs(batch=2), "w4a4")
    chosen = {e.where for e in layers.rewritten}
    select = chosen.__contains__
    calib_labels, calib_seeds = torch.arange(20) % 10, list(range(10_000, 10_020))

    def calibrate(model):
        reference.sample(calib_labels, calib_seeds, denoiser=model, steps=args.steps)

    def capture(model):  # one step on calibration seeds, as many as the benchmark's images
        labels, seeds = torch.arange(args.images) % 10, list(range(20_000, 20_000 + args.images))
        reference.sample(labels, seeds, denoiser=model, steps=1)

    def setting(preset: str) -> str | QuantConfig:
        if args.weight_clip is None:
            return preset
        return dataclasses.replace(QuantConfig.preset(preset), weight_clip=args.weight_clip)

    clip = f", clip {args.weight_clip}" if args.weight_clip else ""
    variants = [bench.baseline()]
    variants += [
        bench.diffopt_variant(f"{name}{clip}", {"quant": setting(q)}, warmup=capture)
        for name, q in SETTINGS.items()
    ]
    variants += [
        peers.convrot_quant(select),
        peers.torchao_quant("w4a8", select),
        peers.torchao_quant("w8a8", select),
        peers.quanto_quant("w4a8", select, calibrate),
        peers.quanto_quant("w8a8", select, calibrate),
    ]
    if args.only:
        variants = variants[:1] + [v for v in variants[1:] if any(o in v.name for o in args.only)]
    result = bench.run(
        reference,
        variants,
        images=args.images,
        repeats=args.repeats,
        steps=args.steps,
        inner=args.inner,
        memory=False,
    )
    memory = tabulate(memory_rows(args.model, reference), MEMORY_HEADERS, tablefmt="github")
    RESULTS.mkdir(exist_ok=True)
    stem = "quant-quality" if args.model == "ref-dit" else f"quant-quality-{args.model}"
    stem += f"-clip-{args.weight_clip}" if args.weight_clip else ""
    text = (
        f"{result.markdown()}\n\n{len(chosen)} linears quantized (the blocks' attention and MLP "
        "projections; embedders, AdaLN modulation and the final layer stay in float).\n\n"
        f"Weight memory against fp16 (scales included):\n\n{memory}\n"
    )
    print(text)
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    result.plot(RESULTS / f"{stem}.png")
    bench.save_grid(
        torch.cat([result.samples[v.name][:10] for v in variants]),
        RESULTS / f"{stem}-samples.png",
        columns=10,
    )


if __name__ == "__main__":
    main()
