"""``python -m pipelines``: the command line of the model lifecycle toolkit."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description="Build, optimize, evaluate and ship causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-model", help="Build the demo model (cached) and print its directory.")
    demo.add_argument("--quiet", action="store_true", help="No progress bar.")
    args = parser.parse_args(argv)

    if args.command == "demo-model":
        from .demo_model import ensure_demo_model, is_built, model_path

        if not is_built(model_path()):
            print("Building the demo model (about 2.5 minutes on 2 cores, once; cached afterwards)...", file=sys.stderr)
        print(ensure_demo_model(progress=not args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
