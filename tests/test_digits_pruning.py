"""lpNTK pruning on the scikit-learn digits (docs/theory.md §6.3): the split, the LeNet-like CNN,
its lpNTK against neural-tangents and brute-force Jacobians, EL2N / GraNd against hand
computations, the table's statistics, and the job end to end with its resume."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.prune_lpntk import baseline_of, image_logits, summarise
from ntk_jax.data.digits import digits_splits, split_counts
from ntk_jax.kernels import nt_compat
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.launcher.run import run
from ntk_jax.models.cnn import LeNet, LeNetConfig, num_params
from ntk_jax.models.subset import param_subset
from ntk_jax.selection.lpntk import lpntk_features, lpntk_kernel
from ntk_jax.selection.pruning_scores import average_runs, el2n_scores, grand_scores, keep_highest


def fake_digits(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 16, size=(n, 8, 8)), np.arange(n) % 10


# --------------------------------------------------------------------------- the data
def test_split_counts_are_stratified_and_sum():
    np.testing.assert_array_equal(split_counts(np.array([10, 10, 5]), 5), [2, 2, 1])
    c = split_counts(np.array([178, 182, 177]), 100)
    assert c.sum() == 100 and np.all(np.abs(c - np.array([178, 182, 177]) * 100 / 537) < 1)
    with pytest.raises(ValueError, match="cannot take"):
        split_counts(np.array([3]), 4)


def test_splits_are_deterministic_disjoint_stratified_and_train_scaled():
    images, labels = fake_digits(100)
    a = digits_splits(20, 30, seed=3, images=images, labels=labels)
    b = digits_splits(20, 30, seed=3, images=images, labels=labels)
    c = digits_splits(20, 30, seed=4, images=images, labels=labels)
    for k in ("train", "val", "test"):
        for f in ("image", "label", "index"):
            np.testing.assert_array_equal(a[k][f], b[k][f])
    assert not np.array_equal(a["val"]["index"], c["val"]["index"])
    idx = [a[k]["index"] for k in ("train", "val", "test")]
    assert sorted(np.concatenate(idx).tolist()) == list(range(100))
    assert [len(i) for i in idx] == [50, 20, 30]
    assert np.all(np.bincount(a["val"]["label"], minlength=10) == 2)
    assert np.all(np.bincount(a["test"]["label"], minlength=10) == 3)
    np.testing.assert_array_equal(a["train"]["label"], labels[a["train"]["index"]])
    # scaled with train statistics only: train is centred per pixel with unit overall std
    assert a["train"]["image"].shape == (50, 8, 8, 1) and a["train"]["image"].dtype == np.float32
    np.testing.assert_allclose(a["train"]["image"].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(a["train"]["image"].std(), 1.0, rtol=1e-4)
    raw = images[a["val"]["index"]] / 16.0
    expect = (raw - a["scaling"]["mean"]) / a["scaling"]["std"]
    np.testing.assert_allclose(a["val"]["image"][..., 0], expect, rtol=1e-5, atol=1e-5)
    sub = digits_splits(20, 30, seed=3, n_train=20, images=images, labels=labels)
    assert len(sub["train"]["label"]) == 20 and np.all(np.bincount(sub["train"]["label"]) == 2)
    assert set(sub["train"]["index"]) <= set(a["train"]["index"])
    np.testing.assert_array_equal(sub["val"]["index"], a["val"]["index"])
    with pytest.raises(ValueError, match="leave training data"):
        digits_splits(50, 50, images=images, labels=labels)


def test_real_digits_split():
    pytest.importorskip("sklearn")
    s = digits_splits(300, 500, seed=0)
    assert [len(s[k]["label"]) for k in ("train", "val", "test")] == [997, 300, 500]
    assert set(np.unique(s["test"]["label"])) == set(range(10))


# --------------------------------------------------------------------------- the CNN and its lpNTK
def test_lenet_shapes_and_parameter_count():
    cfg = LeNetConfig(channels=(2, 3), hidden=5, num_classes=10)
    model = LeNet(cfg, rngs=nnx.Rngs(0))
    # conv1 3·3·1·2+2, conv2 3·3·2·3+3, dense (2·2·3)·5+5, head 5·10+10
    assert num_params(model) == 20 + 57 + 65 + 60
    assert model(jnp.zeros((4, 8, 8, 1))).shape == (4, 10)
    with pytest.raises(ValueError, match="expected images"):
        model(jnp.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match="divisible by 4"):
        LeNetConfig(image_shape=(6, 6, 1))


def _cnn_problem(n=12, K=10):
    model = LeNet(LeNetConfig(channels=(3, 4), hidden=8, num_classes=K), rngs=nnx.Rngs(1))
    sub = param_subset(model, nnx.Param)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(K, size=n).astype(np.int32)}
    return sub, sub.apply_fn(image_logits), batch


@pytest.mark.parametrize("kernel", ["lpntk", "sum_logits"])
def test_cnn_lpntk_matches_bruteforce_jacobians(kernel):
    sub, logits_fn, batch = _cnn_problem()
    n, K = len(batch["label"]), 10
    feats = lpntk_features(logits_fn, sub.params, batch, num_classes=K, batch_size=5, kernel=kernel)
    assert feats.shape == (n, num_params_of(sub.params))
    jac = jax.jacrev(lambda p: logits_fn(p, batch))(sub.params)  # leaves (n, K, ...)
    J = np.concatenate([np.asarray(l, np.float64).reshape(n, K, -1) for l in jax.tree.leaves(jac)], axis=2)
    s = np.ones((n, K)) if kernel == "sum_logits" else 2.0 * np.eye(K)[batch["label"]] - 1.0
    brute = np.einsum("na,nap->np", s, J)
    np.testing.assert_allclose(feats, brute, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lpntk_kernel(feats, K), brute @ brute.T / K, rtol=1e-4, atol=1e-4)


def num_params_of(params):
    return sum(int(np.size(l)) for l in jax.tree.leaves(params))


def test_cnn_lpntk_matches_neural_tangents():
    if not nt_compat.available():
        pytest.skip("neural-tangents is not installed")
    sub, logits_fn, batch = _cnn_problem(n=8)
    K = 10
    feats = lpntk_features(logits_fn, sub.params, batch, num_classes=K)
    # the full eNTK Θ (n, n, K, K) from neural-tangents, contracted with the label signs
    f = lambda p, x: logits_fn(p, {"image": x})  # noqa: E731
    theta = np.asarray(nt_compat.empirical_ntk_fn(f, trace_axes=())(batch["image"], None, sub.params), np.float64)
    s = 2.0 * np.eye(K)[batch["label"]] - 1.0
    expected = np.einsum("ia,jb,ijab->ij", s, s, theta) / K
    np.testing.assert_allclose(lpntk_kernel(feats, K), expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- EL2N and GraNd
def linear_logits(params, batch):
    return batch["x"] @ params["W"] + params["b"]


def test_el2n_and_grand_match_hand_computation():
    rng = np.random.default_rng(2)
    n, d, K = 9, 4, 3
    params = {"W": jnp.asarray(rng.normal(size=(d, K)), jnp.float32), "b": jnp.asarray(rng.normal(size=K), jnp.float32)}
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(K, size=n).astype(np.int32)
    batch = {"x": x, "label": y}
    z = x.astype(np.float64) @ np.asarray(params["W"], np.float64) + np.asarray(params["b"], np.float64)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    err = p - np.eye(K)[y]
    np.testing.assert_allclose(el2n_scores(linear_logits, params, batch, batch_size=4),
                               np.linalg.norm(err, axis=1), rtol=1e-5)
    # ∂CE/∂W = x (p − e_y)ᵀ, ∂CE/∂b = p − e_y: ‖∇‖² = (‖x‖² + 1) ‖p − e_y‖²
    hand = np.sqrt((np.sum(x.astype(np.float64) ** 2, axis=1) + 1.0) * np.sum(err ** 2, axis=1))
    np.testing.assert_allclose(grand_scores(linear_logits, params, batch, batch_size=4), hand, rtol=1e-4)
    with pytest.raises(KeyError, match="label"):
        el2n_scores(linear_logits, params, {"x": x})


def test_keep_highest_and_average_runs():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.3, 0.8, 0.0])
    np.testing.assert_array_equal(keep_highest(scores, labels, {0: 2, 1: 2}), [1, 2, 3, 5])
    np.testing.assert_array_equal(keep_highest(scores, labels, {0: 0, 1: 1}), [5])
    with pytest.raises(ValueError, match="cannot keep"):
        keep_highest(scores, labels, {0: 4})
    np.testing.assert_allclose(average_runs([np.array([1.0, 2.0]), np.array([3.0, 6.0])]), [2.0, 4.0])
    with pytest.raises(ValueError, match="non-finite"):
        average_runs([np.array([np.nan])])


# --------------------------------------------------------------------------- the table
def test_summarise_pairs_seeds_with_the_count_matched_baseline():
    assert baseline_of("centres") == "random" and baseline_of("el2n") == "random"
    assert baseline_of("drop_largest_half") == "random_drop_half_count"
    assert baseline_of("sum_logits-drop_largest_half") == "sum_logits-random_drop_half_count"
    assert baseline_of("random") is None and baseline_of("full") is None
    res = lambda acc: {"test_acc": acc, "val_acc": 0.5, "n_train": 8, "n_flipped_kept": 0}  # noqa: E731
    done = {}
    for seed, (r, good, bad) in enumerate([(0.80, 0.85, 0.70), (0.90, 0.93, 0.80), (0.70, 0.76, 0.60)]):
        done[f"random/0.5/{seed}"] = res(r)
        done[f"centres/0.5/{seed}"] = res(good)  # always above random by 0.03-0.06 (paired)
        done[f"el2n/0.5/{seed}"] = res(bad)      # always below
    rows = {r["mode"]: r for r in summarise(done, 16)}
    np.testing.assert_allclose(rows["centres"]["test_acc_mean"], np.mean([0.85, 0.93, 0.76]))
    np.testing.assert_allclose(rows["centres"]["vs_random"]["value"], np.mean([0.05, 0.03, 0.06]))
    assert rows["centres"]["vs_random"]["verdict"] == "beats"
    assert rows["el2n"]["vs_random"]["verdict"] == "worse"
    assert "vs_random" not in rows["random"] and rows["random"]["kept_fraction"] == 0.5
    # unpaired, the same accuracies would overlap: the pairing by seed matters
    ci = rows["centres"]["test_acc_ci95"]
    assert ci["low"] < rows["random"]["test_acc_mean"] < ci["high"]


# --------------------------------------------------------------------------- the job
def small_digits_config(model_dir):
    c = base_config()
    c.experiments = ["prune_lpntk"]
    c.model.path = model_dir  # the launcher's context; the digits job does not use the model
    p = c.prune_lpntk
    p.dataset = "digits"
    p.n_train, p.n_val, p.n_test = 40, 20, 20
    p.label_noise = 0.0
    p.digits.cnn.channels = (4, 8)
    p.digits.cnn.hidden = 16
    for section in (p.reference_train, p.retrain):
        section.total_steps, section.batch_size, section.learning_rate = 12, 10, 1e-2
    p.eval_every = 4
    p.keep_ratios = [0.5]
    p.seeds = [0]
    p.modes = ["centres", "drop_largest_half"]
    p.kernels = ["lpntk", "sum_logits", "lpntk_cosine"]
    p.baselines = ["random", "el2n", "grand"]
    p.score_runs, p.score_steps = 2, 3
    p.feature_batch_size = 16
    p.shard_size = 16           # 3 feature shards: the resume below drops one
    return c


@pytest.fixture(scope="module")
def digits_job(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("sklearn")
    c = small_digits_config(tiny_model_dir)
    workdir = str(tmp_path_factory.mktemp("prune_digits") / "run")
    return c, workdir, run(c, workdir)["prune_lpntk"]


def test_digits_job_end_to_end(digits_job):
    c, workdir, rep = digits_job
    rows = {r["mode"]: r for r in rep["table"]}
    assert set(rows) == {"full", "centres", "drop_largest_half", "random_drop_half_count", "sum_logits-centres",
                         "sum_logits-drop_largest_half", "sum_logits-random_drop_half_count", "random", "el2n",
                         "grand", "lpntk_cosine-centres", "lpntk_cosine-drop_largest_half",
                         "lpntk_cosine-random_drop_half_count"}
    assert rows["full"]["n_train"] == [40]
    for m in ("centres", "sum_logits-centres", "lpntk_cosine-centres", "random", "el2n", "grand"):
        assert rows[m]["n_train"] == [20], m
    assert rows["drop_largest_half"]["n_train"] == rows["random_drop_half_count"]["n_train"]
    assert rep["setup"]["n_params"] == 9 * 4 + 4 + 9 * 4 * 8 + 8 + 32 * 16 + 16 + 16 * 10 + 10
    assert rep["reference"]["step"] % 4 == 0 and 0.0 <= rep["reference"]["val_acc"] <= 1.0
    assert set(rep["kernel"]) == {"lpntk", "sum_logits", "lpntk_cosine"}
    # the cosine kernel reuses the lpNTK features: no store of its own
    assert sorted(os.path.basename(d) for d in glob.glob(os.path.join(workdir, "prune_lpntk", "features*"))) == [
        "features", "features_sum_logits"]
    out = os.path.join(workdir, "prune_lpntk")
    table = open(os.path.join(out, "table.md")).read()
    assert "| centres − random |" in table and "| grand |" in table
    assert os.path.exists(os.path.join(out, "prune_lpntk.png"))
    assert len(glob.glob(os.path.join(out, "retrains", "*.json"))) == 13


def test_digits_job_resumes_exactly(digits_job):
    c, workdir, rep = digits_job
    out = os.path.join(workdir, "prune_lpntk")
    os.remove(os.path.join(out, "report.json"))
    shards = sorted(glob.glob(os.path.join(out, "retrains", "*.json")))
    victim = os.path.join(out, "retrains", "el2n_0.5_0.json")
    dropped = json.load(open(victim))
    os.remove(victim)                                   # a retrain killed before its shard was written
    os.remove(os.path.join(out, "scores", "run_1.npz"))  # a score run killed
    with np.load(os.path.join(out, "scores", "run_0.npz")) as z:
        kept_scores = {k: z[k] for k in z.files}
    features = sorted(glob.glob(os.path.join(out, "features", "shard_*.npz")))
    assert len(features) == 3
    os.remove(features[2])                              # a feature shard killed
    stamps = {p: os.path.getmtime(p) for p in shards + features[:2] if p != victim}
    rep2 = run(c, workdir)["prune_lpntk"]
    assert {p: os.path.getmtime(p) for p in stamps} == stamps  # nothing finished is recomputed
    redo = json.load(open(victim))
    assert (redo["test_acc"], redo["step"], redo["val_acc"]) == (dropped["test_acc"], dropped["step"],
                                                                 dropped["val_acc"])
    assert rep2["kernel"] == rep["kernel"] and rep2["kept_scores"] == rep["kept_scores"]
    with np.load(os.path.join(out, "scores", "run_0.npz")) as z:
        assert all(np.array_equal(z[k], v) for k, v in kept_scores.items())
    assert rep2["table"] == rep["table"]
    os.remove(os.path.join(out, "report.json"))
    c2 = small_digits_config(c.model.path)
    c2.prune_lpntk.n_val = 30
    with pytest.raises(ValueError, match="different prune_lpntk configuration"):
        run(c2, workdir)
