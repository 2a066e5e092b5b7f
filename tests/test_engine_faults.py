"""Blast radius of one: a failure in one request's row fails that request alone; a broken engine restarts the pod.

The faults are injected, and named so:
- on the real server, a *poison model*: the tiny model behind ``--trust_remote_code`` with a forward that raises on one
  token id (a model bug that one input triggers) and, once a file exists, raises a CUDA error (a device gone bad);
- in process, on the engine, the sampler and the detokenizer raising for one marked request.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from conftest import MODEL_NAME, start_server, stop_server
from test_engine_serving import metric

from predictor.engine import Engine, EngineConfig
from predictor.engine import engine as engine_module
from predictor.engine.detokenizer import Detokenizer
from predictor.errors import RequestFailed
from predictor.loading import load_model
from predictor.sampling import GenerationRequest, SamplingParams

POISON_MODEL = '''
import os

from transformers import GPT2Config, GPT2LMHeadModel


class PoisonGPT2(GPT2LMHeadModel):
    """A fault-injection model for tests: raises on the poison token id, and like a broken GPU once the kill file exists."""

    config_class = GPT2Config

    def forward(self, input_ids=None, **kwargs):
        if os.path.exists(self.config.kill_file):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        if input_ids is not None and bool((input_ids == self.config.poison_token_id).any()):
            raise RuntimeError("poisoned input (injected)")
        return super().forward(input_ids=input_ids, **kwargs)
'''
POISON = 7  # the token id that makes the poison model's forward raise


@pytest.fixture(scope="module")
def poison_model(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(model directory, kill file): the tiny model whose forward raises on token 7 or once the kill file exists."""
    out = tmp_path_factory.mktemp("poison") / "model"
    shutil.copytree(tiny_model_dir, out)
    kill = out.parent / "kill"
    (out / "poison_model.py").write_text(POISON_MODEL)
    config = json.loads((out / "config.json").read_text())
    config.update(auto_map={"AutoModelForCausalLM": "poison_model.PoisonGPT2"}, poison_token_id=POISON, kill_file=str(kill))
    (out / "config.json").write_text(json.dumps(config))
    return out, kill


@pytest.fixture(scope="module")
def poison_server(poison_model, tmp_path_factory):
    model_dir, _ = poison_model
    srv = start_server(model_dir, tmp_path_factory.mktemp("poison-server"), "--trust_remote_code")
    yield srv
    stop_server(srv)


def good_prompt(i: int) -> list[int]:
    return [10 + i, 20 + i, 30 + i]  # token ids that are not the poison


async def completion(client: httpx.AsyncClient, url: str, prompt, max_tokens: int = 24) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return await client.post(f"{url}/v1/completions", json=body, timeout=120)


def test_the_poison_model_serves_unpoisoned_prompts_like_the_model(poison_server):
    assert poison_server.read_log().count("PagedRunner") >= 1  # the batched runner serves it, so batches are shared
    r = httpx.post(f"{poison_server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": good_prompt(0), "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200


def test_a_failing_forward_fails_its_request_alone(poison_server):
    """A poisoned prompt, admitted beside others, fails alone (500 naming its request id, no exception text); the
    requests batched with it give exactly their output alone, and the server stays ready."""
    url = poison_server.url
    failures_before = metric(url, "kserve_llm:engine_step_failures_total")

    async def run() -> tuple[list[str], list[httpx.Response], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient() as client:
            alone = [(await completion(client, url, good_prompt(i))).json()["choices"][0]["text"] for i in range(3)]
            good = [asyncio.create_task(completion(client, url, good_prompt(i))) for i in range(3)]
            await asyncio.sleep(0.05)
            poisoned = await completion(client, url, [11, POISON, 12])
            # one request of two prompts: both admitted in one prefill, which fails; the retry without the newest
            # (the poisoned one) succeeds, and the request fails because one of its prompts did
            pair = await completion(client, url, [good_prompt(5), [13, POISON]])
            return alone, await asyncio.gather(*good), poisoned, pair

    alone, good, poisoned, pair = asyncio.run(run())
    assert [r.status_code for r in good] == [200, 200, 200]
    assert [r.json()["choices"][0]["text"] for r in good] == alone
    for r in (poisoned, pair):
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and r.headers["x-request-id"] in error["message"]
        assert "poison" not in r.text and "RuntimeError" not in r.text  # no exception text in the body
    assert "retrying without the newest" in poison_server.read_log()
    assert metric(url, "kserve_llm:engine_step_failures_total") - failures_before >= 2
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert (asyncio.run(_one(url))).status_code == 200


async def _one(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await completion(client, url, good_prompt(9), 4)


def test_a_device_error_kills_the_engine_and_the_process_exits_1(poison_model, tmp_path):
    """A CUDA error in a step: every request gets 503, liveness and readiness fail, and the process exits non-zero, so
    that Kubernetes restarts the pod (vLLM's EngineDeadError behaviour)."""
    model_dir, kill = poison_model
    server = start_server(model_dir, tmp_path, "--trust_remote_code")
    try:
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        kill.write_text("")
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": good_prompt(1), "max_tokens": 4}, timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_dead"
        probes = []
        try:
            probes = [httpx.get(f"{server.url}{path}", timeout=5).status_code for path in ("/v2/health/live", "/v2/health/ready")]
        except httpx.HTTPError:
            pass  # already gone
        assert all(code == 503 for code in probes), probes
        assert server.process.wait(timeout=30) == 1
        log = server.read_log()
        assert "engine dead: device error" in log and "exit code 1" in log
    finally:
        kill.unlink(missing_ok=True)
        if server.process.poll() is None:
            server.process.kill()


# ---- in process: the sampler and the detokenizer failing for one row -------------------------------------------------

MARKED_TEMPERATURE = 0.777  # the sampler raises for rows with this temperature
MARKED_TOKEN = 99  # the detokenizer raises for sequences whose prompt starts with this token


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32")


def run_engine(loaded, requests: list[GenerationRequest], tracer=None) -> list[list[int] | BaseException]:
    """Run ``requests`` together on a fresh engine (with ``tracer``); each one's token ids, or the exception it ended with."""

    async def collect(engine: Engine, seq) -> list[int] | BaseException:
        tokens = []
        try:
            async for out in seq.stream():
                tokens += out.token_ids
        except Exception as exc:
            return exc
        return tokens

    async def main() -> list:
        engine = Engine(loaded, EngineConfig(max_num_seqs=8))
        engine.tracer = tracer
        engine.start()
        try:
            seqs = engine.submit_all(requests)
            return await asyncio.gather(*(collect(engine, s) for s in seqs))
        finally:
            engine.stop()

    return asyncio.run(main())


def make_requests(marked: SamplingParams | None = None, marked_prompt: list[int] | None = None) -> list[GenerationRequest]:
    requests = [GenerationRequest(f"good-{i}", good_prompt(i), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)) for i in range(3)]
    requests.insert(1, GenerationRequest("bad", marked_prompt or good_prompt(7), marked or SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))
    return requests


def inject_sampler_fault(monkeypatch) -> None:
    """The engine's sampler raises for any batch holding a row of ``MARKED_TEMPERATURE`` (the fault injected)."""
    real = engine_module.sample

    def faulty_sample(logits, params, *args, **kwargs):
        if any(p.temperature == MARKED_TEMPERATURE for p in params):
            raise RuntimeError("sampler fault (injected)")
        return real(logits, params, *args, **kwargs)

    monkeypatch.setattr(engine_module, "sample", faulty_sample)


def test_a_row_that_fails_sampling_fails_alone(loaded, monkeypatch):
    alone = run_engine(loaded, make_requests())
    inject_sampler_fault(monkeypatch)
    results = run_engine(loaded, make_requests(SamplingParams(max_tokens=12, temperature=MARKED_TEMPERATURE, seed=1)))
    assert isinstance(results[1], RequestFailed) and "bad" in results[1].message
    assert [results[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]


def test_a_row_that_fails_detokenizing_fails_alone(loaded, monkeypatch):
    alone = run_engine(loaded, make_requests())
    real_add = Detokenizer.add

    def faulty_add(self, token_id):
        if self.ids and self.ids[0] == MARKED_TOKEN:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "detokenizer fault (injected)")
        return real_add(self, token_id)

    monkeypatch.setattr(Detokenizer, "add", faulty_add)
    results = run_engine(loaded, make_requests(marked_prompt=[MARKED_TOKEN, 5, 6]))
    assert isinstance(results[1], RequestFailed)
    assert [results[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]


def test_step_failures_in_a_row_kill_the_engine(loaded, monkeypatch):
    """Every forward failing (not a device error): each request fails alone until MAX_FAILURES_IN_A_ROW, then the
    engine is dead and refuses what follows."""

    def broken_decode(self, seqs):
        raise RuntimeError("decode fault (injected)")

    monkeypatch.setattr(Engine, "_run_decode", broken_decode)
    deaths: list[str] = []

    async def main() -> tuple[list, BaseException | None]:
        engine = Engine(loaded, EngineConfig(max_num_seqs=8))
        engine.on_dead = deaths.append
        engine.start()
        try:
            outcomes = []
            for i in range(engine_module.MAX_FAILURES_IN_A_ROW):
                seq = engine.submit(GenerationRequest(f"r{i}", good_prompt(i), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
                try:
                    async for _ in seq.stream():
                        pass
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
            refused = None
            try:
                engine.submit(GenerationRequest("after", good_prompt(0), SamplingParams(max_tokens=2)))
            except Exception as exc:
                refused = exc
            return outcomes, refused
        finally:
            engine.stop()

    outcomes, refused = asyncio.run(main())
    assert outcomes[:-1] == ["RequestFailed"] * (engine_module.MAX_FAILURES_IN_A_ROW - 1) and outcomes[-1] in ("RequestFailed", "EngineDead")
    assert len(deaths) == 1 and "in a row" in deaths[0]
    assert type(refused).__name__ == "EngineDead"


def test_is_device_error():
    assert engine_module.is_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not engine_module.is_device_error(RuntimeError("shape mismatch"))
    assert not engine_module.is_device_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))
