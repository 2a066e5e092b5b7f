"""``python -m pipelines``: the command line of the model lifecycle toolkit."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description="Build, optimize, evaluate and ship causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-model", help="Build the demo model (cached) and print its directory.")
    demo.add_argument("--quiet", action="store_true", help="No progress bar.")

    opt = commands.add_parser("optimize", help="Make an optimized variant of a model directory.")
    opt.add_argument("--method", required=True, choices=["int8", "prune", "distill", "onnx", "onnx-int8", "cast"])
    opt.add_argument("--input", required=True, help="Hugging Face model directory.")
    opt.add_argument("--output", required=True, help="New directory for the variant (with optimization.json).")
    opt.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    opt.add_argument("--text", help="Training/calibration text: a .txt file or a directory of them (default: the demo corpus).")
    opt.add_argument("--mlp-keep", type=float, default=0.5, help="prune: fraction of MLP neurons kept in every block.")
    opt.add_argument("--drop-layers", type=int, default=0, help="prune: number of whole blocks removed (least important first).")
    opt.add_argument("--student-layers", type=int, help="distill: blocks in the student (default: half the teacher's).")
    opt.add_argument("--student", help="distill: an existing student model directory (e.g. a pruned model) instead.")
    opt.add_argument("--steps", type=int, default=300, help="distill: training steps.")
    opt.add_argument("--temperature", type=float, default=2.0, help="distill: softmax temperature T.")
    opt.add_argument("--alpha", type=float, default=0.5, help="distill: weight of the soft (KL) term.")
    opt.add_argument("--dtype", default="bfloat16", help="cast: bfloat16 or float16 weights (for GPUs).")

    ev = commands.add_parser("evaluate", help="Measure models on held-out text: report.json, report.md, report.png.")
    ev.add_argument("--model", action="append", required=True, help="Model directory (repeat; the first is the baseline).")
    ev.add_argument("--text", required=True, help="Held-out text file.")
    ev.add_argument("--output", required=True, help="Report directory.")
    args = parser.parse_args(argv)

    if args.command == "demo-model":
        from .demo_model import ensure_demo_model, is_built, model_path

        if not is_built(model_path()):
            print("Building the demo model (about 2.5 minutes on 2 cores, once; cached afterwards)...", file=sys.stderr)
        print(ensure_demo_model(progress=not args.quiet))
    elif args.command == "optimize":
        from .optimize import OptimizationError, optimize

        options = {
            "prune": dict(mlp_keep=args.mlp_keep, drop_layers=args.drop_layers, text=args.text),
            "distill": dict(
                student_layers=args.student_layers, student=args.student, steps=args.steps, temperature=args.temperature, alpha=args.alpha, text=args.text
            ),
            "cast": dict(dtype=args.dtype),
        }.get(args.method, {})
        try:
            report = optimize(args.method, args.input, args.output, overwrite=args.overwrite, **options)
        except OptimizationError as exc:
            parser.error(str(exc))
        print(json.dumps({k: v for k, v in report.items() if k != "train_loss"}, indent=2))
    elif args.command == "evaluate":
        from .evaluate import evaluate

        try:
            results = evaluate(args.model, args.text, args.output)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            parser.error(str(exc))
        from .evaluate import markdown

        print(markdown(results))
        print(f"report: {args.output}/report.json, report.md, report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
