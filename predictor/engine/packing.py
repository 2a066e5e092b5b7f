"""Prepack a GPT-2's projection weights for oneDNN on CPU.

A decode step is a handful of skinny matrix products (batch × width against width × width). With the
weights reordered once into oneDNN's blocked layout, and GELU fused into the MLP's first projection,
those run about 1.6× faster on this project's CPUs than ``addmm`` on GPT-2's ``Conv1D`` (see the README's
benchmark section). These are the oneDNN operators ``torch.compile`` itself emits for frozen linear
layers on CPU. Only float32 ``Conv1D`` and ``nn.Linear`` modules are packed; quantized or other modules
are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# GPT-2's activation names that are GELU with the tanh approximation, which oneDNN can fuse.
_TANH_GELU = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    """``y = act(x @ W.T + b)`` with W in oneDNN's layout. x: (..., in) dense float32 → (..., out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_size: int, gelu_tanh: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_size))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.attr, self.algorithm = ("gelu", "tanh") if gelu_tanh else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.attr, [], self.algorithm)


def _packed(module: nn.Module, batch_size: int, gelu_tanh: bool = False) -> nn.Module:
    if isinstance(module, Conv1D) and module.weight.dtype == torch.float32:
        return PackedLinear(module.weight.t(), module.bias, batch_size, gelu_tanh)  # Conv1D keeps (in, out)
    if type(module) is nn.Linear and module.weight.dtype == torch.float32:
        return PackedLinear(module.weight, module.bias, batch_size, gelu_tanh)
    return module


@torch.no_grad()
def pack_gpt2(model: nn.Module, batch_size: int) -> int:
    """Pack the blocks' projections and the LM head in place; returns how many modules were packed.

    ``batch_size`` is the row count oneDNN optimises the layout for (the decode batch).
    """
    fuse_gelu = getattr(model.config, "activation_function", "") in _TANH_GELU
    count = 0
    for block in model.transformer.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_proj")):
            new = _packed(getattr(parent, name), batch_size)
            count += new is not getattr(parent, name)
            setattr(parent, name, new)
        fc = _packed(block.mlp.c_fc, batch_size, gelu_tanh=fuse_gelu)
        if fc is not block.mlp.c_fc:
            count += 1
            block.mlp.c_fc = fc
            if fuse_gelu:
                block.mlp.act = nn.Identity()  # now inside c_fc
    head = _packed(model.lm_head, batch_size)
    count += head is not model.lm_head
    model.lm_head = head
    return count
