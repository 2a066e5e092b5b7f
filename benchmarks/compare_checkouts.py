"""Two checkouts of this repository served one after the other on the same machine, alternated (A B B A ...), under
the serving benchmark's load: the "no regression" check between commits, as same-run ratios.

    git worktree add /tmp/before <commit>
    python -m benchmarks.compare_checkouts --before /tmp/before --after . --models gpt2 smollm2 --reps 2

Each server runs in bfloat16 with its checkout as the working directory (so ``python -m predictor`` imports that
checkout's code), measured by the serving benchmark's own runs (``serving.predictor_runs``: greedy at C=1 and C=16,
sampled with temperature 0.2, top_p 0.9 at C=16, the same prompts for both); writes ``compare.{md,json}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tqdm import tqdm

from . import model as bench_model
from . import serving


def measure(tree: Path, kind: str, args: argparse.Namespace) -> dict:
    """One server of checkout ``tree`` on benchmark model ``kind``, through the serving benchmark's own runs."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = serving.predictor_runs(
            bench_model.model_dir(kind),
            serving.bench_prompts(bench_model.vocab_size(kind), args),
            args,
            Path(tmp),
            args.prompt_len + args.max_tokens,
            "bfloat16",
            sampled=True,
            cwd=tree,
        )
    c1, c16, sampled = runs  # measure_server's order: C=1, C=concurrency, sampled at C
    return {"c1": c1["tokens_per_s"], "c16": c16["tokens_per_s"], "sampled_c16": sampled["tokens_per_s"]}


KEYS = ("c16", "c1", "sampled_c16")


def _mean(rows: list[dict], key: str, tree: str) -> float:
    return statistics.mean(r[key] for r in rows if r["tree"] == tree)


def report(rows: list[dict], before: Path, after: Path) -> str:
    lines = [
        f"before: {before}, after: {after}; bfloat16, 32-token prompts, streaming, output tokens/s, alternated runs.",
        "",
        "| model | run | before C=16 | after C=16 | before C=1 | after C=1 | before sampled C=16 | after sampled C=16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == kind]
        for rep in sorted({r["rep"] for r in mine}):
            b = next(r for r in mine if r["rep"] == rep and r["tree"] == "before")
            a = next(r for r in mine if r["rep"] == rep and r["tree"] == "after")
            cells = " | ".join(f"{b[k]:.1f} | {a[k]:.1f}" for k in KEYS)
            lines.append(f"| {kind} | {rep + 1} | {cells} |")
        ratio = {k: _mean(mine, k, "after") / _mean(mine, k, "before") for k in KEYS}
        lines.append(f"| {kind} | after ÷ before (means) | | {ratio['c16']:.2f}× | | {ratio['c1']:.2f}× | | {ratio['sampled_c16']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="A checkout of the earlier commit (git worktree add).")
    parser.add_argument("--after", type=Path, default=Path("."))
    parser.add_argument("--models", nargs="+", choices=["gpt2", "smollm2", "llama"], default=["gpt2", "smollm2"])
    parser.add_argument("--reps", type=int, default=2, help="Runs of each checkout per model, alternated (at least 1).")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="Requests per client in each measured run.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.reps < 1 or args.rounds < 1 or args.max_tokens < 1:
        parser.error("--reps, --rounds and --max-tokens must be at least 1")
    args.concurrency, args.prompt_len = 16, 32  # the serving benchmark's load
    for tree in (args.before, args.after):
        if not (tree / "predictor" / "__main__.py").is_file():
            parser.error(f"{tree} is not a checkout of this repository (no predictor/__main__.py)")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    plan = [(kind, rep, name) for kind in args.models for rep in range(args.reps) for name in (["before", "after"] if rep % 2 == 0 else ["after", "before"])]
    rows = []
    for kind, rep, name in tqdm(plan, desc="servers", unit="run"):
        try:
            rows.append({"model": kind, "rep": rep, "tree": name, **measure(trees[name], kind, args)})
        except RuntimeError as exc:  # start_server: the server exited or never became ready (its log's tail)
            parser.exit(1, f"compare_checkouts: the {name} checkout ({trees[name]}) did not serve {kind}: {exc}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(rows, indent=1))
    text = report(rows, args.before, args.after)
    (args.out / "compare.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
