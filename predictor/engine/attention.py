"""Attention over the paged KV cache, plugged into any transformers model through ``AttentionInterface``.

The model's own modules project, normalise and rotate; at each attention layer transformers calls
``paged_attention`` (registered as ``ATTN_IMPLEMENTATION``) with that layer's queries and new keys and
values, and with the step's ``StepBatch`` passed through the forward's keyword arguments. The model
sees one flat row of tokens: every sequence's new tokens side by side, (1, N), each with its own position.

- prefill: each sequence's new tokens attend causally to themselves (and, when it already has cached
  positions, to those first): on a CPU with AVX512-BF16, in bfloat16, by a flash-attention operator that reads every
  position from the block pools (``paged_ops.prefill_attention``, all of a step's sequences in one call), elsewhere
  by SDPA per sequence, over its keys gathered from the pools when it has cached positions;
- decode: one token per sequence, (B,) rows, each attending to its sequence's cached positions: on CPU by a
  C++ operator that reads them where they are in the block pools (``paged_ops.py``, built once per machine),
  elsewhere (or without a compiler) by gathering them into a buffer for SDPA;
- a mixed step (vLLM V1's): prefill chunks first, then the decoding sequences' tokens from ``decode_from`` on, in
  one forward, so a step that prefills does not run the model twice.

Variants come from the model: ``scaling``, ``sliding_window`` (per layer), ``softcap`` (Gemma 2), and
grouped-query attention (the cache holds KV heads only; SDPA broadcasts them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from . import paged_ops
from .kv_cache import LayerSpec, PagedKVCache

ATTN_IMPLEMENTATION = "kserve_llm_paged"


@dataclass
class StepBatch:
    """One forward's batch layout; built by the runner, read by every layer.

    ``query_starts[i]:query_starts[i+1]`` are prefilling sequence i's tokens in the flat row; ``slots`` where every
    token's keys and values go in the pools. The decoding sequences' tokens (all of them in a decode step, from
    ``decode_from`` on in a mixed step) come with their padded block tables (B, nb) and last positions (B,).
    """

    cache: PagedKVCache | None
    decode: bool  # only decoding sequences, one token each
    slots: torch.Tensor  # (N,)
    query_starts: list[int]
    start_positions: list[int]  # first new position per prefilling sequence (0 unless part of it is cached)
    block_tables: torch.Tensor | None = None  # (B, nb) of the decoding sequences
    last_positions: torch.Tensor | None = None  # (B,)
    prefill_tables: torch.Tensor | None = None  # (P, nb) of the prefilling sequences, when some have cached positions
    decode_from: int | None = None  # a mixed step: where the decoding sequences' tokens start in the flat row
    probe: dict[int, LayerSpec] | None = None  # set for the start-up probe: record each layer's shapes
    context_lens: torch.Tensor | None = None  # (B,) last_positions + 1, for the native decode operator
    native_decode: bool = False  # decode attention by paged_ops (the runner checked it is built and takes this dtype)
    # Prefill attention by paged_ops (the runner checked the build, dtype and head sizes): every prefilling sequence's
    # query_starts and start_positions as tensors, and prefill_tables for all of them (the padding's: block 0).
    native_prefill: bool = False
    prefill_query_starts: torch.Tensor | None = None  # (P + 1,)
    prefill_start_positions: torch.Tensor | None = None  # (P,)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, 1, L) True where a decoding sequence may attend: its positions, within ``window`` if set."""
        if window not in self._masks:
            L = self.block_tables.shape[1] * self.cache.block_size
            kv = torch.arange(L, device=self.last_positions.device)[None, :]
            last = self.last_positions[:, None]
            allowed = kv <= last
            if window is not None:
                allowed &= kv > last - window
            self._masks[window] = allowed[:, None, None, :]
        return self._masks[window]


def _window(sliding_window: int | None) -> int | None:
    return sliding_window if sliding_window and sliding_window > 0 else None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float | None, softcap: float | None) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, KVH, S, D), mask (B|1, 1, T, S) bool or None for plain causal → (B, H, T, D)."""
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
    # Logit soft-capping (Gemma 2) has no SDPA kernel: the plain computation.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def _causal_mask(T: int, start: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """(1, 1, T, start + T) for T new tokens after ``start`` cached ones; None when plain causal suffices."""
    if start == 0 and (window is None or window >= T):
        return None
    q = torch.arange(start, start + T, device=device)[:, None]
    kv = torch.arange(start + T, device=device)[None, :]
    allowed = kv <= q
    if window is not None:
        allowed &= kv > q - window
    return allowed[None, None]


def paged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    step_batch: StepBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (1, H, N, D), key and value (1, KVH, N, D) → attention output (1, N, H, D)."""
    if step_batch is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION} attention needs the engine's step_batch; this model is owned by the engine's runner")
    batch = step_batch
    layer = module.layer_idx
    window = _window(sliding_window)
    if batch.probe is not None:
        batch.probe[layer] = LayerSpec(kv_heads=key.shape[1], head_dim=key.shape[3])
        return _attend(query, key, value, None, scaling, softcap).transpose(1, 2), None
    k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)  # (N, KVH, D)
    batch.cache.write(layer, batch.slots, k_new, v_new)
    if batch.decode:
        return _decode_attention(query, batch, layer, window, scaling, softcap), None
    if batch.native_prefill and softcap is None:
        P = batch.query_starts[-1]
        prefilled = paged_ops.prefill_attention(
            query[0, :, :P].transpose(0, 1),
            batch.cache.k[layer],
            batch.cache.v[layer],
            batch.prefill_query_starts,
            batch.prefill_start_positions,
            batch.prefill_tables,
            scaling,
            window,
        ).unsqueeze(0)  # (1, P, H, D)
    else:
        prefilled = _prefill_attention(query, key, value, batch, layer, window, scaling, softcap)
    if batch.decode_from is None:
        return prefilled, None
    decoded = _decode_attention(query[:, :, batch.decode_from :], batch, layer, window, scaling, softcap)  # (1, B, H, D)
    return torch.cat([prefilled, decoded], dim=1), None  # (1, N, H, D)


def _prefill_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: StepBatch, layer: int, window: int | None, scaling: float | None, softcap: float | None
) -> torch.Tensor:
    """The prefilling sequences' queries (1, H, N, D) by SDPA, one sequence at a time → (1, P, H, D)."""
    outs = []
    for i, start in enumerate(batch.start_positions):
        a, b = batch.query_starts[i], batch.query_starts[i + 1]
        q = query[:, :, a:b]  # (1, H, T, D)
        if start == 0:
            k, v = key[:, :, a:b], value[:, :, a:b]
        else:
            nb = -(-(start + b - a) // batch.cache.block_size)
            k, v = batch.cache.gather(layer, batch.prefill_tables[i : i + 1, :nb])
            k, v = k[:, :, : start + b - a], v[:, :, : start + b - a]
        outs.append(_attend(q, k, v, _causal_mask(b - a, start, window, query.device), scaling, softcap))
    return torch.cat(outs, dim=2).transpose(1, 2)  # (1, P, H, D)


def _decode_attention(
    query: torch.Tensor, batch: StepBatch, layer: int, window: int | None, scaling: float | None, softcap: float | None
) -> torch.Tensor:
    """The decoding sequences' queries (1, H, B, D), one token each, over their cached positions → (1, B, H, D)."""
    B, H, D = query.shape[2], query.shape[1], query.shape[3]
    if batch.native_decode:  # straight from the pools: no gather, no mask
        out = paged_ops.decode_attention(
            query[0].transpose(0, 1), batch.cache.k[layer], batch.cache.v[layer], batch.block_tables, batch.context_lens, scaling, window, softcap
        )  # (B, H, D)
        return out.reshape(1, B, H, D)
    k, v = batch.cache.gather(layer, batch.block_tables)  # (B, KVH, L, D)
    mask = batch.decode_mask(window)  # (B, 1, 1, L)
    if softcap is None and k.shape[1] != H:
        # Grouped-query decode: each KV head's G query heads become G "query positions" of that head,
        # which share one mask; plain SDPA without enable_gqa's expansion (measured ~15% faster).
        q = query[0].transpose(0, 1).reshape(B, k.shape[1], H // k.shape[1], D)  # (B, KVH, G, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    else:
        out = _attend(query[0].transpose(0, 1).unsqueeze(2), k, v, mask, scaling, softcap)  # (B, H, 1, D)
    return out.reshape(1, B, H, D)


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
