"""lpNTK (docs/theory.md §6.3): features and kernel against closed forms and brute force, farthest-point
clustering against an independent implementation of the docs/theory.md §6.3 rules, pruning counts, the
interchangeable / contradictory behaviour on a trained classifier, and the job end to end."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.prune_lpntk import class_logits, classification_data, reference, text_problem
from ntk_jax.data.synthetic import generate_task
from ntk_jax.kernels.ntk import jacobian_free_ntk
from ntk_jax.kernels.projection import RandomProjection
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.launcher.context import Context, load_tokenizer
from ntk_jax.launcher.run import run
from ntk_jax.selection.lpntk import (class_clusters, cluster_counts, cosine_kernel, farthest_point_clustering,
                                     lpntk_features, lpntk_kernel, prune_clusters, random_prune, sign_vectors)


def linear_logits(params, batch):
    return batch["x"] @ params["W"].T + params["b"]


def test_linear_classifier_closed_form():
    # logits z = W x + b (W: K×d). ∂(s·z)/∂W = s xᵀ, ∂/∂b = s, so
    # lpNTK(i, j) = (s_i·s_j)(x_i·x_j + 1) / K.
    rng = np.random.default_rng(0)
    K, d, n = 4, 5, 7
    params = {"W": jnp.asarray(rng.normal(size=(K, d)), jnp.float32), "b": jnp.zeros(K, jnp.float32)}
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(K, size=n).astype(np.int32)
    batch = {"x": x, "label": y}
    feats = lpntk_features(linear_logits, params, batch, num_classes=K, batch_size=3)
    s = np.where(np.eye(K)[y] > 0, 1.0, -1.0)
    # features in jax.tree.leaves order ("W" < "b"): W (K·d,) flattened row-major, then b (K,)
    expected = np.concatenate([(s[:, :, None] * x[:, None, :]).reshape(n, -1), s], axis=1)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    kernel = lpntk_kernel(feats, K)
    np.testing.assert_allclose(kernel, (s @ s.T) * (x @ x.T + 1.0) / K, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sign_vectors(jnp.asarray(y), K)), s)


def test_sum_of_logits_kernel_closed_form():
    # all signs +1: φ = ∂(Σ_a z_a)/∂(W, b) = (1 xᵀ, 1), kernel K(x_i·x_j + 1) / K whatever the labels
    rng = np.random.default_rng(3)
    K, d, n = 3, 4, 6
    params = {"W": jnp.asarray(rng.normal(size=(K, d)), jnp.float32), "b": jnp.zeros(K, jnp.float32)}
    x = rng.normal(size=(n, d)).astype(np.float32)
    batch = {"x": x, "label": rng.integers(K, size=n).astype(np.int32)}
    feats = lpntk_features(linear_logits, params, batch, num_classes=K, kernel="sum_logits")
    np.testing.assert_allclose(lpntk_kernel(feats, K), x @ x.T + 1.0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown kernel"):
        lpntk_features(linear_logits, params, batch, num_classes=K, kernel="nope")


def test_cosine_kernel():
    rng = np.random.default_rng(4)
    F = rng.normal(size=(5, 3)) * rng.uniform(0.1, 10.0, size=(5, 1))  # rows of very different norms
    C = cosine_kernel(F @ F.T)
    unit = F / np.linalg.norm(F, axis=1, keepdims=True)
    np.testing.assert_allclose(C, unit @ unit.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.diag(C), 1.0)
    with pytest.raises(ValueError, match="non-positive diagonal"):
        cosine_kernel(np.zeros((2, 2)))


def mlp_logits(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return h @ params["w2"]


def test_mlp_matches_bruteforce_jacrev_and_projection():
    rng = np.random.default_rng(1)
    K, d, hdim, n = 3, 4, 6, 5
    params = {"w1": jnp.asarray(rng.normal(size=(d, hdim)), jnp.float32),
              "b1": jnp.asarray(rng.normal(size=hdim), jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(hdim, K)), jnp.float32)}
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(K, size=n).astype(np.int32)
    feats = lpntk_features(mlp_logits, params, {"x": x, "label": y}, num_classes=K)
    # brute force: full Jacobian of each example's K logits, then Σ_a s_a J_a
    brute = []
    for i in range(n):
        jac = jax.jacrev(lambda p: mlp_logits(p, {"x": x[i:i + 1]})[0])(params)  # leaves (K, ...)
        jflat = np.concatenate([np.asarray(leaf).reshape(K, -1) for leaf in jax.tree.leaves(jac)], axis=1)
        s = -np.ones(K)
        s[y[i]] = 1.0
        brute.append(s @ jflat)
    brute = np.stack(brute)
    np.testing.assert_allclose(feats, brute, rtol=1e-4, atol=1e-5)
    K_exact = lpntk_kernel(feats, K)
    brute_kernel = np.array([[brute[i] @ brute[j] / K for j in range(n)] for i in range(n)])
    np.testing.assert_allclose(K_exact, brute_kernel, rtol=1e-4, atol=1e-4)
    # a JL projection preserves it approximately
    proj = lpntk_features(mlp_logits, params, {"x": x, "label": y}, num_classes=K,
                          projection=RandomProjection(4096, seed=0))
    K_proj = lpntk_kernel(proj, K)
    assert np.abs(K_proj - K_exact).max() < 0.15 * np.abs(K_exact).max()


def test_all_positive_signs_is_sum_of_logits_pntk():
    # For logits z̃ = s(y) ⊙ z, Σ_a s_a(y) z̃_a = Σ_a z_a: the lpNTK of z̃ is the all-+1 lpNTK of
    # z, which must be (1/K) × the sum-of-logits pNTK (jacobian_free_ntk) of z.
    rng = np.random.default_rng(2)
    K, d, hdim, n = 3, 4, 5, 6
    params = {"w1": jnp.asarray(rng.normal(size=(d, hdim)), jnp.float32),
              "b1": jnp.asarray(rng.normal(size=hdim), jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(hdim, K)), jnp.float32)}
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(K, size=n).astype(np.int32)

    def signed_logits(p, batch):
        return mlp_logits(p, batch) * sign_vectors(batch["label"], K)

    feats = lpntk_features(signed_logits, params, {"x": x, "label": y}, num_classes=K)
    pntk = jacobian_free_ntk(mlp_logits, params, {"x": x})
    np.testing.assert_allclose(lpntk_kernel(feats, K), pntk / K, rtol=1e-4, atol=1e-4)


def test_label_validation():
    params = {"W": jnp.ones((2, 3)), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        lpntk_features(linear_logits, params, {"x": np.ones((2, 3), np.float32), "label": np.array([0, 2])},
                       num_classes=2)
    with pytest.raises(KeyError, match="label"):
        lpntk_features(linear_logits, params, {"x": np.ones((2, 3), np.float32)}, num_classes=2)


# --------------------------------------------------------------------------- clustering
def reference_fpc(S, k):
    """Independent, loop-by-loop implementation of the docs/theory.md §6.3 rules."""
    n = len(S)
    best, first = -np.inf, None
    for i in range(n):
        for j in range(n):
            if i != j and S[i][j] > best:
                best, first = S[i][j], min(i, j)
    centres = [first]
    owner = {i: first for i in range(n)}
    while len(centres) < k:
        cands = [i for i in range(n) if i not in centres]
        new = min(cands, key=lambda i: (S[i][owner[i]], i))
        centres.append(new)
        owner[new] = new
        for i in range(n):
            if i not in centres and S[i][new] > S[i][owner[i]]:
                owner[i] = new
    return centres, [centres.index(owner[i]) for i in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_fpc_matches_reference_and_invariants(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 25))
    A = rng.normal(size=(n, 3))
    S = A @ A.T
    for k in sorted({1, max(1, n // 3), n // 2 or 1, n}):
        centres, assign = farthest_point_clustering(S, k)
        ref_c, ref_a = reference_fpc(S, k)
        assert centres.tolist() == ref_c and assign.tolist() == ref_a
        assert len(set(centres.tolist())) == k and set(assign.tolist()) == set(range(k))
        for j, c in enumerate(centres):
            assert assign[c] == j  # each centre in its own cluster
        for i in set(range(n)) - set(centres.tolist()):
            assert S[i, centres[assign[i]]] >= S[i, centres].max() - 1e-12


def test_fpc_hand_made():
    # two tight groups {0,1,2} and {3,4}, plus an outlier 5 (dissimilar to everyone)
    S = np.array([[5, 4, 4, 0, 0, -1],
                  [4, 5, 4.5, 0, 0, -1],
                  [4, 4.5, 5, 0, 0, -1],
                  [0, 0, 0, 5, 3, -1],
                  [0, 0, 0, 3, 5, -1],
                  [-1, -1, -1, -1, -1, 1]], float)
    centres, assign = farthest_point_clustering(S, 3)
    assert centres[0] == 1            # most similar pair (1, 2): the smaller index
    assert centres[1] == 5            # least similar to its centre: the outlier
    assert centres[2] == 3            # then the first of the other group
    assert assign.tolist() == [0, 0, 0, 2, 2, 1]
    with pytest.raises(ValueError, match="k must be"):
        farthest_point_clustering(S, 7)
    with pytest.raises(ValueError, match="square"):
        farthest_point_clustering(S[:3], 2)


def test_pruning_counts_and_determinism():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [10, 7, 13])
    A = rng.normal(size=(30, 4))
    kernel = A @ A.T
    cl = class_clusters(kernel, labels, 0.4)
    k = cluster_counts({0: 10, 1: 7, 2: 13}, 0.4)
    assert k == {0: 4, 1: 2, 2: 5}
    centres = prune_clusters(cl, "centres", 0)
    assert len(centres) == 11 and all(np.sum(labels[centres] == c) == k[c] for c in k)
    member = prune_clusters(cl, "random_member", 3)
    for c, v in cl.items():  # exactly one per cluster
        kept_c = np.intersect1d(member, v["members"])
        pos = np.searchsorted(v["members"], kept_c)
        assert sorted(v["assignment"][pos].tolist()) == list(range(k[c]))
    half = prune_clusters(cl, "drop_largest_half", 1)
    expected = 30 - sum(np.bincount(v["assignment"]).max() // 2 for v in cl.values())
    assert len(half) == expected
    rand = random_prune(labels, k, 5)
    assert len(rand) == 11 and all(np.sum(labels[rand] == c) == k[c] for c in k)
    np.testing.assert_array_equal(rand, random_prune(labels, k, 5))
    np.testing.assert_array_equal(half, prune_clusters(cl, "drop_largest_half", 1))
    with pytest.raises(ValueError, match="mode"):
        prune_clusters(cl, "nope", 0)
    with pytest.raises(ValueError, match="keep_ratio"):
        class_clusters(kernel, labels, 0.0)


# --------------------------------------------------------------------------- the job, trained classifier
def small_job_config(model_dir):
    c = base_config()
    c.experiments = ["prune_lpntk"]
    c.model.path = model_dir
    p = c.prune_lpntk
    p.task = "sentiment_flipped"
    p.n_train, p.n_val, p.n_test = 48, 32, 32
    p.label_noise = 0.1
    p.lora.rank = 4
    p.reference_train.total_steps = 30
    p.reference_train.learning_rate = 5e-3
    p.reference_train.batch_size = 16
    p.reference_train.checkpoint_every = 0
    p.retrain.total_steps = 10
    p.retrain.batch_size = 16
    p.eval_every = 5
    p.keep_ratios = [0.5]
    p.seeds = [0]
    p.feature_batch_size = 16
    p.shard_size = 16           # 3 feature shards: the resume below drops one
    return c


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory):
    """The shrunken job run once through the launcher: (config, workdir, report)."""
    c = small_job_config(tiny_model_dir)
    workdir = str(tmp_path_factory.mktemp("prune_lpntk") / "run")
    return c, workdir, run(c, workdir)["prune_lpntk"]


def test_duplicates_cluster_together_and_flipped_copies_are_negative(job):
    c, workdir, _ = job
    ctx = Context(c.model.path, load_tokenizer(c.model.path), 32, 0, {})
    # the job's reference classifier at its best-validation checkpoint, read back (not retrained)
    out = os.path.join(workdir, "prune_lpntk")
    stamp = os.path.getmtime(os.path.join(out, "reference", "best.json"))
    params, template, _, info = reference(c.prune_lpntk, text_problem(c.prune_lpntk, ctx), out, 0)
    assert os.path.getmtime(os.path.join(out, "reference", "best.json")) == stamp
    assert info["step"] % c.prune_lpntk.eval_every == 0
    recs = generate_task("sentiment_flipped", 64, seed=0)
    classes = sorted({r["response"] for r in recs})
    # distinct prompts, then exact duplicates of the first three, then label-flipped copies
    seen, base = set(), []
    for r in recs:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            base.append(r)
    base = base[:12]
    dups = [dict(r, id=r["id"] + "-dup") for r in base[:3]]
    other = {classes[0]: classes[1], classes[1]: classes[0]}
    flips = [dict(r, id=r["id"] + "-flip", response=other[r["response"]]) for r in base[:3]]
    allrec = base + dups + flips
    data = classification_data(ctx.encode(allrec), allrec, classes)
    feats = lpntk_features(template.apply_fn(class_logits), params, data, num_classes=2)
    kernel = lpntk_kernel(feats, 2)
    n = len(base)
    for i in range(3):
        np.testing.assert_allclose(kernel[i, n + i], kernel[i, i], rtol=1e-4)  # duplicate ≡ itself
        assert kernel[i, n + 3 + i] < 0  # contradictory copy
        # K = 2: s(y') = -s(y), so the flipped copy's feature is exactly -φ
        np.testing.assert_allclose(kernel[i, n + 3 + i], -kernel[i, i], rtol=1e-4)
    labels = data["label"]
    for ratio in (0.3, 0.6):
        cl = class_clusters(kernel, labels, ratio)
        where = {}
        for cls, v in cl.items():
            for m, a in zip(v["members"], v["assignment"]):
                where[int(m)] = (cls, int(a))
        for i in range(3):
            assert where[i] == where[n + i]


def test_prune_job_end_to_end_and_resume(job):
    c, workdir, rep = job
    modes = {r["mode"] for r in rep["table"]}
    assert modes == {"full", "centres", "random_member", "drop_largest_half", "random", "random_drop_half_count"}
    rows = {r["mode"]: r for r in rep["table"]}
    assert rows["full"]["n_train"] == [48]
    assert rows["centres"]["n_train"] == rows["random"]["n_train"] == rows["random_member"]["n_train"] == [24]
    assert rows["drop_largest_half"]["n_train"] == rows["random_drop_half_count"]["n_train"]
    assert 24 < rows["drop_largest_half"]["n_train"][0] < 48
    assert all(0.0 <= r["test_acc_mean"] <= 1.0 for r in rep["table"])
    assert rep["setup"]["n_flipped"] == 5
    out = os.path.join(workdir, "prune_lpntk")
    assert os.path.exists(os.path.join(out, "prune_lpntk.png"))
    # resume: the report is the launcher's marker; remove it and one retrain shard, rerun
    retrains = sorted(glob.glob(os.path.join(out, "retrains", "*.json")))
    assert len(retrains) == 6
    os.remove(os.path.join(out, "report.json"))
    victim = os.path.join(out, "retrains", "centres_0.5_0.json")
    dropped = json.load(open(victim))
    os.remove(victim)
    shards = sorted(glob.glob(os.path.join(out, "features", "shard_*.npz")))
    assert len(shards) == 3
    kept = {p: os.path.getmtime(p) for p in shards[:2]}
    os.remove(shards[2])  # a job killed while computing the last feature shard
    stamps = {p: json.load(open(p))["train_s"] for p in retrains if p != victim}
    rep2 = run(c, workdir)["prune_lpntk"]
    assert {p: os.path.getmtime(p) for p in kept} == kept  # written shards are not recomputed
    assert os.path.exists(shards[2])
    assert rep2["kernel"] == rep["kernel"]  # the recomputed shard gives the same kernel
    assert {p: json.load(open(p))["train_s"] for p in stamps} == stamps  # finished retrains skipped
    redo = json.load(open(victim))  # the redone retrain is deterministic
    assert (redo["test_acc"], redo["step"], redo["val_acc"]) == (dropped["test_acc"], dropped["step"],
                                                                 dropped["val_acc"])
    # a different configuration in the same workdir is refused
    os.remove(os.path.join(out, "report.json"))
    c2 = small_job_config(c.model.path)
    c2.prune_lpntk.n_train = 40
    with pytest.raises(ValueError, match="different prune_lpntk configuration"):
        run(c2, workdir)


def test_classification_data(tiny_model_dir):
    ctx = Context(tiny_model_dir, load_tokenizer(tiny_model_dir), 32, 0, {})
    recs = generate_task("parity", 6, seed=0)
    data = classification_data(ctx.encode(recs), recs, ["even", "odd"])
    tok = ctx.tokenizer
    for r, pos, lab, ids, cids in zip(recs, data["answer_pos"], data["label"], data["input_ids"], data["class_ids"]):
        # the answer position holds the last prompt character; the next token is the label's first
        assert ids[pos] == tok.encode(r["prompt"][-1], add_special_tokens=False)[0]
        assert ids[pos + 1] == cids[lab]
        assert ["even", "odd"][lab] == r["response"]
    clash = [dict(recs[0], response="1"), dict(recs[1], response="10")]
    with pytest.raises(ValueError, match="share a first token"):
        classification_data(ctx.encode(clash), clash, ["1", "10"])
    with pytest.raises(ValueError, match="not among the classes"):
        classification_data(ctx.encode(recs), recs, ["even"])
