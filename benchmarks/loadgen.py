"""A closed-loop load generator over the OpenAI completions API.

C clients each send requests back to back (a new one as soon as the last finished), with token-id
prompts of a fixed length and a fixed output length (``ignore_eos``). Streaming runs time the first
token and the gap between tokens from the server-sent events; a non-streaming server (the Flask seed
baseline) reports its whole latency as time to first token and no inter-token latency.

Requests are greedy (``temperature: 0``) unless a run asks for sampling (``temperature``, ``top_p``). The same
body drives this predictor and vLLM-CPU: both take token-id prompts (``prompt: [ids]``) and ``ignore_eos``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np


@dataclass
class RunResult:
    name: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    errors: int
    ttft: list[float] = field(default_factory=list, repr=False)
    itl: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) if values else None

        out = {k: v for k, v in asdict(self).items() if k not in ("ttft", "itl")}
        out.update(
            tokens_per_s=self.tokens_per_s,
            ttft_p50_s=pct(self.ttft, 50),
            ttft_p99_s=pct(self.ttft, 99),
            itl_p50_s=pct(self.itl, 50),
            itl_p99_s=pct(self.itl, 99),
        )
        return out


def request_body(model: str, prompt: list[int], max_tokens: int, stream: bool, temperature: float = 0.0, top_p: float | None = None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True, "stream": stream}
    if top_p is not None:
        body["top_p"] = top_p
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict, result: RunResult) -> None:
    """Send one completion request; add its tokens, time to first token and inter-token gaps to ``result``."""
    stream = body["stream"]
    start = time.perf_counter()
    try:
        if not stream:
            r = await client.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            result.ttft.append(time.perf_counter() - start)
            result.output_tokens += r.json()["usage"]["completion_tokens"]
            return
        last = None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                # Decode JSON only for an error event: the client shares the CPU with the server under test.
                if line.startswith('data: {"error"'):
                    raise RuntimeError(json.loads(line[6:])["error"])
                now = time.perf_counter()
                if last is None:
                    result.ttft.append(now - start)
                else:
                    result.itl.append(now - last)
                last = now
                result.output_tokens += 1
    except (httpx.HTTPError, RuntimeError, KeyError):
        result.errors += 1


async def run_load(
    name: str,
    url: str,
    model: str,
    prompts: list[list[int]],
    max_tokens: int,
    concurrency: int,
    rounds: int,
    stream: bool = True,
    temperature: float = 0.0,
    top_p: float | None = None,
) -> RunResult:
    """``concurrency`` clients, each sending ``rounds`` requests back to back; prompts are used in turn.
    Greedy by default; ``temperature`` > 0 (with ``top_p``) measures sampling."""
    result = RunResult(name, concurrency, concurrency * rounds, 0, 0.0, 0)
    timeout = httpx.Timeout(3600.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def worker(w: int) -> None:
            for k in range(rounds):
                prompt = prompts[(w + k * concurrency) % len(prompts)]
                await one_request(client, url, request_body(model, prompt, max_tokens, stream, temperature, top_p), result)

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result
