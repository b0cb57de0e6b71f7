"""The ``diffopt`` command line: the same verbs as the Python API."""

from __future__ import annotations

import argparse
import sys

from diffopt.config import Config


def _inspect(args: argparse.Namespace) -> int:
    from diffopt import zoo
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffopt", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("inspect", help="show regions, passes and rewritten code of a model")
    p.add_argument(
        "model",
        help="a built-in name (tiny-flux, tiny-sd3, tiny-dit, tiny-pixart, tiny-unet), "
        "a local diffusers model folder, or package.module:factory returning (model, inputs)",
    )
    p.add_argument("--config", help="a Config as JSON (see diffopt.Config.save)")
    p.add_argument("--inner", choices=["eager", "aot_eager", "inductor"])
    p.add_argument("--strict", action="store_true", help="a pass that cannot apply is an error")
    p.add_argument("--html", help="also write the report as one HTML page here")
    p.set_defaults(run=_inspect)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        print(f"diffopt {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
