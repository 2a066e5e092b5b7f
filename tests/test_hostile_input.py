"""Hostile input (issue 18): out-of-range integers, malformed and deeply nested bodies, pathological JSON schemas, broken
V2 tensors, the model-repository routes, capacity limits, half-sent bodies, huge stop strings. Every case gets a 4xx
(gRPC: INVALID_ARGUMENT) naming the problem, never a 5xx; the server stays healthy, drains cleanly on SIGTERM, and the
greedy output of well-behaved requests sent beside hostile ones does not change.

The real server on loopback, with real clients: httpx, the OpenAI SDK, KServe's gRPC protos on a grpc channel, raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openai
import pytest
from conftest import MODEL_NAME, start_server, stop_server
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

M = MODEL_NAME
HUGE = 2**70
INT64_MAX = 2**63 - 1
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
DEPTH = 5000
NESTING = re.compile(r"nest|depth", re.IGNORECASE)
CHAT = [{"role": "user", "content": "x"}]
SCHEMA_PARAM = "response_format.json_schema.schema"


# ---- clients and assertions ------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a request got: an HTTP status or a gRPC code, the error message and (OpenAI) its param."""

    status: int | grpc.StatusCode
    message: str
    param: str | None
    text: str  # the whole answer, for assertion messages


def http_outcome(r: httpx.Response) -> Outcome:
    try:
        body = r.json()
    except ValueError:
        return Outcome(r.status_code, r.text, None, r.text)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return Outcome(r.status_code, str(error.get("message")), error.get("param"), r.text)
    return Outcome(r.status_code, str(error) if error is not None else "", None, r.text)


def post(server, path: str, body: Any, timeout: float = 60, **headers: str) -> httpx.Response:
    """POST ``body``: bytes as they are, anything else as JSON."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json", **headers}, timeout=timeout)


def grpc_parameter(value: Any) -> pb.InferParameter:
    """A V2 gRPC parameter; integers outside int64 travel as strings (numbers may be strings over gRPC)."""
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return pb.InferParameter(int64_param=value)
    return pb.InferParameter(string_param=str(value))


def grpc_infer(
    server, prompts: list[str] | None = None, raw: list[bytes] | None = None, shape: list[int] | None = None, channel: grpc.Channel | None = None, **params: Any
):
    """ModelInfer with typed ``bytes_contents`` (``prompts``) or ``raw_input_contents`` (``raw``), on ``channel`` or a new one."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=shape or [len(prompts or raw)])
    if prompts is not None:
        tensor.contents.bytes_contents.extend(p.encode() for p in prompts)
    request = pb.ModelInferRequest(
        model_name=M,
        inputs=[tensor],
        raw_input_contents=raw or [],
        parameters={k: grpc_parameter(v) for k, v in {"max_tokens": 3, "temperature": "0", **params}.items()},
    )
    if channel is not None:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as own:
        return pb_grpc.GRPCInferenceServiceStub(own).ModelInfer(request, timeout=60)


def grpc_outcome(call) -> Outcome:
    try:
        response = call()
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "", None, f"{exc.code()}: {exc.details()}")
    return Outcome(grpc.StatusCode.OK, "", None, str(response)[:500])


def send(server, protocol: str, params: dict, prompt: str = "x") -> Outcome:
    """One small request with extra sampling ``params`` on one of the six protocols."""
    base = {"max_tokens": 3, "temperature": 0}
    if protocol == "completions":
        return http_outcome(post(server, "/v1/completions", {"model": M, "prompt": prompt, **base, **params}))
    if protocol == "chat":
        return http_outcome(post(server, "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": prompt}], **base, **params}))
    if protocol == "v2_rest":
        body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [prompt]}], "parameters": {**base, **params}}
        return http_outcome(post(server, f"/v2/models/{M}/infer", body))
    if protocol == "v2_grpc":
        return grpc_outcome(lambda: grpc_infer(server, [prompt], **params))
    if protocol == "v1":
        return http_outcome(post(server, f"/v1/models/{M}:predict", {"instances": [prompt], "parameters": {**base, **params}}))
    if protocol == "generate":
        return http_outcome(post(server, f"/v2/models/{M}/generate", {"text_input": prompt, "parameters": {**base, **params}}))
    raise AssertionError(protocol)


def is_openai(protocol_or_path: str) -> bool:
    """OpenAI's error body: the OpenAI routes, and /tokenize and /detokenize (vLLM's token routes answer as those do)."""
    if protocol_or_path in ("completions", "chat", "/tokenize", "/detokenize"):
        return True
    return protocol_or_path.startswith(("/v1/completions", "/v1/chat", "/openai/"))


def assert_rejected(out: Outcome, protocol: str, field: str | None = None, pattern: re.Pattern | None = None, status: int = 400) -> None:
    """A 4xx (``status``; gRPC INVALID_ARGUMENT) in the protocol's error body, naming ``field`` / matching ``pattern``."""
    if protocol == "v2_grpc":
        assert out.status == grpc.StatusCode.INVALID_ARGUMENT, out.text
    else:
        assert out.status == status, out.text
        body = json.loads(out.text)
        assert isinstance(body, dict) and "error" in body, out.text
        if is_openai(protocol):
            assert set(body["error"]) == OPENAI_ERROR_KEYS, out.text
        else:
            assert isinstance(body["error"], str), out.text
    if field is not None:
        assert field in out.message, out.text
        if is_openai(protocol):
            assert out.param == field, out.text
    if pattern is not None:
        assert pattern.search(out.message), out.text


def assert_healthy(server) -> None:
    """Readiness is 200 and a small greedy completion still works."""
    ready = httpx.get(f"{server.url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    r = httpx.post(f"{server.url}/v1/completions", json={"model": M, "prompt": "The", "max_tokens": 2, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def nested(kind: str = "array", depth: int = DEPTH) -> str:
    """JSON text nested ``depth`` levels (built as text: json.dumps itself stops at Python's recursion limit)."""
    if kind == "array":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def with_raw(body: dict, raw: str) -> bytes:
    """``body`` as JSON with the string "@RAW@" replaced by the JSON text ``raw``."""
    return json.dumps(body).replace('"@RAW@"', raw).encode()


@pytest.fixture(scope="module", autouse=True)
def log_start(server) -> int:
    """Where the shared server's log stood when this module began: the log test reads only what this module caused."""
    return len(server.read_log())


@pytest.fixture(scope="module")
def limits_server(tiny_model_dir, tmp_path_factory):
    """Room for a 1 MB schema (--max_body_bytes 4000000), a capacity of 4 sequences (2 running + 2 waiting), and 1 s for
    a body to arrive (--body_read_timeout 1)."""
    args = ("--max_body_bytes", "4000000", "--max_num_seqs", "2", "--max_queue", "2", "--body_read_timeout", "1")
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("limits"), *args)
    yield srv
    stop_server(srv)


# ---- integer ranges, on every protocol -------------------------------------------------------------

SEEDS = [HUGE, 2**64 - 1, -HUGE]
SAMPLING_INTS = ["max_tokens", "top_k", "min_tokens"]
INT_CASES = (
    [(p, "seed", s) for p in ("completions", "chat", "v2_rest", "v2_grpc", "v1", "generate") for s in SEEDS]
    + [(p, f, HUGE) for p in ("completions", "chat", "v2_rest", "v2_grpc", "v1", "generate") for f in SAMPLING_INTS]
    + [("completions", "n", HUGE), ("completions", "logprobs", HUGE), ("chat", "n", HUGE), ("chat", "max_completion_tokens", HUGE)]
)


@pytest.mark.parametrize("protocol,field,value", INT_CASES, ids=[f"{p}-{f}-{v}" for p, f, v in INT_CASES])
def test_out_of_range_integer_is_400_naming_it(server, protocol, field, value):
    assert_rejected(send(server, protocol, {field: value}), protocol, field)


def test_chat_top_logprobs_50_names_top_logprobs(server):
    out = send(server, "chat", {"logprobs": True, "top_logprobs": 50})
    assert_rejected(out, "chat", "top_logprobs")


def test_chat_huge_top_logprobs_names_top_logprobs(server):
    out = send(server, "chat", {"logprobs": True, "top_logprobs": HUGE})
    assert_rejected(out, "chat", "top_logprobs")


@pytest.mark.parametrize("protocol", ["completions", "chat"])
def test_int64_max_seed_with_n_2_is_accepted(server, protocol):
    """seed + choice index must not overflow: 2**63-1 with n=2 is still a valid request."""
    out = send(server, protocol, {"seed": INT64_MAX, "n": 2, "temperature": 1.0})
    assert out.status == 200, out.text
    assert len(json.loads(out.text)["choices"]) == 2


@pytest.mark.parametrize("protocol", ["v2_rest", "v2_grpc", "v1", "generate"])
def test_int64_max_seed_is_accepted(server, protocol):
    out = send(server, protocol, {"seed": INT64_MAX, "temperature": 1.0})
    assert out.status in (200, grpc.StatusCode.OK), out.text


def test_server_healthy_after_integer_cases(server):
    assert_healthy(server)


# ---- bodies -----------------------------------------------------------------------------------------

NON_OBJECT_BODIES = [b"[1, 2]", b"null", b'"text"', b"5"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("body", NON_OBJECT_BODIES, ids=["array", "null", "string", "number"])
def test_non_object_body_is_400_without_none(server, path, body):
    out = http_outcome(post(server, path, body))
    assert_rejected(out, path)
    assert "None" not in out.message, out.text


def _schema_body(schema_text: str) -> bytes:
    body = {"model": M, "messages": CHAT, "max_tokens": 3, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": "@RAW@"}}}
    return with_raw(body, schema_text)


def _tool_body(parameters_text: str) -> bytes:
    body = {"model": M, "messages": CHAT, "max_tokens": 3, "tools": [{"type": "function", "function": {"name": "f", "parameters": "@RAW@"}}]}
    return with_raw(body, parameters_text)


DEEP_CASES = [
    ("/v1/chat/completions", _schema_body('{"type":"object","properties":{"a":' + nested("object") + "}}")),
    ("/v1/chat/completions", _schema_body(nested("object"))),
    ("/v1/chat/completions", _tool_body('{"type":"object","properties":{"a":' + nested("object") + "}}")),
    ("/v1/completions", with_raw({"model": M, "prompt": "x", "max_tokens": 3, "logit_bias": "@RAW@"}, '{"1":' + nested() + "}")),
    ("/v1/chat/completions", with_raw({"model": M, "messages": CHAT, "max_tokens": 3, "logit_bias": "@RAW@"}, '{"1":' + nested("object") + "}")),
    (f"/v1/models/{M}:predict", with_raw({"instances": [{"prompt": "x", "stop": "@RAW@"}]}, nested())),
    (f"/v1/models/{M}:predict", with_raw({"instances": ["x"], "parameters": {"stop": "@RAW@"}}, nested("object"))),
    (f"/v2/models/{M}/generate", with_raw({"text_input": "x", "parameters": {"stop": "@RAW@"}}, nested())),
    (f"/v2/models/{M}/generate_stream", with_raw({"text_input": "x", "parameters": {"seed": "@RAW@"}}, nested("object"))),
    (f"/v2/models/{M}/infer", with_raw({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": "@RAW@"}]}, nested())),
    (
        f"/v2/models/{M}/infer",
        with_raw({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "parameters": {"stop": "@RAW@"}}, nested()),
    ),
    ("/v1/completions", nested().encode()),
    ("/v1/chat/completions", nested().encode()),
    (f"/v1/models/{M}:predict", nested().encode()),
    (f"/v2/models/{M}/infer", nested().encode()),
    (f"/v2/models/{M}/generate", nested().encode()),
    ("/tokenize", nested().encode()),
]
DEEP_IDS = [
    "schema-property",
    "schema-itself",
    "tool-parameters",
    "completions-logit_bias",
    "chat-logit_bias",
    "v1-instance-field",
    "v1-parameters",
    "generate-parameters",
    "generate_stream-parameters",
    "v2-data",
    "v2-parameters",
    "completions-whole-body",
    "chat-whole-body",
    "v1-whole-body",
    "v2-whole-body",
    "generate-whole-body",
    "tokenize-whole-body",
]


@pytest.mark.parametrize("path,body", DEEP_CASES, ids=DEEP_IDS)
def test_json_nested_5000_levels_is_400_naming_the_depth_limit(server, path, body):
    out = http_outcome(post(server, path, body))
    assert_rejected(out, path, pattern=NESTING)


def test_schema_with_items_200_deep_is_400(server):
    schema: dict = {"type": "integer"}
    for _ in range(200):
        schema = {"type": "array", "items": schema}
    body = {"model": M, "messages": CHAT, "max_tokens": 3, "response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}}
    out = http_outcome(post(server, "/v1/chat/completions", body))
    assert_rejected(out, "chat")
    assert out.param == SCHEMA_PARAM or NESTING.search(out.message), out.text  # the schema, or the nesting limit, is named


def test_server_healthy_after_body_cases(server):
    assert_healthy(server)


# ---- JSON schemas -----------------------------------------------------------------------------------

BAD_DIALECTS = [["https://json-schema.org/draft/2020-12/schema"], {"$id": "x"}, 7]


def chat_with_schema(server, schema: Any) -> Outcome:
    body = {"model": M, "messages": CHAT, "max_tokens": 3, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    return http_outcome(post(server, "/v1/chat/completions", body))


@pytest.mark.parametrize("dialect", BAD_DIALECTS, ids=["list", "dict", "int"])
def test_response_format_schema_with_bad_dollar_schema_is_400(server, dialect):
    out = chat_with_schema(server, {"$schema": dialect, "type": "object"})
    assert_rejected(out, "chat", SCHEMA_PARAM)


@pytest.mark.parametrize("dialect", BAD_DIALECTS, ids=["list", "dict", "int"])
def test_tool_parameters_with_bad_dollar_schema_is_400(server, dialect):
    body = {"model": M, "messages": CHAT, "max_tokens": 3, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"$schema": dialect}}}]}
    out = http_outcome(post(server, "/v1/chat/completions", body))
    assert_rejected(out, "chat")
    assert (out.param or "").startswith("tools"), out.text
    assert "parameters" in out.message or "$schema" in out.message, out.text


@pytest.mark.parametrize("dialect", BAD_DIALECTS, ids=["list", "dict", "int"])
def test_completions_guided_json_with_bad_dollar_schema_is_400(server, dialect):
    out = http_outcome(post(server, "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 3, "guided_json": {"$schema": dialect}}))
    assert_rejected(out, "completions", "guided_json")


SELF_REFERENCES = [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"x": {"$ref": "#/$defs/loop"}}, "required": ["x"], "$defs": {"loop": {"allOf": [{"$ref": "#/$defs/loop"}]}}},
]


@pytest.mark.parametrize("schema", SELF_REFERENCES, ids=["root", "defs", "allOf-defs"])
def test_self_referencing_schema_is_400_without_internal_names(server, schema):
    out = chat_with_schema(server, schema)
    assert_rejected(out, "chat", SCHEMA_PARAM)
    assert "NoExtensionBias" not in out.message, out.text


def huge_schema() -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(30000)}}


def test_huge_schema_is_400_naming_a_size_limit_and_server_stays_live(limits_server):
    schema = huge_schema()
    assert len(json.dumps(schema)) > 800_000
    answers: list[Outcome] = []
    worker = threading.Thread(target=lambda: answers.append(chat_with_schema(limits_server, schema)))
    worker.start()
    time.sleep(0.3)
    live = []  # asked while the schema is being handled
    for _ in range(3):
        try:
            live.append(httpx.get(f"{limits_server.url}/v2/health/live", timeout=3).status_code)
        except httpx.TimeoutException as exc:
            live.append(f"{type(exc).__name__} after 3 s")
    worker.join(timeout=120)
    (first,) = answers
    assert live == [200, 200, 200], f"liveness while the schema was handled: {live}; the schema got {first.text[:300]}"
    assert_rejected(first, "chat", SCHEMA_PARAM, pattern=re.compile(r"limit|too (large|big|many)|at most", re.IGNORECASE))
    again = chat_with_schema(limits_server, schema)
    assert (again.status, again.message, again.param) == (first.status, first.message, first.param)
    assert_healthy(limits_server)


def test_server_healthy_after_schema_cases(server):
    assert_healthy(server)


# ---- V2 tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("element", [123, None, {"a": 1}], ids=["int", "null", "dict"])
def test_v2_bytes_element_that_is_not_a_string_is_400(server, element):
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [element]}], "parameters": {"max_tokens": 3}}
    out = http_outcome(post(server, f"/v2/models/{M}/infer", body))
    assert_rejected(out, "v2_rest", "text_input")


def length_prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def binary_infer(server, raw: bytes, binary_data_size: int | None = None, shape: list[int] | None = None) -> httpx.Response:
    """The V2 binary tensor extension: a JSON header (its length in Inference-Header-Content-Length), then the raw tensor."""
    tensor = {"name": "text_input", "datatype": "BYTES", "shape": shape or [1], "parameters": {"binary_data_size": binary_data_size or len(raw)}}
    header = json.dumps({"inputs": [tensor], "parameters": {"max_tokens": 3, "temperature": 0}}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"}
    return httpx.post(f"{server.url}/v2/models/{M}/infer", content=header + raw, headers=headers, timeout=60)


def test_v2_binary_tensor_well_formed_is_200(server):
    """The control for the cases below: the same framing, correct, is served."""
    r = binary_infer(server, length_prefixed(b"The"))
    assert r.status_code == 200, r.text


BAD_BINARY = {
    "length-prefix-past-the-end": (struct.pack("<I", 1000) + b"The", None),
    "truncated-length-prefix": (b"\x03\x00", None),
    "binary_data_size-larger-than-body": (length_prefixed(b"The"), 1000),
    "not-utf8": (length_prefixed(b"\xff\xfe\xfd"), None),
}


@pytest.mark.parametrize("case", list(BAD_BINARY))
def test_v2_rest_bad_binary_tensor_is_400(server, case):
    raw, size = BAD_BINARY[case]
    out = http_outcome(binary_infer(server, raw, size))
    assert_rejected(out, "v2_rest")


def test_v2_grpc_raw_input_well_formed_is_ok(server):
    assert grpc_outcome(lambda: grpc_infer(server, raw=[length_prefixed(b"The")])).status == grpc.StatusCode.OK


BAD_RAW = {
    "length-prefix-past-the-end": ([struct.pack("<I", 1000) + b"The"], [1]),
    "truncated-length-prefix": ([b"\x03\x00"], [1]),
    "fewer-elements-than-shape": ([length_prefixed(b"The")], [3]),
    "not-utf8": ([length_prefixed(b"\xff\xfe\xfd")], [1]),
}


@pytest.mark.parametrize("case", list(BAD_RAW))
def test_v2_grpc_bad_raw_input_is_invalid_argument(server, case):
    raw, shape = BAD_RAW[case]
    out = grpc_outcome(lambda: grpc_infer(server, raw=raw, shape=shape))
    assert out.status == grpc.StatusCode.INVALID_ARGUMENT, out.text


def test_v2_grpc_garbage_protobuf_is_invalid_argument(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None)
        out = grpc_outcome(lambda: call(b"\xff\xff\xff", timeout=30))
    assert out.status == grpc.StatusCode.INVALID_ARGUMENT, out.text


def test_server_healthy_after_v2_tensor_cases(server):
    assert_healthy(server)


# ---- model-repository routes: off by default ----------------------------------------------------------


@pytest.mark.parametrize("action", ["unload", "load"])
def test_repository_rest_route_is_404_naming_the_flag(server, action):
    r = httpx.post(f"{server.url}/v2/repository/models/{M}/{action}", timeout=60)
    assert r.status_code == 404, r.text
    assert "--enable_repository_routes" in r.text


@pytest.mark.parametrize("action", ["RepositoryModelUnload", "RepositoryModelLoad"])
def test_repository_grpc_is_unimplemented(server, action):
    request = pb.RepositoryModelUnloadRequest(model_name=M) if action == "RepositoryModelUnload" else pb.RepositoryModelLoadRequest(model_name=M)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        out = grpc_outcome(lambda: getattr(pb_grpc.GRPCInferenceServiceStub(channel), action)(request, timeout=60))
    assert out.status == grpc.StatusCode.UNIMPLEMENTED, out.text


def test_after_repository_calls_model_still_serves(server):
    assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
    assert_healthy(server)
    assert grpc_outcome(lambda: grpc_infer(server, ["The"])).status == grpc.StatusCode.OK


def test_enabled_repository_routes_unload_and_load_the_model_again(tiny_model_dir, tmp_path):
    """With --enable_repository_routes an unload stops the model (readiness 503, requests 503) and a load brings it back;
    a load of an already loaded model loads nothing again."""
    srv = start_server(tiny_model_dir, tmp_path, "--enable_repository_routes")
    try:
        assert httpx.post(f"{srv.url}/v2/repository/models/{M}/load", timeout=60).status_code == 200
        assert httpx.post(f"{srv.url}/v2/repository/models/other/unload", timeout=60).status_code == 404
        assert httpx.post(f"{srv.url}/v2/repository/models/{M}/unload", timeout=60).json() == {"name": M, "unload": True}
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 503
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": M, "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 503, r.text
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=M), timeout=120).isLoaded
        assert_healthy(srv)
        assert len(re.findall(r"\bloaded .*max_model_len=", srv.read_log())) == 2  # at start-up, and once for the load after the unload
    finally:
        stop_server(srv)


# ---- capacity ---------------------------------------------------------------------------------------

CAPACITY_CASES = {
    "completions-n5": ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 3, "n": 5}),
    "completions-3-prompts-n2": ("/v1/completions", {"model": M, "prompt": ["a", "b", "c"], "max_tokens": 3, "n": 2}),
    "chat-n5": ("/v1/chat/completions", {"model": M, "messages": CHAT, "max_tokens": 3, "n": 5}),
}


@pytest.mark.parametrize("case", list(CAPACITY_CASES))
def test_more_sequences_than_the_server_holds_is_400_not_429(limits_server, case):
    path, body = CAPACITY_CASES[case]
    out = http_outcome(post(limits_server, path, body))
    assert_rejected(out, path, "n")
    assert re.search(r"\b4\b", out.message), out.text


def test_n_at_the_capacity_is_200(limits_server):
    r = post(limits_server, "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 3, "n": 4})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4
    assert_healthy(limits_server)


# ---- half-sent bodies -------------------------------------------------------------------------------

HALF_SENT = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"model":"'


def half_sent(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(HALF_SENT)  # 10 of the 100 bytes announced
    return sock


def read_to_close(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection (True) or ``deadline`` passes (False)."""
    data = b""
    while True:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        if not chunk:
            return data, True
        data += chunk


def test_half_sent_body_gets_408_and_is_closed(limits_server):
    with half_sent(limits_server.http_port) as sock:
        data, closed = read_to_close(sock, time.monotonic() + 8)
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    assert closed


def test_fifty_half_sent_bodies_are_all_closed_and_server_serves(limits_server):
    socks = [half_sent(limits_server.http_port) for _ in range(50)]
    deadline = time.monotonic() + 10
    try:
        results = [read_to_close(s, deadline) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert sum(closed for _, closed in results) == 50
    assert all(data.startswith(b"HTTP/1.1 408") for data, _ in results), {data[:40] for data, _ in results}
    assert_healthy(limits_server)


# ---- stop strings -----------------------------------------------------------------------------------

LONG_STOPS = [f"{i:02d}" + "qz" * 1850 for i in range(16)]  # 16 × 3,702 characters, 59 KB


def first_stop_inside(text: str) -> str | None:
    """Two visible characters of ``text`` that first occur after its start (a stop string that cuts it), if any."""
    for i in range(1, len(text) - 1):
        if not text[i].isspace() and text.find(text[i : i + 2]) == i:
            return text[i : i + 2]
    return None


def test_sixteen_long_stop_strings_are_served(server):
    assert sum(len(s) for s in LONG_STOPS) > 59_000
    for prompt in ("A class definition", "x", "The for statement"):
        body = {"model": M, "prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
        plain = post(server, "/v1/completions", body)
        assert plain.status_code == 200, plain.text
        text = plain.json()["choices"][0]["text"]
        if first_stop_inside(text):
            break
    r = post(server, "/v1/completions", {**body, "stop": LONG_STOPS})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == text  # none of them appears
    # With one stop string that does appear in the greedy output, the answer ends just before it.
    stop = first_stop_inside(text)
    assert stop is not None, f"no usable stop string in the greedy output {text!r}"
    stopped = post(server, "/v1/completions", {**body, "stop": [*LONG_STOPS[:15], stop]})
    assert stopped.status_code == 200, stopped.text
    choice = stopped.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (text[: text.index(stop)], "stop"), f"stop {stop!r} in {text!r}"


# ---- SIGTERM drain ----------------------------------------------------------------------------------


def test_drain_refuses_new_work_finishes_the_stream_and_exits_zero(tiny_model_dir, tmp_path):
    """SIGTERM during a long stream: new REST and gRPC requests are refused at once (probed as soon as readiness turns
    false, while the stream still runs), the stream ends with all its tokens, the process exits 0, the model is not reloaded."""
    srv = start_server(tiny_model_dir, tmp_path, "--shutdown_grace_period", "60")
    body = {"model": M, "prompt": "x", "max_tokens": 120, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    async def outcome(coro) -> Any:
        try:
            return await coro
        except Exception as exc:  # recorded: a refused connection is not the 503 asked for
            return f"{type(exc).__name__}: {exc}"

    async def run(channel: grpc.Channel):
        async with httpx.AsyncClient(timeout=120) as client:
            first = asyncio.Event()

            async def stream() -> list[dict]:
                events = []
                async with client.stream("POST", f"{srv.url}/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            events.append(json.loads(line[len("data: ") :]))
                            first.set()
                return events

            task = asyncio.create_task(stream())
            await asyncio.wait_for(first.wait(), 60)
            srv.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (await client.get(f"{srv.url}/v2/health/ready")).status_code == 200:  # the drain has begun once this is 503
                assert time.monotonic() < deadline, "readiness still 200 10 s after SIGTERM"
                await asyncio.sleep(0.002)
            late, late_grpc = await asyncio.gather(
                outcome(client.post(f"{srv.url}/v1/completions", json={"model": M, "prompt": "late", "max_tokens": 2})),
                asyncio.to_thread(grpc_outcome, lambda: grpc_infer(srv, ["late"], channel=channel)),
            )
            still_streaming = not task.done()
            return await task, late, late_grpc, still_streaming

    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)  # connected before the signal
            events, late, late_grpc, still_streaming = asyncio.run(run(channel))
        try:
            exit_code = srv.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            exit_code = "still running 60 s after the stream ended"
        seen = {
            "stream still running during the probes": still_streaming,
            "REST completion during the drain": late.status_code if isinstance(late, httpx.Response) else late,
            "gRPC ModelInfer during the drain": late_grpc.status,
            "streamed completion_tokens": events[-1].get("usage", {}).get("completion_tokens") if events else None,
            "streamed finish_reason length": sum(1 for e in events for c in e["choices"] if c["finish_reason"] == "length"),
            "exit code": exit_code,
            "'loaded' lines in the log": len(re.findall(r"\bloaded .*max_model_len=", srv.read_log())),
        }
        expected = {
            "stream still running during the probes": True,
            "REST completion during the drain": 503,
            "gRPC ModelInfer during the drain": grpc.StatusCode.UNAVAILABLE,
            "streamed completion_tokens": 120,
            "streamed finish_reason length": 1,
            "exit code": 0,
            "'loaded' lines in the log": 1,  # no reload while draining
        }
        rest = late.text[:200] if isinstance(late, httpx.Response) else late
        assert seen == expected, f"REST: {rest}; gRPC: {late_grpc.text[:200]}"
    finally:
        if srv.process.poll() is None:
            srv.process.kill()


# ---- blast radius -----------------------------------------------------------------------------------

GREEDY_PROMPTS = ["The for statement", "Exceptions are", "A class definition", "import", "x"]


def test_hostile_requests_do_not_change_concurrent_greedy_output(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    alone = [client.completions.create(model=M, prompt=p, max_tokens=24, temperature=0).choices[0].text for p in GREEDY_PROMPTS]
    assert any(t.strip() for t in alone)

    async def hostile(http: httpx.AsyncClient, i: int) -> None:
        kind = i % 4
        if kind == 0:
            await http.post(f"{server.url}/v1/completions", json={"model": M, "prompt": "x", "max_tokens": 8, "seed": SEEDS[i % 3]})
        elif kind == 1:
            schema = {"$schema": BAD_DIALECTS[i % 3], "type": "object"}
            rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
            await http.post(f"{server.url}/v1/chat/completions", json={"model": M, "messages": CHAT, "max_tokens": 8, "response_format": rf})
        elif kind == 2:
            raw, shape = list(BAD_RAW.values())[i % len(BAD_RAW)]
            await asyncio.to_thread(grpc_outcome, lambda: grpc_infer(server, raw=raw, shape=shape))
        else:
            await http.post(f"{server.url}/v2/models/{M}/generate", json={"text_input": "x", "parameters": {"seed": -HUGE, "max_tokens": 8}})

    async def run() -> list[str]:
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        async with httpx.AsyncClient(timeout=120) as http:
            greedy = [sdk.completions.create(model=M, prompt=p, max_tokens=24, temperature=0) for p in GREEDY_PROMPTS]
            results = await asyncio.gather(*greedy, *(hostile(http, i) for i in range(16)), return_exceptions=True)
        await sdk.close()
        return [repr(r) if isinstance(r, BaseException) else r.choices[0].text for r in results[: len(GREEDY_PROMPTS)]]

    together = asyncio.run(run())
    assert together == alone, "\n".join(f"{p!r}: alone {a!r}, beside hostile requests {t!r}" for p, a, t in zip(GREEDY_PROMPTS, alone, together) if a != t)
    assert_healthy(server)


# ---- logs (last: after every 4xx case above) ------------------------------------------------------------


def test_no_traceback_or_500_in_the_logs(server, log_start, limits_server):
    for name, log in (("shared", server.read_log()[log_start:]), ("limits", limits_server.read_log())):
        assert "Traceback" not in log, f"{name} server:\n{log[log.index('Traceback') - 300 : log.index('Traceback') + 3000]}"
        assert " 500 " not in log, f"{name} server:\n{log[max(0, log.index(' 500 ') - 2000) : log.index(' 500 ') + 500]}"
