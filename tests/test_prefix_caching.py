"""Automatic prefix caching: shared full blocks are reused, counted, evicted least recently used, and
greedy output is the same as without it (and as ``model.generate``)."""

from __future__ import annotations

import pytest
from conftest import start_server, stop_server
from test_model_families import build_model, complete, metric, reference
from transformers import AutoConfig

from predictor.engine.kv_cache import BlockAllocator, block_hashes

BS = 16


def test_allocator_shares_registered_blocks_and_evicts_unused_ones_oldest_first():
    allocator = BlockAllocator(num_blocks=5, block_size=BS)  # 4 usable
    tokens = list(range(3 * BS))
    digests = block_hashes(tokens, BS)
    assert len(digests) == 3 and block_hashes(tokens[:BS] + [999] * BS, BS)[0] == digests[0] != block_hashes([999] * BS, BS)[0]
    first = allocator.allocate(3)
    allocator.register(first, digests)
    assert allocator.cached_prefix(digests) == (3, 0)
    shared = allocator.take_cached(digests[:2])
    assert shared == first[:2] and allocator.free == 1
    allocator.release(first)  # the first sequence leaves: its third block is unused but stays cached
    assert allocator.free == 2 and allocator.cached_prefix(digests) == (3, 1)
    allocator.allocate(1)  # the never-cached block goes first
    assert allocator.cached_prefix(digests) == (3, 1)
    allocator.allocate(1)  # then the unused cached block is evicted
    assert allocator.cached_prefix(digests) == (2, 0)
    with pytest.raises(MemoryError):
        allocator.allocate(1)  # blocks in use are never evicted
    allocator.release(shared)
    assert allocator.free == 2 and allocator.cached_prefix(digests) == (2, 2)


@pytest.mark.parametrize("kind", ["gpt2", "mistral"])  # mistral: the shared prefix is longer than its sliding window
def test_prefix_cache_hits_and_greedy_output_is_unchanged(kind, tiny_model_dir, tmp_path_factory, tmp_path):
    source = build_model(kind, tmp_path_factory.mktemp("prefix") / kind, tiny_model_dir)
    vocab = AutoConfig.from_pretrained(source).vocab_size
    system = [(7 * i + 3) % vocab for i in range(40)]  # a shared 40-token "system prompt": 2 full blocks
    prompts = [system + [(11 * i + j) % vocab for j in range(3 + i)] for i in range(6)]
    expected = reference(source, prompts)
    on = start_server(source, tmp_path, "--max_num_seqs", "4", name="m")
    try:
        assert "prefix caching: on" in on.read_log()
        q0, h0 = metric(on.url, "vllm:prefix_cache_queries_total"), metric(on.url, "vllm:prefix_cache_hits_total")  # the warm-up
        assert complete(on.url, prompts[:1]) == expected[:1]  # fills the cache
        assert complete(on.url, prompts, together=True) == expected
        assert complete(on.url, prompts, together=False) == expected
        queries = metric(on.url, "vllm:prefix_cache_queries_total") - q0
        hits = metric(on.url, "vllm:prefix_cache_hits_total") - h0
        assert queries == sum(len(p) for p in prompts[:1] + prompts + prompts)
        assert hits >= 2 * BS * (len(prompts) + 5)  # at least the later requests of each round reuse both system blocks
    finally:
        stop_server(on)
    off = start_server(source, tmp_path, "--max_num_seqs", "4", "--no_enable_prefix_caching", name="m")
    try:
        assert "prefix caching: off" in off.read_log()
        assert complete(off.url, prompts, together=True) == expected
        assert metric(off.url, "vllm:prefix_cache_hits_total") == 0
    finally:
        stop_server(off)
