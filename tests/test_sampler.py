"""The batched sampler (``predictor/engine/sampler.py``): its draws follow the filtered distribution, a seeded row
draws the same whatever shares its batch, and the whole batch is filtered at once (no sort per row).

The reference distribution here is written independently of the sampler, in float64 and per row: softmax of
logits / temperature, keep the top_k most likely, renormalise, keep the smallest head reaching top_p (the token
that crosses it kept), renormalise, drop tokens below min_p × the largest, renormalise.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from conftest import MODEL_NAME
from scipy.stats import chisquare

from predictor.engine import sampler
from predictor.engine.sampler import filter_logits, sample
from predictor.sampling import SamplingParams

LOGITS = torch.tensor([2.0, 1.6, 1.1, 0.9, 0.3, 0.0, -0.4, -1.5])  # a tiny vocabulary of 8


def reference(logits: torch.Tensor, p: SamplingParams) -> np.ndarray:
    probs = torch.softmax(logits.double() / p.temperature, -1).numpy()
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(len(probs), dtype=bool)
    head = order[: p.top_k] if p.top_k > 0 else order
    head_probs = probs[head] / probs[head].sum()
    before = np.cumsum(head_probs) - head_probs
    keep[head[before < p.top_p]] = True
    out = np.where(keep, probs, 0.0)
    out /= out.sum()
    if p.min_p > 0:
        out = np.where(out >= p.min_p * out.max(), out, 0.0)
        out /= out.sum()
    return out


def assert_keeps_the_reference(kept: np.ndarray, logits: torch.Tensor, p: SamplingParams) -> None:
    """``kept`` (V,) bool is the reference's kept set, up to ties at its boundary: a token float32 cannot tell from the
    last one kept (probabilities within 1e-6 of each other, as in a flat distribution) may be swapped for it."""
    expected = reference(logits, p) > 0
    differ = kept != expected
    if differ.any():
        probs = torch.softmax(logits.double() / p.temperature, -1).numpy()
        assert kept.sum() == expected.sum() and np.allclose(probs[differ], probs[expected].min(), rtol=1e-6), (int(differ.sum()), p)


CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.15),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.85, min_p=0.05),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-minp{p.min_p}")
def test_draws_follow_the_filtered_distribution(params):
    """8,000 seeded draws, 32 rows to a batch (each its own generator), against the reference: a chi-square test over
    the kept tokens, and no draw ever of a removed token."""
    expected = reference(LOGITS, params)
    rows, batches = 32, 250
    counts = np.zeros(len(LOGITS))
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(rows)]
    for _ in range(batches):
        tokens, _ = sample(LOGITS.repeat(rows, 1), [params] * rows, gens, [[]] * rows, [[]] * rows, eos_token_id=None)
        np.add.at(counts, tokens, 1)
    kept = expected > 0
    assert counts[~kept].sum() == 0, f"drew removed tokens: {counts}"
    n = counts.sum()
    result = chisquare(counts[kept], expected[kept] * n)
    assert result.pvalue > 1e-3, f"counts {counts.tolist()} do not follow {np.round(expected * n).tolist()} (p = {result.pvalue:.2g})"


def test_a_wrong_distribution_fails_the_same_check():
    """The check above can fail: draws at temperature 1.0 do not pass for the temperature-0.7 distribution."""
    rows = 32
    gens = [torch.Generator().manual_seed(i) for i in range(rows)]
    counts = np.zeros(len(LOGITS))
    for _ in range(250):
        tokens, _ = sample(LOGITS.repeat(rows, 1), [SamplingParams(temperature=1.0)] * rows, gens, [[]] * rows, [[]] * rows, eos_token_id=None)
        np.add.at(counts, tokens, 1)
    expected = reference(LOGITS, SamplingParams(temperature=0.7))
    assert chisquare(counts, expected * counts.sum()).pvalue < 1e-6


def test_filtering_matches_the_reference_on_a_large_vocabulary():
    """On 49,152 tokens (the default model's vocabulary) every strategy of the nucleus search (above 1e-3, above 1e-5,
    all tokens) keeps exactly the reference's tokens: peaked, middling and flat distributions."""
    g = torch.Generator().manual_seed(0)
    for scale in (8.0, 2.0, 0.05):  # peaked (nucleus of a few tokens) ... flat (nucleus of most of the vocabulary)
        logits = torch.randn(49152, generator=g) * scale
        for params in (
            SamplingParams(temperature=0.2, top_p=0.9),
            SamplingParams(temperature=1.0, top_p=0.95),
            SamplingParams(temperature=1.0, top_k=50, top_p=0.9),
        ):
            assert_keeps_the_reference(torch.isfinite(filter_logits(logits, params)).numpy(), logits, params)


def test_a_batch_mixing_nucleus_strategies_filters_each_row_as_alone():
    """Peaked, middling and flat rows in one batch take different strategies of the nucleus search; each row keeps
    exactly the reference's tokens."""
    g = torch.Generator().manual_seed(5)
    scales = [8.0, 0.05, 2.0, 0.05, 8.0, 0.5]
    logits = torch.stack([torch.randn(49152, generator=g) * s for s in scales])
    params = [SamplingParams(temperature=1.0, top_p=tp) for tp in (0.9, 0.95, 0.9, 0.5, 0.99, 0.9)]
    dense = torch.full_like(logits, float("-inf"))
    groups = sampler.filter_rows(logits, params)
    # The peaked rows are sorted from above a threshold; the flat ones have every token above 1e-5, more than
    # THRESHOLD_SORT_TOKENS, and take the histogram search (no ranked ids).
    searched = {r for g in groups if g.ids is None for r in g.rows}
    assert {1, 3} <= searched and not searched & {0, 4}
    for group in groups:
        for i, row in enumerate(group.rows):
            kept = torch.isfinite(group.logits[i])  # padding entries (id 0, -inf) are not tokens
            dense[row, kept.nonzero()[:, 0] if group.ids is None else group.ids[i][kept]] = group.logits[i][kept]
    for row, p in enumerate(params):
        assert_keeps_the_reference(torch.isfinite(dense[row]).numpy(), logits[row], p)


def test_seeded_rows_do_not_depend_on_the_batch():
    """A seeded row draws the same tokens alone and among rows of every other kind (greedy, penalties, top-k, top-p, min-p),
    step after step."""
    g = torch.Generator().manual_seed(3)
    V = 2000
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.2, top_k=20, seed=5),
        SamplingParams(temperature=0.8, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.5, seed=6),
        SamplingParams(temperature=1.0, logit_bias={3: 4.0}, seed=7),
    ]
    mine = SamplingParams(temperature=0.7, top_p=0.9, seed=42)
    alone_gen, batch_gens = torch.Generator().manual_seed(42), [torch.Generator().manual_seed(p.seed or 0) for p in others]
    batch_gens.insert(2, torch.Generator().manual_seed(42))
    params = [*others[:2], mine, *others[2:]]
    for _ in range(20):
        logits = torch.randn(len(params), V, generator=g) * 3
        (alone,), _ = sample(logits[2:3], [mine], [alone_gen], [[1, 2]], [[]], eos_token_id=0)
        together, _ = sample(logits, params, batch_gens, [[1, 2]] * len(params), [[4, 4, 5]] * len(params), eos_token_id=0)
        assert together[2] == alone


def test_one_selection_for_the_whole_batch(monkeypatch):
    """16 top-p rows and 16 top-k rows are filtered with one sort of candidates and one partial selection, not one per row."""
    calls = {"sort": 0, "topk": 0}
    real_sort, real_topk = torch.Tensor.sort, torch.Tensor.topk

    def counted(name, real):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return real(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch.Tensor, "sort", counted("sort", real_sort))
    monkeypatch.setattr(torch.Tensor, "topk", counted("topk", real_topk))
    logits = torch.randn(32, 49152, generator=torch.Generator().manual_seed(1)) * 6
    params = [SamplingParams(temperature=0.2, top_p=0.9)] * 16 + [SamplingParams(temperature=0.8, top_k=40)] * 16
    gens = [torch.Generator().manual_seed(i) for i in range(32)]
    sample(logits, params, gens, [[]] * 32, [[]] * 32, eos_token_id=None)
    assert calls == {"sort": 1, "topk": 1}


@pytest.mark.parametrize("scale", [8.0, 3.0, 0.5])
def test_the_histogram_search_keeps_what_the_threshold_keeps(monkeypatch, scale):
    """With the threshold disabled, every row goes to the histogram search, down to a few tokens sorted or to one
    sorted range: the same kept set as the threshold's (or the reference's, up to float32 ties at its boundary)."""
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(2)) * scale
    params = [SamplingParams(temperature=1.0, top_p=tp) for tp in (0.9, 0.5, 0.99)]
    fast = [torch.isfinite(filter_logits(logits[r], params[r])) for r in range(3)]
    monkeypatch.setattr(sampler, "NUCLEUS_THRESHOLDS", ())
    for tokens, buckets in ((4096, 1024), (256, 1024), (1, 1024), (1, 2)):  # a sorted range of a few thousand or a few hundred tokens, every level run, tiny histograms
        monkeypatch.setattr(sampler, "NUCLEUS_SORT_TOKENS", tokens)
        monkeypatch.setattr(sampler, "HISTOGRAM_BUCKETS", buckets)
        (group,) = sampler.filter_rows(logits, params)
        assert group.ids is None
        for r in range(3):
            kept = torch.isfinite(group.logits[r])
            if not torch.equal(kept, fast[r]):
                assert_keeps_the_reference(kept.numpy(), logits[r], params[r])


def test_seeded_request_same_text_alone_and_batched(server):
    """Through the server: a seeded, sampled completion is the same alone and while 7 others with other settings share
    its batch."""
    body = {"model": MODEL_NAME, "prompt": "The river", "max_tokens": 24, "temperature": 0.9, "top_p": 0.9, "seed": 77}

    async def run() -> tuple[str, list[str]]:
        async with httpx.AsyncClient(timeout=120) as client:
            alone = (await client.post(f"{server.url}/v1/completions", json=body)).json()["choices"][0]["text"]
            others = [{**body, "seed": i, "temperature": 0.3 + 0.2 * i, "top_k": 5 * i} for i in range(7)]
            responses = await asyncio.gather(*(client.post(f"{server.url}/v1/completions", json=b) for b in [*others[:3], body, *others[3:]]))
            return alone, [r.json()["choices"][0]["text"] for r in responses]

    alone, together = asyncio.run(run())
    assert together[3] == alone
    assert len(set(together)) > 1
