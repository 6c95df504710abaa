"""Selection baselines (docs/theory.md §6.2) that need no gradients: random, and embedding similarity
(the NTK-Selector coarse filter alone). LESS lives in :mod:`ntk_jax.selection.less`."""
from __future__ import annotations

import numpy as np

from ntk_jax.selection.ntk_selector import knn_votes, top_by_votes

__all__ = ["random_selection", "embedding_selection"]


def random_selection(n_pool: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct pool indices drawn uniformly with ``default_rng(seed)`` (sorted)."""
    if n > n_pool:
        raise ValueError(f"N={n} is larger than the pool ({n_pool} candidates)")
    return np.sort(np.random.default_rng(int(seed)).choice(n_pool, size=int(n), replace=False))


def embedding_selection(domain_emb: np.ndarray, cand_emb: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``n`` candidates by kNN votes (each domain example votes for its ``k`` nearest by
    cosine of the mean hidden states), ties by mean cosine then index.

    Returns ``(indices best first, votes, mean_cos)``."""
    if n > cand_emb.shape[0]:
        raise ValueError(f"N={n} is larger than the pool ({cand_emb.shape[0]} candidates)")
    votes, mean_cos = knn_votes(domain_emb, cand_emb, k)
    return top_by_votes(votes, mean_cos, n), votes, mean_cos
