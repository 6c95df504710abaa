"""Tests for ntk_jax.kernels.spectrum (docs/theory.md §4): spectrum, kernel regression, risk bounds."""
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_jax.kernels import spectrum as sp

REL = 1e-9


def _random_psd(rng, n, r, scale=1.0):
    A = scale * rng.standard_normal((n, r))
    return A @ A.T


# ----------------------------------------------------------------------------- bounds: property test


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 20),
    rank_frac=st.floats(0.05, 1.0),
    log_sigma=st.floats(-4.0, 1.0),
    m=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_correct_bounds_contain_risk_and_risk_is_eigen_sum(n, rank_frac, log_sigma, m, seed):
    rng = np.random.default_rng(seed)
    r = max(1, int(round(rank_frac * n)))
    K = _random_psd(rng, n, r)
    y = rng.standard_normal(n if m is None else (n, m))
    sigma = 10.0**log_sigma

    lower, risk, upper = sp.risk_bounds(K, y, sigma)
    assert lower <= risk * (1 + REL) + 1e-300
    assert risk <= upper * (1 + REL)

    # Independent check: eigen-sum formula from numpy's own eigh of the raw matrix.
    lam, U = np.linalg.eigh(K)
    proj = U.T @ y  # (n,) or (n, m)
    proj2 = proj**2 if proj.ndim == 1 else np.sum(proj**2, axis=1)
    risk_eig = np.sum((sigma / (sigma + lam)) ** 2 * proj2) / n
    np.testing.assert_allclose(risk, risk_eig, rtol=1e-7, atol=1e-12 * np.sum(y**2))
    assert sp.empirical_risk(K, y, sigma) == risk

    # The printed upper bound holds on PSD kernels (it is looser than the correct one).
    _, p_upper = sp.paper_printed_bounds(K, y, sigma)
    assert risk <= p_upper * (1 + REL)
    assert upper <= p_upper * (1 + REL)


def test_identity_kernel_closed_form_and_printed_lower_bound_fails():
    rng = np.random.default_rng(1)
    n, lam, sigma = 7, 2.5, 0.5
    K = lam * np.eye(n)
    y = rng.standard_normal(n)
    y2 = float(y @ y)
    expected = (sigma / (sigma + lam)) ** 2 * y2 / n
    lower, risk, upper = sp.risk_bounds(K, y, sigma)
    assert risk == pytest.approx(expected, rel=1e-13)
    assert lower == pytest.approx(expected, rel=1e-13)
    assert upper == pytest.approx(expected, rel=1e-13)
    p_lower, p_upper = sp.paper_printed_bounds(K, y, sigma)
    assert p_lower == pytest.approx(sigma * y2 / (n * (sigma + lam)), rel=1e-13)
    assert p_upper == pytest.approx(p_lower, rel=1e-13)
    # The printed lower bound is violated: σ/(σ+λ) = 1/6 > (1/6)².
    assert p_lower > risk
    assert p_lower / risk == pytest.approx((sigma + lam) / sigma, rel=1e-12)


def test_printed_lower_bound_violated_on_random_psd_kernels():
    rng = np.random.default_rng(2024)
    n_trials, violated = 500, 0
    for _ in range(n_trials):
        n = int(rng.integers(2, 21))
        r = int(rng.integers(1, n + 1))
        K = _random_psd(rng, n, r)
        y = rng.standard_normal(n)
        sigma = float(10.0 ** rng.uniform(-4, 1))
        lower, risk, upper = sp.risk_bounds(K, y, sigma)
        assert lower <= risk * (1 + REL) and risk <= upper * (1 + REL)
        p_lower, _ = sp.paper_printed_bounds(K, y, sigma)
        violated += p_lower > risk
    frac = violated / n_trials
    print(f"printed lower bound violated in {violated}/{n_trials} = {frac:.3f} of random PSD kernels")
    assert frac > 0.05


# ----------------------------------------------------------------------------- regression


def test_kernel_regression_matches_dense_solve_and_test_prediction():
    rng = np.random.default_rng(3)
    n, m, sigma = 12, 2, 0.3
    K = _random_psd(rng, n, 5)
    y = rng.standard_normal((n, m))
    out = sp.kernel_regression(K, y, sigma, K_test=K)
    alpha_ref = np.linalg.solve(K + sigma * np.eye(n), y)
    np.testing.assert_allclose(out["alpha"], alpha_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["train_pred"], K @ alpha_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["train_residual"], y - K @ alpha_ref, rtol=1e-9, atol=1e-12)
    # residual = σ α
    np.testing.assert_allclose(out["train_residual"], sigma * out["alpha"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["test_pred"], out["train_pred"], rtol=1e-12, atol=1e-12)
    assert out["risk"] == pytest.approx(np.sum((y - K @ alpha_ref) ** 2) / n, rel=1e-10)
    assert out["alpha"].shape == (n, m) and out["test_pred"].shape == (n, m)


def test_kernel_regression_test_kernel_shape_and_vector_targets():
    rng = np.random.default_rng(4)
    n, n_test = 6, 4
    X = rng.standard_normal((n + n_test, 3))
    Kall = X @ X.T
    K, K_test = Kall[:n, :n], Kall[n:, :n]
    y = rng.standard_normal(n)
    # jax arrays are float32 by default; the reference uses the same rounded values.
    Kj, yj, Ktj = jnp.asarray(K), jnp.asarray(y), jnp.asarray(K_test)
    out = sp.kernel_regression(Kj, yj, 1e-2, K_test=Ktj)
    assert isinstance(out["alpha"], np.ndarray) and out["alpha"].shape == (n,)
    assert out["alpha"].dtype == np.float64
    assert out["test_pred"].shape == (n_test,)
    K32, y32, Kt32 = (np.asarray(a, dtype=np.float64) for a in (Kj, yj, Ktj))
    K32 = (K32 + K32.T) / 2
    ref = Kt32 @ np.linalg.solve(K32 + 1e-2 * np.eye(n), y32)
    np.testing.assert_allclose(out["test_pred"], ref, rtol=1e-9)


def test_kernel_regression_shape_errors():
    K = np.eye(4)
    with pytest.raises(ValueError, match=r"y leading axis must equal the kernel size n=4.*\(5,\)"):
        sp.kernel_regression(K, np.ones(5), 1.0)
    with pytest.raises(ValueError, match=r"K_test must have shape \(n_test, n\).*\(2, 3\)"):
        sp.kernel_regression(K, np.ones(4), 1.0, K_test=np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"y must have shape \(n,\) or \(n, m\)"):
        sp.kernel_regression(K, np.ones((4, 1, 1)), 1.0)


# ----------------------------------------------------------------------------- spectrum


def test_condition_number_diagonal_closed_form():
    K = np.diag([0.0, 1.0, 4.0, 9.0])
    assert sp.condition_number(K, 1.0) == pytest.approx(10.0, rel=1e-14)
    assert sp.condition_number(K, 1e-4) == pytest.approx((9.0 + 1e-4) / 1e-4, rel=1e-12)
    assert sp.condition_number(np.diag([2.0, 3.0]), 0.5) == pytest.approx(3.5 / 2.5)


def test_eigenvalues_ascending_symmetrised_and_dtype():
    K = np.array([[2.0, 1.0 + 1e-3], [1.0 - 1e-3, 2.0]])  # slightly asymmetric
    lam = sp.eigenvalues(K)
    np.testing.assert_allclose(lam, [1.0, 3.0], rtol=1e-13)
    assert lam.dtype == np.float64
    lam32 = sp.eigenvalues(jnp.asarray(K, dtype=jnp.float32), dtype=np.float32)
    assert lam32.dtype == np.float32
    np.testing.assert_allclose(lam32, [1.0, 3.0], rtol=1e-5)
    lam2, U = sp.eigh(K)
    np.testing.assert_allclose(lam2, lam)
    Ks = sp.symmetrize(K)
    np.testing.assert_allclose(Ks, [[2.0, 1.0], [1.0, 2.0]])
    np.testing.assert_allclose(U @ np.diag(lam2) @ U.T, Ks, atol=1e-13)


def test_effective_rank_and_participation_ratio():
    n = 9
    assert sp.effective_rank(np.eye(n)) == pytest.approx(n, rel=1e-12)
    assert sp.participation_ratio(3.0 * np.eye(n)) == pytest.approx(n, rel=1e-12)
    v = np.random.default_rng(5).standard_normal(n)
    rank1 = np.outer(v, v)
    assert sp.effective_rank(rank1) == pytest.approx(1.0, abs=1e-10)
    assert sp.participation_ratio(rank1) == pytest.approx(1.0, abs=1e-10)
    # two equal eigenvalues -> 2
    assert sp.effective_rank(np.diag([5.0, 5.0, 0.0])) == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(ValueError, match="no positive eigenvalues"):
        sp.effective_rank(np.zeros((3, 3)))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_sigma_must_be_positive(sigma):
    K, y = np.eye(3), np.ones(3)
    msg = rf"sigma must be > 0, got {sigma}"
    with pytest.raises(ValueError, match=msg):
        sp.condition_number(K, sigma)
    with pytest.raises(ValueError, match=msg):
        sp.kernel_regression(K, y, sigma)
    with pytest.raises(ValueError, match=msg):
        sp.risk_bounds(K, y, sigma)
    with pytest.raises(ValueError, match=msg):
        sp.paper_printed_bounds(K, y, sigma)


def test_non_square_and_non_finite_kernel_errors():
    with pytest.raises(ValueError, match=r"kernel must be square \(n, n\), got shape \(3, 4\)"):
        sp.check_kernel(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"must be square \(n, n\), got shape \(3,\)"):
        sp.eigenvalues(np.ones(3))
    K = np.eye(3)
    K[0, 1] = np.nan
    K[2, 2] = np.inf
    K[1, 0] = -np.inf
    with pytest.raises(ValueError, match=r"kernel has 3 non-finite entries \(nan/inf\)"):
        sp.eigenvalues(K)
    with pytest.raises(ValueError, match=r"K_train has 3 non-finite entries"):
        sp.kernel_regression(K, np.ones(3), 1.0)
    with pytest.raises(ValueError, match=r"my_K must be square"):
        sp.check_kernel(np.ones((2, 3)), name="my_K")


def test_not_psd_within_sigma_error():
    K = np.diag([-1.0, 2.0])
    with pytest.raises(ValueError, match="not PSD to within sigma"):
        sp.condition_number(K, 0.5)
    with pytest.raises(ValueError, match="not PSD to within sigma"):
        sp.risk_bounds(K, np.ones(2), 0.5)
    # Slightly negative but within sigma is accepted, and the bound still holds.
    K = np.diag([-1e-3, 2.0])
    lower, risk, upper = sp.risk_bounds(K, np.array([1.0, 0.0]), 0.1)
    assert lower <= risk <= upper * (1 + REL)
    assert upper > 1.0 / 2  # (σ/(σ+λmin))² > 1 since λmin < 0; ‖y‖²/n = 1/2
