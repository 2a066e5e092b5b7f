"""What runs each step: admission from the waiting queue, KV-cache blocks per sequence, preemption.

First come, first served. A waiting request is admitted when the running batch has room
(``--max_num_seqs``), the step's prefill budget allows it (``--max_prefill_tokens``; one prompt always
may), and the KV-cache pool has blocks for its tokens with one block to spare per running sequence, so
that the batch can keep growing. Each decode step first gives every sequence whose next position
starts a new block that block; when the pool is empty the newest running sequence is preempted: its
blocks go back to the pool and it returns to the front of the queue, to be recomputed from its prompt
and the tokens it already generated (vLLM's recompute preemption). Nothing is failed for lack of memory;
a request that could never fit is refused before it is queued (``Generation.max_tokens``).

The engine thread calls every method; the caller holds the engine's lock around ``waiting``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .kv_cache import BlockAllocator, block_hashes

if TYPE_CHECKING:
    from .engine import Sequence
    from .lora import LoRAManager


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_prefill_tokens: int, prefix_caching: bool = False, lora: LoRAManager | None = None):
        self.allocator = allocator
        self.lora = lora
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the first to be preempted
        self.preemptions = 0

    @property
    def usage(self) -> float:
        """Fraction of the KV-cache blocks in use."""
        return self.allocator.used / self.allocator.capacity

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the running batch, with blocks for their prefill; returns them.

        With prefix caching, a sequence starts with the cached blocks of its longest cached prefix
        (``seq.cached`` positions, always leaving at least one token to compute) and needs blocks and
        prefill budget only for the rest.

        A request for a LoRA adapter also needs one of the ``--max_loras`` slots (``lora.py``); when none is
        free it stays waiting, and so do the LoRA requests behind it (base requests still pass), so that
        slots drain for it instead of being taken over and over by adapters already loaded.
        """
        admitted: list[Sequence] = []
        skipped: list[Sequence] = []  # LoRA requests waiting for a slot, in queue order
        budget = self.max_prefill_tokens
        bs = self.allocator.block_size
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            lora = seq.request.lora if self.lora is not None else None
            if lora is not None and (skipped or not self.lora.can_acquire(lora)):
                skipped.append(self.waiting.popleft())
                continue
            tokens = seq.tokens_to_prefill
            if self.prefix_caching and len(seq.digests) != len(tokens) // bs:  # once per block count, not every step it waits
                seq.digests = block_hashes(tokens, bs, self.lora.hash_seed(lora) if lora is not None else b"")
            reusable = [] if seq.needs_prompt_logits else seq.digests[: (len(tokens) - 1) // bs]
            hits, unused = self.allocator.cached_prefix(reusable)
            n = len(tokens) - hits * bs
            needed = self.allocator.blocks_for(len(tokens)) - hits
            spare = len(self.running)  # one block of headroom per running sequence
            if (admitted and n > budget) or self.allocator.free - unused - needed < (spare if self.running else 0):
                break
            self.waiting.popleft()
            seq.lora_slot = self.lora.acquire(lora) if lora is not None else 0
            seq.blocks = self.allocator.take_cached(reusable[:hits]) + self.allocator.allocate(needed)
            seq.cached = hits * bs
            budget -= n
            self.running.append(seq)
            admitted.append(seq)
        self.waiting.extendleft(reversed(skipped))
        return admitted

    def computed(self, seq: Sequence) -> None:
        """``seq``'s prefill ran: its full blocks may now be shared."""
        if self.prefix_caching:
            self.allocator.register(seq.blocks, seq.digests)

    def reserve_decode(self) -> list[Sequence]:
        """Give each running sequence the block its next position needs, preempting the newest if the
        pool is empty; returns the preempted sequences (already back at the front of ``waiting``)."""
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below, for an older sequence
                continue
            while seq.length // self.allocator.block_size >= len(seq.blocks):
                if self.allocator.free:
                    seq.blocks += self.allocator.allocate(1)
                    continue
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
        return preempted

    def preempt(self, seq: Sequence) -> None:
        self.free(seq)
        seq.length = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def free(self, seq: Sequence) -> None:
        """Take ``seq`` out of the running batch and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        self.allocator.release(seq.blocks)
        seq.blocks = []
        if self.lora is not None and seq.lora_slot:
            self.lora.release(seq.lora_slot)
            seq.lora_slot = 0
