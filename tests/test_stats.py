"""``ntk_jax.stats``: rank statistics against hand-computed values and the bootstrap."""
import numpy as np
import pytest

from ntk_jax.stats import bootstrap_interval, kendall, spearman, spearman_with_p


def test_spearman_and_kendall_hand_computed():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [1.0, 3.0, 2.0, 4.0]
    # ranks differ by d = (0, 1, -1, 0): rho = 1 - 6·Σd²/(n(n²-1)) = 1 - 12/60
    assert spearman(a, b) == pytest.approx(0.8)
    # concordant 5, discordant 1 of 6 pairs: tau = 4/6
    assert kendall(a, b) == pytest.approx(4 / 6)
    assert spearman(a, [-x for x in a]) == pytest.approx(-1.0)


def test_undefined_cases_are_none_and_nonfinite_pairs_dropped():
    assert spearman([1, 2], [2, 1]) is None
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None
    assert spearman_with_p([1, 1, 1], [1, 2, 3]) == {"rho": None, "p": None}
    assert spearman([1, 2, np.nan, 3, 4], [1, 2, 100, 3, 4]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal lengths"):
        spearman([1, 2, 3], [1, 2])


def test_bootstrap_interval_brackets_and_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + 0.5 * rng.normal(size=200)
    out = bootstrap_interval(spearman, x, y, n_boot=300, seed=1)
    assert out["low"] < out["value"] < out["high"]
    assert 0.6 < out["value"] < 0.95
    assert out == bootstrap_interval(spearman, x, y, n_boot=300, seed=1)
    # the interval of a mean shrinks like 1/sqrt(n)
    wide = bootstrap_interval(np.mean, x[:20], n_boot=300)
    narrow = bootstrap_interval(np.mean, x, n_boot=300)
    assert narrow["high"] - narrow["low"] < wide["high"] - wide["low"]
