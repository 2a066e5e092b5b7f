"""The continuous-batching engine: every protocol's requests in, streamed ``StepOutput``s out.

One background thread owns the model. Each iteration it (1) drops cancelled and timed-out sequences,
(2) admits waiting requests (``scheduler.py``: batch room, prefill budget, KV-cache blocks) and
prefills them in one forward, (3) gives every running sequence the KV-cache block its next token needs
(preempting the newest when the pool is empty) and runs one batched decode step over all of them, each
with its own position, sampling parameters and generator. A sequence that finishes leaves at once and
its blocks go to the next admission. The asyncio side only submits requests and awaits outputs, so
HTTP and gRPC stay responsive while tensors are computed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from ..loading import LoadedModel
from ..metrics import EngineMetrics
from ..sampling import GenerationRequest, StepOutput, TokenLogprob
from .detokenizer import Detokenizer
from .kv_cache import BlockAllocator
from .lora import LoRAManager
from .runner import Chunk, KVPlan, ModelRunner, PagedRunner, make_runner
from .sampler import sample, token_logprob
from .scheduler import Scheduler
from .structured import Matcher, token_masks

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A request the engine could not serve; the protocol adapters map each kind to a status."""


class QueueFull(EngineError):
    """The waiting queue is at ``--max_queue``: answer 429 / RESOURCE_EXHAUSTED and let the client retry."""


class EngineStopped(EngineError):
    """The server is draining for shutdown and takes no new requests (503)."""


class RequestTimeout(EngineError):
    """The request ran past ``--request_timeout``."""


class GrammarFailed(EngineError):
    """The request's own output constraint failed while generating (llguidance found its lexer too large only once a
    token was consumed, say): the request's fault, a 400, and no other request is touched."""


@dataclass
class EngineConfig:
    max_num_seqs: int = 16
    max_queue: int = 256
    request_timeout: float = 600.0
    max_prefill_tokens: int = 2048
    kv_cache_memory: int | None = None  # bytes; None: the device default (kv_cache.py)
    enable_prefix_caching: bool = True  # with the paged runner only (others keep per-sequence state)


@dataclass(eq=False)
class Sequence:
    """One request's life in the engine. Fields after ``cancelled`` belong to the engine thread."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    arrival: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    seq_id: int = -1
    blocks: list[int] = field(default_factory=list)  # the KV-cache block table
    length: int = 0  # positions in the KV cache
    cached: int = 0  # leading positions found in the prefix cache at admission (not recomputed)
    digests: list[bytes] = field(default_factory=list)  # of its full prefill blocks, for the prefix cache
    pending: int = -1  # the last sampled token, fed at the next decode step
    output_ids: list[int] = field(default_factory=list)
    last_token_time: float = 0.0
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    matcher: Matcher | None = None  # its grammar state (structured outputs); lives as long as output_ids
    lora_slot: int = 0  # the LoRA slot of its adapter while running (0: the base model)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt logprobs were asked and not sent yet: every prompt token must be computed."""
        return bool(self.request.prompt_logprobs) and not self.output_ids

    @property
    def tokens_to_prefill(self) -> list[int]:
        """The prompt, and after a preemption the tokens generated so far (recomputed into the cache)."""
        return self.request.prompt_ids + self.output_ids

    async def stream(self) -> AsyncIterator[StepOutput]:
        """This request's outputs; the last has ``finish_reason``. Leaving early cancels the request."""
        try:
            while True:
                item = await self.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancelled.set()

    def emit(self, item: StepOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


def _deliver(items: list[tuple[Sequence, StepOutput | BaseException]]) -> None:
    for seq, item in items:
        seq.outputs.put_nowait(item)


class Engine:
    """Owns the model thread. ``submit`` (or ``generate``) is the only way in."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, metrics: EngineMetrics | None = None, lora: LoRAManager | None = None):
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.metrics = metrics
        self.lora = lora  # multi-LoRA serving (--lora_modules): adapters, slots
        self.runner: ModelRunner | None = None  # built in the engine thread, see start()
        self.scheduler: Scheduler | None = None  # built with the runner: it needs the pool's size
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False

    # ---- the asyncio side ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; returns once its runner (KV cache, packed weights) is built.

        All tensor work happens on that one thread: a second thread running the model leaves an OpenMP
        team behind that slows every later step (measured: 1.4x on a 2-core CPU).
        """
        if self._thread is not None:
            return
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                plan = KVPlan(self.config.kv_cache_memory, self.config.max_num_seqs * self.loaded.max_model_len)
                self.runner = make_runner(self.loaded.model, plan, self.config.max_num_seqs, self.loaded.device, self.lora)
                prefix_caching = self.config.enable_prefix_caching and isinstance(self.runner, PagedRunner)
                allocator = BlockAllocator(self.runner.num_blocks)
                self.scheduler = Scheduler(allocator, self.config.max_num_seqs, self.config.max_prefill_tokens, prefix_caching, self.lora)
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                ready.set()
            self._run()

        self._thread = threading.Thread(target=run, name="engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise failure[0]

    @property
    def waiting(self) -> deque[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def max_cached_tokens(self) -> int:
        """The most positions one sequence can hold: the whole KV-cache pool."""
        allocator = self.scheduler.allocator
        return allocator.capacity * allocator.block_size

    def submit(self, request: GenerationRequest) -> Sequence:
        """Queue a request; raises ``QueueFull`` or ``EngineStopped`` at once instead of accepting it."""
        seq = Sequence(request, asyncio.get_running_loop(), asyncio.Queue(), time.monotonic(), seq_id=next(self._ids))
        with self._cond:
            if not self._accepting:
                raise EngineStopped("the server is shutting down and takes no new requests")
            if len(self.waiting) >= self.config.max_queue:
                if self.metrics:
                    self.metrics.rejected.inc()
                raise QueueFull(f"the server is at capacity ({self.config.max_queue} requests waiting); retry shortly")
            self.waiting.append(seq)
            self._cond.notify()
        return seq

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        seq = self.submit(request)
        async for out in seq.stream():
            yield out

    def begin_drain(self) -> None:
        """Refuse new requests from now on; accepted ones run to completion."""
        with self._cond:
            self._accepting = False

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self.waiting and not self.running

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.idle:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def stop(self) -> None:
        """End the thread after the current iteration; requests still queued get ``EngineStopped``."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ---- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self.running and not self._stop:
                    self._cond.wait()
                if self._stop:
                    for seq in list(self.waiting) + self.running:
                        seq.emit(EngineStopped("the server stopped before this request finished"))
                    self.waiting.clear()
                    return
            try:
                self._step()
            except Exception as exc:  # a bug or a device error: fail the requests in flight, keep serving
                logger.exception("engine step failed")
                for seq in list(self.running):
                    seq.emit(EngineError(f"generation failed: {exc}"))
                    self._remove(seq)
            self._update_gauges()

    def _step(self) -> None:
        now = time.monotonic()
        self._expire(now)
        admitted = self._admit(now)
        if admitted:
            self._prefill(admitted)
        if self.running:
            self._decode()

    def _expire(self, now: float) -> None:
        timeout = self.config.request_timeout
        with self._cond:
            for seq in list(self.waiting):
                if seq.cancelled.is_set():
                    self.waiting.remove(seq)
                elif timeout and now - seq.arrival > timeout:
                    self.waiting.remove(seq)
                    seq.emit(RequestTimeout(f"the request waited longer than --request_timeout ({timeout:g} s)"))
        for seq in list(self.running):
            if seq.cancelled.is_set():
                self._remove(seq)
            elif timeout and now - seq.arrival > timeout:
                seq.emit(RequestTimeout(f"the request ran longer than --request_timeout ({timeout:g} s)"))
                self._remove(seq)

    def _admit(self, now: float) -> list[Sequence]:
        with self._cond:
            admitted = self.scheduler.admit()
        for seq in admitted:
            if self.metrics and self.scheduler.prefix_caching:
                self.metrics.prefix_cache_queries.inc(len(seq.tokens_to_prefill))
                self.metrics.prefix_cache_hits.inc(seq.cached)
            if seq.detok is not None:  # re-admitted after a preemption: its state carries on
                continue
            params = seq.request.params
            seq.generator = torch.Generator(device=self.loaded.device)
            seq.generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            seq.detok = Detokenizer(self.loaded.tokenizer, seq.request.prompt_ids, params.stop)
            if seq.request.grammar is not None:
                seq.matcher = seq.request.grammar.matcher()
            if self.metrics:
                self.metrics.queue_time.observe(now - seq.arrival)
                self.metrics.prompt_tokens.inc(len(seq.request.prompt_ids))
        return admitted

    def _prefill(self, admitted: list[Sequence]) -> None:
        chunks = []
        for seq in admitted:
            # prompt logprobs only on the first prefill (a recomputed sequence has sent them already)
            tokens = seq.tokens_to_prefill
            chunks.append(Chunk(seq.seq_id, tokens[seq.cached :], seq.cached, seq.blocks, seq.needs_prompt_logits, seq.lora_slot))
            seq.length = len(tokens)
        logits = self.runner.prefill(chunks)
        for seq in admitted:
            self.scheduler.computed(seq)
        last = []
        for seq, chunk, seq_logits in zip(admitted, chunks, logits):
            if chunk.all_logits:
                seq.prompt_logprobs = _prompt_logprobs(seq_logits, seq.request.prompt_ids, seq.request.params.logprobs or 0)
            last.append(seq_logits[-1])
        self._sample_and_emit(admitted, torch.stack(last))

    def _decode(self) -> None:
        with self._cond:
            preempted = self.scheduler.reserve_decode()
        for seq in preempted:
            self.runner.release(seq.seq_id)
            if self.metrics:
                self.metrics.preemptions.inc()
        batch = list(self.running)
        if not batch:
            return
        logits = self.runner.decode([Chunk(s.seq_id, [s.pending], s.length, s.blocks, lora_slot=s.lora_slot) for s in batch])
        for seq in batch:
            seq.length += 1
        self._sample_and_emit(batch, logits)

    def _sample_and_emit(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        constrained = [row for row, s in enumerate(batch) if s.matcher is not None]
        allowed = token_masks([batch[row].matcher for row in constrained], self.loaded.vocab_size, logits.shape[-1]).to(logits.device) if constrained else None
        tokens, logprobs = sample(
            logits,
            [s.request.params for s in batch],
            [s.generator for s in batch],
            [s.request.prompt_ids for s in batch],
            [s.output_ids for s in batch],
            self.loaded.eos_token_id,
            (constrained, allowed) if constrained else None,
        )
        now = time.monotonic()
        finished = []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, StepOutput | BaseException]]] = {}
        for seq, token, logprob in zip(batch, tokens, logprobs):
            # The request's grammar failed (computing its mask, or on its own token): fail this one only.
            if seq.matcher is not None and (seq.matcher.error is not None or not seq.matcher.advance(token)):
                spec = seq.request.params.structured
                failed = GrammarFailed(f"the {spec.kind} in '{spec.param}' failed at token {token}: {seq.matcher.error}")
                by_loop.setdefault(seq.loop, []).append((seq, failed))
                finished.append(seq)
                continue
            out = self._advance(seq, token, logprob, now)
            by_loop.setdefault(seq.loop, []).append((seq, out))
            if out.finish_reason is not None:
                finished.append(seq)
        for loop, items in by_loop.items():  # one wake-up of each event loop per step, not one per token
            loop.call_soon_threadsafe(_deliver, items)
        for seq in finished:
            self._remove(seq)

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> StepOutput:
        """Record one sampled token; return its output (``finish_reason`` set when the sequence ends)."""
        params = seq.request.params
        seq.output_ids.append(token)
        seq.pending = token
        if self.metrics:
            self.metrics.generation_tokens.inc()
            if len(seq.output_ids) == 1:
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        finish = None
        if token == self.loaded.eos_token_id and not params.ignore_eos:
            text, finish = seq.detok.flush(), "stop"
        else:
            text = seq.detok.add(token)
            if seq.detok.stopped:
                finish = "stop"
            elif seq.matcher is not None and seq.matcher.finished:  # the grammar is complete: nothing may follow
                text, finish = text + seq.detok.flush(), "stop"
            elif len(seq.output_ids) >= params.max_tokens or seq.length + 1 >= self.loaded.max_model_len:
                text, finish = text + seq.detok.flush(), "length"
        out = StepOutput(
            text=text,
            token_ids=[token],
            logprobs=None if logprob is None else [logprob],
            finish_reason=finish,
            prompt_logprobs=seq.prompt_logprobs,
            num_prompt_tokens=len(seq.request.prompt_ids),
            num_generated_tokens=len(seq.output_ids),
        )
        seq.prompt_logprobs = None
        if finish is not None and self.metrics:
            self.metrics.e2e.observe(now - seq.arrival)
            self.metrics.success(finish)
        return out

    def _remove(self, seq: Sequence) -> None:
        """The sequence leaves the batch; its KV-cache blocks return to the pool."""
        with self._cond:
            self.scheduler.free(seq)
        self.runner.release(seq.seq_id)

    def _update_gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(len(self.running))
            self.metrics.waiting.set(len(self.waiting))
            self.metrics.kv_cache_usage.set(self.scheduler.usage)
            if self.lora is not None:
                with self._cond:
                    waiting = {s.request.lora for s in self.waiting} - {None}
                self.metrics.lora_info(self.lora.max_loras, {s.request.lora for s in self.running} - {None}, waiting)


def _prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top_n: int) -> list[TokenLogprob | None]:
    """Log-probability of each prompt token given the ones before it (None for the first). logits: (P, V)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [None] + [token_logprob(logprobs[i - 1], prompt_ids[i], top_n) for i in range(1, len(prompt_ids))]
