"""Prefix caching: 16 chat clients sharing a ~1,000-token system prompt, TTFT with caching on and off.

    python -m benchmarks.prefix_caching [--model DIR] [--clients 16] [--system-tokens 1000]

Default model: the predictor's default (SmolLM2-135M-Instruct). One server per setting, the same
requests: a first request fills the cache (its own TTFT is not counted), then the clients arrive
together, each with the system prompt and its own question; TTFT is measured at the first streamed
token. Writes ``benchmarks/results/prefix_caching.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import openai
from transformers import AutoTokenizer

from pipelines.corpus import demo_corpus
from predictor.default_model import ensure_default_model
from predictor.launch import start_server

REPO = Path(__file__).resolve().parents[1]


def system_prompt(model_dir: Path, tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("\n".join(demo_corpus())[: 8 * tokens], add_special_tokens=False)["input_ids"][:tokens]
    return "Answer from this documentation.\n" + tokenizer.decode(ids)


async def ttfts(url: str, system: str, clients: int) -> list[float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    async def one(question: str) -> float:
        start = time.perf_counter()
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "system", "content": system}, {"role": "user", "content": question}], max_tokens=4, temperature=0, stream=True
        )
        first = None
        async for chunk in stream:  # the first chunk carries only the role: wait for the first text
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        return first if first is not None else time.perf_counter() - start  # no text at all: the whole answer's time

    await one("What is this about?")  # fills the cache (with caching on)
    try:
        return list(await asyncio.gather(*(one(f"Question {i}: what does section {i} say?") for i in range(clients))))
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefix_caching", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the default model)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--system-tokens", type=int, default=1000)
    args = parser.parse_args(argv)
    model = args.model or ensure_default_model()
    system = system_prompt(model, args.system_tokens)
    rows = {}
    with tempfile.TemporaryDirectory() as logs:
        for label, flags in (("on", []), ("off", ["--no_enable_prefix_caching"])):
            server = start_server(model, Path(logs), "--max_num_seqs", str(args.clients), *flags, name="m")
            try:
                rows[label] = sorted(asyncio.run(ttfts(server.url, system, args.clients)))
                print(label, [line for line in httpx.get(f"{server.url}/metrics").text.splitlines() if line.startswith("vllm:prefix_cache")])
            finally:
                server.stop()
    on, off = statistics.median(rows["on"]), statistics.median(rows["off"])
    report = (
        f"{args.clients} clients, a {args.system_tokens}-token system prompt, model `{model.name}`, one run:\n\n"
        "| prefix caching | TTFT p50 s | TTFT max s |\n|---|---|---|\n"
        f"| on | {on:.3f} | {rows['on'][-1]:.3f} |\n| off | {off:.3f} | {rows['off'][-1]:.3f} |\n\n"
        f"TTFT p50 {off / on:.1f}× lower with caching.\n"
    )
    print(report)
    (REPO / "benchmarks" / "results" / "prefix_caching.md").write_text(report)


if __name__ == "__main__":
    main()
