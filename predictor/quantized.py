"""The int8 model directory: int8 weights for the projections, written and read as safetensors.

A directory with ``quantization.json`` holds a Hugging Face model whose listed projections (GPT-2's
``Conv1D`` included, converted to ``nn.Linear`` first) are int8 weights with one float scale per output
channel (symmetric). Everything else (embeddings, norms, and by default the LM head, whose error goes straight
into the logits) stays float. ``predictor.loading`` reads it; the pipeline's ``optimize --method int8`` writes it.

W8A8 with SmoothQuant (Xiao et al., 2023): activations have a few channels of much larger magnitude than the
rest, which per-token int8 rounds badly. With calibration text, each projection's input channel j is divided
by ``smooth_j = amax(|x_j|)^α / amax(|W_:,j|)^(1-α)`` (α = ``SMOOTHQUANT_ALPHA``) and its weight column
multiplied by it, an identity in float that moves the outliers' range into the weights, which are quantized per
output channel. Projections that read the same input (q/k/v, gate/up) share one smoothing vector, so the runner
can compute them as one product. On SmolLM2-135M-Instruct (the demo corpus's held-out split, 5,573 tokens):
perplexity +4.2% over float32 with every projection quantized and no smoothing, +3.1% with the LM head kept
float, +0.9% with smoothing as well (greedy agreement 0.903, 0.917, 0.959).

At run time activations are quantized dynamically, per token: each row is divided by its own absolute maximum,
so every row is quantized on its own full range and a sequence's numbers do not depend on its batch neighbours
(with one per-tensor range a neighbour's outliers coarsen every other row: measured, greedy output diverged
within a few tokens on a test model). The integer product then runs on one of two backends (``INT8_BACKEND``):

- ``onednn`` where the CPU has AMX-INT8: the rows become uint8 around zero point 128 (oneDNN's fast path; signed
  int8 input takes a path ~100x slower) and oneDNN's ``qlinear_pointwise`` multiplies them with the AMX tiles.
  Measured on an Intel Xeon with AMX (2 cores, 16 rows): 0.045 ms for 576×3,072 and 0.035 ms for 1,536×576,
  against fbgemm's 0.072 and 0.126 ms;
- ``fbgemm`` elsewhere: PyTorch's dynamic int8 Linear, whose one per-tensor range is pinned to [-1, 1] by a sentinel
  row (8-bit activations where the CPU has VNNI, see ``REDUCE_RANGE``). Measured on an AMD EPYC: ~2.5x faster than
  ``torch._int_mm`` at batch 1 and faster than oneDNN there (576×3,072 at 16 rows: 58 µs against 76 µs).

Integer sums are exact, so either way a row's output does not depend on what else is in the batch. torchao's int8
configs, the successor API, run about 10x slower than float32 on CPU without ``torch.compile``. The rest of the
model runs in the dtype it is loaded in (bfloat16 where the CPU has native bfloat16 products): each int8 product
takes and returns that dtype.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from . import opaque_ops
from .cpu import cpu_info

MANIFEST = "quantization.json"
FORMAT = "kserve-llm/int8-dynamic-per-channel"
WEIGHTS = "model.safetensors"
SMOOTHQUANT_ALPHA = 0.5  # α 0.5 measured +0.90% perplexity on SmolLM2, 0.7 +1.21%
KEEP_FLOAT = ("lm_head",)  # left float by default
CALIBRATION_CHUNK = 512  # tokens per calibration forward


# fbgemm quantizes activations to 7 bits by default ("reduce_range"): without VNNI its u8·s8 pair sums go
# through int16 and could saturate. With VNNI they accumulate in int32, and the 8th bit matters: on
# SmolLM2-135M, int8 perplexity (1,024 held-out tokens) measured +13.8% over float32 with 7-bit
# activations and +4.3% with 8-bit ones.
REDUCE_RANGE = not ({"avx512_vnni", "avx_vnni"} & cpu_info().flags)


def default_backend() -> str:
    """``onednn`` where the CPU has AMX-INT8 and this torch has oneDNN's quantized linear, else ``fbgemm``."""
    has_onednn = hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available()
    return "onednn" if "amx_int8" in cpu_info().flags and has_onednn else "fbgemm"


INT8_BACKEND = default_backend()
ONEDNN_ZERO_POINT = 128  # uint8 activations: round(x / absmax * 127) + 128 lies in [1, 255]


def _dynamic_linear_cls() -> type[nn.Module]:
    try:
        from torch.ao.nn.quantized.dynamic import Linear
    except ImportError as exc:  # a torch without the ao dynamic kernels
        raise RuntimeError("this torch build has no dynamic int8 Linear (torch.ao.nn.quantized.dynamic)") from exc
    return Linear


class Int8Linear(nn.Module):
    """``y = q(x / s) @ q(W * s).T + b``: W int8 (one scale per output channel), x quantized per row after the optional
    SmoothQuant division by ``smooth`` (s, per input channel). x: (..., in) → (..., out), in x's dtype."""

    def __init__(
        self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor | None = None, backend: str | None = None
    ):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.backend = backend or INT8_BACKEND
        self.register_buffer("_scale", scale.detach().float().contiguous(), persistent=False)
        if self.backend == "onednn":  # oneDNN's packed layout cannot be read back: the int8 weight is kept beside it
            self._weight_int8 = weight_int8.detach().contiguous()
            self.packed = torch.ops.onednn.qlinear_prepack(self._weight_int8, None)
            self.weight_zero_points = torch.zeros(self.out_features, dtype=torch.long)
        elif self.backend == "fbgemm":
            zero = torch.zeros(len(scale), dtype=torch.long)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch's notice that qint8 tensors move to torchao
                weight = torch._make_per_channel_quantized_tensor(weight_int8.detach().contiguous(), self._scale.double(), zero, 0)
                self.linear = _dynamic_linear_cls()(self.in_features, self.out_features, dtype=torch.qint8)
                self.linear.set_weight_bias(weight, None)
        else:
            raise ValueError(f"unknown int8 backend {self.backend!r} (onednn, fbgemm)")
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().contiguous())
        self.register_buffer("inverse_smooth", None if smooth is None else (1.0 / self.smooth))
        sentinel = torch.zeros(1, self.in_features)
        sentinel[0, :2] = torch.tensor([1.0, -1.0])
        self.register_buffer("sentinel", sentinel, persistent=False)
        self.handle = opaque_ops.register(self)

    def _apply(self, fn, recurse=True):  # .to(dtype) casts the model's float parts; this module's stay float32
        return self

    @property
    def weight_int8(self) -> torch.Tensor:
        return self._weight_int8 if self.backend == "onednn" else self.linear.weight().int_repr()

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """The integer product of normalised rows → (M', out) float32. ``onednn``: rows (M, in) uint8, each
        ``round(x / absmax * 127) + 128``, product in units of 1/127; ``fbgemm``: rows (1 + M, in) float32 within [-1, 1] after the sentinel row
        holding both bounds (its one per-tensor range)."""
        if self.backend == "onednn":
            # x_scale 1: each output is one rounding of (exact integer sum) × weight scale whatever kernel oneDNN picks
            # for M rows (with 1/127 there, results differed in the last bit between batch sizes); 1/127 is applied after.
            return torch.ops.onednn.qlinear_pointwise(
                rows, 1.0, ONEDNN_ZERO_POINT, self.packed, self._scale, self.weight_zero_points, None, 1.0, 0, torch.float32, "none", [], ""
            )
        return torch.ops.quantized.linear_dynamic(rows, self.linear._packed_params._packed_params, REDUCE_RANGE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()  # (M, in)
        if self.inverse_smooth is not None:
            rows = rows * self.inverse_smooth
        x_scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-8)  # (M, 1)
        if self.backend == "onednn":
            normalised = (rows * (127 / x_scale)).round_().add_(ONEDNN_ZERO_POINT).to(torch.uint8)  # (M, in) in [1, 255]
        else:
            normalised = torch.cat([self.sentinel, rows / x_scale])  # (1 + M, in): row 0 pins fbgemm's range to [-1, 1]
        if torch.compiler.is_compiling():  # inside a compiled step: an opaque operator (compiled_step.py)
            y = opaque_ops.int8_linear(normalised, self.handle)
        else:
            y = self.product(normalised)
        y = y * (x_scale / 127) if self.backend == "onednn" else y[1:] * x_scale  # (M, out)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def concatenate(siblings: list[Int8Linear]) -> Int8Linear | None:
    """One ``Int8Linear`` computing ``siblings`` (projections of the same input) side by side, or None when they
    differ in input size, bias or smoothing (each output channel keeps its own scale, so this is exact)."""
    first = siblings[0]
    if len({m.in_features for m in siblings}) != 1 or len({m.bias is None for m in siblings}) != 1:
        return None
    if any((m.smooth is None) != (first.smooth is None) or (m.smooth is not None and not torch.equal(m.smooth, first.smooth)) for m in siblings):
        return None
    bias = None if first.bias is None else torch.cat([m.bias for m in siblings])
    return Int8Linear(torch.cat([m.weight_int8 for m in siblings]), torch.cat([m.scale for m in siblings]), bias, first.smooth, first.backend)


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
    """Every Conv1D and nn.Linear in the model, LM head included."""
    return [name for name, m in model.named_modules() if isinstance(m, (Conv1D, nn.Linear))]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _quantize_linear(linear: nn.Linear, smooth: torch.Tensor | None = None) -> Int8Linear:
    weight = linear.weight.detach().float()
    if smooth is not None:
        weight = weight * smooth[None, :]
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # symmetric, per output channel
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Linear(q, scale, linear.bias, smooth)


@torch.no_grad()
def input_ranges(model: PreTrainedModel, names: list[str], calibration: Iterable[list[int]]) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Each projection's largest input magnitude per channel over the calibration token sequences, and the groups
    of projections that read the same input tensor (q/k/v, gate/up), found by running the model."""
    ranges: dict[str, torch.Tensor] = {}
    groups: dict[str, set[str]] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # input tensors of this forward (kept alive, so ids stay unique) → first reader
    handles = []
    for name in names:
        def record(module, inputs, output, name=name):
            x = inputs[0]
            amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            ranges[name] = torch.maximum(ranges[name], amax) if name in ranges else amax
            first = seen.setdefault(id(x), (x, name))[1]
            groups.setdefault(first, {first}).add(name)

        handles.append(model.get_submodule(name).register_forward_hook(record))
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or CALIBRATION_CHUNK
    chunk = min(CALIBRATION_CHUNK, context)
    try:
        for ids in calibration:
            for at in range(0, len(ids), chunk):
                seen.clear()
                model(input_ids=torch.tensor([ids[at : at + chunk]]))
    finally:
        for handle in handles:
            handle.remove()
    return ranges, [sorted(g, key=names.index) for g in groups.values()]


def smoothing(ranges: torch.Tensor, weights: list[torch.Tensor], alpha: float = SMOOTHQUANT_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel divisor for projections of one input: ranges (in,), weights [(out_i, in)] → (in,)."""
    weight_range = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    return (ranges.clamp(min=1e-5) ** alpha / weight_range.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def quantize(model: PreTrainedModel, calibration: list[list[int]] | None = None, keep_float: Iterable[str] = KEEP_FLOAT) -> list[str]:
    """Replace every projection but ``keep_float`` with an ``Int8Linear``, in place; returns the quantized module names.

    ``calibration``: token sequences to measure activation ranges on, for SmoothQuant; None quantizes without it."""
    keep = set(keep_float)
    names = [n for n in projection_names(model) if n not in keep]
    for name in names:  # Conv1D → Linear first, so calibration sees what is quantized
        _set_module(model, name, to_linear(model.get_submodule(name)))
    smooth: dict[str, torch.Tensor] = {}
    if calibration:
        ranges, groups = input_ranges(model.eval(), names, calibration)
        for group in groups:
            s = smoothing(ranges[group[0]], [model.get_submodule(n).weight for n in group])
            smooth.update(dict.fromkeys(group, s))
    for name in names:
        _set_module(model, name, _quantize_linear(model.get_submodule(name), smooth.get(name)))
    return names


def save(model: PreTrainedModel, names: list[str], output_dir: Path, source: str, calibration_tokens: int = 0) -> dict:
    """Write weights (int8 + scales (+ smoothing) for ``names``, float for the rest), config and the manifest."""
    tensors: dict[str, torch.Tensor] = {}
    quantized = set(names)
    for name, module in model.named_modules():
        if name in quantized:
            tensors[f"{name}.weight_int8"] = module.weight_int8.contiguous()
            tensors[f"{name}.weight_scale"] = module.scale
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias
            if module.smooth is not None:
                tensors[f"{name}.smooth"] = module.smooth
    for key, value in model.state_dict().items():
        if not any(key.startswith(n + ".") for n in quantized) and isinstance(value, torch.Tensor) and value.is_floating_point():
            tensors.setdefault(key, value.detach().contiguous())
    # Shared tensors (a tied LM head) are stored once each; safetensors refuses aliases.
    save_file({k: v.clone() for k, v in tensors.items()}, str(output_dir / WEIGHTS), metadata={"format": "pt"})
    if "lm_head" in quantized:
        model.config.tie_word_embeddings = False  # an int8 head no longer shares the embedding
    model.config.save_pretrained(output_dir)
    manifest = {
        "format": FORMAT,
        "modules": names,
        "source": source,
        "smoothquant": {"alpha": SMOOTHQUANT_ALPHA, "calibration_tokens": calibration_tokens} if calibration_tokens else None,
    }
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def is_int8_dir(model_dir: Path) -> bool:
    return (model_dir / MANIFEST).is_file()


@torch.no_grad()
def load(model_dir: Path, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Rebuild the int8 model written by ``save``; its float parts in ``dtype``."""
    manifest = json.loads((model_dir / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{model_dir / MANIFEST}: unknown format {manifest.get('format')!r}")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    tensors = load_file(str(model_dir / WEIGHTS))
    names = manifest["modules"]
    int8_parts = {
        n: (tensors.pop(f"{n}.weight_int8"), tensors.pop(f"{n}.weight_scale"), tensors.pop(f"{n}.bias", None), tensors.pop(f"{n}.smooth", None))
        for n in names
    }
    missing, unexpected = model.load_state_dict(tensors, strict=False)  # the float parts, before the swap
    missing = [k for k in missing if not any(k.startswith(n + ".") for n in names)]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: int8 weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(dtype)
    for name, (q8, scale, bias, smooth) in int8_parts.items():
        _set_module(model, name, Int8Linear(q8, scale, bias, smooth))
    return model.eval()
