"""At-initialisation predictors of how well a LoRA placement fine-tunes (docs/theory.md §6.8).

All functions are host-side (numpy, float64) and take the eNTK at θ_0 of one placement:
``K = Θ_0(X, X)`` ``(n, n)`` on the training inputs and, for held-out predictions,
``K_test = Θ_0(X_*, X)`` ``(n_test, n)``. Kernels are the *per-output* kernels the function-space
dynamics use; from a traced kernel over O outputs that is ``tr Θ / O`` under the Jacobian-free
approximation Θ ≈ (tr Θ/O) I (docs/theory.md §2.2), see :func:`placement_predictors`.

The linearised model ``f_lin = f_0 + J_0 (θ − θ_0)`` trained by full-batch gradient descent on
``L = (1/n) Σ_i ℓ(f(x_i), y_i)`` with step sizes ``η_1 … η_T`` moves its outputs by
``f_{k+1}(X) = f_k(X) − (η_k/n) K ∇_f ℓ``, ``f_{k+1}(X_*) = f_k(X_*) − (η_k/n) K_test ∇_f ℓ``
(a minibatch step of the same rate moves them by this in expectation). For the squared loss
``ℓ = ½‖f − y‖²`` this is linear and has the closed form (docs/theory.md §6.8)::

    f_T(X)   = y + U diag(Π_k (1 − η_k λ_i/n)) Uᵀ (f_0(X) − y)
    f_T(X_*) = f_0(X_*) − K_test U diag(g(λ_i)) Uᵀ (f_0(X) − y),
    g(λ) = (1 − Π_k (1 − η_k λ/n)) / λ   (→ Σ_k η_k / n as λ → 0)

with ``K = U diag(λ) Uᵀ``; for the cross-entropy it is stepped explicitly
(:func:`linearised_cross_entropy`, T products of ``(n, n)`` by ``(n, C)``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from ntk_jax.kernels.ntk import per_example_vjp

from ntk_jax.kernels.spectrum import (_check_targets, check_kernel, condition_number, effective_rank, eigh,
                                      empirical_risk, symmetrize)

__all__ = [
    "leaf_kernels",
    "kernel_target_alignment",
    "learning_rates",
    "linearised_mse",
    "linearised_cross_entropy",
    "placement_predictors",
    "PREDICTORS",
]

# name -> the sign of its Spearman correlation with the fine-tuned eval loss that its theory
# predicts (docs/theory.md §4.4, §6.8); 0: no predicted sign (reported, never used to rank).
PREDICTORS = {
    "kappa": +1,                 # the NTK-spectrum paper: lower κ ↔ lower loss
    "lambda_max": -1,            # a larger kernel learns faster at a fixed rate (§4.4)
    "trace": -1,                 # idem, summed over every direction
    "effective_rank": 0,         # shape of the spectrum only
    "alignment": -1,             # y along the top eigen-directions is learnt first
    "risk": +1,                  # kernel-regression risk R (§4.1)
    "lin_train_loss_mse": +1,    # the linearised model's losses after the budget (§6.8)
    "lin_eval_loss_mse": +1,
    "lin_train_loss_ce": +1,
    "lin_eval_loss_ce": +1,
}


def leaf_kernels(f, params, x, output_dim: int, basis_batch: int = 8, probes=None):
    """The traced eNTK split by parameter leaf: a pytree like ``params`` whose leaves are
    ``K_leaf = Σ_a J_a,leaf J_a,leafᵀ`` ``(n, n)``, so that the kernel over any set of leaves is
    the sum of theirs (``Σ`` over every leaf is the traced eNTK of
    :func:`ntk_jax.kernels.ntk.empirical_ntk`). One program for every subset of the leaves
    (e.g. every LoRA placement inside one model adapted at all their sites).

    Args:
      f: ``f(params, x) -> (n, O)`` (or ``(n, ...)`` with O entries per example).
      x: a batch of n examples. output_dim: O (static). basis_batch: output rows per VJP batch.
      probes: ``None``: exact, one VJP per output. Else a ``(k, O)`` array of output probes
        ``r_j`` with ``E[r rᵀ] = I`` (e.g. Rademacher): the unbiased estimate
        ``(1/k) Σ_j (J ᵀr_j)(Jᵀ r_j)ᵀ`` of the same kernel (Hutchinson's trace estimator over the
        outputs) at k VJPs instead of O.
    """
    vjp, out = per_example_vjp(f, params, x)
    basis = jnp.eye(output_dim, dtype=out.dtype) if probes is None else jnp.asarray(probes, out.dtype)
    scale = 1.0 if probes is None else 1.0 / basis.shape[0]

    def rows(e):
        (c,) = vjp(jnp.broadcast_to(e, out.shape))
        return jax.tree.map(lambda g: g.reshape(g.shape[0], -1) @ g.reshape(g.shape[0], -1).T, c)

    per_row = jax.lax.map(rows, basis, batch_size=min(basis_batch, basis.shape[0]))
    return jax.tree.map(lambda k: scale * k.sum(axis=0), per_row)


def _check_test_kernel(K_test, n: int) -> np.ndarray:
    Kt = np.asarray(K_test, np.float64)
    if Kt.ndim != 2 or Kt.shape[1] != n:
        raise ValueError(f"K_test must have shape (n_test, n) with n={n}, got {tuple(Kt.shape)}")
    if not np.all(np.isfinite(Kt)):
        raise ValueError("K_test has non-finite entries (nan/inf)")
    return Kt


def learning_rates(lr, steps: int | None = None) -> np.ndarray:
    """The step sizes ``(T,)``: a sequence as given, or a scalar ``lr`` repeated ``steps`` times."""
    lrs = np.atleast_1d(np.asarray(lr, np.float64))
    if lrs.ndim != 1:
        raise ValueError(f"learning rates must be a scalar or a 1-D sequence, got shape {lrs.shape}")
    if lrs.size == 1 and steps is not None:
        lrs = np.full(int(steps), float(lrs[0]))
    if lrs.size == 0 or not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
        raise ValueError(f"learning rates must be a non-empty finite sequence of values >= 0, got {lrs}")
    return lrs


def kernel_target_alignment(K, y) -> float:
    """``yᵀ K y / (‖K‖_F ‖y‖²)`` (``tr(Yᵀ K Y)/(‖K‖_F ‖Y‖_F²)`` for ``y`` of shape ``(n, m)``); in
    ``[-1, 1]`` for a symmetric K, 1 for ``K ∝ y yᵀ``.

    Args: K ``(n, n)``; y ``(n,)`` or ``(n, m)``, not all zero."""
    K = symmetrize(check_kernel(K).astype(np.float64))
    y = _check_targets(y, K.shape[0]).reshape(K.shape[0], -1)
    norm = np.linalg.norm(K) * np.sum(y**2)
    if not norm > 0:
        raise ValueError("kernel-target alignment is undefined for a zero kernel or zero targets")
    return float(np.sum(y * (K @ y)) / norm)


def _gd_factors(lam: np.ndarray, lrs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per eigenvalue: the residual factor ``Π_k (1 − η_k λ/n)`` and ``g(λ)`` (module docstring)."""
    a = np.outer(lrs / n, lam)  # (T, n)
    if np.all(a < 1):
        log_p = np.sum(np.log1p(-a), axis=0)
        decay = np.exp(log_p)
        one_minus = -np.expm1(log_p)
    else:  # some step overshoots (η λ/n >= 1): plain products
        decay = np.prod(1.0 - a, axis=0)
        one_minus = 1.0 - decay
    small = np.abs(lam) <= 1e-12 * max(float(np.max(np.abs(lam))), 1e-300)
    g = np.where(small, np.sum(lrs) / n, one_minus / np.where(small, 1.0, lam))
    return decay, g


def linearised_mse(K, y, lr, steps: int | None = None, *, f0=None, K_test=None, y_test=None,
                   f0_test=None) -> dict:
    """The linearised model after T steps of full-batch GD on the squared loss (closed form,
    module docstring).

    Args:
      K: ``(n, n)`` per-output kernel on the training inputs. y: ``(n,)`` or ``(n, m)`` targets.
      lr, steps: step sizes ``η_k`` (a ``(T,)`` sequence, or a scalar and ``steps``).
      f0: outputs at θ_0 on X (shape of y; default 0). K_test: ``(n_test, n)``; y_test, f0_test:
        held-out targets and initial outputs (f0_test default 0).

    Returns: ``{"train_loss", "train_pred", "stable"}`` and, with K_test, ``"test_pred"`` and
    (with y_test) ``"test_loss"``; losses are ``mean_i ½‖f(x_i) − y_i‖²``; ``stable``:
    every ``η_k λ_max/n < 2`` (else the residual grows along the top direction).
    """
    K = symmetrize(check_kernel(K).astype(np.float64))
    n = K.shape[0]
    y = _check_targets(y, n)
    lrs = learning_rates(lr, steps)
    r0 = (np.zeros_like(y) if f0 is None else np.asarray(f0, np.float64).reshape(y.shape)) - y
    lam, U = eigh(K)
    decay, g = _gd_factors(lam, lrs, n)
    coef = U.T @ r0
    scale = decay if r0.ndim == 1 else decay[:, None]
    r_T = U @ (scale * coef)
    out = {"train_pred": y + r_T, "train_loss": float(0.5 * np.sum(r_T**2) / n),
           "stable": bool(np.max(lrs) * max(float(lam[-1]), 0.0) / n < 2)}
    if K_test is not None:
        Kt = _check_test_kernel(K_test, n)
        gs = g if r0.ndim == 1 else g[:, None]
        move = Kt @ (U @ (gs * coef))
        base = 0.0 if f0_test is None else np.asarray(f0_test, np.float64).reshape(move.shape)
        out["test_pred"] = base - move
        if y_test is not None:
            yt = _check_targets(y_test, Kt.shape[0])
            out["test_loss"] = float(0.5 * np.sum((out["test_pred"] - yt) ** 2) / Kt.shape[0])
    return out


def _ce(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    return float(-logp[np.arange(len(labels)), labels].mean()), float((logits.argmax(1) == labels).mean())


def _check_labels(labels, n: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    return labels


def linearised_cross_entropy(K, labels, lr, steps: int | None = None, *, num_classes: int, f0=None,
                             K_test=None, labels_test=None, f0_test=None) -> dict:
    """The linearised model after T steps of full-batch GD on the mean softmax cross-entropy,
    stepped explicitly: ``F ← F − (η_k/n) K (softmax(F) − onehot)``, and the held-out logits
    ``F_* ← F_* − (η_k/n) K_test (softmax(F) − onehot)`` (the same output kernel for every class).

    Args:
      K: ``(n, n)`` per-output kernel. labels: ``(n,)`` ints in ``[0, num_classes)``.
      lr, steps: as in :func:`linearised_mse`. f0: ``(n, C)`` initial logits (default 0).
      K_test ``(n_test, n)``, labels_test ``(n_test,)``, f0_test ``(n_test, C)`` (default 0).

    Returns: ``{"train_loss", "train_accuracy", "train_logits"}`` and, with K_test and
    labels_test, ``"test_loss", "test_accuracy", "test_logits"`` (losses: mean cross-entropy).
    """
    K = symmetrize(check_kernel(K).astype(np.float64))
    n = K.shape[0]
    labels = _check_labels(labels, n, num_classes)
    lrs = learning_rates(lr, steps)
    onehot = np.eye(num_classes)[labels]
    F = np.zeros((n, num_classes)) if f0 is None else np.array(f0, np.float64).reshape(n, num_classes)
    Kt = None if K_test is None else _check_test_kernel(K_test, n)
    Ft = None
    if Kt is not None:
        Ft = (np.zeros((Kt.shape[0], num_classes)) if f0_test is None
              else np.array(f0_test, np.float64).reshape(Kt.shape[0], num_classes))
    for eta in lrs:
        grad = scipy.special.softmax(F, axis=1) - onehot
        F = F - (eta / n) * (K @ grad)
        if Ft is not None:
            Ft = Ft - (eta / n) * (Kt @ grad)
    loss, acc = _ce(F, labels)
    out = {"train_loss": loss, "train_accuracy": acc, "train_logits": F}
    if Ft is not None and labels_test is not None:
        lt = _check_labels(labels_test, Ft.shape[0], num_classes)
        out["test_loss"], out["test_accuracy"] = _ce(Ft, lt)
        out["test_logits"] = Ft
    return out


def placement_predictors(K_all, y, n_train: int, *, sigma: float, lr, steps: int | None = None,
                         output_dim: int = 1) -> dict:
    """Every predictor of :data:`PREDICTORS` for one placement.

    Args:
      K_all: ``(n_train + n_test, n_train + n_test)`` traced eNTK at θ_0 over the training
        inputs followed by held-out inputs (one kernel computation gives K and K_test).
      y: ``(n_train + n_test,)`` ±1 targets in the same order.
      n_train: how many leading rows are training inputs (``n_test >= 1`` follow).
      sigma: ridge of κ and R (as in :mod:`ntk_jax.kernels.spectrum`).
      lr, steps: the fine-tuning job's step sizes (a ``(T,)`` schedule, or a rate and T).
      output_dim: O, the traced kernel's number of outputs; the linearised dynamics use the
        per-output kernel ``K_all / O`` with f_0 = 0 (a fresh head / an output centred at
        init), the ±1 targets (MSE) and the two classes ``y = +1 → 0, −1 → 1`` (CE).

    κ, λmax, tr K, effective rank, alignment and R are of the traced training kernel.
    """
    K_all = symmetrize(check_kernel(K_all).astype(np.float64))
    y = _check_targets(y, K_all.shape[0])
    n = int(n_train)
    if not 1 <= n < K_all.shape[0]:
        raise ValueError(f"n_train must be in [1, {K_all.shape[0]}), got {n_train}")
    K, y_tr, y_te = K_all[:n, :n], y[:n], y[n:]
    Kpo, Kt = K / output_dim, K_all[n:, :n] / output_dim
    lam = np.linalg.eigvalsh(K)
    mse = linearised_mse(Kpo, y_tr, lr, steps, K_test=Kt, y_test=y_te)
    cls = (y < 0).astype(np.int64)
    ce = linearised_cross_entropy(Kpo, cls[:n], lr, steps, num_classes=2, K_test=Kt, labels_test=cls[n:])
    return {"kappa": condition_number(K, sigma), "lambda_max": float(lam[-1]), "trace": float(np.trace(K)),
            "effective_rank": effective_rank(K), "alignment": kernel_target_alignment(K, y_tr),
            "risk": empirical_risk(K, y_tr, sigma),
            "lin_train_loss_mse": mse["train_loss"], "lin_eval_loss_mse": mse["test_loss"],
            "lin_train_loss_ce": ce["train_loss"], "lin_eval_loss_ce": ce["test_loss"],
            "lin_eval_accuracy_ce": ce["test_accuracy"], "lin_stable": mse["stable"]}
