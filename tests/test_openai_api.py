"""The OpenAI-compatible routes, driven by the real OpenAI Python SDK against the real server on loopback."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from conftest import MODEL_NAME

PROMPT = "The for statement"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(hf_model):
    return hf_model[1]


def test_models_list_on_both_prefixes(server, client):
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    body = httpx.get(f"{server.url}/openai/v1/models").json()
    assert body["data"][0]["id"] == MODEL_NAME


def test_completion_usage_counts_are_exact(client, tokenizer):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].finish_reason == "length"


def test_openai_prefix_serves_the_same_completion(server, client):
    r1 = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    c2 = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused")
    r2 = c2.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r1.choices[0].text == r2.choices[0].text


def test_end_of_sequence_gives_stop(client, tokenizer):
    eos = tokenizer.eos_token_id
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, logit_bias={str(eos): 100})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == ""
    assert r.usage.completion_tokens == 1


def test_ignore_eos_and_min_tokens(client, tokenizer):
    eos = str(tokenizer.eos_token_id)
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logit_bias={eos: 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, logit_bias={eos: 100}, extra_body={"min_tokens": 4})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 5  # 4 forced tokens, then EOS


def test_stop_string_is_trimmed(client):
    candidates = ["A class definition", "x", PROMPT, "Exceptions are", "import"]
    for prompt in candidates:  # a prompt for which the tiny model writes some visible text
        full = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        if len(full.strip()) >= 3:
            break
    else:
        pytest.fail("the tiny model wrote no visible text for any candidate prompt")
    stripped = full.strip()
    stop = stripped[1:3]
    cut = full.index(stop)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:cut]
    assert r.choices[0].finish_reason == "stop"


def test_seed_is_reproducible_and_n_gives_choices(client):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=1234, n=3)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1, "different choices should differ"
    c = client.completions.create(**{**kwargs, "seed": 99})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_top_k_one_equals_greedy(client):
    greedy = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    topk = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0.9, seed=5, extra_body={"top_k": 1})
    assert topk.choices[0].text == greedy


def test_repetition_penalty_changes_greedy_output(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    penalised = client.completions.create(**kw, extra_body={"repetition_penalty": 5.0}).choices[0].text
    frequency = client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert penalised != plain and frequency != plain


def test_logprobs_and_echo(client, tokenizer):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    n_prompt = len(tokenizer(PROMPT)["input_ids"])
    assert r.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    for chosen, top in zip(lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:]):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy picks the top token


def test_chat_completion_and_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_completion_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def test_streaming_completion_matches_non_streaming_and_reports_usage(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streaming_chat_ends_with_done(server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_async_client_concurrent_requests(server, client):
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")
        rs = await asyncio.gather(*(client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=6, temperature=0) for p in ["A", "B", "C"]))
        stream = await client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=4, temperature=0, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return [r.choices[0].text for r in rs] + ["".join(parts)]

    results = asyncio.run(run())
    sync = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=6, temperature=0).choices[0].text for p in ["A", "B", "C"]]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=4, temperature=0)
    assert results == sync + [chat.choices[0].message.content]  # async, concurrent and streamed: the same greedy text


def test_token_id_prompts_batch(client, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    by_text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    r = client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == [by_text, by_text]
    assert r.usage.prompt_tokens == 2 * len(ids)
