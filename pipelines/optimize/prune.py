"""Structured pruning of a GPT-2: MLP neurons (the same number kept in every block) and whole blocks.

Both are chosen by a score measured on calibration text:
- a neuron's importance is its mean absolute activation (after GELU) times the norm of its output
  weights: how much it moves the residual stream;
- a block's importance is how much the calibration loss rises when that block is skipped.
The result is a standard GPT-2 config (smaller ``n_inner``, fewer ``n_layer``) that loads with plain
transformers, and is genuinely smaller and faster. Quality is recovered with ``distill``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from predictor.loading import LoadedModel

from ..corpus import demo_corpus, read_corpus, split_documents
from ..train import tokenize
from . import OptimizationError, copy_tokenizer


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
def neuron_importance(model: PreTrainedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per block, (n_inner,) scores: mean |GELU(c_fc(x))| × ||c_proj row||."""
    sums: list[torch.Tensor] = []
    hooks = []
    for block in model.transformer.h:
        acc = torch.zeros(block.mlp.c_fc.nf)
        sums.append(acc)
        hooks.append(block.mlp.act.register_forward_hook(lambda _m, _i, out, acc=acc: acc.add_(out.abs().sum(dim=(0, 1)))))
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return [acc / ids.numel() * block.mlp.c_proj.weight.norm(dim=1) for acc, block in zip(sums, model.transformer.h)]


@contextlib.contextmanager
def _skipped(model: PreTrainedModel, index: int):
    """Temporarily run the model without block ``index`` (its output equals its input)."""
    blocks = model.transformer.h
    original = blocks[index]
    blocks[index] = _Identity()
    try:
        yield
    finally:
        blocks[index] = original


class _Identity(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.no_grad()
def layer_importance(model: PreTrainedModel, ids: torch.Tensor) -> list[float]:
    """Per block, the rise in calibration loss when it is skipped."""
    base = loss_on(model, ids)
    scores = []
    for i in range(len(model.transformer.h)):
        with _skipped(model, i):
            scores.append(loss_on(model, ids) - base)
    return scores


@torch.no_grad()
def keep_neurons(model: PreTrainedModel, keep: list[torch.Tensor]) -> None:
    """Slice each block's MLP down to the neuron indices in ``keep`` (same count in every block)."""
    for block, idx in zip(model.transformer.h, keep):
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        new_fc = Conv1D(len(idx), fc.weight.shape[0])
        new_fc.weight.copy_(fc.weight[:, idx])
        new_fc.bias.copy_(fc.bias[idx])
        new_proj = Conv1D(proj.weight.shape[1], len(idx))
        new_proj.weight.copy_(proj.weight[idx, :])
        new_proj.bias.copy_(proj.bias)
        block.mlp.c_fc, block.mlp.c_proj = new_fc, new_proj
    model.config.n_inner = len(keep[0])


def drop_blocks(model: PreTrainedModel, drop: list[int]) -> None:
    kept = [b for i, b in enumerate(model.transformer.h) if i not in set(drop)]
    model.transformer.h = nn.ModuleList(kept)
    for i, block in enumerate(kept):
        block.attn.layer_idx = i
    model.config.n_layer = len(kept)


def prune(
    loaded: LoadedModel,
    output_dir: Path,
    mlp_keep: float = 0.5,
    drop_layers: int = 0,
    text: str | None = None,
    calibration_windows: int = 16,
    recover_steps: int = 0,
) -> dict:
    """Prune ``loaded.model`` in place; with ``recover_steps``, distil the unpruned model into the pruned one
    for that many steps (``pipelines.optimize.distill``) and write the recovered model instead."""
    if recover_steps < 0:
        raise OptimizationError(f"recover_steps must be ≥ 0 (got {recover_steps})")
    teacher = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model)) if recover_steps else None
    model = loaded.model
    if model.config.model_type != "gpt2":
        raise OptimizationError(f"structured pruning supports GPT-2 models; this one is {model.config.model_type!r}")
    n_layer, n_inner = model.config.n_layer, model.transformer.h[0].mlp.c_fc.nf
    parameters_before = sum(p.numel() for p in model.parameters())
    if not 0.0 < mlp_keep <= 1.0:
        raise OptimizationError(f"--mlp-keep must be in (0, 1]: the fraction of MLP neurons kept (got {mlp_keep}); pruning 100% removes the MLP")
    if not 0 <= drop_layers < n_layer:
        raise OptimizationError(f"--drop-layers must be between 0 and {n_layer - 1} for a {n_layer}-layer model (got {drop_layers})")
    if mlp_keep == 1.0 and drop_layers == 0:
        raise OptimizationError("nothing to prune: give --mlp-keep below 1 and/or --drop-layers above 0")
    ids = calibration_ids(loaded, text, calibration_windows, min(128, loaded.max_model_len))
    loss_before = loss_on(model, ids)
    report: dict = {"n_layer_before": n_layer, "n_inner_before": n_inner, "calibration_loss_before": round(loss_before, 4)}
    if drop_layers:
        scores = layer_importance(model, ids)
        drop = sorted(range(n_layer), key=lambda i: scores[i])[:drop_layers]
        drop_blocks(model, drop)
        report.update(layer_importance=[round(s, 4) for s in scores], dropped_layers=sorted(drop))
    if mlp_keep < 1.0:
        k = max(1, round(n_inner * mlp_keep))
        scores = neuron_importance(model, ids)
        keep_neurons(model, [torch.topk(s, k).indices.sort().values for s in scores])
    report.update(
        n_layer_after=model.config.n_layer,
        n_inner_after=model.transformer.h[0].mlp.c_fc.nf,
        parameters_before=parameters_before,
        parameters_after=sum(p.numel() for p in model.parameters()),
        calibration_loss_after=round(loss_on(model, ids), 4),
    )
    if not recover_steps:
        model.save_pretrained(output_dir, safe_serialization=True)
        copy_tokenizer(loaded, output_dir)
        return report
    from .distill import distill

    with tempfile.TemporaryDirectory(dir=output_dir.parent) as pruned:
        model.save_pretrained(pruned, safe_serialization=True)
        recovery = distill(teacher, output_dir, student=pruned, steps=recover_steps, text=text)
    report["recovery"] = {k: v for k, v in recovery.items() if k != "train_loss"}
    return report
