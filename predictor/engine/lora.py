"""Multi-LoRA serving: peft adapters applied per row inside the one batched forward.

Adapters (``--lora_modules NAME=DIR``: peft's ``adapter_config.json`` + ``adapter_model.safetensors``) are
checked against the base model at start-up (every module they target exists and is a projection whose
in/out features match their A and B) and kept in host memory. Each targeted projection is wrapped once in
a ``LoRALinear`` that holds ``--max_loras`` slots of stacked weights:

    A: (slots × r, in)          slot s's rows (s-1)·r … (s-1)·r + rank: its lora_A
    B: (slots × r, out)         the same rows: its (scale · lora_B)ᵀ

(r is the largest rank among the registered adapters; a smaller adapter's extra rows are zero, and so
are the rows of a slot whose adapter does not target this module). A step's tokens each carry their
row's slot (0: the base model); the runner sets a per-step ``LoRAContext`` before the forward, whose
one-hot column mask M (tokens × slot columns, shared by every layer) selects each token's own slot, so

    y = base(x) + ((x @ Aᵀ) ⊙ M) @ B

is two small dense matrix products per projection for the whole batch, whatever mix of adapters it
holds (measured on this project's CPU against grouping tokens by slot and against a per-token gather
of A and B, punica's bgmv: see the README). A step with only base rows skips the delta entirely; the
product is restricted to the columns of the slots the step uses. The wrapped base projection is still
prepacked for oneDNN by ``packing.py`` (the wrapper is applied first, and packing replaces its ``base``).

Slots are filled on demand: an adapter is copied into a free slot, or into the least recently used slot
no running sequence uses; a request whose adapter finds no slot waits in the scheduler (``acquire``
returns None). With no more adapters than slots they are all loaded once, at start-up.

Runtime updates (``--enable_lora_runtime_updates``: ``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``,
vLLM's routes): every projection of the model is wrapped at start-up with slots of ``--max_lora_rank``, so that
an adapter registered later, checked as at start-up, is served at once. An adapter being unloaded takes no new
requests and leaves once its waiting and running requests are done. Each registration has its own ``uid``, which
seeds the prefix-cache hashes: an adapter loaded again under the same name never reuses the old one's blocks.

Over 400 lines because it is one piece: the adapter format's checks, the stacked slots and the per-row delta they feed,
and the registry that hands slots out and evicts, which share the slot layout above.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..loading import ModelLoadError

logger = logging.getLogger("kserve")  # KServe configures this logger: slot loads show in the server log

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
# peft also saves the base weights of an LM head or embedding it targets (save_embedding_layers): accepted when unchanged
_BASE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?:\.base_layer)?\.(?P<param>weight|bias)$")


class LoRAError(ModelLoadError):
    """An adapter cannot be served with this base model; the message says which and why."""


_UIDS = itertools.count(1)


@dataclass
class LoRAAdapter:
    """One adapter, checked against the base model: per targeted module, A (rank, in) and (scale · B)ᵀ (rank, out)."""

    name: str
    path: Path
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    uid: int = field(default_factory=lambda: next(_UIDS))  # this registration (a name loaded again gets a new one)


def parse_lora_module(value: str) -> tuple[str, Path]:
    """``NAME=DIR`` → (name, local directory)."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"{value!r} is not NAME=DIR (an adapter name, '=', and its local peft adapter directory)")
    if "://" in path:
        raise ValueError(f"{value!r}: {path} is a URI; give a local directory (mount the adapter, as KServe's storage initializer does for the model)")
    return name, Path(path)


def projection_features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a projection LoRA can wrap (``nn.Linear``, GPT-2's ``Conv1D``, int8), else None."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]  # stored (in, out): peft's fan_in_fan_out
    if isinstance(module, nn.Linear) or (isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)):
        return module.in_features, module.out_features
    return None


def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():  # peft's get_pattern_key: the key matches the end of the module name
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(name: str, path: Path, model: nn.Module, max_rank: int, where: str | None = None, digests: dict[str, bytes] | None = None) -> LoRAAdapter:
    """Read and check one peft LoRA adapter against ``model``; raises ``LoRAError`` with the reason (prefixed ``where``).

    ``digests`` (``weight_digests``, taken before the model was packed) stand in for the weights an adapter may
    carry unchanged copies of, once the model's own are packed and cannot be compared."""
    from safetensors.torch import load_file

    where = where or f"--lora_modules {name}={path}"
    if not path.is_dir():
        raise LoRAError(f"{where}: {path} is not a directory")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise LoRAError(f"{where}: no {CONFIG_FILE} (not a peft adapter directory)") from None
    except (OSError, ValueError) as exc:
        raise LoRAError(f"{where}: cannot read {CONFIG_FILE}: {exc}") from None
    if not (path / WEIGHTS_FILE).is_file():
        raise LoRAError(f"{where}: no {WEIGHTS_FILE} (pickle adapter weights are not loaded; save with safe_serialization)")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{where}: peft_type is {config.get('peft_type')!r}, only LORA adapters are served")
    for key, why in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save (full trained copies of modules)"), ("lora_bias", "LoRA bias terms")):
        if config.get(key):
            raise LoRAError(f"{where}: {why} is not supported by per-row LoRA serving")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{where}: bias={config['bias']!r} trains the base model's biases; only bias='none' adapters are served")
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise LoRAError(f"{where}: cannot read {WEIGHTS_FILE}: {exc}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            if _is_base_copy(key, tensor, model, digests):
                continue
            raise LoRAError(
                f"{where}: tensor {key!r} is not a LoRA A/B weight of a projection, nor an unchanged base weight "
                "(embedding LoRA and trained copies of modules are not supported)"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise LoRAError(f"{where}: {WEIGHTS_FILE} holds no LoRA weights")
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    alpha, use_rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    weights, rank = {}, 0
    for module_name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{where}: module {module_name} has lora_{''.join(ab)} but not both lora_A and lora_B")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise LoRAError(
                f"{where}: the adapter targets {module_name}, which the base model ({type(model).__name__}) does not have: "
                f"an adapter of another base model? (its base_model_name_or_path: {config.get('base_model_name_or_path')!r})"
            ) from None
        features = projection_features(module)
        if features is None:
            raise LoRAError(f"{where}: the adapter targets {module_name}, a {type(module).__name__}; only linear projections take LoRA here")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or a.shape[1] != features[0] or b.shape[0] != features[1]:
            raise LoRAError(
                f"{where}: {module_name} has in_features {features[0]}, out_features {features[1]} in the base model, but the adapter's "
                f"lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}: an adapter of another base model"
            )
        if r > max_rank:
            raise LoRAError(f"{where}: rank {r} (at {module_name}) is above --max_lora_rank {max_rank}; raise --max_lora_rank")
        r_alpha = float(_pattern_value(config.get("alpha_pattern"), module_name, alpha))
        scale = r_alpha / math.sqrt(r) if use_rslora else r_alpha / r
        weights[module_name] = (a.to(device, dtype).contiguous(), (b.float().t() * scale).to(device, dtype).contiguous())
        rank = max(rank, r)
    return LoRAAdapter(name, path, rank, weights)


def _is_base_copy(key: str, tensor: torch.Tensor, model: nn.Module, digests: dict[str, bytes] | None = None) -> bool:
    match = _BASE_KEY.match(key)
    if match is None:
        return False
    if digests is not None:
        return digests.get(f"{match['module']}.{match['param']}") == _digest(tensor)
    try:
        base = model.get_submodule(match["module"])
    except AttributeError:
        return False
    param = getattr(base, match["param"], None)
    return isinstance(param, torch.Tensor) and param.shape == tensor.shape and torch.equal(param.detach().cpu().to(tensor.dtype), tensor)


class LoRAContext:
    """A step's token → slot assignment, read by every ``LoRALinear`` of the forward."""

    def __init__(self, slots: int, rank: int):
        self.rank = rank
        self.column_slot = torch.arange(slots * rank) // rank + 1  # (C,) the slot each stacked column belongs to
        self.active = False
        self.n = 0
        self.lo = self.hi = 0
        self.range = (0, 0)  # (lo, hi): the stacked rows this step uses
        self.mask: torch.Tensor | None = None  # (N, hi - lo)
        self.kept_mask: torch.Tensor | None = None  # the rows ``keep`` selects (an LM head sees only those)

    def set(self, token_slots: list[int], keep: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        used = {s for s in token_slots if s}
        self.active = bool(used)
        if not used:
            self.mask = self.kept_mask = None
            return
        r = self.rank
        self.n, self.lo, self.hi = len(token_slots), (min(used) - 1) * r, max(used) * r
        self.range = (self.lo, self.hi)
        slots = torch.tensor(token_slots)
        self.mask = (self.column_slot[None, self.lo : self.hi] == slots[:, None]).to(device=device, dtype=dtype)
        self.kept_mask = self.mask[keep.cpu()] if keep is not None else None


class LoRALinear(nn.Module):
    """``base(x) + ((x @ Aᵀ) ⊙ M) @ B``: each token gets its own row's adapter (see the module docstring).

    ``base`` stays a child module, so ``packing.py`` still packs it for oneDNN."""

    def __init__(
        self, base: nn.Module, in_features: int, out_features: int, slots: int, rank: int, context: LoRAContext, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.context = context
        self.register_buffer("lora_a", torch.zeros(slots * rank, in_features, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(slots * rank, out_features, dtype=dtype, device=device))
        self._range: tuple[int, int] | None = None  # views of the rows in use, kept while the slots in use stay the same
        self._a = self._b = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self.context
        if not ctx.active:
            return y
        if self._range != ctx.range:  # plain attributes: a decode step calls every projection once, so lookups count
            self._range, self._a, self._b = ctx.range, self.lora_a[ctx.lo : ctx.hi].t(), self.lora_b[ctx.lo : ctx.hi]
        rows = x.reshape(-1, self.in_features)
        mask = ctx.mask if rows.shape[0] == ctx.n else ctx.kept_mask
        if mask is None or mask.shape[0] != rows.shape[0]:
            raise RuntimeError(f"LoRA context covers {ctx.n} tokens, the projection got {rows.shape[0]}")
        h = torch.mm(rows, self._a).mul_(mask)  # (N, columns)
        if y.is_contiguous():
            y.view(-1, self.out_features).addmm_(h, self._b)
            return y
        return y + torch.mm(h, self._b).view(y.shape)

    def load_slot(self, slot: int, rank: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        rows = slice((slot - 1) * rank, slot * rank)
        self.lora_a[rows].zero_()
        self.lora_b[rows].zero_()
        if weights is not None:
            a, bt = weights
            self.lora_a[rows.start : rows.start + a.shape[0]].copy_(a)
            self.lora_b[rows.start : rows.start + bt.shape[0]].copy_(bt)


class LoRAManager:
    """The registered adapters, the ``max_loras`` slots and which adapter each holds. Engine thread only
    (``acquire``/``release`` are called by the scheduler under the engine's lock)."""

    def __init__(self, adapters: list[LoRAAdapter], max_loras: int, rank: int | None = None, targets: list[str] | None = None):
        """``rank`` and ``targets`` (module names to wrap) default to what ``adapters`` need; runtime updates give
        ``--max_lora_rank`` and every projection, so that later adapters fit."""
        self.adapters = {a.name: a for a in adapters}
        self.max_loras = max_loras
        self.rank = rank if rank is not None else max(a.rank for a in adapters)
        self.targets = targets
        self.unloading: set[str] = set()  # adapters taking no new requests, removed once their requests are done
        self.digests: dict[str, bytes] | None = None  # weight_digests, for runtime loads
        self.context = LoRAContext(max_loras, self.rank)
        self.modules: dict[str, LoRALinear] = {}
        self.slot_adapter: list[str | None] = [None] * (max_loras + 1)  # index 0: the base model, never used
        self.refs = [0] * (max_loras + 1)
        self.idle: OrderedDict[int, None] = OrderedDict()  # loaded slots no running sequence uses, least recently used first
        self.loads = 0

    @classmethod
    def load(cls, modules: list[tuple[str, Path]], model: nn.Module, max_loras: int, max_rank: int, runtime_updates: bool = False) -> LoRAManager:
        adapters = [load_adapter(name, path, model, max_rank) for name, path in modules]
        if runtime_updates:
            manager = cls(adapters, max_loras, rank=max_rank, targets=projections(model))
            manager.digests = weight_digests(model)
            return manager
        return cls(adapters, max_loras)

    def attach(self, model: nn.Module) -> int:
        """Wrap every projection some adapter targets, or every one of ``targets`` (before packing); fill the slots
        if all adapters fit."""
        param = next(model.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        targets = self.targets if self.targets is not None else sorted({m for a in self.adapters.values() for m in a.weights})
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            in_f, out_f = projection_features(base)
            wrapper = LoRALinear(base, in_f, out_f, self.max_loras, self.rank, self.context, dtype, param.device)
            setattr(parent, child, wrapper)
            self.modules[name] = wrapper
        if len(self.adapters) <= self.max_loras:
            for slot, name in enumerate(self.adapters, start=1):
                self._load(slot, name)
        return len(targets)

    def register(self, adapter: LoRAAdapter, where: str) -> None:
        """Serve ``adapter`` from now on (runtime updates; the engine's lock held). ``LoRAError`` if it cannot be."""
        if adapter.name in self.adapters:
            raise LoRAError(f"{where}: an adapter named '{adapter.name}' is already loaded; unload it first")
        if adapter.rank > self.rank:
            raise LoRAError(f"{where}: rank {adapter.rank} is above --max_lora_rank {self.rank}")
        unwrapped = sorted(set(adapter.weights) - set(self.modules))
        if unwrapped:
            raise LoRAError(f"{where}: the adapter targets {unwrapped[0]}, which is not a projection this server can adapt")
        self.adapters[adapter.name] = adapter
        logger.info("LoRA adapter %s registered (rank %d, %d projections, %s)", adapter.name, adapter.rank, len(adapter.weights), adapter.path)

    def remove(self, name: str) -> None:
        """Forget ``name`` (no request of it waiting or running; the engine's lock held): its slot becomes free."""
        slot = self.slot_of(name)
        if slot is not None:
            self.slot_adapter[slot] = None
            self.idle.pop(slot, None)
        self.adapters.pop(name, None)
        self.unloading.discard(name)
        logger.info("LoRA adapter %s unloaded", name)

    def hash_seed(self, name: str | None) -> bytes:
        """Seeds a request's prefix-cache block hashes: blocks computed with one adapter registration never serve another
        (nor the base model)."""
        return b"" if name is None else b"lora\0" + name.encode() + b"\0" + str(self.adapters[name].uid).encode()

    def slot_of(self, name: str) -> int | None:
        try:
            return self.slot_adapter.index(name, 1)
        except ValueError:
            return None

    def can_acquire(self, name: str) -> bool:
        return self.slot_of(name) is not None or None in self.slot_adapter[1:] or bool(self.idle)

    def acquire(self, name: str) -> int | None:
        """The slot holding ``name`` for one more running sequence, loading it if needed; None if every slot is in use."""
        slot = self.slot_of(name)
        if slot is None:
            empty = [s for s in range(1, self.max_loras + 1) if self.slot_adapter[s] is None]
            if empty:
                slot = empty[0]
            elif self.idle:
                slot = next(iter(self.idle))  # least recently used
            else:
                return None
            self._load(slot, name)
        self.idle.pop(slot, None)
        self.refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.refs[slot] -= 1
        if self.refs[slot] == 0:
            self.idle[slot] = None  # most recently used at the end

    def _load(self, slot: int, name: str) -> None:
        adapter = self.adapters[name]
        for module_name, module in self.modules.items():
            module.load_slot(slot, self.rank, adapter.weights.get(module_name))
        self.slot_adapter[slot] = name
        self.idle[slot] = None
        self.idle.move_to_end(slot)
        self.loads += 1
        logger.info("LoRA adapter %s loaded into slot %d of %d", name, slot, self.max_loras)

    def set_step(self, token_slots: list[int], keep: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        self.context.set(token_slots, keep, dtype, device)

    def describe(self) -> str:
        return f"LoRA: {len(self.adapters)} adapters (rank ≤ {self.rank}) on {len(self.modules)} projections, {self.max_loras} slots"


def _digest(tensor: torch.Tensor) -> bytes:
    return hashlib.blake2b(tensor.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


def weight_digests(model: nn.Module) -> dict[str, bytes]:
    """Digests of the weights peft may save unchanged beside an adapter (the embeddings, ``save_embedding_layers``), by
    parameter name: taken before packing, for adapters loaded at runtime."""
    embeddings = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return {
        f"{name}.{param_name}": _digest(param)
        for name, module in model.named_modules()
        if id(module) in embeddings
        for param_name, param in module.named_parameters(recurse=False)
    }


def projections(model: nn.Module) -> list[str]:
    """Names of every module of ``model`` that LoRA can wrap (its projections, the LM head included)."""
    return sorted(name for name, module in model.named_modules() if name and projection_features(module) is not None)
