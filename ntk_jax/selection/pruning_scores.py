"""The standard data-pruning scores EL2N and GraNd (Paul, Ganguli & Dziugaite 2021), the
baselines of lpNTK pruning (docs/theory.md §6.3).

For a K-class classifier with logits ``z(x) ∈ R^K`` (``logits_fn(params, batch) -> (n, K)``),
label ``y`` and ``p = softmax(z)``:

* EL2N:  ``‖p(x) − e_y‖₂`` (the error vector's norm);
* GraNd: ``‖∇θ ℓ(x, y)‖₂`` with ``ℓ = −log p_y`` the cross-entropy, over the parameters in
  ``params`` (all of them for the digits CNN, the LoRA factors for the text classifier).

Both are taken early in training (a few epochs) and averaged over a few independent short runs
(:func:`average_runs`); high scores mark hard / informative examples, so pruning keeps the
highest-scoring examples of each class (:func:`keep_highest`, with the same per-class counts as
the other methods it is compared with).

Labels travel in the batch under ``label_key`` (default ``"label"``), ``(n,)`` ints in ``[0, K)``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_jax.kernels.features import batch_size_of, gradient_features

PyTree = Any

__all__ = ["el2n_scores", "grand_scores", "average_runs", "keep_highest"]


def _labels(batch: dict, label_key: str) -> np.ndarray:
    if not isinstance(batch, dict) or label_key not in batch:
        raise KeyError(f"the batch needs the labels under {label_key!r}")
    labels = np.asarray(batch[label_key])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    return labels


def el2n_scores(logits_fn: Callable[[PyTree, dict], jax.Array], params: PyTree, batch: dict, *,
                label_key: str = "label", batch_size: int = 256) -> np.ndarray:
    """``(n,)`` float64 EL2N scores ``‖softmax(z(x_i)) − e_{y_i}‖₂``, in blocks of ``batch_size``."""
    n = batch_size_of(batch, "batch")
    labels = _labels(batch, label_key)
    out = []
    for lo in range(0, n, batch_size):
        z = np.asarray(logits_fn(params, {k: v[lo:lo + batch_size] for k, v in batch.items()}), np.float64)
        if z.ndim != 2:
            raise ValueError(f"logits_fn must return (n, K) logits, got shape {z.shape}")
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(p)), labels[lo:lo + batch_size]] -= 1.0
        out.append(np.linalg.norm(p, axis=1))
    return np.concatenate(out)


def grand_scores(logits_fn: Callable[[PyTree, dict], jax.Array], params: PyTree, batch: dict, *,
                 label_key: str = "label", batch_size: int = 64) -> np.ndarray:
    """``(n,)`` float64 GraNd scores ``‖∇θ CE(z(x_i), y_i)‖₂`` over every leaf of ``params``:
    per-example gradients by :func:`ntk_jax.kernels.features.gradient_features` (blocks of
    ``batch_size``; only the norms are kept)."""
    n = batch_size_of(batch, "batch")
    _labels(batch, label_key)

    def per_example_loss(p, b):
        z = logits_fn(p, b).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(z, b[label_key])

    out = []
    for lo in range(0, n, batch_size):
        block = {k: v[lo:lo + batch_size] for k, v in batch.items()}
        g = gradient_features(per_example_loss, params, block, batch_size=batch_size, progress_desc=None)
        out.append(np.linalg.norm(np.asarray(g, np.float64), axis=1))
    return np.concatenate(out)


def average_runs(scores: list[np.ndarray]) -> np.ndarray:
    """Mean over runs of ``(n,)`` score vectors → ``(n,)``."""
    if not scores:
        raise ValueError("no score runs to average")
    stacked = np.stack([np.asarray(s, np.float64) for s in scores])
    if not np.all(np.isfinite(stacked)):
        raise ValueError("scores have non-finite entries")
    return stacked.mean(axis=0)


def keep_highest(scores: np.ndarray, labels: np.ndarray, keep_per_class: dict) -> np.ndarray:
    """The ``keep_per_class[c]`` highest-scoring examples of each class ``c`` (ties: lower index
    first). Sorted global indices ``(Σ_c keep_per_class[c],)``."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    kept = []
    for c, k in sorted(keep_per_class.items()):
        members = np.flatnonzero(labels == c)
        if not 0 <= k <= len(members):
            raise ValueError(f"class {c}: cannot keep {k} of {len(members)} examples")
        order = np.argsort(-scores[members], kind="stable")
        kept.append(members[order[:int(k)]])
    return np.sort(np.concatenate(kept)).astype(np.int64)
