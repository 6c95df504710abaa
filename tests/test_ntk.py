"""Exact eNTK methods against neural-tangents, closed forms and finite differences (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_jax.kernels.features import per_example_grads, flatten_per_example
from ntk_jax.kernels.checks import NonFiniteKernelError
from ntk_jax.kernels.ntk import empirical_ntk, jacobian_free_ntk, loss_gradient_kernel, per_example_jacobians
from ntk_jax.kernels.outputs import lm_output_fn
from ntk_jax.models.lora import LoRAConfig, apply_lora, lora_filter
from ntk_jax.models.subset import param_subset
from ntk_jax.models.transformer import DecoderConfig, DecoderLM

RTOL, ATOL = 1e-5, 1e-9


@pytest.fixture(autouse=True, scope="module")
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def mlp_problem():
    k = jax.random.split(jax.random.key(0), 6)
    params = {"w1": jax.random.normal(k[0], (4, 6), jnp.float64) / 2, "b1": jax.random.normal(k[1], (6,), jnp.float64),
              "w2": jax.random.normal(k[2], (6, 3), jnp.float64) / 2}

    def f(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    return f, params, jax.random.normal(k[3], (7, 4), jnp.float64), jax.random.normal(k[4], (5, 4), jnp.float64)


def cnn_problem():
    k = jax.random.split(jax.random.key(1), 6)
    params = {"conv": jax.random.normal(k[0], (3, 3, 2, 4), jnp.float64) / 3,
              "dense": jax.random.normal(k[1], (4, 3), jnp.float64) / 2}

    def f(p, x):  # x: (n, 6, 6, 2) NHWC
        y = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(jax.nn.gelu(y), axis=(1, 2)) @ p["dense"]

    return f, params, jax.random.normal(k[2], (5, 6, 6, 2), jnp.float64), jax.random.normal(k[3], (4, 6, 6, 2), jnp.float64)


def transformer_problem(reduce="mean", layers=(0,)):
    cfg = DecoderConfig(vocab_size=11, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                        intermediate_size=24, dtype="float64", param_dtype="float64")
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "v_proj"), b_init_std=0.1), rngs=nnx.Rngs(1))
    subset = param_subset(model, lora_filter(layers=layers))
    f = lm_output_fn(subset, reduce=reduce)

    def batch(seed, n, T=6):
        rng = np.random.default_rng(seed)
        mask = np.zeros((n, T), np.float64)
        mask[:, 2:5] = 1.0
        return {"input_ids": jnp.asarray(rng.integers(0, 11, (n, T)), jnp.int32),
                "attention_mask": jnp.ones((n, T), jnp.int32), "loss_mask": jnp.asarray(mask)}

    return f, subset.params, batch(0, 4), batch(1, 3)


PROBLEMS = {"mlp": mlp_problem, "cnn": cnn_problem, "transformer_lora": transformer_problem}


# The transformer compiles slowly: its symmetric case (x2=None) and its trace are left to the MLP
# and CNN, which exercise the same kernel-assembly and trace paths.
CASES = [(problem, trace, with_x2) for with_x2 in (False, True) for trace in (True, False) for problem in PROBLEMS
         if problem != "transformer_lora" or (with_x2 and not trace)]


@pytest.mark.parametrize("problem,trace,with_x2", CASES)
def test_methods_agree_with_neural_tangents(problem, trace, with_x2):
    f, params, x1, x2 = PROBLEMS[problem]()
    x2 = x2 if with_x2 else None
    oracle = empirical_ntk(f, params, x1, x2, trace=trace, method="neural_tangents",
                           nt_implementation="jacobian_contraction")
    oracle_vp = empirical_ntk(f, params, x1, x2, trace=trace, method="neural_tangents",
                              nt_implementation="ntk_vector_products")
    np.testing.assert_allclose(oracle_vp, oracle, rtol=RTOL, atol=ATOL)
    assert np.abs(oracle).max() > 1e-3  # not a trivially zero kernel
    # The transformer compiles slowly: one padded multi-block size there is enough.
    block_sizes = (None, 3) if problem == "transformer_lora" else (None, 2, 3)
    for method in ("jacobian", "ntk_vp"):
        for block_size in block_sizes:
            K = empirical_ntk(f, params, x1, x2, trace=trace, method=method, block_size=block_size)
            assert K.shape == oracle.shape
            np.testing.assert_allclose(K, oracle, rtol=RTOL, atol=ATOL, err_msg=f"{method} block={block_size}")


def test_trace_equals_diagonal_sum_of_full_kernel():
    f, params, x1, x2 = transformer_problem(reduce="none")
    full = empirical_ntk(f, params, x1, x2, trace=False)
    traced = empirical_ntk(f, params, x1, x2, trace=True, method="ntk_vp", block_size=2)
    np.testing.assert_allclose(np.einsum("ijaa->ij", full), traced, rtol=RTOL, atol=ATOL)


def test_linear_model_closed_form():
    rng = np.random.default_rng(0)
    X, X2 = rng.normal(size=(6, 5)), rng.normal(size=(4, 5))
    W = jnp.asarray(rng.normal(size=(5, 3)))
    f = lambda w, x: x @ w  # noqa: E731
    for method in ("jacobian", "ntk_vp", "neural_tangents"):
        K = empirical_ntk(f, W, X, X2, method=method)
        np.testing.assert_allclose(K, 3 * X @ X2.T, rtol=1e-10, atol=1e-12)
        full = empirical_ntk(f, W, X, trace=False, method=method)
        np.testing.assert_allclose(full, np.einsum("ij,ab->ijab", X @ X.T, np.eye(3)), rtol=1e-10, atol=1e-12)


def test_jacobian_column_matches_finite_differences():
    f, params, x1, _ = transformer_problem()
    J = per_example_jacobians(f, params, x1)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    rng = np.random.default_rng(3)
    Jflat = np.concatenate([np.asarray(l).reshape(l.shape[0], l.shape[1], -1) for l in jax.tree.leaves(J)], axis=2)
    f_jit = jax.jit(f)  # one compile for the six evaluations
    for col in rng.choice(flat.size, size=3, replace=False):
        e = jnp.zeros_like(flat).at[col].set(1.0)
        h = 1e-6
        fd = (f_jit(unravel(flat + h * e), x1) - f_jit(unravel(flat - h * e), x1)) / (2 * h)
        np.testing.assert_allclose(Jflat[:, :, col], np.asarray(fd), rtol=1e-5, atol=1e-8)


def test_jacobian_free_equals_sum_of_full_kernel_entries():
    """Θ̃(x, x') = Σ_{a,b} Θ_ab(x, x'): trace plus every cross-output term."""
    f, params, x1, x2 = transformer_problem()
    full = empirical_ntk(f, params, x1, x2, trace=False)
    jf = jacobian_free_ntk(f, params, x1, x2)
    np.testing.assert_allclose(jf, full.sum(axis=(2, 3)), rtol=RTOL, atol=ATOL)
    jf_blocked = jacobian_free_ntk(f, params, x1, x2, block_size=2)
    np.testing.assert_allclose(jf_blocked, jf, rtol=RTOL, atol=ATOL)


def test_projected_jacobian_free_within_jl_error():
    f, params, x1, _ = transformer_problem(layers=(0, 1))
    exact = jacobian_free_ntk(f, params, x1)
    proj = jacobian_free_ntk(f, params, x1, projection_dim=8192, seed=0)
    rel = np.linalg.norm(proj - exact) / np.linalg.norm(exact)
    assert rel < 0.05, rel
    again = jacobian_free_ntk(f, params, x1, projection_dim=8192, seed=0)
    np.testing.assert_array_equal(proj, again)  # deterministic given the seed
    other = jacobian_free_ntk(f, params, x1, projection_dim=8192, seed=1)
    assert not np.array_equal(proj, other)


def test_loss_gradient_kernel_against_explicit_gradients():
    f, params, x1, x2 = mlp_problem()
    y1 = jnp.arange(7.0)[:, None] * jnp.ones((1, 3)) / 7

    def loss(p, batch):
        x, y = batch
        return 0.5 * jnp.sum((f(p, x) - y) ** 2, axis=1)

    K = loss_gradient_kernel(loss, params, (x1, y1))
    G = np.stack([np.asarray(jax.flatten_util.ravel_pytree(
        jax.grad(lambda p: loss(p, (x1[i:i + 1], y1[i:i + 1]))[0])(params))[0]) for i in range(7)])
    np.testing.assert_allclose(K, G @ G.T, rtol=1e-10)
    Kc = loss_gradient_kernel(loss, params, (x1, y1), normalize=True)
    np.testing.assert_allclose(np.diag(Kc), 1.0, rtol=1e-10)
    g = flatten_per_example(per_example_grads(loss, params, (x1, y1)))
    np.testing.assert_allclose(np.asarray(g), G, rtol=1e-10)


def test_mismatched_batch_axes_error():
    f, params, x1, _ = mlp_problem()
    with pytest.raises(ValueError, match="mismatched leading"):
        empirical_ntk(f, params, {"a": x1, "b": x1[:3]})


def test_non_finite_kernel_error():
    f, params, x1, _ = mlp_problem()
    bad = jax.tree.map(lambda a: a.at[0].set(jnp.nan) if a.ndim == 1 else a, params)
    with pytest.raises(NonFiniteKernelError, match="non-finite"):
        empirical_ntk(f, bad, x1)
    with pytest.raises(NonFiniteKernelError, match="non-finite"):
        jacobian_free_ntk(f, bad, x1)


def test_bad_method_and_batch_axis_errors():
    f, params, x1, _ = mlp_problem()
    with pytest.raises(ValueError, match="unknown NTK method"):
        empirical_ntk(f, params, x1, method="no_such_method")
    with pytest.raises(ValueError, match="batch axis"):
        empirical_ntk(lambda p, x: f(p, x).sum(), params, x1)
    with pytest.raises(ValueError, match="empty batch"):
        empirical_ntk(f, params, x1[:0])


def test_repeated_calls_reuse_one_compiled_kernel():
    """The same ``f`` called again (new parameter values, same shapes) runs the program compiled by
    the first call — one traced signature, a cache hit — and still gives the kernel of the *new*
    parameters (the closed-form ``X Xᵀ`` scaled by the weights' second layer); another ``f`` gets
    its own program."""
    from ntk_jax.kernels.ntk import _shared_kernel_fn
    x = jax.random.normal(jax.random.key(0), (5, 3))

    def f(p, x):  # (n, 1): a two-layer linear model, kernel over the first layer only
        return (x @ p["w"]) @ jnp.array([[2.0], [0.5]])

    p1 = {"w": jnp.ones((3, 2))}
    p2 = {"w": 3.0 * jnp.ones((3, 2))}
    _shared_kernel_fn.cache_clear()
    k1 = empirical_ntk(f, p1, x, method="jacobian")
    k2 = empirical_ntk(f, p2, x, method="jacobian")
    info = _shared_kernel_fn.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    compiled = _shared_kernel_fn(f, True, "jacobian", "jacobian_contraction", 1, None)
    assert len(compiled._programs) == 1  # one trace for both calls
    expected = np.asarray(x @ x.T) * (2.0 ** 2 + 0.5 ** 2)  # linear in w: the same kernel at p1 and p2
    np.testing.assert_allclose(k1, expected, rtol=1e-5)
    np.testing.assert_allclose(k2, expected, rtol=1e-5)

    def g(p, x):  # nonlinear in w: the kernel moves with the parameters
        return jnp.tanh(x @ p["w"]).sum(axis=1, keepdims=True)

    kg1, kg2 = empirical_ntk(g, p1, x, method="jacobian"), empirical_ntk(g, p2, x, method="jacobian")
    assert _shared_kernel_fn.cache_info().misses == 2
    for k, p in ((kg1, p1), (kg2, p2)):
        J = flatten_per_example(per_example_grads(lambda p, x: g(p, x)[:, 0], p, x))
        np.testing.assert_allclose(k, np.asarray(J @ J.T), rtol=1e-5, atol=1e-6)
    assert np.abs(kg1 - kg2).max() > 1e-3


def test_repeated_jacobian_free_calls_reuse_one_compiled_program():
    """``jacobian_free_ntk`` wraps ``f`` in its sum of outputs: the same ``f`` gives the same
    wrapper, so the second call (new parameter values) hits the memoised feature program and
    still equals ``J_s J_sᵀ`` at the new parameters."""
    from ntk_jax.kernels.features import _shared_feature_fn, sum_of_outputs
    x = jax.random.normal(jax.random.key(1), (4, 3))

    def f(p, x):
        return jnp.tanh(x @ p["w"])  # (n, 2)

    assert sum_of_outputs(f) is sum_of_outputs(f)
    _shared_feature_fn.cache_clear()
    for scale in (1.0, 2.0):
        p = {"w": scale * jnp.ones((3, 2))}
        K = jacobian_free_ntk(f, p, x)
        J = flatten_per_example(per_example_grads(sum_of_outputs(f), p, x))
        np.testing.assert_allclose(K, np.asarray(J @ J.T), rtol=1e-5, atol=1e-6)
    info = _shared_feature_fn.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    unhashable = type("F", (), {"__call__": lambda self, p, x: f(p, x), "__hash__": None})()
    np.testing.assert_allclose(jacobian_free_ntk(unhashable, p, x), K, rtol=1e-6)  # still works
