"""Multi-LoRA serving: peft adapters chosen per request by ``model``, applied per row inside the batched step.

Each adapter's greedy output equals ``generate`` of its peft-merged model (``merge_and_unload``), with base
and adapter requests of different lengths running in the same batch; with fewer slots than adapters the
slots are swapped under load and outputs stay exact; the prefix cache never hands one adapter's (or the
base model's) blocks to another; adapters that do not fit the base model are refused at start-up.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import REPO, start_server, stop_server
from test_model_families import build_model, complete, greedy_texts, metric, token_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

from predictor.engine.lora import LoRAError, LoRAManager
from predictor.loading import ModelLoadError

MAX_TOKENS = 12
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, rank: int, targets: list[str], seed: int, alpha: float = 16.0, **extra) -> Path:
    """A peft LoRA adapter with random (non-zero) A and B, saved as peft saves it."""
    from peft import LoraConfig, get_peft_model

    if (out / "adapter_config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM", **extra)
    get_peft_model(model, config).save_pretrained(out)
    return out


def merged_reference(base_dir: Path, adapter: Path | None, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[str]:
    """Greedy ``generate`` of the base model, or of the base with ``adapter`` merged into its weights."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(copy.deepcopy(model), adapter).merge_and_unload().eval()
    return greedy_texts(model, AutoTokenizer.from_pretrained(base_dir), prompts, max_tokens)


def start_and_compute(model_dir: Path, tmp: Path, args: list[str], compute):
    """Start the server and, while it boots (a child process), compute the reference outputs here."""
    with ThreadPoolExecutor(1) as pool:
        booting = pool.submit(start_server, model_dir, tmp, *args, name="m")
        try:
            expected = compute()
        finally:
            server = booting.result()
    return server, expected


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def llama(root, tiny_model_dir) -> dict:
    base = build_model("llama", root / "llama", tiny_model_dir)
    return {
        "base": base,
        "a": make_adapter(base, root / "llama-a", rank=4, targets=LLAMA_ALL, seed=1),
        "b": make_adapter(base, root / "llama-b", rank=8, targets=["q_proj", "v_proj", "down_proj", "lm_head"], seed=2, alpha=8.0),
        "vocab": AutoTokenizer.from_pretrained(base).vocab_size,
    }


def test_rows_of_one_batch_use_their_own_adapters_and_match_merged_generate(llama, tmp_path):
    base = llama["base"]
    prompts = token_prompts(llama["vocab"], [3, 11, 20, 37], seed=3)
    shared = token_prompts(llama["vocab"], [40], seed=4)[0]  # 2 full blocks: the prefix cache's unit
    args = ["--lora_modules", f"a={llama['a']}", f"b={llama['b']}", "--max_loras", "2", "--max_num_seqs", "12"]
    server, expected = start_and_compute(
        base, tmp_path, args, lambda: {m: merged_reference(base, None if m == "m" else llama[m], prompts + [shared]) for m in ("m", "a", "b")}
    )
    try:
        assert expected["a"] != expected["m"] and expected["b"] != expected["m"] and expected["a"] != expected["b"]
        log = server.read_log()
        assert "LoRA: 2 adapters (rank ≤ 8) on 15 projections, 2 slots" in log and "oneDNN-packed projections: 15" in log
        # base, a and b interleaved, all at once: one batch holds rows of all three
        jobs = [(m, p) for p in prompts for m in ("m", "a", "b")]
        got = complete(server.url, jobs, MAX_TOKENS)
        assert got == [expected[m][prompts.index(p)] for m, p in jobs]
        # prefix caching: the same 40-token prompt for base, then a, then b, then base again
        before = metric(server.url, "vllm:prefix_cache_hits_total")
        order = ["m", "a", "b", "m", "a"]
        assert complete(server.url, [(m, shared) for m in order], MAX_TOKENS, together=False) == [expected[m][-1] for m in order]
        assert metric(server.url, "vllm:prefix_cache_hits_total") - before == 2 * 32  # only the repeats hit, each its own blocks

        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        cards = {c["id"]: c for c in models["data"]}
        assert set(cards) == {"m", "a", "b"} and models["models"] == ["m"]
        assert cards["a"]["parent"] == "m" and cards["a"]["root"] == "a" and cards["b"]["parent"] == "m"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError) as err:
            client.completions.create(model="c", prompt="hello", max_tokens=2)
        assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found" and "'a'" in err.value.body["message"]
        assert client.completions.create(model="a", prompt=shared, max_tokens=2, temperature=0).model == "a"  # answers name the adapter
        chunks = list(client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True))
        assert {c.model for c in chunks} == {"b"}
        tokenized = httpx.post(f"{server.url}/tokenize", json={"model": "a", "prompt": "hello"}, timeout=10)
        assert tokenized.status_code == 200, tokenized.text
        # V2 generate resolves its path's model name as the OpenAI routes do (one resolve_model): an adapter is served
        text = {m: client.completions.create(model=m, prompt="hello", max_tokens=6, temperature=0).choices[0].text for m in ("m", "a")}
        generated = httpx.post(f"{server.url}/v2/models/a/generate", json={"text_input": "hello", "parameters": {"max_tokens": 6, "temperature": 0}}, timeout=30)
        assert generated.status_code == 200, generated.text
        assert generated.json()["text_output"] == text["a"] != text["m"] and generated.json()["model_name"] == "a"
        missing = httpx.post(f"{server.url}/v2/models/c/generate", json={"text_input": "hello"}, timeout=10)
        assert missing.status_code == 404 and "'a'" in missing.text
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'vllm:lora_requests_info{max_lora="2"' in metrics
    finally:
        stop_server(server)


def test_fewer_slots_than_adapters_swaps_them_and_outputs_stay_exact(root, tiny_model_dir, tmp_path):
    """GPT-2 (Conv1D projections, peft's fan_in_fan_out) with one slot for two adapters used concurrently:
    requests of the adapter not loaded wait until the slot is idle, then it is swapped in."""
    base = build_model("gpt2", root / "gpt2", tiny_model_dir)
    a = make_adapter(base, root / "gpt2-a", rank=4, targets=["c_attn", "c_proj", "c_fc"], seed=5, fan_in_fan_out=True)
    b = make_adapter(base, root / "gpt2-b", rank=2, targets=["c_attn"], seed=6, fan_in_fan_out=True)
    prompts = token_prompts(AutoTokenizer.from_pretrained(base).vocab_size, [5, 18, 33], seed=7)
    server, expected = start_and_compute(
        base,
        tmp_path,
        ["--lora_modules", f"a={a}", f"b={b}", "--max_loras", "1"],
        lambda: {n: merged_reference(base, d, prompts) for n, d in (("m", None), ("a", a), ("b", b))},
    )
    try:
        assert expected["a"] != expected["m"] != expected["b"] != expected["a"]
        jobs = [(m, p) for m in ("a", "b", "m", "b", "a") for p in prompts]
        assert complete(server.url, jobs, MAX_TOKENS) == [expected[m][prompts.index(p)] for m, p in jobs]
        log = server.read_log()
        assert log.count("loaded into slot 1 of 1") >= 2, "both adapters went through the one slot"
    finally:
        stop_server(server)


def test_adapters_that_do_not_fit_the_base_model_are_refused_with_the_reason(llama, root, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(llama["base"])
    wider = build_model("llama", root / "llama-wide", tiny_model_dir, hidden_size=96)
    cases = {
        "in_features 64, out_features 64 in the base model": make_adapter(wider, root / "wide-a", rank=4, targets=["q_proj"], seed=1),
        "which the base model (LlamaForCausalLM) does not have": make_adapter(
            build_model("gpt2", root / "gpt2", tiny_model_dir), root / "gpt2-other", 2, ["c_attn"], seed=1, fan_in_fan_out=True
        ),
        "rank 8 (at lm_head) is above --max_lora_rank 4": llama["b"],
        "is not a directory": root / "missing",
        "no adapter_config.json": llama["base"],
    }
    for reason, path in cases.items():
        with pytest.raises(LoRAError, match="--lora_modules x=") as err:
            LoRAManager.load([("x", path)], model, max_loras=2, max_rank=4)
        assert reason in str(err.value)


class FakeSequence:
    """What the scheduler reads and writes of the engine's ``Sequence``."""

    def __init__(self, lora: str | None):
        self.request = type("Request", (), {"lora": lora})()
        self.tokens_to_prefill, self.blocks, self.length, self.needs_prompt_logits, self.cached, self.digests, self.lora_slot = [1] * 5, [], 5, False, 0, [], 0


def test_slots_are_loaded_on_demand_never_taken_from_running_rows_and_waiting_requests_keep_their_turn(llama, root):
    from predictor.engine.kv_cache import BlockAllocator
    from predictor.engine.scheduler import Scheduler

    model = AutoModelForCausalLM.from_pretrained(llama["base"])
    c = make_adapter(llama["base"], root / "llama-c", rank=2, targets=["q_proj"], seed=9)
    lora = LoRAManager.load([("a", llama["a"]), ("b", llama["b"]), ("c", c)], model, max_loras=2, max_rank=16)
    lora.attach(model)
    assert lora.slot_adapter == [None, None, None]  # more adapters than slots: none loaded before it is asked for
    scheduler = Scheduler(BlockAllocator(64), max_num_seqs=8, max_prefill_tokens=2048, lora=lora)
    seqs = {key: FakeSequence(adapter) for key, adapter in (("a1", "a"), ("b1", "b"), ("c1", "c"), ("base", None), ("a2", "a"))}
    scheduler.waiting.extend(seqs.values())
    # a and b take the two slots; c finds none and waits, and a2 waits behind it although a is loaded; the base request passes
    assert scheduler.admit(2048) == [seqs["a1"], seqs["b1"], seqs["base"]]
    assert list(scheduler.waiting) == [seqs["c1"], seqs["a2"]] and lora.slot_adapter == [None, "a", "b"] and seqs["base"].lora_slot == 0
    assert scheduler.admit(2048) == [] and lora.loads == 2  # no slot is taken from a running row
    scheduler.free(seqs["b1"])  # b's slot is idle now: c is loaded into it; a2 shares a's slot
    assert scheduler.admit(2048) == [seqs["c1"], seqs["a2"]] and lora.slot_adapter == [None, "a", "c"] and lora.loads == 3
    assert (seqs["c1"].lora_slot, seqs["a2"].lora_slot, lora.refs) == (2, 1, [0, 2, 1])
    for key in ("a1", "a2", "c1"):
        scheduler.free(seqs[key])
    assert lora.refs == [0, 0, 0] and list(lora.idle) == [1, 2]  # a's slot was released first: least recently used
    assert lora.acquire("b") == 1 and lora.slot_adapter == [None, "b", "c"]


def test_runners_without_per_row_lora_refuse_lora_modules(llama, root, tiny_model_dir):
    from predictor.engine.runner import KVPlan, make_runner

    bloom = AutoModelForCausalLM.from_pretrained(build_model("bloom", root / "bloom", tiny_model_dir, n_layer=2, hidden_size=64, n_head=4))
    lora = LoRAManager.load([("a", llama["a"])], AutoModelForCausalLM.from_pretrained(llama["base"]), 2, 16)
    with pytest.raises(ModelLoadError, match="--lora_modules needs the paged runner.*row-by-row fallback"):
        make_runner(bloom, KVPlan(1 << 20, 512), 4, torch.device("cpu"), lora)


def test_the_cli_refuses_a_bad_adapter_before_serving(llama, root, tiny_model_dir):
    wider = build_model("llama", root / "llama-wide", tiny_model_dir, hidden_size=96)
    other = make_adapter(wider, root / "wide-a", rank=4, targets=["q_proj"], seed=1)
    done = subprocess.run(
        [sys.executable, "-m", "predictor", "--model_dir", str(llama["base"]), "--model_name", "m", "--lora_modules", f"a={llama['a']}", f"w={other}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--lora_modules w=" in done.stderr and "an adapter of another base model" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--lora_modules", "m=/adapters/m"], "the adapter name 'm' is the served model's name"),
        (["--lora_modules", "a=/x", "a=/y"], "adapter names must be unique"),
        (["--lora_modules", "a"], "is not NAME=DIR"),
        (["--lora_modules", "a=s3://bucket/a"], "give a local directory"),
        (["--max_loras", "0"], "--max_loras: must be at least 1"),
    ],
)
def test_lora_flags_are_checked_before_loading(args, reason, capsys):
    from predictor.server import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model_dir", "/nonexistent", "--model_name", "m", *args])
    assert exit_.value.code == 2 and reason in capsys.readouterr().err


# ---- runtime updates: /v1/load_lora_adapter and /v1/unload_lora_adapter ---------------------------------------------


def test_runtime_load_serves_at_once_and_unload_waits_for_the_adapters_requests(llama, root, tmp_path):
    """A server started with no adapter: one loaded at runtime is listed and serves exactly the merged model's output;
    unloading it waits for its running request, refuses new ones meanwhile; the same name loaded again with other
    weights serves those (the prefix cache never hands back the old adapter's blocks)."""
    base = llama["base"]
    prompts = token_prompts(llama["vocab"], [6, 33], seed=11)  # the 33-token prompt fills two prefix-cache blocks
    args = ["--enable_lora_runtime_updates", "--max_lora_rank", "8", "--max_loras", "2"]
    server, expected = start_and_compute(base, tmp_path, args, lambda: {m: merged_reference(base, llama.get(m), prompts) for m in ("m", "a", "b")})
    url = server.url
    try:
        assert "LoRA adapters: none yet; runtime updates on" in server.read_log()
        assert [c["id"] for c in httpx.get(f"{url}/v1/models").json()["data"]] == ["m"]
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(llama["a"])}, timeout=60)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a' added successfully."
        cards = {c["id"]: c for c in httpx.get(f"{url}/v1/models").json()["data"]}
        assert cards["a"]["parent"] == "m" and cards["a"]["root"] == "a"
        assert complete(url, [("a", p) for p in prompts] + [("m", p) for p in prompts], MAX_TOKENS) == expected["a"] + expected["m"]

        refusals = {
            "already been loaded": {"lora_name": "a", "lora_path": str(llama["b"])},
            "is not a directory": {"lora_name": "c", "lora_path": str(root / "missing")},
            "rank 16": {"lora_name": "c", "lora_path": str(make_adapter(base, root / "llama-r16", rank=16, targets=["q_proj"], seed=3))},
            "served model": {"lora_name": "m", "lora_path": str(llama["a"])},
        }
        for reason, body in refusals.items():
            r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=60)
            assert r.status_code == 400 and reason in r.json()["error"]["message"], (reason, r.text)
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "nope"}).status_code == 404

        async def unload_while_streaming() -> tuple[list[float], float, int, int]:
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"model": "a", "prompt": prompts[0], "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
                async with client.stream("POST", f"{url}/v1/completions", json=body) as stream:
                    lines = stream.aiter_lines()
                    await anext(lines)  # the stream runs
                    unload = asyncio.create_task(client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a"}))
                    await asyncio.sleep(0.3)
                    during = await client.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
                    events = [line async for line in lines if line.startswith("data: {")]
                    ended = time.monotonic()
                response = await unload
                return len(events), ended, during.status_code, response.status_code, time.monotonic()

        streamed, ended, during, unloaded, answered = asyncio.run(unload_while_streaming())
        assert streamed >= 50 and during == 404 and unloaded == 200 and answered >= ended
        assert [c["id"] for c in httpx.get(f"{url}/v1/models").json()["data"]] == ["m"]
        # "a" again, with b's weights: b's output, though a's blocks of the same prompt were cached
        assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(llama["b"])}, timeout=60).status_code == 200
        assert complete(url, [("a", p) for p in prompts], MAX_TOKENS) == expected["b"]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'vllm:lora_requests_info{max_lora="2"' in metrics and 'vllm:cache_config_info{block_size="16"' in metrics
    finally:
        stop_server(server)


def test_runtime_updates_are_off_by_default(server):
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        r = httpx.post(f"{server.url}{path}", json={"lora_name": "a", "lora_path": "/tmp"})
        assert r.status_code == 404 and "--enable_lora_runtime_updates" in r.json()["error"]["message"]
