"""Tests of ntk_jax.models.transformer (Llama-architecture decoder, HF conventions)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_jax.models.lora import LoRAConfig, apply_lora, iter_linears, merge_lora
from ntk_jax.models.layers import flatten_state, unflatten_state
from ntk_jax.models.transformer import (DecoderConfig, DecoderLM, load_pretrained, position_ids_from_mask,
                                        save_pretrained)

V = 40
ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def tiny_config(**kw) -> DecoderConfig:
    base = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=64, max_position_embeddings=32, rope_theta=500.0)
    base.update(kw)
    return DecoderConfig(**base)


@nnx.jit
def fwd(model, ids, mask=None):
    """Jitted forward: one compilation per model structure and shape (eager op-by-op dispatch
    costs seconds per new shape on CPU)."""
    return model(ids, attention_mask=mask)


def rand_ids(seed, shape):
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def randomize(model: nnx.Module, seed: int, scale: float = 0.3):
    """Random values for every parameter (norm weights and biases included, so bugs that
    ignore them show up)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
    rng = np.random.default_rng(seed)
    new = [jnp.asarray((1.0 if leaf.ndim == 1 else 0.0) + scale * rng.standard_normal(leaf.shape),
                       leaf.dtype) for leaf in leaves]
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, new))
    nnx.update(model, state)


# ------------------------------------------------------------------------------------ config


def test_config_defaults_and_roundtrip():
    c = DecoderConfig(vocab_size=10, hidden_size=32, num_heads=4)
    assert c.num_kv_heads == 4 and c.head_dim == 8
    c2 = DecoderConfig.from_dict(c.to_dict())
    assert c2 == c
    with pytest.raises(ValueError, match="bogus"):
        DecoderConfig.from_dict({**c.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecoderConfig(vocab_size=10, hidden_size=32, num_heads=4, num_kv_heads=3)


# ------------------------------------------------------------------------------------ forward


def test_shapes_and_dtype():
    cfg = tiny_config(head_dim=12)  # explicit head_dim != hidden / heads
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    ids = rand_ids(0, (3, 7))
    logits = fwd(model, ids)
    assert logits.shape == (3, 7, V) and logits.dtype == jnp.float32
    assert nnx.jit(lambda m, i: m.hidden_states(i))(model, ids).shape == (3, 7, 32)
    assert model.layers[0].self_attn.q_proj.kernel.shape == (32, 4 * 12)
    assert model.layers[0].self_attn.k_proj.kernel.shape == (32, 2 * 12)
    assert isinstance(model.layers, nnx.List) and len(model.layers) == 2


def test_causality():
    model = DecoderLM(tiny_config(), rngs=nnx.Rngs(1))
    randomize(model, 1)
    ids = rand_ids(1, (2, 10))
    ids2 = ids.copy()
    ids2[:, 6] = (ids2[:, 6] + 7) % V
    a, b = np.asarray(fwd(model, ids)), np.asarray(fwd(model, ids2))
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_unpadded(side):
    model = DecoderLM(tiny_config(), rngs=nnx.Rngs(2))
    randomize(model, 2)
    n_real, n_pad = 6, 4
    real = rand_ids(2, (1, n_real))
    ref = np.asarray(fwd(model, real))[0]
    pads = rand_ids(3, (1, n_pad))  # arbitrary tokens under mask 0
    if side == "left":
        ids = np.concatenate([pads, real], 1)
        mask = np.array([[0] * n_pad + [1] * n_real])
        sl = slice(n_pad, None)
    else:
        ids = np.concatenate([real, pads], 1)
        mask = np.array([[1] * n_real + [0] * n_pad])
        sl = slice(0, n_real)
    # batch it with an unpadded row of the same length to check rows do not interact
    other = rand_ids(4, (1, n_real + n_pad))
    logits = np.asarray(fwd(model, np.concatenate([ids, other]),
                              np.concatenate([mask, np.ones_like(mask)])))
    np.testing.assert_allclose(logits[0, sl], ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[1], np.asarray(fwd(model, other))[0], atol=1e-5, rtol=0)
    if side == "left":  # without the mask left padding changes the logits (the test can fail)
        assert np.abs(np.asarray(fwd(model, ids))[0, sl] - ref).max() > 1e-3


def test_position_ids_from_mask():
    # RoPE scores depend only on relative positions, so the padding test above cannot see a
    # global shift of the position ids; HF's convention (cumsum - 1) is checked directly.
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(position_ids_from_mask(jnp.asarray(mask), 3, 5)),
                                  [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(np.asarray(position_ids_from_mask(None, 2, 3)), [[0, 1, 2]] * 2)


def test_fully_masked_row_is_finite():
    model = DecoderLM(tiny_config(), rngs=nnx.Rngs(3))
    ids = rand_ids(5, (2, 5))
    mask = np.array([[0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    out = np.asarray(fwd(model, ids, mask))
    assert np.all(np.isfinite(out))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(ids, attention_mask=mask))))(model)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(nnx.state(grads)))


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_gqa_equals_mha_with_tiled_kv(kv):
    cfg = tiny_config(num_kv_heads=kv, attention_bias=True)
    gqa = DecoderLM(cfg, rngs=nnx.Rngs(4))
    randomize(gqa, 4)
    mha = DecoderLM(tiny_config(num_kv_heads=4, attention_bias=True), rngs=nnx.Rngs(5))
    H, D, hidden = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    rep = H // kv
    src = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
    flat = flatten_state(src)
    tiled = {}
    for name, w in flat.items():
        w = np.asarray(w)
        if name.endswith(("k_proj.kernel", "v_proj.kernel")):
            # MHA head h = GQA kv head h // rep: tile each kv head's D columns rep times
            w = np.repeat(w.reshape(hidden, kv, D), rep, axis=1).reshape(hidden, H * D)
        elif name.endswith(("k_proj.bias", "v_proj.bias")):
            w = np.repeat(w.reshape(kv, D), rep, axis=0).reshape(H * D)
        tiled[name] = jnp.asarray(w)
    st = nnx.state(mha, nnx.Param)
    nnx.replace_by_pure_dict(st, unflatten_state(tiled))
    nnx.update(mha, st)
    ids = rand_ids(6, (2, 9))
    mask = np.array([[1] * 9, [0, 0, 0] + [1] * 6])
    np.testing.assert_allclose(np.asarray(fwd(gqa, ids, mask)), np.asarray(fwd(mha, ids, mask)), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ numpy reference


def np_rmsnorm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def np_rope(x, pos, theta):
    """x: (T, D) one head. Rotates pairs (i, i + D/2) by angle pos * theta^(-2i/D)."""
    T, D = x.shape
    half = D // 2
    out = np.empty_like(x)
    for t in range(T):
        for i in range(half):
            ang = pos[t] * theta ** (-2.0 * i / D)
            c, s = np.cos(ang), np.sin(ang)
            a, b = x[t, i], x[t, i + half]
            out[t, i] = a * c - b * s
            out[t, i + half] = b * c + a * s
    return out


def np_forward(p, cfg: DecoderConfig, ids):
    """Float64 reference forward for one sequence ``ids`` (T,) of a 1-layer model."""
    f = {k: np.asarray(v, np.float64) for k, v in flatten_state(p).items()}
    T = len(ids)
    H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = f["embed_tokens.embedding"][ids]
    pre = "layers.0."

    def lin(name, h):
        y = h @ f[pre + name + ".kernel"]
        if pre + name + ".bias" in f:
            y = y + f[pre + name + ".bias"]
        return y

    h = np_rmsnorm(x, f[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
    q, k, v = lin("self_attn.q_proj", h), lin("self_attn.k_proj", h), lin("self_attn.v_proj", h)
    pos = np.arange(T)
    heads = []
    for hh in range(H):
        g = hh // (H // KV)
        qh = np_rope(q[:, hh * D:(hh + 1) * D], pos, cfg.rope_theta)
        kh = np_rope(k[:, g * D:(g + 1) * D], pos, cfg.rope_theta)
        vh = v[:, g * D:(g + 1) * D]
        s = qh @ kh.T / np.sqrt(D)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        heads.append((s / s.sum(-1, keepdims=True)) @ vh)
    x = x + lin("self_attn.o_proj", np.concatenate(heads, -1))
    h = np_rmsnorm(x, f[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    g = lin("mlp.gate_proj", h)
    x = x + lin("mlp.down_proj", (g / (1 + np.exp(-g))) * lin("mlp.up_proj", h))
    x = np_rmsnorm(x, f["norm.weight"], cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:
        return x @ f["embed_tokens.embedding"].T
    return x @ f["lm_head.kernel"]


@pytest.mark.parametrize("tie,bias,kv", [(False, False, 2), (True, True, 1)])
def test_numpy_reference_forward(tie, bias, kv):
    cfg = tiny_config(num_layers=1, num_kv_heads=kv, tie_word_embeddings=tie, attention_bias=bias,
                      rms_norm_eps=1e-5)
    model = DecoderLM(cfg, rngs=nnx.Rngs(7))
    randomize(model, 7)
    assert (model.lm_head is None) == tie
    ids = rand_ids(8, (2, 8))
    logits = np.asarray(fwd(model, ids))
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for b in range(2):
        ref = np_forward(p, cfg, ids[b])
        np.testing.assert_allclose(logits[b], ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ LoRA


def test_lora_zero_b_identity_and_merge():
    cfg = tiny_config()
    model = DecoderLM(cfg, rngs=nnx.Rngs(9))
    randomize(model, 9)
    ids = rand_ids(10, (2, 8))
    mask = np.array([[1] * 8, [0, 0] + [1] * 6])
    base = np.asarray(fwd(model, ids, mask))
    adapted = apply_lora(model, LoRAConfig(rank=3, alpha=6.0, targets=ALL_PROJ), rngs=nnx.Rngs(10))
    assert len(adapted) == 7 * cfg.num_layers + 1
    np.testing.assert_array_equal(np.asarray(fwd(model, ids, mask)), base)  # B = 0: exactly the base model
    # random B
    for i, (_, lin) in enumerate(iter_linears(model)):
        b = lin.lora.lora_b
        b[...] = jnp.asarray(0.2 * np.random.default_rng(100 + i).standard_normal(b.shape), b.dtype)
    lora_out = np.asarray(fwd(model, ids, mask))
    assert np.abs(lora_out - base).max() > 1e-2
    assert merge_lora(model) == len(adapted)
    assert all(lin.lora is None for _, lin in iter_linears(model))
    np.testing.assert_allclose(np.asarray(fwd(model, ids, mask)), lora_out, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ I/O


def test_flatten_unflatten_roundtrip():
    tree = {"layers": {0: {"a": 1}, 1: {"a": 2}}, "norm": {"weight": 3}}
    flat = flatten_state(tree)
    assert flat == {"layers.0.a": 1, "layers.1.a": 2, "norm.weight": 3}
    assert unflatten_state(flat) == tree


@pytest.mark.parametrize("kw", [dict(), dict(tie_word_embeddings=True, attention_bias=True, num_kv_heads=1)])
def test_save_load_roundtrip(tmp_path, kw):
    from safetensors import safe_open

    cfg = tiny_config(**kw)
    model = DecoderLM(cfg, rngs=nnx.Rngs(11))
    randomize(model, 11)
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj",)), rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path)
    with open(tmp_path / "config.json") as f:
        d = json.load(f)
    assert d["model_type"] == "ntk_jax_decoder" and DecoderConfig.from_dict(
        {k: v for k, v in d.items() if k != "model_type"}) == cfg
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "layers.0.self_attn.q_proj.kernel" in names
    assert not any("lora" in n for n in names)
    assert ("lm_head.kernel" in names) != cfg.tie_word_embeddings
    merge_lora(model)  # B = 0, so merging is a no-op on the logits; compare the base model
    loaded = load_pretrained(tmp_path)
    assert loaded.config == cfg
    ids = rand_ids(12, (2, 7))
    np.testing.assert_array_equal(np.asarray(fwd(loaded, ids)), np.asarray(fwd(model, ids)))
    loaded2 = load_pretrained(tmp_path, rngs=nnx.Rngs(123))
    np.testing.assert_array_equal(np.asarray(fwd(loaded2, ids)), np.asarray(fwd(model, ids)))


def test_load_errors(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = DecoderLM(tiny_config(), rngs=nnx.Rngs(13))
    save_pretrained(model, tmp_path)
    wpath = str(tmp_path / "model.safetensors")
    tensors = load_file(wpath)

    missing = dict(tensors)
    del missing["layers.1.mlp.up_proj.kernel"]
    save_file(missing, wpath)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.kernel"):
        load_pretrained(tmp_path)

    bad = dict(tensors)
    bad["norm.weight"] = np.ones((31,), np.float32)
    save_file(bad, wpath)
    with pytest.raises(ValueError, match=r"norm\.weight.*\(31,\)"):
        load_pretrained(tmp_path)

    extra = dict(tensors)
    extra["layers.2.mlp.up_proj.kernel"] = tensors["layers.1.mlp.up_proj.kernel"]
    save_file(extra, wpath)
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.up_proj\.kernel"):
        load_pretrained(tmp_path)

    os.remove(wpath)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "nowhere")
