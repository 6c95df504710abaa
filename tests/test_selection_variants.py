"""NTK score variants (docs/theory.md §6.5), the method plug-ins and the selection diagnostics.

Oracles: per-example gradients formed explicitly (``gradient_features`` without
projection) and the variant formulas evaluated by hand; finite differences of the domain
loss for the label-aware first-order score; a closed form for the token reductions."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_jax.data.controlled import make_controlled_benchmark
from ntk_jax.kernels.features import gradient_features, gradient_inner_products, mean_gradient
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.models.subset import param_subset
from ntk_jax.selection.jobs import plain, run_selection
from ntk_jax.selection.methods import Selection, apply_preset, get_method, method_names, split_arm
from ntk_jax.selection.ntk_selector import selection_scalar_fn
from ntk_jax.training.losses import per_example_lm_loss
from test_selection import _random_batch, _small_lora_model as _model, knn_oracle


def _batch(n, T=10, seed=0):
    """``test_selection._random_batch`` with next-token ``targets`` (the last position is
    not scored)."""
    batch = dict(_random_batch(n, T=T, seed=seed))
    ids = batch["input_ids"]
    batch["targets"] = np.concatenate([ids[:, 1:], np.zeros((n, 1), np.int32)], axis=1)
    batch["loss_mask"] = batch["loss_mask"].copy()
    batch["loss_mask"][:, -1] = 0
    return batch


def _explicit(fn, params, x):
    return np.asarray(gradient_features(fn, params, x), np.float64)  # (n, P)


def test_mean_gradient_and_inner_products_match_explicit_gradients():
    subset = param_subset(_model())
    fn = selection_scalar_fn(subset, "loss", "mean")
    dom, cand = _batch(5, seed=1), _batch(7, seed=2)
    G, C = _explicit(fn, subset.params, dom), _explicit(fn, subset.params, cand)
    rng = np.random.default_rng(0)
    metric = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.5, 2.0, p.shape), jnp.float32), subset.params)
    w = np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree.leaves(metric)]).astype(np.float64)
    for normalize in (False, True):
        for met, wv in ((None, np.ones_like(w)), (metric, w)):
            u, sq = mean_gradient(fn, subset.params, dom, normalize=normalize, metric=met, batch_size=2)
            norms = np.sqrt((G * G * wv).sum(axis=1))
            ref = (G / norms[:, None]).mean(axis=0) if normalize else G.mean(axis=0)
            flat_u = np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree.leaves(u)])
            np.testing.assert_allclose(flat_u, ref, rtol=2e-4, atol=1e-6 * np.abs(ref).max())
            np.testing.assert_allclose(sq, norms ** 2, rtol=2e-4)
            dots, csq = gradient_inner_products(fn, subset.params, cand, u, metric=met, batch_size=3)
            np.testing.assert_allclose(dots, C @ flat_u, rtol=2e-4, atol=1e-6 * np.abs(C @ flat_u).max())
            np.testing.assert_allclose(csq, (C * C * wv).sum(axis=1), rtol=2e-4)


def test_token_reductions_closed_form():
    subset = param_subset(_model())
    x = _batch(4, seed=3)
    count = x["loss_mask"].sum(axis=1)
    for output in ("sum_of_logits", "loss"):
        mean = np.asarray(selection_scalar_fn(subset, output, "mean")(subset.params, x))
        total = np.asarray(selection_scalar_fn(subset, output, "sum")(subset.params, x))
        np.testing.assert_allclose(total, mean * count, rtol=1e-5)
    logits = subset.merge(subset.params)(x["input_ids"], attention_mask=x["attention_mask"])
    np.testing.assert_allclose(np.asarray(selection_scalar_fn(subset, "loss", "mean")(subset.params, x)),
                               np.asarray(per_example_lm_loss(logits, x["targets"], x["loss_mask"])), rtol=1e-6)
    with pytest.raises(ValueError, match="score output"):
        selection_scalar_fn(subset, "logits")
    with pytest.raises(ValueError, match="token reduction"):
        selection_scalar_fn(subset, "loss", "max")


def test_label_aware_score_is_first_order_change_of_domain_loss():
    """s_j = ⟨∇ℓ_D, ∇ℓ_j⟩ = −d/dε ℓ_D(θ − ε ∇ℓ_j) at ε = 0 (central finite differences with
    Richardson extrapolation; the model computes in float32)."""
    subset = param_subset(_model())
    fn = selection_scalar_fn(subset, "loss", "mean")
    dom, cand = _batch(6, seed=4), _batch(3, seed=5)
    u, _ = mean_gradient(fn, subset.params, dom)
    s, _ = gradient_inner_products(fn, subset.params, cand, u)
    domain_loss = jax.jit(lambda p: jnp.mean(fn(p, dom)))

    def fd(gj, eps):  # −d/dε ℓ_D(θ − ε g_j) at 0, central differences
        plus = float(domain_loss(jax.tree.map(lambda p, g: p - eps * g, subset.params, gj)))
        minus = float(domain_loss(jax.tree.map(lambda p, g: p + eps * g, subset.params, gj)))
        return -(plus - minus) / (2 * eps)

    for j in range(3):
        gj = jax.grad(lambda p: fn(p, {k: v[j:j + 1] for k, v in cand.items()})[0])(subset.params)
        richardson = (4 * fd(gj, 1e-3) - fd(gj, 2e-3)) / 3  # the O(ε²) error cancels
        np.testing.assert_allclose(s[j], richardson, rtol=2e-3, atol=1e-3 * np.abs(s).max())


# ------------------------------------------------------------------------ the job, each variant
@pytest.fixture(scope="module")
def bench():
    return make_controlled_benchmark(0, n_domain=6, n_test=4, n_pool_per_family=2)  # 26 pool records


@pytest.fixture(scope="module")
def context(tiny_model_dir):
    from ntk_jax.launcher.context import Context, load_tokenizer

    return Context(model_dir=tiny_model_dir, tokenizer=load_tokenizer(tiny_model_dir), max_len=32, seed=0, info={})


def _cfg(**ntk):
    c = plain(base_config().select)
    c.update(n_select=5, shard_size=8, projection_dim=0, feature_batch_size=16, bucket_multiple=0)
    c = apply_preset(c, "ntk@gradient")  # the gradient scores over the whole pool
    c["warmup"].update(total_steps=3, batch_size=4)
    c["ntk"].update(ntk)
    return c


@pytest.mark.parametrize("variant", [
    dict(output="sum_of_logits", normalize="candidate", point="base", reduce="sum"),
    dict(output="loss", normalize="cosine", point="base+warmup", precondition="adam"),  # recommended + Adam
])
def test_job_scores_match_variant_formula(tmp_path, context, bench, variant):
    from ntk_jax.data.records import encode_records
    from ntk_jax.models.lora import lora_filter
    from ntk_jax.selection.jobs import SelectionJob
    from ntk_jax.selection.optimizer_state import adam_diagonal, find_adam_state

    cfg = _cfg(**variant)
    rep = run_selection(context, cfg, bench.domain, bench.pool, str(tmp_path / "job"), seed=0, plot=False)
    got = np.load(tmp_path / "job" / "all_scores.npz")
    # the reference: explicit per-example gradients at the same kernel point(s), the formula by hand
    job = SelectionJob(context=context, cfg=cfg, domain=bench.domain, pool=bench.pool,
                       domain_arrays=encode_records(context.tokenizer, bench.domain, 32), out_dir=str(tmp_path / "job"),
                       seed=0)
    pool_arrays = encode_records(context.tokenizer, bench.pool, 32)
    points = []  # (model, metric weights)
    if cfg["ntk"]["point"] in ("base", "base+warmup"):
        points.append((context.load_model(LoRAConfig.from_dict(cfg["lora"]), seed=0), None))
    if cfg["ntk"]["point"] in ("warmup", "base+warmup"):
        model, wcfg = job.warm_up(cfg["lora"], cfg["warmup"])  # resumes: the same trained factors
        w = None
        if cfg["ntk"].get("precondition") == "adam":
            state = job.checkpoints(model, wcfg, steps=[3])[3]
            d = adam_diagonal(find_adam_state(state["opt_state"]).nu, 3)
            w = np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree.leaves(d)]).astype(np.float64)
        points.append((model, w))
    norm = cfg["ntk"]["normalize"]
    refs, cnorms = [], []
    for model, w in points:
        subset = param_subset(model, lora_filter())
        fn = selection_scalar_fn(subset, cfg["ntk"]["output"], cfg["ntk"]["reduce"])
        G = _explicit(fn, subset.params, job.domain_arrays)
        C = _explicit(fn, subset.params, pool_arrays)
        w = np.ones(G.shape[1]) if w is None else w
        gn, cn = np.sqrt((G * G * w).sum(axis=1)), np.sqrt((C * C * w).sum(axis=1))
        u = (G / gn[:, None]).mean(axis=0) if norm == "cosine" else G.mean(axis=0)
        ref = C @ (w * u)
        refs.append(ref / cn if norm != "none" else ref)
        cnorms.append(cn)
    ref = np.mean(refs, axis=0)
    np.testing.assert_allclose(got["scores"], ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())
    np.testing.assert_allclose(got["feature_norms"], cnorms[0], rtol=2e-3)  # at the first point
    assert rep["ntk_variant"]["normalize"] == norm and rep["n_filtered"] == len(bench.pool)


def test_projected_direction_and_jvp_path(tmp_path, context, bench):
    """p > 0 sketches the direction and feature_norms=False takes the JVP path (no norms): the
    scores track the exact per-example-gradient ones. (JVP = per-example gradient inner
    products: tests/test_selection.py::test_scores_match_jacobian_free_kernel.)"""
    from scipy.stats import spearmanr

    base = dict(point="base", normalize="none")
    exact = run_selection(context, _cfg(**base), bench.domain, bench.pool, str(tmp_path / "e"), seed=0, plot=False)
    jvp = run_selection(context, {**_cfg(**base, feature_norms=False), "projection_dim": 8192}, bench.domain,
                        bench.pool, str(tmp_path / "j"), seed=0, plot=False)
    e, j = (np.load(tmp_path / d / "all_scores.npz") for d in "ej")
    assert spearmanr(e["scores"], j["scores"]).statistic > 0.9
    assert "feature_norms" not in j.files and "feature_norms" in e.files
    assert jvp["diagnostics"]["spearman_score_vs_feature_norm"] is None
    assert exact["diagnostics"]["spearman_score_vs_feature_norm"] is not None and jvp["selected_ids"]


def test_factored_projection_scores_are_projected_feature_products(tmp_path, context, bench):
    """select.projection_type="factored": the JVP score along the sketched direction equals
    ⟨Πᵀḡ, Πᵀg_j⟩ with Πᵀ the factored features (which never form g_j), and tracks the exact
    score."""
    from scipy.stats import spearmanr

    from ntk_jax.data.encoding import lm_batch
    from ntk_jax.data.records import encode_records
    from ntk_jax.kernels.factored_projection import FactoredProjection
    from ntk_jax.models.lora import lora_filter

    base = dict(point="base", normalize="none", feature_norms=False)
    cfg = {**_cfg(**base), "projection_dim": 4096, "projection_type": "factored"}
    run_selection(context, cfg, bench.domain, bench.pool, str(tmp_path / "f"), seed=0, plot=False)
    exact = run_selection(context, _cfg(**base), bench.domain, bench.pool, str(tmp_path / "e"), seed=0, plot=False)
    got, e = np.load(tmp_path / "f" / "all_scores.npz")["scores"], np.load(tmp_path / "e" / "all_scores.npz")["scores"]
    subset = param_subset(context.load_model(LoRAConfig.from_dict(cfg["lora"]), seed=0), lora_filter())
    fn = selection_scalar_fn(subset, cfg["ntk"]["output"], cfg["ntk"]["reduce"])
    fp = FactoredProjection(4096, seed=0)
    dom, cand = (gradient_features(fn, subset.params, lm_batch(encode_records(context.tokenizer, recs, 32)),
                                   projection=fp) for recs in (bench.domain, bench.pool))
    ref = cand.astype(np.float64) @ dom.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())
    assert spearmanr(got, e).statistic > 0.9
    assert exact["selected_ids"]


def test_bad_variant_settings_are_named(tmp_path, context, bench):
    with pytest.raises(ValueError, match="select.projection_type='kron'"):
        run_selection(context, {**_cfg(), "projection_type": "kron"}, bench.domain, bench.pool,
                      str(tmp_path / "x"), seed=0)
    with pytest.raises(ValueError, match="LESS needs select.projection_type='dense'"):
        run_selection(context, {**_cfg(), "method": "less", "projection_type": "factored"}, bench.domain,
                      bench.pool, str(tmp_path / "x"), seed=0)
    for ntk, match in ((dict(normalize="l2"), "select.ntk.normalize"),
                       (dict(point="base", precondition="adam"), "point='warmup'"),
                       (dict(output="logits"), "select.ntk.output")):
        with pytest.raises(ValueError, match=match):
            run_selection(context, _cfg(**ntk), bench.domain, bench.pool, str(tmp_path / "x"), seed=0)
    with pytest.raises(ValueError, match="select.knn_pooling 'last'"):
        run_selection(context, {**_cfg(), "knn_pooling": "last"}, bench.domain, bench.pool, str(tmp_path / "x"), seed=0)
    assert not os.path.exists(tmp_path / "x" / "selected.jsonl")


@pytest.mark.parametrize("pooling", ["all", "response"])
def test_embedding_selection_matches_numpy_votes(tmp_path, context, bench, pooling):
    """The embedding method's selection (docs/theory.md §6.2) equals a kNN vote computed
    independently from the warm-up model's mean hidden states (the kNN filter of ntk@paper:
    tests/test_selection.py::test_job_resume_identical_scores), over every real token or over
    the scored positions (``select.knn_pooling``)."""
    cfg = apply_preset({**_cfg(), "knn_k": 3, "knn_pooling": pooling}, "embedding")
    out = str(tmp_path / "job")
    rep = run_selection(context, cfg, bench.domain, bench.pool, out, seed=0, plot=False)
    got = np.load(os.path.join(out, "all_scores.npz"))
    votes, mean_cos, rank = knn_oracle(context, cfg, bench.domain, bench.pool, out)
    assert votes.sum() == 3 * len(bench.domain) and 0 < (votes > 0).sum() < len(bench.pool)
    ids = np.array([r["id"] for r in bench.pool])
    assert rep["selected_ids"] == list(ids[rank[:5]])
    assert list(got["ids"]) == list(ids)
    np.testing.assert_array_equal(got["votes"], votes)
    np.testing.assert_allclose(got["mean_cos"], mean_cos, rtol=1e-4, atol=1e-5)
    assert rep["n_voted"] == int((votes > 0).sum())
    if pooling == "response":  # the two poolings embed differently (and the store is not reused)
        other = str(tmp_path / "job_all")
        run_selection(context, {**cfg, "knn_pooling": "all"}, bench.domain, bench.pool, other, seed=0, plot=False)
        assert not np.array_equal(np.load(os.path.join(other, "all_scores.npz"))["mean_cos"], got["mean_cos"])


def test_mean_hidden_states_pooling_closed_form_and_errors():
    """``pooling="response"``: the mean of the hidden states over the ``loss_mask`` positions
    (computed by hand from the model's own ``hidden_states``); bad settings are named."""
    from ntk_jax.selection.ntk_selector import mean_hidden_states

    model, x = _model(), _batch(5, seed=4)
    h = np.asarray(model.hidden_states(jnp.asarray(x["input_ids"]), jnp.asarray(x["attention_mask"])), np.float64)
    for pooling, key in (("all", "attention_mask"), ("response", "loss_mask")):
        m = np.asarray(x[key], np.float64)[:, :, None]
        got = mean_hidden_states(model, x, batch_size=2, pooling=pooling)  # blocks of 2, last one padded
        np.testing.assert_allclose(got, (h * m).sum(axis=1) / m.sum(axis=1), rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown pooling 'last'"):
        mean_hidden_states(model, x, pooling="last")
    with pytest.raises(ValueError, match="needs the batch's 'loss_mask'"):
        mean_hidden_states(model, {k: v for k, v in x.items() if k != "loss_mask"}, pooling="response")
    empty = {**x, "loss_mask": np.where(np.arange(5)[:, None] == 2, 0.0, x["loss_mask"])}
    with pytest.raises(ValueError, match=r"row\(s\) \[2\] have no scored position"):
        mean_hidden_states(model, empty, pooling="response")


# ------------------------------------------------------------------------ plug-ins and presets
def test_methods_are_modules_and_presets_apply():
    assert {"ntk", "less", "random", "embedding"} <= set(method_names())
    with pytest.raises(ValueError, match="unknown selection method 'nope'.*embedding"):
        get_method("nope")
    sel = plain(base_config().select)
    assert set(method_names()) >= {k for k in sel if k in method_names()}  # sections come from the modules
    assert "ntk" in sel and "less" in sel
    paper = apply_preset(sel, "ntk@paper")
    assert paper["method"] == "ntk" and paper["ntk"]["output"] == "sum_of_logits" and paper["ntk"]["filter_factor"] == 4
    assert paper["ntk"]["normalize"] == "none" and sel["method"] == "ntk"  # the input is not changed
    assert split_arm("less") == ("less", None) and apply_preset(sel, "less")["method"] == "less"
    with pytest.raises(ValueError, match="no preset 'fast'"):
        apply_preset(sel, "ntk@fast")
    # settings in brackets on top of the preset
    arm = "ntk@paper[warmup.total_steps=120,ntk.filter_factor=8,ntk.point=base]"
    assert split_arm(arm) == ("ntk", "paper")
    long = apply_preset(sel, arm)
    assert long["warmup"]["total_steps"] == 120 and long["ntk"]["filter_factor"] == 8
    assert long["ntk"]["point"] == "base" and long["ntk"]["output"] == "sum_of_logits"
    assert apply_preset(sel, "ntk[warmup.total_steps=7]")["warmup"]["total_steps"] == 7
    with pytest.raises(ValueError, match="no such field"):
        apply_preset(sel, "ntk[warmup.steps=7]")
    with pytest.raises(ValueError, match="not key=value"):
        apply_preset(sel, "ntk[warmup.total_steps]")
    with pytest.raises(ValueError, match="one bracket at the end"):
        apply_preset(sel, "ntk[warmup.total_steps=7")


def test_a_new_method_is_one_file(tmp_path, context, bench, monkeypatch):
    """Dropping a module into ntk_jax.selection.methods makes a method the job can run."""
    import ntk_jax.selection.methods as methods_pkg

    path = os.path.join(os.path.dirname(methods_pkg.__file__), "zz_first_n.py")
    with open(path, "w") as f:
        f.write("import numpy as np\nfrom ntk_jax.selection.methods import Selection\n"
                "def select(job):\n    n = int(job.cfg['n_select'])\n"
                "    return Selection(chosen=np.arange(n), scored=np.arange(n), scores=-np.arange(n, dtype=float))\n")
    try:
        cfg = _cfg()
        cfg["method"] = "zz_first_n"
        rep = run_selection(context, cfg, bench.domain, bench.pool, str(tmp_path / "new"), seed=0)
        assert rep["selected_ids"] == [r["id"] for r in bench.pool[:5]]
        assert os.path.exists(tmp_path / "new" / "diagnostics.png")
    finally:
        os.remove(path)


# ------------------------------------------------------------------------ diagnostics
def test_diagnostics_shares_and_correlations(context):
    from ntk_jax.selection.diagnostics import selection_diagnostics

    pool = [{"id": f"u{i}", "task": "a", "role": "useful", "prompt": "x", "response": "y" * (1 + i % 3)}
            for i in range(6)] + [{"id": f"n{i}", "task": "b", "role": "unrelated", "prompt": "x", "response": "yy"}
                                  for i in range(4)]
    scores = np.arange(10, dtype=float)
    norms = scores * 2 + 1
    res = Selection(chosen=np.asarray([9, 8, 7, 6]), scored=np.arange(10), scores=scores, feature_norms=norms)
    d = selection_diagnostics(pool, res.chosen, res, context.tokenizer)
    assert d["share_by_task"] == {"a": {"pool": 0.6, "selected": 0.0}, "b": {"pool": 0.4, "selected": 1.0}}
    assert d["share_by_role"]["unrelated"]["selected"] == 1.0
    assert d["spearman_score_vs_feature_norm"] == pytest.approx(1.0)
    assert d["score_by_role"]["useful"]["max"] == 5.0 and d["score_by_role"]["unrelated"]["n"] == 4
    rl = d["spearman_score_vs_response_length"]
    assert rl is not None and -1 <= rl <= 1
    json.dumps(d)
    res_none = Selection(chosen=np.asarray([0, 1]))
    d2 = selection_diagnostics(pool, res_none.chosen, res_none, context.tokenizer)
    assert d2["spearman_score_vs_feature_norm"] is None and "score_by_role" not in d2


# ------------------------------------------------------------------------ the suite, end to end
@pytest.mark.slow
def test_select_suite_end_to_end_and_resume(tmp_path, tiny_model_dir):
    from ntk_jax.launcher.run import run

    c = base_config()
    c.experiments = ("select_suite",)
    c.model.path = tiny_model_dir
    c.select.benchmark.n_domain = 16
    c.select.benchmark.n_test = 16
    c.select.benchmark.n_pool_per_family = 4
    c.select.n_select = 8
    c.select.warmup.total_steps = 3
    c.select.ntk.filter_factor = 2
    c.select.projection_dim = 0
    c.select_compare.seeds = (0,)
    c.select_compare.methods = ("ntk@paper",)
    c.select_compare.oracles = ("conflicting",)
    c.select_compare.finetune.total_steps = 2
    c.select_suite.targets = ("double",)
    report = run(c, str(tmp_path))["select_suite"]
    out = tmp_path / "select_suite"
    for name in ("suite_table.json", "suite_table.md", "suite.png", "report.json"):
        assert (out / name).exists(), name
    for variant in ("no_conflict", "contradicting"):
        cell = out / "double" / variant
        assert (cell / "results.json").exists()
        assert (cell / "seed_0" / "ntk@paper" / "diagnostics.png").exists()
        rep = json.loads((cell / "seed_0" / "ntk@paper" / "report.json").read_text())
        assert set(rep["diagnostics"]["share_by_role"]) >= {"useful", "unrelated"}
    t = report["table"]
    assert set(t) == {"double/no_conflict", "double/contradicting"}
    assert "oracle_conflicting" in t["double/contradicting"] and "oracle_conflicting" not in t["double/no_conflict"]
    for arm in ("ntk@paper",):
        assert set(report["checks"][arm]) >= {"precision_2.5x_base", "beats_domain_and_random", "above_base_conflict"}
    assert "| double |" in (out / "suite_table.md").read_text()
    # resume: a rerun (report deleted) recomputes nothing and gives the same table
    results = (out / "double" / "no_conflict" / "results.json").read_text()
    os.remove(out / "report.json")
    again = run(c, str(tmp_path))["select_suite"]
    assert (out / "double" / "no_conflict" / "results.json").read_text() == results
    assert again["table"] == json.loads(json.dumps(report["table"]))
    with pytest.raises(ValueError, match="unknown suite target"):
        c.select_suite.targets = ("nope",)
        run(c, str(tmp_path / "bad"))
