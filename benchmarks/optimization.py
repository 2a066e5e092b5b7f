"""The optimization benchmark: every method of ``python -m pipelines optimize`` on one model, then one evaluation.

    python -m benchmarks.optimization [--model demo|gpt2-small|smollm2|DIR] [--out DIR] [--steps 300] [--lr 1e-3]

Default model: the demo model; ``gpt2-small`` builds (once, about 45 minutes, resumable) and uses the
GPT-2-small-shaped model of ``pipelines.demo_model.GPT2_SMALL``; ``smollm2`` is the predictor's default
model (SmolLM2-135M-Instruct). Makes int8, prune (MLP neurons and the least important layers), prune
followed by distillation recovery, distillation to fewer layers, ONNX and ONNX int8; evaluates them with
the unoptimized model as the baseline on the demo corpus's held-out split; writes the variants and
``report.{json,md,png}`` under ``--out``.
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
from predictor.default_model import ensure_default_model

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.optimization", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, gpt2-small or a model directory")
    parser.add_argument("--out", type=Path, help="report directory (default: benchmarks/results/optimization-<model>)")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="distillation peak learning rate")
    parser.add_argument("--batch-size", type=int, default=16, help="distillation sequences per step (128 tokens each)")
    parser.add_argument("--keep-variants", action="store_true", help="keep the variant directories (default: only the report)")
    parser.add_argument("--resume", action="store_true", help="keep variants a previous, interrupted run finished (implies --keep-variants)")
    args = parser.parse_args(argv)
    built = {"demo": ensure_demo_model, "gpt2-small": lambda: ensure_demo_model(GPT2_SMALL), "smollm2": ensure_default_model}
    model = built[args.model]() if args.model in built else Path(args.model)
    args.out = args.out or REPO / "benchmarks" / "results" / f"optimization-{args.model if args.model in built else model.name}"
    config = json.loads((model / "config.json").read_text())
    n_layer = config.get("num_hidden_layers") or config["n_layer"]
    # GPT-2 shapes: half the MLP and a quarter of the blocks pruned, half the blocks distilled. Others (the
    # issue's SmolLM2 targets): 60% of the MLP kept and a fifth of the layers pruned, two thirds distilled.
    gpt2 = config["model_type"] == "gpt2"
    mlp_keep, drop, student = (0.5, max(1, n_layer // 4), n_layer // 2) if gpt2 else (0.6, max(1, n_layer // 5), round(n_layer * 2 / 3))
    work = args.out / "variants"
    if work.exists() and not args.resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    held_out = args.out / "held_out.txt"
    held_out.write_text(split_documents(demo_corpus())[1])
    variants = {
        "int8": dict(method="int8"),
        "pruned": dict(method="prune", mlp_keep=mlp_keep, drop_layers=drop),
        "distilled": dict(method="distill", student_layers=student, steps=args.steps, lr=args.lr, batch_size=args.batch_size),
        "onnx": dict(method="onnx"),
        "onnx-int8": dict(method="onnx-int8"),
    }
    variants["pruned-recovered"] = dict(method="distill", student=str(work / "pruned"), steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    for name, options in variants.items():  # in order: pruned-recovered needs pruned
        if args.resume and (work / name / "optimization.json").is_file():
            print(f"optimize: {name} (kept from the previous run)", flush=True)
            continue
        print(f"optimize: {name}", flush=True)
        optimize(options.pop("method"), model, work / name, overwrite=args.resume, **options)
    order = ["int8", "onnx", "onnx-int8", "distilled", "pruned", "pruned-recovered"]
    results = evaluate([str(model)] + [str(work / n) for n in order], held_out, args.out)
    print(markdown(results))
    if not (args.keep_variants or args.resume):
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
