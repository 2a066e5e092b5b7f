"""What the engine reports, in one place: its Prometheus metrics (``metrics.EngineMetrics``) and request spans
(``tracing.RequestTracer``).

The engine calls one method per event (``on_admit``, ``on_token``, ``on_finish``, ``on_step``, ...), always from its
own thread except ``on_reject``; each does nothing for what is not configured (no metrics, no tracer), so the engine
never checks. Latencies are measured from the times the engine keeps on the ``Sequence``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..metrics import EngineMetrics
    from .lora import LoRAManager
    from .request import Sequence
    from .scheduler import Scheduler


class SpanRecorder(Protocol):
    """``tracing.RequestTracer``, as the observer uses it (not imported: ``tracing`` imports the engine's types)."""

    def record(self, seq: Sequence, end: float, finish_reason: str | None = None, error: str | None = None) -> None: ...


class EngineObserver:
    def __init__(self, metrics: EngineMetrics | None = None, tracer: SpanRecorder | None = None):
        self.metrics = metrics
        self.tracer = tracer  # one span per finished request (--otlp_traces_endpoint); set after the engine is built

    def on_start(self, scheduler: Scheduler, dtype: str, lora: LoRAManager | None) -> None:
        """The KV-cache pool is built (``vllm:cache_config_info``)."""
        if self.metrics:
            allocator = scheduler.allocator
            self.metrics.cache_config(allocator.block_size, allocator.capacity, scheduler.prefix_caching, dtype)
            if lora is not None:
                self.metrics.lora_info(lora.max_loras, set(), set())

    def on_reject(self) -> None:
        """Requests refused: the queue was full (the asyncio thread)."""
        if self.metrics:
            self.metrics.rejected.inc()

    def on_admit(self, seq: Sequence, prefix_caching: bool) -> None:
        """``seq`` entered the running batch (again, after a preemption): its prefix-cache lookup."""
        if self.metrics and prefix_caching:
            self.metrics.prefix_cache_queries.inc(len(seq.tokens_to_prefill))
            self.metrics.prefix_cache_hits.inc(seq.cached)

    def on_scheduled(self, seq: Sequence, now: float) -> None:
        """``seq``'s first admission: the end of its queue time."""
        if self.metrics:
            self.metrics.queue_time.observe(now - seq.arrival)
            self.metrics.prompt_tokens.inc(len(seq.request.prompt_ids))

    def on_preempt(self, seq: Sequence) -> None:
        if self.metrics:
            self.metrics.preemptions.inc()

    def on_token(self, seq: Sequence, now: float) -> None:
        """``seq`` got a token (already in ``output_ids``; ``last_token_time`` is still the previous one's)."""
        if self.metrics:
            self.metrics.generation_tokens.inc()
            if len(seq.output_ids) == 1:
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                self.metrics.itl.observe(now - seq.last_token_time)

    def on_finish(self, seq: Sequence, now: float, finish_reason: str) -> None:
        if self.metrics:
            self.metrics.e2e.observe(now - seq.arrival)
            self.metrics.success(finish_reason)
        if self.tracer is not None:
            self.tracer.record(seq, now, finish_reason=finish_reason)

    def on_error(self, seq: Sequence, now: float, error: str) -> None:
        """``seq`` ended without finishing: it failed, or timed out."""
        if self.tracer is not None:
            self.tracer.record(seq, now, error=error)

    def on_step_failure(self) -> None:
        if self.metrics:
            self.metrics.step_failures.inc()

    def on_dead(self) -> None:
        if self.metrics:
            self.metrics.dead.set(1)

    def on_step(self, scheduler: Scheduler, lora: LoRAManager | None) -> None:
        """After every engine step: the queue and cache gauges."""
        if self.metrics:
            self.metrics.running.set(scheduler.num_running)
            self.metrics.waiting.set(scheduler.num_waiting)
            self.metrics.kv_cache_usage.set(scheduler.usage)
            if lora is not None:
                self.metrics.lora_info(lora.max_loras, *scheduler.lora_adapters())
