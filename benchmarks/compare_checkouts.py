"""Two checkouts of this repository served one after the other on the same machine, alternated (A B B A ...), under
the serving benchmark's load: the "no regression" check between commits, as same-run ratios.

    git worktree add /tmp/before <commit>
    python -m benchmarks.compare_checkouts --before /tmp/before --after . --models gpt2 smollm2 --reps 2

Each server runs in bfloat16 with its checkout as the working directory (so ``python -m predictor`` imports that
checkout's code), measured greedy at C=16 and C=1 and sampled (temperature 0.2, top_p 0.9) at C=16; writes
``compare.{md,json}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

from tqdm import tqdm

from predictor.launch import start_server

from . import model as bench_model
from .loadgen import run_load
from .serving import SAMPLED, make_prompts


def measure(tree: Path, model_dir: Path, vocab: int, max_tokens: int) -> dict:
    c16, c1 = make_prompts(32, 32, vocab, 1), make_prompts(2, 32, vocab, 2)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(model_dir, Path(tmp), "--dtype", "bfloat16", "--max_num_seqs", "16", "--max_model_len", str(32 + max_tokens), name="m", cwd=tree)
        try:
            asyncio.run(run_load("warm-up", server.url, "m", c16[:16], 8, 16, rounds=1))
            greedy16 = asyncio.run(run_load("c16", server.url, "m", c16, max_tokens, 16, rounds=2))
            greedy1 = asyncio.run(run_load("c1", server.url, "m", c1, max_tokens, 1, rounds=2))
            sampled16 = asyncio.run(run_load("s16", server.url, "m", c16, max_tokens, 16, rounds=2, **SAMPLED))
        finally:
            server.stop()
    return {"c16": greedy16.tokens_per_s, "c1": greedy1.tokens_per_s, "sampled_c16": sampled16.tokens_per_s}


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
    parser.add_argument("--reps", type=int, default=2, help="Runs of each checkout per model, alternated.")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    for tree in (args.before, args.after):
        if not (tree / "predictor" / "__main__.py").is_file():
            parser.error(f"{tree} is not a checkout of this repository (no predictor/__main__.py)")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    plan = [(kind, rep, name) for kind in args.models for rep in range(args.reps) for name in (["before", "after"] if rep % 2 == 0 else ["after", "before"])]
    rows = []
    for kind, rep, name in tqdm(plan, desc="servers", unit="run"):
        model_dir = bench_model.model_dir(kind)
        rows.append({"model": kind, "rep": rep, "tree": name, **measure(trees[name], model_dir, bench_model.vocab_size(kind), args.max_tokens)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(rows, indent=1))
    text = report(rows, args.before, args.after)
    (args.out / "compare.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
