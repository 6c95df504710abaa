"""Factored (Kronecker) JL projection of per-example gradients: determinism, the explicit
Kronecker map on materialised gradients, unbiasedness at large p; the sparse sign hash of
small sites (exact inner products when they fit in p, unbiased when they collide)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_jax.kernels.factored_projection import FactoredProjection
from ntk_jax.kernels.features import flatten_per_example, gradient_features, per_example_grads, sum_of_outputs


@pytest.fixture(autouse=True, scope="module")
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def problem():
    """tanh net over a short sequence (T = 3 uses per weight): w1, w2 linear, b1 dense fallback."""
    k = jax.random.split(jax.random.key(0), 5)
    params = {"w1": 0.5 * jax.random.normal(k[0], (4, 6), jnp.float64),
              "b1": jax.random.normal(k[1], (6,), jnp.float64),
              "w2": 0.4 * jax.random.normal(k[2], (6, 16), jnp.float64)}

    def f(p, x):  # x (n, 3, 4) -> (n, 16)
        return jnp.tanh(x @ p["w1"] + p["b1"]).mean(axis=1) @ p["w2"] + jnp.tanh(x @ p["w1"] + p["b1"])[:, 0] @ p["w2"]

    def f_once(p, x):  # every weight used once
        h = jnp.tanh(jnp.einsum("ntd,de->nte", x, p["w1"]) + p["b1"])
        return jnp.einsum("nte,ek->nk", h, p["w2"])

    return f_once, params, jax.random.normal(k[3], (5, 3, 4), jnp.float64)


def test_split_rule():
    fp = FactoredProjection(8192)
    assert fp.split(8, 64) == (8, 1024, True, False)       # small input side kept exact
    assert fp.split(64, 8) == (1024, 8, False, True)
    assert fp.split(512, 512) == (128, 64, False, False)   # balanced, k_in k_out = p
    k_in, k_out, _, _ = FactoredProjection(1000).split(300, 300)
    assert k_in * k_out == 1000


@pytest.mark.parametrize("sparse", [False, True])
def test_equals_explicit_kronecker_map_and_is_deterministic(sparse):
    f, params, x = problem()
    s = sum_of_outputs(f)
    fp = FactoredProjection(64, seed=3, sparse_sites=sparse)
    plan = {row["path"]: row for row in fp.plan(s, params, x)}
    # w1 (4 x 6): forming G (24 per token) is cheaper than its factors (6 * 16 + 64)
    assert plan["['w1']"]["kind"] == ("sparse" if sparse else "factored") and plan["['b1']"]["kind"] == "dense"
    assert plan["['w2']"]["kind"] == ("sparse" if sparse else "factored")
    feats = gradient_features(s, params, x, projection=fp, batch_size=3)
    again = gradient_features(s, params, x, projection=FactoredProjection(64, seed=3, sparse_sites=sparse),
                              batch_size=3)
    np.testing.assert_array_equal(feats, again)  # same seed, same map
    # Oracle: the materialised per-example gradient times the explicit (P, p) matrix. At p=64,
    # w1 (4 -> 6, input side exact) goes through the gradient, w2 (6 -> 16) the factored order.
    g = np.asarray(jax.jit(lambda p, x: flatten_per_example(per_example_grads(s, p, x)))(params, x))
    leaves = jax.tree.leaves(params)  # b1, w1, w2 (dict order)
    dims = {i: leaf.shape for i, leaf in enumerate(leaves) if leaf.ndim == 2}
    M = fp.explicit_matrix(params, dims)
    assert np.abs(FactoredProjection(64, seed=4, sparse_sites=sparse).explicit_matrix(params, dims) - M).max() > 1e-3
    assert M.shape == (g.shape[1], 64)
    np.testing.assert_allclose(feats, g @ M, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_unbiased_inner_products(sparse):
    """Mean over seeds of ⟨Pg_i, Pg_j⟩ → ⟨g_i, g_j⟩ (error of the mean shrinks like 1/√seeds).
    With ``sparse`` both weights (24 + 96 = 120 coordinates ≤ p = 256) are hashed injectively,
    so only the dense fallback of b1 and the cross terms are random."""
    f, params, x = problem()
    s = sum_of_outputs(f)
    g = np.asarray(jax.jit(lambda p, x: flatten_per_example(per_example_grads(s, p, x)))(params, x))
    exact = g @ g.T
    dims = {i: leaf.shape for i, leaf in enumerate(jax.tree.leaves(params)) if leaf.ndim == 2}
    seeds = 200
    est = np.zeros_like(exact)
    for seed in range(seeds):  # the explicit map: equal to the features (test above), cheap to build
        M = FactoredProjection(256, seed=seed, sparse_sites=sparse).explicit_matrix(params, dims)
        F = g @ M
        est += F @ F.T / seeds
    rel = np.abs(est - exact).max() / np.abs(exact).max()
    assert rel < 0.05, rel


def test_transform_is_refused():
    from ntk_jax.kernels.features import make_feature_fn
    with pytest.raises(ValueError, match="FactoredProjection"):
        make_feature_fn(lambda p, x: x, FactoredProjection(8), transform=lambda g: g)


def relabelled_problem():
    """Weights that reach their matmul through relabellings: a scaled transpose, a reshape
    into heads, a multi-axis contraction; plus a bias (dense fallback)."""
    k = jax.random.split(jax.random.key(5), 6)
    params = {"wt": 0.5 * jax.random.normal(k[0], (6, 4), jnp.float64),       # used as wt.T
              "heads": 0.4 * jax.random.normal(k[1], (6, 12), jnp.float64),    # reshaped (6, 3, 4)
              "b": jax.random.normal(k[2], (6,), jnp.float64),
              "out": 0.3 * jax.random.normal(k[3], (3, 4, 5), jnp.float64)}    # contracts 2 axes

    def f(p, x):  # x (n, T, 4) -> (n, 5)
        h = jnp.tanh(x @ (p["wt"] / 2.0).T + p["b"])
        a = jnp.tanh(jnp.einsum("nte,ehd->nthd", h, p["heads"].reshape(6, 3, 4)))
        return jnp.einsum("nthd,hdk->nk", a, p["out"])

    return f, params, jax.random.normal(k[4], (5, 3, 4), jnp.float64)


def lora_transformer_problem():
    from flax import nnx

    from ntk_jax.kernels.outputs import lm_output_fn
    from ntk_jax.models.lora import LoRAConfig, apply_lora, lora_filter
    from ntk_jax.models.subset import param_subset
    from ntk_jax.models.transformer import DecoderConfig, DecoderLM
    cfg = DecoderConfig(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=24, dtype="float64", param_dtype="float64")
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "v_proj", "down_proj"), b_init_std=0.1),
               rngs=nnx.Rngs(1))
    subset = param_subset(model, lora_filter())
    rng = np.random.default_rng(0)
    x = {"input_ids": jnp.asarray(rng.integers(0, 11, (4, 5)), jnp.int32),
         "attention_mask": jnp.ones((4, 5), jnp.int32), "loss_mask": jnp.ones((4, 5))}
    return lm_output_fn(subset), subset.params, x


@pytest.mark.parametrize("make", [relabelled_problem, lora_transformer_problem])
def test_bound_map_equals_features_and_its_adjoint_is_the_transpose(make):
    """``bind`` gives the same Πᵀ as the features (which never form the gradient) when applied
    to materialised per-example gradients — so the layouts it reads are right — and
    ``⟨g, Π w⟩ = ⟨Πᵀ g, w⟩``."""
    f, params, x = make()
    s = sum_of_outputs(f)
    for fp in (FactoredProjection(64, seed=2, sparse_sites=False), FactoredProjection(64, seed=2)):
        _check_bound_map(fp, s, params, x)
    assert "sparse" in {row["kind"] for row in FactoredProjection(64).plan(s, params, x)}
    assert "factored" in {row["kind"] for row in FactoredProjection(64, sparse_sites=False).plan(s, params, x)}


def _check_bound_map(fp, s, params, x):
    feats = np.asarray(gradient_features(s, params, x, projection=fp))
    bound = fp.bind(s, params, x)
    grads = jax.jit(lambda p, x: per_example_grads(s, p, x))(params, x)
    np.testing.assert_allclose(np.asarray(bound(grads)), feats, rtol=1e-9, atol=1e-11)
    w = np.random.default_rng(1).normal(size=fp.dim)
    back = bound.adjoint(w, params)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    g0 = jax.tree.map(lambda a: a[0], grads)
    lhs = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(back)))
    np.testing.assert_allclose(lhs, float(np.dot(feats[0], w)), rtol=1e-5)  # adjoint in float32
    with pytest.raises(ValueError, match="projection dim"):
        bound.adjoint(np.ones(3), params)


def test_make_projection_names_the_problem():
    from ntk_jax.kernels.factored_projection import make_projection
    from ntk_jax.kernels.projection import RandomProjection
    assert make_projection(0) is None
    assert isinstance(make_projection(16, 1), RandomProjection)
    fp = make_projection(16, 1, "factored", kind="gaussian")
    assert isinstance(fp, FactoredProjection) and (fp.dim, fp.seed, fp.kind) == (16, 1, "gaussian")
    with pytest.raises(ValueError, match="unknown projection type 'kron'"):
        make_projection(16, 0, "kron")
    with pytest.raises(ValueError, match=">= 0"):
        make_projection(-1)


@pytest.mark.parametrize("T", [2, 40])
def test_sites_sharing_a_split_are_summed_in_one_contraction(T):
    """Two linear sites per split kind (input side exact, both random, output side exact) at
    p = 64, T short (factored order) and long (through the gradients): equal to the explicit
    Kronecker map on the materialised gradients."""
    fp = FactoredProjection(64, seed=5, sparse_sites=False)
    shapes = {"w1a": (4, 12), "w1b": (4, 12), "w2a": (12, 12), "w2b": (12, 12), "w3a": (12, 4), "w3b": (12, 4)}
    keys = jax.random.split(jax.random.key(1), len(shapes) + 1)
    params = {k: 0.4 * jax.random.normal(key, s, jnp.float64) for key, (k, s) in zip(keys, shapes.items())}
    x = jax.random.normal(keys[-1], (3, T, 4), jnp.float64)
    assert {fp.split(*s) for s in shapes.values()} == {(4, 16, True, False), (8, 8, False, False),
                                                        (16, 4, False, True)}

    def f(p, x):  # every weight used once: x (n, T, 4) -> (n, 4)
        lin = lambda h, w: jnp.einsum("ntd,de->nte", h, w)  # noqa: E731
        h_a = jnp.tanh(lin(jnp.tanh(lin(x, p["w1a"])), p["w2a"]))
        h_b = jnp.tanh(lin(jnp.tanh(lin(x, p["w1b"])), p["w2b"]))
        return (lin(h_a, p["w3a"]) + lin(h_b, p["w3b"])).mean(axis=1)

    s = sum_of_outputs(f)
    assert all(row["kind"] == "factored" for row in fp.plan(s, params, x))
    feats = gradient_features(s, params, x, projection=fp)
    g = np.asarray(jax.jit(lambda p, x: flatten_per_example(per_example_grads(s, p, x)))(params, x))
    M = fp.explicit_matrix(params, {i: leaf.shape for i, leaf in enumerate(jax.tree.leaves(params))})
    np.testing.assert_allclose(feats, g @ M, rtol=1e-10, atol=1e-12)


def _small_sites_problem(d=6, r=2, n_sites=3, T=4):
    """LoRA-like sites (d x r and r x d): every one small (formed and hashed at p >= 64)."""
    keys = jax.random.split(jax.random.key(7), 2 * n_sites + 1)
    params = {f"a{i}": 0.5 * jax.random.normal(keys[2 * i], (d, r), jnp.float64) for i in range(n_sites)}
    params.update({f"b{i}": 0.5 * jax.random.normal(keys[2 * i + 1], (r, d), jnp.float64) for i in range(n_sites)})

    def f(p, x):  # x (n, T, d) -> (n, d)
        h = x
        for i in range(n_sites):
            h = jnp.tanh(h + jnp.einsum("ntr,re->nte", jnp.einsum("ntd,dr->ntr", h, p[f"a{i}"]), p[f"b{i}"]))
        return h.mean(axis=1)

    return f, params, jax.random.normal(keys[-1], (5, T, d), jnp.float64)


@pytest.mark.parametrize("dim", [128, 16])
def test_sparse_sites_hash_the_formed_gradients(dim):
    """Small sites: the features equal the explicit sparse map on materialised gradients, for
    any sequence length (the map does not depend on T); with M = 72 coordinates ≤ p = 128 the
    hash is injective and inner products are exact, with p = 16 < M buckets collide and the
    mean over seeds is unbiased."""
    f, params, x = _small_sites_problem()
    s = sum_of_outputs(f)
    fp = FactoredProjection(dim, seed=1)
    assert all(row["kind"] == "sparse" for row in fp.plan(s, params, x))
    g = np.asarray(jax.jit(lambda p, x: flatten_per_example(per_example_grads(s, p, x)))(params, x))
    dims = {i: leaf.shape for i, leaf in enumerate(jax.tree.leaves(params))}
    M = fp.explicit_matrix(params, dims)
    assert (np.count_nonzero(M, axis=1) == 1).all() and set(np.unique(M)) <= {-1.0, 0.0, 1.0}
    feats = np.asarray(gradient_features(s, params, x, projection=fp, batch_size=2))
    np.testing.assert_allclose(feats, g @ M, rtol=1e-10, atol=1e-12)
    long_x = jnp.concatenate([x, x[:, ::-1]], axis=1)  # T = 8: the same map
    g_long = np.asarray(jax.jit(lambda p, x: flatten_per_example(per_example_grads(s, p, x)))(params, long_x))
    np.testing.assert_allclose(np.asarray(gradient_features(s, params, long_x, projection=fp)), g_long @ M,
                               rtol=1e-10, atol=1e-12)
    exact = g @ g.T
    if dim >= g.shape[1]:  # injective: every coordinate its own bucket
        assert (np.count_nonzero(M, axis=0) <= 1).all()
        np.testing.assert_allclose(feats @ feats.T, exact, rtol=1e-10, atol=1e-12)
    else:
        seeds, est = 300, np.zeros_like(exact)
        for seed in range(seeds):
            F = g @ FactoredProjection(dim, seed=seed).explicit_matrix(params, dims)
            est += F @ F.T / seeds
        assert np.abs(est - exact).max() / np.abs(exact).max() < 0.08
        assert np.abs(feats @ feats.T - exact).max() > 1e-6  # one seed does collide
    # the bound map (a domain direction) and its adjoint agree with the features
    _check_bound_map(fp, s, params, x)


def test_sparse_rule_keeps_large_sites_factored():
    fp = FactoredProjection(8192)
    assert fp.is_sparse(4096, 8) and fp.is_sparse(8, 4096) and fp.is_sparse(64, 8)  # LoRA factors
    assert not fp.is_sparse(512, 512) and not fp.is_sparse(4096, 4096)              # full weights
    assert not FactoredProjection(8192, sparse_sites=False).is_sparse(64, 8)
