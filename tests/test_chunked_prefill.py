"""Chunked prefill: a prompt longer than ``--max_prefill_tokens`` is prefilled over several steps, interleaved with the
running decodes, and gives the same greedy output and prompt logprobs as prefilled whole."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from conftest import start_server, stop_server
from test_model_families import build_model, complete, reference, token_prompts
from transformers import AutoConfig, AutoModelForCausalLM

from predictor.engine import Engine, EngineConfig
from predictor.loading import load_model
from predictor.sampling import GenerationRequest, SamplingParams

BUDGET = 16  # --max_prefill_tokens: every prompt below but the shortest takes several steps
LENGTHS = [3, 40, 17, 120, 64, 9]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_model_dir):
    return build_model("llama", tmp_path_factory.mktemp("chunked") / "llama", tiny_model_dir)


def test_chunked_prefill_gives_the_unchunked_greedy_output_and_prompt_logprobs(llama_dir, tmp_path):
    prompts = token_prompts(AutoConfig.from_pretrained(llama_dir).vocab_size, LENGTHS, seed=4)
    expected = reference(llama_dir, prompts)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        scores = torch.log_softmax(model(torch.tensor([prompts[3]])).logits[0].float(), -1)
    expected_logprobs = [float(scores[i - 1, prompts[3][i]]) for i in range(1, len(prompts[3]))]
    server = start_server(llama_dir, tmp_path, "--max_num_seqs", "4", "--max_prefill_tokens", str(BUDGET), "--no_enable_prefix_caching", name="m")
    try:
        assert f"prefill budget: {BUDGET} prompt tokens a step (--max_prefill_tokens)" in server.read_log()
        assert complete(server.url, prompts, together=False) == expected
        assert complete(server.url, prompts, together=True) == expected  # 6 prompts, 4 rows: chunks beside decodes
        body = {"model": "m", "prompt": prompts[3], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        got = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]["token_logprobs"]
        assert got[0] is None and len(got) == len(prompts[3]) + 1  # over 8 chunks of the prompt, then the generated token
        assert max(abs(a - b) for a, b in zip(got[1 : len(prompts[3])], expected_logprobs)) < 1e-4
    finally:
        stop_server(server)


def test_running_streams_get_tokens_while_a_long_prompt_prefills(llama_dir):
    """In process, with the runner's calls recorded: a 120-token prompt arriving while a stream decodes is prefilled in
    8 steps of at most 16 tokens, and each of those steps is one forward in which the stream decodes a token too."""
    loaded = load_model(llama_dir, dtype="float32", device="cpu")
    vocab = loaded.vocab_size
    short, long = token_prompts(vocab, [5, 120], seed=6)
    events: list[tuple[str, list[tuple[int, int]]]] = []

    async def main() -> tuple[list[int], list[int]]:
        engine = Engine(loaded, EngineConfig(max_num_seqs=4, max_prefill_tokens=BUDGET))
        engine.start()
        real_prefill, real_decode, real_step = engine.runner.prefill, engine.runner.decode, engine.runner.step
        engine.runner.prefill = lambda chunks: (events.append(("prefill", [(c.seq_id, len(c.tokens)) for c in chunks])), real_prefill(chunks))[1]
        engine.runner.decode = lambda chunks: (events.append(("decode", [(c.seq_id, "decode") for c in chunks])), real_decode(chunks))[1]
        engine.runner.step = lambda prefill, decode: (
            events.append(("step", [(c.seq_id, len(c.tokens)) for c in prefill] + [(c.seq_id, "decode") for c in decode])),
            real_step(prefill, decode),
        )[1]
        try:
            params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
            stream = engine.submit(GenerationRequest("stream", short, params))
            tokens: list[int] = []

            async def read(seq, into: list[int]) -> None:
                async for out in seq.stream():
                    into.extend(out.token_ids)

            reader = asyncio.create_task(read(stream, tokens))
            while len(tokens) < 3:
                await asyncio.sleep(0.005)
            late = engine.submit(GenerationRequest("long", long, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)))
            late_tokens: list[int] = []
            await asyncio.gather(reader, read(late, late_tokens))
            return [stream.seq_id, late.seq_id], late_tokens
        finally:
            engine.stop()

    (a, b), late_tokens = asyncio.run(main())
    steps = [rows for kind, rows in events if any(seq == b and n != "decode" for seq, n in rows)]
    assert [n for rows in steps for seq, n in rows if seq == b] == [16] * 7 + [8]
    kinds = [kind for kind, rows in events if any(seq == b and n != "decode" for seq, n in rows)]
    assert kinds == ["step"] * 8  # one forward each: the chunk and the running stream's decode token together (vLLM V1's mixed batch)
    assert all((a, "decode") in rows for rows in steps)
    assert len(late_tokens) == 2


def test_the_step_budget_defaults_by_device():
    """Without --max_prefill_tokens: 256 on CPU (measured: benchmarks/chunked_prefill.py), 2048 on CUDA; a given one wins."""
    from predictor.engine.engine import prefill_budget

    assert prefill_budget(None, torch.device("cpu")) == 256
    assert prefill_budget(None, torch.device("cuda")) == 2048
    assert prefill_budget(64, torch.device("cpu")) == 64
