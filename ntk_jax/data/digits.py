"""scikit-learn's handwritten digits (``sklearn.datasets.load_digits``) as a small real image
classification set with fixed, seeded train / validation / test splits.

The data ship inside the scikit-learn wheel (1797 grey-scale 8×8 images, 10 classes, pixel
values 0…16), so nothing is downloaded. scikit-learn is an optional dependency (the
``digits`` extra of ``setup.py``); it is imported only when the data are loaded.

    splits = digits_splits(n_val=360, n_test=360, seed=0)
    splits["train"]["image"]   # (n_train, 8, 8, 1) float32
    splits["train"]["label"]   # (n_train,) int32 in [0, 10)

Splits are stratified: every class is split in the proportions of the whole set (the counts per
class follow from ``n_val`` / ``n_test`` by largest remainders), and which images go where is a
pure function of ``seed``. Scaling: pixels divided by 16 (to [0, 1]), then the TRAIN split's
per-pixel mean subtracted and the result divided by the train split's overall pixel standard
deviation, so validation and test are scaled with train statistics only.
"""
from __future__ import annotations

import numpy as np

__all__ = ["NUM_CLASSES", "IMAGE_SHAPE", "load_digits_arrays", "split_counts", "digits_splits"]

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) float64 in [0, 16], labels (1797,) int)`` from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data need scikit-learn: pip install -e \".[digits]\"") from e
    d = load_digits()
    return np.asarray(d.images, np.float64), np.asarray(d.target)


def split_counts(class_sizes: np.ndarray, n_split: int) -> np.ndarray:
    """Stratified per-class counts summing to ``n_split``: ``n_split · size / total`` rounded by
    largest remainders (ties: lower class first). ``class_sizes`` ``(K,)`` → ``(K,)`` ints."""
    sizes = np.asarray(class_sizes, np.int64)
    total = int(sizes.sum())
    if not 0 <= n_split <= total:
        raise ValueError(f"cannot take {n_split} of {total} examples")
    exact = sizes * n_split / total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:n_split - int(counts.sum())]] += 1
    return counts


def digits_splits(n_val: int, n_test: int, seed: int = 0, *, n_train: int = 0, images: np.ndarray | None = None,
                  labels: np.ndarray | None = None) -> dict:
    """Stratified, seeded train / val / test splits of the digits (or of ``images`` ``(N, 8, 8)``
    / ``labels`` ``(N,)`` when given). ``n_train=0``: every image not in val or test trains;
    else a stratified ``n_train`` of them (tests use a few dozen).

    Returns ``{"train"|"val"|"test": {"image": (n, 8, 8, 1) float32, "label": (n,) int32,
    "index": (n,) int64 (row in the full set)}, "scaling": {"mean": (8, 8) pixel mean,
    "std": float}}``; rows of each split in increasing ``index`` order. Raises
    ``ValueError`` when a split would be empty or the sizes exceed the set.
    """
    if images is None or labels is None:
        images, labels = load_digits_arrays()
    images = np.asarray(images, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images must be (N, H, W) with N = len(labels), got {images.shape} and {labels.shape}")
    n = labels.size
    if n_val <= 0 or n_test <= 0 or n_val + n_test >= n:
        raise ValueError(f"n_val={n_val} and n_test={n_test} must be positive and leave training data "
                         f"(of {n} images)")
    classes = np.unique(labels)
    sizes = np.array([np.sum(labels == c) for c in classes])
    val_counts, test_counts = split_counts(sizes, n_val), split_counts(sizes, n_test)
    rest = sizes - val_counts - test_counts
    train_counts = rest if not n_train else split_counts(rest, int(n_train))
    parts = {"train": [], "val": [], "test": []}
    for c, nv, nt, nr in zip(classes, val_counts, test_counts, train_counts):
        members = np.random.default_rng([int(seed), int(c)]).permutation(np.flatnonzero(labels == c))
        parts["val"].append(members[:nv])
        parts["test"].append(members[nv:nv + nt])
        parts["train"].append(members[nv + nt:nv + nt + nr])
    index = {k: np.sort(np.concatenate(v)) for k, v in parts.items()}
    pixels = images / 16.0
    mean = pixels[index["train"]].mean(axis=0)
    std = float((pixels[index["train"]] - mean).std()) or 1.0
    out = {k: {"image": ((pixels[idx] - mean) / std)[..., None].astype(np.float32),
               "label": labels[idx].astype(np.int32), "index": idx.astype(np.int64)}
           for k, idx in index.items()}
    out["scaling"] = {"mean": mean, "std": std}
    return out
