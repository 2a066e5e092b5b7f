"""The continuous-batching engine: every protocol's requests in, streamed ``StepOutput``s out.

One background thread owns the model. Each iteration it (1) drops cancelled and timed-out sequences,
(2) admits waiting requests (``scheduler.py``: batch room, prefill budget, KV-cache blocks) and runs
this step's prefill chunks in one forward (at most ``--max_prefill_tokens`` prompt tokens: a long prompt
is prefilled over several steps, its first token sampled after its last chunk), (3) gives every decoding
sequence the KV-cache block its next token needs (preempting the newest when the pool is empty) and runs
one batched decode step over all of them, each with its own position, sampling parameters and generator. A sequence that finishes leaves at once and
its blocks go to the next admission. The asyncio side only submits requests and awaits outputs, so
HTTP and gRPC stay responsive while tensors are computed.

Blast radius of one: a failure while setting up, sampling or detokenizing one row fails that request alone
(``RequestFailed``, a 500 naming its request id); the rest of the step's rows go on, their output unchanged
(sampling is row-independent, so the rows are re-sampled one by one). A model forward that raises is retried
once without the newest sequence, which then fails alone. An error that leaves the engine unusable (a device
error, or ``MAX_FAILURES_IN_A_ROW`` failed steps in a row) marks it dead: every request gets ``EngineDead`` and
``on_dead`` is called, so that the server fails its probes and exits non-zero for Kubernetes to restart it
(vLLM's ``EngineDeadError``).

Around it: a request's state is ``request.Sequence``, the queues are the scheduler's (``scheduler.py``, which also
states the locking rule), a sampled token becomes text and a finish reason in ``output.OutputProcessor``, and every
metric and span goes through ``observer.EngineObserver``. This module stays over
400 lines because what is left is one piece: the step loop over the engine thread's state, with the failure isolation
above (retry without the newest, row-by-row re-sampling) woven through its prefill, decode and sampling.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import EngineDead, EngineError, EngineStopped, GrammarFailed, InvalidRequest, QueueFull, RequestFailed, RequestTimeout, internal_error
from ..loading import LoadedModel
from ..sampling import GenerationRequest, StepOutput, TokenLogprob
from .kv_cache import BlockAllocator
from .lora import LoRAAdapter, LoRAManager
from .observer import EngineObserver
from .output import OutputProcessor
from .request import Sequence, deliver
from .runner import Chunk, KVPlan, ModelRunner, PagedRunner, make_runner
from .sampler import sample, token_logprob
from .scheduler import Scheduler
from .structured import token_masks

if TYPE_CHECKING:
    from ..metrics import EngineMetrics

logger = logging.getLogger("kserve")  # KServe configures this logger's handlers


__all__ = ["Engine", "EngineConfig", "EngineDead", "EngineError", "EngineStopped", "GrammarFailed", "QueueFull", "RequestTimeout", "Sequence"]

# Failed model forwards or steps in a row (nothing succeeding between them) after which the engine is declared dead.
MAX_FAILURES_IN_A_ROW = 3
# Text of RuntimeErrors that mean the device itself is broken (CUDA reports these; nothing after them can be trusted).
_DEVICE_ERRORS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS", "cuDNN error", "NCCL error")


def is_device_error(exc: BaseException) -> bool:
    """An error after which the device (and so the engine) cannot be trusted: the process must restart."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _DEVICE_ERRORS)


class _EngineBroken(Exception):
    """Raised inside a step when the engine must stop serving (see ``Engine._count_failure``)."""


# Chunked prefill's step budget where --max_prefill_tokens is not given, by device. CPU: 256, measured on the AMD EPYC (2
# cores, SmolLM2's shape, bfloat16, benchmarks/chunked_prefill.py: 16 streams while a 2,000-token prompt arrives every
# 2 s): the streams' ITL p99 1.5-1.6x their p50 against 13-18x with 512 (each 512-token chunk stalls them ~0.5 s), the
# long prompt 2.8-2.9 s against 2.4-2.7 s (two runs), and 32-token prompts at C=16 served as fast as with 512. CUDA: 2048, vLLM V1's default
# for online serving (prefill is far cheaper there; not measured by this project).
DEFAULT_PREFILL_TOKENS = {"cpu": 256, "cuda": 2048}


def prefill_budget(max_prefill_tokens: int | None, device: torch.device) -> int:
    """The step's prompt-token budget: ``max_prefill_tokens`` if given, else the device's default."""
    return max_prefill_tokens or DEFAULT_PREFILL_TOKENS.get(device.type, DEFAULT_PREFILL_TOKENS["cpu"])


@dataclass
class EngineConfig:
    max_num_seqs: int = 16
    max_queue: int = 256
    request_timeout: float = 600.0
    max_prefill_tokens: int | None = None  # chunked prefill's step budget; None: the device's (DEFAULT_PREFILL_TOKENS)
    kv_cache_memory: int | None = None  # bytes; None: the device default (kv_cache.py)
    enable_prefix_caching: bool = True  # with the paged runner only (others keep per-sequence state)
    compile: bool | None = False  # the decode step through torch.compile (compiled_step.py) where the runner can; None: by the CPU (runner.py)


class Engine:
    """Owns the model thread. ``submit_all`` (or ``generate``) is the only way in."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, metrics: EngineMetrics | None = None, lora: LoRAManager | None = None):
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.observer = EngineObserver(metrics)  # every metric and span the engine reports (observer.py)
        # sampled tokens → text deltas and finish reasons (output.py)
        self.output = OutputProcessor(loaded.tokenizer, loaded.eos_token_id, loaded.max_model_len, self.observer)
        self.lora = lora  # multi-LoRA serving (--lora_modules): adapters, slots
        self.runner: ModelRunner | None = None  # built in the engine thread, see start()
        self.scheduler: Scheduler | None = None  # built with the runner: it needs the pool's size
        self.on_dead: Callable[[str], None] | None = None  # called once, from the engine thread, when the engine dies
        self.dead: str | None = None  # why the engine died; None while it serves
        self._ids = itertools.count()
        # One re-entrant lock for the engine's own state (accepting, stopping, dead, the LoRA registry) and the
        # scheduler's queues, which take it inside their methods (Scheduler.__init__ states the rule); the condition
        # on it wakes the engine thread when requests arrive.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self._failed_steps = 0  # in a row

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
                self.runner = make_runner(self.loaded.model, plan, self.config.max_num_seqs, self.loaded.device, self.lora, self.config.compile)
                prefix_caching = self.config.enable_prefix_caching and isinstance(self.runner, PagedRunner)
                allocator = BlockAllocator(self.runner.num_blocks)
                chunked = isinstance(self.runner, PagedRunner)  # the others cannot continue a prefill from a cached position
                budget = prefill_budget(self.config.max_prefill_tokens, self.loaded.device)
                self.scheduler = Scheduler(allocator, self.config.max_num_seqs, budget, prefix_caching, self.lora, chunked, self._lock)
                self.observer.on_start(self.scheduler, str(getattr(self.runner, "dtype", torch.float32)).removeprefix("torch."), self.lora)
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
    def metrics(self) -> EngineMetrics | None:
        return self.observer.metrics

    @property
    def tracer(self):
        """A ``tracing.RequestTracer`` (or None): one span per finished request (``--otlp_traces_endpoint``)."""
        return self.observer.tracer

    @tracer.setter
    def tracer(self, tracer) -> None:
        self.observer.tracer = tracer

    @property
    def max_cached_tokens(self) -> int:
        """The most positions one sequence can hold: the whole KV-cache pool."""
        allocator = self.scheduler.allocator
        return allocator.capacity * allocator.block_size

    @property
    def capacity(self) -> int:
        """The most sequences the engine holds at once: the running batch and the waiting queue beyond it."""
        return self.config.max_num_seqs + self.config.max_queue

    def submit_all(self, requests: list[GenerationRequest]) -> list[Sequence]:
        """Queue every request or none: ``QueueFull`` when they do not all fit now (``--max_queue`` waiting beyond the
        running batch's free room), ``EngineStopped`` while draining, ``EngineDead`` once the engine died."""
        loop, now = asyncio.get_running_loop(), time.monotonic()
        seqs = [Sequence(r, loop, asyncio.Queue(), now, seq_id=next(self._ids)) for r in requests]
        with self._cond:
            if self.dead is not None:
                raise EngineDead("the engine failed and this server is restarting; retry on another replica")
            if not self._accepting:
                raise EngineStopped("the server is shutting down and takes no new requests")
            for request in requests:  # checked again here, under the lock: an adapter may have been unloaded meanwhile
                if request.lora is not None and (request.lora not in self.lora.adapters or request.lora in self.lora.unloading):
                    raise InvalidRequest(f"the LoRA adapter '{request.lora}' does not exist", param="model", status=404, code="model_not_found")
            room = self.capacity - self.scheduler.num_unfinished
            if len(seqs) > room:
                self.observer.on_reject()
                raise QueueFull(f"the server is at capacity ({self.config.max_queue} requests waiting beyond the running batch); retry shortly")
            self.scheduler.add(seqs)
            self._cond.notify()
        return seqs

    def submit(self, request: GenerationRequest) -> Sequence:
        return self.submit_all([request])[0]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        seq = self.submit(request)
        async for out in seq.stream():
            yield out

    def add_lora(self, adapter: LoRAAdapter, where: str) -> None:
        """Serve a LoRA adapter from now on (``LoRAManager.register``'s checks; runtime updates)."""
        with self._cond:
            self.lora.register(adapter, where)

    async def remove_lora(self, name: str) -> None:
        """Take no new requests for ``name``, wait until its waiting and running requests are done, then forget it."""
        with self._cond:
            self.lora.unloading.add(name)
        while True:
            with self._cond:
                if not self.scheduler.uses_lora(name):
                    self.lora.remove(name)
                    return
            await asyncio.sleep(0.05)

    def begin_drain(self) -> None:
        """Refuse new requests from now on; accepted ones run to completion."""
        with self._cond:
            self._accepting = False

    @property
    def idle(self) -> bool:
        return self.scheduler.num_unfinished == 0

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
                while not self.scheduler.num_unfinished and not self._stop:
                    self._cond.wait()
                if self._stop:
                    for seq in self.scheduler.abort_all():
                        seq.emit(EngineStopped("the server stopped before this request finished"))
                    return
            try:
                self._step()
            except _EngineBroken as exc:
                self._die(str(exc))
                return
            except Exception as exc:  # outside a forward, or its retry failed too: the running batch fails
                try:
                    self._step_failed(exc)
                except _EngineBroken as broken:
                    self._die(str(broken))
                    return
            self.observer.on_step(self.scheduler, self.lora)

    def _step(self) -> None:
        now = time.monotonic()
        failures = self._failed_steps
        self._expire(now)
        chunks = self._admit(now)
        if chunks:
            self._reserve_decode()  # before the forward: a mixed step decodes in it
            chunks = [seq for seq in chunks if seq in self.scheduler.running]  # not preempted for a decoding one
        decoding = self.scheduler.decoding() if chunks else []
        if chunks and decoding:
            self._mixed(chunks, decoding)
        else:
            if chunks:
                self._prefill(chunks)
            if self.scheduler.decoding():  # after a prefill alone, its sequences' second tokens in the same step
                self._decode()
        if self._failed_steps == failures:  # a whole step without a failure: the engine works
            self._failed_steps = 0

    def _count_failure(self, exc: BaseException) -> None:
        """One more failure; raises ``_EngineBroken`` for a device error, or when ``MAX_FAILURES_IN_A_ROW`` steps failed
        with no step succeeding whole between them."""
        self._failed_steps += 1
        self.observer.on_step_failure()
        if is_device_error(exc):
            raise _EngineBroken(f"device error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        if self._failed_steps >= MAX_FAILURES_IN_A_ROW:
            raise _EngineBroken(f"{self._failed_steps} engine steps failed in a row, the last with {type(exc).__name__}") from exc

    def _step_failed(self, exc: Exception) -> None:
        batch = self.scheduler.batch()
        ids = [s.request.request_id for s in batch]
        logger.error("engine step failed (%d in a row); failing running requests %s", self._failed_steps + 1, ", ".join(ids) or "-", exc_info=exc)
        self._count_failure(exc)
        for seq in batch:
            seq.emit(RequestFailed(internal_error(seq.request.request_id)))
            self._remove(seq)

    def _die(self, reason: str) -> None:
        """The engine cannot serve any more: fail everything, refuse everything, tell the server."""
        logger.critical("engine dead: %s; failing every request, the server exits for a restart", reason)
        with self._cond:
            self.dead = reason
            self._accepting = False
            seqs = self.scheduler.abort_all()
        for seq in seqs:
            seq.emit(EngineDead("the engine failed and this server is restarting; retry on another replica"))
        self.observer.on_dead()
        if self.on_dead is not None:
            self.on_dead(reason)

    def _fail(self, seq: Sequence, exc: BaseException, where: str) -> None:
        """``seq`` alone fails (its own error, a 500 naming its request id); the batch goes on without it."""
        logger.error("request %s failed while %s", seq.request.request_id, where, exc_info=exc)
        seq.emit(RequestFailed(internal_error(seq.request.request_id)))
        self._remove(seq)
        self.observer.on_error(seq, time.monotonic(), f"failed while {where}")

    def _forward(self, batch: list[Sequence], run: Callable[[list[Sequence]], torch.Tensor | list[torch.Tensor]], what: str):
        """``run(batch)`` (the model forward); if it raises, once more without the newest sequence, which then fails
        alone (a batch of one fails alone). Returns the sequences that ran and their logits (None if none did)."""
        try:
            logits = run(batch)
        except Exception as exc:
            self._count_failure(exc)
            newest = max(batch, key=lambda s: s.seq_id)
            if len(batch) == 1:
                self._fail(newest, exc, f"in the model's {what}")
                return [], None
            logger.warning(
                "model %s of %d sequences failed (%s); retrying without the newest, request %s", what, len(batch), type(exc).__name__, newest.request.request_id
            )
            rest = [s for s in batch if s is not newest]
            logits = run(rest)  # a second failure fails the step (Engine._step_failed)
            self._fail(newest, exc, f"in the model's {what} (the batch without it succeeded)")
            batch = rest
        return batch, logits

    def _expire(self, now: float) -> None:
        """Drop the cancelled sequences; fail those past ``--request_timeout``."""
        timeout = self.config.request_timeout
        waited, ran, cancelled = self.scheduler.expire(now, timeout)
        for seq in waited:
            seq.emit(RequestTimeout(f"the request waited longer than --request_timeout ({timeout:g} s)"))
        for seq in ran:
            seq.emit(RequestTimeout(f"the request ran longer than --request_timeout ({timeout:g} s)"))
        for seq in ran + cancelled:  # out of the batch already (their blocks too): their runner state goes now
            self.runner.release(seq.seq_id)
        for seq in waited + ran:
            self.observer.on_error(seq, now, "timed out (--request_timeout)")

    def _admit(self, now: float) -> list[Sequence]:
        """Admit what fits; returns every sequence with a prefill chunk this step."""
        admitted, chunks = self.scheduler.schedule_prefill()
        failed = set()
        for seq in admitted:
            self.observer.on_admit(seq, self.scheduler.prefix_caching)
            if seq.needs_prompt_logits:
                seq.prompt_logprobs = None  # collected chunk by chunk, from the start again after a preemption
            if seq.detok is None:  # not re-admitted after a preemption (then its state carries on)
                try:
                    self._start_sequence(seq, now)
                except Exception as exc:
                    self._fail(seq, exc, "starting")
                    failed.add(seq)
        return [seq for seq in chunks if seq not in failed]

    def _start_sequence(self, seq: Sequence, now: float) -> None:
        """A sequence's first admission: its generator, detokenizer and grammar state."""
        params = seq.request.params
        seq.generator = torch.Generator(device=self.loaded.device)
        seq.generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        if seq.request.grammar is not None:
            seq.matcher = seq.request.grammar.matcher(params.max_tokens)
        self.output.start(seq)
        seq.scheduled_time = now
        self.observer.on_scheduled(seq, now)

    def _run_prefill(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        return self.runner.prefill(self._prefill_chunks(seqs))

    @staticmethod
    def _prefill_chunks(seqs: list[Sequence]) -> list[Chunk]:
        # prompt logprobs only on the first prefill (a recomputed sequence has sent them already)
        return [Chunk(s.seq_id, s.tokens_to_prefill[s.length : s.length + s.chunk], s.length, s.blocks, s.needs_prompt_logits, s.lora_slot) for s in seqs]

    def _prefill(self, chunks: list[Sequence]) -> None:
        ran, logits = self._forward(chunks, self._run_prefill, "prefill")
        if ran:
            done, last = self._prefilled(ran, logits)
            if done:
                self._sample_and_emit(done, torch.stack(last))

    def _prefilled(self, ran: list[Sequence], logits: list[torch.Tensor]) -> tuple[list[Sequence], list[torch.Tensor]]:
        """After a forward over prefill chunks: prompt logprobs kept, lengths advanced; the sequences whose prompt is now
        whole in the cache and the logits of their last position, to draw their first token from."""
        done, last = [], []
        for seq, seq_logits in zip(ran, logits):
            if seq.needs_prompt_logits:
                got = _prompt_logprobs(seq_logits, seq.request.prompt_ids, seq.length, seq.request.params.logprobs or 0)
                seq.prompt_logprobs = (seq.prompt_logprobs or []) + got
            seq.length += seq.chunk
            if not seq.prefilling:  # its last chunk: its whole prompt is in the cache, and its first token is drawn
                self.scheduler.computed(seq)
                done.append(seq)
                last.append(seq_logits[-1])
        return done, last

    def _run_decode(self, seqs: list[Sequence]) -> torch.Tensor:
        return self.runner.decode([self._decode_chunk(s) for s in seqs])

    @staticmethod
    def _decode_chunk(seq: Sequence) -> Chunk:
        return Chunk(seq.seq_id, [seq.pending], seq.length, seq.blocks, lora_slot=seq.lora_slot)

    def _reserve_decode(self) -> None:
        """The KV-cache block each decoding sequence's next position needs (preempting the newest when none is free)."""
        for seq in self.scheduler.reserve_decode():
            self.runner.release(seq.seq_id)
            self.observer.on_preempt(seq)

    def _decode(self) -> None:
        self._reserve_decode()
        batch = self.scheduler.decoding()
        if not batch:
            return
        batch, logits = self._forward(batch, self._run_decode, "decode")
        if not batch:
            return
        for seq in batch:
            seq.length += 1
        self._sample_and_emit(batch, logits)

    def _mixed(self, chunks: list[Sequence], decoding: list[Sequence]) -> None:
        """Prefill chunks and the decoding sequences in one forward (the runner's ``step``), then one draw for every
        sequence with a next token: those whose prompt is complete now and the decoding ones."""
        prefilling = set(chunks)

        def run(seqs: list[Sequence]) -> tuple[list[torch.Tensor], torch.Tensor]:
            prefill = [s for s in seqs if s in prefilling]
            decode = [self._decode_chunk(s) for s in seqs if s not in prefilling]
            return self.runner.step(self._prefill_chunks(prefill), decode)

        ran, out = self._forward(chunks + decoding, run, "step")
        if not ran:
            return
        prefill_logits, decode_logits = out
        done, last = self._prefilled([s for s in ran if s in prefilling], prefill_logits)
        decoded = [s for s in ran if s not in prefilling]
        for seq in decoded:
            seq.length += 1
        rows = [*last, *decode_logits] if decoded else last
        if rows:
            self._sample_and_emit(done + decoded, torch.stack(rows))

    def _sample_rows(self, batch: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        constrained = [row for row, s in enumerate(batch) if s.matcher is not None]
        allowed = token_masks([batch[row].matcher for row in constrained], self.loaded.vocab_size, logits.shape[-1]).to(logits.device) if constrained else None
        return sample(
            logits,
            [s.request.params for s in batch],
            [s.generator for s in batch],
            [s.request.prompt_ids for s in batch],
            [s.output_ids for s in batch],
            self.loaded.eos_token_id,
            (constrained, allowed) if constrained else None,
        )

    def _sample(self, batch: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None], dict[Sequence, Exception]]:
        """The next token of every row; if the batched draw raises, each row is drawn alone (the same tokens: every row
        has its own parameters and generator) and the rows that still raise are returned as failures."""
        try:
            return *self._sample_rows(batch, logits), {}
        except Exception as exc:
            if len(batch) == 1:
                return [-1], [None], {batch[0]: exc}
            logger.warning("sampling a batch of %d failed (%s); sampling its rows one by one", len(batch), type(exc).__name__)
        tokens: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        failures: dict[Sequence, Exception] = {}
        for row, seq in enumerate(batch):
            try:
                (token,), (logprob,) = self._sample_rows([seq], logits[row : row + 1])
            except Exception as exc:
                token, logprob, failures[seq] = -1, None, exc
            tokens.append(token)
            logprobs.append(logprob)
        return tokens, logprobs, failures

    def _sample_and_emit(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        tokens, logprobs, failures = self._sample(batch, logits)
        now = time.monotonic()
        finished = []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, StepOutput | BaseException]]] = {}
        for seq, token, logprob in zip(batch, tokens, logprobs):
            if seq in failures:
                self._fail(seq, failures[seq], "sampling")
                continue
            # The request's grammar failed (computing its mask, or on its own token): fail this one only.
            if seq.matcher is not None and (seq.matcher.error is not None or not seq.matcher.advance(token)):
                spec = seq.request.params.structured
                failed = GrammarFailed(f"the {spec.kind} in '{spec.param}' failed at token {token}: {seq.matcher.error}", param=spec.param)
                by_loop.setdefault(seq.loop, []).append((seq, failed))
                finished.append(seq)
                continue
            try:
                out = self.output.process(seq, token, logprob, now)
            except Exception as exc:
                self._fail(seq, exc, "detokenizing")
                continue
            by_loop.setdefault(seq.loop, []).append((seq, out))
            if out.finish_reason is not None:
                finished.append(seq)
        for loop, items in by_loop.items():  # one wake-up of each event loop per step, not one per token
            loop.call_soon_threadsafe(deliver, items)
        for seq in finished:
            self._remove(seq)

    def _remove(self, seq: Sequence) -> None:
        """The sequence leaves the batch; its KV-cache blocks return to the pool."""
        self.scheduler.free(seq)
        self.runner.release(seq.seq_id)


def _prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], start: int, top_n: int) -> list[TokenLogprob | None]:
    """Log-probability of each prompt token given the ones before it (None for the first), for the chunk of positions
    ``start, start+1, …`` whose logits (T, V) these are: row j scores the prompt token at ``start + j + 1``."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    first = [None] if start == 0 else []
    return first + [token_logprob(logprobs[j], prompt_ids[start + j + 1], top_n) for j in range(len(logits)) if start + j + 1 < len(prompt_ids)]
