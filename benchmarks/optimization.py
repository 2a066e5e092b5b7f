"""The optimization benchmark: every method of ``python -m pipelines optimize`` on one model, then one evaluation.

    python -m benchmarks.optimization [--model demo|gpt2-small|DIR] [--out DIR] [--steps 300] [--lr 1e-3]

Default model: the demo model; ``gpt2-small`` builds (once, about 45 minutes, resumable) and uses the
GPT-2-small-shaped model of ``pipelines.demo_model.GPT2_SMALL``. Makes int8, prune (50% of MLP neurons
and the least important quarter of the blocks),
prune followed by distillation recovery, distillation to half the layers, ONNX and ONNX int8; evaluates
them with the unoptimized model as the baseline on the demo corpus's held-out split; writes the
variants and ``report.{json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pipelines.corpus import demo_corpus, split_documents
from pipelines.demo_model import GPT2_SMALL, ensure_demo_model
from pipelines.evaluate import evaluate, markdown
from pipelines.optimize import optimize

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.optimization", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, gpt2-small or a model directory")
    parser.add_argument("--out", type=Path, help="report directory (default: benchmarks/results/optimization-<model>)")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="distillation peak learning rate")
    parser.add_argument("--keep-variants", action="store_true", help="keep the variant directories (default: only the report)")
    args = parser.parse_args(argv)
    built = {"demo": ensure_demo_model, "gpt2-small": lambda: ensure_demo_model(GPT2_SMALL)}
    model = built[args.model]() if args.model in built else Path(args.model)
    args.out = args.out or REPO / "benchmarks" / "results" / f"optimization-{args.model if args.model in built else model.name}"
    n_layer = json.loads((model / "config.json").read_text())["n_layer"]
    work = args.out / "variants"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    held_out = args.out / "held_out.txt"
    held_out.write_text(split_documents(demo_corpus())[1])
    variants = {
        "int8": dict(method="int8"),
        "pruned": dict(method="prune", mlp_keep=0.5, drop_layers=max(1, n_layer // 4)),
        "distilled-half": dict(method="distill", steps=args.steps, lr=args.lr),
        "onnx": dict(method="onnx"),
        "onnx-int8": dict(method="onnx-int8"),
    }
    for name, options in variants.items():
        print(f"optimize: {name}", flush=True)
        optimize(options.pop("method"), model, work / name, **options)
    print("optimize: pruned-recovered (distill into the pruned model)", flush=True)
    optimize("distill", model, work / "pruned-recovered", student=str(work / "pruned"), steps=args.steps, lr=args.lr)
    order = ["int8", "onnx", "onnx-int8", "distilled-half", "pruned", "pruned-recovered"]
    results = evaluate([str(model)] + [str(work / n) for n in order], held_out, args.out)
    print(markdown(results))
    if not args.keep_variants:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
