"""bfloat16 compute with float32 where it matters.

With ``dtype=bfloat16`` the ports compute projections and MLPs in bf16 but norm statistics,
attention scores + softmax and the output logits in float32 (``ntk_jax.models.layers``).
Checked three ways: the traced program (every reduction, ``exp`` and ``rsqrt`` runs on
float32; the score and logit matmuls accumulate into float32), the numbers (norms of bf16
inputs equal a float64 reference to bf16 rounding, where a bf16-internal LayerNorm is off
by orders of magnitude more; whole-model bf16 logits within bf16-level relative error of
float32), and the kernel outputs (``lm_output_fn`` gives float32 from a bf16 model).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_jax.kernels.outputs import lm_output_fn
from ntk_jax.models.bert import BertConfig, BertForSequenceClassification
from ntk_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from ntk_jax.models.layers import LayerNorm
from ntk_jax.models.lora import LoRAConfig, apply_lora, lora_filter
from ntk_jax.models.subset import param_subset
from ntk_jax.models.transformer import DecoderConfig, DecoderLM, RMSNorm

BF16 = jnp.bfloat16
EPS_BF16 = 2.0 ** -8  # bf16 unit roundoff (8 significand bits)


def _eqns(jaxpr):
    """Every equation of a jaxpr, recursing into sub-jaxprs (pjit, custom_jvp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _eqns(sub.jaxpr)


def traced(model, *args):
    graphdef, state = nnx.split(model)
    return jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args).jaxpr


def with_compute_dtype(model_cls, config, model_f32):
    """``model_cls(config with dtype=bf16)`` holding ``model_f32``'s (float32) parameters."""
    m = model_cls(dataclasses.replace(config, dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(m, nnx.state(model_f32))
    return m


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


DEC = DecoderConfig(vocab_size=40, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=96, max_position_embeddings=32)


@pytest.fixture(scope="module")
def decoders():
    m32 = DecoderLM(DEC, rngs=nnx.Rngs(0))
    apply_lora(m32, LoRAConfig(rank=4, targets=("q_proj", "v_proj"), b_init_std=0.05), rngs=nnx.Rngs(1))
    m16 = DecoderLM(dataclasses.replace(DEC, dtype="bfloat16"), rngs=nnx.Rngs(0))
    apply_lora(m16, LoRAConfig(rank=4, targets=("q_proj", "v_proj"), b_init_std=0.05), rngs=nnx.Rngs(1))
    nnx.update(m16, nnx.state(m32))
    ids = np.random.default_rng(0).integers(0, DEC.vocab_size, (3, 12)).astype(np.int32)
    return m32, m16, ids


def test_decoder_program_keeps_reductions_softmax_and_logits_in_float32(decoders):
    _, m16, ids = decoders
    eqns = list(_eqns(traced(m16, ids)))
    prims = {e.primitive.name for e in eqns}
    assert {"reduce_sum", "reduce_max", "exp", "rsqrt", "dot_general"} <= prims
    # bf16 compute really happens (the check below is not vacuous) ...
    bf16_dots = [e for e in eqns if e.primitive.name == "dot_general" and e.invars[0].aval.dtype == BF16]
    assert len(bf16_dots) >= 7 * DEC.num_layers
    # ... but every norm/softmax statistic, exp and rsqrt is float32.
    for e in eqns:
        if e.primitive.name in ("reduce_sum", "reduce_max", "exp", "rsqrt", "log"):
            assert all(v.aval.dtype == jnp.float32 for v in e.invars if hasattr(v, "aval")), e
    # Attention scores (B, KV, rep·T, T: one causal query block at this length; dot_general may
    # order the axes differently) and the logits (B, T, V) accumulate into float32.
    B, T = ids.shape
    rep = DEC.num_heads // DEC.num_kv_heads
    f32_out = [e.outvars[0].aval for e in bf16_dots if e.outvars[0].aval.dtype == jnp.float32]
    assert sum(sorted(a.shape) == sorted((B, DEC.num_kv_heads, rep * T, T)) for a in f32_out) == DEC.num_layers
    assert any(a.shape == (B, T, DEC.vocab_size) for a in f32_out)


def test_decoder_bf16_logits_close_to_float32(decoders):
    m32, m16, ids = decoders
    y32, y16 = m32(ids), m16(ids)
    assert y16.dtype == jnp.float32
    err = rel_err(y16, y32)
    assert 0 < err < 8 * EPS_BF16, err  # bf16-level error, not float32-exact


def test_lm_output_fn_is_float32_from_bf16_model(decoders):
    m32, m16, ids = decoders
    mask = np.zeros(ids.shape, np.float32)
    mask[:, 5:] = 1.0
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": mask}
    outs = []
    for m in (m32, m16):
        sub = param_subset(m, lora_filter(layers=[0]))
        out = lm_output_fn(sub)(sub.params, batch)
        assert out.dtype == jnp.float32 and out.shape == (3, DEC.vocab_size)
        outs.append(out)
    assert rel_err(outs[1], outs[0]) < 8 * EPS_BF16


def _f64_layer_norm(x, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def test_layer_norm_statistics_in_float32():
    """Inputs with a large common offset: bf16 statistics would lose the signal."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(50.0 + rng.normal(size=(4, 256)), BF16)
    ln = LayerNorm(256, 1e-5)
    out = ln(x)
    assert out.dtype == BF16
    ref = _f64_layer_norm(x, 1e-5)
    err = np.abs(np.asarray(out, np.float64) - ref)
    assert np.all(err <= EPS_BF16 * np.abs(ref) + 1e-6)  # one bf16 rounding of the output
    # The same computation with bf16 statistics (what float32 accumulation prevents) is far off.
    xb = x.astype(BF16)
    mu = jnp.mean(xb, -1, keepdims=True).astype(BF16)
    naive = (xb - mu) * jax.lax.rsqrt((jnp.mean(jnp.square(xb - mu), -1, keepdims=True) + 1e-5).astype(BF16))
    assert np.max(np.abs(np.asarray(naive, np.float64) - ref)) > 10 * np.max(err)


def test_rms_norm_matches_float64_to_bf16_rounding():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 8, 256)) * np.exp(rng.normal(size=(4, 8, 1))), BF16)
    norm = RMSNorm(256, 1e-6)
    norm.weight[...] = jnp.asarray(1.0 + 0.2 * rng.normal(size=256), jnp.float32)
    out = norm(x)
    assert out.dtype == BF16
    xf = np.asarray(x, np.float64)
    w = np.asarray(norm.weight[...].astype(BF16), np.float64)
    h = xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + 1e-6)
    ref = w * h
    # HF order: normalise in float32, round to bf16, multiply by the bf16 weight (two roundings).
    assert np.all(np.abs(np.asarray(out, np.float64) - ref) <= 2.01 * EPS_BF16 * np.abs(ref) + 1e-6)


def test_gpt2_and_bert_bf16_logits():
    ids = np.random.default_rng(2).integers(0, 40, (2, 10)).astype(np.int32)
    gcfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=64, n_layer=2, n_head=4)
    g32 = GPT2LMHeadModel(gcfg, rngs=nnx.Rngs(0))
    g16 = with_compute_dtype(GPT2LMHeadModel, gcfg, g32)
    y32, y16 = g32(ids), g16(ids)
    assert y16.dtype == jnp.float32 and 0 < rel_err(y16, y32) < 8 * EPS_BF16
    bcfg = BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=96, max_position_embeddings=16, num_labels=3)
    b32 = BertForSequenceClassification(bcfg, rngs=nnx.Rngs(0))
    b16 = with_compute_dtype(BertForSequenceClassification, bcfg, b32)
    z32, z16 = b32(ids), b16(ids)
    assert z16.dtype == jnp.float32 and z16.shape == (2, 3)
    assert 0 < rel_err(z16, z32) < 8 * EPS_BF16
    for m in (g16, b16):
        for e in _eqns(traced(m, ids)):
            if e.primitive.name in ("reduce_sum", "reduce_max", "exp", "rsqrt"):
                assert all(v.aval.dtype == jnp.float32 for v in e.invars if hasattr(v, "aval")), e
