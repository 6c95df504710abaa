"""Rank statistics and bootstrap intervals shared by the experiments, the selection
diagnostics and the benchmarks (one home for each; docs/theory.md states where each figure is
used).

Every function takes 1-D array-likes of equal length, ignores pairs where either value is not
finite, and returns ``None`` where the statistic is undefined (fewer than 3 finite pairs, or a
constant side), so reports carry ``null`` rather than ``nan``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats as _scipy_stats


def _finite_pairs(a, b) -> tuple[np.ndarray, np.ndarray] | None:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"rank statistics need equal lengths, got {a.shape[0]} and {b.shape[0]}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return a, b


def spearman(a, b) -> float | None:
    """Spearman's rank correlation of ``a`` [n] and ``b`` [n] over their finite pairs."""
    pairs = _finite_pairs(a, b)
    return None if pairs is None else float(_scipy_stats.spearmanr(*pairs).statistic)


def spearman_with_p(a, b) -> dict:
    """``{"rho", "p"}``: Spearman's correlation and its two-sided p-value (``None`` each where
    undefined)."""
    pairs = _finite_pairs(a, b)
    if pairs is None:
        return {"rho": None, "p": None}
    r = _scipy_stats.spearmanr(*pairs)
    return {"rho": float(r.statistic), "p": float(r.pvalue)}


def kendall(a, b) -> float | None:
    """Kendall's τ-b of ``a`` [n] and ``b`` [n] over their finite pairs."""
    pairs = _finite_pairs(a, b)
    return None if pairs is None else float(_scipy_stats.kendalltau(*pairs).statistic)


def bootstrap_interval(statistic: Callable[..., float | None], *samples: Sequence, n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap of ``statistic(*samples)`` resampling the n paired rows of the
    ``samples`` (each of length n) with replacement. Returns ``{"value", "low", "high",
    "n", "n_boot"}``; resamples where the statistic is undefined (``None``) are dropped, and
    ``low``/``high`` are ``None`` if fewer than half of them are defined."""
    arrays = [np.asarray(s) for s in samples]
    n = len(arrays[0])
    if any(len(s) != n for s in arrays):
        raise ValueError(f"bootstrap samples must have equal lengths, got {[len(s) for s in arrays]}")
    value = statistic(*arrays) if n else None
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot if n else 0):
        idx = rng.integers(0, n, size=n)
        v = statistic(*[s[idx] for s in arrays])
        if v is not None and np.isfinite(v):
            draws.append(float(v))
    alpha = (1.0 - level) / 2.0
    if len(draws) < max(n_boot // 2, 1):
        low = high = None
    else:
        low, high = (float(q) for q in np.quantile(draws, [alpha, 1.0 - alpha]))
    return {"value": None if value is None else float(value), "low": low, "high": high, "n": int(n),
            "n_boot": int(n_boot)}
