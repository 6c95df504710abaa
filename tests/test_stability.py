"""Tests for ntk_jax.kernels.stability (docs/theory.md §3): cosine, scale, residual, u(t), Thm. 1 factor."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from ntk_jax.kernels import stability as stab


def _psd(rng, n=6, r=4):
    A = rng.standard_normal((n, r))
    return A @ A.T


def test_cosine_of_scaled_kernel_is_one_and_scale_is_three():
    K = _psd(np.random.default_rng(0))
    assert stab.frobenius_cosine(K, 3.0 * K) == pytest.approx(1.0, abs=1e-14)
    assert stab.frobenius_cosine(jnp.asarray(K), jnp.asarray(-K)) == pytest.approx(-1.0, abs=1e-14)
    assert stab.kernel_scale(3.0 * K, K) == pytest.approx(3.0, rel=1e-14)
    assert stab.relative_kernel_change(3.0 * K, K) == pytest.approx(2.0, rel=1e-14)
    np.testing.assert_allclose(stab.scale_residual(3.0 * K, K), 0.0, atol=1e-12)


def test_cosine_against_independent_formula():
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    expected = np.trace(A.T @ B) / math.sqrt(np.trace(A.T @ A) * np.trace(B.T @ B))
    assert stab.frobenius_cosine(A, B) == pytest.approx(expected, rel=1e-12)
    # orthogonal matrices in the Frobenius sense
    assert stab.frobenius_cosine(np.diag([1.0, 0.0]), np.diag([0.0, 1.0])) == 0.0


def test_residual_orthogonal_to_K0_and_sqrt_identity():
    rng = np.random.default_rng(2)
    K0 = _psd(rng)
    Kt = 1.7 * K0 + 0.3 * _psd(rng)
    R = stab.scale_residual(Kt, K0)
    assert abs(np.sum(R * K0)) <= 1e-12 * np.linalg.norm(R) * np.linalg.norm(K0)
    S = stab.frobenius_cosine(Kt, K0)
    assert np.linalg.norm(R) / np.linalg.norm(Kt) == pytest.approx(math.sqrt(1 - S**2), rel=1e-9)
    # a* minimises ||Kt - a K0||
    a = stab.kernel_scale(Kt, K0)
    for da in (-1e-3, 1e-3):
        assert np.linalg.norm(Kt - (a + da) * K0) > np.linalg.norm(R)


def test_reparameterized_time_constant_and_linear():
    steps = np.array([5, 7, 10, 20, 21])
    u = stab.reparameterized_time(steps, np.full(5, 2.0))
    np.testing.assert_allclose(u, 2.0 * (steps - steps[0]), rtol=1e-14)
    assert u[0] == 0.0
    # the trapezoid rule integrates a linear a*(t) = t exactly: u = t²/2.
    t = np.array([0.0, 1.0, 3.0, 4.0])
    np.testing.assert_allclose(stab.reparameterized_time(t, t), t**2 / 2, rtol=1e-14)


def test_reparameterized_time_errors():
    with pytest.raises(ValueError, match="equal lengths, got 3 and 2"):
        stab.reparameterized_time([0, 1, 2], [1.0, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        stab.reparameterized_time([0, 2, 2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        stab.reparameterized_time([3, 1, 2], [1.0, 1.0, 1.0])


def test_epsilon_and_bound_factor():
    assert stab.ntk_like_epsilon([1.0, 0.999, 0.995, 0.998]) == pytest.approx(0.005, abs=1e-15)
    assert stab.ntk_like_epsilon([1.0, 1.0]) == 0.0
    assert stab.theorem1_bound_factor(0.0) == 0.0
    assert stab.theorem1_bound_factor(0.02) == pytest.approx(0.2 / 0.98, rel=1e-14)  # √0.04 = 0.2
    assert stab.theorem1_bound(0.02, lr=1e-3, K0_norm=10.0, gamma_norm=2.0) == pytest.approx(
        1e-3 * 10.0 * (0.2 / 0.98) * 2.0, rel=1e-14
    )
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\)"):
            stab.theorem1_bound_factor(bad)
    with pytest.raises(ValueError, match="lr must be finite and >= 0"):
        stab.theorem1_bound(0.1, -1.0, 1.0, 1.0)


def test_shape_mismatch_and_zero_norm_errors():
    with pytest.raises(ValueError, match=r"A has shape \(3, 3\), B has shape \(3, 4\)"):
        stab.frobenius_cosine(np.ones((3, 3)), np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"K_t has shape \(2, 2\), K_0 has shape \(3, 3\)"):
        stab.kernel_scale(np.ones((2, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="B has zero Frobenius norm"):
        stab.frobenius_cosine(np.ones((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="K_0 has zero Frobenius norm"):
        stab.relative_kernel_change(np.ones((2, 2)), np.zeros((2, 2)))


def test_stability_summary():
    rng = np.random.default_rng(3)
    K0 = _psd(rng)
    P = _psd(rng)
    steps = [0, 10, 20, 40]
    kernels = [K0, 1.1 * K0 + 0.01 * P, 1.3 * K0 + 0.05 * P, jnp.asarray(1.2 * K0 + 0.1 * P)]
    s = stab.stability_summary(steps, kernels)
    json.dumps(s)  # JSON-serialisable
    assert s["steps"] == steps
    for key in ("cosine", "a_star", "u", "relative_change", "residual_norm_ratio"):
        assert len(s[key]) == 4 and all(isinstance(v, float) for v in s[key])
    assert s["cosine"][0] == pytest.approx(1.0) and s["a_star"][0] == pytest.approx(1.0)
    assert s["u"][0] == 0.0 and s["relative_change"][0] == 0.0
    for i, K in enumerate(kernels):
        K = np.asarray(K)
        assert s["cosine"][i] == pytest.approx(stab.frobenius_cosine(K, K0), rel=1e-12)
        assert s["a_star"][i] == pytest.approx(stab.kernel_scale(K, K0), rel=1e-12)
        assert s["residual_norm_ratio"][i] == pytest.approx(
            math.sqrt(max(0.0, 1 - s["cosine"][i] ** 2)), rel=1e-6, abs=1e-7
        )
    np.testing.assert_allclose(s["u"], stab.reparameterized_time(steps, s["a_star"]))
    assert s["epsilon"] == pytest.approx(1 - min(s["cosine"]), abs=1e-15)
    assert s["epsilon"] > 0
    assert s["bound_factor"] == pytest.approx(stab.theorem1_bound_factor(s["epsilon"]))
    assert s["k0_norm"] == pytest.approx(np.linalg.norm(K0))

    # explicit K_0 and error on mismatched shapes / lengths
    s2 = stab.stability_summary(steps, kernels, K_0=2.0 * K0)
    assert s2["a_star"][0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"kernels\[1\] has shape \(2, 2\), K_0 has shape \(6, 6\)"):
        stab.stability_summary([0, 1], [K0, np.eye(2)])
    with pytest.raises(ValueError, match="one entry per kernel"):
        stab.stability_summary([0, 1, 2], [K0, K0])
