"""The cached (whole-matrix, one GEMM) projection path against the on-the-fly chunked path and
the explicit matrix; the compiled-feature-function reuse of ``gradient_features``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_jax.kernels import features as feat
from ntk_jax.kernels import projection as proj_mod
from ntk_jax.kernels.features import gradient_features, make_feature_fn, per_example_grads, flatten_per_example
from ntk_jax.kernels.projection import RandomProjection


def clear_cache() -> None:
    """Drops every cached projection matrix (the module's process-wide LRU cache)."""
    with proj_mod._CACHE_LOCK:
        proj_mod._CACHE.clear()


def cache_nbytes() -> int:
    """Bytes held by the cached projection matrices."""
    with proj_mod._CACHE_LOCK:
        return int(sum(m.nbytes for m in proj_mod._CACHE.values()))


def small_problem(seed=0, d_in=5, d_hidden=7):
    """A two-layer tanh net with a per-example scalar; leaves of 35, 7 and 7 scalars (P = 49)."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"w1": jax.random.normal(k[0], (d_in, d_hidden)), "b1": jax.random.normal(k[1], (d_hidden,)),
              "w2": jax.random.normal(k[2], (d_hidden,))}
    x = jax.random.normal(k[3], (6, d_in))

    def scalar_fn(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    return scalar_fn, params, x


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("chunk_rows", [2048, 16])  # 16 < 35: several chunks + remainder per leaf
def test_cached_matrix_is_the_explicit_matrix(kind, chunk_rows):
    _, params, _ = small_problem()
    proj = RandomProjection(24, seed=3, kind=kind, chunk_rows=chunk_rows)
    clear_cache()
    cached = proj.cached_matrix(params)
    assert cached is not None and cached.shape == (49, 24)
    np.testing.assert_array_equal(np.asarray(cached), proj.matrix(params))  # bit-identical
    assert proj.cached_matrix(params) is cached  # generated once
    if kind == "rademacher":
        assert set(np.unique(np.abs(np.asarray(cached)))) == {np.float32(1 / np.sqrt(24))}


@pytest.mark.parametrize("chunk_rows", [2048, 16])
def test_cached_and_on_the_fly_features_agree_with_explicit_product(chunk_rows):
    scalar_fn, params, x = small_problem()
    cached = RandomProjection(32, seed=1, chunk_rows=chunk_rows)
    onfly = RandomProjection(32, seed=1, chunk_rows=chunk_rows, cache_bytes=0)
    assert cached == onfly and hash(cached) == hash(onfly)  # the budget changes no value
    assert onfly.cached_matrix(params) is None
    # Oracle: explicit per-example gradients (float64) times the explicit matrix.
    G = np.asarray(flatten_per_example(per_example_grads(scalar_fn, params, x)), np.float64)
    ref = G @ cached.matrix(params).astype(np.float64)
    a = np.asarray(make_feature_fn(scalar_fn, cached)(params, x))
    b = np.asarray(make_feature_fn(scalar_fn, onfly)(params, x))
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(b, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # gradient_features (blocks of 4 with padding) gives the same rows.
    c = gradient_features(scalar_fn, params, x, projection=cached, batch_size=4)
    np.testing.assert_allclose(c, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_eager_call_uses_cache_and_matches_traced_call():
    scalar_fn, params, x = small_problem()
    proj = RandomProjection(16, seed=2, chunk_rows=8)
    g = per_example_grads(scalar_fn, params, x)
    eager = np.asarray(proj(g))  # cached whole-matrix GEMM
    traced = np.asarray(jax.jit(lambda g: proj(g))(g))  # on the fly, chunk by chunk
    np.testing.assert_allclose(eager, traced, rtol=1e-5, atol=1e-6 * np.abs(traced).max())
    single = np.asarray(proj(jax.tree.map(lambda a: a[0], g), batch_axis=False))
    np.testing.assert_allclose(single, eager[0], rtol=1e-5, atol=1e-6 * np.abs(eager).max())


def test_feature_fn_under_an_outer_transformation_falls_back_to_on_the_fly():
    scalar_fn, params, x = small_problem()
    proj = RandomProjection(8, seed=0)
    fn = make_feature_fn(scalar_fn, proj)
    outer = jax.jit(lambda p, x: fn(p, x))  # params traced: no cached constant is embedded
    np.testing.assert_allclose(np.asarray(outer(params, x)), np.asarray(fn(params, x)), rtol=1e-5, atol=1e-6)


def test_cache_budget_and_lru_eviction():
    _, params, _ = small_problem()
    clear_cache()
    nbytes = 49 * 64 * 4
    small_budget = RandomProjection(64, seed=0, cache_bytes=nbytes - 1)
    assert small_budget.cached_matrix(params) is None and cache_nbytes() == 0
    budget = nbytes + nbytes // 2  # room for one matrix, not two
    m0 = RandomProjection(64, seed=0, cache_bytes=budget).cached_matrix(params)
    m1 = RandomProjection(64, seed=1, cache_bytes=budget).cached_matrix(params)
    assert m0 is not None and m1 is not None
    assert cache_nbytes() == nbytes  # the least recently used one was evicted
    assert not np.array_equal(np.asarray(m0), np.asarray(m1))
    clear_cache()
    assert cache_nbytes() == 0
    with pytest.raises(ValueError, match="cache_bytes"):
        RandomProjection(8, cache_bytes=-1)


def test_gradient_features_reuses_the_compiled_function():
    scalar_fn, params, x = small_problem()
    proj = RandomProjection(8, seed=0)
    feat._shared_feature_fn.cache_clear()
    first = gradient_features(scalar_fn, params, x, projection=proj, batch_size=3)
    second = gradient_features(scalar_fn, params, x, projection=RandomProjection(8, seed=0), batch_size=3)
    info = feat._shared_feature_fn.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("cache_bytes", [None, 0])  # cached matrix, on-the-fly blocks
def test_adjoint_is_the_transpose(cache_bytes):
    _, params, _ = small_problem()
    kw = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    proj = RandomProjection(12, seed=4, chunk_rows=16, **kw)
    w = np.random.default_rng(0).normal(size=12).astype(np.float32)
    back = proj.adjoint(w, params)
    flat = np.concatenate([np.asarray(back[k]).ravel() for k in sorted(params)])  # leaf order = sorted keys
    np.testing.assert_allclose(flat, proj.matrix(params) @ w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        proj.adjoint(np.zeros(5), params)


def test_on_the_fly_programs_hold_one_block_not_the_matrix():
    """The uncached adjoint and forward programs keep one ``(chunk_rows, dim)`` block alive,
    never the ``(P, dim)`` matrix (a VJP of the chunked loop kept every block as a residual:
    3.7 GB at P = 114 k, p = 8192, once per device of the mesh), and run on one device."""
    proj = RandomProjection(256, seed=3, chunk_rows=64, cache_bytes=0)
    sizes = (4096, 1000)  # 80 chunks; the matrix is 5.2 MB, a block 64 KiB
    matrix_bytes = proj.matrix_nbytes(sizes)
    w = jnp.ones((256,), jnp.float32)
    adj = proj_mod._adjoint_on_the_fly.lower(proj, sizes, w).compile().memory_analysis()
    assert adj.temp_size_in_bytes < matrix_bytes // 10, adj
    g = {"a": jnp.ones((2, 4096)), "b": jnp.ones((2, 1000))}
    fwd = proj_mod._project_on_the_fly.lower(proj, g).compile().memory_analysis()
    assert fwd.temp_size_in_bytes < matrix_bytes // 10, fwd
    out = proj(g)
    assert len(out.sharding.device_set) == 1
    m = proj.matrix({"a": g["a"][0], "b": g["b"][0]})
    np.testing.assert_allclose(np.asarray(out), np.ones((2, 5096)) @ m, rtol=1e-5, atol=1e-4)


def test_directional_derivatives_give_projected_feature_scores():
    """⟨Πᵀ g_j, u⟩ from the features equals the JVP of s(x_j) along Π u (and the exact
    ⟨g_j, v⟩ from explicit gradients)."""
    scalar_fn, params, x = small_problem()
    proj = RandomProjection(64, seed=0)
    F = gradient_features(scalar_fn, params, x, projection=proj)
    u = F[:2].mean(axis=0)  # e.g. the mean projected feature of a "domain" set
    v = proj.adjoint(u, params)
    scores = feat.directional_derivatives(scalar_fn, params, x, v, batch_size=4)
    np.testing.assert_allclose(scores, F @ u, rtol=1e-4, atol=1e-5 * np.abs(F @ u).max())
    G = np.asarray(flatten_per_example(per_example_grads(scalar_fn, params, x)), np.float64)
    vflat = np.concatenate([np.asarray(v[k], np.float64).ravel() for k in sorted(params)])
    np.testing.assert_allclose(scores, G @ vflat, rtol=1e-4, atol=1e-5 * np.abs(G @ vflat).max())
    with pytest.raises(ValueError, match="structure"):
        feat.directional_derivatives(scalar_fn, params, x, {"w1": v["w1"]})
