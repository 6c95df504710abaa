"""Embedding similarity (docs/theory.md §6.2): NTK-Selector's coarse filter alone — each domain record
votes for its ``knn_k`` nearest pool records by cosine of the mean final hidden states of the
warm-up model; the N most-voted are selected (ties by mean cosine, then pool order).

Settings: ``select.lora``, ``select.warmup``, ``select.knn_k`` (shared with ``ntk``).
:func:`pool_embeddings` is the resumable embedding stage both methods use.
"""
from __future__ import annotations

import numpy as np

from ntk_jax.selection.baselines import embedding_selection
from ntk_jax.selection.methods import Selection
from ntk_jax.selection.ntk_selector import mean_hidden_states


def pool_embeddings(job, model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(domain (n_dom, h), pool (n_pool, h), pool norms (n_pool,))``: mean final hidden
    states of ``model``, the pool's in resumable shards of the store ``embeddings/`` (each
    process embeds its own shards; all merge them)."""
    fbs = job.feature_batch_size
    with job.timed("embed"):
        store = job.store("embeddings", job.pool_ids, "embed")

        def embed(lo, hi):
            e = job.map_records(lambda arrays: mean_hidden_states(model, arrays, batch_size=fbs), lo, hi)
            return np.linalg.norm(e, axis=1), e

        job.score_shards(store, embed, desc=f"{job.method}: embed pool", with_features=True)
        _, norms, cand = store.merge(with_features=True)
        dom = mean_hidden_states(model, job.domain_arrays, batch_size=fbs)
    return dom, cand, norms


def select(job) -> Selection:
    cfg = job.cfg
    with job.timed("warmup"):
        model, _ = job.warm_up(cfg["lora"], cfg["warmup"])
    dom, cand, norms = pool_embeddings(job, model)
    with job.timed("select"):
        chosen, votes, mean_cos = embedding_selection(dom, cand, int(cfg["n_select"]), int(cfg["knn_k"]))
    # rank key: votes, ties by mean cosine (in [-1, 1], mapped into [0, 1))
    key = votes + (np.asarray(mean_cos) + 1.0) / 2.0001
    job.extra.update(n_voted=int((votes > 0).sum()))
    return Selection(chosen=chosen, scored=np.arange(len(job.pool)), scores=key, feature_norms=norms,
                     arrays={"votes": votes, "mean_cos": mean_cos})
