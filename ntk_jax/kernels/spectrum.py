"""Spectrum of a kernel matrix and the kernel-regression risk bounds (docs/theory.md §4).

All functions are host-side analysis utilities: they accept numpy or jax arrays and
return numpy arrays or python floats. Kernels are symmetrised, ``(K + Kᵀ)/2``, before
any eigen-decomposition or solve, so that round-off asymmetry from the kernel
computation does not leak into the spectrum.

Kernel-regression view (ridge ``σ > 0``, ``n`` training examples, targets ``y`` of shape
``(n,)`` or ``(n, m)``), with ``K = U diag(λ) Uᵀ``::

    α* = (K + σI)⁻¹ y
    R  = (1/n) ‖(I − K(K + σI)⁻¹) y‖²_F = (1/n) Σ_i (σ/(σ+λ_i))² ‖u_iᵀ y‖²

so ``R`` is the mean over the ``n`` examples of the squared residual summed over the
target columns. From the eigen-sum, the correct bounds are::

    (σ/(σ+λ_max))² ‖y‖²/n  ≤  R  ≤  (σ/(σ+λ_min))² ‖y‖²/n

The NTK-spectrum paper prints ``σ‖y‖²/(σ+λ_max) ≤ R ≤ σ‖y‖²/(σ+λ_min)`` (no square, no
``1/n``); its lower bound is false in general (see :func:`paper_printed_bounds`).
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from ntk_jax.kernels.checks import check_finite

__all__ = [
    "check_kernel",
    "symmetrize",
    "eigenvalues",
    "eigh",
    "condition_number",
    "kernel_regression",
    "empirical_risk",
    "risk_bounds",
    "paper_printed_bounds",
    "effective_rank",
    "participation_ratio",
]


# ----------------------------------------------------------------------------- validation


def check_kernel(K, name: str = "kernel") -> np.ndarray:
    """Validate a square kernel matrix and return it as a numpy array.

    Args:
      K: array-like of shape ``(n, n)`` with ``n >= 1`` and finite entries.
      name: how the array is called in error messages.

    Returns:
      ``np.ndarray`` of shape ``(n, n)`` (dtype preserved; integer/bool input is cast
      to float64).

    Raises:
      ValueError: if ``K`` is not 2-D, not square, empty, or has nan/inf entries.
    """
    K = np.asarray(K)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be square (n, n), got shape {tuple(K.shape)}")
    if K.shape[0] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(K.shape)}")
    if not np.issubdtype(K.dtype, np.floating):
        if np.issubdtype(K.dtype, np.complexfloating):
            raise ValueError(f"{name} must be real, got dtype {K.dtype}")
        K = K.astype(np.float64)
    return check_finite(K, name)


def _check_sigma(sigma) -> float:
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"sigma must be a positive real number, got {sigma!r}") from None
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"sigma must be > 0, got {s}")
    return s


def _check_targets(y, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim not in (1, 2):
        raise ValueError(f"y must have shape (n,) or (n, m), got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(
            f"y leading axis must equal the kernel size n={n}, got y shape {tuple(y.shape)}"
        )
    y = y.astype(np.float64)
    n_bad = int(np.size(y) - np.count_nonzero(np.isfinite(y)))
    if n_bad:
        raise ValueError(f"y has {n_bad} non-finite entries (nan/inf)")
    return y


def _check_psd_within_sigma(lam_min: float, sigma: float) -> None:
    if lam_min + sigma <= 0:
        raise ValueError(
            f"kernel is not PSD to within sigma: lambda_min + sigma = {lam_min + sigma:.3e} "
            f"<= 0 (lambda_min = {lam_min:.3e}, sigma = {sigma:.3e})"
        )


# ----------------------------------------------------------------------------- spectrum


def symmetrize(K) -> np.ndarray:
    """Return ``(K + Kᵀ)/2`` for a square kernel ``K`` of shape ``(n, n)``."""
    K = check_kernel(K)
    return 0.5 * (K + K.T)


def eigenvalues(K, dtype=np.float64) -> np.ndarray:
    """Eigenvalues of the symmetrised kernel, ascending.

    Args:
      K: ``(n, n)`` kernel (numpy or jax array).
      dtype: floating dtype the decomposition is computed in (float64 by default).

    Returns:
      ``(n,)`` array of eigenvalues of ``(K + Kᵀ)/2`` in ascending order, in ``dtype``.
    """
    K = symmetrize(check_kernel(K).astype(dtype))
    return scipy.linalg.eigh(K, eigvals_only=True).astype(dtype, copy=False)


def eigh(K, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition ``(K + Kᵀ)/2 = U diag(lam) Uᵀ``.

    Args:
      K: ``(n, n)`` kernel.
      dtype: floating dtype of the decomposition (float64 by default).

    Returns:
      ``(lam, U)``: ``lam`` of shape ``(n,)`` ascending; ``U`` of shape ``(n, n)`` with
      orthonormal eigenvectors as columns (``U[:, i]`` belongs to ``lam[i]``).
    """
    K = symmetrize(check_kernel(K).astype(dtype))
    lam, U = scipy.linalg.eigh(K)
    return lam.astype(dtype, copy=False), U.astype(dtype, copy=False)


def condition_number(K, sigma) -> float:
    """Regularised condition number ``κ(K + σI) = (λ_max + σ)/(λ_min + σ)``.

    Args:
      K: ``(n, n)`` kernel, PSD up to round-off.
      sigma: ridge ``σ > 0``.

    Raises:
      ValueError: if ``sigma <= 0``, or if ``λ_min + σ <= 0`` (the kernel is not PSD
        to within ``sigma``).
    """
    sigma = _check_sigma(sigma)
    lam = eigenvalues(K)
    lam_min, lam_max = float(lam[0]), float(lam[-1])
    _check_psd_within_sigma(lam_min, sigma)
    return (lam_max + sigma) / (lam_min + sigma)


# ----------------------------------------------------------------------------- regression


def _ridge_solve(K_sym: np.ndarray, y: np.ndarray, sigma: float) -> np.ndarray:
    """``(K_sym + σI)⁻¹ y`` by Cholesky; falls back to an LU solve if not PD."""
    A = K_sym + sigma * np.eye(K_sym.shape[0], dtype=K_sym.dtype)
    try:
        c = scipy.linalg.cho_factor(A, lower=True, check_finite=False)
        return scipy.linalg.cho_solve(c, y, check_finite=False)
    except np.linalg.LinAlgError:
        # K + σI is not numerically positive definite (K slightly indefinite and σ tiny).
        try:
            return scipy.linalg.solve(A, y, assume_a="sym", check_finite=False)
        except np.linalg.LinAlgError as e:
            raise ValueError(
                f"K + sigma*I is singular (sigma = {sigma:.3e}); the kernel is not PSD "
                "to within sigma"
            ) from e


def _risk_from_residual(residual: np.ndarray) -> float:
    return float(np.sum(residual**2) / residual.shape[0])


def kernel_regression(K_train, y, sigma, K_test=None) -> dict:
    """Kernel ridge regression with the (symmetrised) training kernel.

    Args:
      K_train: ``(n, n)`` training kernel ``K(X, X)``.
      y: targets, shape ``(n,)`` or ``(n, m)``.
      sigma: ridge ``σ > 0``.
      K_test: optional ``(n_test, n)`` kernel ``K(X_test, X)``.

    Returns:
      dict with float64 numpy arrays (shapes follow ``y``'s trailing axis):
        ``alpha``          ``(K + σI)⁻¹ y`` (Cholesky solve, no explicit inverse), ``(n[, m])``;
        ``train_pred``     ``K α``, ``(n[, m])``;
        ``train_residual`` ``y − K α`` (``= σ α``), ``(n[, m])``;
        ``risk``           python float ``(1/n) ‖y − K α‖²_F`` (see :func:`empirical_risk`);
        ``test_pred``      ``K_test α``, ``(n_test[, m])`` — only if ``K_test`` is given.
    """
    sigma = _check_sigma(sigma)
    K = symmetrize(check_kernel(K_train, "K_train").astype(np.float64))
    n = K.shape[0]
    y = _check_targets(y, n)
    alpha = _ridge_solve(K, y, sigma)
    train_pred = K @ alpha
    residual = y - train_pred
    out = {
        "alpha": alpha,
        "train_pred": train_pred,
        "train_residual": residual,
        "risk": _risk_from_residual(residual),
    }
    if K_test is not None:
        Kt = np.asarray(K_test)
        if Kt.ndim != 2 or Kt.shape[1] != n:
            raise ValueError(
                f"K_test must have shape (n_test, n) with n={n} (K_train shape {(n, n)}), "
                f"got shape {tuple(Kt.shape)}"
            )
        Kt = Kt.astype(np.float64)
        n_bad = int(np.size(Kt) - np.count_nonzero(np.isfinite(Kt)))
        if n_bad:
            raise ValueError(f"K_test has {n_bad} non-finite entries (nan/inf)")
        out["test_pred"] = Kt @ alpha
    return out


def empirical_risk(K, y, sigma) -> float:
    """Training risk of kernel ridge regression.

    ``R = (1/n) ‖(I − K(K + σI)⁻¹) y‖²_F``: the mean over the ``n`` examples of the
    squared residual summed over target columns (Frobenius norm for ``y`` of shape
    ``(n, m)``; no division by ``m``). Computed from a Cholesky solve, not from the
    eigen-decomposition.

    Args:
      K: ``(n, n)`` kernel. y: ``(n,)`` or ``(n, m)``. sigma: ridge ``σ > 0``.
    """
    return kernel_regression(K, y, sigma)["risk"]


def _bound_terms(K, y, sigma) -> tuple[float, float, float, int, float]:
    """Validated ``(σ, λ_min, λ_max, n, ‖y‖²)`` for the risk bounds."""
    sigma = _check_sigma(sigma)
    K = check_kernel(K)
    y = _check_targets(y, K.shape[0])
    lam = eigenvalues(K)
    lam_min, lam_max = float(lam[0]), float(lam[-1])
    _check_psd_within_sigma(lam_min, sigma)
    return sigma, lam_min, lam_max, K.shape[0], float(np.sum(y**2))


def risk_bounds(K, y, sigma) -> tuple[float, float, float]:
    """Correct spectral bounds on the kernel-regression risk, ``(lower, risk, upper)``.

    Same normalisation as :func:`empirical_risk` (``1/n``, Frobenius over targets)::

        lower = (σ/(σ+λ_max))² ‖y‖²/n  ≤  risk  ≤  upper = (σ/(σ+λ_min))² ‖y‖²/n

    which follows from ``risk = (1/n) Σ_i (σ/(σ+λ_i))² ‖u_iᵀ y‖²`` because
    ``λ ↦ (σ/(σ+λ))²`` is decreasing on ``λ > −σ``.

    Tiny negative ``λ_min`` (round-off on a PSD kernel) is deliberately *not* clipped
    to 0: the eigen-sum identity holds for every eigenvalue with ``λ + σ > 0``, and
    ``(σ/(σ+λ_min))²`` with the actual ``λ_min < 0`` is slightly *larger* than the
    clipped value ``1``, so it is the bound that provably contains the computed risk
    (clipping would make the upper bound smaller and could be violated by round-off).

    Raises:
      ValueError: bad ``sigma``/shapes, or ``λ_min + σ <= 0`` (not PSD to within σ).
    """
    sigma, lam_min, lam_max, n, y2 = _bound_terms(K, y, sigma)
    lower = (sigma / (sigma + lam_max)) ** 2 * y2 / n
    upper = (sigma / (sigma + lam_min)) ** 2 * y2 / n
    risk = empirical_risk(K, y, sigma)
    return lower, risk, upper


def paper_printed_bounds(K, y, sigma) -> tuple[float, float]:
    """The NTK-spectrum paper's printed bounds, rescaled to the ``1/n`` normalisation.

    ``lower = σ‖y‖²/(n(σ+λ_max))``, ``upper = σ‖y‖²/(n(σ+λ_min))``.

    The printed LOWER bound is FALSE in general: for ``K = λI`` (λ > 0) the risk is
    ``(σ/(σ+λ))² ‖y‖²/n`` which is strictly below ``σ‖y‖²/(n(σ+λ))``. The upper bound
    holds for PSD kernels (it is looser than the correct one since ``σ/(σ+λ_min) ≤ 1``).
    Kept only so experiments can show where the printed statement fails; use
    :func:`risk_bounds` for the correct bounds.
    """
    sigma, lam_min, lam_max, n, y2 = _bound_terms(K, y, sigma)
    return sigma * y2 / (n * (sigma + lam_max)), sigma * y2 / (n * (sigma + lam_min))


# ----------------------------------------------------------------------------- rank summaries


def _nonneg_spectrum(K) -> np.ndarray:
    lam = eigenvalues(K)
    lam = lam[lam > 0]
    if lam.size == 0 or not np.sum(lam) > 0:
        raise ValueError("kernel has no positive eigenvalues; effective rank is undefined")
    return lam


def effective_rank(K) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(H(p))``, ``p = λ/Σλ``.

    Only the positive eigenvalues of the symmetrised ``(n, n)`` kernel enter (negative
    round-off eigenvalues are dropped; zero ones contribute ``0 log 0 = 0``). Lies in
    ``[1, n]``; equals ``n`` for a multiple of the identity and 1 for rank one.
    """
    lam = _nonneg_spectrum(K)
    p = lam / np.sum(lam)
    return float(np.exp(-np.sum(p * np.log(p))))


def participation_ratio(K) -> float:
    """Participation ratio ``(Σλ)²/Σλ²`` over the positive eigenvalues; in ``[1, n]``."""
    lam = _nonneg_spectrum(K)
    return float(np.sum(lam) ** 2 / np.sum(lam**2))
