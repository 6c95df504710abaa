"""The validation experiments' numbers recomputed independently from the kernels each job saved
(``kernels.npz`` next to ``report.json``), in plain numpy / scipy — never through
``ntk_jax.kernels.stability`` or ``ntk_jax.kernels.spectrum``. Used by tests/test_experiments.py,
tests/test_launcher_hf.py and tests/test_validate_pretrained.py on their jobs' outputs."""
import os

import numpy as np
import pytest
import scipy.linalg
import scipy.stats


def check_stability(out_dir: str, r: dict) -> np.ndarray:
    """docs/theory.md §3.1–§3.3 from the saved Θ_t: S(t), a*(t), u(t) (trapezoid rule), the
    relative change, ‖R‖/‖Θ_t‖ with R = Θ_t − a*Θ_0, ε, the Theorem-1 factor and ‖Θ_0‖. Returns
    the kernels ``(T, n, n)``."""
    saved = np.load(os.path.join(out_dir, r["kernels_file"]))
    K = saved["kernels"].astype(np.float64)
    steps = [int(s) for s in saved["steps"]]
    assert steps == r["steps"] and K.shape[0] == len(steps)
    cos = [np.sum(k * K[0]) / (np.linalg.norm(k) * np.linalg.norm(K[0])) for k in K]
    a = [np.sum(k * K[0]) / np.sum(K[0] ** 2) for k in K]
    np.testing.assert_allclose(r["cosine"], cos, rtol=1e-9)
    np.testing.assert_allclose(r["a_star"], a, rtol=1e-9)
    u = [sum((steps[i + 1] - steps[i]) * (a[i] + a[i + 1]) / 2 for i in range(j)) for j in range(len(a))]
    np.testing.assert_allclose(r["u"], u, rtol=1e-9)
    np.testing.assert_allclose(r["relative_change"], [np.linalg.norm(k - K[0]) / np.linalg.norm(K[0]) for k in K],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r["residual_norm_ratio"],
                               [np.linalg.norm(k - ak * K[0]) / np.linalg.norm(k) for k, ak in zip(K, a)],
                               rtol=1e-6, atol=1e-7)
    eps = max(0.0, 1 - min(cos))
    assert r["epsilon"] == pytest.approx(eps, abs=1e-12)
    assert r["bound_factor"] == pytest.approx(np.sqrt(2 * eps) / (1 - eps), rel=1e-9, abs=1e-12)
    assert r["k0_norm"] == pytest.approx(np.linalg.norm(K[0]), rel=1e-9)
    return K


def check_spectrum(out_dir: str, r: dict) -> dict:
    """docs/theory.md §4.1–§4.4 from the saved K and targets: the spectrum by ``scipy.linalg.eigh``,
    κ(K + σI), the risk R = (1/n)‖y − K(K + σI)⁻¹y‖² by a direct solve, the correct bounds
    (σ/(σ+λ_max,min))²‖y‖²/n and the printed lower one, and R within the correct bounds — for the
    ±1 targets and, when saved, the regression targets. Returns the saved arrays."""
    saved = dict(np.load(os.path.join(out_dir, r["kernels_file"])))
    sigma = float(saved["sigma"])
    assert sigma == r["setup"]["sigma"] and saved["kernels"].shape[0] == len(r["placements"])
    assert set(np.unique(saved["y"])) <= {-1.0, 1.0}  # ±1 labels
    targets = {"": saved["y"]}
    if "y_regression" in saved:
        targets["regression_"] = saved["y_regression"]
    assert ("regression_risk" in r["placements"][0]) == ("y_regression" in saved)
    for K, row in zip(saved["kernels"].astype(np.float64), r["placements"]):
        K = (K + K.T) / 2
        n = K.shape[0]
        lam = scipy.linalg.eigh(K, eigvals_only=True)
        np.testing.assert_allclose(row["eigenvalues"], lam, rtol=1e-7, atol=1e-9 * lam[-1])
        assert row["kappa"] == pytest.approx((lam[-1] + sigma) / (lam[0] + sigma), rel=1e-6)
        for prefix, y in targets.items():
            y = y.astype(np.float64)
            risk = np.sum((y - K @ np.linalg.solve(K + sigma * np.eye(n), y)) ** 2) / n
            lower = (sigma / (sigma + lam[-1])) ** 2 * (y @ y) / n
            upper = (sigma / (sigma + lam[0])) ** 2 * (y @ y) / n
            assert row[f"{prefix}risk"] == pytest.approx(risk, rel=1e-6), prefix
            assert row[f"{prefix}correct_lower"] == pytest.approx(lower, rel=1e-6), prefix
            assert row[f"{prefix}correct_upper"] == pytest.approx(upper, rel=1e-6), prefix
            assert row[f"{prefix}printed_lower"] == pytest.approx(sigma * (y @ y) / (n * (sigma + lam[-1])), rel=1e-6)
            assert lower <= risk * (1 + 1e-9) and risk <= upper * (1 + 1e-9), (prefix, lower, risk, upper)
    return saved


def check_approximation(out_dir: str, r: dict) -> dict:
    """docs/theory.md §2.2 / §5.3 from the saved tr Θ, Θ̃ and per-example output Grams Θ(x_i, x_i):
    the Pearson and Spearman correlations of Θ̃ with tr Θ over pairs i ≤ j and i < j, the
    cross-term size ‖Θ̃ − tr Θ‖/‖Θ̃‖, the mean |cos(∇f_a, ∇f_b)|, a ≠ b; and the Grams' traces
    and sums against the diagonals of tr Θ and of Θ̃ (computed separately by jacobian_free_ntk).
    Returns the saved arrays."""
    saved = dict(np.load(os.path.join(out_dir, r["kernels_file"])))
    tr, jf, gram = (saved[k].astype(np.float64) for k in ("trace_ntk", "jacobian_free", "output_gram"))
    n = tr.shape[0]
    assert tr.shape == jf.shape == (n, n) and gram.shape[0] == n and n == r["setup"]["n_examples"]
    np.testing.assert_allclose(np.diag(tr), np.trace(gram, axis1=1, axis2=2), rtol=1e-5)
    np.testing.assert_allclose(np.diag(jf), gram.sum(axis=(1, 2)), rtol=1e-3, atol=1e-5 * np.abs(jf).max())
    iu, off = np.triu_indices(n), np.triu_indices(n, k=1)
    # (the report's correlations are of the float32 kernels: agreement to ~1e-7)
    assert r["pearson"] == pytest.approx(np.corrcoef(jf[iu], tr[iu])[0, 1], abs=1e-6)
    assert r["pearson_offdiag"] == pytest.approx(np.corrcoef(jf[off], tr[off])[0, 1], abs=1e-6)
    assert r["spearman"] == pytest.approx(scipy.stats.spearmanr(jf[iu], tr[iu]).statistic, abs=1e-6)
    assert r["cross_term_rel_size"] == pytest.approx(np.linalg.norm(jf - tr) / np.linalg.norm(jf), rel=1e-6)
    d = np.sqrt(np.einsum("iaa->ia", gram))
    cos = gram / (d[:, :, None] * d[:, None, :])
    O = gram.shape[1]
    assert r["mean_abs_output_grad_cosine"] == pytest.approx(np.abs(cos[:, ~np.eye(O, dtype=bool)]).mean(), rel=1e-6)
    np.testing.assert_allclose(r["pairs"]["trace_ntk"], tr[iu], rtol=1e-12)
    np.testing.assert_allclose(r["pairs"]["jacobian_free"], jf[iu], rtol=1e-12)
    return saved
