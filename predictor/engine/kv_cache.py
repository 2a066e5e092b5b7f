"""The paged KV cache: fixed-size blocks in one pool per layer, a block table per sequence.

Each layer's keys and values live in a pool of shape (num_blocks, block_size, kv_heads, head_dim);
position p of a sequence is slot ``table[p // block_size] * block_size + p % block_size``. The pool is
sized by memory (``--kv_cache_memory``), not by ``max_num_seqs × max_model_len``: a sequence takes
blocks as it grows and returns them when it leaves, so long contexts cost only what they use.

Block 0 is never handed out: it pads block tables to a common length in a batched gather, takes the
keys of a prefill's padding tokens, and its positions are always masked out. Pools are zero-filled and
only ever hold finite keys and values, so masked positions never bring NaN into attention.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_SIZE = 16
# --kv_cache_memory on CPU when not given: like vLLM's VLLM_CPU_KVCACHE_SPACE (4 GiB), but never more
# than max_num_seqs × max_model_len positions need.
DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30
# On CUDA: this fraction of the device memory free after loading the weights (vLLM: --gpu-memory-utilization).
DEFAULT_CUDA_KV_CACHE_FRACTION = 0.8

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """``"4Gi"``, ``"256Mi"``, ``"512M"``, ``"1073741824"`` → bytes (Kubernetes quantity suffixes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a size: use a number of bytes with an optional unit (Ki, Mi, Gi, K, M, G), e.g. 4Gi")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if value < 1:
        raise ValueError(f"{text!r}: the size must be at least one byte")
    return int(value)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class LayerSpec:
    """What one attention layer stores per position."""

    kv_heads: int
    head_dim: int


def bytes_per_token(layers: list[LayerSpec], dtype: torch.dtype) -> int:
    """Keys and values of one position across every layer."""
    return sum(2 * spec.kv_heads * spec.head_dim for spec in layers) * torch.empty((), dtype=dtype).element_size()


def plan_blocks(budget_bytes: int, per_token: int, max_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """How many blocks (the null block included) the budget holds, capped at what ``max_tokens`` positions need."""
    by_memory = budget_bytes // (per_token * block_size)
    needed = -(-max_tokens // block_size) + 1
    return max(0, min(by_memory, needed))


def block_hashes(tokens: list[int], block_size: int = BLOCK_SIZE, seed: bytes = b"") -> list[bytes]:
    """One digest per full block of ``tokens``, each covering the block's ids and every block before it.

    ``seed`` starts the chain: what else the keys and values depend on (the LoRA adapter, ``lora.hash_seed``)."""
    digests, previous = [], seed
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        previous = hashlib.blake2b(previous + array("q", block).tobytes(), digest_size=16).digest()
        digests.append(previous)
    return digests


class BlockAllocator:
    """Block ids with reference counts; block 0 is reserved. Only the engine thread calls it.

    Prefix caching: a full block registered with its ``block_hashes`` digest can be shared by every later
    sequence whose tokens start the same way. When no sequence uses a cached block any more it stays
    cached but counts as free; allocation takes never-cached blocks first, then evicts cached ones least
    recently released first.
    """

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._refs: dict[int, int] = {}
        self._block_of: dict[bytes, int] = {}
        self._digest_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached and unused, oldest first

    @property
    def capacity(self) -> int:
        """Usable blocks (all but the null block)."""
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        return self.capacity - self.free

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.free:
            raise MemoryError(f"{n} KV-cache blocks asked, {self.free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._digest_of.pop(block)]
            self._refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # a sequence's last blocks become the first evicted: prefixes last longer
            self._refs[block] -= 1
            if self._refs[block] == 0:
                del self._refs[block]
                if block in self._digest_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def cached_prefix(self, digests: list[bytes]) -> tuple[int, int]:
        """How many leading ``digests`` are cached, and how many of those blocks are unused (counted as free)."""
        hits = unused = 0
        for digest in digests:
            block = self._block_of.get(digest)
            if block is None:
                break
            hits += 1
            unused += block in self._evictable
        return hits, unused

    def take_cached(self, digests: list[bytes]) -> list[int]:
        """The cached blocks of ``digests`` (all cached: see ``cached_prefix``), each referenced once more."""
        blocks = [self._block_of[d] for d in digests]
        for block in blocks:
            self._evictable.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1
        return blocks

    def register(self, blocks: list[int], digests: list[bytes]) -> None:
        """Make full, computed ``blocks`` findable by their digests (the first block of a digest wins)."""
        for block, digest in zip(blocks, digests):
            if digest not in self._block_of and block not in self._digest_of:
                self._block_of[digest] = block
                self._digest_of[block] = digest


class PagedKVCache:
    """The per-layer pools. ``write`` stores new positions by slot, ``gather`` reads whole sequences by block table."""

    def __init__(self, layers: list[LayerSpec], num_blocks: int, dtype: torch.dtype, device: torch.device, block_size: int = BLOCK_SIZE):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.k = [torch.zeros(num_blocks, block_size, s.kv_heads, s.head_dim, dtype=dtype, device=device) for s in layers]
        self.v = [torch.zeros(num_blocks, block_size, s.kv_heads, s.head_dim, dtype=dtype, device=device) for s in layers]
        # Gathered keys and values land in buffers reused by every layer and step: a fresh multi-MB tensor per
        # layer would be a fresh mmap (see predictor/memory.py), and those page faults cost more than the copy.
        self._scratch: dict[torch.Size, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (N, kv_heads, head_dim) for the N slots in ``slots`` (N,)."""
        pool_k, pool_v = self.k[layer], self.v[layer]
        pool_k.view(-1, *pool_k.shape[2:]).index_copy_(0, slots, k)
        pool_v.view(-1, *pool_v.shape[2:]).index_copy_(0, slots, v)

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tables: (B, nb) block ids → keys, values (B, kv_heads, nb * block_size, head_dim)."""
        B, nb = tables.shape
        flat = tables.reshape(-1)
        pool_k, pool_v = self.k[layer], self.v[layer]
        key = pool_k.shape[2:]
        n = B * nb
        k, v = self._scratch.get(key, (None, None))
        if k is None or k.shape[0] < n:  # grows only past the largest gather so far
            k, v = pool_k.new_empty(n, *pool_k.shape[1:]), pool_v.new_empty(n, *pool_v.shape[1:])
            self._scratch[key] = (k, v)
        k, v = k[:n], v[:n]
        torch.index_select(pool_k, 0, flat, out=k)  # (B * nb, bs, KVH, D)
        torch.index_select(pool_v, 0, flat, out=v)
        return k.view(B, nb * self.block_size, *k.shape[2:]).transpose(1, 2), v.view(B, nb * self.block_size, *v.shape[2:]).transpose(1, 2)
