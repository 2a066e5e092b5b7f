"""A request's state in the engine (``Sequence``) and the delivery of its outputs to the asyncio side.

Its own module, below both the engine and the scheduler: each of them works on sequences, and neither has to
import the other for it (vLLM v1's ``Request``, apart from its ``EngineCore`` and ``Scheduler``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..sampling import GenerationRequest, StepOutput, TokenLogprob
    from .detokenizer import Detokenizer
    from .structured import Matcher

__all__ = ["Sequence", "deliver"]


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
    prefill_target: int = 0  # positions its prefill fills (set at admission); it decodes once length reaches it
    chunk: int = 0  # prompt tokens it prefills in the current step (scheduler.schedule_prefill)
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
    scheduled_time: float = 0.0  # first admission (the end of its queue time)
    first_token_time: float = 0.0
    finish_time: float = 0.0

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt logprobs were asked and not sent yet: every prompt token must be computed."""
        return bool(self.request.prompt_logprobs) and not self.output_ids

    @property
    def prefilling(self) -> bool:
        """Admitted, with prompt tokens still to run (chunked prefill)."""
        return self.length < self.prefill_target

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
        """From the engine thread: ``item`` to this request's stream, on its event loop."""
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


def deliver(items: list[tuple[Sequence, StepOutput | BaseException]]) -> None:
    """On one event loop: a whole step's outputs for its sequences (one wake-up per loop and step, not per token)."""
    for seq, item in items:
        seq.outputs.put_nowait(item)
