"""Loss-change scores and the staged NTK-Selector pipeline (docs/theory.md §6.7).

Oracles: each record's response NLL from the model's own logits (``per_example_lm_loss``
over a plain forward, not the job's forward program) at the fresh LoRA factors and at the
warm-up's checkpoints; the Δ formula and the rank combination by hand; a killed and resumed
job gives the same selection bitwise."""
import numpy as np
import pytest

from ntk_jax.data.records import encode_records
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.selection.jobs import SelectionJob, plain, run_selection
from ntk_jax.selection.store import StopRequested
from ntk_jax.selection.loss_change import loss_change
from ntk_jax.selection.methods import apply_preset
from ntk_jax.training.losses import per_example_lm_loss
from test_selection_variants import bench, context  # noqa: F401 (module-scoped fixtures: 26 pool records)


def _cfg(preset="ntk@loss_change", **lc):
    c = plain(base_config().select)
    c.update(n_select=5, shard_size=8, projection_dim=0, feature_batch_size=16, bucket_multiple=0)
    c["warmup"].update(total_steps=4, batch_size=4)
    c = apply_preset(c, preset)
    c["ntk"]["loss_change"].update(lc)
    return c


def _nll(model, arrays, reduce="mean"):
    """Per-record response NLL from a plain forward of ``model``."""
    logits = model(arrays["input_ids"], attention_mask=arrays["attention_mask"])
    mean = np.asarray(per_example_lm_loss(logits, arrays["targets"], arrays["loss_mask"]), np.float64)
    return mean if reduce == "mean" else mean * np.asarray(arrays["loss_mask"]).sum(axis=1)


def _job(context, cfg, bench, out_dir):
    return SelectionJob(context=context, cfg=cfg, domain=bench.domain, pool=bench.pool,
                        domain_arrays=encode_records(context.tokenizer, bench.domain, 32), out_dir=out_dir, seed=0)


def test_loss_change_formula():
    base = np.array([2.0, 1.0, 4.0])
    pts = np.array([[1.0, 0.5], [1.5, 1.5], [4.0, 2.0]])
    np.testing.assert_allclose(loss_change(base, pts), [1.25, -0.5, 1.0])
    np.testing.assert_allclose(loss_change(base, pts, relative=True), [0.625, -0.5, 0.25])
    with pytest.raises(ValueError, match=r"\(n, K\)"):
        loss_change(base, pts[:2])


@pytest.mark.parametrize("lc", [dict(reduce="mean", checkpoints=1), dict(reduce="sum", checkpoints=2, relative=True)])
def test_job_scores_are_loss_changes(tmp_path, context, bench, lc):
    cfg = _cfg(**lc)
    out = str(tmp_path / "job")
    rep = run_selection(context, cfg, bench.domain, bench.pool, out, seed=0, plot=False)
    got = np.load(tmp_path / "job" / "all_scores.npz")
    # the oracle: plain forwards at θ_0 and at the warm-up checkpoint(s) the job saved
    job = _job(context, cfg, bench, out)
    pool = encode_records(context.tokenizer, bench.pool, 32)
    base_model = context.load_model(LoRAConfig.from_dict(cfg["lora"]), seed=0)
    l0 = _nll(base_model, pool, lc["reduce"])
    k = lc["checkpoints"]
    steps = [4] if k == 1 else [2, 4]
    model, wcfg = job.warm_up(cfg["lora"], cfg["warmup"], checkpoint_every=steps[0], max_to_keep=k + 1) \
        if k > 1 else job.warm_up(cfg["lora"], cfg["warmup"])  # resumes: the trained factors
    from ntk_jax.models.subset import param_subset
    from ntk_jax.models.lora import lora_filter

    sub = param_subset(model, lora_filter())
    lk = []
    for s in steps:
        params = job.checkpoints(model, wcfg, steps=[s])[s]["params"]
        lk.append(_nll(sub.merge(params), pool, lc["reduce"]))
    ref = loss_change(l0, np.stack(lk, axis=1), relative=lc.get("relative", False))
    # Δ is a difference of float32 losses: its error scales with the losses, not with Δ
    np.testing.assert_allclose(got["scores"], ref, rtol=1e-4, atol=2e-6 * np.abs(l0).max())
    np.testing.assert_allclose(got["loss_base"], l0, rtol=1e-4)
    assert rep["loss_change"]["checkpoint_steps"] == steps and rep["n_filtered"] == len(bench.pool)
    assert "loss_change" in rep["timings_s"] and "score" not in rep["timings_s"]  # forward-only
    order = np.lexsort((np.arange(len(ref)), -np.asarray(got["scores"])))
    assert rep["selected_ids"] == [bench.pool[i]["id"] for i in order[:5]]


def test_staged_pipeline_combines_ranks_and_resumes(tmp_path, context, bench):
    cfg = _cfg("ntk@staged")
    cfg["ntk"]["filter_factor"] = 2  # M = 10 of 26 go to the gradient stage
    out = str(tmp_path / "job")
    with pytest.raises(StopRequested):  # killed in stage 1 (4 shards) after 3
        run_selection(context, cfg, bench.domain, bench.pool, out, seed=0, plot=False, stop_after_shards=3)
    rep = run_selection(context, cfg, bench.domain, bench.pool, out, seed=0, plot=False)
    got = np.load(tmp_path / "job" / "all_scores.npz")
    assert rep["n_filtered"] == 10 and len(got["ids"]) == 10
    # stage 1: the kept are the top 10 by Δ of the whole pool (in the loss_change store)
    run_selection(context, _cfg(), bench.domain, bench.pool, str(tmp_path / "lc"), seed=0, plot=False)
    delta = np.load(tmp_path / "lc" / "all_scores.npz")["scores"]
    top10 = set(np.asarray([r["id"] for r in bench.pool])[np.argsort(-delta, kind="stable")[:10]])
    assert set(got["ids"]) == top10
    np.testing.assert_allclose(got["loss_change"], [delta[[r["id"] for r in bench.pool].index(i)] for i in got["ids"]])
    # combination: minus the mean of the two ranks inside the kept
    def rank(s):
        r = np.empty(len(s))
        r[np.lexsort((np.arange(len(s)), -s))] = np.arange(len(s))
        return r
    np.testing.assert_allclose(got["scores"], -0.5 * (rank(got["loss_change"]) + rank(got["gradient_score"])))
    # resumed run = uninterrupted run
    again = run_selection(context, cfg, bench.domain, bench.pool, str(tmp_path / "fresh"), seed=0, plot=False)
    assert again["selected_ids"] == rep["selected_ids"]
    assert {"warmup", "loss_change", "score", "select"} <= set(rep["timings_s"])


def test_recommended_knn_then_loss_change_of_the_kept(tmp_path, context, bench):
    """The default pipeline: the kNN filter keeps M = 2N here (the embedding method's vote key,
    a separate job), Δ ranks the kept — equal to the whole-pool Δ job restricted to them; a
    killed and resumed run selects the same records."""
    cfg = _cfg("ntk")
    assert (cfg["ntk"]["filter"], cfg["ntk"]["rescore"], cfg["ntk"]["combine"]) == ("knn", "loss_change", "rescore")
    cfg["ntk"]["filter_factor"] = 2  # M = 10 of 26
    out = str(tmp_path / "job")
    for _ in range(3):  # killed after one new shard of each store (embed 4 shards, ℓ(θ_0), ℓ(θ_w): 2 each)
        with pytest.raises(StopRequested):
            run_selection(context, cfg, bench.domain, bench.pool, out, seed=0, plot=False, stop_after_shards=1)
    rep = run_selection(context, cfg, bench.domain, bench.pool, out, seed=0, plot=False)
    got = np.load(tmp_path / "job" / "all_scores.npz")
    ids = [r["id"] for r in bench.pool]
    emb = run_selection(context, _cfg("embedding"), bench.domain, bench.pool, str(tmp_path / "emb"), seed=0,
                        plot=False)
    key = np.load(tmp_path / "emb" / "all_scores.npz")["scores"]
    kept = sorted(np.lexsort((np.arange(len(key)), -key))[:10])
    assert rep["n_filtered"] == 10 and list(got["ids"]) == [ids[i] for i in kept]
    np.testing.assert_allclose(got["votes"], np.load(tmp_path / "emb" / "all_scores.npz")["votes"][kept])
    run_selection(context, _cfg(), bench.domain, bench.pool, str(tmp_path / "lc"), seed=0, plot=False)
    delta = np.load(tmp_path / "lc" / "all_scores.npz")["scores"]
    # the same float32 losses in other batches: equal up to a few ulps of the losses
    np.testing.assert_allclose(got["scores"], delta[kept], rtol=1e-4, atol=2e-6 * np.abs(got["loss_base"]).max())
    order = np.lexsort((np.arange(len(kept)), -delta[kept]))[:5]
    assert rep["selected_ids"] == [ids[kept[i]] for i in order]
    assert {"embed", "loss_change"} <= set(rep["timings_s"]) and "score" not in rep["timings_s"]
    assert rep["loss_change"]["n_scored"] == 10
    fresh = run_selection(context, cfg, bench.domain, bench.pool, str(tmp_path / "fresh"), seed=0, plot=False)
    assert fresh["selected_ids"] == rep["selected_ids"]


def test_cross_fit_reports_held_out_change(tmp_path, context, bench):
    cfg = _cfg(cross_fit=True)
    rep = run_selection(context, cfg, bench.domain, bench.pool, str(tmp_path / "job"), seed=0, plot=False)
    lc = rep["loss_change"]
    assert lc["points"] == ["half_a@4", "half_b@4"]
    for half in ("half_a", "half_b"):
        h = lc["held_out_domain"][half]
        assert np.isfinite(h["held_out_change"]) and h["trained_on_change"] > h["held_out_change"]
        # one checkpoint: loss after + change = the half's mean loss at θ_0, under either warm-up
        assert h["held_out_loss"] + h["held_out_change"] == pytest.approx(h["trained_on_loss"] + h["trained_on_change"],
                                                                          rel=1e-6)
        assert h["trained_on_loss"] < h["held_out_loss"]


def test_bad_loss_change_settings_are_named(tmp_path, context, bench):
    for lc, match in ((dict(reduce="max"), "loss_change.reduce"), (dict(checkpoints=9), "more than the warm-up"),
                      (dict(checkpoints=0), "checkpoints must be >= 1")):
        with pytest.raises(ValueError, match=match):
            run_selection(context, _cfg(**lc), bench.domain, bench.pool, str(tmp_path / "bad"), seed=0, plot=False)
    cfg = _cfg()
    cfg["ntk"]["filter"] = "none"
    with pytest.raises(ValueError, match="no stage 1"):
        run_selection(context, cfg, bench.domain, bench.pool, str(tmp_path / "bad2"), seed=0, plot=False)


def test_base_losses_are_shared_across_targets(tmp_path, context, bench):
    """ℓ(θ_0) does not depend on the target: jobs with another domain set reuse the cached
    store (no θ_0 shard recomputed) and score exactly as without the cache."""
    import os

    cache = str(tmp_path / "cache")
    a = _cfg(base_cache=cache)
    run_selection(context, a, bench.domain, bench.pool, str(tmp_path / "a"), seed=0, plot=False)
    (sub,) = os.listdir(cache)
    shards = sorted(f for f in os.listdir(os.path.join(cache, sub)) if f.startswith("shard_"))
    mtimes = [os.stat(os.path.join(cache, sub, f)).st_mtime_ns for f in shards]
    other_domain = bench.domain[:4]
    rep = run_selection(context, a, other_domain, bench.pool, str(tmp_path / "b"), seed=0, plot=False)
    assert os.listdir(cache) == [sub] and rep["loss_change"]["base_losses"] == os.path.join(cache, sub)
    assert [os.stat(os.path.join(cache, sub, f)).st_mtime_ns for f in shards] == mtimes  # reused, not recomputed
    ref = run_selection(context, _cfg(), other_domain, bench.pool, str(tmp_path / "c"), seed=0, plot=False)
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "all_scores.npz")["scores"],
                                  np.load(tmp_path / "c" / "all_scores.npz")["scores"])
    assert rep["selected_ids"] == ref["selected_ids"]
    nonzero = _cfg(base_cache=cache)
    nonzero["lora"]["b_init_std"] = 0.02  # θ_0 is no longer the base model: another cache entry
    run_selection(context, nonzero, bench.domain, bench.pool, str(tmp_path / "d"), seed=0, plot=False)
    assert len(os.listdir(cache)) == 2


def test_shuffle_responses_is_a_seeded_derangement():
    from ntk_jax.data.records import shuffle_responses
    recs = [{"id": f"p{i}", "prompt": f"q{i}", "response": f"a{i}", "family": "f"} for i in range(5)]
    recs.append({"id": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a5"},
                                         {"role": "user", "content": "again"},
                                         {"role": "assistant", "content": "last"}]})
    out = shuffle_responses(recs, seed=3)
    answers = [r["response"] if "response" in r else r["messages"][-1]["content"] for r in out]
    assert sorted(answers) == sorted([f"a{i}" for i in range(5)] + ["last"])  # the same answers, moved
    assert all(a != (r["response"] if "response" in r else "last") for a, r in zip(answers, recs))  # none kept
    assert out[-1]["messages"][1]["content"] == "a5" and recs[-1]["messages"][-1]["content"] == "last"  # input intact
    assert [r["prompt"] for r in out[:5]] == [r["prompt"] for r in recs[:5]] and out[0]["family"] == "f"
    assert shuffle_responses(recs, seed=3) == out and shuffle_responses(recs, seed=4) != out
    with pytest.raises(ValueError, match="at least 2"):
        shuffle_responses(recs[:1], seed=0)
    with pytest.raises(ValueError, match="'t'.*text record"):
        shuffle_responses(recs[:2] + [{"id": "t", "text": "x"}], seed=0)


def test_shuffled_reference_scores_from_a_warm_up_on_permuted_answers(tmp_path, context, bench):
    """``reference="shuffled"``: Δ_j = ℓ_j(θ_s) − ℓ_j(θ_w), θ_s a warm-up of the same seed and length
    on the domain with its responses permuted — checked against that warm-up trained here, apart
    from the job, and plain forwards."""
    from ntk_jax.data.records import shuffle_responses
    from ntk_jax.models.lora import lora_filter
    from ntk_jax.models.subset import param_subset
    from ntk_jax.training.trainer import train
    from ntk_jax.selection.jobs import train_config

    cfg = _cfg(reference="shuffled")
    rep = run_selection(context, cfg, bench.domain, bench.pool, str(tmp_path / "job"), seed=0, plot=False)
    got = np.load(tmp_path / "job" / "all_scores.npz")
    pool = encode_records(context.tokenizer, bench.pool, 32)
    shuffled = encode_records(context.tokenizer, shuffle_responses(bench.domain, 0), 32, truncation="left")
    model_s = context.load_model(LoRAConfig.from_dict(cfg["lora"]), seed=0)
    wcfg = train_config(cfg["warmup"], seed=0)
    train(model_s, shuffled, train_config(wcfg.to_dict(), batch_size=min(wcfg.batch_size, len(bench.domain))),
          workdir=str(tmp_path / "oracle_warmup"))
    model_w = _job(context, cfg, bench, str(tmp_path / "job")).warm_up(cfg["lora"], cfg["warmup"])[0]  # resumes
    ls, lw = _nll(model_s, pool), _nll(model_w, pool)
    np.testing.assert_allclose(got["loss_reference"], ls, rtol=1e-4)
    np.testing.assert_allclose(got["scores"], ls - lw, rtol=1e-4, atol=2e-6 * np.abs(ls).max())
    assert "loss_base" not in got and rep["loss_change"]["reference"] == "shuffled"
    base = context.load_model(LoRAConfig.from_dict(cfg["lora"]), seed=0)
    assert np.abs(ls - _nll(base, pool)).max() > 1e-3  # the reference did move away from θ_0
    import jax
    leaves_s = jax.tree.leaves(param_subset(model_s, lora_filter()).params)
    leaves_w = jax.tree.leaves(param_subset(model_w, lora_filter()).params)
    assert leaves_s and not any(np.allclose(a, b) for a, b in zip(leaves_s, leaves_w))  # another warm-up
    with pytest.raises(ValueError, match="reference='shuffled' is not supported together"):
        run_selection(context, _cfg(reference="shuffled", cross_fit=True), bench.domain, bench.pool,
                      str(tmp_path / "bad"), seed=0, plot=False)
    with pytest.raises(ValueError, match="reference='nope' is not one of"):
        run_selection(context, _cfg(reference="nope"), bench.domain, bench.pool, str(tmp_path / "bad2"), seed=0,
                      plot=False)
