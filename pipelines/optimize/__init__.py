"""Model optimization: each method turns a model directory into a new one plus ``optimization.json``.

``optimize(method, input_dir, output_dir, **options)`` validates the input, runs the method into a
temporary directory next to the output and renames it into place only when it succeeded, so a failure
never leaves a half-written output directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from predictor.loading import LoadedModel, ModelLoadError, load_model

REPORT = "optimization.json"
METHODS = ("int8", "prune", "distill", "onnx", "onnx-int8", "cast")


class OptimizationError(ValueError):
    """Impossible settings or unusable input; the message says which."""


def load_input(input_dir: Path) -> LoadedModel:
    """The input model on CPU in float32, or an ``OptimizationError`` saying why not."""
    try:
        return load_model(input_dir, dtype="float32", device="cpu")
    except ModelLoadError as exc:
        raise OptimizationError(f"input model: {exc}") from None


def copy_tokenizer(loaded: LoadedModel, output_dir: Path) -> None:
    loaded.tokenizer.save_pretrained(output_dir)
    generation = loaded.model_dir / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, output_dir / generation.name)


def _method(name: str) -> Callable[..., dict]:
    if name == "int8":
        from .quantize import int8

        return int8
    if name == "prune":
        from .prune import prune

        return prune
    if name == "distill":
        from .distill import distill

        return distill
    if name == "cast":
        from .cast import cast

        return cast
    if name in ("onnx", "onnx-int8"):
        from .onnx_export import export

        return lambda loaded, out, **kw: export(loaded, out, quantize=name == "onnx-int8", **kw)
    raise OptimizationError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


def optimize(method: str, input_dir: str | Path, output_dir: str | Path, overwrite: bool = False, **options) -> dict:
    """Run ``method`` on the model in ``input_dir``; write the result and its report to ``output_dir``."""
    run = _method(method)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise OptimizationError(f"output directory {output_dir} exists and is not empty (pass --overwrite to replace it)")
    if output_dir.resolve() == input_dir.resolve():
        raise OptimizationError("output directory must differ from the input directory")
    loaded = load_input(input_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        started = time.monotonic()
        try:
            report = run(loaded, tmp, **options)
        except TypeError as exc:
            if "unexpected keyword argument" not in str(exc):
                raise
            raise OptimizationError(f"method {method!r} does not take option {str(exc).split('argument')[-1].strip()}") from None
        report = {"method": method, "input": str(input_dir), "seconds": round(time.monotonic() - started, 2), **report}
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
