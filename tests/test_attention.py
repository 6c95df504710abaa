"""The shared attention (``ntk_jax.models.layers.dot_product_attention``): the causal, blocked
computation against a dense masked softmax written out here, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_jax.models import layers
from ntk_jax.models.layers import dot_product_attention


def dense_reference(q, k, v, mask, scale):
    """Plain numpy attention over all keys: (B, T, H, D), (B, S, KV, D) → (B, T, H*D)."""
    q, k, v, mask = (np.asarray(a, np.float64) for a in (q, k, v, mask))
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    k = np.repeat(k, rep, axis=2)
    v = np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = np.where(mask[:, None] > 0, s, np.finfo(np.float32).min)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, T, H * D)


def causal_mask(T, lengths, left_pad, window=None):
    """(B, T, T) bool: causal, padded keys hidden (left or right padding), optional window."""
    i = np.arange(T)
    m = i[None, :] <= i[:, None]
    if window is not None:
        m &= i[None, :] > i[:, None] - window
    keys = np.zeros((len(lengths), T), bool)
    for b, n in enumerate(lengths):
        if left_pad:
            keys[b, T - n:] = True
        else:
            keys[b, :n] = True
    return m[None] & keys[:, None, :], keys


def draw(T, H, KV, D=4, B=3, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32),
            jnp.asarray(rng.normal(size=(B, T, KV, D)), jnp.float32),
            jnp.asarray(rng.normal(size=(B, T, KV, D)), jnp.float32))


@pytest.mark.parametrize("T", [1, 5, 8, 17])
@pytest.mark.parametrize("H,KV", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("left_pad,window", [(False, None), (True, None), (False, 3)])
def test_blocked_causal_equals_dense(T, H, KV, left_pad, window):
    q, k, v = draw(T, H, KV, seed=T + H + KV)
    lengths = [T, max(1, T - 3), max(1, T // 2)]
    mask, keys = causal_mask(T, lengths, left_pad, window)
    ref = dense_reference(q, k, v, mask, 0.5)
    real = keys  # compare the real query rows (padding rows are meaningless)
    for block in (1, 4, 64):
        out = np.asarray(dot_product_attention(q, k, v, jnp.asarray(mask), 0.5, causal=True, query_block=block))
        np.testing.assert_allclose(out[real], ref[real], rtol=2e-5, atol=2e-6)
        assert np.isfinite(out).all()
    # not declared causal: one block over every key, same values
    out = np.asarray(dot_product_attention(q, k, v, jnp.asarray(mask), 0.5))
    np.testing.assert_allclose(out[real], ref[real], rtol=2e-5, atol=2e-6)


def test_gradients_of_blocked_equal_unblocked():
    T, H, KV = 13, 4, 2
    q, k, v = draw(T, H, KV, seed=3)
    mask, keys = causal_mask(T, [T, 9, 4], True)
    mask = jnp.asarray(mask)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, T, H * 4)) * keys[..., None], jnp.float32)

    def loss(block, causal):
        return lambda q, k, v: jnp.sum(w * dot_product_attention(q, k, v, mask, 0.5, causal=causal,
                                                                 query_block=block))

    g_ref = jax.grad(loss(None, False), argnums=(0, 1, 2))(q, k, v)
    for block in (2, 5):
        g = jax.grad(loss(block, True), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g, g_ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_key_mask_broadcast_and_bf16():
    """A (B, 1, S) key mask (BERT) and bfloat16 inputs: scores and softmax in float32."""
    T, H = 6, 2
    q, k, v = draw(T, H, H, seed=5)
    keys = np.ones((3, T), bool)
    keys[1, 4:] = False
    ref = dense_reference(q, k, v, np.broadcast_to(keys[:, None, :], (3, T, T)), 0.5)
    out = dot_product_attention(q, k, v, jnp.asarray(keys[:, None, :]), 0.5)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-6)
    out16 = dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), jnp.asarray(keys[:, None, :]), 0.5)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), ref, atol=0.05)


def test_default_block_is_read_at_trace_time(monkeypatch):
    q, k, v = draw(9, 2, 2)
    mask = jnp.asarray(causal_mask(9, [9, 9, 9], False)[0])
    base = np.asarray(dot_product_attention(q, k, v, mask, 1.0, causal=True))
    monkeypatch.setattr(layers, "CAUSAL_QUERY_BLOCK", 2)
    jaxpr = str(jax.make_jaxpr(lambda q: dot_product_attention(q, k, v, mask, 1.0, causal=True))(q))
    assert jaxpr.count("dot_general") == 2 * 5  # ceil(9 / 2) blocks, two contractions each
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, mask, 1.0, causal=True)), base,
                               rtol=1e-5, atol=1e-6)


def test_errors():
    q, k, v = draw(4, 3, 2)
    with pytest.raises(ValueError, match="divide"):
        dot_product_attention(q, k, v, None, 1.0)
    q, k, v = draw(4, 2, 2)
    with pytest.raises(ValueError, match="as many keys as queries"):
        dot_product_attention(q, k[:, :3], v[:, :3], None, 1.0, causal=True)
    with pytest.raises(ValueError, match="query_block"):
        dot_product_attention(q, k, v, None, 1.0, causal=True, query_block=0)


def _both_rules(monkeypatch, fn):
    """``fn()`` with the attention's written-out derivative and with JAX's op-by-op one."""
    monkeypatch.setattr(layers, "ATTENTION_JVP_RULE", True)
    rule = fn()
    monkeypatch.setattr(layers, "ATTENTION_JVP_RULE", False)
    plain = fn()
    monkeypatch.setattr(layers, "ATTENTION_JVP_RULE", True)
    return rule, plain


@pytest.mark.parametrize("H,KV,left_pad,window,causal,block", [
    (4, 2, True, None, True, 4), (4, 4, False, 3, True, 2), (4, 1, False, None, False, None),
    (2, 2, True, None, False, None)])
def test_written_out_derivative_equals_op_by_op(monkeypatch, H, KV, left_pad, window, causal, block):
    """Reverse, forward and second-order derivatives of the attention with the rule of
    ``layers._attention_block`` equal JAX's differentiation of the same ops, padding rows (no
    visible key) included."""
    T = 11
    q, k, v = draw(T, H, KV, seed=H + KV + T)
    mask = jnp.asarray(causal_mask(T, [T, 7, 3], left_pad, window)[0])
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(3, T, H * 4)), jnp.float32)
    tq, tk, tv = (jnp.asarray(rng.normal(size=a.shape), jnp.float32) for a in (q, k, v))
    f = lambda q, k, v: dot_product_attention(q, k, v, mask, 0.5, causal=causal, query_block=block)
    loss = lambda q, k, v: jnp.sum(w * f(q, k, v))

    def derivatives():
        out, tangent = jax.jvp(f, (q, k, v), (tq, tk, tv))
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        # forward over reverse (NTK-vector products) and reverse over forward
        fwd_rev = jax.jvp(lambda q, k, v: jax.grad(loss, argnums=(0, 1, 2))(q, k, v), (q, k, v), (tq, tk, tv))[1]
        rev_fwd = jax.grad(lambda q, k, v: jnp.sum(w * jax.jvp(f, (q, k, v), (tq, tk, tv))[1]),
                           argnums=(0, 1, 2))(q, k, v)
        return [out, tangent, *grads, *fwd_rev, *rev_fwd]

    rule, plain = _both_rules(monkeypatch, derivatives)
    for a, b in zip(rule, plain):
        scale = float(np.abs(np.asarray(b)).max()) + 1e-30
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-5)


def test_written_out_derivative_in_bfloat16(monkeypatch):
    """bfloat16 inputs: the tangent has the output's dtype and the gradients agree with the
    op-by-op ones to bfloat16 precision."""
    T, H = 9, 4
    q, k, v = (a.astype(jnp.bfloat16) for a in draw(T, H, 2, seed=7))
    mask = jnp.asarray(causal_mask(T, [T, 5, 2], True)[0])
    f = lambda q, k, v: dot_product_attention(q, k, v, mask, 0.5, causal=True, query_block=4)
    out, tangent = jax.jvp(f, (q, k, v), (q, k, v))
    assert out.dtype == tangent.dtype == jnp.bfloat16
    grads = lambda: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2),
                             argnums=(0, 1, 2))(q, k, v)
    rule, plain = _both_rules(monkeypatch, grads)
    for a, b in zip(rule, plain):
        assert a.dtype == jnp.bfloat16 and np.isfinite(np.asarray(a, np.float32)).all()
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=0.05 * float(np.abs(np.asarray(b, np.float32)).max()))
