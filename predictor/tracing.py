"""OpenTelemetry traces (``--otlp_traces_endpoint``): one span per generated sequence, as vLLM writes them.

The span ``llm_request`` starts when the request arrived and ends when it finished (or failed), with vLLM's
attribute names, so dashboards built on vLLM's traces read these too: ``gen_ai.request.id`` (the
``X-Request-Id``, with ``-<choice>`` for the n > 1 choices), tokens in and out, the sampling parameters, and the
latencies (queue, time to first token, prefill, decode, end to end), in seconds. The caller's W3C trace context
(``traceparent`` header or gRPC metadata) makes it a child of the caller's span. Spans are exported over OTLP/HTTP
(protobuf) by a batching processor, off the engine thread; ``OTEL_SERVICE_NAME`` names the service
(default ``kserve-llm``) and ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` choose the sampler, as in every
OpenTelemetry SDK.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from opentelemetry.trace import SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from .engine.request import Sequence


SPAN_NAME = "llm_request"
DEFAULT_SERVICE_NAME = "kserve-llm"


class RequestTracer:
    """Turns finished sequences into spans; ``record`` is called by the engine thread and only enqueues."""

    def __init__(self, endpoint: str, model_name: str):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", DEFAULT_SERVICE_NAME)})
        self.provider = TracerProvider(resource=resource)  # its sampler: OTEL_TRACES_SAMPLER, else parent-based always-on
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("kserve-llm")
        self.propagator = TraceContextTextMapPropagator()
        self.model_name = model_name
        self.endpoint = endpoint

    def record(self, seq: Sequence, end: float, finish_reason: str | None = None, error: str | None = None) -> None:
        """One span for ``seq``, from its arrival to ``end`` (``time.monotonic()`` seconds)."""
        offset = time.time() - time.monotonic()  # monotonic → wall clock, in this process
        request, params = seq.request, seq.request.params
        attributes: dict[str, str | int | float] = {
            "gen_ai.request.id": request.request_id,
            "gen_ai.response.model": request.lora or self.model_name,
            "gen_ai.usage.prompt_tokens": len(request.prompt_ids),
            "gen_ai.usage.completion_tokens": len(seq.output_ids),
            "gen_ai.request.max_tokens": params.max_tokens,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.latency.e2e": end - seq.arrival,
        }
        if seq.scheduled_time:
            attributes["gen_ai.latency.time_in_queue"] = seq.scheduled_time - seq.arrival
        if seq.first_token_time:
            attributes["gen_ai.latency.time_to_first_token"] = seq.first_token_time - seq.arrival
            attributes["gen_ai.latency.time_in_model_prefill"] = seq.first_token_time - seq.scheduled_time
            attributes["gen_ai.latency.time_in_model_decode"] = end - seq.first_token_time
        if finish_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = finish_reason
        parent = self.propagator.extract(request.trace_context or {})
        span = self.tracer.start_span(SPAN_NAME, context=parent, kind=SpanKind.SERVER, start_time=int((seq.arrival + offset) * 1e9), attributes=attributes)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=int((end + offset) * 1e9))

    def shutdown(self) -> None:
        """Export what is queued (at exit)."""
        self.provider.shutdown()
