"""int8: every projection (GPT-2's Conv1D included) as a dynamic int8 Linear; the format is ``predictor.quantized``.

No logit tolerance is applied here (nor to ``onnx-int8`` or ``cast``): a lossy variant's logits differ from
float by design, so whether it is good enough is measured by the evaluator (``pipelines.evaluate``: perplexity,
greedy agreement with the float model) and decided by the gate (``pipelines.gate``). This method checks only
that every projection was quantized.
"""

from __future__ import annotations

from pathlib import Path

import torch

from predictor import quantized
from predictor.loading import LoadedModel

from . import OptimizationError, copy_tokenizer


def _weight_bytes(module: torch.nn.Module) -> int:
    if isinstance(module, quantized.Int8Linear):
        return module.in_features * module.out_features + module.out_features * 4
    return module.weight.numel() * module.weight.element_size()


def int8(loaded: LoadedModel, output_dir: Path) -> dict:
    model = loaded.model
    names = quantized.projection_names(model)
    if not names:
        raise OptimizationError("the model has no Conv1D or Linear projections to quantize")
    before = sum(_weight_bytes(model.get_submodule(n)) for n in names)
    done = quantized.quantize(model)
    after = sum(_weight_bytes(model.get_submodule(n)) for n in done)
    left = quantized.projection_names(model)
    if left:  # nothing may be skipped silently
        raise OptimizationError(f"{len(left)} projections were not quantized: {left[:5]}")
    quantized.save(model, done, output_dir, source=str(loaded.model_dir))
    copy_tokenizer(loaded, output_dir)
    return {
        "quantized_modules": len(done),
        "projection_modules": len(names),
        "quantized_weight_bytes_before": before,
        "quantized_weight_bytes_after": after,
        "weight_compression": round(before / after, 3),
    }
