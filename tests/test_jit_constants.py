"""``jit_constants_as_args``: the library's programs take the frozen weights they close over
as arguments, not as constants embedded in the compiled module (an 8B model's weights cannot
be embedded)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_jax.kernels.features import make_feature_fn
from ntk_jax.kernels.jit import EMBED_MAX_BYTES, jit_constants_as_args
from ntk_jax.kernels.projection import RandomProjection
from ntk_jax.models.lora import LoRAConfig, apply_lora
from ntk_jax.models.subset import param_subset
from ntk_jax.models.transformer import DecoderConfig, DecoderLM
from ntk_jax.selection.ntk_selector import ntk_scalar_fn

_CONST = re.compile(r"stablehlo\.constant dense<[^>]*> : tensor<((?:\d+x)*)\w+>")


def largest_constant(lowered) -> int:
    """Elements of the largest array constant in a lowered program's StableHLO."""
    sizes = [int(np.prod([int(d) for d in m.group(1).split("x") if d] or [1]))
             for m in _CONST.finditer(lowered.as_text())]
    return max(sizes, default=0)


def test_same_values_as_jit_and_large_closures_are_arguments():
    w = jax.random.normal(jax.random.key(0), (256, 128))
    small = jnp.arange(3.0)

    def f(x, y):
        return {"a": jnp.tanh(x @ w) + small.sum(), "b": None if y is None else y * 2.0}

    g = jit_constants_as_args(f)
    x = jax.random.normal(jax.random.key(1), (5, 256))
    for y in (None, jnp.ones(4)):
        want, got = jax.jit(f)(x, y), g(x, y)
        np.testing.assert_allclose(got["a"], want["a"], rtol=1e-6)
        assert (got["b"] is None) == (y is None)
    assert [c.shape for c in g.hoisted_constants(x, None)] == [(256, 128)]  # `small` stays embedded
    host = np.asarray(w)  # a large host array stays embedded (as an argument it would be copied every call)
    h = jit_constants_as_args(lambda x: x @ host)
    assert h.hoisted_constants(x) == []
    np.testing.assert_allclose(h(x), x @ w, rtol=1e-5)
    assert largest_constant(jax.jit(f).lower(x, None)) == 256 * 128  # the check can fail...
    assert largest_constant(g.lower(x, None)) < 256 * 128  # ...and does not here
    # a new shape is a new signature; inside a transformation it is jax.jit(f)
    np.testing.assert_allclose(g(x[:2], None)["a"], jax.jit(f)(x[:2], None)["a"], rtol=1e-6)
    grad = jax.grad(lambda x: g(x, None)["a"].sum())(x)
    np.testing.assert_allclose(grad, jax.grad(lambda x: f(x, None)["a"].sum())(x), rtol=1e-5)


def test_refuses_input_side_jit_options():
    with pytest.raises(TypeError, match="static_argnums"):
        jit_constants_as_args(lambda x: x, static_argnums=0)
    with pytest.raises(TypeError, match="in_shardings"):
        jit_constants_as_args(in_shardings=None)(lambda x: x)


def test_selection_feature_program_takes_the_frozen_weights_as_arguments():
    cfg = DecoderConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj"), b_init_std=0.02), rngs=nnx.Rngs(1))
    subset = param_subset(model)
    ids = np.random.default_rng(0).integers(0, 64, (3, 8)).astype(np.int32)
    x = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((3, 8), jnp.int32),
         "loss_mask": jnp.asarray(np.tile([0, 0, 0, 0, 1, 1, 1, 1], (3, 1)), jnp.float32)}
    scalar_fn = ntk_scalar_fn(subset)
    biggest_weight = max(int(np.prod(v.shape)) for v in jax.tree.leaves(subset.frozen))
    assert biggest_weight * 4 > EMBED_MAX_BYTES
    plain = jax.jit(lambda p, b: jax.vmap(jax.grad(lambda q, e: scalar_fn(q, jax.tree.map(
        lambda a: a[None], e))[0]), in_axes=(None, 0))(p, b))
    assert largest_constant(plain.lower(subset.params, x)) >= biggest_weight  # jax.jit embeds them
    for projection in (None, RandomProjection(256, seed=0)):
        fn = make_feature_fn(scalar_fn, projection)
        matrix = fn.projection_matrix(subset.params)
        assert largest_constant(fn.compiled.lower(subset.params, x, matrix)) * 4 <= EMBED_MAX_BYTES
        hoisted = fn.compiled.hoisted_constants(subset.params, x, matrix)
        assert sum(int(np.prod(c.shape)) for c in hoisted) >= sum(
            int(np.prod(v.shape)) for v in jax.tree.leaves(subset.frozen) if v.size * 4 > EMBED_MAX_BYTES)
        feats = fn(subset.params, x)
        assert feats.shape == (3, subset.num_params if projection is None else 256)
        assert np.all(np.isfinite(np.asarray(feats)))
