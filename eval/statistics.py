"""Noise in a PPL comparison: a paired bootstrap over evaluation windows."""

from __future__ import annotations

import numpy as np


def ppl_change_pct(nll: np.ndarray, reference_nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Percent PPL change of a model against the reference; works on the last axis (resamples)."""
    return 100.0 * np.expm1((nll.sum(-1) - reference_nll.sum(-1)) / tokens.sum(-1))


def bootstrap_ppl_change(
    nll: list[float], reference_nll: list[float], tokens: list[int], samples: int, seed: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the PPL change over windows resampled with replacement.

    Resampling is paired: a resample draws the same windows for both models, so the interval
    reflects how the change varies across text, not the two models' separate spreads. The same
    seed gives the same interval.
    """
    nll, reference_nll, tokens = (np.asarray(x, dtype=np.float64) for x in (nll, reference_nll, tokens))
    rows = np.random.default_rng(seed).integers(0, len(nll), size=(samples, len(nll)))
    changes = ppl_change_pct(nll[rows], reference_nll[rows], tokens[rows])
    tail = 100.0 * (1 - confidence) / 2
    low, high = np.percentile(changes, [tail, 100.0 - tail])
    return float(low), float(high)
