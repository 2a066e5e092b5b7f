"""Prepack a model's projection weights for oneDNN on CPU, with the MLP activation fused where oneDNN can.

A decode step is a handful of skinny matrix products (batch × width against width × width). With the
weights reordered once into oneDNN's blocked layout, these run markedly faster on this project's CPUs
than ``addmm`` (see the README's benchmark section); fusing the MLP's activation into its first
projection saves one pass over the widest activations. These are the oneDNN operators
``torch.compile`` itself emits for frozen linear layers on CPU.

Every float32 or bfloat16 ``nn.Linear`` and GPT-2 ``Conv1D`` is packed (q/k/v/o, MLP, LM head); other modules are
left as they are, except that int8 siblings (``quantized.Int8Linear``, one smoothing vector) are shared as one product
too. bfloat16 is packed only where oneDNN runs it natively (AMX or AVX512-BF16:
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

from .. import opaque_ops
from ..quantized import Int8Linear, concatenate

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
        self.handle = opaque_ops.register(self)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.attr, [], self.algorithm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inside a compiled step: an opaque operator (compiled_step.py)
            return opaque_ops.packed_linear(x, self.handle)
        return self.product(x)

    def with_post_op(self, post_op: tuple[str, str]) -> PackedLinear:
        fused = PackedLinear.__new__(PackedLinear)
        nn.Module.__init__(fused)
        fused.out_features, fused.in_features = self.out_features, self.in_features
        fused.register_buffer("weight", self.weight)
        fused.register_buffer("bias", self.bias)
        fused.attr, fused.algorithm = post_op
        fused.handle = opaque_ops.register(fused)
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


# Sibling projections that read the same input, fused into one product (one oneDNN call instead of three or two):
# measured here for SmolLM2's shapes, q+k+v 104 µs as three calls against 73 µs as one at one row, gate+up 152 against
# 86 µs; at 16 rows gate+up 292 against 201 µs.
_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _SharedOutput:
    """The fused product of the last input, until every sibling has taken its slice (then dropped)."""

    def __init__(self, fused: PackedLinear | Int8Linear, siblings: int):
        self.fused, self.siblings = fused, siblings
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.taken = 0

    def slice(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if x is not self.input:
            self.input, self.output, self.taken = x, self.fused(x), 0
        out = self.output[..., start:end]
        self.taken += 1
        if self.taken == self.siblings:
            self.input = self.output = None
        return out


class SharedProjection(nn.Module):
    """One of several projections of the same input computed as one product: ``y = (x @ [W1; W2; ...].T)[..., a:b]``.

    The first sibling called on an input computes the fused product; the others, called on the same tensor (as
    transformers' attention and gated MLPs do: ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)``), take their slices of
    it. Called on another tensor, a sibling computes the product anew, so the result is right whatever the order.
    """

    def __init__(self, shared: _SharedOutput, start: int, end: int):
        super().__init__()
        self.shared, self.start, self.end = shared, start, end
        self.in_features, self.out_features = shared.fused.in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.slice(x, self.start, self.end)


def _share(parent: nn.Module, names: tuple[str, ...], batch_size: int, dtype: torch.dtype) -> bool:
    """Replace ``parent``'s sibling ``nn.Linear``s ``names`` by slices of one packed product, if they take the same input
    size and agree on bias, and the parent's output is unchanged on a probe input."""
    linears = [getattr(parent, name, None) for name in names]
    if all(isinstance(m, Int8Linear) for m in linears):
        fused = concatenate(linears)  # one int8 product (same input, same smoothing)
    elif all(type(m) is nn.Linear and m.weight.dtype == dtype for m in linears):
        if len({m.in_features for m in linears}) != 1 or len({m.bias is None for m in linears}) != 1:
            return False
        weight = torch.cat([m.weight for m in linears])
        bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
        fused = PackedLinear(weight, bias, batch_size)
    else:
        return False
    if fused is None:
        return False
    shared = _SharedOutput(fused, len(names))
    probe = torch.randn(4, linears[0].in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = [m(probe).float() for m in linears]
    start = 0
    for name, m in zip(names, linears):
        setattr(parent, name, SharedProjection(shared, start, start + m.out_features))
        start += m.out_features
    got = [getattr(parent, name)(probe).float() for name in names]
    if all((g - e).abs().max() <= FUSION_TOLERANCE[dtype] * max(float(e.abs().max()), 1e-6) for g, e in zip(got, expected)):
        return True
    for name, m in zip(names, linears):  # undo
        setattr(parent, name, m)
    return False


@torch.no_grad()
def pack_model(model: nn.Module, batch_size: int, dtype: torch.dtype = torch.float32) -> tuple[int, int, int]:
    """Fuse sibling projections, pack every ``dtype`` projection in place and fuse MLP activations; returns the
    (packed, fused activations, shared products) counts.

    ``batch_size`` is the row count oneDNN optimises the layout for (the decode batch).
    """
    shared = 0
    for module in list(model.modules()):
        for names in _SIBLINGS:
            shared += _share(module, names, batch_size, dtype)
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
    return packed, fused, shared
