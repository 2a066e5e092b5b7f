"""What runs each step: admission from the waiting queue, KV-cache blocks per sequence, preemption.

First come, first served. A waiting request is admitted when the running batch has room
(``--max_num_seqs``), the step's prefill budget has tokens left (``--max_prefill_tokens``), and the KV-cache
pool has blocks for its tokens with one block to spare per running sequence, so that the batch can keep
growing. Chunked prefill (vLLM V1's default): each step runs at most ``--max_prefill_tokens`` prompt tokens,
first the rest of prompts already being prefilled, then new ones; a prompt longer than what is left is
prefilled in chunks over the next steps, interleaved with the running decodes, so a 4k-token prompt does not
stall every stream for its whole prefill. (A runner that cannot continue a prefill, ``HFRunner``, takes each
prompt whole: there one prompt always may, over the budget.) Each decode step first gives every sequence whose next position
starts a new block that block; when the pool is empty the newest running sequence is preempted: its
blocks go back to the pool and it returns to the front of the queue, to be recomputed from its prompt
and the tokens it already generated (vLLM's recompute preemption). Nothing is failed for lack of memory;
a request that could never fit is refused before it is queued (``Generation.max_tokens``).

The scheduler owns both queues: ``waiting`` (a deque, oldest first) and ``running`` (the batch, in admission
order). Nothing else changes them; the engine goes through ``add``, ``expire``, ``schedule_prefill``,
``reserve_decode``, ``free`` and ``abort_all``, and reads them through ``num_unfinished``, ``decoding``,
``batch`` and the LoRA queries. The locking rule is stated in ``__init__``, where the lock is.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

from .kv_cache import BlockAllocator, block_hashes
from .request import Sequence

if TYPE_CHECKING:
    from .lora import LoRAManager


class Expired(NamedTuple):
    """What ``Scheduler.expire`` took out: every list is out of the queues already, its blocks back in the pool."""

    waited: list[Sequence]  # timed out while waiting
    ran: list[Sequence]  # timed out while running
    cancelled: list[Sequence]  # cancelled while running (those cancelled while waiting just leave)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        max_num_seqs: int,
        max_prefill_tokens: int,
        prefix_caching: bool = False,
        lora: LoRAManager | None = None,
        chunked_prefill: bool = True,
        lock: threading.RLock | None = None,
    ):
        # The lock: the asyncio thread adds to ``waiting`` (``add``) and reads both queues (``num_unfinished``,
        # ``uses_lora``) while the engine thread changes them, so every method that changes a queue, and every
        # reader that is not the engine thread's own, takes it here, inside the method. The engine passes its own
        # (re-entrant) lock, the one under its condition variable: it also guards the LoRA registry that admission
        # reads and ``Engine.add_lora`` changes, and it lets ``submit_all`` check the room and add under one hold.
        # Only the engine thread changes ``running``, so it reads ``running`` (``decoding``, ``batch``) without it.
        self.lock = lock if lock is not None else threading.RLock()
        self.allocator = allocator
        self.chunked_prefill = chunked_prefill
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

    # ---- the queues, from either thread -----------------------------------------------------------

    def add(self, seqs: list[Sequence]) -> None:
        """Queue new sequences at the back of ``waiting`` (the asyncio thread, ``Engine.submit_all``)."""
        with self.lock:
            self.waiting.extend(seqs)

    @property
    def num_unfinished(self) -> int:
        """Sequences waiting or running."""
        with self.lock:
            return len(self.waiting) + len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def uses_lora(self, name: str) -> bool:
        """A waiting or running sequence asks for the LoRA adapter ``name``."""
        with self.lock:
            return any(seq.request.lora == name for seq in (*self.waiting, *self.running))

    def lora_adapters(self) -> tuple[set[str], set[str]]:
        """The LoRA adapters asked for by (running, waiting) sequences."""
        with self.lock:
            waiting = {s.request.lora for s in self.waiting} - {None}
        return {s.request.lora for s in self.running} - {None}, waiting

    def abort_all(self) -> list[Sequence]:
        """Empty ``waiting``; returns every unfinished sequence (waiting, then running) for the caller to fail. The
        running batch is left as it is: only the engine thread calls this, as it ends, and nothing runs after it."""
        with self.lock:
            seqs = list(self.waiting) + list(self.running)
            self.waiting.clear()
        return seqs

    # ---- the engine thread ------------------------------------------------------------------------

    def expire(self, now: float, timeout: float) -> Expired:
        """Take out the cancelled sequences and those that arrived more than ``timeout`` seconds ago (0: no limit)."""
        waited, ran, cancelled = [], [], []
        with self.lock:
            for seq in list(self.waiting):
                if seq.cancelled.is_set():
                    self.waiting.remove(seq)
                elif timeout and now - seq.arrival > timeout:
                    self.waiting.remove(seq)
                    waited.append(seq)
            for seq in list(self.running):
                if seq.cancelled.is_set():
                    self.free(seq)
                    cancelled.append(seq)
                elif timeout and now - seq.arrival > timeout:
                    self.free(seq)
                    ran.append(seq)
        return Expired(waited, ran, cancelled)

    def decoding(self) -> list[Sequence]:
        """The running sequences past their prefill: this step's decode batch."""
        return [s for s in self.running if not s.prefilling]

    def batch(self) -> list[Sequence]:
        """The running batch (a copy), in admission order."""
        return list(self.running)

    def schedule_prefill(self) -> tuple[list[Sequence], list[Sequence]]:
        """This step's prefill: (the sequences admitted now, every sequence with prompt tokens to run now). Each of the
        latter has ``seq.chunk`` set: its next ``chunk`` tokens from position ``seq.length``."""
        budget = self.max_prefill_tokens
        chunks = []
        for seq in self.running:
            if seq.prefilling and budget > 0:
                seq.chunk = min(seq.prefill_target - seq.length, budget)
                budget -= seq.chunk
                chunks.append(seq)
        admitted = self.admit(budget, first=not chunks)
        return admitted, chunks + admitted

    def admit(self, budget: int, first: bool = True) -> list[Sequence]:
        """Move waiting sequences into the running batch, with blocks for their whole prefill, while ``budget`` prompt
        tokens are left (``first``: nothing else prefills this step); returns them, each with its ``chunk``.

        With prefix caching, a sequence starts with the cached blocks of its longest cached prefix
        (``seq.cached`` positions, always leaving at least one token to compute) and needs blocks and
        prefill budget only for the rest.

        A request for a LoRA adapter also needs one of the ``--max_loras`` slots (``lora.py``); when none is
        free it stays waiting, and so do the LoRA requests behind it (base requests still pass), so that
        slots drain for it instead of being taken over and over by adapters already loaded.
        """
        with self.lock:  # admission reads the LoRA registry, which Engine.add_lora changes under this lock
            admitted: list[Sequence] = []
            skipped: list[Sequence] = []  # LoRA requests waiting for a slot, in queue order
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
                over_budget = budget <= 0 if self.chunked_prefill else n > budget
                if ((admitted or not first) and over_budget) or self.allocator.free - unused - needed < (spare if self.running else 0):
                    break
                self.waiting.popleft()
                seq.lora_slot = self.lora.acquire(lora) if lora is not None else 0
                seq.blocks = self.allocator.take_cached(reusable[:hits]) + self.allocator.allocate(needed)
                seq.cached = seq.length = hits * bs
                seq.prefill_target = len(tokens)
                seq.chunk = min(n, budget) if self.chunked_prefill else n
                budget -= seq.chunk
                self.running.append(seq)
                admitted.append(seq)
            self.waiting.extendleft(reversed(skipped))
            return admitted

    def computed(self, seq: Sequence) -> None:
        """``seq``'s whole prefill ran: its full blocks may now be shared."""
        if self.prefix_caching:
            self.allocator.register(seq.blocks, seq.digests)

    def reserve_decode(self) -> list[Sequence]:
        """Give each decoding sequence the block its next position needs, preempting the newest if the
        pool is empty; returns the preempted sequences (already back at the front of ``waiting``). A sequence
        still prefilling has all its prompt's blocks from admission."""
        with self.lock:
            preempted: list[Sequence] = []
            for seq in list(self.running):
                if seq not in self.running or seq.prefilling:  # preempted below, for an older sequence; or not decoding yet
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
        """``seq`` goes back to the front of ``waiting``, its blocks to the pool (recomputed when re-admitted)."""
        with self.lock:
            self.free(seq)
            seq.length = seq.prefill_target = 0
            self.waiting.appendleft(seq)
            self.preemptions += 1

    def free(self, seq: Sequence) -> None:
        """Take ``seq`` out of the running batch (finished, failed or aborted) and return its blocks."""
        with self.lock:
            if seq in self.running:
                self.running.remove(seq)
            self.allocator.release(seq.blocks)
            seq.blocks = []
            if self.lora is not None and seq.lora_slot:
                self.lora.release(seq.lora_slot)
                seq.lora_slot = 0
