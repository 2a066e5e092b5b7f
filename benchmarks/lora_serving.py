"""Multi-LoRA serving: throughput with 16 clients spread over 4 adapters against 16 clients on the base model.

    python -m benchmarks.lora_serving [--model DIR] [--clients 16] [--adapters 4] [--rank 8] [--rounds 2] [--max-tokens 128]

Default model: the predictor's default (SmolLM2-135M-Instruct). The adapters are random peft LoRA adapters
of rank ``--rank`` on every projection (q, k, v, o, gate, up, down), written to a temporary directory.
Three runs of the same closed-loop load (``loadgen.py``: C streaming clients, 32-token token-id prompts,
``--max-tokens`` output tokens, greedy, ``ignore_eos``), each after a short warm-up:

  1. a server without ``--lora_modules``, every client on the base model;
  2. a server with the adapters (``--max_loras`` = the adapter count), every client on the base model;
  3. the same server, the clients spread evenly over the adapters (every decode step mixes them).

Writes ``benchmarks/results/lora_serving.{json,md,png}``; the target is run 3 ≥ 0.7 × run 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from predictor.default_model import ensure_default_model
from predictor.launch import start_server

from .loadgen import RunResult, run_load
from .serving import make_prompts

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_RATIO = 0.7


def make_adapters(model_dir: Path, out: Path, n: int, rank: int) -> list[Path]:
    """``n`` random rank-``rank`` adapters on every projection (B non-zero: peft's ``init_lora_weights=False``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        torch.manual_seed(i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # small deltas: the adapted model stays a language model, as trained adapters are
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.01)
        path = out / f"adapter{i}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


async def mixed_load(name: str, url: str, models: list[str], prompts, max_tokens: int, clients: int, rounds: int) -> RunResult:
    """``clients`` closed-loop clients spread evenly over ``models``, all at once; one combined result."""
    per = clients // len(models)
    start = time.perf_counter()
    parts = await asyncio.gather(*(run_load(name, url, m, prompts[i * per :] + prompts[: i * per], max_tokens, per, rounds) for i, m in enumerate(models)))
    seconds = time.perf_counter() - start
    out = RunResult(name, clients, sum(p.requests for p in parts), sum(p.output_tokens for p in parts), seconds, sum(p.errors for p in parts))
    for p in parts:
        out.ttft += p.ttft
        out.itl += p.itl
    return out


def measure(label: str, url: str, models: list[str], prompts, args) -> dict:
    asyncio.run(mixed_load("warm-up", url, models, prompts, 8, args.clients, 1))
    print(f"  {label}: measuring {args.clients} clients × {args.rounds} rounds × {args.max_tokens} tokens ...", flush=True)
    result = asyncio.run(mixed_load(label, url, models, prompts, args.max_tokens, args.clients, args.rounds))
    summary = result.summary()
    print(f"  {label}: {summary['tokens_per_s']:.1f} output tokens/s, ITL p50 {1000 * summary['itl_p50_s']:.1f} ms, errors {result.errors}", flush=True)
    return summary


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [r["name"] for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    bars = ax.barh(labels[::-1], values[::-1], color=["#4c72b0", "#8da0cb", "#dd8452"][: len(rows)][::-1])
    ax.bar_label(bars, fmt="%.0f tok/s", padding=3)
    ax.axvline(TARGET_RATIO * values[0], color="grey", linestyle="--", linewidth=1, label=f"target: {TARGET_RATIO}× base")
    ax.set_xlabel("output tokens/s")
    ax.set_xlim(0, max(values) * 1.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Multi-LoRA serving, C=16", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora_serving", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the default model)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.clients % args.adapters:
        parser.error("--clients must be a multiple of --adapters")
    model = args.model or ensure_default_model()
    from transformers import AutoConfig

    prompts = make_prompts(args.clients, args.prompt_len, AutoConfig.from_pretrained(model).vocab_size)
    common = ["--max_num_seqs", str(args.clients), "--max_model_len", "1024"]
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"writing {args.adapters} random rank-{args.rank} adapters ...", flush=True)
        adapters = make_adapters(model, tmp, args.adapters, args.rank)
        names = [f"lora{i}" for i in range(args.adapters)]
        print("server without adapters ...", flush=True)
        server = start_server(model, tmp, *common, name="base")
        try:
            rows.append(measure("base model, no --lora_modules", server.url, ["base"], prompts, args))
        finally:
            server.stop()
        print(f"server with {args.adapters} adapters ...", flush=True)
        lora_args = ["--lora_modules", *(f"{n}={p}" for n, p in zip(names, adapters)), "--max_loras", str(args.adapters)]
        server = start_server(model, tmp, *common, *lora_args, name="base")
        try:
            path = next(line for line in server.read_log().splitlines() if "model runner:" in line)
            rows.append(measure(f"base model, {args.adapters} adapters loaded", server.url, ["base"], prompts, args))
            rows.append(measure(f"{args.clients} clients over {args.adapters} adapters", server.url, names, prompts, args))
        finally:
            server.stop()
    load_after = os.getloadavg()
    ratio = rows[2]["tokens_per_s"] / rows[0]["tokens_per_s"]
    ratio_same = rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    setting = (
        f"Model `{model.name}`, {args.adapters} random rank-{args.rank} adapters on {', '.join(TARGETS)}; C={args.clients} streaming clients, "
        f"{args.prompt_len}-token prompts, {args.max_tokens} output tokens (greedy, ignore_eos), {args.rounds} rounds. Machine: {machine}; "
        f"load average before/after {load_before[0]:.2f}/{load_after[0]:.2f}."
    )
    table = "| run | output tokens/s | × base (no adapters) | TTFT p50 ms | ITL p50 ms | ITL p99 ms | errors |\n|---|---|---|---|---|---|---|\n"
    for r in rows:
        table += (
            f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f} | {1000 * r['ttft_p50_s']:.0f} | "
            f"{1000 * r['itl_p50_s']:.1f} | {1000 * r['itl_p99_s']:.1f} | {r['errors']} |\n"
        )
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    report = (
        f"{setting}\n\n{table}\nAdapters over base: {ratio:.2f}× the server without adapters, {ratio_same:.2f}× base requests on the same server "
        f"(target ≥ {TARGET_RATIO}×: {verdict}).\n\nRunner: {path.split('model runner: ', 1)[1]}\n"
    )
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_serving.md").write_text(report)
    results = {"setting": setting, "runs": rows, "ratio_vs_no_adapters": ratio, "ratio_vs_base_same_server": ratio_same, "target": TARGET_RATIO}
    (args.out / "lora_serving.json").write_text(json.dumps(results, indent=2))
    chart(rows, args.out / "lora_serving.png")
    print(f"wrote {args.out / 'lora_serving.md'}, .json, .png")


if __name__ == "__main__":
    main()
