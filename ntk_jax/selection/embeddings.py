"""The hidden-state embedding stage of the selection methods (docs/theory.md §6.1, §6.2): the mean
final hidden states of the domain and of the pool, the pool's in resumable score-store shards.
NTK-Selector's coarse kNN filter and the embedding-similarity baseline both use it.
"""
from __future__ import annotations

import numpy as np

from ntk_jax.selection.ntk_selector import mean_hidden_states


def pool_embeddings(job, model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(domain (n_dom, h), pool (n_pool, h), pool norms (n_pool,))``: mean final hidden
    states of ``model`` over the tokens ``select.knn_pooling`` names (``"all"`` or
    ``"response"``, :data:`~ntk_jax.selection.ntk_selector.POOLINGS`), the pool's in
    resumable shards of the store ``embeddings/`` (each process embeds its own shards; all
    merge them)."""
    fbs = job.feature_batch_size
    pooling = str(job.cfg.get("knn_pooling", "all"))
    with job.timed("embed"):
        store = job.store("embeddings", job.pool_ids, "embed")

        def embed(lo, hi):
            e = job.map_records(lambda arrays: mean_hidden_states(model, arrays, batch_size=fbs, pooling=pooling),
                                lo, hi)
            return np.linalg.norm(e, axis=1), e

        job.score_shards(store, embed, desc=f"{job.method}: embed pool", with_features=True)
        _, norms, cand = store.merge(with_features=True)
        dom = mean_hidden_states(model, job.domain_arrays, batch_size=fbs, pooling=pooling)
    return dom, cand, norms
