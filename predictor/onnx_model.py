"""The ONNX model directory: a GPT-2 exported with an explicit KV cache, run with ONNX Runtime.

The graph (``model.onnx``) takes ``input_ids`` (B, T), ``position_ids`` (B, T), ``attention_mask``
(B, P + T; 1 = attend) and the stacked cache ``past_keys`` / ``past_values`` (layers, B, heads, P,
head_dim), and returns ``logits`` (B, T, V) and ``present_keys`` / ``present_values`` with P + T
positions. The cache always starts with one masked placeholder position, so every dimension of every
export is at least 1 and one graph serves both prefill and decode. ``onnx.json`` says what the directory
is; ``pipelines.optimize.onnx_export`` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import AutoConfig, PretrainedConfig

MANIFEST = "onnx.json"
FORMAT = "kserve-llm/onnx-gpt2-kv"
GRAPH = "model.onnx"
INPUTS = ["input_ids", "position_ids", "attention_mask", "past_keys", "past_values"]
OUTPUTS = ["logits", "present_keys", "present_values"]


def is_onnx_dir(model_dir: Path) -> bool:
    return (model_dir / MANIFEST).is_file()


class OnnxModel:
    """An ONNX Runtime session plus the model's config: what the ONNX runner drives."""

    def __init__(self, model_dir: Path, threads: int | None = None):
        import onnxruntime as ort

        manifest = json.loads((model_dir / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{model_dir / MANIFEST}: unknown format {manifest.get('format')!r}")
        self.manifest = manifest
        self.config: PretrainedConfig = AutoConfig.from_pretrained(model_dir)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.graph_path = model_dir / GRAPH
        self.session = ort.InferenceSession(str(self.graph_path), options, providers=["CPUExecutionProvider"])
        self.n_layer = self.config.n_layer
        self.n_head = self.config.n_head
        self.head_dim = self.config.n_embd // self.config.n_head

    def empty_cache(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The one masked placeholder position every sequence starts with."""
        shape = (self.n_layer, batch, self.n_head, 1, self.head_dim)
        return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray, keys: np.ndarray, values: np.ndarray):
        feeds = dict(zip(INPUTS, (input_ids.astype(np.int64), position_ids.astype(np.int64), attention_mask.astype(np.int64), keys, values)))
        return self.session.run(OUTPUTS, feeds)

    def parameter_count(self) -> int:
        import onnx

        graph = onnx.load(str(self.graph_path), load_external_data=False).graph
        return sum(int(np.prod(init.dims)) for init in graph.initializer)
