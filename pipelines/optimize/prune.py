"""Structured pruning of a decoder-only model: MLP neurons, whole decoder layers and attention KV groups.

Every choice is made by a score measured on calibration text:
- a neuron's importance is the mean absolute input of the MLP's output projection at that neuron (for a
  gated MLP, act(gate)·up) times the norm of that projection's weights for it: how much it moves the
  residual stream. The same number is kept in every layer, since the config has one intermediate size;
- a layer's importance is how much the calibration loss rises when that layer is skipped;
- a KV group's importance (a KV head with the G query heads that read it) is, alike, the mean absolute
  input of o_proj over the group's query-head channels times the norms of o_proj's columns for them. The
  same number of groups is kept in every layer.
The result is a standard config of the same family (smaller intermediate size, fewer layers, fewer heads
with an explicit ``head_dim``) that loads with plain transformers and is genuinely smaller and faster.
Quality is recovered with ``distill`` (``recover_steps``).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from predictor.loading import LoadedModel

from ..corpus import demo_corpus, read_corpus, split_documents
from ..tokenizer import tokenize
from . import OptimizationError, copy_tokenizer
from .decoder import Family, decoder_layers, family, head_counts, intermediate_size, keep_layers, rebuild


def calibration_ids(loaded: LoadedModel, text: str | None, windows: int, seq_len: int) -> torch.Tensor:
    """(windows, seq_len) token ids from the start of the training split of ``text`` (default: the demo corpus)."""
    documents = read_corpus(text) if text else demo_corpus()
    train_text, _ = split_documents(documents)
    ids = tokenize(loaded.tokenizer, train_text[: windows * seq_len * 8])
    n = min(windows, len(ids) // seq_len)
    if n == 0:
        raise OptimizationError(f"calibration text has {len(ids)} tokens; need at least {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def loss_on(model: PreTrainedModel, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


@torch.no_grad()
def input_magnitudes(model: PreTrainedModel, ids: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor]:
    """For each of ``modules``, the mean |input| per input channel over the calibration tokens: (in_features,)."""
    sums: list[torch.Tensor] = [torch.zeros(()) for _ in modules]

    def hook(index: int):
        def add(_module, args):
            sums[index] = sums[index] + args[0].abs().sum(dim=(0, 1))

        return add

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return [s / ids.numel() for s in sums]


def _pass_through(_module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def skipped(layer: nn.Module):
    """Run the model as if ``layer`` were absent: its output is replaced by its input hidden states."""
    handle = layer.register_forward_hook(_pass_through, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_importance(model: PreTrainedModel, ids: torch.Tensor) -> list[float]:
    """Per decoder layer, the rise in calibration loss when it is skipped."""
    base = loss_on(model, ids)
    scores = []
    for layer in decoder_layers(model):
        with skipped(layer):
            scores.append(loss_on(model, ids) - base)
    return scores


def _column_norms(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """Per input channel, the norm of a projection's weights for it (Conv1D stores (in, out))."""
    return weight.norm(dim=1) if conv1d else weight.norm(dim=0)


def _keep_outputs(state: dict, name: str, idx: torch.Tensor, conv1d: bool = False) -> None:
    """Keep the output channels ``idx`` of projection ``name``: weight rows (Conv1D: columns) and bias."""
    weight = state[name + ".weight"]
    state[name + ".weight"] = (weight[:, idx] if conv1d else weight[idx]).contiguous()
    if name + ".bias" in state:
        state[name + ".bias"] = state[name + ".bias"][idx].contiguous()


def _keep_inputs(state: dict, name: str, idx: torch.Tensor, conv1d: bool = False) -> None:
    """Keep the input channels ``idx`` of projection ``name``: weight columns (Conv1D: rows); the bias stays."""
    weight = state[name + ".weight"]
    state[name + ".weight"] = (weight[idx] if conv1d else weight[:, idx]).contiguous()


def _slice_mlp(state: dict, prefix: str, parts: Family, keep: torch.Tensor, n_inner: int) -> None:
    """Keep the MLP neurons ``keep``: rows of the input projections (phi3's fused one: of gate and of up), columns of the output one."""
    rows = torch.cat([keep, keep + n_inner]) if parts.fused_gate_up else keep
    for name in parts.mlp_in:
        _keep_outputs(state, prefix + name, rows, parts.conv1d)
    _keep_inputs(state, prefix + parts.mlp_out, keep, parts.conv1d)


def _slice_attention(state: dict, prefix: str, parts: Family, groups: torch.Tensor, group_size: int, head_dim: int) -> None:
    """Keep the KV heads ``groups`` with their query heads (query head h reads KV head h // group_size):
    q/k/v rows (and biases), o columns."""
    kv_channels = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
    q_channels = (groups[:, None] * group_size * head_dim + torch.arange(group_size * head_dim)).flatten()
    q, k, v, o = parts.attention
    for name, channels in ((q, q_channels), (k, kv_channels), (v, kv_channels)):
        _keep_outputs(state, prefix + name, channels)
    _keep_inputs(state, prefix + o, q_channels)


@torch.no_grad()
def prune_width(model: PreTrainedModel, ids: torch.Tensor, neurons: int, kv_groups: int) -> PreTrainedModel:
    """A copy of ``model`` keeping the ``neurons`` most important MLP neurons and ``kv_groups`` most important
    KV groups in every layer (each scored per layer on ``ids``)."""
    parts = family(model)
    layers = decoder_layers(model)
    n_inner = intermediate_size(model.config)
    heads, kv_heads, head_dim = head_counts(model.config)
    group_size = heads // kv_heads
    outs = [layer.get_submodule(parts.mlp_out) for layer in layers]
    prune_heads = kv_groups < kv_heads
    o_projs = [layer.get_submodule(parts.attention[3]) for layer in layers] if prune_heads else []
    magnitudes = input_magnitudes(model, ids, outs + o_projs)
    state = model.state_dict()
    changes: dict = {}
    for i, out in enumerate(outs):
        prefix = f"{parts.layers}.{i}."
        if neurons < n_inner:
            scores = magnitudes[i] * _column_norms(out.weight, parts.conv1d)
            _slice_mlp(state, prefix, parts, torch.topk(scores, neurons).indices.sort().values, n_inner)
        if prune_heads:
            channel_scores = magnitudes[len(outs) + i] * _column_norms(o_projs[i].weight, False)
            scores = channel_scores.view(kv_heads, group_size * head_dim).sum(dim=1)
            _slice_attention(state, prefix, parts, torch.topk(scores, kv_groups).indices.sort().values, group_size, head_dim)
    if neurons < n_inner:
        changes[parts.intermediate] = neurons
    if prune_heads:
        changes.update(num_attention_heads=kv_groups * group_size, num_key_value_heads=kv_groups, head_dim=head_dim)
    return rebuild(model, state, **changes)


def _kv_groups_kept(model: PreTrainedModel, kv_heads_keep: float) -> int:
    """How many KV groups ``kv_heads_keep`` (a fraction of them) keeps per layer, or an error saying why not."""
    parts = family(model)
    _, kv_heads, _ = head_counts(model.config)
    if not 0.0 < kv_heads_keep <= 1.0:
        raise OptimizationError(f"--kv-heads-keep must be in (0, 1]: the fraction of KV head groups kept (got {kv_heads_keep})")
    if kv_heads_keep == 1.0:
        return kv_heads
    if parts.attention is None:
        raise OptimizationError(
            f"--kv-heads-keep: {model.config.model_type} computes q, k and v in one fused projection ({parts.fused_qkv}), "
            "so its heads cannot be pruned by KV group; leave it at 1"
        )
    kept = round(kv_heads * kv_heads_keep)
    if kept < 1:
        raise OptimizationError(f"--kv-heads-keep {kv_heads_keep} of {kv_heads} KV head groups leaves none; keep at least 1/{kv_heads}")
    return kept


def prune(
    loaded: LoadedModel,
    output_dir: Path,
    mlp_keep: float = 0.5,
    drop_layers: int = 0,
    kv_heads_keep: float = 1.0,
    text: str | None = None,
    calibration_windows: int = 16,
    recover_steps: int = 0,
) -> dict:
    """Write a pruned copy of ``loaded.model`` (which is left as it was); with ``recover_steps``, distil the
    unpruned model into the pruned one for that many steps (``pipelines.optimize.distill``) and write the
    recovered model instead.

    ``mlp_keep``: the fraction of MLP neurons kept; ``drop_layers``: how many decoder layers are removed;
    ``kv_heads_keep``: the fraction of KV head groups kept (each with its query heads)."""
    if recover_steps < 0:
        raise OptimizationError(f"recover_steps must be ≥ 0 (got {recover_steps})")
    model = loaded.model
    family(model)  # an unknown family is refused before any work
    n_layers, n_inner = model.config.num_hidden_layers, intermediate_size(model.config)
    heads, kv_heads, _ = head_counts(model.config)
    if not 0.0 < mlp_keep <= 1.0:
        raise OptimizationError(f"--mlp-keep must be in (0, 1]: the fraction of MLP neurons kept (got {mlp_keep}); pruning 100% removes the MLP")
    if not 0 <= drop_layers < n_layers:
        raise OptimizationError(f"--drop-layers must be between 0 and {n_layers - 1} for a {n_layers}-layer model (got {drop_layers})")
    kv_groups = _kv_groups_kept(model, kv_heads_keep)
    neurons = max(1, round(n_inner * mlp_keep))
    if neurons == n_inner and drop_layers == 0 and kv_groups == kv_heads:
        raise OptimizationError("nothing to prune: give --mlp-keep or --kv-heads-keep below 1 and/or --drop-layers above 0")
    parameters_before = sum(p.numel() for p in model.parameters())
    ids = calibration_ids(loaded, text, calibration_windows, min(128, loaded.max_model_len))
    report: dict = {
        "n_layer_before": n_layers,
        "n_inner_before": n_inner,
        "attention_heads_before": heads,
        "kv_heads_before": kv_heads,
        "calibration_loss_before": round(loss_on(model, ids), 4),
    }
    pruned = model
    if drop_layers:
        scores = layer_importance(model, ids)
        drop = sorted(range(n_layers), key=lambda i: scores[i])[:drop_layers]
        pruned = keep_layers(model, [i for i in range(n_layers) if i not in drop])
        report.update(layer_importance=[round(s, 4) for s in scores], dropped_layers=sorted(drop))
    if neurons < n_inner or kv_groups < kv_heads:
        pruned = prune_width(pruned, ids, neurons, kv_groups)
    heads_after, kv_heads_after, _ = head_counts(pruned.config)
    report.update(
        n_layer_after=pruned.config.num_hidden_layers,
        n_inner_after=intermediate_size(pruned.config),
        attention_heads_after=heads_after,
        kv_heads_after=kv_heads_after,
        parameters_before=parameters_before,
        parameters_after=sum(p.numel() for p in pruned.parameters()),
        calibration_loss_after=round(loss_on(pruned, ids), 4),
    )
    if not recover_steps:
        pruned.save_pretrained(output_dir, safe_serialization=True)
        copy_tokenizer(loaded, output_dir)
        return report
    from .distill import distill

    with tempfile.TemporaryDirectory(dir=output_dir.parent) as pruned_dir:
        pruned.save_pretrained(pruned_dir, safe_serialization=True)
        copy_tokenizer(loaded, Path(pruned_dir))
        recovery = distill(loaded, output_dir, student=pruned_dir, steps=recover_steps, text=text)
    report["recovery"] = {k: v for k, v in recovery.items() if k != "train_loss"}
    return report
