"""bf16 / fp16: the same model with half-precision weights, for GPUs (half the bytes to load and to read).

On CPU the predictor loads such a directory back to float32 (``--dtype auto``); on CUDA it serves it in
the dtype it was saved in.
"""

from __future__ import annotations

from pathlib import Path

from predictor.loading import DTYPES, LoadedModel

from . import OptimizationError, copy_tokenizer

HALF = ("bfloat16", "float16")


def cast(loaded: LoadedModel, output_dir: Path, dtype: str = "bfloat16") -> dict:
    if dtype not in HALF:
        raise OptimizationError(f"--dtype must be one of {', '.join(HALF)} (got {dtype!r})")
    model = loaded.model
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    model.to(DTYPES[dtype])
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    model.config.dtype = dtype
    model.save_pretrained(output_dir, safe_serialization=True)
    copy_tokenizer(loaded, output_dir)
    return {
        "dtype": dtype,
        "weight_bytes_before": before,
        "weight_bytes_after": after,
        "all_parameters": all(p.dtype == DTYPES[dtype] for p in model.parameters()),
    }
