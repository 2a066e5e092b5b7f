"""``--otlp_traces_endpoint``: one OpenTelemetry span per request, received over OTLP/HTTP by a collector this test
runs on loopback (the real exporter, the real wire format, decoded with opentelemetry-proto)."""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import pytest
from conftest import MODEL_NAME, start_server, stop_server
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP traces receiver: every span it is sent, as {name, trace_id, parent, attributes, start, end, status}."""

    def __init__(self):
        self.spans: list[dict] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}.get("service.name")
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            collector.spans.append(
                                {
                                    "name": span.name,
                                    "service": service,
                                    "trace_id": span.trace_id.hex(),
                                    "parent": span.parent_span_id.hex(),
                                    "attributes": {a.key: _value(a.value) for a in span.attributes},
                                    "start": span.start_time_unix_nano,
                                    "end": span.end_time_unix_nano,
                                    "error": span.status.code == 2,
                                }
                            )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, request_id: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for span in self.spans:
                if span["attributes"].get("gen_ai.request.id") == request_id:
                    return span
            time.sleep(0.1)
        raise AssertionError(f"no span for {request_id}; got {[s['attributes'].get('gen_ai.request.id') for s in self.spans]}")


def _value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.server.shutdown()


@pytest.fixture(scope="module")
def traced_server(tiny_model_dir, tmp_path_factory, collector):
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "kserve-llm-test"}
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("traced"), "--otlp_traces_endpoint", collector.url, env=env)
    yield srv
    stop_server(srv)


def test_a_span_per_request_with_its_timings_tokens_and_id(traced_server, collector):
    headers = {"X-Request-Id": "span-1", "traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"}
    body = {"model": MODEL_NAME, "prompt": "The for statement", "max_tokens": 7, "temperature": 0, "ignore_eos": True}
    before = time.time_ns()
    r = httpx.post(f"{traced_server.url}/v1/completions", json=body, headers=headers, timeout=60)
    after = time.time_ns()
    assert r.status_code == 200
    span = collector.wait_for("span-1")
    a = span["attributes"]
    assert span["name"] == "llm_request" and span["service"] == "kserve-llm-test"
    assert span["trace_id"] == TRACE_ID and span["parent"] == PARENT_SPAN  # a child of the caller's span
    assert a["gen_ai.usage.prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert a["gen_ai.usage.completion_tokens"] == 7 and a["gen_ai.request.max_tokens"] == 7
    assert a["gen_ai.response.model"] == MODEL_NAME and a["gen_ai.response.finish_reasons"] == "length"
    queue, prefill, decode, e2e = (a[f"gen_ai.latency.{k}"] for k in ("time_in_queue", "time_in_model_prefill", "time_in_model_decode", "e2e"))
    assert min(queue, prefill, decode) >= 0 and queue + prefill + decode == pytest.approx(e2e, abs=1e-6)
    assert a["gen_ai.latency.time_to_first_token"] == pytest.approx(queue + prefill, abs=1e-6)
    assert before <= span["start"] < span["end"] <= after
    assert span["end"] - span["start"] == pytest.approx(e2e * 1e9, rel=0.01)
    assert not span["error"]


def test_n_choices_get_a_span_each_and_grpc_requests_are_traced(traced_server, collector):
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 3, "n": 2, "temperature": 1.0, "seed": 3}
    assert httpx.post(f"{traced_server.url}/v1/completions", json=body, headers={"X-Request-Id": "span-n"}, timeout=60).status_code == 200
    first, second = collector.wait_for("span-n"), collector.wait_for("span-n-1")
    assert first["attributes"]["gen_ai.usage.completion_tokens"] == second["attributes"]["gen_ai.usage.completion_tokens"] == 3
    assert first["parent"] == second["parent"] == ""  # no traceparent sent: each choice's span is a root
    request = pb.ModelInferRequest(model_name=MODEL_NAME, parameters={"max_tokens": pb.InferParameter(int64_param=2)})
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hello")
    with grpc.insecure_channel(f"127.0.0.1:{traced_server.grpc_port}") as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=(("x-request-id", "span-grpc"), ("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01")))
    span = collector.wait_for("span-grpc")
    assert span["trace_id"] == TRACE_ID and span["attributes"]["gen_ai.usage.completion_tokens"] == 2


def test_a_request_that_fails_gets_an_error_span(collector, tiny_model_dir, monkeypatch):
    """In process, the engine with the real tracer and exporter: a request whose sampling fails (injected) is traced
    with status ERROR, the one beside it as a success."""
    from test_engine_faults import MARKED_TEMPERATURE, inject_sampler_fault, make_requests, run_engine

    from predictor.loading import load_model
    from predictor.sampling import SamplingParams
    from predictor.tracing import RequestTracer

    inject_sampler_fault(monkeypatch)
    tracer = RequestTracer(collector.url, MODEL_NAME)
    requests = make_requests(SamplingParams(max_tokens=12, temperature=MARKED_TEMPERATURE, seed=1))
    run_engine(load_model(tiny_model_dir, dtype="float32"), requests, tracer)
    tracer.shutdown()  # exports what is queued
    bad, good = collector.wait_for("bad"), collector.wait_for("good-0")
    assert bad["error"] and "gen_ai.response.finish_reasons" not in bad["attributes"]
    assert not good["error"] and good["attributes"]["gen_ai.response.finish_reasons"] == "length"


def test_no_endpoint_no_tracer(server):
    assert "OpenTelemetry" not in server.read_log()
