"""Choose the next token for every row of a batch, each row with its own ``SamplingParams``.

The one sampling implementation of the predictor, on per-row tensors over the whole batch (vLLM v1's sampler).
Order, as in vLLM: penalties and logit bias on the raw logits, then the grammar's token mask on constrained rows
(structured outputs, ``structured.py``), then EOS masking for ``min_tokens``, then temperature, top-k, top-p,
min-p, and a draw from each row's own ``torch.Generator`` (so a seeded request is reproducible whatever else
shares the batch).
Log-probabilities are reported from the model's raw distribution (before penalties and temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import SamplingParams, TokenLogprob

# Top-p looks first at the tokens above these probabilities (sorting 49,152 tokens costs ~10 ms a row on one core);
# rows whose nucleus reaches below them, or with too many tokens above them to sort (THRESHOLD_SORT_TOKENS: nearly flat
# distributions), go to the histogram search (``_histogram_nucleus``).
NUCLEUS_THRESHOLDS = (1e-3, 1e-5)
# The histogram search narrows a row's undecided tokens, HISTOGRAM_BUCKETS probability ranges per level, until at most
# NUCLEUS_SORT_TOKENS are left (then they are sorted), for at most HISTOGRAM_LEVELS levels.
HISTOGRAM_BUCKETS = 1024
HISTOGRAM_LEVELS = 4
NUCLEUS_SORT_TOKENS = 4096
# A row with more tokens above a threshold than this goes on to the histogram search, whose cost hardly depends on the
# row: for 16 rows on this project's AMD EPYC (2 threads), sorting ~7,000 candidates a row (GPT-2's random weights at
# temperature 0.2, the whole draw) took 7-9 ms, the histogram search of flat rows of 50,257 tokens 13-19 ms, and sorting
# those 50 ms.
THRESHOLD_SORT_TOKENS = 16384


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]]) -> None:
    """Repetition (over prompt and output), presence and frequency (over output) penalties, and logit bias, for every
    row at once. logits: (R, V) float32, modified in place; one row per entry of ``params``."""
    R, V = logits.shape
    device = logits.device
    repetition = [r for r, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repetition:
        rows = torch.tensor([r for r in repetition for _ in range(len(prompt_ids[r]) + len(output_ids[r]))], dtype=torch.long, device=device)
        ids = torch.tensor([t for r in repetition for t in (*prompt_ids[r], *output_ids[r])], dtype=torch.long, device=device)
        seen = torch.zeros(R, V, dtype=torch.bool, device=device)
        seen[rows, ids] = True
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]  # 1.0 leaves a row as it is
        logits.copy_(torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits))
    counted = [r for r, p in enumerate(params) if output_ids[r] and (p.presence_penalty or p.frequency_penalty)]
    if counted:
        rows = torch.tensor([r for r in counted for _ in output_ids[r]], dtype=torch.long, device=device)
        ids = torch.tensor([t for r in counted for t in output_ids[r]], dtype=torch.long, device=device)
        counts = torch.zeros(R, V, device=device).index_put_((rows, ids), torch.ones(len(ids), device=device), accumulate=True)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    biased = [(r, t, b) for r, p in enumerate(params) for t, b in p.logit_bias.items()]
    if biased:
        rows, ids, values = zip(*biased)
        logits.index_put_((torch.tensor(rows, device=device), torch.tensor(ids, device=device)), torch.tensor(values, device=device), accumulate=True)


@dataclass
class Candidates:
    """Some rows' remaining tokens after filtering: ``logits`` (R, K) scaled by temperature, ``-inf`` where removed, of
    the tokens ``ids`` (R, K); ``ids`` None means the whole vocabulary in order (K = V, nothing was ranked)."""

    rows: list[int]
    logits: torch.Tensor
    ids: torch.Tensor | None


def filter_rows(logits: torch.Tensor, params: list[SamplingParams]) -> list[Candidates]:
    """Temperature, then top-k, top-p and min-p, every row with its own values. logits: (S, V).

    Rows without top-k or top-p keep the whole vocabulary; the others keep only their ranked candidates (top-p is
    taken over the top-k survivors, renormalised, as in vLLM and transformers). Every row lands in exactly one group.
    """
    S, V = logits.shape
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    ranked = [r for r, p in enumerate(params) if top_k[r] or p.top_p < 1.0]
    plain = [r for r in range(S) if r not in ranked]
    groups = []
    if plain:
        rows = logits if len(plain) == S else logits[plain]
        groups.append(Candidates(plain, rows / (temperature if len(plain) == S else temperature[plain]), None))
    if ranked:
        x = (logits if len(ranked) == S else logits[ranked]) / (temperature if len(ranked) == S else temperature[ranked])
        found = _top_k_top_p(x, [top_k[r] for r in ranked], [params[r].top_p for r in ranked])
        groups += [Candidates([ranked[i] for i in g.rows], g.logits, g.ids) for g in found]
    for g in groups:
        min_p = [params[r].min_p for r in g.rows]
        if any(min_p):
            probs = g.logits.softmax(-1)
            threshold = torch.tensor(min_p, device=logits.device)[:, None] * probs.amax(-1, keepdim=True)
            g.logits = g.logits.masked_fill(probs < threshold, float("-inf"))
    return groups


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> list[Candidates]:
    """x: (R, V) scaled logits; keep each row's ``top_k`` most likely (0: all), then the smallest head of those whose
    probability reaches ``top_p`` (the token that crosses it kept)."""
    R, V = x.shape
    with_k = [r for r in range(R) if top_k[r]]
    without_k = [r for r in range(R) if not top_k[r]]
    groups = []
    if with_k:  # one partial selection for all of them, as wide as the largest top_k
        rows = x if len(with_k) == R else x[with_k]
        values, ids = rows.topk(max(top_k[r] for r in with_k), dim=-1)  # (r, K), descending
        ranks = torch.arange(values.shape[1], device=x.device)[None, :]
        values = values.masked_fill(ranks >= torch.tensor([top_k[r] for r in with_k], device=x.device)[:, None], float("-inf"))
        probs = values.softmax(-1)  # top-p over the top-k survivors, renormalised (as vLLM and transformers)
        groups.append(Candidates(with_k, values.masked_fill(_outside_top_p(probs, [top_p[r] for r in with_k]), float("-inf")), ids))
    if without_k:
        rows = x if len(without_k) == R else x[without_k]
        for g in _nucleus(rows.softmax(-1), [top_p[r] for r in without_k]):
            groups.append(Candidates([without_k[i] for i in g.rows], g.logits, g.ids))
    return groups


def _outside_top_p(sorted_probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """(R, K) probabilities in descending order → True where a token lies past its row's top-p head."""
    p = torch.tensor([t if t < 1.0 else float("inf") for t in top_p], device=sorted_probs.device)[:, None]  # 1.0: off (sums may round past it)
    return sorted_probs.cumsum(-1) - sorted_probs >= p


def _nucleus(probs: torch.Tensor, top_p: list[float]) -> list[Candidates]:
    """Top-p on (R, V) probabilities without sorting the vocabulary: the tokens above a threshold, if their mass
    reaches top_p, hold the whole nucleus (every token below comes after them in order, with at least top_p before
    it), so only they are sorted. Tried at 1e-3 (at most 1,000 tokens), then 1e-5 (if at most THRESHOLD_SORT_TOKENS are
    above it); the other rows go to the histogram search. A few passes over the vocabulary (softmax, compare, the
    mass and count above, nonzero): ``logsumexp`` and ``exp`` measured 4-7x slower than softmax here on
    low-temperature logits, whose far tail underflows into denormals."""
    R, V = probs.shape
    p = torch.tensor(top_p, device=probs.device)
    pending, groups = list(range(R)), []
    for threshold in NUCLEUS_THRESHOLDS:
        rows = probs if len(pending) == R else probs[pending]
        above = rows > threshold
        # Rows with few enough tokens above the threshold to sort (a flat row can have tens of thousands above 1e-5:
        # it goes on to the histogram search), and of those the ones whose tokens above reach top_p; positions within pending.
        few = list(range(len(pending)))
        if threshold * THRESHOLD_SORT_TOKENS < 1:  # more than THRESHOLD_SORT_TOKENS tokens can lie above it
            few = (above.view(torch.uint8).sum(-1, dtype=torch.int32) <= THRESHOLD_SORT_TOKENS).nonzero()[:, 0].tolist()
        here = []
        if few:
            picked, ids = _gather_above(rows[few], above[few]) if len(few) < len(pending) else _gather_above(rows, above)
            reach = (picked.sum(-1) >= p[[pending[i] for i in few]]).nonzero()[:, 0].tolist()
            here = [few[i] for i in reach]
        if here:
            if len(here) < len(few):
                picked, ids = picked[reach], ids[reach]
            picked, order = picked.sort(dim=-1, descending=True)
            ids = ids.gather(1, order)
            removed = _outside_top_p(picked, [top_p[pending[i]] for i in here]) | (picked == 0)
            groups.append(Candidates([pending[i] for i in here], picked.log().masked_fill(removed, float("-inf")), ids))
        kept = set(here)
        pending = [r for i, r in enumerate(pending) if i not in kept]
        if not pending:
            break
    if pending:
        rows = probs if len(pending) == R else probs[pending]
        groups.append(Candidates(pending, _histogram_nucleus(rows, [top_p[r] for r in pending]), None))
    return groups


def _histogram_nucleus(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Top-p on (R, V) probabilities whose nucleus is wide (a flat distribution), without sorting the vocabulary.
    Each level spreads a row's still undecided tokens over HISTOGRAM_BUCKETS equal probability ranges and sums each
    range's mass (one ``scatter_add`` for all rows): ranges whose mass ahead, counted from the most likely, is
    below top_p are in the nucleus; ranges with at least top_p ahead are out; only the range where top_p is crossed
    stays undecided. Levels repeat until at most NUCLEUS_SORT_TOKENS tokens are undecided in any row, and those are
    sorted. Returns the rows' log-probabilities, ``-inf`` outside the nucleus."""
    R, V = probs.shape
    device = probs.device
    p = torch.tensor(top_p, device=device, dtype=probs.dtype)[:, None]
    nb = HISTOGRAM_BUCKETS
    undecided = probs > 0  # a token of probability 0 is never drawn
    sure = torch.zeros_like(undecided)
    before = torch.zeros_like(p)  # the mass of the sure tokens, ahead of every undecided one
    hi, lo = probs.amax(-1, keepdim=True), torch.zeros_like(p)  # every undecided token's probability lies in [lo, hi]
    ranks = torch.arange(nb, device=device)[None, :]
    for _ in range(HISTOGRAM_LEVELS):
        if int(undecided.view(torch.uint8).sum(-1, dtype=torch.int32).max()) <= NUCLEUS_SORT_TOKENS:
            break
        width = ((hi - lo) / nb).clamp_min(torch.finfo(probs.dtype).tiny)
        # Bucket 0 holds the most likely range; undecided tokens land in 0..nb-1 (in order of probability: the bucket
        # only has to be monotonic, so rounding at the edges is harmless), the others in bucket nb, ignored.
        bucket = ((hi - probs) / width).clamp_(0, nb - 1).add_(~undecided, alpha=nb).clamp_(max=nb).long()  # truncation: the floor
        mass = torch.zeros(R, nb + 1, device=device, dtype=probs.dtype).scatter_add_(1, bucket, probs)[:, :nb]
        ahead = before + mass.cumsum(-1) - mass  # (R, nb): the mass ahead of each bucket's tokens
        cut = ((ahead < p).sum(-1, keepdim=True) - 1).clamp_(min=0)  # the bucket where top_p is crossed
        sure |= undecided & (bucket < cut)
        before = before + torch.where(ranks < cut, mass, 0.0).sum(-1, keepdim=True)
        undecided &= bucket == cut
        hi, lo = hi - cut * width, hi - (cut + 1) * width
    picked, ids = _gather_above(probs, undecided)
    picked, order = picked.sort(dim=-1, descending=True)
    ids = ids.gather(1, order)
    inside = (before + picked.cumsum(-1) - picked < p) & (picked > 0)  # the token that crosses top_p is kept
    keep = sure.clone()
    keep[torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)[inside], ids[inside]] = True
    return probs.log().masked_fill(~keep, float("-inf"))


def _gather_above(probs: torch.Tensor, above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's entries where ``above``, packed left into (R, C) (C the most any row has), padded with probability 0."""
    row, col = above.nonzero(as_tuple=True)  # row-major: each row's columns in order
    counts = torch.bincount(row, minlength=probs.shape[0])
    position = torch.arange(len(row), device=probs.device) - (counts.cumsum(0) - counts)[row]
    width = max(int(counts.max()), 1)
    picked = torch.zeros(probs.shape[0], width, device=probs.device, dtype=probs.dtype)
    ids = torch.zeros(probs.shape[0], width, device=probs.device, dtype=torch.long)
    picked[row, position] = probs[row, col]
    ids[row, position] = col
    return picked, ids


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``filter_rows`` for one row, as a dense (V,) row with ``-inf`` where a token was removed. logits: (V,)."""
    (g,) = filter_rows(logits[None], [params])
    return g.logits[0] if g.ids is None else torch.full_like(logits, float("-inf")).scatter_(0, g.ids[0], g.logits[0])


@torch.inference_mode()
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
    other token of those rows becomes ``-inf``. Every step is batched over the rows that need it (one partial
    selection for all top-k/top-p rows, not a sort per row); each random draw uses the row's own generator
    (``draw``), so a seeded row draws the same token whatever else shares the batch.
    """
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
    penalised = [row for row, p in enumerate(params) if _has_penalties(p)]
    # The grammar mask and EOS blocking below write -inf into the caller's logits (idempotent: a retry of the same
    # rows gives the same tokens); penalties are not, so they get a copy.
    if penalised:
        logits = logits.clone()
    if penalised:
        rows = logits[penalised]
        apply_penalties(rows, [params[r] for r in penalised], [prompt_ids[r] for r in penalised], [output_ids[r] for r in penalised])
        logits[penalised] = rows
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
    drawn = [row for row, p in enumerate(params) if not p.greedy]
    tokens = torch.argmax(logits, dim=-1).tolist() if len(drawn) < len(params) else [-1] * len(params)  # greedy rows keep this
    if drawn:
        rows = logits if len(drawn) == len(params) else logits[drawn]
        for g in filter_rows(rows, [params[r] for r in drawn]):
            chosen = draw(g.logits.softmax(-1), [generators[drawn[i]] for i in g.rows])
            if g.ids is not None:
                chosen = g.ids.gather(1, torch.tensor(chosen, device=g.ids.device)[:, None])[:, 0].tolist()
            for i, token in zip(g.rows, chosen):
                tokens[drawn[i]] = token
    logprobs = [None if p.logprobs is None else token_logprob(raw_logprobs[row], tokens[row], p.logprobs) for row, p in enumerate(params)]
    return tokens, logprobs


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
    """The index of one entry from each row of ``probs`` (S, K), by inverting its cumulative distribution at one
    uniform number from the row's own generator: one random number per row and step (an exponential race over the
    vocabulary needs V of them, 1.4 ms a row for 49,152 tokens here), and a row's draw depends on nothing else in
    the batch."""
    u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])[:, None]  # (S, 1)
    cumulative = probs.cumsum(-1)
    # The first token whose cumulative probability exceeds u × total: never one of probability 0.
    chosen = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
    return chosen[:, 0].tolist()


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or bool(p.logit_bias)


def token_logprob(row_logprobs: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """The chosen token's log-probability and the ``top_n`` most likely alternatives. row_logprobs: (V,)."""
    top: list[tuple[int, float]] = []
    if top_n > 0:
        values, ids = torch.topk(row_logprobs, top_n)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id=token, logprob=float(row_logprobs[token]), top=top)
