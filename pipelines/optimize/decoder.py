"""Where the parts of a decoder-only model are, per family, and how to rebuild one with fewer of them.

Pruning and distillation only need to know, for each family: the ModuleList of decoder layers; in each
layer, the MLP projections into the intermediate neurons and the one back out of them; the separate
q/k/v/o attention projections where there are any; and the config attribute of the intermediate size.
Restructured models are built fresh from their new config (``AutoModelForCausalLM.from_config``) and
loaded strictly with a transformed state dict, so that every internal attribute (layer index, attention
type, head counts) agrees with the config, and the result loads with plain transformers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from . import OptimizationError


@dataclass(frozen=True)
class Family:
    """Module paths of one decoder family's parts: ``layers`` from the model, the rest from a decoder layer.

    A module path is also its parameters' state-dict prefix (``model.layers`` → ``model.layers.3.mlp...``)."""

    layers: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    attention: tuple[str, str, str, str] | None = None  # q, k, v, o, where separate
    fused_qkv: str = ""  # the one projection computing q, k and v where they are not separate
    conv1d: bool = False  # GPT-2's Conv1D: weights stored (in, out), not (out, in)
    fused_gate_up: bool = False  # phi3: one projection whose output rows are [gate; up]
    intermediate: str = "intermediate_size"


_LLAMA = Family(
    layers="model.layers",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
)
FAMILIES = {
    "gpt2": Family("transformer.h", ("mlp.c_fc",), "mlp.c_proj", fused_qkv="attn.c_attn", conv1d=True, intermediate="n_inner"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "phi3": Family("model.layers", ("mlp.gate_up_proj",), "mlp.down_proj", fused_qkv="self_attn.qkv_proj", fused_gate_up=True),
    "gpt_neox": Family("gpt_neox.layers", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", fused_qkv="attention.query_key_value"),
}


def family(model: PreTrainedModel) -> Family:
    """The parts table of ``model``'s family, or an ``OptimizationError`` naming its model_type."""
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise OptimizationError(f"model_type {model_type!r} is not a decoder family this toolkit knows; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.get_submodule(family(model).layers)


def intermediate_size(config: PretrainedConfig) -> int:
    """The MLP width; GPT-2's ``n_inner`` None means 4 × ``n_embd``."""
    size = getattr(config, FAMILIES[config.model_type].intermediate)
    return size if size is not None else 4 * config.hidden_size


def head_counts(config: PretrainedConfig) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def rebuild(model: PreTrainedModel, state: dict[str, torch.Tensor], **config_changes) -> PreTrainedModel:
    """A fresh model of ``model``'s config with ``config_changes``, loaded strictly with ``state``.

    The changed config is validated first, so a shape its family's config refuses (and ``from_pretrained``
    would refuse later) is an ``OptimizationError`` here."""
    config = copy.deepcopy(model.config)
    for key, value in config_changes.items():
        setattr(config, key, value)
    try:
        config.validate()
    except (StrictDataclassError, ValueError) as exc:
        raise OptimizationError(f"{config.model_type}'s config refuses {config_changes}: {exc}") from None
    new = AutoModelForCausalLM.from_config(config)
    new.load_state_dict(state, strict=True)
    return new.eval()


def keep_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A copy of ``model`` with only the decoder layers ``keep`` (in that order), ``layer_types`` subset alike."""
    prefix = family(model).layers + "."
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) not in new_index:
                continue
            key = f"{prefix}{new_index[int(index)]}.{rest}"
        state[key] = value
    changes: dict = {"num_hidden_layers": len(keep)}
    if getattr(model.config, "layer_types", None) is not None:
        changes["layer_types"] = [model.config.layer_types[i] for i in keep]
    return rebuild(model, state, **changes)
