"""ONNX export of any attention-interface decoder with its KV cache, and ONNX Runtime int8.

Hugging Face's exporter (optimum-onnx) does not support transformers 5, so the graph is traced
(``torch.onnx.export``, dynamo) from the model's own forward: embeddings, norms, rotary, MLP and LM head
are the model's modules, and attention is ``explicit_cache_attention``, registered with transformers'
``AttentionInterface`` for the export only. It attends to the cached slots passed in as graph inputs
and to the new tokens, without concatenating them: the scores of both are softmaxed together and each
part multiplies its own values, so no per-layer copy of the cache happens in the graph. The I/O
contract is in ``predictor.onnx_model``.

The export is checked on a batched prefill of two prompts, then a batched decode step of two sequences of
different lengths from the exported graph's own cache, against a float64 forward of the same weights
(``judge_parity``): ONNX Runtime's float32 may be no further from it than ``PARITY_FACTOR`` × PyTorch
float32's own distance from it, or the export fails. Both float32 implementations round, each in its own
summation order, which depends on the CPU's kernels (AVX2, AVX-512, AMX): a fixed tolerance on ONNX −
PyTorch judged the CPU, this judges the export.

``onnx-int8`` then quantizes the MatMul weights to int8 (``quantize_int8``). Its logits differ from float
by design, so no logit tolerance applies: ``sanity_check`` refuses only logits of the wrong shape or not
finite (a broken graph), the difference from PyTorch is reported, and whether the int8 model is good
enough is the evaluator's call (``pipelines.evaluate``: perplexity, greedy agreement) and the gate's
(``pipelines.gate``), as for every other lossy method (``int8``, ``cast``, ``prune``, ``distill``).
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

# The export fails when max |ONNX − float64| > PARITY_FACTOR × max(max |PyTorch float32 − float64|,
# PARITY_FLOOR × max(1, largest |logit|)). Two float32 implementations of the same weights have errors of the
# same order, not equal ones: ONNX Runtime fuses LayerNorm, GELU, softmax and MatMuls into kernels with their
# own accumulation orders, and a max over ~10^5 logits is a noisy statistic. Measured ratios ONNX error /
# PyTorch error: 0.72 on SmolLM2-135M (30 layers, logits up to 34; 3.0e-4 and 4.2e-4, AMD EPYC), 1.4 on the
# 2-layer test GPT-2. On the Xeon AMX machine whose CPU failed the old fixed tolerance, ONNX − PyTorch was
# 4.57e-4, i.e. ONNX at most ~8.8e-4 from float64 if PyTorch is as far as on EPYC: a ratio up to ~2.1.
# K = 4 would leave under 2× margin on that, so K = 8. A real export bug is far above it either way: a 1%
# change to one layer's MLP weights moves the test GPT-2's logits by 1.3e-2, 140× its bound, and a wrong
# mask, position or cache slot moves them by whole units. The floor (≈ 8 float32 ulps of the largest logit)
# only matters where PyTorch float32 is nearly exact (shallow models).
PARITY_FACTOR = 8
PARITY_FLOOR = 1e-6
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


def parity_bound(pytorch_error: float, logit_scale: float) -> float:
    """The most ONNX float32 may differ from the float64 reference: ``PARITY_FACTOR`` × PyTorch float32's own error."""
    return PARITY_FACTOR * max(pytorch_error, PARITY_FLOOR * max(1.0, logit_scale))


def _finite_and_shaped(exported: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if exported.shape != shape:
        raise OptimizationError(f"{what}: logits of shape {exported.shape}, expected {shape}")
    if not np.isfinite(exported).all():
        raise OptimizationError(f"{what}: {int((~np.isfinite(exported)).sum())} logits are not finite (NaN or inf)")


def judge_parity(reference: np.ndarray, pytorch: np.ndarray, exported: np.ndarray) -> dict[str, float]:
    """Accept or refuse a float32 export: the same positions' logits from a float64 forward of the weights
    (``reference``), from PyTorch float32 and from the export. Pure (arrays in, numbers out): raises
    ``OptimizationError`` saying by how much and against what bound when the export is refused.

    Returns ``onnx_error`` (max |exported − reference|), ``pytorch_float32_error`` (max |pytorch −
    reference|), ``bound`` (``parity_bound``) and ``logit_scale`` (max |reference|)."""
    reference = np.asarray(reference, dtype=np.float64)
    _finite_and_shaped(np.asarray(exported), reference.shape, "ONNX export")
    scale = float(np.abs(reference).max())
    pytorch_error = float(np.abs(np.asarray(pytorch, dtype=np.float64) - reference).max())
    onnx_error = float(np.abs(np.asarray(exported, dtype=np.float64) - reference).max())
    bound = parity_bound(pytorch_error, scale)
    if onnx_error > bound:
        raise OptimizationError(
            f"ONNX logits differ from a float64 forward of the same weights by {onnx_error:.2e}, more than the bound {bound:.2e} = "
            f"{PARITY_FACTOR} × max(PyTorch float32's own difference from it, {pytorch_error:.2e}, and the floor {PARITY_FLOOR:g} × {max(1.0, scale):.1f}, "
            "the largest |logit|): the export is wrong"
        )
    return {"onnx_error": onnx_error, "pytorch_float32_error": pytorch_error, "bound": bound, "logit_scale": scale}


def sanity_check(pytorch: np.ndarray, exported: np.ndarray) -> None:
    """The check for lossy (int8) exports: the logits have the right shape and are finite. How far they may
    be from float is not decided here but by the evaluator (perplexity, greedy agreement) and the gate."""
    _finite_and_shaped(np.asarray(exported), np.asarray(pytorch).shape, "ONNX int8 export")


def _logits(model: PreTrainedModel, prompts: list[torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(input_ids=p[None]).logits[0].numpy() for p in prompts]


def float64_logits(model: PreTrainedModel, prompts: list[torch.Tensor]) -> list[np.ndarray]:
    """The same weights' logits in float64. The model is cast in place and back (float32 → float64 → float32
    is exact) rather than copied: while it lasts it holds the float64 weights only, 8 bytes per parameter
    (1.1 GB for SmolLM2-135M), not a float32 copy besides. Ops the model's code itself runs in float32
    (rotary tables, Llama's RMSNorm) stay float32 in the reference too: on SmolLM2 that moves it by 4.2e-5
    from an all-float64 forward, a tenth of PyTorch float32's own 3.8e-4, so the reference stays the better one."""
    model.to(torch.float64)
    try:
        return _logits(model, prompts)
    finally:
        model.to(torch.float32)


def exported_logits(session: onnx_model.OnnxModel, prompts: list[torch.Tensor]) -> tuple[list[np.ndarray], list[int]]:
    """Each prompt's logits from the graph at the positions of the full-prompt forward: a batched prefill of all
    but the last token (the shorter prompt padded at the end), then a batched decode of the last tokens from
    the graph's own cache, the shorter row's surplus slots empty (−1). Also the prompts' prefill lengths."""
    lengths = [len(p) - 1 for p in prompts]
    T = max(lengths)
    ids = np.zeros((len(prompts), T), dtype=np.int64)
    positions = np.zeros((len(prompts), T), dtype=np.int64)
    for row, (p, n) in enumerate(zip(prompts, lengths)):
        ids[row, :n] = p[:n].numpy()
        positions[row] = np.arange(T)
    past_positions, past = session.empty_past(len(prompts))
    out = session.run(ids, positions, past_positions, past)
    past_positions = np.full((len(prompts), T), -1, dtype=np.int64)
    for row, n in enumerate(lengths):
        past_positions[row, :n] = np.arange(n)
    new_ids = np.array([[p[n].item()] for p, n in zip(prompts, lengths)])
    out2 = session.run(new_ids, np.array([[n] for n in lengths]), past_positions, out[1:])
    return [np.concatenate([out[0][row, :n], out2[0][row, :1]]) for row, n in enumerate(lengths)], lengths


def parity(model: PreTrainedModel, session: onnx_model.OnnxModel, quantized: bool = False) -> dict:
    """Check the graph against the model (``judge_parity``, or only ``sanity_check`` when ``quantized``) on two
    prompts of 7 and 4 tokens plus one decoded each. Returns ``max_abs_logit_difference`` from PyTorch float32
    (prefill, decode), ``max_abs_logit`` and, unless quantized, ``parity``: ``judge_parity``'s numbers."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n + 1,), generator=g) for n in (7, 4)]
    pytorch = _logits(model, prompts)
    exported, lengths = exported_logits(session, prompts)
    pytorch_all, exported_all = np.concatenate(pytorch), np.concatenate(exported)
    result = {
        "max_abs_logit_difference": {
            "prefill": max(float(np.abs(e[:n] - r[:n]).max()) for e, r, n in zip(exported, pytorch, lengths)),
            "decode": max(float(np.abs(e[n] - r[n]).max()) for e, r, n in zip(exported, pytorch, lengths)),
        },
        "max_abs_logit": float(np.abs(pytorch_all).max()),
    }
    if quantized:
        sanity_check(pytorch_all, exported_all)
        return result
    reference = np.concatenate(float64_logits(model, prompts))
    verdict = judge_parity(reference, pytorch_all, exported_all)
    del reference
    return {**result, "parity": {"reference": "float64", "factor": PARITY_FACTOR, **verdict}}


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
    measured = parity(model, onnx_model.OnnxModel(output_dir), quantized=quantize)
    return {
        "graph": graph.name,
        "quantized": manifest["quantized"],
        **measured,
        "parity": measured.get("parity"),  # None for int8: its quality is the evaluator's and the gate's to judge
    }
