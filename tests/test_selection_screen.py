"""benchmarks/selection_screen.py: the arms derived from saved scores (the staged pipeline's
combinations, as docs/selection.md reports them) against the same combinations computed by hand
on random scores."""
import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("selection_screen", os.path.join(ROOT, "benchmarks",
                                                                                "selection_screen.py"))
screen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screen)

N = 4


@pytest.fixture()
def cell(tmp_path):
    """A cell directory with every arm's ``all_scores.npz`` (ids in a shuffled order, as a
    filtered arm stores only its kept records) over a pool of 40 records."""
    rng = np.random.default_rng(0)
    pool = [{"id": f"r{i}", "role": "useful" if i % 4 == 0 else "unrelated"} for i in range(40)]
    ids = np.array([r["id"] for r in pool])
    scores = {}
    for arm in ("knnw", "knnw_resp", "lc", "grad_base", "grad_warm"):
        s = rng.normal(size=len(pool))
        scores[arm] = s
        order = rng.permutation(len(pool))
        os.makedirs(tmp_path / arm)
        np.savez(tmp_path / arm / "all_scores.npz", ids=ids[order], scores=s[order])
    return str(tmp_path), pool, scores


def _top(s, k):
    return np.argsort(-s, kind="stable")[:k]


def test_derived_arms_match_hand_computation(cell):
    cell_dir, pool, s = cell
    ids = [r["id"] for r in pool]
    useful = np.array([r["role"] == "useful" for r in pool])
    # the mean of the two gradient points
    np.testing.assert_allclose(screen.derived_scores(cell_dir, ids, "gradient", N), (s["grad_base"] + s["grad_warm"]) / 2)
    # kNN keeps k·N, Δ ranks them (the recommended pipeline), for either pooling's filter
    for knn in ("knnw", "knnw_resp"):
        kept = _top(s[knn], 2 * N)
        want = useful[kept[_top(s["lc"][kept], N)]].mean()
        got = screen.precision(screen.derived_scores(cell_dir, ids, f"{knn}>lc@2:filter", N), pool, N)
        assert got == want
    # Δ keeps k·N, the gradient score ranks them (":filter") or the mean rank of the two does
    kept = np.sort(_top(s["lc"], 4 * N))
    g = (s["grad_base"] + s["grad_warm"]) / 2
    assert screen.precision(screen.derived_scores(cell_dir, ids, "lc>gradient@4:filter", N), pool, N) == \
        useful[kept[_top(g[kept], N)]].mean()
    rank = lambda x: np.argsort(np.argsort(-x, kind="stable"), kind="stable")  # noqa: E731
    mean_rank = -(rank(s["lc"][kept]) + rank(g[kept])) / 2
    assert screen.precision(screen.derived_scores(cell_dir, ids, "lc>gradient@4", N), pool, N) == \
        useful[kept[_top(mean_rank, N)]].mean()


def test_precision_breaks_ties_by_pool_order():
    pool = [{"role": "unrelated"}, {"role": "useful"}, {"role": "useful"}]
    assert screen.precision(np.array([1.0, 1.0, 0.0]), pool, 1) == 0.0  # the tie goes to the first record
    assert screen.precision(np.array([0.0, 1.0, 1.0]), pool, 2) == 1.0
