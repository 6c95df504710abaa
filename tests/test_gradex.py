"""GradEx (docs/theory.md §6.4): the logistic fit, the projection round trip, the first-order
linearisation, the per-example output f, the ensemble scores, greedy selection, the ridge
surrogate, and the job end to end through the launcher."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special
from flax import nnx

from ntk_jax.data.synthetic import generate_task
from ntk_jax.kernels.features import gradient_features
from ntk_jax.kernels.projection import RandomProjection
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.launcher.context import Context, load_tokenizer
from ntk_jax.launcher.run import run
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.models.subset import param_subset
from ntk_jax.selection import gradex as gx
from ntk_jax.utils import read_json


def _problem(seed=0, n=60, d=7):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n, d))
    b = rng.normal(size=n)
    return G, b


# ----------------------------------------------------------------------------- logistic fit
def test_logistic_gradient_matches_finite_differences():
    G, b = _problem()
    C = 0.7
    w = np.random.default_rng(1).normal(size=G.shape[1])
    _, grad = gx.logistic_objective(w, G, b, C)
    h = 1e-6
    fd = np.array([(gx.logistic_objective(w + h * e, G, b, C)[0] - gx.logistic_objective(w - h * e, G, b, C)[0])
                   / (2 * h) for e in np.eye(G.shape[1])])
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)


def test_logistic_value_matches_definition():
    G, b = _problem(2, n=5, d=3)
    w = np.array([0.3, -0.2, 0.5])
    C = 2.0
    direct = sum(np.log(1 + np.exp(-(b[i] + G[i] @ w))) for i in range(5)) + w @ w / (2 * C)
    assert gx.logistic_objective(w, G, b, C)[0] == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("C", [0.05, 1.0, 50.0])
def test_fit_logistic_matches_scipy_minimize(C):
    G, b = _problem(3)
    w = gx.fit_logistic(G, b, C)
    ref = scipy.optimize.minimize(lambda v: gx.logistic_objective(v, G, b, C), np.zeros(G.shape[1]), jac=True,
                                  method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000})
    np.testing.assert_allclose(w, ref.x, rtol=1e-5, atol=1e-6)
    assert gx.logistic_objective(w, G, b, C)[0] <= ref.fun + 1e-9
    assert np.linalg.norm(gx.logistic_objective(w, G, b, C)[1]) < 1e-7


def test_fit_logistic_rejects_bad_input():
    G, b = _problem()
    with pytest.raises(ValueError, match="C must be positive"):
        gx.fit_logistic(G, b, 0.0)
    with pytest.raises(ValueError, match="at least one example"):
        gx.fit_logistic(G[:0], b[:0], 1.0)
    with pytest.raises(ValueError, match="shape|must be"):
        gx.fit_logistic(G, b[:-1], 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        gx.fit_logistic(G, np.where(np.arange(len(b)) == 0, np.nan, b), 1.0)


# ----------------------------------------------------------------------------- the model side
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """A LoRA'd tiny model (B ≠ 0, so both factors have non-zero gradients), its subset, a
    small batch of two tasks, the jitted f and the batch's logits (float64)."""
    ctx = Context(tiny_model_dir, load_tokenizer(tiny_model_dir), 32, 0, {})
    model = ctx.load_model(LoRAConfig(rank=4, targets=("q_proj", "v_proj"), b_init_std=0.05))
    subset = param_subset(model, nnx.LoRAParam)
    records = generate_task("add", 5, seed=3) + generate_task("copy", 5, seed=3)
    batch = ctx.encode(records)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    f = jax.jit(gx.gradex_output_fn(subset, clip_eps=EPS))
    logits = jax.jit(lambda p: subset.merge(p)(jbatch["input_ids"], attention_mask=jbatch["attention_mask"]))
    # Unprojected per-example gradients ∇f (n, P), the reference every projection test uses.
    G_full = gradient_features(gx.gradex_output_fn(subset, clip_eps=EPS), subset.params, jbatch)
    return {"subset": subset, "batch": batch, "jbatch": jbatch, "f": f,
            "logits": np.asarray(logits(subset.params), np.float64), "G_full": np.asarray(G_full, np.float64)}


EPS = 1e-4


def _numpy_token_log_q(logits, batch):
    logp = scipy.special.log_softmax(logits, axis=-1)
    return np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), axis=-1)[..., 0]


def test_f_matches_numpy_from_logits(tiny):
    subset, batch = tiny["subset"], tiny["batch"]
    got = np.asarray(tiny["f"](subset.params, tiny["jbatch"]))
    p = scipy.special.softmax(tiny["logits"], axis=-1)
    want = []
    for i in range(len(p)):
        vals = []
        for t in np.flatnonzero(batch["loss_mask"][i]):
            q = np.clip(p[i, t, batch["targets"][i, t]], EPS, 1 - EPS)
            vals.append(np.log(q / (1 - q)))
        want.append(np.mean(vals))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_mean_token_logit_clips_and_masks():
    V = 5
    logits = np.zeros((2, 3, V), np.float32)
    logits[0, 0, 1] = 60.0          # q ≈ 1 → clipped to 1 - eps
    logits[0, 1, 2] = -60.0         # target 2 has q ≈ 0 → clipped to eps
    targets = np.array([[1, 2, 3], [0, 0, 0]])
    mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)  # position 2 of row 0 ignored
    eps = 1e-3
    got = np.asarray(gx.mean_token_logit(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), eps))
    clip = np.log((1 - eps) / eps)
    uniform = np.log(0.2 / 0.8)
    np.testing.assert_allclose(got, [(clip - clip) / 2, uniform], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="clip_eps"):
        gx.mean_token_logit(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), 0.0)


def test_projection_round_trip(tiny):
    """⟨g̃, w⟩ = ⟨∇f, Π w⟩ with g̃ = Πᵀ∇f from RandomProjection and Δ = project_back(w)."""
    subset, batch = tiny["subset"], tiny["batch"]
    f = gx.gradex_output_fn(subset, clip_eps=EPS)
    proj = RandomProjection(24, seed=5, chunk_rows=300)  # several chunks per leaf
    G_full = tiny["G_full"]
    G_proj = G_full @ proj.matrix(subset.params).astype(np.float64)   # Πᵀ∇f from the explicit Π
    np.testing.assert_allclose(gx.projected_gradients(f, subset.params, batch, proj), G_proj,
                               rtol=1e-4, atol=1e-4 * np.abs(G_proj).max())
    w = np.random.default_rng(0).normal(size=proj.dim)
    delta = gx.project_back(proj, subset.params, w)
    flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(delta)])
    # Δ is exactly the explicit (P, d) matrix times w ...
    np.testing.assert_allclose(flat, proj.matrix(subset.params) @ w, rtol=1e-5, atol=1e-6)
    # ... so ⟨g̃, w⟩ = ⟨∇f, Δ⟩ for every example.
    np.testing.assert_allclose(G_proj @ w, G_full @ flat, rtol=1e-6, atol=1e-6 * np.abs(G_full @ flat).max())
    with pytest.raises(ValueError, match="projection dim"):
        gx.project_back(proj, subset.params, w[:-1])


def test_factored_projection_round_trip(tiny):
    """gradex.projection_type="factored": Δ = project_back(parameter_projection(...), w) is
    the transpose of the factored features, ⟨g̃, w⟩ = ⟨∇f, Δ⟩ for every example."""
    from ntk_jax.kernels.factored_projection import FactoredProjection
    subset, batch, G_full = tiny["subset"], tiny["batch"], tiny["G_full"]
    f = gx.gradex_output_fn(subset, clip_eps=EPS)
    proj = FactoredProjection(32, seed=5)
    G_proj = gx.projected_gradients(f, subset.params, batch, proj)
    w = np.random.default_rng(0).normal(size=proj.dim)
    delta = gx.project_back(gx.parameter_projection(proj, f, subset.params, batch), subset.params, w)
    flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(delta)])
    np.testing.assert_allclose(G_proj @ w, G_full @ flat, rtol=1e-4, atol=1e-4 * np.abs(G_full @ flat).max())


def test_linearisation_is_first_order(tiny):
    """f(θ + sΔ) − [f(θ) + s⟨g̃, w⟩] is o(s): the relative error shrinks like O(s)."""
    subset, f, jbatch = tiny["subset"], tiny["f"], tiny["jbatch"]
    proj = RandomProjection(16, seed=1)
    G = tiny["G_full"] @ proj.matrix(subset.params).astype(np.float64)   # g̃ = Πᵀ∇f
    f0 = np.asarray(f(subset.params, jbatch), np.float64)
    w = np.random.default_rng(2).normal(size=proj.dim)
    w *= 1.0 / np.abs(G @ w).max()       # first-order change of max size 1 at s = 1
    delta = gx.project_back(proj, subset.params, w)
    lin = G @ w
    errs = []
    for s in (0.04, 0.004):
        fs = np.asarray(f(gx.add_delta(subset.params, delta, s), jbatch), np.float64)
        errs.append(np.linalg.norm(fs - f0 - s * lin) / np.linalg.norm(s * lin))
    assert errs[1] < 0.2 * errs[0], errs     # ∝ s: a ten-fold smaller step, ~ten-fold smaller error
    assert errs[1] < 0.03, errs


def test_target_losses_and_outputs_match_numpy(tiny):
    subset, batch = tiny["subset"], tiny["batch"]
    losses = gx.TargetLosses(subset, batch, clip_eps=EPS, batch_size=4)(subset.params)
    lq = _numpy_token_log_q(tiny["logits"], batch)
    m = batch["loss_mask"]
    ce = ((-lq * m).sum(1) / m.sum(1)).mean()
    q = np.clip(np.exp(lq), EPS, 1 - EPS)
    fx = (np.log(q / (1 - q)) * m).sum(1) / m.sum(1)
    assert losses["ce"] == pytest.approx(ce, rel=1e-4)
    assert losses["logistic"] == pytest.approx(np.mean(np.log1p(np.exp(-fx))), rel=1e-4)
    f = gx.gradex_output_fn(subset, clip_eps=EPS)
    np.testing.assert_allclose(gx.output_values(f, subset.params, batch, batch_size=4), fx, rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------- estimator and selection
def _estimator(seed=0, n_tasks=4, per_task=15, d=5, C=1.0):
    rng = np.random.default_rng(seed)
    N = n_tasks * per_task
    return gx.SubsetEstimator(task_names=[f"t{k}" for k in range(n_tasks)], G=rng.normal(size=(N, d)),
                              f=rng.normal(size=N), task_index=np.repeat(np.arange(n_tasks), per_task),
                              G_target=rng.normal(size=(9, d)), f_target=rng.normal(size=9), C=C)


def test_subset_estimator_fits_only_the_subsets_rows():
    est = _estimator()
    loss, w = est.estimate(["t1", "t3"])
    rows = np.isin(est.task_index, [1, 3])
    w_ref = gx.fit_logistic(est.G[rows], est.f[rows], est.C)
    np.testing.assert_allclose(w, w_ref)
    z = est.f_target + est.G_target @ w_ref
    assert loss == pytest.approx(np.mean(np.log(1 + np.exp(-z))))
    assert est.baseline() == pytest.approx(np.mean(np.log(1 + np.exp(-est.f_target))))
    with pytest.raises(ValueError, match="unknown tasks"):
        est.estimate(["t9"])
    with pytest.raises(ValueError, match="empty subset"):
        est.estimate([])


def test_subset_estimator_always_rows_join_every_fit():
    """G_always/f_always (e.g. the target's own training examples) are added to every fit."""
    base = _estimator(1)
    rng = np.random.default_rng(7)
    Ga, fa = rng.normal(size=(6, base.G.shape[1])), rng.normal(size=6)
    est = gx.SubsetEstimator(**{**base.__dict__, "G_always": Ga, "f_always": fa})
    rows = np.isin(est.task_index, [2])
    w_ref = gx.fit_logistic(np.concatenate([est.G[rows], Ga]), np.concatenate([est.f[rows], fa]), est.C)
    np.testing.assert_allclose(est.fit(["t2"]), w_ref)
    np.testing.assert_allclose(est.fit([]), gx.fit_logistic(Ga, fa, est.C))   # "always" alone is allowed
    with pytest.raises(ValueError, match="both"):
        gx.SubsetEstimator(**{**base.__dict__, "G_always": Ga})


def test_sample_subsets_deterministic_nonempty():
    a = gx.sample_subsets(5, 400, prob=0.5, seed=3)
    assert a.shape == (400, 5) and a.dtype == bool
    assert a.any(axis=1).all()
    np.testing.assert_array_equal(a, gx.sample_subsets(5, 400, prob=0.5, seed=3))
    assert abs(a.mean() - 0.5) < 0.06
    with pytest.raises(ValueError):
        gx.sample_subsets(5, 10, prob=0.0)


def test_ensemble_task_scores_brute_force():
    rng = np.random.default_rng(4)
    masks = rng.random((30, 6)) < 0.5
    masks[:, 5] = False                      # a task never sampled scores NaN
    perf = rng.normal(size=30)
    scores = gx.ensemble_task_scores(masks, perf)
    for k in range(5):
        vals = [perf[i] for i in range(30) if masks[i, k]]
        assert scores[k] == pytest.approx(sum(vals) / len(vals))
    assert np.isnan(scores[5])
    top = gx.select_top(scores, 0.5)
    assert list(top) == list(np.argsort(-scores[:5])[:3])


def test_greedy_forward_selection_on_additive_loss():
    """With loss(S) = c + Σ_{k∈S} a_k, greedy adds exactly the negative a_k, most negative first."""
    a = np.array([0.3, -0.5, 0.1, -0.2, -0.9, 0.0])
    out = gx.greedy_forward_selection(lambda m: 1.0 + a @ m, len(a))
    assert out["order"] == [4, 1, 3]
    np.testing.assert_allclose(out["losses"], [0.1, -0.4, -0.6])
    np.testing.assert_array_equal(out["selected"], a < 0)


def test_ridge_surrogate_matches_augmented_least_squares():
    rng = np.random.default_rng(5)
    X = (rng.random((40, 6)) < 0.5).astype(float)
    y = X @ rng.normal(size=6) + 0.3 + 0.05 * rng.normal(size=40)
    lam = 2.5
    sur = gx.fit_ridge_surrogate(X.astype(bool), y, lam)
    # Independent oracle: [1 X; 0 √λ I] [c; β] ≈ [y; 0] (intercept unpenalised).
    A = np.block([[np.ones((40, 1)), X], [np.zeros((6, 1)), np.sqrt(lam) * np.eye(6)]])
    sol = np.linalg.lstsq(A, np.concatenate([y, np.zeros(6)]), rcond=None)[0]
    np.testing.assert_allclose(sur.coef, sol[1:], rtol=1e-9, atol=1e-10)
    assert sur.intercept == pytest.approx(sol[0], rel=1e-9)
    np.testing.assert_allclose(sur.predict(X), A[:40] @ sol, atol=1e-9)


def test_relative_squared_error():
    assert gx.relative_squared_error([1.1, 1.9], [1.0, 2.0]) == pytest.approx(0.02 / 5)
    with pytest.raises(ValueError):
        gx.relative_squared_error([0.0], [0.0])


# ----------------------------------------------------------------------------- honest metrics (hand-computed)
def test_change_error_hand_computed():
    # true moves from base 2.0 to [1.0, 1.5, 3.0]: Σ(true−base)² = 1 + 0.25 + 1 = 2.25;
    # est [1.5, 1.5, 2.0]: Σ(est−true)² = 0.25 + 0 + 1 = 1.25 → 1.25 / 2.25.
    assert gx.change_error([1.5, 1.5, 2.0], [1.0, 1.5, 3.0], 2.0) == pytest.approx(1.25 / 2.25)
    assert gx.change_error([2.0, 2.0, 2.0], [1.0, 1.5, 3.0], 2.0) == pytest.approx(1.0)   # no change predicted
    # per-row bases (two seeds): base [1, 1, 3]; Σ(true−base)² = 0 + 0.25 + 0 = 0.25.
    assert gx.change_error([1.5, 1.5, 2.0], [1.0, 1.5, 3.0], [1.0, 1.0, 3.0]) == pytest.approx(1.25 / 0.25)
    assert gx.change_error([1.0], [2.0], 2.0) is None
    with pytest.raises(ValueError, match="equal"):
        gx.change_error([1.0, 2.0], [1.0], 0.0)


def test_leave_one_out_mean_hand_computed():
    np.testing.assert_allclose(gx.leave_one_out_mean([1.0, 2.0, 3.0, 6.0]), [11 / 3, 10 / 3, 3.0, 2.0])
    with pytest.raises(ValueError, match=">= 2"):
        gx.leave_one_out_mean([1.0])


def test_leave_one_out_ridge_hand_computed():
    # One indicator, λ = 0: row i is predicted by the mean of the other rows with its indicator.
    X = np.array([[1], [1], [1], [0], [0], [0]], float)
    y = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    np.testing.assert_allclose(gx.leave_one_out_ridge(X, y, [0.0]), [2.5, 2.0, 1.5, 25.0, 20.0, 15.0])
    # λ → ∞ shrinks to the intercept: the leave-one-out mean.
    np.testing.assert_allclose(gx.leave_one_out_ridge(X, y, [1e12]), gx.leave_one_out_mean(y), rtol=1e-6)
    # With a grid, λ is chosen by an inner leave-one-out that never sees the predicted row:
    # y depends on the indicator, so λ = 0 wins on every inner fold here.
    np.testing.assert_allclose(gx.leave_one_out_ridge(X, y, [1e12, 0.0]), [2.5, 2.0, 1.5, 25.0, 20.0, 15.0])


def test_few_fit_ridge_hand_computed():
    # n = 6, n_fit = 3: folds {0, 2, 4} and {1, 3, 5}; each predicted by the other's λ = 0 fit,
    # i.e. the mean of the other fold's rows with the same indicator.
    X = np.array([[1], [1], [0], [0], [1], [0]], float)
    y = np.array([1.0, 2.0, 10.0, 20.0, 3.0, 30.0])
    # fold {1,3,5}: ind 1 → 2, ind 0 → 25; fold {0,2,4}: ind 1 → (1+3)/2 = 2, ind 0 → 10.
    np.testing.assert_allclose(gx.few_fit_ridge(X, y, 3, [0.0]), [2.0, 2.0, 25.0, 10.0, 2.0, 10.0])
    with pytest.raises(ValueError, match="n >= 2 n_fit"):
        gx.few_fit_ridge(X, y, 4, [0.0])


def test_estimator_metrics_hand_computed():
    # true [1, 2, 3, 4], est [1, 3, 2, 4]: d = ranks differ by 1 in two places, Σd² = 2,
    # Spearman = 1 − 6·2 / (4·15) = 0.8; Kendall: 5 concordant, 1 discordant pair → 4/6.
    true = np.array([1.0, 2.0, 3.0, 4.0])
    est = np.array([1.0, 3.0, 2.0, 4.0])
    m = gx.estimator_metrics(est, true, 0.0, n_boot=200)
    assert m["spearman"]["value"] == pytest.approx(0.8)
    assert m["kendall"]["value"] == pytest.approx(4 / 6)
    assert m["error_of_change"]["value"] == pytest.approx(2.0 / 30.0)       # Σ(est−true)² = 2, Σ true² = 30
    assert m["level_ratio"] == pytest.approx(2.0 / 30.0)                     # base 0: the two coincide
    lo, hi = m["spearman"]["low"], m["spearman"]["high"]
    assert lo is not None and lo <= 0.8 <= hi
    # Two seeds: rank statistics within each seed, averaged (seed 1 reversed: −1), bases per row.
    # Seed 1's losses sit 10 higher: pooled over seeds the ranks would agree, within seeds not.
    est2 = np.concatenate([est, true[::-1] + 10])
    true2 = np.concatenate([true, true + 10])
    m2 = gx.estimator_metrics(est2, true2, np.repeat([0.0, 11.0], 4), group=np.repeat([0, 1], 4), n_boot=50)
    assert m2["spearman"]["value"] == pytest.approx((0.8 - 1.0) / 2)
    assert m2["per_group"]["1"]["spearman"] == pytest.approx(-1.0)
    assert m2["kendall"]["value"] == pytest.approx((4 / 6 - 1.0) / 2)
    # Σ(est−true)² = 2 + (9+1+1+9) = 22; Σ(true−base)² = 30 + (0+1+4+9) = 44.
    assert m2["error_of_change"]["value"] == pytest.approx(22.0 / 44.0)


def test_first_order_target_loss_and_cosine(tiny):
    """first_order_target_loss = mean softplus(−(f + ⟨∇f, Δ⟩)) with ∇f the unprojected
    per-example gradients (tiny["G_full"]); tree_cosine of parallel / opposite trees."""
    subset, batch = tiny["subset"], tiny["batch"]
    f = gx.gradex_output_fn(subset, clip_eps=EPS)
    rng = np.random.default_rng(3)
    delta = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-2, p.dtype), subset.params)
    f0 = np.asarray(tiny["f"](subset.params, tiny["jbatch"]), np.float64)
    z = f0 + tiny["G_full"] @ gx.tree_flatten_vector(delta)
    got = gx.first_order_target_loss(f, subset.params, delta, batch, batch_size=4)
    assert got == pytest.approx(np.mean(np.log1p(np.exp(-z))), rel=1e-4)
    assert gx.tree_cosine(delta, delta) == pytest.approx(1.0)
    assert gx.tree_cosine(delta, jax.tree.map(lambda x: -2 * x, delta)) == pytest.approx(-1.0)
    assert gx.tree_cosine(delta, jax.tree.map(jnp.zeros_like, delta)) is None


# ----------------------------------------------------------------------------- the job
def small_gradex_config(model_dir):
    c = base_config()
    c.experiments = ["gradex"]
    c.model.path = model_dir
    g = c.gradex
    g.aux_tasks = ["add", "copy", "add_mod10", "sentiment"]
    g.seeds = [0, 1]
    g.n_train_per_task = 16
    g.n_target_eval = 16
    g.meta_train.total_steps = 6
    g.meta_train.batch_size = 16
    g.meta_train.checkpoint_every = 0
    g.finetune.total_steps = 3
    g.finetune.batch_size = 8
    g.projection_dim = 12
    g.feature_batch_size = 16
    g.shard_size = 32           # 80 examples: 3 feature shards
    g.n_subsets = 30
    g.n_calibrate = 2
    g.n_verify = 6
    g.verify_shard_size = 2     # 6 verified subsets: 3 shards per seed
    g.baseline_few = 3
    g.n_random_compare = 2
    g.n_boot = 50
    g.C_grid = [0.1, 1.0]
    return c


def _stamps(paths):
    return {p: os.path.getmtime(p) for p in paths}


@pytest.mark.slow
def test_gradex_job_end_to_end(tiny_model_dir, tmp_path):
    c = small_gradex_config(tiny_model_dir)
    workdir = str(tmp_path / "job")
    rep = run(c, workdir)["gradex"]
    out = os.path.join(workdir, "gradex")
    assert os.path.getsize(rep["plots"][0]) > 10_000
    for s in (0, 1):
        assert len(glob.glob(os.path.join(out, f"seed_{s}", "features", "shard_*.npz"))) == 3
    h = rep["honest"]
    assert h["n_verified"] == 12 and h["n_per_seed"] == {"0": 6, "1": 6}
    rows = [r for s in rep["per_seed"] for r in s["verification"]]
    for s in rep["per_seed"]:
        keys = [r["subset"] for r in s["verification"]]
        assert len(set(keys)) == 6                                      # distinct subsets
        assert not set(keys) & set(s["calibration"]["subsets"])        # calibration never reused
        for r in s["verification"]:
            for k in ("linearised_logistic", "model_at_delta_logistic", "model_at_delta_ce", "true_logistic",
                      "true_ce", "distance", "first_order_at_true_logistic", "finetune_time_s"):
                assert np.isfinite(r[k]), (k, r)
            assert r["distance"] > 0 and r["steps"] == 3
            assert np.isfinite(r["first_order_in_subspace_logistic"]) and 0 < r["subspace_norm_share"] <= 1 + 1e-9
    # The report's figures are the metric functions applied to its own rows.
    true = np.array([r["true_logistic"] for r in rows])
    lin = np.array([r["linearised_logistic"] for r in rows])
    base = np.array([rep["per_seed"][r["seed"]]["theta_star_target"]["logistic"] for r in rows])
    est = h["estimators"]
    assert est["gradex_linearised"]["error_of_change"]["value"] == pytest.approx(gx.change_error(lin, true, base))
    assert est["no_finetune"]["error_of_change"]["value"] == pytest.approx(1.0)
    assert est["gradex_linearised"]["level_ratio"] == pytest.approx(np.sum((lin - true) ** 2) / np.sum(true ** 2))
    loo = np.concatenate([gx.leave_one_out_mean(true[:6]), gx.leave_one_out_mean(true[6:])])
    assert est["loo_mean"]["error_of_change"]["value"] == pytest.approx(gx.change_error(loo, true, base))
    assert set(est) == {"gradex_linearised", "gradex_model_at_delta", "no_finetune", "loo_mean",
                        "ridge_indicators_loo", "ridge_size_loo", "ridge_indicators_3"}
    check = rep["per_seed"][0]["selection"]["check"]
    assert set(check) >= {"selected", "all_tasks", "random"} and len(check["random"]) == 2
    assert rep["selection"]["all_tasks"]["mean"] > 0
    assert rep["per_seed"][0]["seed"] == 0 and rep["per_seed"][0]["meta_init"]["steps"] == 6
    assert isinstance(rep["target"]["met"], bool)

    # Restart after a kill: seed 1's last verification shard and a feature shard are gone,
    # the report is gone. Only those are recomputed; every number is identical.
    verify = sorted(glob.glob(os.path.join(out, "seed_*", "verify_*", "shard_*.npz")))
    assert len(verify) == 6
    killed = [verify[-1], glob.glob(os.path.join(out, "seed_0", "features", "shard_*.npz"))[-1]]
    estimates = glob.glob(os.path.join(out, "seed_*", "estimates_*.npz"))
    assert len(estimates) == 2                                          # the ensemble fits, one file per seed
    kept = _stamps([p for p in glob.glob(os.path.join(out, "seed_*", "*", "shard_*.npz")) if p not in killed]
                   + estimates)
    for p in killed:
        os.remove(p)
    os.remove(os.path.join(out, "report.json"))
    rep2 = run(c, workdir)["gradex"]
    assert _stamps(kept) == kept and all(os.path.exists(p) for p in killed)
    assert rep2["honest"]["estimators"] == rep["honest"]["estimators"]
    rows2 = [r for s in rep2["per_seed"] for r in s["verification"]]
    for a, b in zip(rows, rows2):
        for k in ("subset", "true_logistic", "true_ce", "distance", "linearised_logistic", "model_at_delta_ce"):
            assert a[k] == b[k], k

    # A change to a cached stage's inputs is refused, not mixed with the old results.
    os.remove(os.path.join(out, "report.json"))
    c.gradex.projection_dim = 13
    with pytest.raises(ValueError, match="different gradex configuration"):
        run(c, workdir)
    assert read_json(os.path.join(out, "seed_0", "fingerprint.json"))["fingerprint"]


def test_gradex_config_errors(tiny_model_dir, tmp_path):
    c = small_gradex_config(tiny_model_dir)
    c.gradex.target = "add"
    with pytest.raises(ValueError, match="also an auxiliary task"):
        run(c, str(tmp_path / "a"))
    c = small_gradex_config(tiny_model_dir)
    c.gradex.aux_tasks = ["add", "nope"]
    with pytest.raises(ValueError, match="unknown task"):
        run(c, str(tmp_path / "b"))
    c = small_gradex_config(tiny_model_dir)
    c.gradex.seeds = [1, 1]
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run(c, str(tmp_path / "c"))
