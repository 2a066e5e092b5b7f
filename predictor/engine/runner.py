"""The model runner: prefill a prompt, then decode one token at a time over the model's KV cache.

Tensors and devices live here and nowhere else; the engine passes token ids in and gets logits out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass
class Sequence:
    """A sequence's state on the device: its KV cache (filled in place by each forward) and its length."""

    cache: DynamicCache
    length: int


class ModelRunner:
    """Runs a causal LM forward pass for prefill and for single-token decode steps."""

    def __init__(self, model: PreTrainedModel, device: torch.device):
        self.model = model
        self.device = device

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int], all_logits: bool = False) -> tuple[torch.Tensor, Sequence]:
        """Run the prompt; return logits (len(prompt), V) if ``all_logits`` else (1, V), and the new sequence."""
        input_ids = torch.tensor([prompt_ids], device=self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=0 if all_logits else 1)
        return out.logits[0].float(), Sequence(cache=cache, length=len(prompt_ids))

    @torch.inference_mode()
    def decode(self, token_id: int, seq: Sequence) -> torch.Tensor:
        """Feed one token; return the next-token logits (1, V)."""
        input_ids = torch.tensor([[token_id]], device=self.device)
        out = self.model(input_ids=input_ids, cache=seq.cache, use_cache=True)
        seq.length += 1
        return out.logits[0, -1:].float()
