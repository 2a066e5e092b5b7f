"""The ONNX model directory: a decoder exported with an explicit KV cache, run with ONNX Runtime.

The graph (``model.onnx``, written by ``pipelines.optimize.onnx_export``) takes

- ``input_ids``, ``position_ids``: (B, T), the new tokens and their positions;
- ``past_positions``: (B, P), the position each cached slot holds, −1 for an empty slot (masked);
- ``past_key_<i>``, ``past_value_<i>`` for every layer i: (B, kv_heads, P, head_dim);

and returns ``logits`` (B, T, V) and ``new_key_<i>`` / ``new_value_<i>`` (B, kv_heads, T, head_dim):
only the new tokens' keys and values, which the runner writes into its own buffers. Attention is causal
by position (and within a layer's sliding window), so rows of one batch may hold sequences of any
lengths, padded with empty slots. P ≥ 1 always (an export dimension of size 0 is not allowed), so
a fresh sequence passes one empty slot. ``onnx.json`` says what the directory is and lists each
layer's KV shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import AutoConfig, PretrainedConfig

MANIFEST = "onnx.json"
FORMAT = "kserve-llm/onnx-kv/2"
GRAPH = "model.onnx"


def input_names(layers: int) -> list[str]:
    return ["input_ids", "position_ids", "past_positions"] + [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [f"new_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def is_onnx_dir(model_dir: Path) -> bool:
    return (model_dir / MANIFEST).is_file()


class OnnxModel:
    """An ONNX Runtime session plus the model's config and per-layer KV shapes: what ``OnnxRunner`` drives."""

    def __init__(self, model_dir: Path, threads: int | None = None):
        import onnxruntime as ort

        manifest = json.loads((model_dir / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"{model_dir / MANIFEST}: format {manifest.get('format')!r} is not {FORMAT!r}; re-export it with python -m pipelines optimize --method onnx"
            )
        self.manifest = manifest
        self.config: PretrainedConfig = AutoConfig.from_pretrained(model_dir)
        self.kv_shapes: list[tuple[int, int]] = [(layer["kv_heads"], layer["head_dim"]) for layer in manifest["layers"]]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.graph_path = model_dir / GRAPH
        self.session = ort.InferenceSession(str(self.graph_path), options, providers=["CPUExecutionProvider"])
        self.inputs = input_names(len(self.kv_shapes))
        self.outputs = output_names(len(self.kv_shapes))

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, past_positions: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        """``past``: key, value of layer 0, key, value of layer 1, …; returns logits then the new keys and values likewise."""
        feeds = dict(zip(self.inputs, [input_ids.astype(np.int64), position_ids.astype(np.int64), past_positions.astype(np.int64), *past]))
        return self.session.run(self.outputs, feeds)

    def empty_past(self, batch: int, slots: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
        """Positions (all −1) and zero keys and values for ``slots`` empty cache slots per row."""
        past = [np.zeros((batch, h, slots, d), dtype=np.float32) for h, d in self.kv_shapes for _ in range(2)]
        return np.full((batch, slots), -1, dtype=np.int64), past

    def parameter_count(self) -> int:
        import onnx

        graph = onnx.load(str(self.graph_path), load_external_data=False).graph
        return sum(int(np.prod(init.dims)) for init in graph.initializer)
