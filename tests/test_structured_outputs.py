"""Structured outputs by constrained decoding: through the real OpenAI SDK against the real server, and the
matcher's number bound, closing strategy and compile limits in process.

The tiny model has random-ish weights: its free output is never JSON, so every valid output here is the
grammar's doing. What it samples depends on the CPU's float kernels (the same seed gives other answers on a
Xeon with AMX than on an EPYC), so no test counts on one answer: server tests either bound their schemas so
that the grammar itself ends every output well within ``max_tokens`` (``finish_reason`` must then be
``stop``), or assert what holds for any answer. The closing strategy is tested in process with a "model" that
picks uniformly among the allowed tokens with Python's seeded RNG (the same on every machine, and the worst
case: it never wants to close anything), and on the server with ``logit_bias`` steering the tiny model into
a string that never ends.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import jsonschema
import openai
import pytest
import torch
from conftest import MODEL_NAME, start_server, stop_server

from predictor.engine import structured
from predictor.engine.bounded_output import EXPONENT, MANTISSA, OUT, STR, TokenTable, json_lex
from predictor.engine.schema_checks import check_schema
from predictor.engine.structured import MAX_GRAMMAR_CHARS, GrammarCompiler, token_masks
from predictor.errors import InvalidRequest, PredictorError
from predictor.sampling import GrammarSpec

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
CITY = {  # unbounded strings and numbers: only the closing strategy ends them
    "type": "object",
    "properties": {"city": {"type": "string"}, "lat": {"type": "number"}, "lon": {"type": "number"}},
    "required": ["city", "lat", "lon"],
    "additionalProperties": False,
}


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
    lark = 'start: "(" NUM ("+" NUM){0,4} ")"\nNUM: /[0-9]{1,2}/'  # bounded: it ends within max_tokens whatever is sampled
    r = client.completions.create(model=MODEL_NAME, prompt="sum", max_tokens=60, temperature=1.0, seed=4, extra_body={"structured_outputs": {"grammar": lark}})
    assert re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2}){0,4}\)", r.choices[0].text) and r.choices[0].finish_reason == "stop", r.choices[0].text


def test_json_object_answers_always_parse(client):
    """An object of any size: the model could write on past max_tokens, so every answer closing in time (``stop``),
    on every CPU, is the closing strategy's doing."""
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, response_format={"type": "json_object"}
        )
        c = r.choices[0]
        assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict), c.message.content
        assert r.usage.completion_tokens <= MAX_TOKENS


def test_answers_close_before_max_tokens(client, tiny_model_dir):
    """``logit_bias`` makes the tiny model write ``a`` after ``a`` on every CPU: a string that never ends by itself.
    The answers still close (``stop``) within max_tokens, and parse."""
    from transformers import AutoTokenizer

    (a,) = AutoTokenizer.from_pretrained(tiny_model_dir).encode("a", add_special_tokens=False)
    city = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    for response_format, schema in (({"type": "json_object"}, {"type": "object"}), (city, CITY)):
        r = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=30, temperature=1.0, seed=1, n=2, logit_bias={str(a): 100}, response_format=response_format
        )
        for c in r.choices:
            assert c.finish_reason == "stop", c.message.content
            jsonschema.validate(json.loads(c.message.content), schema)
        assert r.usage.completion_tokens <= 2 * 30


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
        ({"guided_json": {"$ref": "#"}}, "guided_json", "refers to itself"),  # llguidance fails only at the first mask, unhelpfully
        ({"guided_json": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}}, "guided_json", "#/$defs/a → "),
        ({"guided_json": {"$schema": ["x"]}}, "guided_json", "$schema must be a string"),  # jsonschema: TypeError (unhashable)
        ({"guided_json": {"$schema": {}}}, "guided_json", "$schema must be a string"),
        ({"guided_json": {"$schema": 7}}, "guided_json", "$schema must be a string"),  # jsonschema: AttributeError
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": json.loads('{"items":' * 150 + "{}" + "}" * 150)}}},
            "response_format.json_schema.schema",
            "nested more than 64 levels",  # jsonschema's checker: RecursionError
        ),
        ({"guided_json": '{"items":' * 150 + "{}" + "}" * 150}, "guided_json", "nested more than 64 levels"),
        ({"guided_json": {"type": "string", "pattern": "(" * 600 + ")" * 600}}, "guided_json", "nested too deeply"),
        ({"guided_json": {"type": "integer", "multipleOf": 9999991}}, "guided_json", "multipleOf"),  # 193 s in llguidance
        ({"guided_json": {"type": "object", "properties": {f"f{i:05d}": {"type": "integer"} for i in range(30000)}}}, "guided_json", "too large"),
        ({"structured_outputs": {"grammar": "root ::= " + "(" * 500 + '"a"' + ")" * 500}}, "structured_outputs.grammar", "nested too deeply"),
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


# ---- in process: the matcher's number bound and closing strategy, the compiler's limits ----------------------------


@pytest.fixture(scope="module")
def tiny_compiler(tiny_model_dir) -> GrammarCompiler:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), tokenizer.eos_token_id)
    assert compiler.prepare() is None
    return compiler


def json_spec(schema: dict) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")))


def allowed(compiler: GrammarCompiler, matcher) -> list[int]:
    return torch.nonzero(token_masks([matcher], compiler.vocab_size, compiler.vocab_size)[0]).flatten().tolist()


def feed(compiler: GrammarCompiler, matcher, text: str) -> None:
    for token in compiler.tokenizer.encode(text, add_special_tokens=False):
        assert matcher.advance(token), text


def random_answer(compiler: GrammarCompiler, grammar, seed: int, max_tokens: int | None, limit: int = MAX_TOKENS) -> tuple[str, int, bool]:
    """A "model" that picks uniformly among the allowed tokens with Python's seeded RNG: (text, tokens, ended), ended
    meaning the grammar completed (or end-of-sequence was picked) within the budget."""
    rng, matcher, tokens = random.Random(seed), grammar.matcher(max_tokens), []
    while len(tokens) < (max_tokens or limit):
        token = rng.choice(allowed(compiler, matcher))
        if token == compiler.eos_token_id:
            return compiler.tokenizer.decode(tokens), len(tokens) + 1, True
        assert matcher.advance(token)
        tokens.append(token)
        if matcher.finished:
            return compiler.tokenizer.decode(tokens), len(tokens), True
    return compiler.tokenizer.decode(tokens), len(tokens), False


def test_json_lexer_counts_number_digits_outside_strings():
    assert json_lex(b'{"a": "12345678901234567890", "b": ', OUT, 0) == (OUT, 0, False)  # digits in strings do not count
    assert json_lex(b"-12.5e+10", OUT, 0) == (EXPONENT, 2, False)
    assert json_lex(b"12345678901234567", OUT, 0) == (MANTISSA, 17, False)
    assert json_lex(b"123456789012345678", OUT, 0)[2]  # an 18th digit
    assert json_lex(b"1e1234", OUT, 0)[2]  # a 4th exponent digit
    assert json_lex(b".", MANTISSA, 17)[2]  # a fraction with no digit left for it
    assert json_lex(b'"a\\"1', OUT, 0)[0] == STR  # an escaped quote does not end the string
    assert json_lex(b"5, ", MANTISSA, 16) == (OUT, 17, False)


class FakeTokenizer:
    """The two methods of llguidance's tokenizer a TokenTable reads, over a vocabulary with multi-digit tokens."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def is_special_token(self, token: int) -> bool:
        return token == 0

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return self.texts[tokens[0]].encode()


def test_the_number_bound_clears_exactly_the_tokens_with_too_many_digits():
    vocab = ["<eos>", "1", "12", "123", "5,", ".", "e", "e12", "1e1234", '"', "}", ",", "a", "1" * 18]
    table = TokenTable(FakeTokenizer(vocab), len(vocab), 0)

    def kept(mode: int, count: int) -> set[str]:
        mask = table.number_bound(mode, count)
        if mask is None:
            return set(vocab)
        return {text for i, text in enumerate(vocab) if mask.view("uint32")[i >> 5] >> (i & 31) & 1}

    assert {"1", "12", "5,", "."} <= kept(MANTISSA, 15) and "123" not in kept(MANTISSA, 15)  # 3 digits with 2 left: cleared too
    assert kept(MANTISSA, 17) & {"1", "12", "123", "5,", "."} == set() and {"e", "e12", ",", "}", "<eos>"} <= kept(MANTISSA, 17)
    assert "1" in kept(EXPONENT, 2) and "12" not in kept(EXPONENT, 2) and "1" not in kept(EXPONENT, 3)
    assert "1e1234" not in kept(OUT, 0) and "1" * 18 not in kept(OUT, 0) and "1" * 18 in kept(STR, 0)  # in a string, digits are text


def test_numbers_are_bounded_and_the_grammar_wins_where_it_needs_more_digits(tiny_compiler):
    grammar = tiny_compiler.compile(json_spec(CITY), "p")
    decode = tiny_compiler.tokenizer.decode
    m = grammar.matcher()
    feed(tiny_compiler, m, '{"city": "x", "lat": 12345678.901234567')  # 17 digits
    assert not any(decode([t]).strip()[:1].isdigit() or decode([t]) == "." for t in allowed(tiny_compiler, m))
    assert {",", "e"} <= {decode([t]) for t in allowed(tiny_compiler, m)}
    m = grammar.matcher()
    feed(tiny_compiler, m, '{"city": "x", "lat": 1e-123')
    assert {decode([t]) for t in allowed(tiny_compiler, m)} == {","}
    free = GrammarCompiler(tiny_compiler.tokenizer, tiny_compiler.vocab_size, tiny_compiler.eos_token_id, bound_outputs=False)
    m = free.compile(json_spec(CITY), "p").matcher()  # as before the bound: digits go on
    feed(tiny_compiler, m, '{"city": "x", "lat": 12345678.901234567')
    assert "1" in {decode([t]) for t in allowed(tiny_compiler, m)}
    at_least = {"type": "integer", "minimum": 10**18, "maximum": 9 * 10**18}  # 19 digits: more than the bound allows
    grammar = tiny_compiler.compile(json_spec(at_least), "p")
    for seed in range(3):
        text, _, ended = random_answer(tiny_compiler, grammar, seed, None)
        assert ended and json.loads(text) >= 10**18


def test_llguidance_honours_max_length_and_min_length(tiny_compiler):
    grammar = tiny_compiler.compile(json_spec({"type": "string", "minLength": 2, "maxLength": 3}), "p")
    decode = tiny_compiler.tokenizer.decode
    m = grammar.matcher()
    feed(tiny_compiler, m, '"a')
    assert '"' not in {decode([t]) for t in allowed(tiny_compiler, m)}  # one character: too short to end
    feed(tiny_compiler, m, "bc")
    assert {decode([t]) for t in allowed(tiny_compiler, m)} == {'"'}  # maxLength reached
    for seed in range(5):
        text, _, ended = random_answer(tiny_compiler, grammar, seed, None)
        assert ended and 2 <= len(json.loads(text)) <= 3


GRAMMARS = [
    ("json_object", json_spec({"type": "object"}), lambda text: isinstance(json.loads(text), dict)),
    ("city", json_spec(CITY), lambda text: jsonschema.validate(json.loads(text), CITY) is None),
    (
        "list",
        json_spec(LIST := {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}, "minItems": 1}),
        lambda text: jsonschema.validate(json.loads(text), LIST) is None,
    ),
    ("regex", GrammarSpec("regex", "[a-z]+(,[a-z]+)*"), lambda text: re.fullmatch("[a-z]+(,[a-z]+)*", text)),
    ("lark", GrammarSpec("grammar", 'start: "(" WORD ("+" WORD)* ")"\nWORD: /[a-z]+/'), lambda text: re.fullmatch(r"\([a-z]+(\+[a-z]+)*\)", text)),
]


@pytest.mark.parametrize("name, spec, valid_answer", GRAMMARS, ids=[g[0] for g in GRAMMARS])
def test_every_answer_closes_before_max_tokens(tiny_compiler, name, spec, valid_answer):
    """With its max_tokens the matcher closes every answer of a model that never closes anything by itself, within
    the budget; without (as before), most of them run to the budget unfinished."""
    grammar = tiny_compiler.compile(spec, "p")
    for max_tokens in (30, MAX_TOKENS):
        for seed in range(8):
            text, tokens, ended = random_answer(tiny_compiler, grammar, seed, max_tokens)
            assert ended and tokens <= max_tokens and valid_answer(text), (max_tokens, seed, text)
    unfinished = sum(not random_answer(tiny_compiler, grammar, seed, None, 30)[2] for seed in range(8))
    assert unfinished >= 4  # the control: with the grammar alone, most run on past 30 tokens


def test_closing_needs_a_budget_it_can_close_in_and_costs_nothing_before(tiny_compiler, monkeypatch):
    grammar = tiny_compiler.compile(json_spec(CITY), "p")
    searches = []
    real = structured.closing_path
    monkeypatch.setattr(structured, "closing_path", lambda *args: searches.append(1) or real(*args))
    rng = random.Random(0)
    far, free, short = grammar.matcher(10_000), grammar.matcher(), grammar.matcher(5)  # 5: less than the closing path
    for _ in range(60):
        mask = allowed(tiny_compiler, free)
        assert allowed(tiny_compiler, far) == mask and allowed(tiny_compiler, short) == mask  # unchanged: as before
        token = rng.choice([t for t in mask if t != tiny_compiler.eos_token_id])
        for m in (far, free, short):
            assert m.advance(token)
        if free.finished:
            break
    assert searches == [1]  # one search (the short budget's, which cannot close), none for the far one
    m = grammar.matcher(40)
    feed(tiny_compiler, m, '{"city": "' + "a" * 10)
    searches.clear()
    for _ in range(5):
        allowed(tiny_compiler, m)
        assert m.advance(tiny_compiler.tokenizer.encode("a")[0])
    assert len(searches) == 5  # within the window: once a step


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"$schema": ["a"]}, "$schema must be a string"),
        ({"$schema": {"a": 1}}, "$schema must be a string"),
        ({"$schema": 3}, "$schema must be a string"),
        (json.loads('{"items":' * 150 + "{}" + "}" * 150), "nested more than 64 levels"),
        ({"type": "string", "pattern": "(" * 600 + ")" * 600}, "pattern nested too deeply"),
        ({"type": "integer", "multipleOf": 9999991}, "multipleOf"),
        ({"properties": {f"p{i}": {"type": "integer", "multipleOf": 9000 + i} for i in range(10)}}, "multipleOf"),
        ({"type": "number", "multipleOf": float("inf")}, "multipleOf"),
        ({"type": "objekt"}, "not a valid JSON schema"),
    ],
)
def test_check_schema_names_what_is_wrong(schema, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        check_schema(schema)


def test_a_deep_pattern_is_refused_whatever_the_recursion_limit(monkeypatch):
    """torch.compile raises the process's recursion limit (inductor: 2,000); the pattern check must not depend on it."""
    import sys

    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(20000)
        with pytest.raises(ValueError, match="pattern nested too deeply"):
            check_schema({"type": "string", "pattern": "(" * 150 + ")" * 150})
        with pytest.raises(ValueError, match="pattern nested too deeply"):
            check_schema({"type": "object", "patternProperties": {"(" * 150 + "a" + ")" * 150: {}}})
    finally:
        sys.setrecursionlimit(limit)
    check_schema({"type": "string", "pattern": "^(a(b[()])|\\(c\\))+$"})  # shallow, escaped and bracketed parentheses: fine


def test_a_schema_nested_thousands_deep_is_a_clean_error(tiny_compiler):
    deep: dict = {}
    inner = deep
    for _ in range(5000):  # built without recursion: json.dumps of it would overflow
        inner["items"] = {}
        inner = inner["items"]
    with pytest.raises(ValueError, match="nested more than 64"):
        check_schema(deep)
    text = '{"items":' * 5000 + "{}" + "}" * 5000  # 50,002 characters: within the size limit, so the depth check it meets
    with pytest.raises(InvalidRequest, match="nested more than 64") as refused:
        tiny_compiler.compile(GrammarSpec("json_schema", text), "guided_json")
    assert refused.value.status == 400 and refused.value.param == "guided_json"


def test_the_largest_allowed_schema_compiles_and_one_more_character_is_refused(tiny_compiler):
    """The costliest shape measured (optional integer properties), just under MAX_GRAMMAR_CHARS; one char more: a 400."""
    count = (MAX_GRAMMAR_CHARS - 32) // 33  # 33 characters of object, 33 a property with its comma (one comma less)
    spec = json_spec({"type": "object", "properties": {f"field_{i:05d}": {"type": "integer"} for i in range(count)}})
    assert MAX_GRAMMAR_CHARS - 33 < len(spec.source) <= MAX_GRAMMAR_CHARS
    start = time.perf_counter()
    tiny_compiler.compile(spec, "p")
    print(f"largest allowed schema ({len(spec.source):,} characters) compiled in {time.perf_counter() - start:.2f} s")
    with pytest.raises(InvalidRequest, match="too large") as refused:
        tiny_compiler.compile(GrammarSpec("json_schema", spec.source + " " * (MAX_GRAMMAR_CHARS + 1 - len(spec.source))), "p")
    assert refused.value.status == 400


def test_refusals_are_cached_and_each_names_its_own_param(tiny_compiler, monkeypatch):
    compiles = []
    real = tiny_compiler._compile
    monkeypatch.setattr(tiny_compiler, "_compile", lambda spec: compiles.append(spec) or real(spec))
    spec = json_spec({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})
    for param in ("guided_json", "tools.f.function.parameters"):
        with pytest.raises(InvalidRequest, match="refers to itself") as refused:
            tiny_compiler.compile(spec, param)
        assert refused.value.param == param and f"'{param}'" in refused.value.message
    with pytest.raises(InvalidRequest, match="refers to itself"):
        asyncio.run(tiny_compiler.compile_async(spec, "response_format"))
    assert len(compiles) == 1


def test_compile_async_runs_off_the_event_loop_and_shares_one_compile(tiny_compiler, monkeypatch):
    compiles = []
    real = tiny_compiler._compile
    monkeypatch.setattr(tiny_compiler, "_compile", lambda spec: compiles.append(spec) or real(spec))
    count = (MAX_GRAMMAR_CHARS - 32) // 33
    spec = json_spec({"type": "object", "properties": {f"other_{i:05d}": {"type": "integer"} for i in range(count)}})

    async def run():
        ticks = 0

        async def heartbeat():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        beat = asyncio.create_task(heartbeat())
        grammars = await asyncio.gather(tiny_compiler.compile_async(spec, "a"), tiny_compiler.compile_async(spec, "b"))
        beat.cancel()
        return grammars, ticks

    (first, second), ticks = asyncio.run(run())
    assert first is second and len(compiles) == 1
    assert ticks >= 5  # the event loop went on while the schema compiled


def test_a_compile_that_takes_too_long_is_refused_and_remembered(tiny_compiler, monkeypatch):
    compiler = GrammarCompiler(tiny_compiler.tokenizer, tiny_compiler.vocab_size, tiny_compiler.eos_token_id, compile_timeout=0.2)
    compiler.prepare()
    slow, queued, later = (GrammarSpec("regex", text) for text in ("slow", "queued", "later"))
    real, compiled = compiler._compile, []
    monkeypatch.setattr(compiler, "_compile", lambda spec: compiled.append(spec) or (time.sleep(0.6) if spec == slow else None) or real(spec))

    async def run():
        return await asyncio.gather(compiler.compile_async(slow, "guided_regex"), compiler.compile_async(queued, "guided_regex"), return_exceptions=True)

    too_long, busy = asyncio.run(run())
    assert isinstance(too_long, InvalidRequest) and too_long.status == 400 and "took longer than 0.2 s to compile" in too_long.message
    assert isinstance(busy, PredictorError) and not isinstance(busy, InvalidRequest) and busy.status == 503  # it waited behind the slow one: retry
    with pytest.raises(InvalidRequest, match="took longer"):
        asyncio.run(compiler.compile_async(slow, "guided_regex"))  # remembered: no second compile
    assert compiled.count(slow) == 1
    assert asyncio.run(compiler.compile_async(later, "guided_regex")).spec == later  # a fresh compile thread
    time.sleep(0.5)  # the abandoned thread finishes; its late result does not replace the refusal
    with pytest.raises(InvalidRequest, match="took longer"):
        compiler.compile(slow, "guided_regex")
