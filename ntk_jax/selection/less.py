"""LESS (docs/theory.md §6.2): Adam-preconditioned loss-gradient similarity, summed over warm-up
checkpoints.

For each warm-up checkpoint c (LoRA params θ_c and its optax Adam moments m_c, v_c; the
trainer saves both with orbax), with learning rate η_c (the schedule's rate of the update
that produced c):

* candidate feature: ``Γ(x) = m'/(√v' + ε)``, ``m' = β1 m_c + (1−β1) g``,
  ``v' = β2 v_c + (1−β2) g²``, ``g = ∇_θ ℓ(θ_c, x)`` the per-example mean token loss; no
  bias correction (:func:`adam_preconditioner`, passed as the ``transform=`` of
  :func:`ntk_jax.kernels.features.gradient_features`);
* target feature: the plain (SGD) loss gradient ``g``;
* both Rademacher-projected to p and unit-normalised;
* ``score_c(x, t) = cos(Γ̂(x), ĝ(t))``; ``score(x) = max over subtasks S of
  mean_{t∈S} Σ_c η_c score_c(x, t)``.

The subtask of a target record is its ``"task"`` field (one subtask if absent).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_jax.data.encoding import lm_batch
from ntk_jax.kernels.features import gradient_features
from ntk_jax.kernels.ntk import normalize_rows
from ntk_jax.kernels.projection import RandomProjection
from ntk_jax.models.subset import ParamSubset
from ntk_jax.selection.optimizer_state import ADAM_B1, ADAM_B2, ADAM_EPS
from ntk_jax.training.losses import per_example_lm_loss

__all__ = ["adam_preconditioner", "loss_scalar_fn", "less_features", "subtask_groups", "less_scores"]


def adam_preconditioner(mu: Any, nu: Any, *, b1: float = ADAM_B1, b2: float = ADAM_B2, eps: float = ADAM_EPS):
    """``transform(g)`` for per-example gradient pytrees (leaves ``(n, ...)``):
    ``(b1 mu + (1−b1) g) / (sqrt(b2 nu + (1−b2) g²) + eps)`` leaf by leaf, ``mu``/``nu``
    broadcast over the example axis; no bias correction."""

    def transform(g):
        def one(gl, ml, vl):
            m = b1 * ml[None] + (1.0 - b1) * gl
            v = b2 * vl[None] + (1.0 - b2) * gl * gl
            return m / (jnp.sqrt(v) + eps)
        return jax.tree.map(one, g, mu, nu)

    return transform


def loss_scalar_fn(subset: ParamSubset):
    """``s(params, batch) -> (n,)``: per-example mean token NLL over ``loss_mask``."""

    def s(params, batch):
        model = subset.merge(params)
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return per_example_lm_loss(logits, batch["targets"], batch["loss_mask"])

    return s


def less_features(subset: ParamSubset, params: Any, batch: dict, *, projection: RandomProjection | None,
                  transform=None, batch_size: int | None = None, progress_desc: str | None = None,
                  scalar_fn=None, with_norms: bool = False):
    """Unit-normalised projected loss gradients ``(n, p)`` at ``params`` (Adam-
    preconditioned with ``transform=adam_preconditioner(mu, nu)``, plain SGD gradients
    without). ``scalar_fn``: ``loss_scalar_fn(subset)`` built once by callers scoring many
    batches (compiled programs are cached on its identity). ``with_norms``: also return the
    rows' norms before normalisation, ``(n,)``."""
    x = lm_batch(batch, asarray=jnp.asarray)
    scalar_fn = loss_scalar_fn(subset) if scalar_fn is None else scalar_fn
    feats = gradient_features(scalar_fn, params, x, projection=projection, transform=transform,
                              batch_size=batch_size, progress_desc=progress_desc)
    unit = normalize_rows(np.asarray(feats, np.float64))
    return (unit, np.linalg.norm(np.asarray(feats, np.float64), axis=1)) if with_norms else unit


def subtask_groups(records: list[dict]) -> dict[str, np.ndarray]:
    """Subtask name → indices of the target records with that ``"task"`` (one group ``""``
    for records without it)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(str(r.get("task", "")), []).append(i)
    return {k: np.asarray(v) for k, v in sorted(groups.items())}


def less_scores(cand_features: list[np.ndarray], target_features: list[np.ndarray], lrs: list[float],
                groups: dict[str, np.ndarray]) -> np.ndarray:
    """LESS scores ``(n_cand,)``: ``max_S mean_{t∈S} Σ_c η_c ⟨Γ̂_c(x), ĝ_c(t)⟩``.

    ``cand_features[c]`` ``(n_cand, p)``, ``target_features[c]`` ``(n_target, p)``: unit rows
    at checkpoint c; ``lrs[c]`` = η_c; ``groups``: subtask → target indices."""
    if not (len(cand_features) == len(target_features) == len(lrs)) or not lrs:
        raise ValueError("need the same, positive number of checkpoints for candidates, targets and lrs")
    sim = sum(float(lr) * (np.asarray(c, np.float64) @ np.asarray(t, np.float64).T)
              for c, t, lr in zip(cand_features, target_features, lrs))  # (n_cand, n_target)
    per_group = np.stack([sim[:, idx].mean(axis=1) for idx in groups.values()], axis=1)
    return per_group.max(axis=1)
