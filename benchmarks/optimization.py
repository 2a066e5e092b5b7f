"""The optimization benchmark: every method of ``python -m pipelines optimize`` on one model, then one evaluation.

    python -m benchmarks.optimization [--model DIR] [--out benchmarks/results/optimization-demo] [--steps 300]

Default model: the demo model. Makes int8, prune (50% of MLP neurons and the least important block),
prune followed by distillation recovery, distillation to half the layers, ONNX and ONNX int8; evaluates
them with the unoptimized model as the baseline on the demo corpus's held-out split; writes the
variants and ``report.{json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pipelines.corpus import demo_corpus, split_documents
from pipelines.demo_model import ensure_demo_model
from pipelines.evaluate import evaluate, markdown
from pipelines.optimize import optimize

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.optimization", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the demo model)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "optimization-demo")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps")
    parser.add_argument("--keep-variants", action="store_true", help="keep the variant directories (default: only the report)")
    args = parser.parse_args(argv)
    model = args.model or ensure_demo_model()
    work = args.out / "variants"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    held_out = args.out / "held_out.txt"
    held_out.write_text(split_documents(demo_corpus())[1])
    variants = {
        "int8": dict(method="int8"),
        "pruned": dict(method="prune", mlp_keep=0.5, drop_layers=1),
        "distilled-half": dict(method="distill", steps=args.steps),
        "onnx": dict(method="onnx"),
        "onnx-int8": dict(method="onnx-int8"),
    }
    for name, options in variants.items():
        print(f"optimize: {name}", flush=True)
        optimize(options.pop("method"), model, work / name, **options)
    print("optimize: pruned-recovered (distill into the pruned model)", flush=True)
    optimize("distill", model, work / "pruned-recovered", student=str(work / "pruned"), steps=args.steps)
    order = ["int8", "onnx", "onnx-int8", "distilled-half", "pruned", "pruned-recovered"]
    results = evaluate([str(model)] + [str(work / n) for n in order], held_out, args.out)
    print(markdown(results))
    if not args.keep_variants:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
