"""Prepack a model's projection weights for oneDNN on CPU, with the MLP activation fused where oneDNN can.

A decode step is a handful of skinny matrix products (batch × width against width × width). With the
weights reordered once into oneDNN's blocked layout, these run markedly faster on this project's CPUs
than ``addmm`` (see the README's benchmark section); fusing the MLP's activation into its first
projection saves one pass over the widest activations. These are the oneDNN operators
``torch.compile`` itself emits for frozen linear layers on CPU.

Every float32 or bfloat16 ``nn.Linear`` and GPT-2 ``Conv1D`` is packed (q/k/v/o, MLP, LM head); quantized or
other modules are left as they are. bfloat16 is packed only where oneDNN runs it natively (AMX or AVX512-BF16:
``loading.resolve_dtype`` chooses bfloat16 there); there the packed bfloat16 products measured 1.6-2.8x the packed
float32 ones on this project's AMD EPYC (decode shapes of SmolLM2, batch 1 and 16). Activation fusion is tried on the MLP shapes the field uses (GPT-2's
``c_fc → act``, GPT-NeoX's ``dense_h_to_4h → act``, the gated ``act_fn(gate_proj(x)) * up_proj(x)``)
and kept only where the fused MLP gives the unfused MLP's output on a probe input.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import activations
from transformers.pytorch_utils import Conv1D

# activation module type → (oneDNN post-op, algorithm)
_FUSABLE: dict[type, tuple[str, str]] = {
    nn.SiLU: ("swish", ""),
    activations.SiLUActivation: ("swish", ""),
    activations.GELUTanh: ("gelu", "tanh"),
    activations.NewGELUActivation: ("gelu", "tanh"),
    activations.FastGELUActivation: ("gelu", "tanh"),
    activations.GELUActivation: ("gelu", "none"),
    nn.GELU: ("gelu", "none"),
    nn.ReLU: ("relu", ""),
}
# (projection whose output the activation reads, activation attribute) per MLP shape
_MLP_SHAPES = (("gate_proj", "act_fn"), ("c_fc", "act"), ("dense_h_to_4h", "act"))


PACKABLE = (torch.float32, torch.bfloat16)
# How far the fused MLP may move from the unfused one, relative to the output's scale: oneDNN's activation kernels
# round differently from torch's (float32), and bfloat16 keeps 8 bits of mantissa (its rounding step is 2^-8).
FUSION_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in PACKABLE
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class PackedLinear(nn.Module):
    """``y = act(x @ W.T + b)`` with W in oneDNN's layout. x: (..., in) dense, W's dtype → (..., out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_size: int, post_op: tuple[str, str] = ("none", "")):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_size))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.attr, self.algorithm = post_op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.attr, [], self.algorithm)

    def with_post_op(self, post_op: tuple[str, str]) -> PackedLinear:
        fused = PackedLinear.__new__(PackedLinear)
        nn.Module.__init__(fused)
        fused.out_features, fused.in_features = self.out_features, self.in_features
        fused.register_buffer("weight", self.weight)
        fused.register_buffer("bias", self.bias)
        fused.attr, fused.algorithm = post_op
        return fused


def _packed(module: nn.Module, batch_size: int, dtype: torch.dtype) -> nn.Module:
    if isinstance(module, Conv1D) and module.weight.dtype == dtype:
        return PackedLinear(module.weight.t(), module.bias, batch_size)  # Conv1D keeps (in, out)
    if type(module) is nn.Linear and module.weight.dtype == dtype:
        return PackedLinear(module.weight, module.bias, batch_size)
    return module


def _fuse_activation(mlp: nn.Module, proj_name: str, act_name: str, dtype: torch.dtype) -> bool:
    """Move ``mlp.<act_name>`` into ``mlp.<proj_name>`` if that leaves the MLP's output unchanged."""
    proj, act = getattr(mlp, proj_name), getattr(mlp, act_name)
    post_op = _FUSABLE.get(type(act))
    if not isinstance(proj, PackedLinear) or post_op is None:
        return False
    probe = torch.randn(4, proj.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = mlp(probe).float()
    setattr(mlp, proj_name, proj.with_post_op(post_op))
    setattr(mlp, act_name, nn.Identity())
    if (mlp(probe).float() - expected).abs().max() <= FUSION_TOLERANCE[dtype] * expected.abs().max():
        return True
    setattr(mlp, proj_name, proj)  # this MLP uses its activation elsewhere: undo
    setattr(mlp, act_name, act)
    return False


@torch.no_grad()
def pack_model(model: nn.Module, batch_size: int, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """Pack every ``dtype`` projection in place and fuse MLP activations; returns (packed, fused) counts.

    ``batch_size`` is the row count oneDNN optimises the layout for (the decode batch).
    """
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _packed(child, batch_size, dtype)
            if new is not child:
                setattr(parent, name, new)
                packed += 1
    fused = 0
    for module in model.modules():
        for proj_name, act_name in _MLP_SHAPES:
            if hasattr(module, proj_name) and hasattr(module, act_name):
                fused += _fuse_activation(module, proj_name, act_name, dtype)
    return packed, fused
