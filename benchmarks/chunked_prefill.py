"""Chunked prefill under load: do long prompts stall the streams being decoded?

    python -m benchmarks.chunked_prefill [--server predictor|vllm|both] [--model llama|smollm2] [--dtype auto|float32|bfloat16]
                                         [--max_prefill_tokens 2048 256 ...] [--duration 30] [--out benchmarks/results]

16 streaming clients decode in a closed loop (32-token prompts, 128 tokens out, ignore_eos) while one more client
sends a 2,000-token prompt (max_tokens 1, a new random one each time, so no prefix cache helps) every 2 s (at once
when the previous one took longer). Reported: the 16 streams' inter-token latency p50 and p99 and p99/p50 (target
≤ 3×: a long prefill is cut into chunks that share steps with the decodes, instead of stopping them for a whole
2,000-token forward pass), and the long prompts' latency. The predictor runs once per ``--max_prefill_tokens``
value (its per-step prompt-token budget, default 2048); vLLM-CPU with its own chunked-prefill defaults
(``--vllm-args`` passes more). Both in the same dtype (default: what the predictor's ``--dtype auto`` picks on this
CPU). Writes ``chunked_prefill.json`` and ``chunked_prefill.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from predictor.launch import start_server

from . import model as bench_model
from . import vllm_cpu
from .loadgen import RunResult, one_request, request_body
from .serving import REPO, auto_dtype, fmt, machine_settings, make_prompts

TARGET = 3.0  # ITL p99 / p50 of the decoding streams
MIN_SAMPLES = 50  # fewer inter-token gaps than this give no verdict


async def chunked_load(url: str, model: str, args: argparse.Namespace, vocab: int) -> dict:
    """Warm up, then the streams and the long-prompt client together for ``args.duration`` seconds."""
    short = make_prompts(args.streams * 64, args.prompt_len, vocab, seed=10)
    long = make_prompts(int(args.duration / args.interval) + 8, args.long_prompt_len, vocab, seed=11)
    limits = httpx.Limits(max_connections=args.streams + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        warm = RunResult("warm-up", 2, 0, 0, 0.0, 0)
        await asyncio.gather(
            one_request(client, url, request_body(model, short[-1], 8, True), warm),
            one_request(client, url, request_body(model, long[-1], 1, False), warm),
        )
        if warm.errors:
            raise RuntimeError(f"the warm-up requests to {url} failed")
        streams = RunResult("streams", args.streams, 0, 0, 0.0, 0)
        prefills = RunResult("long prompts", 1, 0, 0, 0.0, 0)

        async def stream_worker(w: int) -> None:
            for k in range(10**6):
                streams.requests += 1
                await one_request(client, url, request_body(model, short[(w + k * args.streams) % len(short)], args.max_tokens, True), streams)

        async def long_client() -> None:
            next_send = time.perf_counter() + args.interval  # the streams are decoding by then
            for k in range(len(long) - 1):
                await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
                next_send = time.perf_counter() + args.interval
                prefills.requests += 1
                await one_request(client, url, request_body(model, long[k], 1, False), prefills)

        start = time.perf_counter()
        tasks = [asyncio.create_task(stream_worker(w)) for w in range(args.streams)] + [asyncio.create_task(long_client())]
        await asyncio.sleep(args.duration)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        seconds = time.perf_counter() - start

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    p50, p99 = pct(streams.itl, 50), pct(streams.itl, 99)
    return {
        "seconds": seconds,
        "stream_tokens": streams.output_tokens,
        "stream_tokens_per_s": streams.output_tokens / seconds,
        "stream_errors": streams.errors,
        "itl_samples": len(streams.itl),
        "itl_p50_s": p50,
        "itl_p90_s": pct(streams.itl, 90),
        "itl_p99_s": p99,
        "itl_max_s": max(streams.itl) if streams.itl else None,
        "itl_p99_over_p50": p99 / p50 if p50 and p99 else None,
        # Gaps under 1 ms: tokens that reached the client in one burst (a server, or a client, starved of CPU).
        "itl_bunched_share": float(np.mean(np.array(streams.itl) < 1e-3)) if streams.itl else None,
        "long_prompts_sent": prefills.requests,
        "long_prompts_done": len(prefills.ttft),
        "long_prompt_latency_p50_s": pct(prefills.ttft, 50),
        "long_prompt_latency_max_s": max(prefills.ttft) if prefills.ttft else None,
        "long_errors": prefills.errors,
    }


def run_predictor(model_dir: Path, log_dir: Path, args: argparse.Namespace, vocab: int, dtype: str, max_prefill_tokens: int) -> dict:
    flags = ["--dtype", dtype, "--max_num_seqs", str(args.streams + 1), "--max_model_len", str(args.max_model_len)]
    server = start_server(model_dir, log_dir, *flags, "--max_prefill_tokens", str(max_prefill_tokens), name="m", cwd=REPO)
    try:
        result = asyncio.run(chunked_load(server.url, "m", args, vocab))
    finally:
        server.stop()
    return {"server": "predictor", "dtype": dtype, "config": f"--max_prefill_tokens {max_prefill_tokens}", **result}


def run_vllm(model_dir: Path, log_dir: Path, args: argparse.Namespace, vocab: int, dtype: str) -> dict:
    extra = shlex.split(args.vllm_args)
    with vllm_cpu.serve(model_dir, log_dir, dtype, *extra, max_model_len=args.max_model_len) as server:
        result = asyncio.run(chunked_load(server.url, vllm_cpu.MODEL_NAME, args, vocab))
    return {"server": "vllm", "dtype": dtype, "config": " ".join(extra) or "defaults", "start_s": round(server.start_seconds, 1), **result}


def report(rows: list[dict], args: argparse.Namespace, machine: str, notes: list[str]) -> str:
    lines = [
        f"Chunked prefill: {args.streams} streaming clients (closed loop, {args.prompt_len}-token prompts, {args.max_tokens} tokens out, ignore_eos) "
        f"and one client sending a {args.long_prompt_len}-token prompt (max_tokens 1) every {args.interval:g} s, for {args.duration:g} s. "
        f"Model: {args.model}. Machine: {machine}.",
        "",
        "| server | dtype | config | stream tokens/s | ITL p50 ms | ITL p99 ms | p99/p50 | ≤ 3× | ITL max ms | gaps < 1 ms | long done | long p50 ms | errs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["itl_p99_over_p50"]
        met = "n/a" if ratio is None else ("yes" if ratio <= TARGET else "NO")
        if r["itl_samples"] < MIN_SAMPLES:
            met = f"n/a ({r['itl_samples']} gaps)"
        lines.append(
            f"| {'predictor' if r['server'] == 'predictor' else 'vLLM-CPU'} | {r['dtype']} | {r['config']} | {r['stream_tokens_per_s']:.1f} | "
            f"{fmt(r['itl_p50_s'])} | {fmt(r['itl_p99_s'])} | {'n/a' if ratio is None else f'{ratio:.2f}×'} | {met} | {fmt(r['itl_max_s'])} | "
            f"{fmt(r['itl_bunched_share'], 100, 0)}% | "
            f"{r['long_prompts_done']} / {r['long_prompts_sent']} | {fmt(r['long_prompt_latency_p50_s'])} | {r['stream_errors'] + r['long_errors']} |"
        )
    lines += [
        "",
        "A long prompt prefilled in one step stalls every stream for that step (ITL p99, ITL max); gaps under 1 ms are tokens "
        "that reached the client together after a stall. The long-prompt client keeps one request in flight: when a "
        "prefill takes longer than the interval, the next prompt follows at once and the server is prefilling all the time.",
        *notes,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chunked_prefill", description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=["predictor", "vllm", "both"], default="both")
    parser.add_argument("--model", choices=["llama", "smollm2"], default="llama", help="llama: random weights, SmolLM2-135M's shape; smollm2: the real one.")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: what the predictor's --dtype auto picks on this CPU.")
    parser.add_argument(
        "--max_prefill_tokens", type=int, nargs="+", default=[256, 512, 2048], help="Per-step prompt-token budgets, a run each (256: the CPU default)."
    )
    parser.add_argument("--vllm-args", default="", help="More vLLM arguments, e.g. '--max-num-batched-tokens 256'.")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--long-prompt-len", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=2.0, help="Seconds between long prompts.")
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds measured per server.")
    parser.add_argument("--max-model-len", type=int, default=2200)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.long_prompt_len + 1 > args.max_model_len or args.prompt_len + args.max_tokens > args.max_model_len:
        parser.error("--max-model-len must hold the long prompt plus one token and a stream's prompt plus its output")
    dtype = auto_dtype() if args.dtype == "auto" else args.dtype
    settings = machine_settings()
    print(f"Machine: {settings['machine']}; dtype {dtype}", flush=True)
    model_dir, vocab = bench_model.model_dir(args.model), bench_model.vocab_size(args.model)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-chunked-") as tmp:
        log_dir = Path(tmp)
        if args.server in ("predictor", "both"):
            for budget in args.max_prefill_tokens:
                print(f"predictor {dtype} --max_prefill_tokens {budget} ({args.duration:g} s) ...", flush=True)
                rows.append(run_predictor(model_dir, log_dir, args, vocab, dtype, budget))
        if args.server in ("vllm", "both"):
            print(f"vLLM-CPU {dtype} ({args.duration:g} s after start-up) ...", flush=True)
            try:
                rows.append(run_vllm(model_dir, log_dir, args, vocab, dtype))
            except vllm_cpu.VllmError as exc:
                notes.append(f"vLLM-CPU not run: {str(exc).splitlines()[0]}")
                print(exc, flush=True)
    table = report(rows, args, settings["machine"], notes)
    print(table, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    settings.update(model=args.model, model_dir=str(model_dir), vllm=vllm_cpu.version() if any(r["server"] == "vllm" for r in rows) else "not run")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "chunked_prefill.json").write_text(json.dumps({"settings": settings, "load": config, "runs": rows, "notes": notes}, indent=2))
    (args.out / "chunked_prefill.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
