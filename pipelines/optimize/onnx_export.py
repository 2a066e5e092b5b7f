"""ONNX export of a GPT-2 with its KV cache (``torch.onnx.export``, dynamo exporter), and ONNX Runtime int8.

Hugging Face's exporter (optimum-onnx) does not support transformers 5, so the graph is traced from
``GPT2WithPast``: the model's own modules, with attention written over an explicit, stacked cache (the
I/O contract is in ``predictor.onnx_model``). The logits of the exported graph are checked against
PyTorch's on a prefill and a decode step: max |difference| ≤ 1e-4 in fp32, or the export fails.
``onnx-int8`` then applies ONNX Runtime's dynamic int8 quantization to the MatMuls and reports its
difference.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from predictor import onnx_model
from predictor.loading import LoadedModel

from . import OptimizationError, copy_tokenizer

PARITY_TOLERANCE = 1e-4


class GPT2WithPast(nn.Module):
    """GPT-2 forward over explicit cache tensors; shapes as in ``predictor.onnx_model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_head = model.config.n_head

    def forward(self, input_ids, position_ids, attention_mask, past_keys, past_values):
        tr = self.model.transformer
        B, T = input_ids.shape
        P = past_keys.shape[3]
        C = tr.wte.weight.shape[1]
        D = C // self.n_head
        x = tr.wte(input_ids) + tr.wpe(position_ids)  # (B, T, C)
        q_pos = torch.arange(T, device=input_ids.device) + P
        k_pos = torch.arange(P + T, device=input_ids.device)
        causal = k_pos[None, :] <= q_pos[:, None]  # (T, P + T)
        mask = causal[None, None] & (attention_mask[:, None, None, :] > 0)  # (B, 1, T, P + T)
        keys, values = [], []
        for i, block in enumerate(tr.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
            q, k, v = (t.reshape(B, T, self.n_head, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
            k = torch.cat([past_keys[i], k], dim=2)
            v = torch.cat([past_values[i], v], dim=2)
            keys.append(k)
            values.append(v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        logits = self.model.lm_head(tr.ln_f(x))
        return logits, torch.stack(keys), torch.stack(values)


def _example(model: nn.Module, batch: int, T: int, P: int, seed: int = 0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, T), generator=g)
    pos = (torch.arange(T) + P - 1).expand(batch, T).contiguous()  # the placeholder takes no position
    mask = torch.ones(batch, P + T, dtype=torch.long)
    mask[:, 0] = 0
    shape = (cfg.n_layer, batch, cfg.n_head, P, cfg.n_embd // cfg.n_head)
    return ids, pos, mask, torch.randn(shape, generator=g) * 0.1, torch.randn(shape, generator=g) * 0.1


def max_difference(wrapper: nn.Module, model: onnx_model.OnnxModel, batch: int, T: int, P: int) -> float:
    inputs = _example(wrapper.model, batch, T, P, seed=1)
    with torch.no_grad():
        ref = wrapper(*inputs)[0].numpy()
    got = model.run(*(t.numpy() for t in inputs))[0]
    return float(np.abs(ref - got).max())


def export(loaded: LoadedModel, output_dir: Path, quantize: bool = False) -> dict:
    model = loaded.model
    if model.config.model_type != "gpt2":
        raise OptimizationError(f"ONNX export supports GPT-2 models; this one is {model.config.model_type!r}")
    wrapper = GPT2WithPast(model).eval()
    batch, seq, past = (
        torch.export.Dim("batch", min=1, max=1024),
        torch.export.Dim("seq", min=1, max=loaded.max_model_len),
        torch.export.Dim("past", min=1, max=loaded.max_model_len + 1),
    )
    total = torch.export.Dim("total", min=2, max=2 * loaded.max_model_len + 1)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "past_keys": {1: batch, 3: past},
        "past_values": {1: batch, 3: past},
    }
    graph = output_dir / onnx_model.GRAPH
    fp32_graph = graph if not quantize else output_dir / "model.fp32.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            _example(model, 2, 3, 2),
            str(fp32_graph),
            dynamo=True,
            input_names=onnx_model.INPUTS,
            output_names=onnx_model.OUTPUTS,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
        )
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32_graph), str(graph), weight_type=QuantType.QInt8)
        fp32_graph.unlink()
    loaded.model.config.save_pretrained(output_dir)
    manifest = {"format": onnx_model.FORMAT, "quantized": "int8-dynamic" if quantize else None, "source": str(loaded.model_dir)}
    (output_dir / onnx_model.MANIFEST).write_text(json.dumps(manifest, indent=2))
    copy_tokenizer(loaded, output_dir)
    session = onnx_model.OnnxModel(output_dir)
    prefill = max_difference(wrapper, session, batch=2, T=7, P=1)
    decode = max_difference(wrapper, session, batch=3, T=1, P=9)
    if not quantize and max(prefill, decode) > PARITY_TOLERANCE:
        raise OptimizationError(f"ONNX logits differ from PyTorch by {max(prefill, decode):.2e} (> {PARITY_TOLERANCE:g})")
    return {
        "graph": graph.name,
        "quantized": manifest["quantized"],
        "max_abs_logit_difference": {"prefill": prefill, "decode": decode},
        "parity_tolerance": None if quantize else PARITY_TOLERANCE,
    }
