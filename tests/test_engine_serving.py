"""The continuous-batching engine under load, on the real server over loopback: correctness while batched,
overload (429 / RESOURCE_EXHAUSTED), cancellation, bounded memory, graceful SIGTERM drain, metrics, timeouts."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import httpx
import numpy as np
import psutil
import pytest
from conftest import MODEL_NAME, start_server, stop_server
from kserve import InferenceGRPCClient, InferInput, InferRequest
from prometheus_client.parser import text_string_to_metric_families

# Cancelled requests leave within this (a margin for a shared 2-core machine); that they were cut short, not run to
# the end, is what the tests' token counts show.
SLOT_RELEASE_DEADLINE = 5.0
WORDS = "the for while class def import return yield lambda with try except finally raise async await".split()


def prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + i % 9))


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def metric(url: str, name: str, **labels: str) -> float:
    labels = {"model_name": MODEL_NAME, **labels}
    return metrics(url).get((name, tuple(sorted(labels.items()))), 0.0)


async def complete(client: httpx.AsyncClient, url: str, text: str, max_tokens: int, **extra) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": text, "max_tokens": max_tokens, "temperature": 0, **extra}
    return await client.post(f"{url}/v1/completions", json=body, timeout=120)


def test_batched_greedy_equals_each_request_alone(server):
    prompts = [prompt(i) for i in range(32)]
    lengths = [4 + (i * 5) % 29 for i in range(32)]

    async def run() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient() as client:
            alone = [(await complete(client, server.url, p, n)).json()["choices"][0]["text"] for p, n in zip(prompts, lengths)]
            together = await asyncio.gather(*(complete(client, server.url, p, n) for p, n in zip(prompts, lengths)))
            return alone, [r.json()["choices"][0]["text"] for r in together]

    alone, together = asyncio.run(run())
    assert together == alone
    assert len(set(alone)) > 1


@pytest.fixture(scope="module")
def small_server(tiny_model_dir, tmp_path_factory):
    """A server with a 2-sequence batch and a 32-request queue: easy to overload."""
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("small"), "--max_num_seqs", "2", "--max_queue", "32")
    yield srv
    stop_server(srv)


def test_overload_gets_429_never_5xx_and_server_recovers(small_server):
    url = small_server.url
    rejected_before = metric(url, "kserve_llm:requests_rejected_total")

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(complete(client, url, prompt(i), 40, ignore_eos=True) for i in range(200))), timeout=180)

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(200) >= 32 and statuses.count(429) >= 1  # at least a full queue is served
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in responses if r.status_code == 200)
    assert metric(url, "kserve_llm:requests_rejected_total") - rejected_before == statuses.count(429)
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    started = time.monotonic()
    after = httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 4}, timeout=30)
    assert after.status_code == 200 and time.monotonic() - started < 15  # no backlog left behind (a margin for a shared 2-core machine)


def test_grpc_overload_is_resource_exhausted(small_server):
    async def one(client: InferenceGRPCClient, i: int):
        tensor = InferInput(name="text_input", shape=[1], datatype="BYTES")
        tensor.set_data_from_numpy(np.array([prompt(i).encode()], dtype=object))
        try:
            await client.infer(InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor], parameters={"max_tokens": 40, "ignore_eos": True}))
            return "ok"
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    async def run():
        client = InferenceGRPCClient(f"127.0.0.1:{small_server.grpc_port}", timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(80)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert set(results) <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}, set(results)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in results and "ok" in results


def test_disconnected_streams_free_their_slots(server):
    url = server.url

    async def stream_then_leave(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": MODEL_NAME, "prompt": prompt(i), "max_tokens": 100, "ignore_eos": True, "stream": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            chunks = 0
            async for line in r.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks >= 2:
                    break  # leave mid-stream: the connection closes here

    async def run() -> None:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=60)) as client:
            await asyncio.gather(*(stream_then_leave(client, i) for i in range(50)))

    generated_before = metric(url, "vllm:generation_tokens_total")
    asyncio.run(run())
    deadline = time.monotonic() + SLOT_RELEASE_DEADLINE
    while metric(url, "vllm:num_requests_running") + metric(url, "vllm:num_requests_waiting") > 0:
        assert time.monotonic() < deadline, f"cancelled requests still hold slots after {SLOT_RELEASE_DEADLINE} s"
        time.sleep(0.05)
    assert metric(url, "vllm:generation_tokens_total") - generated_before < 50 * 100 // 2  # cut short, not run to the end


def test_disconnected_non_streaming_request_is_cancelled(server):
    url = server.url
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 120, "ignore_eos": True, "n": 16}

    async def leave(client: httpx.AsyncClient) -> None:
        with pytest.raises(httpx.TimeoutException):
            await client.post(f"{url}/v1/completions", json=body, timeout=0.05)

    async def run() -> None:
        async with httpx.AsyncClient() as client:  # 48 sequences: three batches' worth, so most are still queued
            await asyncio.gather(*(leave(client) for _ in range(3)))

    generated_before = metric(url, "vllm:generation_tokens_total")
    asyncio.run(run())
    time.sleep(1.5)
    assert metric(url, "vllm:num_requests_running") + metric(url, "vllm:num_requests_waiting") == 0
    assert metric(url, "vllm:generation_tokens_total") - generated_before < 3 * 16 * 120


def test_memory_is_bounded_under_sustained_traffic(server):
    url = server.url
    process = psutil.Process(server.process.pid)

    async def burst(n: int) -> None:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=16)) as client:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> None:
                async with sem:
                    r = await complete(client, url, prompt(i), 3 + i % 5)
                    assert r.status_code == 200

            await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(burst(100))
    after_100 = process.memory_info().rss
    asyncio.run(burst(1900))
    after_2000 = process.memory_info().rss
    assert after_2000 <= after_100 * 1.05, f"RSS grew from {after_100 / 2**20:.1f} MiB to {after_2000 / 2**20:.1f} MiB"


def test_token_counters_match_the_workload_exactly(server):
    url = server.url
    before = {name: metric(url, name) for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")}
    length_before = metric(url, "vllm:request_success_total", finished_reason="length")
    ttft_count = metric(url, "vllm:time_to_first_token_seconds_count")
    usages = []
    for i in range(6):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": prompt(i), "max_tokens": 5 + i, "ignore_eos": True}, timeout=60)
        usages.append(r.json()["usage"])
    assert metric(url, "vllm:prompt_tokens_total") - before["vllm:prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert (
        metric(url, "vllm:generation_tokens_total") - before["vllm:generation_tokens_total"]
        == sum(u["completion_tokens"] for u in usages)
        == sum(5 + i for i in range(6))
    )
    assert metric(url, "vllm:request_success_total", finished_reason="length") - length_before == 6
    assert metric(url, "vllm:time_to_first_token_seconds_count") - ttft_count == 6
    names = {name for name, _ in metrics(url)}
    for expected in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
    ):
        assert expected in names


def test_kv_cache_usage_is_reported_while_generating(server):
    url = server.url

    async def run() -> float:
        async with httpx.AsyncClient() as client:
            task = asyncio.gather(*(complete(client, url, prompt(i), 120, ignore_eos=True) for i in range(8)))
            peak = 0.0
            while not task.done():
                peak = max(peak, await asyncio.to_thread(metric, url, "vllm:kv_cache_usage_perc"))
                await asyncio.sleep(0.01)
            await task
            return peak

    peak = asyncio.run(run())
    assert 0.0 < peak <= 1.0
    assert metric(url, "vllm:kv_cache_usage_perc") == 0.0


def test_request_timeout_is_504(tiny_model_dir, tmp_path):
    srv = start_server(tiny_model_dir, tmp_path, "--max_num_seqs", "1", "--request_timeout", "0.3")
    try:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient() as client:
                return await asyncio.gather(*(complete(client, srv.url, prompt(i), 100, ignore_eos=True) for i in range(12)))

        statuses = [r.status_code for r in asyncio.run(run())]
        assert 504 in statuses and set(statuses) <= {200, 504}
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    finally:
        stop_server(srv)


def test_sigterm_drains_in_flight_requests_then_exits_zero(tiny_model_dir, tmp_path):
    srv = start_server(tiny_model_dir, tmp_path, "--max_num_seqs", "2", "--shutdown_grace_period", "60")
    url = srv.url

    async def run() -> tuple[list[httpx.Response], httpx.Response, int]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=40)) as client:
            flights = [asyncio.create_task(complete(client, url, prompt(i), 100, ignore_eos=True)) for i in range(16)]
            deadline = time.monotonic() + 30
            while await asyncio.to_thread(lambda: metric(url, "vllm:num_requests_running") + metric(url, "vllm:num_requests_waiting")) < 16:
                assert time.monotonic() < deadline
            srv.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            ready = (await client.get(f"{url}/v2/health/ready")).status_code
            late = await complete(client, url, "late", 4)
            return await asyncio.gather(*flights), late, ready

    done, late, ready = asyncio.run(run())
    assert ready == 503
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert [r.status_code for r in done] == [200] * 16
    assert all(r.json()["usage"]["completion_tokens"] == 100 for r in done)
    assert srv.process.wait(timeout=60) == 0


def test_cancelled_grpc_calls_free_their_slots(server):
    async def one(client: InferenceGRPCClient, i: int):
        tensor = InferInput(name="text_input", shape=[1], datatype="BYTES")
        tensor.set_data_from_numpy(np.array([prompt(i).encode()], dtype=object))
        request = InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor], parameters={"max_tokens": 90, "ignore_eos": True})
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.infer(request, timeout=0.05)  # the client gives up: the call is cancelled
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def run() -> None:
        client = InferenceGRPCClient(f"127.0.0.1:{server.grpc_port}", timeout=30)
        try:
            await asyncio.gather(*(one(client, i) for i in range(24)))
        finally:
            await client.close()

    generated_before = metric(server.url, "vllm:generation_tokens_total")
    asyncio.run(run())
    deadline = time.monotonic() + SLOT_RELEASE_DEADLINE
    while metric(server.url, "vllm:num_requests_running") + metric(server.url, "vllm:num_requests_waiting") > 0:
        assert time.monotonic() < deadline, f"cancelled gRPC calls still hold slots after {SLOT_RELEASE_DEADLINE} s"
        time.sleep(0.05)
    assert metric(server.url, "vllm:generation_tokens_total") - generated_before < 24 * 90 // 2  # cut short, not run to the end
