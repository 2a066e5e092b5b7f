"""Prometheus metrics of the engine, under the names vLLM uses.

The names are a compatibility choice: KEDA triggers, Grafana dashboards and the Gateway API inference
extension already read ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` and the rest, so
they work against this predictor unchanged. They are exported by KServe's ``GET /metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)

RUNNING = Gauge("vllm:num_requests_running", "Requests in the running batch.", ["model_name"])
WAITING = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", ["model_name"])
KV_CACHE_USAGE = Gauge("vllm:kv_cache_usage_perc", "Fraction of the KV-cache blocks in use (1 = 100%).", ["model_name"])
PREEMPTIONS = Counter("vllm:num_preemptions", "Sequences preempted (blocks freed, recomputed later) because the KV cache was full.", ["model_name"])
TTFT = Histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first generated token.", ["model_name"], buckets=_LATENCY_BUCKETS)
ITL = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive generated tokens.", ["model_name"], buckets=_LATENCY_BUCKETS)
E2E = Histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the end of a request.", ["model_name"], buckets=_REQUEST_BUCKETS)
QUEUE_TIME = Histogram("vllm:request_queue_time_seconds", "Time a request waited before its prefill.", ["model_name"], buckets=_REQUEST_BUCKETS)
PREFIX_CACHE_QUERIES = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ["model_name"])
PREFIX_CACHE_HITS = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (not recomputed).", ["model_name"])
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Prompt tokens processed.", ["model_name"])
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Tokens generated.", ["model_name"])
SUCCESS = Counter("vllm:request_success", "Requests finished, by finish reason.", ["model_name", "finished_reason"])
# vLLM's LoRA gauge: one series, the current time, labelled with the adapters running and waiting (comma-separated).
LORA_INFO = Gauge("vllm:lora_requests_info", "Running stats on LoRA requests.", ["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
# vLLM's cache configuration as an info gauge (value 1): llm-d's endpoint picker reads block_size and num_gpu_blocks from it.
CACHE_CONFIG_INFO = Gauge(
    "vllm:cache_config_info",
    "Information of the KV cache configuration.",
    ["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype"],
)
REJECTED = Counter("kserve_llm:requests_rejected", "Requests refused with 429 because the waiting queue was full.", ["model_name"])
STEP_FAILURES = Counter(
    "kserve_llm:engine_step_failures", "Model forwards or engine steps that raised (their requests failed; several in a row kill the engine).", ["model_name"]
)
ENGINE_DEAD = Gauge("kserve_llm:engine_dead", "1 once the engine has died (the process is exiting for a restart).", ["model_name"])


class EngineMetrics:
    """The metric children for one model name."""

    def __init__(self, model_name: str):
        label = {"model_name": model_name}
        self.model_name = model_name
        self.running = RUNNING.labels(**label)
        self.waiting = WAITING.labels(**label)
        self.kv_cache_usage = KV_CACHE_USAGE.labels(**label)
        self.preemptions = PREEMPTIONS.labels(**label)
        self.ttft = TTFT.labels(**label)
        self.itl = ITL.labels(**label)
        self.e2e = E2E.labels(**label)
        self.queue_time = QUEUE_TIME.labels(**label)
        self.prompt_tokens = PROMPT_TOKENS.labels(**label)
        self.prefix_cache_queries = PREFIX_CACHE_QUERIES.labels(**label)
        self.prefix_cache_hits = PREFIX_CACHE_HITS.labels(**label)
        self.generation_tokens = GENERATION_TOKENS.labels(**label)
        self.rejected = REJECTED.labels(**label)
        self.step_failures = STEP_FAILURES.labels(**label)
        self.dead = ENGINE_DEAD.labels(**label)
        self._lora_labels: tuple[str, str, str] | None = None

    def lora_info(self, max_loras: int, running: set[str], waiting: set[str]) -> None:
        """Update ``vllm:lora_requests_info`` when the adapters in use change (the previous series is removed)."""
        labels = (str(max_loras), ",".join(sorted(waiting)), ",".join(sorted(running)))
        if labels == self._lora_labels:
            return
        if self._lora_labels is not None:
            LORA_INFO.remove(*self._lora_labels)
        LORA_INFO.labels(*labels).set_to_current_time()
        self._lora_labels = labels

    def cache_config(self, block_size: int, num_blocks: int, prefix_caching: bool, dtype: str) -> None:
        """``vllm:cache_config_info`` (vLLM's label names; num_gpu_blocks is the pool's size on any device)."""
        CACHE_CONFIG_INFO.labels(self.model_name, str(block_size), str(num_blocks), str(prefix_caching), dtype).set(1)

    def success(self, finished_reason: str) -> None:
        SUCCESS.labels(model_name=self.model_name, finished_reason=finished_reason).inc()
