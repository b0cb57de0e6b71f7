"""The ``diffopt`` command line: the same verbs as the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from diffopt.config import Config


def _inspect(args: argparse.Namespace) -> int:
    from diffopt.evaluation import zoo
    from diffopt.inspection import inspect

    config = Config.load(args.config) if args.config else Config()
    if args.inner:
        config.inner = args.inner
    config.strict = config.strict or args.strict
    model, inputs = zoo.resolve(args.model)
    report = inspect(model, inputs, config)
    print(report)
    if args.html:
        print(f"wrote {report.save_html(args.html)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from diffopt.evaluation import zoo
    from diffopt.exporters import export

    config = Config.load(args.config) if args.config else Config()
    model, inputs = zoo.resolve(args.model)
    out = export(
        model,
        inputs,
        config,
        format=args.format,
        out=args.out,
        dynamic_batch=args.dynamic_batch,
        dynamic_resolution=args.dynamic_resolution,
        quant_form=args.quant_form,
    )
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def _bench(args: argparse.Namespace, *, demo: bool = False) -> int:
    from pathlib import Path

    from diffopt.evaluation import bench, peers, zoo

    reference = zoo.load(args.model)
    steps = args.steps or reference.steps
    variants = [bench.baseline(), *bench.diffopt_variants(reference, steps)]
    if args.peers:
        labels, seeds = torch.arange(10), list(range(10))

        def calibrate(denoiser: object) -> torch.Tensor:
            return reference.sample(labels, seeds, denoiser=denoiser, steps=steps)

        variants += [bench.torch_compile_variant(), *peers.all_peers(calibrate, steps)]
    result = bench.run(
        reference,
        variants,
        images=args.images,
        repeats=args.repeats,
        steps=steps,
        inner=args.inner,
        seed=args.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = result.markdown()
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    written = [result.plot(out / "speed_quality.png")]
    if demo:
        for i, (name, images) in enumerate(result.samples.items()):
            written.append(bench.save_grid(images, out / f"grid_{i}_{_slug(name)}.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def _add_bench_arguments(
    p: argparse.ArgumentParser, *, images: int, repeats: int, out: str
) -> None:
    p.add_argument("--model", default="ref-dit", choices=["ref-dit", "dit-s2"])
    p.add_argument("--images", type=int, default=images, help="images per variant (labels 0..9)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, 50)")
    p.add_argument("--repeats", type=int, default=repeats, help="interleaved timing rounds")
    p.add_argument("--inner", default="inductor", choices=["eager", "aot_eager", "inductor"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help="folder for the table, plot and grids")


def _quiet_libraries() -> None:
    """Keep what other libraries say while they load (diffusers importing torchao when it is
    installed, torch's pytree deprecations) out of a command's output: a command prints its
    progress, its result and where it wrote files. ``--verbose`` lets them through."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read when diffusers sets up logging
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffopt", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="let libraries' load-time messages through"
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("inspect", help="show regions, passes and rewritten code of a model")
    p.add_argument(
        "model",
        help="a shipped model (ref-dit, dit-s2, ref-dit-1step, ref-dit-2step), a tiny one "
        "(tiny-flux, tiny-sd3, tiny-dit, tiny-pixart, tiny-unet), a local diffusers model "
        "folder, or package.module:factory returning (model, inputs)",
    )
    p.add_argument("--config", help="a Config as JSON (see diffopt.Config.save)")
    p.add_argument(
        "--inner",
        choices=["eager", "aot_eager", "inductor"],
        help="recorded in the report; inspect compiles nothing",
    )
    p.add_argument("--strict", action="store_true", help="a pass that cannot apply is an error")
    p.add_argument("--html", help="also write the report as one HTML page here")
    p.set_defaults(run=_inspect)

    p = verbs.add_parser("export", help="write an engine: ONNX files per region and a manifest")
    p.add_argument("model", help="as for inspect")
    p.add_argument("--config", help="a Config as JSON (cache settings, quant, ...)")
    p.add_argument(
        "--format",
        default="onnx",
        help="a registered engine format: onnx, tensorrt, or one a plugin registers",
    )
    p.add_argument("--out", required=True, help="engine folder to write")
    p.add_argument("--dynamic-batch", action="store_true", help="the batch as a dynamic axis")
    p.add_argument(
        "--dynamic-resolution",
        action="store_true",
        help="the latents' spatial axes (or tokens) as dynamic axes",
    )
    p.add_argument(
        "--quant-form",
        default="integer",
        choices=["integer", "qdq", "qdq_static", "custom"],
        help="how quantized linears are written (see exporters/onnx.py)",
    )
    p.set_defaults(run=_export)

    p = verbs.add_parser("bench", help="baseline vs diffopt variants (and peers) on the same seeds")
    _add_bench_arguments(p, images=300, repeats=3, out="bench-out")
    p.add_argument("--peers", action="store_true", help="also run torch.compile and cache peers")
    p.set_defaults(run=_bench)

    p = verbs.add_parser(
        "demo", help="ref-dit: baseline, capture + cleanup, calibrated cache and W4A4, as grids"
    )
    _add_bench_arguments(p, images=50, repeats=3, out="demo-out")
    p.set_defaults(run=lambda args: _bench(args, demo=True), peers=False)

    args = parser.parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    try:
        return args.run(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"diffopt {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
