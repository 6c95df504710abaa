"""lpNTK: the labelled pseudo-NTK and farthest-point-clustering data pruning (docs/theory.md §6.3).

For a K-class classifier with raw logits ``z(x) ∈ R^K`` (``logits_fn(params, x) -> (n, K)``)
and an integer label ``y``, the sign vector ``s(y) ∈ {±1}^K`` is +1 at the label and -1
elsewhere (the sign of ``e_y − softmax(z)``). Each example's lpNTK feature is one gradient:

    φ(x, y) = ∇θ Σ_a s_a(y) z_a(x)          (one backward pass per example)

and ``lpNTK(x, x') = (1/K) ⟨φ(x, y), φ(x', y')⟩``. With all signs +1 (``kernel="sum_logits"``)
it is the label-free sum-of-logits pNTK, the lpNTK paper's ablation (:data:`KERNELS`). The
kernel is a Gram matrix of (optionally JL-projected) features:
``lpntk_kernel(Φ, K) = Φ Φᵀ / K``. Positive ≈ interchangeable, ≈ 0 unrelated, negative
contradictory.

Pruning: per class, farthest-point clustering (:func:`farthest_point_clustering`) with
``k = max(1, ⌊keep_ratio · class size⌋)`` clusters on the class's lpNTK block, then one of
:data:`PRUNE_MODES`; :func:`random_prune` is the baseline with the same per-class counts.

Labels travel in the batch pytree under ``label_key`` (default ``"label"``), an int array
``(n,)`` in ``[0, K)``, so that :func:`ntk_jax.kernels.features.gradient_features` slices
them together with the inputs.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntk_jax.kernels.features import batch_size_of, gradient_features
from ntk_jax.kernels.projection import RandomProjection

PyTree = Any

PRUNE_MODES = ("centres", "random_member", "drop_largest_half")
KERNELS = ("lpntk", "sum_logits")  # label signs s(y), or all signs +1

__all__ = ["PRUNE_MODES", "KERNELS", "sign_vectors", "lpntk_scalar_fn", "lpntk_features", "lpntk_kernel",
           "cosine_kernel", "farthest_point_clustering", "class_clusters", "cluster_counts", "prune_clusters",
           "random_prune"]


def sign_vectors(labels: jax.Array, num_classes: int) -> jax.Array:
    """``(n,)`` int labels → ``(n, K)`` float32 signs: +1 at the label, −1 elsewhere."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return 2.0 * onehot - 1.0


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {KERNELS}")


def lpntk_scalar_fn(logits_fn: Callable[[PyTree, PyTree], jax.Array], *, label_key: str = "label",
                    kernel: str = "lpntk") -> Callable[[PyTree, PyTree], jax.Array]:
    """``s(params, batch) = Σ_a s_a(y) z_a(x) ∈ R^n``: the scalar whose per-example gradient
    is the lpNTK feature (``kernel="sum_logits"``: ``Σ_a z_a(x)``, all signs +1).
    ``logits_fn(params, batch) -> (n, K)``; ``batch[label_key]`` ``(n,)``.
    """
    _check_kernel(kernel)

    def s(params, batch):
        if not isinstance(batch, dict) or label_key not in batch:
            raise KeyError(f"the lpNTK batch needs the labels under {label_key!r}")
        z = logits_fn(params, batch)
        if z.ndim != 2:
            raise ValueError(f"logits_fn must return (n, K) logits, got shape {z.shape}")
        z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
        if kernel == "sum_logits":
            return jnp.sum(z, axis=1)
        return jnp.sum(sign_vectors(batch[label_key], z.shape[1]) * z, axis=1)

    return s


def _check_labels(batch: PyTree, label_key: str, num_classes: int) -> np.ndarray:
    if not isinstance(batch, dict) or label_key not in batch:
        raise KeyError(f"the lpNTK batch needs the labels under {label_key!r}")
    labels = np.asarray(batch[label_key])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range "
                         f"[{labels.min()}, {labels.max()}]")
    return labels


def lpntk_features(logits_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree, batch: dict, *,
                   num_classes: int, label_key: str = "label",
                   projection: RandomProjection | None = None, batch_size: int | None = None,
                   progress_desc: str = "lpNTK features", kernel: str = "lpntk") -> np.ndarray:
    """Per-example lpNTK features ``φ_i = ∇θ Σ_a s_a(y_i) z_a(x_i)``: ``(n, P)`` or ``(n, p)``
    with a projection (``⟨Πφ, Πφ'⟩ ≈ ⟨φ, φ'⟩``). ``batch`` is a dict with leading axis n
    holding whatever ``logits_fn`` reads plus ``label_key``. Numpy, host memory.
    ``kernel="sum_logits"``: the sum-of-logits features ``∇θ Σ_a z_a(x_i)`` instead.
    """
    batch_size_of(batch, "batch")
    _check_kernel(kernel)
    _check_labels(batch, label_key, num_classes)
    return gradient_features(lpntk_scalar_fn(logits_fn, label_key=label_key, kernel=kernel), params, batch,
                             projection=projection, batch_size=batch_size, progress_desc=progress_desc)


def lpntk_kernel(features1: np.ndarray, num_classes: int, features2: np.ndarray | None = None) -> np.ndarray:
    """``(1/K) Φ1 Φ2ᵀ``: ``(n1, n2)`` float64 (``features2=None``: ``Φ2 = Φ1``)."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    f1 = np.asarray(features1, np.float64)
    f2 = f1 if features2 is None else np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be (n, P) matrices with equal P, got {f1.shape} and {f2.shape}")
    return f1 @ f2.T / num_classes


def cosine_kernel(kernel: np.ndarray) -> np.ndarray:
    """``K_ij / sqrt(K_ii K_jj)``: a Gram matrix with the feature norms divided out, ``(n, n)``
    float64 (a diagnostic: farthest-point clustering on the raw kernel also sees the norms)."""
    K = np.asarray(kernel, np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"kernel must be a square (n, n) matrix, got {K.shape}")
    d = np.diag(K)
    if np.any(d <= 0):
        raise ValueError("kernel has a non-positive diagonal entry (a zero feature): no cosine")
    return K / np.sqrt(np.outer(d, d))


# ------------------------------------------------------------------------------ clustering
def farthest_point_clustering(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-point clustering on a symmetric ``(n, n)`` similarity matrix (docs/theory.md §6.3).

    1. The first centre is a member of the most similar pair ``argmax_{i≠j} S_ij`` (the one
       with the smaller index; ties broken by the first pair in row-major order); every
       example joins it.
    2. While fewer than ``k`` centres: the next centre is the non-centre example least similar
       to its own centre (``argmin_i S[i, centre(i)]``, first index on ties); every non-centre
       example strictly more similar to the new centre than to its current one moves to it.

    A centre always belongs to its own cluster. Every non-centre member ``i`` ends with
    ``S[i, centre(i)] ≥ S[i, c]`` for every centre ``c``.

    Args:
      similarity: ``(n, n)`` array (lpNTK block of one class).
      k: number of clusters, ``1 ≤ k ≤ n``.

    Returns:
      ``(centres (k,), assignment (n,))``: centre indices in the order chosen, and for every
      example the position in ``centres`` of its cluster.
    """
    S = np.asarray(similarity, np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"similarity must be a square (n, n) matrix, got {S.shape}")
    n = S.shape[0]
    if n == 0:
        raise ValueError("similarity is empty (no examples to cluster)")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if not np.all(np.isfinite(S)):
        raise ValueError("similarity has non-finite entries")
    if n == 1:
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    off = S.copy()
    np.fill_diagonal(off, -np.inf)
    first = int(min(np.unravel_index(int(np.argmax(off)), off.shape)))
    centres = [first]
    assignment = np.zeros(n, np.int64)
    is_centre = np.zeros(n, bool)
    is_centre[first] = True
    own = S[np.arange(n), first].copy()  # similarity of every example to its own centre
    while len(centres) < k:
        candidate_sim = np.where(is_centre, np.inf, own)
        new = int(np.argmin(candidate_sim))
        centres.append(new)
        is_centre[new] = True
        move = (~is_centre) & (S[:, new] > own)
        assignment[move] = len(centres) - 1
        own[move] = S[move, new]
        assignment[new] = len(centres) - 1
        own[new] = S[new, new]
    return np.asarray(centres, np.int64), assignment


def cluster_counts(class_sizes: dict, keep_ratio: float) -> dict:
    """``k = max(1, ⌊keep_ratio · size⌋)`` clusters per class (classes with ≥1 example)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return {c: max(1, int(np.floor(keep_ratio * size + 1e-9))) for c, size in class_sizes.items()}


def class_clusters(kernel: np.ndarray, labels: np.ndarray, keep_ratio: float) -> dict:
    """Farthest-point clustering of each class on its block of ``kernel`` ``(n, n)``.

    Returns ``{class: {"members": (m,) global indices, "centres": (k,) global indices,
    "assignment": (m,) cluster position of each member}}``.
    """
    kernel = np.asarray(kernel)
    labels = np.asarray(labels)
    if kernel.shape != (labels.size, labels.size):
        raise ValueError(f"kernel {kernel.shape} does not match {labels.size} labels")
    classes = sorted(int(c) for c in np.unique(labels))
    counts = cluster_counts({c: int(np.sum(labels == c)) for c in classes}, keep_ratio)
    out = {}
    for c in classes:
        members = np.flatnonzero(labels == c)
        centres, assignment = farthest_point_clustering(kernel[np.ix_(members, members)], counts[c])
        out[c] = {"members": members, "centres": members[centres], "assignment": assignment}
    return out


def prune_clusters(clusters: dict, mode: str, seed: int) -> np.ndarray:
    """Indices kept (sorted, global) under a pruning ``mode`` of :data:`PRUNE_MODES`:

    * ``"centres"``: the k centres of every class;
    * ``"random_member"``: one uniformly random member of every cluster;
    * ``"drop_largest_half"``: everything except a random ``⌊size/2⌋`` of each class's
      largest cluster (the first in centre order on ties).

    Deterministic given ``seed`` (one stream per class).
    """
    if mode not in PRUNE_MODES:
        raise ValueError(f"unknown pruning mode {mode!r}; use one of {PRUNE_MODES}")
    kept = []
    for c, cl in clusters.items():
        rng = np.random.default_rng([int(seed), int(c)])
        members, assignment, k = cl["members"], cl["assignment"], len(cl["centres"])
        if mode == "centres":
            kept.append(cl["centres"])
        elif mode == "random_member":
            kept.append(np.array([rng.choice(members[assignment == j]) for j in range(k)], np.int64))
        else:
            sizes = np.bincount(assignment, minlength=k)
            largest = members[assignment == int(np.argmax(sizes))]
            drop = rng.choice(largest, size=len(largest) // 2, replace=False)
            kept.append(np.setdiff1d(members, drop))
    return np.sort(np.concatenate(kept)).astype(np.int64)


def random_prune(labels: np.ndarray, keep_per_class: dict, seed: int) -> np.ndarray:
    """Random pruning baseline: ``keep_per_class[c]`` uniformly random examples of each class
    ``c`` (the same counts as the lpNTK mode it is compared with). Sorted global indices."""
    labels = np.asarray(labels)
    kept = []
    for c, k in sorted(keep_per_class.items()):
        members = np.flatnonzero(labels == c)
        if not 0 <= k <= len(members):
            raise ValueError(f"class {c}: cannot keep {k} of {len(members)} examples")
        rng = np.random.default_rng([int(seed), int(c), 1])
        kept.append(rng.choice(members, size=int(k), replace=False))
    return np.sort(np.concatenate(kept)).astype(np.int64)
