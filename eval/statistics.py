"""Noise in a comparison with the baseline: paired bootstraps over evaluation windows (PPL) and task samples
(task scores), and McNemar's exact test for accuracy."""

from __future__ import annotations

import math

import numpy as np

MIN_PAIRS = 2  # a paired bootstrap needs two windows (or samples): resampling one only ever draws it again
ROUNDING = 1e-9  # relative slack for the estimate against its interval: sums in another order round differently


def ppl_change_pct(nll: np.ndarray, reference_nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Percent PPL change of a model against the reference; works on the last axis (resamples)."""
    return 100.0 * np.expm1((nll.sum(-1) - reference_nll.sum(-1)) / tokens.sum(-1))


def bootstrap_ppl_change(
    nll: list[float], reference_nll: list[float], tokens: list[int], samples: int, seed: int, confidence: float = 0.95
) -> tuple[float, float] | None:
    """Percentile interval of the PPL change over windows resampled with replacement; None where there is none
    (see percentile_interval).

    Resampling is paired: a resample draws the same windows for both models, so the interval
    reflects how the change varies across text, not the two models' separate spreads. The same
    seed gives the same interval.
    """
    nll, reference_nll, tokens = (np.asarray(x, dtype=np.float64) for x in (nll, reference_nll, tokens))
    if len(nll) < MIN_PAIRS:
        return None
    rows = np.random.default_rng(seed).integers(0, len(nll), size=(samples, len(nll)))
    changes = ppl_change_pct(nll[rows], reference_nll[rows], tokens[rows])
    return percentile_interval(changes, float(ppl_change_pct(nll, reference_nll, tokens)), confidence)


def bootstrap_mean_difference(
    values: list[float], reference: list[float], samples: int, seed: int, confidence: float = 0.95
) -> tuple[float, float] | None:
    """Percentile interval of mean(values - reference) in points (x100) over task samples resampled in pairs
    (the same samples for both models); the same seed gives the same interval; None where there is none (see
    percentile_interval)."""
    differences = 100.0 * (np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
    if len(differences) < MIN_PAIRS:
        return None
    rows = np.random.default_rng(seed).integers(0, len(differences), size=(samples, len(differences)))
    return percentile_interval(differences[rows].mean(axis=-1), float(differences.mean()), confidence)


def percentile_interval(resampled: np.ndarray, estimate: float, confidence: float) -> tuple[float, float] | None:
    """The central `confidence` interval of a resampled statistic; None when it is not finite or does not contain
    the estimate (beyond rounding): a degenerate bootstrap, whose interval would say nothing about the estimate."""
    tail = 100.0 * (1 - confidence) / 2
    low, high = (float(bound) for bound in np.percentile(resampled, [tail, 100.0 - tail]))
    slack = ROUNDING * max(abs(low), abs(high), abs(estimate))
    if math.isfinite(low) and math.isfinite(high) and low - slack <= estimate <= high + slack:
        return low, high
    return None


def no_interval(count: int, unit: str) -> str:
    """Why a comparison over `count` windows (or samples: `unit`) has no interval, in words."""
    counted = f"{count} {unit}{'' if count == 1 else 's'}"
    if count < MIN_PAIRS:
        return f"no interval: {counted}, at least {MIN_PAIRS} needed"
    return f"no interval: the paired bootstrap over {counted} is degenerate"


def mcnemar_exact(values: list[float], reference: list[float]) -> float | None:
    """Two-sided exact McNemar p-value for paired right/wrong outcomes (1/0): of the samples the two models
    disagree on, how unlikely a split this uneven is if either is equally likely to be the one right. None for
    outcomes that are not all 0 or 1."""
    pairs = list(zip(values, reference))
    if any(v not in (0.0, 1.0) or r not in (0.0, 1.0) for v, r in pairs):
        return None
    gained = sum(1 for v, r in pairs if v > r)
    lost = sum(1 for v, r in pairs if v < r)
    disagreements = gained + lost
    if disagreements == 0:
        return 1.0
    tail = sum(math.comb(disagreements, k) for k in range(min(gained, lost) + 1)) / 2**disagreements
    return min(1.0, 2 * tail)
