"""int8: every projection but the LM head (GPT-2's Conv1D included) as a W8A8 int8 Linear with SmoothQuant; the format
is ``predictor.quantized``.

Activation ranges for SmoothQuant are measured on calibration text: the training split of ``text`` (a .txt file or a
directory of them; default: the demo corpus), at most ``CALIBRATION_TOKENS`` tokens. The held-out split is left for the
evaluator, so the calibration never sees the text the variant is judged on.

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

from ..corpus import demo_corpus, read_corpus, split_documents
from ..tokenizer import tokenize
from . import OptimizationError, copy_tokenizer

CALIBRATION_TOKENS = 2048  # SmolLM2: +0.90% perplexity with 2,048 calibration tokens (predictor/quantized.py)


def _weight_bytes(module: torch.nn.Module) -> int:
    if isinstance(module, quantized.Int8Linear):
        return module.in_features * module.out_features + module.out_features * 4
    return module.weight.numel() * module.weight.element_size()


def int8(loaded: LoadedModel, output_dir: Path, text: str | None = None) -> dict:
    model = loaded.model
    names = [n for n in quantized.projection_names(model) if n not in quantized.KEEP_FLOAT]
    if not names:
        raise OptimizationError("the model has no Conv1D or Linear projections to quantize")
    train_text, _ = split_documents(read_corpus(text) if text else demo_corpus())
    calibration = tokenize(loaded.tokenizer, train_text[: CALIBRATION_TOKENS * 16])[:CALIBRATION_TOKENS].tolist()  # 16 chars: past any token's length
    if len(calibration) < 2:
        raise OptimizationError(f"the calibration text has {len(calibration)} tokens; int8 needs some to measure activation ranges")
    before = sum(_weight_bytes(model.get_submodule(n)) for n in names)
    done = quantized.quantize(model, [calibration])
    after = sum(_weight_bytes(model.get_submodule(n)) for n in done)
    left = [n for n in quantized.projection_names(model) if n not in quantized.KEEP_FLOAT]
    if left:  # nothing may be skipped silently
        raise OptimizationError(f"{len(left)} projections were not quantized: {left[:5]}")
    quantized.save(model, done, output_dir, source=str(loaded.model_dir), calibration_tokens=len(calibration))
    copy_tokenizer(loaded, output_dir)
    return {
        "quantized_modules": len(done),
        "kept_float": [n for n in quantized.KEEP_FLOAT if n in dict(model.named_modules())],
        "smoothquant_alpha": quantized.SMOOTHQUANT_ALPHA,
        "calibration_tokens": len(calibration),
        "projection_modules": len(names),
        "quantized_weight_bytes_before": before,
        "quantized_weight_bytes_after": after,
        "weight_compression": round(before / after, 3),
    }
