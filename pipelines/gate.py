"""The quality gate: which evaluated variant, if any, may be registered and deployed.

A variant passes when, against the unoptimized model measured in the same evaluation run, its perplexity
rose by at most ``max_perplexity_increase`` (relative), its batch-1 decode is at least ``min_speedup``
times as fast, (when set) its time to first token is within ``max_ttft_ms``, and (when set) its greedy
agreement with the unoptimized model is at least ``min_greedy_agreement``. Of the passing ones the
fastest at batch 1 is selected. The unoptimized model is a candidate too: it passes when ``min_speedup``
is at most 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    max_perplexity_increase: float = 0.05
    min_speedup: float = 1.0
    max_ttft_ms: float = 0.0  # 0: no limit
    min_greedy_agreement: float = 0.0  # 0: no check

    def __post_init__(self) -> None:
        if self.max_perplexity_increase < 0 or self.min_speedup <= 0 or self.max_ttft_ms < 0 or not 0 <= self.min_greedy_agreement <= 1:
            raise ValueError("thresholds: need max_perplexity_increase ≥ 0, min_speedup > 0, max_ttft_ms ≥ 0, 0 ≤ min_greedy_agreement ≤ 1")


def failures(result: dict, baseline: dict, thresholds: Thresholds) -> list[str]:
    """Why ``result`` does not pass (empty when it does)."""
    why = []
    increase = result["perplexity"] / baseline["perplexity"] - 1.0
    if increase > thresholds.max_perplexity_increase:
        why.append(f"perplexity {increase:+.1%} > +{thresholds.max_perplexity_increase:.1%}")
    speedup = result["decode_tokens_per_s_batch1"] / baseline["decode_tokens_per_s_batch1"]
    if speedup < thresholds.min_speedup:
        why.append(f"speedup {speedup:.2f}× < {thresholds.min_speedup:.2f}×")
    if thresholds.max_ttft_ms and 1000 * result["ttft_s"] > thresholds.max_ttft_ms:
        why.append(f"TTFT {1000 * result['ttft_s']:.1f} ms > {thresholds.max_ttft_ms:.1f} ms")
    if thresholds.min_greedy_agreement:
        agreement = result.get("greedy_agreement")
        if agreement is None:
            why.append("greedy agreement not measurable (another tokenizer)")
        elif agreement < thresholds.min_greedy_agreement:
            why.append(f"greedy agreement {agreement:.3f} < {thresholds.min_greedy_agreement:.3f}")
    return why


def select(results: list[dict], thresholds: Thresholds) -> tuple[int | None, str]:
    """(index of the selected result or None, a one-line reason). ``results[0]`` is the unoptimized baseline."""
    baseline = results[0]
    verdicts = [(i, failures(r, baseline, thresholds)) for i, r in enumerate(results)]
    passing = [i for i, why in verdicts if not why]
    if not passing:
        detail = "; ".join(f"{results[i]['name']}: {', '.join(why)}" for i, why in verdicts)
        return None, f"no variant passed the gate ({detail})"
    best = max(passing, key=lambda i: results[i]["decode_tokens_per_s_batch1"])
    r = results[best]
    return best, (
        f"selected {r['name']}: perplexity {r['perplexity'] / baseline['perplexity'] - 1:+.1%}, "
        f"{r['decode_tokens_per_s_batch1'] / baseline['decode_tokens_per_s_batch1']:.2f}× batch-1 decode"
    )
