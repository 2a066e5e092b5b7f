"""GGUF as an input format: a ``.gguf`` file becomes a float safetensors model directory, once.

``--model_dir`` may name a ``.gguf`` file, or a directory that holds exactly one and no ``config.json``.
transformers reads GGUF itself (``from_pretrained(DIR, gguf_file=NAME)``, needing the ``gguf`` and
``accelerate`` packages): it rebuilds the config and the tokenizer (with the chat template) from the
file's metadata and dequantizes the weights to float. The result is written next to the file
(``NAME.hf/``), or under the cache root when that directory is not writable, atomically and under a
lock, so concurrent starts convert once. ``python -m pipelines import-gguf FILE --output DIR`` is the
same conversion offline.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .build_once import build_once, cache_root

SUFFIX = ".gguf"


class GGUFError(ValueError):
    """The GGUF file cannot be converted; the message says why."""


def find(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the one ``.gguf`` in a directory without ``config.json``."""
    if path.is_file() and path.suffix == SUFFIX:
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob(f"*{SUFFIX}"))
        if len(files) > 1:
            raise GGUFError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}): name one of them")
        return files[0] if files else None
    return None


def architecture(gguf_path: Path) -> str:
    """``general.architecture`` from the file's header; a clear error for a missing, truncated or foreign file."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    if not gguf_path.is_file():
        raise GGUFError(f"GGUF file not found: {gguf_path}")
    try:
        metadata, _ = read_gguf_metadata(str(gguf_path))
    except Exception as exc:  # the reader raises several kinds on a damaged file
        raise GGUFError(f"{gguf_path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    arch = metadata.get("general.architecture")
    if not arch:
        raise GGUFError(f"{gguf_path} states no general.architecture")
    return str(arch)


def check_supported(gguf_path: Path) -> str:
    """The file's architecture, or a ``GGUFError`` naming it when transformers cannot dequantize it."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = architecture(gguf_path)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{gguf_path.name}: architecture {arch!r} cannot be dequantized by transformers (it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    return arch


def write_converted(gguf_path: Path, output_dir: Path, progress: bool = True) -> None:
    """Write config, float32 safetensors, tokenizer and chat template from ``gguf_path`` into ``output_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = check_supported(gguf_path)
    if progress:
        print(f"converting {gguf_path.name} ({arch}) to safetensors ...", flush=True)
    kwargs = dict(gguf_file=gguf_path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise GGUFError(f"cannot convert {gguf_path}: {exc}") from exc
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are
    # plain float tensors by now, so save them through a fresh model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def is_converted(path: Path) -> bool:
    return (path / "config.json").is_file()


def convert(gguf_path: Path, output_dir: Path, progress: bool = True) -> Path:
    """``output_dir`` converted from ``gguf_path`` once (atomic, under a lock); see ``write_converted``."""
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    check_supported(gguf_path)
    return build_once(output_dir, lambda tmp: write_converted(gguf_path, tmp, progress), is_converted)


def cache_dir(gguf_path: Path) -> Path:
    """``NAME.hf`` beside the file when that directory is writable, else under the cache root."""
    if os.access(gguf_path.parent, os.W_OK):
        return gguf_path.with_name(gguf_path.name + ".hf")
    digest = hashlib.sha256(str(gguf_path.resolve()).encode()).hexdigest()[:10]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{digest}"


def resolve(model_dir: Path, progress: bool = True) -> Path:
    """``model_dir`` itself, or for a GGUF input its converted directory (converted on first use)."""
    gguf_path = find(model_dir)
    if gguf_path is None:
        return model_dir
    return convert(gguf_path, cache_dir(gguf_path), progress=progress)
