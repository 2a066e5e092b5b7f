"""The serving benchmark: this predictor against the baselines, on a GPT-2-small-shaped and a
SmolLM2-135M-shaped (Llama) model, in one run.

    python -m benchmarks.serving [--models gpt2 llama] [--concurrency 16] [--prompt-len 32] [--max-tokens 128] [--out benchmarks/results]

Runs, per model and in order, each in its own process so that none shares threads with another:
  1. static batch: ``model.generate`` on one batch of C prompts, in-process (and on one prompt: "direct generate C=1");
  2. GPT-2 only: the seed (the Flask app calling ``model.generate`` per request) and this predictor with
     batching off (``--max_num_seqs 1``), at concurrency C;
  3. this predictor (``--max_num_seqs C``), at concurrency 1 and at concurrency C.
Writes ``serving.json`` and ``serving.md`` (a table per model, with ratios and the targets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from predictor.launch import free_port, start_server

from . import model as bench_model
from .loadgen import RunResult, run_load

REPO = Path(__file__).resolve().parents[1]


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def static_batch(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.static_batch", "--model_dir", str(model_dir), "--prompts", json.dumps(prompts), "--max_tokens", str(max_tokens)]
    return json.loads(subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def flask_seed(model_dir: Path, prompts, max_tokens: int, concurrency: int, log_dir: Path) -> RunResult:
    port = free_port()
    log = (log_dir / "flask.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.flask_seed", "--model_dir", str(model_dir), "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the Flask baseline did not start; see flask.log") from None
                time.sleep(0.5)
        return asyncio.run(run_load("seed: Flask + generate per request", url, "m", prompts, max_tokens, concurrency, rounds=1, stream=False))
    finally:
        process.terminate()
        process.wait(timeout=30)


def predictor_runs(model_dir: Path, prompts, max_tokens: int, concurrency: int, log_dir: Path, max_len: int, batching_off: bool) -> list[RunResult]:
    results = []
    if batching_off:
        server = start_server(model_dir, log_dir, "--max_num_seqs", "1", "--max_model_len", str(max_len), name="m", cwd=REPO)
        try:
            results.append(asyncio.run(run_load("predictor, batching off (--max_num_seqs 1)", server.url, "m", prompts, max_tokens, concurrency, rounds=1)))
        finally:
            server.stop()
    server = start_server(model_dir, log_dir, "--max_num_seqs", str(concurrency), "--max_model_len", str(max_len), name="m", cwd=REPO)
    try:
        results.append(asyncio.run(run_load("predictor", server.url, "m", prompts, max_tokens, 1, rounds=2)))
        results.append(asyncio.run(run_load("predictor", server.url, "m", prompts, max_tokens, concurrency, rounds=2)))
    finally:
        server.stop()
    return results


def fmt(value: float | None, scale: float = 1000.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


MODEL_TITLES = {
    "gpt2": "GPT-2-small shape (12 layers, width 768, 12 heads, 124 M parameters)",
    "llama": "SmolLM2-135M shape (Llama: 30 layers, width 576, 9 heads over 3 KV heads, MLP 1,536, 49,152 tokens, tied embeddings)",
}
# (target name, minimum ratio) per model: C=C_MAX throughput over the static batch, and C=1 over direct generate
TARGETS = {"gpt2": {"static": 1.9, "direct": 1.2, "seed": 10.0}, "llama": {"static": 1.5, "direct": 1.2}}


def report(kind: str, rows: list[dict], static: dict, direct: dict, concurrency: int, settings: dict) -> str:
    seed = next((r for r in rows if r["name"].startswith("seed")), None)
    ours = next(r for r in rows if r["name"] == "predictor" and r["concurrency"] == concurrency)
    ours_1 = next(r for r in rows if r["name"] == "predictor" and r["concurrency"] == 1)
    targets = TARGETS[kind]

    def vs_seed(tokens_per_s: float) -> str:
        return f"{tokens_per_s / seed['tokens_per_s']:.2f}" if seed else ""

    lines = [
        f"Model: {MODEL_TITLES[kind]}, random weights, fp32. "
        f"Prompts: {settings['prompt_len']} token ids; output: {settings['max_tokens']} tokens (ignore_eos, greedy). "
        f"Machine: {settings['machine']}.",
        "",
        "| run | C | output tokens/s | × static batch | × seed | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| static batch: model.generate, one batch, no server | {static['batch']} | {static['tokens_per_s']:.1f} | 1.00 | "
        f"{vs_seed(static['tokens_per_s'])} | | | | | |",
        f"| direct model.generate, one prompt | 1 | {direct['tokens_per_s']:.1f} | {direct['tokens_per_s'] / static['tokens_per_s']:.2f} | | | | | | |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / static['tokens_per_s']:.2f} | "
            f"{vs_seed(r['tokens_per_s'])} | {fmt(r['ttft_p50_s'])} | {fmt(r['ttft_p99_s'])} | {fmt(r['itl_p50_s'])} | "
            f"{fmt(r['itl_p99_s'])} | {r['errors']} |"
        )
    checks = [
        (f"throughput at C={concurrency} ≥ {targets['static']}× static batch", ours["tokens_per_s"] / static["tokens_per_s"], targets["static"]),
        (f"throughput at C=1 ≥ {targets['direct']}× direct model.generate", ours_1["tokens_per_s"] / direct["tokens_per_s"], targets["direct"]),
    ]
    if seed and "seed" in targets:
        checks.append((f"throughput at C={concurrency} ≥ {targets['seed']:g}× seed", ours["tokens_per_s"] / seed["tokens_per_s"], targets["seed"]))
    itl_ratio = ours["itl_p50_s"] / ours_1["itl_p50_s"]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value:.2f}× | {'yes' if value >= goal else 'NO'} |" for name, value, goal in checks]
    lines.append(f"| p50 ITL at C={concurrency} ≤ 3× p50 ITL at C=1 | {itl_ratio:.2f}× | {'yes' if itl_ratio <= 3.0 else 'NO'} |")
    return "\n".join(lines)


def bench_model_runs(kind: str, args: argparse.Namespace) -> tuple[str, dict]:
    model_dir = bench_model.ensure(kind)
    prompts = make_prompts(4 * args.concurrency, args.prompt_len, bench_model.vocab_size(kind))
    max_len = args.prompt_len + args.max_tokens
    baselines = kind == "gpt2"  # the seed and batching-off runs answer the first serving issue, on GPT-2
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        print(f"[{kind}] static batch ...", flush=True)
        static = static_batch(model_dir, prompts[: args.concurrency], args.max_tokens)
        direct = static_batch(model_dir, prompts[:1], args.max_tokens)
        rows = []
        if baselines:
            print(f"[{kind}] seed (Flask) ...", flush=True)
            rows.append(flask_seed(model_dir, prompts, args.max_tokens, args.concurrency, log_dir))
        print(f"[{kind}] predictor ...", flush=True)
        rows += predictor_runs(model_dir, prompts, args.max_tokens, args.concurrency, log_dir, max_len, batching_off=baselines)
    summaries = [r.summary() for r in rows]
    settings = {
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    table = report(kind, summaries, static, direct, args.concurrency, settings)
    return table, {"settings": settings, "static_batch": static, "direct_generate": direct, "runs": summaries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(bench_model.MODELS), default=["gpt2", "llama"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tables, results = [], {}
    for kind in args.models:
        table, results[kind] = bench_model_runs(kind, args)
        tables.append(table)
        print(table, flush=True)
    (args.out / "serving.json").write_text(json.dumps(results, indent=2))
    (args.out / "serving.md").write_text("\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
