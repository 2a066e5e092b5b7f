"""The preallocated KV cache: one (max_num_seqs, max_model_len, heads, head_dim) tensor pair per layer.

Memory is fixed at start-up by ``--max_num_seqs`` and ``--max_model_len``, never by traffic. Running
sequences always occupy rows ``0 .. B-1``; when one leaves, the last row moves into its place, so a
decode step attends over the view ``k[:B, :L]`` without gathering. Position-major rows make each new
token's keys one contiguous (heads × head_dim) block, written with a single ``index_copy_``.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, max_seqs: int, n_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (max_seqs, max_len, n_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_seqs = max_seqs
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions into row ``dst`` (every layer)."""
        for k, v in zip(self.k, self.v):
            k[dst, :length] = k[src, :length]
            v[dst, :length] = v[src, :length]

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one new token per row: k, v (B, heads, head_dim) at (rows[b], positions[b])."""
        flat = rows * self.max_len + positions  # index into the (max_seqs * max_len) flattened rows
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, flat, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, flat, v)
