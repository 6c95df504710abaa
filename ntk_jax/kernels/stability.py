"""NTK-like stability of a kernel trajectory (docs/theory.md §3; NTK-Selector Def. 1, Thm. 1).

Given kernels ``Θ_t`` on a fixed probe set at training steps ``t`` and the reference
``Θ_0``, all with the same (arbitrary) shape, and Frobenius inner products
``⟨A, B⟩_F = Σ A_ij B_ij``::

    S(t)  = ⟨Θ_t, Θ_0⟩_F / (‖Θ_t‖_F ‖Θ_0‖_F)        cosine similarity
    a*(t) = ⟨Θ_t, Θ_0⟩_F / ‖Θ_0‖_F²                  scale along Θ_0
    R(t)  = Θ_t − a*(t) Θ_0                          residual, ⟨R, Θ_0⟩_F = 0
    u(t)  = ∫_0^t a*(τ) dτ                           reparameterised time

The trajectory is "NTK-like with ε" if ``S(t) ≥ 1 − ε`` for all t; Theorem 1 then bounds
the deviation from fixed-kernel dynamics in time u by ``‖Δ‖ ≤ η ‖Θ_0‖ √(2ε)/(1−ε) ‖γ‖``.
Note ``‖R‖_F/‖Θ_t‖_F = √(1 − S²)``.

Host-side utilities: inputs may be numpy or jax arrays; outputs are python floats or
float64 numpy arrays.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ntk_jax.kernels.checks import check_finite

__all__ = [
    "frobenius_cosine",
    "kernel_scale",
    "scale_residual",
    "relative_kernel_change",
    "reparameterized_time",
    "ntk_like_epsilon",
    "theorem1_bound_factor",
    "theorem1_bound",
    "stability_summary",
]


def _as_real(A, name: str) -> np.ndarray:
    A = np.asarray(A)
    if np.issubdtype(A.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real, got dtype {A.dtype}")
    return check_finite(A.astype(np.float64), name)


def _pair(A, B, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    A = _as_real(A, name_a)
    B = _as_real(B, name_b)
    if A.shape != B.shape:
        raise ValueError(
            f"shape mismatch: {name_a} has shape {tuple(A.shape)}, "
            f"{name_b} has shape {tuple(B.shape)}"
        )
    if A.size == 0:
        raise ValueError(f"{name_a} and {name_b} are empty (shape {tuple(A.shape)})")
    return A, B


def _fro_inner(A: np.ndarray, B: np.ndarray) -> float:
    return float(np.dot(A.ravel(), B.ravel()))


def _fro_norm(A: np.ndarray) -> float:
    return float(np.linalg.norm(A.ravel()))


def _nonzero_norm(A: np.ndarray, name: str) -> float:
    nrm = _fro_norm(A)
    if nrm == 0.0:
        raise ValueError(f"{name} has zero Frobenius norm")
    return nrm


def frobenius_cosine(A, B) -> float:
    """Frobenius cosine ``⟨A, B⟩_F / (‖A‖_F ‖B‖_F)`` of two same-shape arrays.

    Clipped to ``[-1, 1]`` against round-off.

    Raises:
      ValueError: shapes differ (both are named), either norm is zero, or non-finite.
    """
    A, B = _pair(A, B, "A", "B")
    na = _nonzero_norm(A, "A")
    nb = _nonzero_norm(B, "B")
    return float(np.clip(_fro_inner(A, B) / (na * nb), -1.0, 1.0))


def kernel_scale(K_t, K_0) -> float:
    """Scale of ``K_t`` along ``K_0``: ``a* = ⟨K_t, K_0⟩_F / ‖K_0‖_F²``.

    ``a*`` minimises ``‖K_t − a K_0‖_F`` over scalars ``a``.
    """
    K_t, K_0 = _pair(K_t, K_0, "K_t", "K_0")
    n0 = _nonzero_norm(K_0, "K_0")
    return _fro_inner(K_t, K_0) / n0**2


def scale_residual(K_t, K_0) -> np.ndarray:
    """Residual ``R = K_t − a* K_0`` (same shape as the inputs); ``⟨R, K_0⟩_F = 0``."""
    a = kernel_scale(K_t, K_0)
    return np.asarray(K_t, dtype=np.float64) - a * np.asarray(K_0, dtype=np.float64)


def relative_kernel_change(K_t, K_0) -> float:
    """Relative change ``‖K_t − K_0‖_F / ‖K_0‖_F``."""
    K_t, K_0 = _pair(K_t, K_0, "K_t", "K_0")
    n0 = _nonzero_norm(K_0, "K_0")
    return _fro_norm(K_t - K_0) / n0


def reparameterized_time(steps, a_star) -> np.ndarray:
    """Reparameterised time ``u(t) = ∫_{t_0}^t a*(τ) dτ`` by the trapezoid rule.

    Args:
      steps: ``(T,)`` strictly increasing times (training steps) ``t_0 < … < t_{T−1}``.
      a_star: ``(T,)`` values ``a*(t_k)``.

    Returns:
      ``(T,)`` float64 array with ``u[0] = 0`` and
      ``u[k] = Σ_{j<k} (t_{j+1} − t_j)(a*_j + a*_{j+1})/2``.
    """
    t = _as_real(steps, "steps")
    a = _as_real(a_star, "a_star")
    if t.ndim != 1 or a.ndim != 1:
        raise ValueError(
            f"steps and a_star must be 1-D, got shapes {tuple(t.shape)} and {tuple(a.shape)}"
        )
    if t.shape != a.shape:
        raise ValueError(
            f"steps and a_star must have equal lengths, got {t.shape[0]} and {a.shape[0]}"
        )
    if t.size == 0:
        raise ValueError("steps is empty")
    if np.any(np.diff(t) <= 0):
        k = int(np.argmax(np.diff(t) <= 0))
        raise ValueError(
            f"steps must be strictly increasing; steps[{k}] = {t[k]} >= steps[{k + 1}] = {t[k + 1]}"
        )
    u = np.zeros_like(t)
    u[1:] = np.cumsum(np.diff(t) * 0.5 * (a[1:] + a[:-1]))
    return u


def ntk_like_epsilon(cosines) -> float:
    """Smallest ε for which the trajectory is NTK-like: ``max(0, 1 − min_t S(t))``.

    Args:
      cosines: ``(T,)`` values ``S(t)``, non-empty.
    """
    s = _as_real(cosines, "cosines").ravel()
    if s.size == 0:
        raise ValueError("cosines is empty")
    return max(0.0, 1.0 - float(np.min(s)))


def theorem1_bound_factor(epsilon) -> float:
    """Factor ``√(2ε)/(1 − ε)`` of Theorem 1 (``‖Δ‖ ≤ η ‖Θ_0‖ √(2ε)/(1−ε) ‖γ‖``).

    Raises:
      ValueError: if ``ε`` is not in ``[0, 1)``.
    """
    eps = float(epsilon)
    if not (0.0 <= eps < 1.0):
        raise ValueError(f"epsilon must be in [0, 1), got {eps}")
    return math.sqrt(2.0 * eps) / (1.0 - eps)


def theorem1_bound(epsilon, lr, K0_norm, gamma_norm) -> float:
    """Theorem-1 bound ``η ‖Θ_0‖ √(2ε)/(1−ε) ‖γ‖`` on the deviation ``‖Δ‖``.

    Args:
      epsilon: NTK-like ε in ``[0, 1)``.
      lr: learning rate η ≥ 0.
      K0_norm: ``‖Θ_0‖`` ≥ 0 (the norm the caller uses for Θ_0, e.g. Frobenius).
      gamma_norm: ``‖γ‖ = ‖∂L/∂f‖`` ≥ 0.
    """
    for name, v in (("lr", lr), ("K0_norm", K0_norm), ("gamma_norm", gamma_norm)):
        v = float(v)
        if not (np.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
    return float(lr) * float(K0_norm) * theorem1_bound_factor(epsilon) * float(gamma_norm)


def stability_summary(steps: Sequence, kernels: Sequence, K_0=None) -> dict:
    """Stability statistics of a kernel trajectory, as JSON-serialisable python values.

    Args:
      steps: ``(T,)`` strictly increasing steps at which the kernels were taken.
      kernels: length-``T`` sequence of same-shape arrays ``Θ_t`` (e.g. ``(n, n)``).
      K_0: reference kernel (same shape); defaults to ``kernels[0]``.

    Returns:
      dict with lists of length T — ``steps``, ``cosine`` (S(t)), ``a_star``, ``u``
      (trapezoid integral of a* from ``steps[0]``), ``relative_change``
      (``‖Θ_t − Θ_0‖_F/‖Θ_0‖_F``), ``residual_norm_ratio`` (``‖R‖_F/‖Θ_t‖_F``
      ``= √(1 − S²)``) — and scalars ``epsilon`` (:func:`ntk_like_epsilon`),
      ``bound_factor`` (:func:`theorem1_bound_factor`, ``None`` if ε ≥ 1) and
      ``k0_norm`` (``‖Θ_0‖_F``, for :func:`theorem1_bound`).
    """
    kernels = list(kernels)
    steps_arr = np.asarray(steps)
    if steps_arr.ndim != 1 or steps_arr.shape[0] != len(kernels):
        raise ValueError(
            f"steps must be 1-D with one entry per kernel: got steps shape "
            f"{tuple(steps_arr.shape)} and {len(kernels)} kernels"
        )
    if not kernels:
        raise ValueError("kernels is empty")
    K0 = _as_real(kernels[0] if K_0 is None else K_0, "K_0")
    k0_norm = _nonzero_norm(K0, "K_0")

    cos, a_star, rel, res_ratio = [], [], [], []
    for i, K in enumerate(kernels):
        Kt, _ = _pair(K, K0, f"kernels[{i}]", "K_0")
        nt = _nonzero_norm(Kt, f"kernels[{i}]")
        a = _fro_inner(Kt, K0) / k0_norm**2
        cos.append(float(np.clip(_fro_inner(Kt, K0) / (nt * k0_norm), -1.0, 1.0)))
        a_star.append(a)
        rel.append(_fro_norm(Kt - K0) / k0_norm)
        res_ratio.append(_fro_norm(Kt - a * K0) / nt)

    u = reparameterized_time(steps_arr, np.asarray(a_star))
    eps = ntk_like_epsilon(cos)
    return {
        "steps": steps_arr.tolist(),
        "cosine": cos,
        "a_star": a_star,
        "u": [float(x) for x in u],
        "relative_change": rel,
        "residual_norm_ratio": res_ratio,
        "epsilon": eps,
        "bound_factor": theorem1_bound_factor(eps) if eps < 1.0 else None,
        "k0_norm": k0_norm,
    }
