"""The int8 model directory: int8 weights for every projection, written and read as safetensors.

A directory with ``quantization.json`` holds a Hugging Face model whose listed projections (GPT-2's
``Conv1D`` included, converted to ``nn.Linear`` first) are int8 weights with one float scale per output
channel (symmetric). Everything else (embeddings, norms) stays float32. ``predictor.loading`` reads it;
the pipeline's ``optimize --method int8`` writes it.

At run time activations are quantized dynamically, per token (8 bits where the CPU has VNNI, see
``REDUCE_RANGE``): each row is divided by its own absolute maximum before PyTorch's dynamic int8 Linear
(fbgemm), whose one per-tensor range is pinned to [-1, 1] by a sentinel row, and multiplied back after
it. So every row is quantized on its own full range and a sequence's numbers do not depend on its batch neighbours: with the plain per-tensor range a batch
neighbour's outliers coarsen every other row (measured: greedy output diverged within a few tokens on a
test model). fbgemm is ~2.5× faster than ``torch._int_mm`` at batch 1 here, and torchao's int8 configs,
the successor API, run about 10x slower than float32 on CPU without ``torch.compile``.
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


def _has_vnni() -> bool:
    """Whether the CPU has VNNI (int8 dot products accumulated in int32): Linux's cpuinfo flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


# fbgemm quantizes activations to 7 bits by default ("reduce_range"): without VNNI its u8·s8 pair sums go
# through int16 and could saturate. With VNNI they accumulate in int32, and the 8th bit matters: on
# SmolLM2-135M, int8 perplexity (1,024 held-out tokens) measured +13.8% over float32 with 7-bit
# activations and +4.3% with 8-bit ones.
REDUCE_RANGE = not _has_vnni()


def _dynamic_linear_cls() -> type[nn.Module]:
    try:
        from torch.ao.nn.quantized.dynamic import Linear
    except ImportError as exc:  # a torch without the ao dynamic kernels
        raise RuntimeError("this torch build has no dynamic int8 Linear (torch.ao.nn.quantized.dynamic)") from exc
    return Linear


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W int8 (one scale per output channel) and x quantized per row. x: (..., in) → (..., out)."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        zero = torch.zeros(len(scale), dtype=torch.long)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's notice that qint8 tensors move to torchao
            weight = torch._make_per_channel_quantized_tensor(weight_int8, scale.double(), zero, 0)
            self.linear = _dynamic_linear_cls()(self.in_features, self.out_features, dtype=torch.qint8)
            self.linear.set_weight_bias(weight, None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._rows = torch.zeros(0, self.in_features)  # row 0: the sentinel; rows 1..M: this call's rows

    @property
    def weight_int8(self) -> torch.Tensor:
        return self.linear.weight().int_repr()

    @property
    def scale(self) -> torch.Tensor:
        return self.linear.weight().q_per_channel_scales().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()  # (M, in)
        M = rows.shape[0]
        if self._rows.shape[0] < M + 1:
            self._rows = torch.zeros(max(M + 1, 2 * self._rows.shape[0]), self.in_features)
            self._rows[0, :2] = torch.tensor([1.0, -1.0])  # pins the per-tensor range to [-1, 1]
        x_scale = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_(min=1e-8)  # (M, 1)
        torch.div(rows, x_scale, out=self._rows[1 : M + 1])
        y = torch.ops.quantized.linear_dynamic(self._rows[: M + 1], self.linear._packed_params._packed_params, REDUCE_RANGE)[1:] * x_scale  # (M, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


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


def _quantize_linear(linear: nn.Linear) -> Int8Linear:
    weight = linear.weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # symmetric, per output channel
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Linear(q, scale, linear.bias)


@torch.no_grad()
def quantize(model: PreTrainedModel) -> list[str]:
    """Replace every projection with an ``Int8Linear``, in place; returns the quantized module names."""
    names = projection_names(model)
    for name in names:
        _set_module(model, name, _quantize_linear(to_linear(model.get_submodule(name))))
    return names


def save(model: PreTrainedModel, names: list[str], output_dir: Path, source: str) -> dict:
    """Write weights (int8 + scales for ``names``, float for the rest), config and the manifest."""
    tensors: dict[str, torch.Tensor] = {}
    quantized = set(names)
    for name, module in model.named_modules():
        if name in quantized:
            tensors[f"{name}.weight_int8"] = module.weight_int8.contiguous()
            tensors[f"{name}.weight_scale"] = module.scale
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias
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
    for name, (q8, scale, bias) in int8_parts.items():
        _set_module(model, name, Int8Linear(q8, scale, bias))
    return model.eval()
