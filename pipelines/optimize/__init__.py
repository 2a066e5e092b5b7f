"""Model optimization: each method turns a model directory into a new one plus ``optimization.json``.

``optimize(method, input_dir, output_dir, **options)`` checks the options against the method's parameters,
validates the input, runs the method into a temporary directory next to the output and renames it into place
only when it succeeded, so a failure never leaves a half-written output directory.
"""

from __future__ import annotations

import inspect
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


def _method(name: str) -> tuple[Callable[..., dict], dict]:
    """The function of method ``name`` and the options the method's name fixes (the ONNX export's ``quantize``)."""
    if name == "int8":
        from .quantize import int8

        return int8, {}
    if name == "prune":
        from .prune import prune

        return prune, {}
    if name == "distill":
        from .distill import distill

        return distill, {}
    if name == "cast":
        from .cast import cast

        return cast, {}
    if name in ("onnx", "onnx-int8"):
        from .onnx_export import export

        return export, {"quantize": name == "onnx-int8"}
    raise OptimizationError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


def options_of(run: Callable[..., dict], fixed: dict) -> list[str]:
    """The options a method's function takes by name: its parameters after (loaded model, output directory), less ``fixed``."""
    parameters = list(inspect.signature(run).parameters.values())[2:]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in named and p.name not in fixed]


def check_options(method: str, run: Callable[..., dict], fixed: dict, options: dict) -> None:
    """Refuse, naming them and the method, the options ``method`` does not take: checked before it runs, so that a
    ``TypeError`` from inside the method (a bug, ours or a library's) is never mistaken for the user's typo."""
    known = options_of(run, fixed)
    unknown = [key for key in options if key not in known]
    if unknown:
        names = ", ".join(repr(key) for key in unknown)
        takes = ", ".join(known) or "none"
        raise OptimizationError(f"method {method!r} does not take option{'s' if len(unknown) > 1 else ''} {names} (its options: {takes})")


def optimize(method: str, input_dir: str | Path, output_dir: str | Path, overwrite: bool = False, **options) -> dict:
    """Run ``method`` on the model in ``input_dir``; write the result and its report to ``output_dir``."""
    run, fixed = _method(method)
    check_options(method, run, fixed, options)
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
        report = run(loaded, tmp, **fixed, **options)
        report = {"method": method, "input": str(input_dir), "seconds": round(time.monotonic() - started, 2), **report}
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
