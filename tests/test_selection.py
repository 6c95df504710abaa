"""Selection core (docs/theory.md §6): ScoreStore resume, NTK-Selector scores vs the exact
Jacobian-free kernel, kNN votes vs brute force, the LESS preconditioner vs optax, bad
inputs, and a shrunken end-to-end comparison through the launcher."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ntk_jax.data.controlled import make_controlled_benchmark
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.selection.jobs import SELECTED_NAME, run_selection
from ntk_jax.selection.less import adam_preconditioner
from ntk_jax.selection.optimizer_state import find_adam_state
from ntk_jax.selection.ntk_selector import knn_votes, ntk_scalar_fn, top_by_votes
from ntk_jax.selection.store import ScoreStore, StopRequested, check_workdir_fingerprint, fill_store


# ------------------------------------------------------------------------ ScoreStore
def _scores_of(lo, hi):
    return np.sin(np.arange(lo, hi) * 1.7) * 3.0


def _fill(store, calls, stop_after=None):
    fill_store(store, _scores_of, desc="test", stop_after_shards=stop_after, on_shard=calls.append)


def test_store_resume_identical_and_no_recompute(tmp_path):
    ids = [f"c{i}" for i in range(23)]
    calls = []
    store = ScoreStore(tmp_path / "s", ids, 5, "fp")
    with pytest.raises(StopRequested):
        _fill(store, calls, stop_after=2)
    assert calls == [0, 1] and store.missing_shards() == [2, 3, 4] and not store.is_complete()
    with pytest.raises(ValueError, match="incomplete"):
        store.merge()
    mtimes = {k: os.stat(store.shard_path(k)).st_mtime_ns for k in (0, 1)}
    calls.clear()
    again = ScoreStore(tmp_path / "s", ids, 5, "fp")  # "restarted job"
    _fill(again, calls)
    assert calls == [2, 3, 4]
    assert {k: os.stat(again.shard_path(k)).st_mtime_ns for k in (0, 1)} == mtimes
    got_ids, got = again.merge()
    ref_store = ScoreStore(tmp_path / "ref", ids, 5, "fp")
    _fill(ref_store, [])
    assert got_ids == ids
    np.testing.assert_array_equal(got, ref_store.merge()[1])
    np.testing.assert_array_equal(got, _scores_of(0, 23))


def test_corrupt_shard_is_named_and_recomputed(tmp_path):
    from ntk_jax.selection.store import CorruptShardError

    ids = [f"c{i}" for i in range(12)]
    store = ScoreStore(tmp_path / "s", ids, 4, "fp")
    _fill(store, [])
    path = store.shard_path(1)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:  # truncated, as by an interrupted copy or a full disk
        f.write(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match=r"shard 1 of .*shard_00001\.npz.* is corrupt.*rerun the job"):
        store.merge()
    calls = []
    _fill(ScoreStore(tmp_path / "s", ids, 4, "fp"), calls)
    assert calls == [1]  # only the damaged shard is recomputed
    assert os.path.exists(path + ".corrupt")
    np.testing.assert_array_equal(store.merge()[1], _scores_of(0, 12))


def test_fill_store_features_seconds_and_processes(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    st = ScoreStore(tmp_path / "f", ids, 4, "fp")  # shards of 4, 4, 2

    def scored(lo, hi):
        return _scores_of(lo, hi), np.arange(lo, hi, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)

    assert fill_store(st, scored, desc="test", with_features=True, process_index=1, process_count=2) == 1
    assert st.missing_shards() == [0, 2]  # process 1 of 2 owns shard 1 only
    assert fill_store(st, scored, desc="test", with_features=True) == 2
    assert fill_store(st, scored, desc="test", with_features=True) == 0  # nothing left to do
    got_ids, scores, feats = st.merge(with_features=True)
    assert got_ids == ids and feats.shape == (10, 3)
    np.testing.assert_array_equal(feats[:, 0], np.arange(10))
    np.testing.assert_array_equal(scores, _scores_of(0, 10))
    assert 0 < st.compute_seconds() < 60


def test_workdir_fingerprint(tmp_path):
    d = str(tmp_path / "job")
    fp = check_workdir_fingerprint(d, {"a": (1, 2), "seed": 0}, "demo")
    assert check_workdir_fingerprint(d, {"seed": 0, "a": [1, 2]}, "demo") == fp  # same payload: resumes
    with pytest.raises(ValueError, match="different demo configuration"):
        check_workdir_fingerprint(d, {"a": (1, 3), "seed": 0}, "demo")


def test_store_fingerprint_and_inputs(tmp_path):
    ScoreStore(tmp_path, ["a", "b", "c"], 2, "fp1")
    with pytest.raises(ValueError, match="different job"):
        ScoreStore(tmp_path, ["a", "b", "c"], 2, "fp2")
    with pytest.raises(ValueError, match="different job"):
        ScoreStore(tmp_path, ["a", "b", "x"], 2, "fp1")
    with pytest.raises(ValueError, match="empty"):
        ScoreStore(tmp_path / "e", [], 2, "fp")
    with pytest.raises(ValueError, match="duplicate candidate id 'b'"):
        ScoreStore(tmp_path / "d", ["a", "b", "b"], 2, "fp")
    st = ScoreStore(tmp_path / "p", [str(i) for i in range(10)], 3, "fp")  # 4 shards
    parts = [st.shards_for_process(i, 3) for i in range(3)]
    assert parts == [[0, 3], [1], [2]]
    with pytest.raises(ValueError, match="shape"):
        st.write_shard(0, np.zeros(2))


# ------------------------------------------------------------------------ coarse filter
def test_knn_votes_match_brute_force():
    rng = np.random.default_rng(0)
    dom, cand = rng.normal(size=(7, 5)), rng.normal(size=(40, 5))
    k = 6
    votes, mean_cos = knn_votes(dom, cand, k, block=9)  # several blocks
    ref = np.zeros(40, int)
    cos = (dom / np.linalg.norm(dom, axis=1, keepdims=True)) @ (cand / np.linalg.norm(cand, axis=1, keepdims=True)).T
    for row in cos:
        ref[np.argsort(-row, kind="stable")[:k]] += 1
    np.testing.assert_array_equal(votes, ref)
    np.testing.assert_allclose(mean_cos, cos.mean(axis=0), atol=1e-12)
    top = top_by_votes(votes, mean_cos, 10)
    key = [(-votes[i], -mean_cos[i], i) for i in range(40)]
    np.testing.assert_array_equal(top, sorted(range(40), key=lambda i: key[i])[:10])


# ------------------------------------------------------------------------ NTK scores vs exact kernel
def _small_lora_model(seed=0):
    from ntk_jax.models.lora import LoRAConfig, apply_lora
    from ntk_jax.models.transformer import DecoderConfig, DecoderLM

    model = DecoderLM(DecoderConfig(vocab_size=30, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_position_embeddings=16), rngs=nnx.Rngs(seed))
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj"), b_init_std=0.05), rngs=nnx.Rngs(seed + 1))
    return model


def _random_batch(n, T=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 30, size=(n, T)).astype(np.int32)
    lengths = rng.integers(5, T + 1, size=n)
    att = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    loss = att.copy().astype(np.float32)
    loss[:, :3] = 0  # "prompt"
    return {"input_ids": ids, "attention_mask": att, "loss_mask": loss, "targets": np.roll(ids, -1, axis=1)}


def test_scores_match_jacobian_free_kernel():
    """The job's NTK scores (``methods.ntk.domain_direction``, then one JVP per candidate)
    against independent computations: the exact Jacobian-free kernel (no projection), and
    candidate features projected one by one (with the projection)."""
    from ntk_jax.data.encoding import lm_batch
    from ntk_jax.kernels.features import directional_derivatives, gradient_features
    from ntk_jax.kernels.ntk import jacobian_free_ntk
    from ntk_jax.kernels.outputs import lm_output_fn
    from ntk_jax.kernels.projection import RandomProjection
    from ntk_jax.models.subset import param_subset
    from ntk_jax.selection.methods.ntk import domain_direction
    from ntk_jax.stats import spearman

    model = _small_lora_model()
    subset = param_subset(model)
    dom, cand = _random_batch(6, seed=1), _random_batch(24, seed=2)
    both = {k: np.concatenate([dom[k], cand[k]]) for k in dom}
    K = np.asarray(jacobian_free_ntk(lm_output_fn(subset), subset.params, both))  # exact, (30, 30)
    exact = K[:6, 6:].mean(axis=0)
    fn = ntk_scalar_fn(subset)

    def job_scores(projection_dim):
        tangent = domain_direction(subset, fn, dom, normalize="none", projection_dim=projection_dim)
        return np.asarray(directional_derivatives(fn, subset.params, lm_batch(cand), tangent), np.float64)

    s_exact = job_scores(0)
    np.testing.assert_allclose(s_exact, exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())
    s_jvp = job_scores(8192)
    assert spearman(s_jvp, exact) > 0.95
    # Π Πᵀ ḡ along the JVP = <mean projected domain feature, projected candidate feature>
    proj = RandomProjection(8192, seed=0)
    phi_dom, phi_cand = (np.asarray(gradient_features(fn, subset.params, lm_batch(b), projection=proj), np.float64)
                         for b in (dom, cand))
    s_feat = phi_cand @ phi_dom.mean(axis=0)
    np.testing.assert_allclose(s_jvp, s_feat, rtol=1e-4, atol=1e-5 * np.abs(s_feat).max())


# ------------------------------------------------------------------------ LESS preconditioner
def test_less_preconditioner_matches_hand_computation():
    from ntk_jax.training.trainer import TrainConfig, make_optimizer

    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    opt = make_optimizer(TrainConfig(learning_rate=1e-2, warmup_steps=0, grad_clip=0.0))
    state = opt.init(params)
    for _ in range(3):  # a few real Adam steps so that mu, nu are non-trivial
        g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        upd, state = opt.update(g, state, params)
        params = optax.apply_updates(params, upd)
    adam = find_adam_state(state)
    g = {k: np.asarray(rng.normal(size=(5,) + v.shape), np.float32) for k, v in params.items()}  # 5 examples
    out = adam_preconditioner(adam.mu, adam.nu)(jax.tree.map(jnp.asarray, g))
    for k in params:
        mu, nu = np.asarray(adam.mu[k], np.float64), np.asarray(adam.nu[k], np.float64)
        m = 0.9 * mu[None] + 0.1 * g[k]
        v = 0.999 * nu[None] + 0.001 * g[k].astype(np.float64) ** 2
        np.testing.assert_allclose(np.asarray(out[k]), m / (np.sqrt(v) + 1e-8), rtol=2e-5)
    with pytest.raises(ValueError, match="Adam"):
        find_adam_state((optax.EmptyState(),))


# ------------------------------------------------------------------------ jobs
def _select_cfg(method, **kw):
    """The select section for ``method`` (``ntk``: the paper preset, which has every stage:
    warm-up, embedding store, kNN filter, score store)."""
    c = base_config().select
    c.method = method
    if method == "ntk":
        from ntk_jax.selection.methods import apply_overrides
        from ntk_jax.selection.methods.ntk import PAPER

        apply_overrides(c, PAPER)
    c.n_select = 8
    c.shard_size = 16
    c.projection_dim = 512
    c.feature_batch_size = 16
    c.warmup.total_steps = 4
    c.warmup.batch_size = 8
    c.knn_k = 8
    c.less.epochs = 2
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def small_bench():
    return make_controlled_benchmark(0, n_domain=8, n_test=8, n_pool_per_family=4)  # 52 pool records


@pytest.fixture(scope="module")
def tiny_context(tiny_model_dir):
    from ntk_jax.launcher.context import load_tokenizer
    from ntk_jax.launcher.context import Context

    return Context(model_dir=tiny_model_dir, tokenizer=load_tokenizer(tiny_model_dir), max_len=32, seed=0, info={})


def knn_oracle(context, cfg, domain, pool, out_dir):
    """kNN votes recomputed in plain numpy from the model's own forward, for the job in
    ``out_dir``: its warm-up model (resumed from the job's checkpoint), the mean over real tokens
    of ``model.hidden_states`` (float64), cosines, each domain record voting for its ``knn_k``
    most similar pool records (ties to the lower index). Returns ``(votes, mean_cos, rank)``,
    ``rank`` the pool best first (most votes, then mean cosine, then index). With
    ``cfg["knn_pooling"] == "response"`` the mean runs over the ``loss_mask`` positions."""
    from ntk_jax.data.records import encode_records
    from ntk_jax.selection.jobs import SelectionJob, plain

    cfg, k = plain(cfg), int(cfg["knn_k"])
    job = SelectionJob(context=context, cfg=cfg, domain=domain, pool=pool, out_dir=out_dir, seed=0,
                       domain_arrays=encode_records(context.tokenizer, domain, context.max_len))
    model, _ = job.warm_up(cfg["lora"], cfg["warmup"])

    def mean_hidden(recs):
        a = encode_records(context.tokenizer, recs, context.max_len)
        h = np.asarray(model.hidden_states(jnp.asarray(a["input_ids"]), jnp.asarray(a["attention_mask"])), np.float64)
        key = "loss_mask" if cfg.get("knn_pooling", "all") == "response" else "attention_mask"
        m = np.asarray(a[key], np.float64)[:, :, None]
        return (h * m).sum(axis=1) / m.sum(axis=1)

    d, c = mean_hidden(domain), mean_hidden(pool)
    cos = (d / np.linalg.norm(d, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    order = np.argsort(-cos, axis=1, kind="stable")
    gap = np.take_along_axis(cos, order[:, k - 1:k + 1], axis=1)
    assert np.all(gap[:, 0] - gap[:, 1] > 1e-5)  # no near-tie at the k-th neighbour: the votes are well defined
    votes = np.bincount(order[:, :k].ravel(), minlength=len(pool))
    mean_cos = cos.mean(axis=0)
    return votes, mean_cos, np.lexsort((np.arange(len(pool)), -mean_cos, -votes))


@pytest.mark.parametrize("method", ["ntk", "less"])
def test_job_resume_identical_scores(tmp_path, tiny_context, small_bench, method):
    cfg = _select_cfg(method)
    b = small_bench
    computed = []
    with pytest.raises(StopRequested):
        run_selection(tiny_context, cfg, b.domain, b.pool, str(tmp_path / "killed"), seed=0,
                      stop_after_shards=1, on_shard=computed.append)
    assert not os.path.exists(tmp_path / "killed" / SELECTED_NAME)
    first = list(computed)
    computed.clear()
    rep = run_selection(tiny_context, cfg, b.domain, b.pool, str(tmp_path / "killed"), seed=0, on_shard=computed.append)
    ref = run_selection(tiny_context, cfg, b.domain, b.pool, str(tmp_path / "ref"), seed=0)
    # the restart computed only the shards the killed run had not written
    store_dir = "embeddings" if method == "ntk" else "scores"
    n_shards = len([f for f in os.listdir(tmp_path / "killed" / store_dir) if f.startswith("shard_")])
    assert first == [0] and computed[:n_shards - 1] == list(range(1, n_shards))
    a = np.load(tmp_path / "killed" / "all_scores.npz")
    r = np.load(tmp_path / "ref" / "all_scores.npz")
    np.testing.assert_array_equal(a["scores"], r["scores"])
    assert rep["selected_ids"] == ref["selected_ids"]
    lines = [json.loads(x) for x in open(tmp_path / "killed" / SELECTED_NAME)]
    by_id = {p["id"]: p for p in b.pool}
    assert lines == [by_id[i] for i in rep["selected_ids"]]  # records unchanged
    if method == "ntk":  # length buckets (cfg.bucket_multiple) change only the padding
        assert cfg.bucket_multiple and min(len(tiny_context.tokenizer.encode(p["prompt"] + p["response"]))
                                           for p in b.pool) + 2 <= cfg.bucket_multiple  # some rows are narrower
        unb = run_selection(tiny_context, _select_cfg(method, bucket_multiple=0), b.domain, b.pool,
                            str(tmp_path / "unbucketed"), seed=0)
        u = np.load(tmp_path / "unbucketed" / "all_scores.npz")
        np.testing.assert_allclose(u["scores"], r["scores"], rtol=1e-4, atol=1e-5 * np.abs(r["scores"]).max())
        assert unb["selected_ids"] == ref["selected_ids"]
        # the kNN filter (select.ntk.filter="knn") keeps the top M = 4N by an independent kNN vote
        votes, mean_cos, rank = knn_oracle(tiny_context, cfg, b.domain, b.pool, str(tmp_path / "ref"))
        kept = np.sort(rank[:4 * 8])
        assert cfg.ntk.filter == "knn" and ref["n_filtered"] == len(kept) == 32
        assert list(r["ids"]) == [b.pool[i]["id"] for i in kept]
        np.testing.assert_array_equal(r["votes"], votes[kept])
        np.testing.assert_allclose(r["mean_cos"], mean_cos[kept], rtol=1e-4, atol=1e-5)
        assert set(ref["selected_ids"]) <= {b.pool[i]["id"] for i in kept}


def test_job_bad_inputs(tmp_path, tiny_context, small_bench):
    b = small_bench
    cfg = _select_cfg("random")
    with pytest.raises(ValueError, match="pool is empty"):
        run_selection(tiny_context, cfg, b.domain, [], str(tmp_path / "a"), seed=0)
    with pytest.raises(ValueError, match="larger than the pool"):
        run_selection(tiny_context, _select_cfg("random", n_select=1000), b.domain, b.pool, str(tmp_path / "b"), seed=0)
    for bad in (0, 0.0, 1.5, -3, "5", True):
        with pytest.raises(ValueError, match="select.n_select must be a positive integer or a fraction"):
            run_selection(tiny_context, _select_cfg("random", n_select=bad), b.domain, b.pool, str(tmp_path / "b"),
                          seed=0)
    dup = b.pool[:10] + [dict(b.pool[0])]
    with pytest.raises(ValueError, match="duplicate id"):
        run_selection(tiny_context, cfg, b.domain, dup, str(tmp_path / "c"), seed=0)
    bad_domain = [{"id": "z", "prompt": "abc" * 20, "response": "neg"}]  # truncated away → no loss token
    with pytest.raises(ValueError, match="z"):
        run_selection(tiny_context, cfg, bad_domain, b.pool, str(tmp_path / "d"), seed=0)
    with pytest.raises(ValueError, match="needs jax.distributed"):  # one process posing as 1 of 2
        run_selection(tiny_context, cfg, b.domain, b.pool, str(tmp_path / "f"), seed=0, process_index=1,
                      process_count=2)
    with pytest.raises(ValueError, match="out of range"):
        run_selection(tiny_context, cfg, b.domain, b.pool, str(tmp_path / "f"), seed=0, process_index=2,
                      process_count=2)
    for d in "abcdf":
        assert not os.path.exists(tmp_path / d / SELECTED_NAME)
    # a stale selected.jsonl from an earlier run never survives a failing run
    os.makedirs(tmp_path / "e")
    (tmp_path / "e" / SELECTED_NAME).write_text("{}\n")
    with pytest.raises(StopRequested):
        run_selection(tiny_context, _select_cfg("ntk"), b.domain, b.pool, str(tmp_path / "e"), seed=0,
                      stop_after_shards=0)
    assert not os.path.exists(tmp_path / "e" / SELECTED_NAME)


def test_n_select_as_a_fraction_of_the_pool(tmp_path, tiny_context, small_bench):
    from ntk_jax.selection.jobs import resolve_n_select

    assert [resolve_n_select(v, 52) for v in (1, 8, 8.0, np.int64(3), 0.1, 0.05, 0.001, 0.99)] == [1, 8, 8, 3, 5, 3, 1, 51]
    rep = run_selection(tiny_context, _select_cfg("random", n_select=0.1), small_bench.domain, small_bench.pool,
                        str(tmp_path / "f"), seed=0)
    assert rep["counts"]["selected"] == len(rep["selected_ids"]) == 5 and rep["config"]["n_select"] == 5
    with open(tmp_path / "f" / SELECTED_NAME) as fh:
        assert len(fh.readlines()) == 5


def test_malformed_jsonl_names_line(tmp_path):
    from ntk_jax.selection.jobs import load_selection_data

    (tmp_path / "dom.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "pool.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    cfg = _select_cfg("random", domain_path=str(tmp_path / "dom.jsonl"), pool_path=str(tmp_path / "pool.jsonl"))
    with pytest.raises(ValueError, match=r"pool.jsonl.*2"):
        load_selection_data(cfg, str(tmp_path / "data"), 0)
    bench_cfg = _select_cfg("random")
    bench_cfg.benchmark.update(n_domain=4, n_test=8, n_pool_per_family=2)
    load_selection_data(bench_cfg, str(tmp_path / "bench"), 0)
    bench_cfg.benchmark.variant = "no_conflict"
    with pytest.raises(ValueError, match="no_conflict"):  # an existing benchmark of another variant
        load_selection_data(bench_cfg, str(tmp_path / "bench"), 0)
    assert len(load_selection_data(bench_cfg, str(tmp_path / "bench_nc"), 0)["pool"]) == 22


@pytest.mark.slow
def test_select_compare_end_to_end(tmp_path, tiny_model_dir):
    from ntk_jax.launcher.run import run

    c = base_config()
    c.experiments = ["select_compare"]
    c.model.path = tiny_model_dir
    c.select.benchmark.n_domain = 16
    c.select.benchmark.n_test = 32
    c.select.benchmark.n_pool_per_family = 16  # 208 candidates, 32 useful
    c.select.n_select = 16
    c.select.projection_dim = 1024
    c.select.warmup.total_steps = 20
    c.select.less.epochs = 2
    c.select_compare.seeds = [0]
    c.select_compare.methods = ["random", "ntk@paper"]
    c.select_compare.finetune.total_steps = 10
    report = run(c, str(tmp_path))["select_compare"]
    out = tmp_path / "select_compare"
    for name in ("table.json", "table.md", "comparison.png", "results.json", "report.json"):
        assert (out / name).exists(), name
    for m in ("random", "ntk@paper"):
        assert (out / "seed_0" / m / SELECTED_NAME).exists()
        assert (out / "seed_0" / m / "report.json").exists()
    t = report["table"]
    assert set(t) == {"domain_only", "oracle_useful", "oracle_conflicting", "random", "ntk@paper"}
    for role in ("useful", "conflicting"):
        entry = report["results"][f"0/oracle_{role}"]
        assert entry["n_added"] == 16 and t[f"oracle_{role}"]["precision_at_n"] is None
    # NTK-Selector's features (sum-of-logits gradients) do not see the labels, so it cannot
    # tell the useful families from the conflicting ones that share their inputs (see the
    # selection report); it still enriches sentiment-style (useful) items over the base rate.
    assert t["ntk@paper"]["precision_at_n"] > t["ntk@paper"]["base_rate"], t
    assert t["random"]["precision_at_n"] < 0.5


def test_select_compare_refuses_a_cached_arm_whose_settings_changed(tmp_path):
    """A (seed, arm) result is reused only under the settings it was computed with: the
    fingerprint follows the arm's preset and the fine-tune settings, not the other arms'."""
    from experiments.select_compare import _check_cached, arm_fingerprint
    from ntk_jax.selection.jobs import plain

    c = base_config()
    sel, cc = plain(c.select), plain(c.select_compare)
    fp = arm_fingerprint(sel, cc, "ntk@paper")
    assert fp == arm_fingerprint(sel, cc, "ntk@paper") and fp != arm_fingerprint(sel, cc, "ntk")
    changed = dict(sel, ntk=dict(sel["ntk"]))
    changed["ntk"]["point"] = "base"  # overridden by the paper's preset: still the same arm
    assert arm_fingerprint(changed, cc, "ntk@paper") == fp
    assert arm_fingerprint(changed, cc, "domain_only") == arm_fingerprint(sel, cc, "domain_only")
    changed["warmup"] = dict(sel["warmup"], total_steps=7)  # the paper's warm-up changes: a new arm
    assert arm_fingerprint(changed, cc, "ntk@paper") != fp
    other_ft = dict(cc, finetune=dict(cc["finetune"], total_steps=3))
    assert arm_fingerprint(sel, other_ft, "domain_only") != arm_fingerprint(sel, cc, "domain_only")
    results = {"0/ntk@paper": {"seed": 0, "arm": "ntk@paper"}}  # written before fingerprints: adopted
    assert _check_cached(results, "0/ntk@paper", fp, str(tmp_path)) and results["0/ntk@paper"]["config_fingerprint"] == fp
    assert not _check_cached(results, "0/random", fp, str(tmp_path))
    with pytest.raises(ValueError, match=r"arm 'ntk@paper' \(seed 0\).*other settings.*delete"):
        _check_cached(results, "0/ntk@paper", arm_fingerprint(changed, cc, "ntk@paper"), str(tmp_path))
