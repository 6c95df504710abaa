"""The symmetric (one-triangle) contraction used when both kernel sides are the same object
(``x2=None``): equal to the plain GEMM / the cross form, and exactly symmetric."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_jax.kernels import contract
from ntk_jax.kernels.contract import (block_bounds, contract_jacobians, gram, mirror, num_blocks,
                                      symmetric_blocks, symmetric_gram)
from ntk_jax.kernels.ntk import empirical_ntk

DTYPES = ("float32", "float64")
TOL = {"float32": 1e-5, "float64": 1e-12}  # relative to the kernel's largest entry


@pytest.fixture(autouse=True, scope="module")
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def rows_tree(n, dtype, O=None, seed=0):
    """A pytree of three leaves ``(n[, O], *leaf)`` of different shapes."""
    k = jax.random.split(jax.random.key(seed), 3)
    lead = (n,) if O is None else (n, O)
    return {"w": jax.random.normal(k[0], lead + (3, 4), dtype), "b": jax.random.normal(k[1], lead + (5,), dtype),
            "c": [jax.random.normal(k[2], lead + (2,), dtype)]}


def plain_gram(tree):
    """``Σ_leaves A Aᵀ`` in float64 numpy over ``(m, -1)`` rows (the reference)."""
    return sum(np.asarray(a, np.float64).reshape(a.shape[0], -1) @ np.asarray(a, np.float64).reshape(a.shape[0], -1).T
               for a in jax.tree.leaves(tree))


def assert_close(K, ref, dtype):
    K = np.asarray(K)
    assert K.dtype == np.dtype(dtype)
    scale = max(np.max(np.abs(ref)), 1e-30)
    np.testing.assert_allclose(K.astype(np.float64) / scale, ref / scale, rtol=0, atol=TOL[dtype])


def assert_exactly_symmetric(K):
    K = np.asarray(K)
    np.testing.assert_array_equal(K, K.T if K.ndim == 2 else np.transpose(K, (1, 0, 3, 2)))


def test_block_bounds_cover_the_range():
    for n in (1, 2, 7, 64, 65):
        for b in (1, 2, 3, 8):
            bounds = block_bounds(n, b)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(s1 == s0 for (_, s0), (s1, _) in zip(bounds, bounds[1:]))
            sizes = [j - i for i, j in bounds]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and len(bounds) == min(b, n)
    assert num_blocks(100, 384) == 1 and num_blocks(768, 384) == 2 and num_blocks(10 ** 6, 384) == 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 7, 13])
def test_symmetric_gram_equals_plain_gemm(n, dtype):
    tree = rows_tree(n, dtype)
    ref = plain_gram(tree)
    for blocks in (1, 2, 3, 5, 8):  # 13 rows in 2, 3, 5, 8 blocks: sizes not dividing n
        K = jax.jit(lambda t: symmetric_gram(t, blocks))(tree)
        assert K.shape == (n, n)
        assert_close(K, ref, dtype)
        assert_exactly_symmetric(K)
    # the default block count, and gram()'s identity dispatch, agree with the cross path
    assert_close(gram(tree, tree), ref, dtype)
    assert_close(gram(tree, jax.tree.map(lambda a: a, tree)), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 5, 9])
def test_contract_jacobians_symmetric_equals_cross(n, dtype, monkeypatch):
    O = 3
    J = rows_tree(n, dtype, O=O, seed=n)
    J_copy = jax.tree.map(lambda a: a, J)  # same values, another object: the cross path
    assert J_copy is not J
    flat = [np.asarray(a, np.float64).reshape(n, O, -1) for a in jax.tree.leaves(J)]
    full_ref = sum(np.einsum("iap,jbp->ijab", a, a) for a in flat)
    trace_ref = np.einsum("ijaa->ij", full_ref)
    for rows_per_block in (contract.SYMMETRIC_BLOCK_ROWS, 4, 2):  # default, then forced splits
        monkeypatch.setattr(contract, "SYMMETRIC_BLOCK_ROWS", rows_per_block)
        for trace, ref in ((True, trace_ref), (False, full_ref)):
            K_sym = jax.jit(lambda j: contract_jacobians(j, j, trace))(J)
            K_cross = contract_jacobians(J, J_copy, trace)
            assert K_sym.shape == ref.shape
            assert_close(K_sym, ref, dtype)
            assert_close(K_sym, np.asarray(K_cross, np.float64), dtype)
            assert_exactly_symmetric(K_sym)


def test_symmetric_blocks_calls_only_the_upper_triangle_and_mirrors_full_blocks():
    n, O = 7, 2
    K = jax.random.normal(jax.random.key(3), (n * O, n * O))
    K = (K + K.T).reshape(n, O, n, O).transpose(0, 2, 1, 3)  # a symmetric (n, n, O, O) kernel
    calls = []

    def block(i0, i1, j0, j1):
        calls.append((i0, j0))
        return K[i0:i1, j0:j1]

    out = symmetric_blocks(block, n, 3)
    assert all(j >= i for i, j in calls) and len(calls) == 6
    np.testing.assert_allclose(out, K, rtol=0, atol=1e-6)
    assert_exactly_symmetric(out)
    np.testing.assert_array_equal(mirror(out[:3, 4:]), out[4:, :3])


def mlp(dtype):
    k = jax.random.split(jax.random.key(0), 5)
    params = {"l1": {"w": jax.random.normal(k[0], (6, 16), dtype) / 2, "b": 0.1 * jax.random.normal(k[1], (16,), dtype)},
              "l2": {"w": jax.random.normal(k[2], (16, 3), dtype) / 4}}

    def f(p, x):
        return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"]

    return f, params, jax.random.normal(k[3], (11, 6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["jacobian", "structured"])
def test_empirical_ntk_symmetric_equals_cross_and_is_exactly_symmetric(method, dtype, monkeypatch):
    # Split every symmetric contraction into several blocks (11 examples, 11·3 rows) so the
    # blocked triangle runs at this size too.
    monkeypatch.setattr(contract, "SYMMETRIC_BLOCK_ROWS", 4)
    monkeypatch.setattr("ntk_jax.kernels.structured.STRUCTURED_BLOCK_EXAMPLES", 3)
    f, params, x = mlp(dtype)
    for trace in (True, False):
        K_sym, info = empirical_ntk(f, params, x, None, trace=trace, method=method, return_info=True)
        K_cross = empirical_ntk(f, params, x, x, trace=trace, method=method)
        assert info["method"] == method
        if method == "structured":  # the linear layers are contracted through their factors
            assert {leaf.kind for leaf in info["plan"].leaves} >= {"fallback"}
        assert_close(K_sym, np.asarray(K_cross, np.float64), dtype)
        assert_exactly_symmetric(K_sym)


@pytest.mark.parametrize("kind", ["factored", "materialized"])
def test_structured_sites_symmetric_equal_cross(kind, monkeypatch):
    """Both per-site contractions (factored: the tap Gram and the triangle of example blocks;
    materialised: the Gram of ``xᵀδ``) in float64, against the jacobian method's cross form."""
    monkeypatch.setattr("ntk_jax.kernels.structured.FORCE_KIND", kind)
    monkeypatch.setattr("ntk_jax.kernels.structured.STRUCTURED_BLOCK_EXAMPLES", 2)
    f, params, x = mlp("float64")
    for trace in (True, False):
        K_sym = empirical_ntk(f, params, x, None, trace=trace, method="structured")
        ref = empirical_ntk(f, params, x, x, trace=trace, method="jacobian")
        assert_close(K_sym, np.asarray(ref, np.float64), "float64")
        assert_exactly_symmetric(K_sym)


@pytest.mark.parametrize("normalize", [False, True])
def test_feature_kernel_symmetric_equals_cross(normalize):
    """``feature_kernel(F)`` (one array, normalised once: numpy's syrk) equals the cross form."""
    from ntk_jax.kernels.ntk import feature_kernel

    F = np.random.default_rng(0).standard_normal((9, 13)).astype(np.float32)
    K = feature_kernel(F, None, normalize=normalize)
    np.testing.assert_allclose(K, feature_kernel(F, F.copy(), normalize=normalize), rtol=1e-5, atol=1e-5)
    assert_exactly_symmetric(K)
