"""ONNX export of any attention-interface decoder with its KV cache, and ONNX Runtime int8.

Hugging Face's exporter (optimum-onnx) does not support transformers 5, so the graph is traced
(``torch.onnx.export``, dynamo) from the model's own forward: embeddings, norms, rotary, MLP and LM head
are the model's modules, and attention is ``explicit_cache_attention``, registered with transformers'
``AttentionInterface`` for the export only. It attends to the cached slots passed in as graph inputs
and to the new tokens, without concatenating them: the scores of both are softmaxed together and each
part multiplies its own values, so no per-layer copy of the cache happens in the graph. The I/O
contract is in ``predictor.onnx_model``.

The export is checked against the model itself (eager PyTorch): a batched prefill of two prompts, then a
batched decode step of two sequences of different lengths from the exported graph's own cache. Max
|logit difference| ≤ 1e-4 in fp32, or the export fails. ``onnx-int8`` then quantizes the MatMul weights
to int8 (``quantize_int8``) and reports its difference.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from predictor import onnx_model
from predictor.loading import LoadedModel

from . import OptimizationError, copy_tokenizer

# The export fails when max |logit difference| exceeds PARITY_TOLERANCE × max(1, largest |logit| / 10): 1e-4 for
# logits up to 10. Deep models need the scale: on SmolLM2-135M (30 layers, logits up to 34) ONNX Runtime
# measured 1.45e-4 from PyTorch, which itself is 5.5e-5 from a float64 forward: fp32 rounding, not a bug.
PARITY_TOLERANCE = 1e-4
INT8_BLOCK = 32
INT8_SCHEME = f"int8-weight-only-block{INT8_BLOCK}"
ATTN_IMPLEMENTATION = "kserve_llm_onnx_export"


@dataclass
class ExplicitCache:
    """One forward's cache inputs and the new keys and values each layer appends; ``shapes`` set when probing."""

    position_ids: torch.Tensor  # (B, T)
    past_positions: torch.Tensor | None = None  # (B, P), −1 = empty slot
    past: list[torch.Tensor] | None = None  # key, value per layer: (B, KVH, P, D)
    new: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    shapes: dict[int, tuple[int, int]] | None = None
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, 1, T, P + T): True where a new token may attend (by position: causal, within ``window``)."""
        if window not in self._masks:
            q = self.position_ids[:, :, None]  # (B, T, 1)
            k = torch.cat([self.past_positions, self.position_ids], dim=1)[:, None, :]  # (B, 1, P + T)
            valid = torch.cat([self.past_positions >= 0, torch.ones_like(self.position_ids, dtype=torch.bool)], dim=1)[:, None, :]
            allowed = valid & (k <= q)
            if window is not None:
                allowed = allowed & (k > q - window)
            self._masks[window] = allowed[:, None, None]
        return self._masks[window]


def explicit_cache_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    explicit_cache: ExplicitCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (B, H, T, D), key and value (B, KVH, T, D) → (B, T, H, D), attending to cache and new tokens."""
    state = explicit_cache
    layer = module.layer_idx
    B, H, T, D = query.shape
    KVH = key.shape[1]
    if state.shapes is not None:
        state.shapes[layer] = (KVH, D)
        groups = H // KVH
        k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=T > 1, scale=scaling).transpose(1, 2), None
    state.new[layer] = (key, value)
    past_k, past_v = state.past[2 * layer], state.past[2 * layer + 1]  # (B, KVH, P, D)
    P = past_k.shape[2]
    q = query.reshape(B, KVH, (H // KVH) * T, D)  # each KV head's query heads side by side
    scale = scaling if scaling is not None else D**-0.5
    scores = torch.cat([q @ past_k.transpose(2, 3), q @ key.transpose(2, 3)], dim=-1) * scale  # (B, KVH, G*T, P + T)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    window = sliding_window if sliding_window and sliding_window > 0 else None
    scores = scores.reshape(B, KVH, H // KVH, T, P + T).masked_fill(~state.mask(window), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype).reshape(B, KVH, (H // KVH) * T, P + T)
    out = probs[..., :P] @ past_v + probs[..., P:] @ value  # (B, KVH, G*T, D)
    return out.reshape(B, H, T, D).transpose(1, 2), None


AttentionInterface.register(ATTN_IMPLEMENTATION, explicit_cache_attention)
assert ATTN_IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping  # transformers then builds no mask


class WithExplicitCache(nn.Module):
    """The model's forward over explicit cache tensors; graph inputs and outputs as in ``predictor.onnx_model``."""

    def __init__(self, model: PreTrainedModel, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past_positions: torch.Tensor, past: list[torch.Tensor]):
        state = ExplicitCache(position_ids, past_positions, past)
        logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, explicit_cache=state).logits
        return logits, *[t for i in range(self.layers) for t in state.new[i]]


def conv1d_to_linear(model: nn.Module) -> int:
    """Swap GPT-2's ``Conv1D`` (a 2-D addmm, exported as Gemm) for the equal ``nn.Linear`` (exported as MatMul,
    which the int8 quantizer handles); returns how many."""
    from transformers.pytorch_utils import Conv1D

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.nf)
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous())
                linear.bias = child.bias
                setattr(parent, name, linear)
                swapped += 1
    return swapped


def kv_shapes(model: PreTrainedModel) -> list[tuple[int, int]]:
    """Each layer's (KV heads, head size), from one token through the model."""
    state = ExplicitCache(torch.zeros(1, 1, dtype=torch.long), shapes={})
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long), position_ids=state.position_ids, use_cache=False, explicit_cache=state)
    if not state.shapes or sorted(state.shapes) != list(range(len(state.shapes))):
        raise OptimizationError(f"{type(model).__name__}'s attention layers do not all reach the attention interface: cannot export")
    return [state.shapes[i] for i in range(len(state.shapes))]


def _example(model: PreTrainedModel, shapes: list[tuple[int, int]], batch: int, T: int, P: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, T), generator=g)
    positions = (torch.arange(T) + P).expand(batch, T).contiguous()
    past_positions = torch.arange(P).expand(batch, P).contiguous()
    past = [torch.randn(batch, h, P, d, generator=g) * 0.1 for h, d in shapes for _ in range(2)]
    return ids, positions, past_positions, past


def parity(model: PreTrainedModel, session: onnx_model.OnnxModel) -> dict[str, float]:
    """Max |logit difference| against eager PyTorch: batched prefill, then a batched decode of two lengths;
    and ``logit_scale``, the largest |logit| of the reference."""
    g = torch.Generator().manual_seed(1)
    lengths = (7, 4)
    prompts = [torch.randint(0, model.config.vocab_size, (n + 1,), generator=g) for n in lengths]
    with torch.no_grad():
        reference = [model(input_ids=p[None]).logits[0].numpy() for p in prompts]
    # prefill: both prompts (without their last token) in one batch, the shorter one padded at the end
    T = max(lengths)
    ids = np.zeros((2, T), dtype=np.int64)
    positions = np.zeros((2, T), dtype=np.int64)
    for row, (p, n) in enumerate(zip(prompts, lengths)):
        ids[row, :n] = p[:n].numpy()
        positions[row] = np.arange(T)
    past_positions, past = session.empty_past(2)
    out = session.run(ids, positions, past_positions, past)
    prefill = max(float(np.abs(out[0][row, :n] - reference[row][:n]).max()) for row, n in enumerate(lengths))
    # decode: each row's last token, its own cache; the shorter row's surplus slots are empty (−1)
    past_positions = np.full((2, T), -1, dtype=np.int64)
    for row, n in enumerate(lengths):
        past_positions[row, :n] = np.arange(n)
    new_ids = np.array([[p[n].item()] for p, n in zip(prompts, lengths)])
    out2 = session.run(new_ids, np.array([[n] for n in lengths]), past_positions, out[1:])
    decode = max(float(np.abs(out2[0][row, 0] - reference[row][n]).max()) for row, n in enumerate(lengths))
    return {"prefill": prefill, "decode": decode, "logit_scale": float(max(np.abs(r).max() for r in reference))}


def quantize_int8(source: Path, target: Path) -> None:
    """Weight-only int8 in blocks of ``INT8_BLOCK`` (``MatMulNBits``), activations quantized per row and block.

    ONNX Runtime's ``quantize_dynamic`` scales activations per tensor, so a row's output would depend on
    the other rows of its batch (a test caught greedy output changing once batched); per-row blocks do not.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


def export(loaded: LoadedModel, output_dir: Path, quantize: bool = False) -> dict:
    model = loaded.model
    if not getattr(model, "_supports_attention_backend", False):
        raise OptimizationError(f"ONNX export needs a model that routes attention through transformers' AttentionInterface; {type(model).__name__} does not")
    reference_impl = model.config._attn_implementation
    conv1d_to_linear(model)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    shapes = kv_shapes(model)
    wrapper = WithExplicitCache(model, len(shapes)).eval()
    limit = loaded.max_model_len
    batch, seq, past = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=limit), torch.export.Dim("past", min=1, max=limit)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "past_positions": {0: batch, 1: past},
        "past": [{0: batch, 2: past}] * (2 * len(shapes)),
    }
    graph = output_dir / onnx_model.GRAPH
    fp32_graph = graph if not quantize else output_dir / "model.fp32.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            _example(model, shapes, 2, 3, 2),
            str(fp32_graph),
            dynamo=True,
            input_names=onnx_model.input_names(len(shapes)),
            output_names=onnx_model.output_names(len(shapes)),
            dynamic_shapes=dynamic_shapes,
            external_data=False,
        )
    if quantize:
        quantize_int8(fp32_graph, graph)
        fp32_graph.unlink()
    model.set_attn_implementation(reference_impl)
    model.config.save_pretrained(output_dir)
    manifest = {
        "format": onnx_model.FORMAT,
        "quantized": INT8_SCHEME if quantize else None,
        "source": str(loaded.model_dir),
        "layers": [{"kv_heads": h, "head_dim": d} for h, d in shapes],
    }
    (output_dir / onnx_model.MANIFEST).write_text(json.dumps(manifest, indent=2))
    copy_tokenizer(loaded, output_dir)
    measured = parity(model, onnx_model.OnnxModel(output_dir))
    scale = measured.pop("logit_scale")
    tolerance = PARITY_TOLERANCE * max(1.0, scale / 10)
    if not quantize and max(measured.values()) > tolerance:
        raise OptimizationError(f"ONNX logits differ from PyTorch by {max(measured.values()):.2e} (> {tolerance:.2g} for logits up to {scale:.1f})")
    return {
        "graph": graph.name,
        "quantized": manifest["quantized"],
        "max_abs_logit_difference": measured,
        "max_abs_logit": scale,
        "parity_tolerance": None if quantize else tolerance,
    }
