"""The preallocated KV cache: one (max_num_seqs, heads, max_model_len, head_dim) tensor pair per layer.

Memory is fixed at start-up by ``--max_num_seqs`` and ``--max_model_len``, never by traffic. Running
sequences always occupy rows ``0 .. B-1``; when one leaves, the last row moves into its place, so a
decode step attends over the contiguous view ``k[:B, :, :L]`` without gathering.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, max_seqs: int, n_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (max_seqs, n_heads, max_len, head_dim)
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
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
