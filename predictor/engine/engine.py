"""The engine: accepts ``GenerationRequest``s from any protocol and streams ``StepOutput``s back.

One background thread owns the model; the asyncio side only enqueues requests and awaits outputs, so
HTTP and gRPC stay responsive while tensors are computed. This version runs one sequence at a time
(``submit`` → queue → prefill → decode loop); the continuous-batching scheduler replaces ``_run_loop``
behind the same ``generate`` interface.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from ..loading import LoadedModel
from ..sampling import GenerationRequest, StepOutput, TokenLogprob
from .detokenizer import Detokenizer
from .runner import ModelRunner
from .sampler import sample, token_logprob

logger = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Owns the model thread. ``generate`` is the only way in."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.runner = ModelRunner(loaded.model, loaded.device)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_loop, name="engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the running sequence, then end the thread."""
        self._stopping = True
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        """Stream the request's outputs; the last one has ``finish_reason``. Closing the stream cancels it."""
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        job = _Job(request=request, loop=asyncio.get_running_loop(), outputs=asyncio.Queue())
        self._jobs.put(job)
        try:
            while True:
                item = await job.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled.set()

    def _run_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            try:
                self._run_one(job)
            except Exception as exc:  # report to the waiting client, keep serving the others
                logger.exception("generation failed for request %s", job.request.request_id)
                job.loop.call_soon_threadsafe(job.outputs.put_nowait, exc)

    def _run_one(self, job: _Job) -> None:
        req, params = job.request, job.request.params
        tokenizer = self.loaded.tokenizer
        eos = self.loaded.eos_token_id
        generator = torch.Generator(device=self.loaded.device)
        generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        detok = Detokenizer(tokenizer, req.prompt_ids, params.stop)
        logits, seq = self.runner.prefill(req.prompt_ids, all_logits=req.prompt_logprobs)
        prompt_logprobs = _prompt_logprobs(logits, req.prompt_ids, params.logprobs or 0) if req.prompt_logprobs else None
        logits = logits[-1:]
        output_ids: list[int] = []
        while True:
            if job.cancelled.is_set():
                return
            (token,), (logprob,) = sample(logits, [params], [generator], [req.prompt_ids], [output_ids], eos)
            output_ids.append(token)
            finish = None
            if token == eos and not params.ignore_eos:
                text, finish = detok.flush(), "stop"
            else:
                text = detok.add(token)
                if detok.stopped:
                    finish = "stop"
                elif len(output_ids) >= params.max_tokens or seq.length + 1 >= self.loaded.max_model_len:
                    text, finish = text + detok.flush(), "length"
            out = StepOutput(
                text=text,
                token_ids=[token],
                logprobs=None if logprob is None else [logprob],
                finish_reason=finish,
                prompt_logprobs=prompt_logprobs,
                num_prompt_tokens=len(req.prompt_ids),
                num_generated_tokens=len(output_ids),
            )
            prompt_logprobs = None
            job.loop.call_soon_threadsafe(job.outputs.put_nowait, out)
            if finish is not None:
                return
            logits = self.runner.decode(token, seq)


def _prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top_n: int) -> list[TokenLogprob | None]:
    """Log-probability of each prompt token given the ones before it (None for the first). logits: (P, V)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [None] + [token_logprob(logprobs[i - 1], prompt_ids[i], top_n) for i in range(1, len(prompt_ids))]
