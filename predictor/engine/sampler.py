"""Choose the next token for every row of a batch, each row with its own ``SamplingParams``.

The one sampling implementation of the predictor. Order, as in vLLM: penalties and logit bias on the raw
logits, then the grammar's token mask on constrained rows (structured outputs, ``structured.py``), then
EOS masking for ``min_tokens``, then temperature, top-k, top-p, min-p, and a draw from each
row's own ``torch.Generator`` (so a seeded request is reproducible whatever else shares the batch).
Log-probabilities are reported from the model's raw distribution (before penalties and temperature).
"""

from __future__ import annotations

import torch

from ..sampling import SamplingParams, TokenLogprob


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Repetition (over prompt and output), presence and frequency (over output) penalties, and logit bias.

    logits: (V,) float32, modified in place and returned.
    """
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        if len(seen):
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    for token_id, bias in params.logit_bias.items():
        logits[token_id] += bias
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p on one row; removed entries become ``-inf``. logits: (V,)."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    eos_token_id: int | None,
    allowed: tuple[list[int], torch.Tensor] | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Next token for each row. logits: (B, V) for the last position of each row.

    ``allowed``: (rows, mask), the constrained rows and their allowed tokens, bool (len(rows), V); every
    other token of those rows becomes ``-inf``. Rows that need no per-row work (no penalties, no bias)
    share batched operations; the rest are adjusted one by one. Every random draw uses the row's own generator.
    """
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
    needs_copy = any(_has_penalties(p) for p in params) or eos_token_id is not None or allowed is not None
    if needs_copy:
        logits = logits.clone()
    for row, p in enumerate(params):
        if _has_penalties(p):
            apply_penalties(logits[row], p, prompt_ids[row], output_ids[row])
    if allowed is not None:
        rows, mask = allowed
        logits[rows] = logits[rows].masked_fill(~mask, float("-inf"))
    if eos_token_id is not None:
        blocked = [row for row, p in enumerate(params) if p.ignore_eos or len(output_ids[row]) < p.min_tokens]
        if allowed is not None:  # a grammar that allows only EOS wins over min_tokens
            only_eos = {row for row, m in zip(allowed[0], allowed[1]) if m[eos_token_id] and int(m.sum()) == 1}
            blocked = [row for row in blocked if row not in only_eos]
        if blocked:
            logits[blocked, eos_token_id] = float("-inf")
    tokens = torch.argmax(logits, dim=-1).tolist()  # greedy rows keep this
    for row, p in enumerate(params):
        if not p.greedy:
            probs = filter_logits(logits[row], p).softmax(-1)
            # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p, using only this row's generator.
            noise = torch.empty_like(probs).exponential_(generator=generators[row])
            tokens[row] = int(torch.argmax(probs / noise))
    logprobs = [None if p.logprobs is None else token_logprob(raw_logprobs[row], tokens[row], p.logprobs) for row, p in enumerate(params)]
    return tokens, logprobs


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or bool(p.logit_bias)


def token_logprob(row_logprobs: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """The chosen token's log-probability and the ``top_n`` most likely alternatives. row_logprobs: (V,)."""
    top: list[tuple[int, float]] = []
    if top_n > 0:
        values, ids = torch.topk(row_logprobs, top_n)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id=token, logprob=float(row_logprobs[token]), top=top)
