"""The int8 model directory: dynamic int8 quantization of every projection, written and read as safetensors.

A directory with ``quantization.json`` holds a Hugging Face model whose listed projections (GPT-2's
``Conv1D`` included, converted to ``nn.Linear`` first) are int8 weights with one float scale per output
channel; activations are quantized per call (dynamic quantization, PyTorch's x86/fbgemm kernels).
Everything else (embeddings, layer norms) stays float32. ``predictor.loading`` reads it; the pipeline's
``optimize --method int8`` writes it.

torchao's int8 configs are the successor API, but without ``torch.compile`` they run about 10x slower
than float32 on CPU (measured: 8.2 ms vs 0.86 ms for a 768x3072 layer at batch 1), so this uses
``torch.ao.quantization.quantize_dynamic``, guarded for its presence.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

MANIFEST = "quantization.json"
FORMAT = "kserve-llm/int8-dynamic-per-channel"
WEIGHTS = "model.safetensors"


def _dynamic_linear_cls() -> type[nn.Module]:
    try:
        from torch.ao.nn.quantized.dynamic import Linear
    except ImportError as exc:  # a torch without the ao dynamic kernels
        raise RuntimeError("this torch build has no dynamic int8 Linear (torch.ao.nn.quantized.dynamic)") from exc
    return Linear


def to_linear(module: nn.Module) -> nn.Linear:
    """A float ``nn.Linear`` equal to ``module`` (a ``Conv1D``, whose weight is stored transposed, or a Linear)."""
    if isinstance(module, Conv1D):
        linear = nn.Linear(module.weight.shape[0], module.weight.shape[1])
        linear.weight.data = module.weight.data.t().contiguous()
        linear.bias.data = module.bias.data.clone()
        return linear
    if isinstance(module, nn.Linear):
        return module
    raise TypeError(f"not a projection: {type(module).__name__}")


def projection_names(model: PreTrainedModel) -> list[str]:
    """Every Conv1D and nn.Linear in the model, LM head included: what int8 must cover."""
    return [name for name, m in model.named_modules() if isinstance(m, (Conv1D, nn.Linear))]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _quantize_linear(linear: nn.Linear) -> nn.Module:
    weight = linear.weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # symmetric, per output channel
    q = torch.quantize_per_channel(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    out = _dynamic_linear_cls()(linear.in_features, linear.out_features, dtype=torch.qint8)
    out.set_weight_bias(q, None if linear.bias is None else linear.bias.detach().float())
    return out


@torch.no_grad()
def quantize(model: PreTrainedModel) -> list[str]:
    """Replace every projection with a dynamic int8 Linear, in place; returns the quantized module names."""
    names = projection_names(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's notice that qint8 tensors move to torchao
        for name in names:
            _set_module(model, name, _quantize_linear(to_linear(model.get_submodule(name))))
    return names


def save(model: PreTrainedModel, names: list[str], output_dir: Path, source: str) -> dict:
    """Write weights (int8 + scales for ``names``, float for the rest), config and the manifest."""
    tensors: dict[str, torch.Tensor] = {}
    quantized = set(names)
    for name, module in model.named_modules():
        if name in quantized:
            w = module.weight()
            tensors[f"{name}.weight_int8"] = w.int_repr().contiguous()
            tensors[f"{name}.weight_scale"] = w.q_per_channel_scales().float().contiguous()
            bias = module.bias()
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().contiguous()
    for key, value in model.state_dict().items():
        if not any(key.startswith(n + ".") for n in quantized) and isinstance(value, torch.Tensor) and value.is_floating_point():
            tensors.setdefault(key, value.detach().contiguous())
    # Shared tensors (a tied LM head) are stored once each; safetensors refuses aliases.
    save_file({k: v.clone() for k, v in tensors.items()}, str(output_dir / WEIGHTS), metadata={"format": "pt"})
    model.config.tie_word_embeddings = False  # the int8 head no longer shares the embedding
    model.config.save_pretrained(output_dir)
    manifest = {"format": FORMAT, "modules": names, "source": source}
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def is_int8_dir(model_dir: Path) -> bool:
    return (model_dir / MANIFEST).is_file()


@torch.no_grad()
def load(model_dir: Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """Rebuild the int8 model written by ``save``."""
    manifest = json.loads((model_dir / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{model_dir / MANIFEST}: unknown format {manifest.get('format')!r}")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    tensors = load_file(str(model_dir / WEIGHTS))
    names = manifest["modules"]
    int8_parts = {n: (tensors.pop(f"{n}.weight_int8"), tensors.pop(f"{n}.weight_scale"), tensors.pop(f"{n}.bias", None)) for n in names}
    missing, unexpected = model.load_state_dict(tensors, strict=False)  # the float parts, before the swap
    missing = [k for k in missing if not any(k.startswith(n + ".") for n in names)]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: int8 weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    Linear = _dynamic_linear_cls()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name, (q8, scale, bias) in int8_parts.items():
            weight = torch._make_per_channel_quantized_tensor(q8, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
            module = Linear(q8.shape[1], q8.shape[0], dtype=torch.qint8)
            module.set_weight_bias(weight, bias)
            _set_module(model, name, module)
    return model.eval()
