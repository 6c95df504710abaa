"""Exact eNTK of a convolutional model: the ``jacobian`` method's shared-parameter route for
convolutions (``contract.uses_convolution``) against its per-example-VJP loop, the other
methods and neural-tangents, and ``auto``'s choice."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_jax.kernels import contract, nt_compat
from ntk_jax.kernels.ntk import empirical_ntk
from ntk_jax.kernels.structured import structured_plan


def cnn(params, x):
    """x (n, 6, 6, 1) → (n, 3): conv 3x3 (4 channels), tanh, mean-pool, dense."""
    h = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h + params["b"]).mean(axis=(1, 2))
    return h @ params["dense"]


def mlp(params, x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"]) @ params["w2"]


@pytest.fixture(scope="module")
def problem():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"conv": jax.random.normal(k[0], (3, 3, 1, 4)) * 0.5, "b": jnp.zeros(4),
              "dense": jax.random.normal(k[1], (4, 3))}
    x1 = jax.random.normal(k[2], (5, 6, 6, 1))
    x2 = jax.random.normal(k[3], (3, 6, 6, 1))
    return params, x1, x2


def nt_kernel(f, params, x1, x2, trace):
    fn = nt_compat.empirical_ntk_fn(lambda p, x: f(p, x).reshape(x.shape[0], -1),
                                    trace_axes=(-1,) if trace else (), vmap_axes=0)
    k = np.asarray(fn(x1, x2, params), np.float64)
    return k * 3 if trace else k  # neural-tangents averages over traced axes


def test_convolution_is_detected(problem):
    params, x1, _ = problem
    assert contract.uses_convolution(cnn, params, x1)
    mp = {"w1": jnp.ones((36, 4)), "w2": jnp.ones((4, 3))}
    assert not contract.uses_convolution(mlp, mp, x1)
    # nested jaxprs (jit inside f) are searched too
    assert contract.uses_convolution(lambda p, x: jax.jit(cnn)(p, x), params, x1)


@pytest.mark.parametrize("trace", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
def test_conv_route_equals_loop_and_neural_tangents(problem, trace, symmetric, monkeypatch):
    params, x1, x2 = problem
    b = None if symmetric else x2
    ref = nt_kernel(cnn, params, x1, x1 if symmetric else x2, trace)
    K, info = empirical_ntk(cnn, params, x1, b, trace=trace, return_info=True)
    assert info["method"] == "jacobian"  # auto: convolutions → shared-parameter Jacobians
    assert structured_plan(cnn, params, x1, b, trace=trace).auto == "jacobian"
    np.testing.assert_allclose(K, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    for method in ("structured", "ntk_vp"):
        np.testing.assert_allclose(empirical_ntk(cnn, params, x1, b, trace=trace, method=method), ref,
                                   rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    # the per-example-VJP loop (the route without convolutions) gives the same kernel
    monkeypatch.setattr(contract, "uses_convolution", lambda *a: False)
    loop = empirical_ntk(cnn, params, x1, b, trace=trace, method="jacobian")
    np.testing.assert_allclose(loop, K, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
