"""Embedding similarity (docs/theory.md §6.2): NTK-Selector's coarse filter alone — each domain record
votes for its ``knn_k`` nearest pool records by cosine of the mean final hidden states of the
warm-up model; the N most-voted are selected (ties by mean cosine, then pool order).

Settings: ``select.lora``, ``select.warmup``, ``select.knn_k`` (shared with ``ntk``).
The embedding stage (:func:`ntk_jax.selection.embeddings.pool_embeddings`) is shared with ``ntk``.
"""
from __future__ import annotations

import numpy as np

from ntk_jax.selection.baselines import embedding_selection
from ntk_jax.selection.embeddings import pool_embeddings
from ntk_jax.selection.methods import Selection


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
