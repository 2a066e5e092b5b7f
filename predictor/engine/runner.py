"""Model runners: prefill new sequences, then run one batched decode step over every running sequence.

Tensors and devices live here and nowhere else; the engine passes token ids and row numbers in and
gets logits out. Rows are the KV cache rows of ``kv_cache.py``: running sequences occupy rows 0..B-1.

``GPT2Runner`` is the fast path (GPT-2 family: the demo model, GPT-2 and its pruned, distilled or
quantized variants). It calls the model's own modules for every projection, layer norm and MLP, so a
quantized module works unchanged, and does attention itself over the preallocated cache with per-row
positions and masks. On CPU its projections are first prepacked for oneDNN (``packing.py``); the
runner owns the model from then on. ``HFRunner`` serves any other causal LM through its own ``forward`` and a cache per
sequence: correct, but its decode runs row by row. ``OnnxRunner`` runs an exported graph with ONNX
Runtime (``predictor.onnx_model``), also row by row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from ..onnx_model import OnnxModel
from .kv_cache import KVCache
from .packing import can_pack, pack_gpt2

# Prefill lengths are padded up to a multiple of this, so that oneDNN meets few distinct shapes: each new
# shape builds (and caches) new kernels, and unbounded shape variety would grow memory with traffic.
PREFILL_BUCKET = 16


class ModelRunner(ABC):
    @abstractmethod
    def prefill(self, rows: list[int], prompts: list[list[int]], all_logits: list[bool]) -> list[torch.Tensor]:
        """Run new prompts into ``rows``; per prompt, logits (len, V) if ``all_logits`` else (1, V)."""

    @abstractmethod
    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """Feed ``tokens[b]`` at position ``lengths[b]`` of row b (b = 0..B-1); return logits (B, V)."""

    @abstractmethod
    def move(self, src: int, dst: int, length: int) -> None:
        """Row ``src`` now lives in row ``dst`` (``length`` positions filled)."""

    @abstractmethod
    def release(self, row: int) -> None:
        """Row ``row`` is free (its sequence left and no other row moved into it)."""

    def usage(self, lengths: list[int]) -> float:
        """Fraction of the KV cache holding live positions."""
        return 0.0


def make_runner(model: PreTrainedModel | OnnxModel, max_num_seqs: int, max_model_len: int, device: torch.device) -> ModelRunner:
    if isinstance(model, OnnxModel):
        return OnnxRunner(model)
    if GPT2Runner.supports(model):
        return GPT2Runner(model, max_num_seqs, max_model_len, device)
    return HFRunner(model, device)


class GPT2Runner(ModelRunner):
    def __init__(self, model: PreTrainedModel, max_num_seqs: int, max_model_len: int, device: torch.device):
        cfg = model.config
        self.model = model
        self.tr = model.transformer
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.device = device
        dtype = next(model.parameters()).dtype
        if not dtype.is_floating_point:  # quantized weights: activations stay float32
            dtype = torch.float32
        self.cache = KVCache(cfg.n_layer, max_num_seqs, cfg.n_head, max_model_len, self.head_dim, dtype, device)
        self.packed = pack_gpt2(model, max_num_seqs) if can_pack(device, dtype) else 0

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        cfg = model.config
        return (
            cfg.model_type == "gpt2"
            and hasattr(model, "transformer")
            and not getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
            and not getattr(cfg, "reorder_and_upcast_attn", False)
            and getattr(cfg, "scale_attn_weights", True)
        )

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, C) -> (B, H, T, D)
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    @torch.inference_mode()
    def prefill(self, rows: list[int], prompts: list[list[int]], all_logits: list[bool]) -> list[torch.Tensor]:
        lengths = [len(p) for p in prompts]
        T = min(-(-max(lengths) // PREFILL_BUCKET) * PREFILL_BUCKET, self.cache.max_len)
        padded = [p + [0] * (T - len(p)) for p in prompts]  # right padding: causal attention never sees it
        input_ids = torch.tensor(padded, device=self.device)  # (N, T)
        positions = torch.arange(T, device=self.device).expand(len(prompts), T)
        row_idx = torch.tensor(rows, device=self.device)
        x = self.tr.wte(input_ids) + self.tr.wpe(positions)  # (N, T, C)
        for i, block in enumerate(self.tr.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(x.shape[-1], dim=2)
            q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)  # (N, H, T, D)
            self.cache.k[i][row_idx, :T] = k.transpose(1, 2)  # cache rows are (T, H, D)
            self.cache.v[i][row_idx, :T] = v.transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (N, H, T, D)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(x.shape))
            x = x + block.mlp(block.ln_2(x))
        x = self.tr.ln_f(x)
        out = []
        for n, (length, every) in enumerate(zip(lengths, all_logits)):
            h = x[n, :length] if every else x[n, length - 1 : length]
            out.append(self.model.lm_head(h).float())
        return out

    @torch.inference_mode()
    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        B = len(tokens)
        L = max(lengths) + 1
        input_ids = torch.tensor(tokens, device=self.device).unsqueeze(1)  # (B, 1)
        pos = torch.tensor(lengths, device=self.device)  # (B,)
        rows = torch.arange(B, device=self.device)
        # (B, 1, 1, L): row b attends to its own positions 0..lengths[b]
        mask = (torch.arange(L, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
        x = self.tr.wte(input_ids) + self.tr.wpe(pos.unsqueeze(1))  # (B, 1, C)
        for i, block in enumerate(self.tr.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(x.shape[-1], dim=2)
            q = self._split_heads(q)  # (B, H, 1, D)
            self.cache.write(i, rows, pos, k.view(B, self.n_head, self.head_dim), v.view(B, self.n_head, self.head_dim))
            keys = self.cache.k[i][:B, :L].transpose(1, 2)  # (B, H, L, D), a view
            values = self.cache.v[i][:B, :L].transpose(1, 2)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, 1, D)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, 1, -1))
            x = x + block.mlp(block.ln_2(x))
        return self.model.lm_head(self.tr.ln_f(x))[:, 0].float()  # (B, V)

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    def release(self, row: int) -> None:
        """Nothing to free: the row's cache is overwritten by its next prefill."""

    def usage(self, lengths: list[int]) -> float:
        return sum(lengths) / (self.cache.max_seqs * self.cache.max_len)


class HFRunner(ModelRunner):
    """Any causal LM through its own forward, one ``DynamicCache`` per row."""

    def __init__(self, model: PreTrainedModel, device: torch.device):
        self.model = model
        self.device = device
        self.caches: dict[int, DynamicCache] = {}

    @torch.inference_mode()
    def prefill(self, rows: list[int], prompts: list[list[int]], all_logits: list[bool]) -> list[torch.Tensor]:
        out = []
        for row, prompt, every in zip(rows, prompts, all_logits):
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([prompt], device=self.device)
            logits = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=0 if every else 1).logits[0]
            self.caches[row] = cache
            out.append(logits.float())
        return out

    @torch.inference_mode()
    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        rows = []
        for b, token in enumerate(tokens):
            ids = torch.tensor([[token]], device=self.device)
            rows.append(self.model(input_ids=ids, cache=self.caches[b], use_cache=True).logits[0, -1].float())
        return torch.stack(rows)

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst] = self.caches.pop(src)

    def release(self, row: int) -> None:
        self.caches.pop(row, None)


class OnnxRunner(ModelRunner):
    """An ONNX Runtime session; each row keeps its own cache arrays (with the placeholder position 0)."""

    def __init__(self, model: OnnxModel):
        self.model = model
        self.rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def prefill(self, rows: list[int], prompts: list[list[int]], all_logits: list[bool]) -> list[torch.Tensor]:
        out = []
        for row, prompt, every in zip(rows, prompts, all_logits):
            T = len(prompt)
            keys, values = self.model.empty_cache(1)
            mask = np.ones((1, T + 1), dtype=np.int64)
            mask[0, 0] = 0
            logits, keys, values = self.model.run(np.array([prompt]), np.arange(T)[None], mask, keys, values)
            self.rows[row] = (keys, values)
            out.append(torch.from_numpy(logits[0] if every else logits[0, -1:]).float())
        return out

    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        out = []
        for b, (token, length) in enumerate(zip(tokens, lengths)):
            keys, values = self.rows[b]
            mask = np.ones((1, length + 2), dtype=np.int64)  # placeholder + length cached + the new token
            mask[0, 0] = 0
            logits, keys, values = self.model.run(np.array([[token]]), np.array([[length]]), mask, keys, values)
            self.rows[b] = (keys, values)
            out.append(torch.from_numpy(logits[0, -1]))
        return torch.stack(out).float()

    def move(self, src: int, dst: int, length: int) -> None:
        self.rows[dst] = self.rows.pop(src)

    def release(self, row: int) -> None:
        self.rows.pop(row, None)
