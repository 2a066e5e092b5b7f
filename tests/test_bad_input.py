"""Client mistakes get a clear 4xx naming what is wrong, on every protocol, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
from conftest import MODEL_NAME

M = MODEL_NAME
LONG = "word " * 400  # far over the tiny model's 128-token context

# (path, body as bytes or JSON-able, expected status, text the error must contain)
CASES = [
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": "abc"}, 400, "max_tokens"),
    ("/v1/completions", {"model": M, "prompt": "x", "temperature": [1]}, 400, "temperature"),
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "does not exist"),
    ("/v1/completions", {"model": M, "prompt": ""}, 400, "empty"),
    ("/v1/completions", {"model": M, "prompt": []}, 400, "empty"),
    ("/v1/completions", {"model": M, "prompt": LONG}, 400, "maximum context length is 128"),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 100000}, 400, "at most 127"),
    ("/v1/completions", {"model": M, "prompt": "x", "frobnicate": True}, 400, "frobnicate"),
    ("/v1/completions", {"model": M, "prompt": "x", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"model": M, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": M, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": M, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": M, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"model": M, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": M, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"model": M, "prompt": [999999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"model": M, "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": M, "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "JSON"),
    ("/openai/v1/chat/completions", {"model": M, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": LONG}]}, 400, "maximum context length"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    (f"/v1/models/{M}:predict", b"{not json", 400, ""),
    (f"/v1/models/{M}:predict", {"instances": [""]}, 400, "empty"),
    (f"/v1/models/{M}:predict", {"instances": [{"prompt": 3}]}, 400, "instances"),
    (f"/v1/models/{M}:predict", {"instances": ["x"], "parameters": {"max_tokens": -1}}, 400, "max_tokens"),
    (f"/v1/models/{M}:predict", {"instances": ["x"], "extra": 1}, 400, "extra"),
    ("/v1/models/other:predict", {"instances": ["x"]}, 404, ""),
    (f"/v2/models/{M}/infer", b"{", 400, ""),
    (f"/v2/models/{M}/infer", {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [""]}]}, 400, "empty"),
    (f"/v2/models/{M}/infer", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, 400, "text_input"),
    (
        f"/v2/models/{M}/infer",
        {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "parameters": {"top_k": "many"}},
        400,
        "top_k",
    ),
    (f"/v2/models/{M}/infer", {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [LONG]}]}, 400, "maximum context length"),
    ("/v2/models/other/infer", {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, 404, ""),
    (f"/v2/models/{M}/generate", {"text_input": ""}, 400, "empty"),
    (f"/v2/models/{M}/generate", {"text_input": "x", "parameters": {"wat": 1}}, 400, "wat"),
    (f"/v2/models/{M}/generate", b"[1, 2]", 400, "object"),
    ("/v2/models/other/generate", {"text_input": "x"}, 404, "does not exist"),  # one resolve_model for every route
    (f"/v2/models/{M}/generate_stream", {"text_input": "x", "parameters": {"max_tokens": 0}}, 400, "max_tokens"),
]


@pytest.mark.parametrize("path,body,status,needle", CASES, ids=[f"{i}-{c[0].split('/')[-1]}" for i, c in enumerate(CASES)])
def test_bad_request_gets_4xx(server, path, body, status, needle):
    content = body if isinstance(body, bytes) else None
    r = httpx.post(f"{server.url}{path}", content=content, json=None if content else body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.text
    error = r.json()["error"]
    if path.startswith(("/v1/completions", "/v1/chat", "/openai/")):
        assert set(error) == {"message", "type", "param", "code"}  # the OpenAI error body


def test_openai_errors_name_the_parameter_and_the_numbers(server, hf_model):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": M, "prompt": "x", "presence_penalty": 9})
    assert r.json()["error"]["param"] == "presence_penalty"
    r = httpx.post(f"{server.url}/v1/completions", json={"model": M, "prompt": LONG})
    n_tokens = len(hf_model[1](LONG)["input_ids"])
    message = r.json()["error"]["message"]
    assert f"the prompt has {n_tokens} tokens" in message and "maximum context length is 128 tokens" in message


def test_one_megabyte_body_is_413_and_server_still_serves(server):
    big = b'{"model": "tiny", "prompt": "' + b"a" * (1 << 20) + b'"}'
    for path in ("/v1/completions", f"/v2/models/{M}/infer", f"/v1/models/{M}:predict", f"/v2/models/{M}/generate"):
        r = httpx.post(f"{server.url}{path}", content=big, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 413, (path, r.text)
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": M, "prompt": "The", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").json()["ready"] is True


def test_server_never_logged_a_500(server):
    assert " 500 " not in server.read_log()
