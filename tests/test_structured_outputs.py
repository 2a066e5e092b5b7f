"""Structured outputs by constrained decoding, through the real OpenAI SDK against the real server.

The tiny model has random-ish weights: its free output is never JSON, so every valid output here is the
grammar's doing. Schemas bound their strings, numbers and arrays so that the grammar itself ends the
output well within ``max_tokens`` (``finish_reason`` must then be ``stop``).
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from conftest import MODEL_NAME, start_server, stop_server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "addr": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 4}, "zip": {"type": "string", "pattern": "^[0-9]{3}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "kind": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "tags", "addr", "kind"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
REGEX = r"[a-c]{2,4}@[0-9]{1,3}\.(com|org)"
CHOICES = ["yes", "no", "maybe"]
MESSAGES = [{"role": "user", "content": "Describe a person"}]
MAX_TOKENS = 100  # the tiny model's context is 128 tokens; the chat prompt takes 23


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def valid(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


def test_json_schema_chat_and_completions_always_validate(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0, seed=3, n=4, response_format=RESPONSE_FORMAT
    )
    outputs = [c.message.content for c in r.choices]
    assert all(c.finish_reason == "stop" for c in r.choices), outputs
    for text in outputs:
        valid(text)
    assert len(set(outputs)) > 1  # sampled, not one forced string
    r = client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=MAX_TOKENS, temperature=0, extra_body={"response_format": RESPONSE_FORMAT})
    assert r.choices[0].finish_reason == "stop"
    valid(r.choices[0].text)
    assert r.usage.completion_tokens < MAX_TOKENS  # ended by the grammar, without an EOS token to spare


def test_strict_closes_objects_as_openai_does(client):
    from predictor.protocols.schema import closed

    open_schema = {"type": "object", "properties": {"a": {"enum": ["x"]}, "b": {"type": "object", "properties": {"c": {"enum": [1]}}}}}
    assert closed(open_schema)["additionalProperties"] is False and closed(open_schema)["properties"]["b"]["additionalProperties"] is False
    assert closed({"type": "object", "properties": {}, "additionalProperties": True})["additionalProperties"] is True  # said: kept
    strict = {"type": "json_schema", "json_schema": {"name": "t", "schema": {**open_schema, "required": ["a", "b"]}, "strict": True}}
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0, seed=5, n=4, response_format=strict)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        assert json.loads(choice.message.content) == {"a": "x", "b": {"c": 1}}  # exactly the listed keys: nothing else fits


def test_free_output_is_not_json(client):
    """The control: without the constraint this model does not write valid JSON."""
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=40, temperature=1.0, seed=3, n=4)
    for c in r.choices:
        with pytest.raises((ValueError, jsonschema.ValidationError)):
            valid(c.message.content)


def test_streamed_json_schema_equals_non_streamed(client):
    kw = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, response_format=RESPONSE_FORMAT)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    valid(text)
    assert chunks[-1].choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=MAX_TOKENS, stream=True, extra_body={"guided_json": SCHEMA})
    )
    valid(streamed)


def test_regex_choice_and_grammar(client):
    for body in ({"structured_outputs": {"regex": REGEX}}, {"guided_regex": REGEX}):
        r = client.completions.create(model=MODEL_NAME, prompt="mail", max_tokens=40, temperature=1.0, seed=1, n=3, extra_body=body)
        for c in r.choices:
            assert re.fullmatch(REGEX, c.text) and c.finish_reason == "stop", c.text
    for body in ({"structured_outputs": {"choice": CHOICES}}, {"guided_choice": CHOICES}):
        r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=2, n=4, extra_body=body)
        assert all(c.message.content in CHOICES and c.finish_reason == "stop" for c in r.choices)
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,2}/'
    r = client.completions.create(model=MODEL_NAME, prompt="sum", max_tokens=60, temperature=1.0, seed=4, extra_body={"structured_outputs": {"grammar": lark}})
    assert re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})*\)", r.choices[0].text), r.choices[0].text


def test_json_object(client):
    stopped = 0
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, response_format={"type": "json_object"}
        )
        c = r.choices[0]
        if c.finish_reason == "stop":  # an unbounded object may also run to max_tokens
            assert isinstance(json.loads(c.message.content), dict)
            stopped += 1
        else:
            assert c.message.content.startswith("{")
    assert stopped >= 1


def test_constrained_and_free_requests_share_a_batch(server, client):
    """Only constrained rows are masked: free requests in the same batch give exactly their output alone."""
    prompts = ["The for statement", "import", "A class", "x"]
    alone = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=24, temperature=0).choices[0].text for p in prompts]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        free = [aclient.completions.create(model=MODEL_NAME, prompt=p, max_tokens=24, temperature=0) for p in prompts]
        schema = [
            aclient.chat.completions.create(
                model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0, seed=s, response_format=RESPONSE_FORMAT
            )
            for s in range(3)
        ]
        regex = aclient.completions.create(
            model=MODEL_NAME, prompt="mail", max_tokens=40, temperature=1.0, seed=9, extra_body={"structured_outputs": {"regex": REGEX}}
        )

        async def streamed():
            stream = await aclient.chat.completions.create(
                model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.7, seed=5, stream=True, response_format=RESPONSE_FORMAT
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        results = await asyncio.gather(*free, *schema, regex, streamed())
        await aclient.close()
        return results

    results = asyncio.run(run())
    assert [r.choices[0].text for r in results[:4]] == alone
    for r in results[4:7]:
        valid(r.choices[0].message.content)
    assert re.fullmatch(REGEX, results[7].choices[0].text)
    valid(results[8])


@pytest.mark.parametrize(
    "body, param, words",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}}},
            "response_format.json_schema.schema",
            "objekt",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}}, "response_format.json_schema", "schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"response_format": {"type": "json_object", "json_schema": {"name": "p", "schema": {}}}}, "response_format", "would be ignored"),
        ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex", "regex"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar", "undefined_rule"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"structured_outputs": {"grammar": "%%%% @@@ ::= ::="}}, "structured_outputs.grammar", "invalid grammar"),  # GBNF llguidance cannot read
        ({"guided_json": {"$ref": "#"}}, "guided_json", "cannot be compiled"),  # fails only at the first mask
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "one output constraint"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "structured outputs"),
    ],
)
def test_constraints_the_engine_cannot_honour_are_400(server, body, param, words):
    for path, base in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})):
        r = httpx.post(f"{server.url}{path}", json={"model": MODEL_NAME, **base, **body}, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], error
    assert httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}, timeout=30).status_code == 200


def test_a_grammar_that_fails_while_generating_is_a_400_for_that_request_only(server):
    """llguidance finds this regex's lexer too large only when it consumes a token: after the request was admitted."""
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 8, "temperature": 0, "guided_regex": "a{1000}{1000}"}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and "the regex in 'guided_regex' failed at token" in r.json()["error"]["message"], r.text
    assert "<state>" not in r.text  # the first line of llguidance's error, not its parser dump
    assert httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}, timeout=30).status_code == 200


def test_max_tokens_cut_gives_length(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, temperature=0, response_format=RESPONSE_FORMAT)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    assert r.choices[0].message.content.startswith('{"')


def test_preempted_constrained_sequences_keep_their_grammar(tiny_model_dir, tmp_path):
    """A pool of 8 blocks (128 positions) for 6 sequences: preemption recomputes them, and their matchers carry on."""
    srv = start_server(tiny_model_dir, tmp_path, "--kv_cache_memory", str(9 * 16 * 2 * 2 * 96 * 4), "--max_num_seqs", "6")
    try:
        aclient_url = f"{srv.url}/v1"

        async def run():
            aclient = openai.AsyncOpenAI(base_url=aclient_url, api_key="unused", max_retries=0)
            rs = await asyncio.gather(
                *(
                    aclient.chat.completions.create(
                        model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.8, seed=s, response_format=RESPONSE_FORMAT
                    )
                    for s in range(6)
                )
            )
            await aclient.close()
            return rs

        results = asyncio.run(run())
        for r in results:
            assert r.choices[0].finish_reason == "stop"
            valid(r.choices[0].message.content)
        metrics = httpx.get(f"{srv.url}/metrics").text
        preemptions = float(re.search(r"^vllm:num_preemptions_total\{[^}]*\} (\S+)", metrics, re.M).group(1))
        assert preemptions > 0
    finally:
        stop_server(srv)
