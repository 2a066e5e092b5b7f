"""Tool calling: the parsers on text, and ``tools``/``tool_choice`` through the OpenAI SDK against the real server.

The served model is a tiny random-weight Llama with the demo tokenizer and a Hermes-style chat template
(Qwen 2.5's shape) that renders ``tools``. It never calls a tool by itself, so ``required`` and a named
function (constrained decoding) prove the calls' shape and arguments; ``auto`` is proven on text by the
parser tests and end to end by the model's own greedy answer (computed with transformers) coming back as content.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch
from conftest import MODEL_NAME, start_server, stop_server
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from predictor.loading import FALLBACK_CHAT_TEMPLATE
from predictor.protocols import tool_calls
from predictor.protocols.schema import ChatMessage, Tool
from predictor.protocols.tool_calls import HermesParser, JsonCallsParser, ParsedDelta, collect, parse_text

HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages if message.role != 'system' %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather in Paris?"}]
HISTORY = MESSAGES + [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
]


# ---- the parsers, on text ------------------------------------------------------------------------


def chunked(parser, text: str, size: int) -> tuple[str | None, list[dict]]:
    delta = ParsedDelta()
    for i in range(0, len(text), size):
        delta += parser.feed(text[i : i + size])
    delta += parser.finish()
    return collect(delta)


def calls_of(calls: list[dict]) -> list[tuple[str, dict]]:
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


HERMES_TEXT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}r\\"is", "unit": "c"}}\n</tool_call>\n'
    '<tool_call>\n{"arguments": {"a": 1, "b": 2}, "name": "add"}\n</tool_call>'
)
HERMES_CALLS = [("get_weather", {"city": 'Pa}r"is', "unit": "c"}), ("add", {"a": 1, "b": 2})]


@pytest.mark.parametrize("size", [None, 1, 2, 3, 5, 11])
def test_hermes_parser_whole_and_chunk_by_chunk(size):
    content, calls = parse_text(HermesParser(), HERMES_TEXT) if size is None else chunked(HermesParser(), HERMES_TEXT, size)
    assert content == "Let me check."
    assert calls_of(calls) == HERMES_CALLS


def test_hermes_parser_streams_header_then_argument_fragments():
    parser = HermesParser()
    first = parser.feed("Hi <tool_ca")
    assert first.content == "Hi" and not first.tool_calls  # the partial tag is held back
    head = parser.feed('ll>{"name": "add", "arguments": {"a": ')
    assert head.content == "" and head.tool_calls[0].name == "add" and head.tool_calls[0].id.startswith("call_")
    assert "".join(d.arguments for d in head.tool_calls) == '{"a": '
    rest = parser.feed('3, "b": 4}}</tool_call>')
    assert all(d.name is None for d in rest.tool_calls) and "".join(d.arguments for d in rest.tool_calls) == '3, "b": 4}'
    assert parser.finish().content == "" and parser.calls == 1


def test_hermes_parser_leaves_text_alone():
    for text in ["plain answer <tool", "  spaced  ", "<tool_call>not json</tool_call> ok", 'see <tool_call>{"x": 1}</tool_call>']:
        for size in (None, 1, 4):
            content, calls = parse_text(HermesParser(), text) if size is None else chunked(HermesParser(), text, size)
            assert calls == [] and content == text, (text, size, content)


LLAMA_TEXT = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}; {"name": "add", "parameters": {"a": 5, "b": 6}}'


@pytest.mark.parametrize("size", [None, 1, 3, 7])
def test_llama3_json_parser(size):
    content, calls = parse_text(JsonCallsParser(), LLAMA_TEXT) if size is None else chunked(JsonCallsParser(), LLAMA_TEXT, size)
    assert content is None
    assert calls_of(calls) == [("get_weather", {"city": "Oslo", "unit": "f"}), ("add", {"a": 5, "b": 6})]
    for text in ['{"answer": 42}', "Hello {there}", "  The weather is fine."]:
        assert chunked(JsonCallsParser(), text, 2) == (text, [])


def test_parser_choice_from_template():
    assert tool_calls.detect_parser(HERMES_TEMPLATE) == "hermes"
    assert tool_calls.detect_parser('{{- "<|python_tag|>" }}{"name": ..., "parameters": ...}') == "llama3_json"
    assert tool_calls.detect_parser(FALLBACK_CHAT_TEMPLATE) == "hermes"


def test_template_without_tools_gets_the_fallback_system_message():
    messages = [ChatMessage.model_validate(m) for m in HISTORY]
    rendered, template_tools = tool_calls.prompt_messages(messages, [Tool.model_validate(t) for t in TOOLS], FALLBACK_CHAT_TEMPLATE)
    assert template_tools is None
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("You are helpful.\n\n# Tools") and '"get_weather"' in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n18 degrees\n</tool_response>"}


# ---- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_model(tiny_model_dir: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tool-model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = HERMES_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tool_server(tool_model: Path, tmp_path_factory):
    srv = start_server(tool_model, tmp_path_factory.mktemp("tool-server"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(tool_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0)


def _prompt_text(url: str, body: dict) -> str:
    ids = httpx.post(f"{url}/tokenize", json=body, timeout=30).json()["tokens"]
    return httpx.post(f"{url}/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]


def test_tools_and_history_reach_the_chat_template(tool_server, server):
    text = _prompt_text(tool_server.url, {"messages": HISTORY, "tools": TOOLS})
    assert "<tools>" in text and json.dumps(TOOLS[0]) in text
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}' in text  # arguments as an object
    assert "<tool_response>\n18 degrees\n</tool_response>" in text
    fallback = _prompt_text(server.url, {"messages": MESSAGES, "tools": TOOLS})  # the tiny GPT-2: no tools in its template
    assert fallback.startswith("System: You are helpful.\n\n# Tools") and '"name": "add"' in fallback


def check_calls(calls, allowed_names=SCHEMAS) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in allowed_names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def stream_calls(stream) -> tuple[str, list, str]:
    """Accumulate streamed tool-call deltas as a client does: (content, calls as objects, finish_reason)."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.id is not None:
                assert d.index not in calls and d.function.name and d.type == "function"
                calls[d.index] = {"id": d.id, "type": "function", "function": {"name": d.function.name, "arguments": ""}}
            calls[d.index]["function"]["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    from openai.types.chat import ChatCompletionMessageToolCall

    return content, [ChatCompletionMessageToolCall.model_validate(calls[i]) for i in sorted(calls)], finish


def test_required_tool_choice(client):
    kw = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=200, temperature=1.0)
    r = client.chat.completions.create(**kw, n=3, seed=1)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls)
    content, calls, finish = stream_calls(client.chat.completions.create(**kw, seed=2, stream=True))
    assert finish == "tool_calls" and content == ""
    check_calls(calls)


def test_named_tool_choice(client):
    kw = dict(
        model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=200, temperature=1.0, seed=3
    )
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls, ["add"])
    content, calls, finish = stream_calls(client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    check_calls(calls, ["add"])
    assert calls[0].function.arguments == choice.message.tool_calls[0].function.arguments  # same seed, same call


def test_auto_tool_choice_answers_with_the_models_own_greedy_text(tool_model, tool_server, client):
    """Under ``auto`` the model chooses; this one never calls a tool by itself, so the one right answer is its greedy
    text for the rendered prompt, computed here with transformers: as content, no tool calls, streamed or not."""
    ids = httpx.post(f"{tool_server.url}/tokenize", json={"messages": MESSAGES, "tools": TOOLS}, timeout=30).json()["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(tool_model)
    with torch.no_grad():
        model = LlamaForCausalLM.from_pretrained(tool_model).eval()
        new = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, len(ids) :].tolist()
    expected = tokenizer.decode(new, skip_special_tokens=True)
    assert expected.strip() and "<tool_call>" not in expected, expected  # the premise: a plain answer
    finish = "stop" if new[-1] == tokenizer.eos_token_id else "length"

    kw = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=30, temperature=0)
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.message.tool_calls is None
    assert (choice.message.content, choice.finish_reason) == (expected, finish)
    content, calls, streamed_finish = stream_calls(client.chat.completions.create(**kw, stream=True))
    assert (content, calls, streamed_finish) == (expected, [], finish)


def test_conversation_with_a_tool_result_continues(tool_server, client):
    """The answer is generated after the whole history, the tool's result included (the prompt /tokenize renders)."""
    prompt = httpx.post(f"{tool_server.url}/tokenize", json={"messages": HISTORY, "tools": TOOLS}, timeout=30).json()["count"]
    r = client.chat.completions.create(model=MODEL_NAME, messages=HISTORY, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == prompt and r.usage.completion_tokens >= 1
    r = client.chat.completions.create(model=MODEL_NAME, messages=HISTORY, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.usage.prompt_tokens == prompt


@pytest.mark.parametrize("max_tokens", [3, 8])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_max_tokens_cut_of_a_constrained_call_is_length_streamed_or_not(client, choice, max_tokens):
    """Cut by max_tokens, a call is returned as far as it got, with ``length``, the same streamed or not (as OpenAI)."""
    args = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=max_tokens, temperature=0)
    whole = client.chat.completions.create(**args).choices[0]
    assert whole.finish_reason == "length"
    calls: dict[int, dict] = {}
    finish = None
    for event in client.chat.completions.create(**args, stream=True):
        delta = event.choices[0].delta
        finish = event.choices[0].finish_reason or finish
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"name": "", "arguments": ""})
            call["name"] += (d.function.name or "") if d.function else ""
            call["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "length"
    assert [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls or []] == [calls[i] for i in sorted(calls)]
    if isinstance(choice, dict):  # a named call begins with its first token (required writes `[{"name": ...` first)
        assert calls and calls[0]["name"] == "add" and calls[0]["arguments"], calls


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}]},
            "messages.0.tool_calls.0.function.arguments",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "add", "arguments": "[1]"}}]}]},
            "messages.0.tool_calls.0.function.arguments",  # JSON, but not an object
        ),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "3"}]}, "messages.1"),  # no tool_call_id
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "c", "function": {"name": "add", "arguments": "{}"}}]}]}, "messages.0"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools.0.function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools.0.function.parameters"),
    ],
)
def test_bad_tool_requests_are_400(tool_server, body, param):
    r = httpx.post(f"{tool_server.url}/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()
    assert (
        httpx.post(f"{tool_server.url}/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2}, timeout=30).status_code == 200
    )
