"""Load a causal LM and its tokenizer from a model directory: the one place models are loaded.

The directory says what it is: a Hugging Face model (safetensors), an int8 model (``quantization.json``,
see ``quantized.py``) or an ONNX model (``onnx.json``, see ``onnx_model.py``). A ``.gguf`` file (or a
directory holding one) is first converted to a safetensors directory (``gguf_file.py``).

Safetensors only by default: pickle weights (``pytorch_model.bin``) can execute code when loaded, so a
directory that has only those is refused unless the caller opts in.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import gguf_file, onnx_model, quantized
from .cpu import cpu_info

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Used when the model directory has no chat template: one line per message, "Role: content", then the
# assistant's turn. Documented in the README.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Sampling parameters a model's generation_config.json may recommend; they become the defaults of
# requests that do not set them (vLLM's --generation-config auto does the same).
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class ModelLoadError(RuntimeError):
    """The model directory cannot be served; the message says why and what to do."""


@dataclass
class LoadedModel:
    """A model ready to run: weights on the device, tokenizer, and the limits the server enforces."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    eos_token_id: int | None
    chat_template: str
    model_dir: Path
    sampling_defaults: dict[str, float]
    dtype_reason: str = ""  # why this dtype (resolve_dtype), for the start-up log

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was given but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, saved: str | None = None) -> tuple[torch.dtype, str]:
    """The dtype to run in, and why (for the start-up log).

    ``auto`` on CPU: bfloat16 where the CPU multiplies bfloat16 in hardware (AMX-BF16 or AVX512-BF16, as
    vLLM-CPU chooses; prepacked bfloat16 projections measured 1.6-2.8x float32's there), float32 elsewhere (bfloat16
    is emulated and slower). On CUDA: the saved half dtype (float16 if the model was saved so), else bfloat16.
    """
    if dtype != "auto":
        return DTYPES[dtype], f"--dtype {dtype}"
    if device.type == "cuda":
        if saved == "float16":
            return torch.float16, "--dtype auto on CUDA: the weights were saved in float16"
        return torch.bfloat16, "--dtype auto on CUDA"
    cpu = cpu_info()
    if cpu.native_bf16 and torch.backends.mkldnn.is_available():
        return torch.bfloat16, f"--dtype auto on a CPU with native bfloat16 products: {cpu.describe()}"
    return torch.float32, f"--dtype auto on a CPU without native bfloat16 products (no amx_bf16 / avx512_bf16): {cpu.describe()}"


def saved_dtype(model_dir: Path) -> str | None:
    """The dtype a Hugging Face config says the weights were saved in (``dtype``, or the older ``torch_dtype``)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def check_weights(model_dir: Path, allow_pickle: bool) -> None:
    """Refuse a directory without weights, or with only pickle weights unless ``allow_pickle``, or one whose files
    the loader opens this user cannot read (``check_readable``)."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    check_readable(model_dir, allow_pickle)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    files = [p.name for p in model_dir.iterdir() if p.is_file()]
    if any(name.endswith((".safetensors", ".onnx")) for name in files):
        return
    pickles = [name for name in files if name.endswith(_PICKLE_SUFFIXES)]
    if not pickles:
        raise ModelLoadError(f"{model_dir} has no weights (*.safetensors)")
    if not allow_pickle:
        raise ModelLoadError(
            f"{model_dir} has only pickle weights ({', '.join(sorted(pickles))}); loading pickle can run arbitrary "
            "code. Convert them to safetensors, or pass --allow_pickle_weights if you trust this directory."
        )


# Names of the files in a model directory that loading opens: config and generation config, weights (safetensors,
# ONNX and its external data, the sharded index), tokenizer files (tokenizer.json, vocab.json, merges.txt,
# SentencePiece .model, tiktoken), chat templates and the int8 / ONNX manifests.
_LOADED_SUFFIXES = (".json", ".safetensors", ".onnx", ".data", ".txt", ".model", ".tiktoken", ".jinja")


def check_readable(model_dir: Path, allow_pickle: bool = False) -> None:
    """Refuse a model directory this user cannot list, or a file in it the loader opens that it cannot read.

    ``save_pretrained`` under a umask of 077 writes 0600 files; a pod running as another user (the image's UID
    10001, an OpenShift-assigned one) then fails deep inside transformers with a misleading "No such file or
    directory". This names the file, its mode and owner, and this process's UID instead.
    """
    if not os.access(model_dir, os.R_OK | os.X_OK):
        raise ModelLoadError(_unreadable(model_dir, "make the model directory world-readable and searchable (chmod a+rx) or run as its owner"))
    suffixes = _LOADED_SUFFIXES + (_PICKLE_SUFFIXES if allow_pickle else ())
    files = [path for path in sorted(model_dir.iterdir()) if path.name.endswith(suffixes) and path.is_file()]
    unreadable = [path for path in files if not os.access(path, os.R_OK)]
    if unreadable:
        raise ModelLoadError(_unreadable(unreadable[0], "make the model files world-readable (chmod a+r) or run as their owner", len(unreadable) - 1))


def _unreadable(path: Path, fix: str, others: int = 0) -> str:
    """The message naming ``path``, its mode and owner, this process's UID and the fix (``others``: more such files)."""
    try:
        st = path.stat()
        found = f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid} gid {st.st_gid}"
    except OSError as exc:
        found = exc.strerror or str(exc)
    also = f", nor {others} more of the model's files" if others else ""
    return f"cannot read {path} ({found}) as uid {os.getuid()}{also}: {fix}"


def load_model(
    model_dir: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    generation_config: bool = True,
) -> LoadedModel:
    """Load weights and tokenizer from ``model_dir`` onto the device, in eval mode.

    ``generation_config``: take request sampling defaults from the directory's ``generation_config.json``.
    """
    try:
        model_dir = gguf_file.resolve(Path(model_dir))
    except gguf_file.GGUFError as exc:
        raise ModelLoadError(str(exc)) from None
    check_weights(model_dir, allow_pickle)
    torch_device = resolve_device(device)
    torch_dtype, dtype_reason = resolve_dtype(dtype, torch_device, saved_dtype(model_dir))
    onnx = onnx_model.is_onnx_dir(model_dir)
    int8 = quantized.is_int8_dir(model_dir)
    if onnx:
        if device == "cuda" or dtype not in ("auto", "float32"):
            raise ModelLoadError(f"{model_dir} is an ONNX model: it runs on CPU with float32 activations only")
        torch_device, torch_dtype = torch.device("cpu"), torch.float32
        dtype_reason = "an ONNX model: float32 activations"
    elif int8:
        if device == "cuda" or torch_dtype not in (torch.float32, torch.bfloat16):
            raise ModelLoadError(f"{model_dir} is an int8 model: it runs on CPU, its float parts in float32 or bfloat16")
        torch_device = torch.device("cpu")
        dtype_reason = f"int8 projections (fbgemm), the rest {dtype_reason}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if onnx:
            model = onnx_model.OnnxModel(model_dir)
        elif int8:
            model = quantized.load(model_dir, trust_remote_code=trust_remote_code, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=not allow_pickle,
            )
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot load the model in {model_dir}: {exc}") from exc
    if not onnx:
        model.to(torch_device).eval()
    limit = _context_length(model)
    if max_model_len is None:
        if limit is None:
            raise ModelLoadError("the model config states no context length; pass --max_model_len")
        max_model_len = limit
    elif limit is not None and max_model_len > limit:
        raise ModelLoadError(f"--max_model_len {max_model_len} exceeds the model's context length ({limit})")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        max_model_len=max_model_len,
        eos_token_id=eos,
        chat_template=tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE,
        model_dir=model_dir,
        sampling_defaults=sampling_defaults(model_dir) if generation_config else {},
        dtype_reason=dtype_reason,
    )


def sampling_defaults(model_dir: Path) -> dict[str, float]:
    """The sampling parameters ``generation_config.json`` sets (``SAMPLING_DEFAULT_KEYS``); {} without one."""
    try:
        config = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {key: config[key] for key in SAMPLING_DEFAULT_KEYS if isinstance(config.get(key), (int, float))}


def _context_length(model: PreTrainedModel) -> int | None:
    """The context length the config states, or None (ALiBi models such as BLOOM state none)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
