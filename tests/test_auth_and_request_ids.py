"""``--api_key`` on every protocol (probes and the scraper stay open), and ``X-Request-Id`` from the client to the
response, the OpenAI ``id`` and the log lines about the request."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import openai
import pytest
from conftest import MODEL_NAME, start_server, stop_server
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, tmp_path_factory):
    """Two keys, from $KSERVE_LLM_API_KEY (comma-separated, as the chart passes a Secret)."""
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("keyed"), env={"KSERVE_LLM_API_KEY": f" {KEYS[0]}, {KEYS[1]}"})
    yield srv
    stop_server(srv)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


COMPLETION = {"model": MODEL_NAME, "prompt": "The", "max_tokens": 3, "temperature": 0}
ROUTES = [
    ("/v1/completions", COMPLETION),
    ("/openai/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    ("/tokenize", {"prompt": "hello"}),
    (f"/v1/models/{MODEL_NAME}:predict", {"instances": ["The"], "parameters": {"max_tokens": 3}}),
    (f"/v2/models/{MODEL_NAME}/infer", {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["The"]}], "parameters": {"max_tokens": 3}}),
    (f"/v2/models/{MODEL_NAME}/generate", {"text_input": "The", "parameters": {"max_tokens": 3}}),
]


@pytest.mark.parametrize("path,body", ROUTES, ids=[r[0] for r in ROUTES])
def test_every_route_needs_a_key(keyed_server, path, body):
    url = keyed_server.url + path
    for headers in ({}, bearer("wrong"), {"Authorization": KEYS[0]}, bearer(f"{KEYS[0]},{KEYS[1]}")):
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert "API key" in message
        if path.startswith(("/v1/completions", "/openai/", "/tokenize")):
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    for key in KEYS:  # every key works
        assert httpx.post(url, json=body, headers=bearer(key), timeout=60).status_code == 200


def test_get_routes_need_a_key_but_probes_and_metrics_do_not(keyed_server):
    url = keyed_server.url
    assert httpx.get(f"{url}/v1/models", headers={"X-Request-Id": "no-key-1"}).status_code == 401
    assert "[request no-key-1] GET /v1/models -> 401 a valid API key is required" in keyed_server.read_log()  # one line, no traceback
    assert httpx.get(f"{url}/v1/models", headers=bearer(KEYS[1])).status_code == 200
    for path in ("/", "/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 200, path


def test_openai_sdk_with_api_key(keyed_server):
    client = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEYS[0], max_retries=0)
    assert client.completions.create(model=MODEL_NAME, prompt="The", max_tokens=2).choices[0].finish_reason == "length"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="nope", max_retries=0).models.list()


def infer_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL_NAME, parameters={"max_tokens": pb.InferParameter(int64_param=3)})
    tensor = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"The")
    return request


def test_grpc_needs_the_key_in_metadata_but_not_for_probes(keyed_server):
    with grpc.insecure_channel(f"127.0.0.1:{keyed_server.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME)).ready
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(infer_request(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        response = stub.ModelInfer(infer_request(), metadata=(("authorization", f"Bearer {KEYS[1]}"),))
        assert response.raw_output_contents


def test_api_key_flag_wins_over_the_environment(monkeypatch):
    from predictor.server import api_keys_from, build_parser

    monkeypatch.setenv("KSERVE_LLM_API_KEY", "env-a, ,env-b")
    assert api_keys_from(build_parser().parse_args([])) == ["env-a", "env-b"]
    assert api_keys_from(build_parser().parse_args(["--api_key", "flag-a", "flag-b"])) == ["flag-a", "flag-b"]
    monkeypatch.setenv("KSERVE_LLM_API_KEY", "")
    assert api_keys_from(build_parser().parse_args([])) == []


# ---- request ids (the session server has no key) -----------------------------------------------------------------


def test_request_id_is_returned_in_the_header_the_openai_id_and_the_log(server):
    r = httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers={"X-Request-Id": "trace-4711"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-4711"
    assert r.json()["id"] == "cmpl-trace-4711"
    r = httpx.post(f"{server.url}/v1/chat/completions", json=ROUTES[1][1], headers={"X-Request-Id": "chat-4712"})
    assert r.json()["id"] == "chatcmpl-chat-4712"
    bad = httpx.post(f"{server.url}/v1/completions", json={**COMPLETION, "max_tokens": 0}, headers={"X-Request-Id": "bad-4713"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-4713"
    log = server.read_log()
    assert '"POST /v1/completions HTTP/1.1" 200 OK [request trace-4711]' in log  # the access line
    assert "[request bad-4713] POST /v1/completions -> 400" in log  # the client error's one line


def test_request_id_is_made_when_missing_and_malformed_ones_are_refused(server):
    made = {httpx.post(f"{server.url}/v1/completions", json=COMPLETION).headers["x-request-id"] for _ in range(2)}
    assert len(made) == 2 and all(len(i) == 32 for i in made)
    r = httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers={"X-Request-Id": "two\twords"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-request-id"
    stream = httpx.post(f"{server.url}/v1/completions", json={**COMPLETION, "stream": True}, headers={"X-Request-Id": "s-1"})
    assert stream.headers["x-request-id"] == "s-1" and '"id": "cmpl-s-1"' in stream.text


def test_grpc_request_id_in_metadata(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelInfer.with_call(infer_request(), metadata=(("x-request-id", "grpc-77"),))
        assert dict(call.initial_metadata())["x-request-id"] == "grpc-77"
        _, call = stub.ModelInfer.with_call(infer_request())
        assert len(dict(call.initial_metadata())["x-request-id"]) == 32


def test_v2_response_keeps_the_clients_tensor_id(server):
    body = {"id": "my-infer", "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "parameters": {"max_tokens": 2}}
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", json=body)
    assert r.json()["id"] == "my-infer" and np.array(r.json()["outputs"][0]["data"]).shape == (1,)
