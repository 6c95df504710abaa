"""The placement predictors (ntk_jax/kernels/placement.py, docs/theory.md §6.8) against closed forms
and oracles: explicit gradient descent on linear models (whose linearisation is exact)."""
import numpy as np
import pytest
import scipy.special

from ntk_jax.kernels.placement import (PREDICTORS, kernel_target_alignment, learning_rates, linearised_cross_entropy,
                                       linearised_mse, placement_predictors)
from ntk_jax.kernels.spectrum import condition_number, effective_rank, empirical_risk


def _linear_problem(seed, n=7, n_test=5, d=4, m=None):
    """A linear model f(x) = x·θ: its NTK is X Xᵀ and gradient descent on it is the linearised
    dynamics exactly. d < n: K is singular (the λ → 0 limit of g is exercised)."""
    rng = np.random.default_rng(seed)
    X, Xt = rng.normal(size=(n, d)), rng.normal(size=(n_test, d))
    shape = (n,) if m is None else (n, m)
    y, yt = rng.normal(size=shape), rng.normal(size=(n_test,) + shape[1:])
    theta0 = rng.normal(size=(d,) if m is None else (d, m))
    return X, Xt, y, yt, theta0


def _gd_mse(X, y, theta, lrs):
    """Full-batch GD on (1/n) Σ ½‖xθ − y‖²."""
    n = X.shape[0]
    for eta in lrs:
        theta = theta - eta * X.T @ (X @ theta - y) / n
    return theta


@pytest.mark.parametrize("m", [None, 3])
def test_mse_closed_form_equals_gradient_descent_on_a_linear_model(m):
    X, Xt, y, yt, theta0 = _linear_problem(0, m=m)
    lrs = np.linspace(0.05, 0.3, 40)  # a schedule, not a constant rate
    thetaT = _gd_mse(X, y, theta0, lrs)
    out = linearised_mse(X @ X.T, y, lrs, f0=X @ theta0, K_test=Xt @ X.T, y_test=yt, f0_test=Xt @ theta0)
    np.testing.assert_allclose(out["train_pred"], X @ thetaT, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out["test_pred"], Xt @ thetaT, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out["train_loss"], 0.5 * np.sum((X @ thetaT - y) ** 2) / len(y), rtol=1e-9)
    np.testing.assert_allclose(out["test_loss"], 0.5 * np.sum((Xt @ thetaT - yt) ** 2) / len(yt), rtol=1e-9)
    assert out["stable"]


def test_mse_diagonal_kernel_decays_each_residual_geometrically():
    lam = np.array([0.0, 0.5, 2.0, 8.0])
    y = np.array([1.0, -2.0, 0.5, 3.0])
    n, eta, T = 4, 0.3, 25
    out = linearised_mse(np.diag(lam), y, eta, T)
    np.testing.assert_allclose(out["train_pred"] - y, -y * (1 - eta * lam / n) ** T, rtol=1e-12, atol=1e-14)
    # the test point equal to training point 2 (K_test = row 2 of K) follows it exactly;
    # the λ = 0 direction never moves
    out = linearised_mse(np.diag(lam), y, eta, T, K_test=np.diag(lam)[[2, 0]])
    np.testing.assert_allclose(out["test_pred"], [y[2] * (1 - (1 - eta * lam[2] / n) ** T), 0.0], atol=1e-12)


def test_mse_flags_an_unstable_rate():
    assert not linearised_mse(np.diag([10.0, 1.0]), np.ones(2), 0.5, 3)["stable"]  # η λ/n = 2.5
    assert linearised_mse(np.diag([10.0, 1.0]), np.ones(2), 0.3, 3)["stable"]


def test_cross_entropy_equals_gradient_descent_on_a_linear_softmax_model():
    """f(x) = x W (W: d×C): each logit's kernel is X Xᵀ and the cross-output terms vanish, so the
    linearised cross-entropy dynamics are exact."""
    rng = np.random.default_rng(1)
    n, n_test, d, C = 9, 6, 5, 3
    X, Xt = rng.normal(size=(n, d)), rng.normal(size=(n_test, d))
    labels, labels_t = rng.integers(0, C, n), rng.integers(0, C, n_test)
    W = 0.3 * rng.normal(size=(d, C))
    lrs = np.full(30, 0.4)
    out = linearised_cross_entropy(X @ X.T, labels, lrs, num_classes=C, f0=X @ W, K_test=Xt @ X.T,
                                   labels_test=labels_t, f0_test=Xt @ W)
    onehot = np.eye(C)[labels]
    for eta in lrs:
        W = W - eta * X.T @ (scipy.special.softmax(X @ W, axis=1) - onehot) / n
    np.testing.assert_allclose(out["train_logits"], X @ W, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out["test_logits"], Xt @ W, rtol=1e-9, atol=1e-10)
    logp = scipy.special.log_softmax(Xt @ W, axis=1)
    np.testing.assert_allclose(out["test_loss"], -logp[np.arange(n_test), labels_t].mean(), rtol=1e-9)
    assert out["test_accuracy"] == np.mean((Xt @ W).argmax(1) == labels_t)


def test_cross_entropy_from_zero_logits_starts_at_log_c():
    out = linearised_cross_entropy(np.eye(4), np.array([0, 1, 0, 1]), 0.0, 3, num_classes=2)
    np.testing.assert_allclose(out["train_loss"], np.log(2), rtol=1e-12)


def test_alignment_closed_forms():
    rng = np.random.default_rng(2)
    y = rng.normal(size=6)
    assert kernel_target_alignment(np.outer(y, y) * 3.0, y) == pytest.approx(1.0)
    assert kernel_target_alignment(np.eye(6), y) == pytest.approx(1 / np.sqrt(6))
    Y = rng.normal(size=(6, 2))
    A = rng.normal(size=(6, 6))
    K = A @ A.T
    assert kernel_target_alignment(K, Y) == pytest.approx(np.trace(Y.T @ K @ Y) / (np.linalg.norm(K) * np.sum(Y**2)))
    with pytest.raises(ValueError, match="undefined"):
        kernel_target_alignment(K, np.zeros(6))


def test_placement_predictors_assemble_the_parts():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(10, 4))
    K_all = A @ A.T
    y = np.where(rng.normal(size=10) > 0, 1.0, -1.0)
    lrs = learning_rates(0.1, 20)
    p = placement_predictors(K_all, y, 6, sigma=1e-3, lr=lrs, output_dim=2)
    K = K_all[:6, :6]
    assert set(PREDICTORS) <= set(p)
    assert p["kappa"] == pytest.approx(condition_number(K, 1e-3))
    assert p["lambda_max"] == pytest.approx(np.linalg.eigvalsh(K)[-1])
    assert p["trace"] == pytest.approx(np.trace(K))
    assert p["effective_rank"] == pytest.approx(effective_rank(K))
    assert p["risk"] == pytest.approx(empirical_risk(K, y[:6], 1e-3))
    mse = linearised_mse(K / 2, y[:6], lrs, K_test=K_all[6:, :6] / 2, y_test=y[6:])
    assert p["lin_eval_loss_mse"] == pytest.approx(mse["test_loss"])
    assert p["lin_train_loss_mse"] == pytest.approx(mse["train_loss"])
    ce = linearised_cross_entropy(K / 2, (y[:6] < 0).astype(int), lrs, num_classes=2, K_test=K_all[6:, :6] / 2,
                                  labels_test=(y[6:] < 0).astype(int))
    assert p["lin_eval_loss_ce"] == pytest.approx(ce["test_loss"])
    # a larger kernel learns more in the same budget: every linearised loss falls
    q = placement_predictors(4 * K_all, y, 6, sigma=1e-3, lr=lrs, output_dim=2)
    assert q["lin_train_loss_mse"] < p["lin_train_loss_mse"] and q["lin_train_loss_ce"] < p["lin_train_loss_ce"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="n_train"):
        placement_predictors(np.eye(4), np.ones(4), 4, sigma=1e-3, lr=0.1, steps=2)
    with pytest.raises(ValueError, match="K_test"):
        linearised_mse(np.eye(3), np.ones(3), 0.1, 2, K_test=np.ones((2, 4)))
    with pytest.raises(ValueError, match="labels"):
        linearised_cross_entropy(np.eye(3), np.array([0, 1, 2]), 0.1, 2, num_classes=2)
    with pytest.raises(ValueError, match="learning rates"):
        learning_rates([])


def test_leaf_kernels_sum_to_the_exact_traced_ntk_and_probes_estimate_it():
    import jax
    import jax.numpy as jnp

    from ntk_jax.kernels.ntk import empirical_ntk
    from ntk_jax.kernels.placement import leaf_kernels

    rng = np.random.default_rng(4)
    params = {"w1": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)

    def f(p, xx):
        return jnp.tanh(xx @ p["w1"]) @ p["w2"]  # (n, O = 4)

    exact = np.asarray(empirical_ntk(f, params, x), np.float64)
    leaves = leaf_kernels(f, params, x, 4)
    np.testing.assert_allclose(np.asarray(leaves["w1"] + leaves["w2"]), exact, rtol=1e-5, atol=1e-5)
    # the w2 leaf alone: Σ_a ∂f_a/∂w2 · ∂f_a/∂w2 = h hᵀ (one copy per output column)
    h = np.tanh(np.asarray(x, np.float64) @ np.asarray(params["w1"], np.float64))
    np.testing.assert_allclose(np.asarray(leaves["w2"]), 4 * h @ h.T, rtol=1e-5, atol=1e-5)
    # probes = the identity basis: the exact kernel; many random ±1 probes: close to it
    eye = leaf_kernels(f, params, x, 4, probes=np.eye(4, dtype=np.float32) * 2.0)
    np.testing.assert_allclose(np.asarray(eye["w2"]), np.asarray(leaves["w2"]), rtol=1e-5, atol=1e-5)
    r = np.random.default_rng(5).choice([-1.0, 1.0], size=(4000, 4)).astype(np.float32)
    est = jax.jit(lambda p, xx, rr: leaf_kernels(f, p, xx, 4, basis_batch=500, probes=rr))(params, x, r)
    total = np.asarray(est["w1"] + est["w2"])
    assert np.linalg.norm(total - exact) / np.linalg.norm(exact) < 0.05
    assert not np.allclose(total, exact, rtol=1e-6)  # an estimate, not the exact kernel
