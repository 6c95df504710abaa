"""A Llama-architecture decoder-only language model in Flax NNX, with Hugging Face naming.

The module follows ``transformers``' ``LlamaForCausalLM`` so that real Llama / Qwen2 /
Mistral checkpoints can be loaded into it by renaming tensors only:

* RMSNorm with a learned ``weight``, computed in (at least) float32, eps from the config;
* rotary position embeddings with HF's ``rotate_half`` convention on the full ``head_dim``
  (``cos``/``sin`` of ``concat(freqs, freqs)``), base ``rope_theta``;
* causal self-attention with grouped-query attention (``num_kv_heads`` divides
  ``num_heads``; query head ``h`` uses key/value head ``h // (num_heads // num_kv_heads)``,
  HF's ``repeat_kv``) and an explicit ``head_dim``; scores scaled by ``head_dim ** -0.5``,
  softmax in (at least) float32;
* SwiGLU MLP ``down_proj(silu(gate_proj(x)) * up_proj(x))``;
* optional tied input/output embeddings.

Config switches cover the HF variants without copies of the decoder (see
:mod:`ntk_jax.models.hf_loading` for the ``config.json`` converters):

* ``attention_bias`` — biases on ``q/k/v_proj`` (Qwen2; Llama/Qwen3 ``attention_bias``);
  ``o_proj_bias`` — a bias on ``o_proj`` (Llama/Qwen3 ``attention_bias``, *not* Qwen2);
  ``mlp_bias`` — biases on the MLP projections (Llama ``mlp_bias``);
* ``qk_norm`` — Qwen3's RMSNorm over ``head_dim`` of every query and key head
  (``self_attn.q_norm`` / ``self_attn.k_norm``, weight ``(head_dim,)``), before RoPE;
* ``rope_scaling`` — ``None`` or HF's ``{"rope_type": "linear", "factor"}`` /
  ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"}`` (other types raise ``ValueError``);
* ``sliding_window`` / ``layer_types`` — Mistral/Qwen sliding-window attention: query ``i``
  sees key ``j`` iff ``i - window < j <= i`` (sequence indices, HF's ``sliding_window_overlay``),
  on every layer (``layer_types=None``) or on the layers marked ``"sliding_attention"``.

Module tree (NNX paths; HF names without the ``model.`` prefix)::

    embed_tokens                      nnx.Embed        .embedding (vocab, hidden)
    layers[i].input_layernorm         RMSNorm          .weight (hidden,)
    layers[i].self_attn.{q,k,v,o}_proj LoRALinear       .kernel (in, out) [.bias]
    layers[i].self_attn.{q,k}_norm    RMSNorm (qk_norm) .weight (head_dim,)
    layers[i].post_attention_layernorm RMSNorm
    layers[i].mlp.{gate,up,down}_proj  LoRALinear
    norm                              RMSNorm
    lm_head                           LoRALinear (None when embeddings are tied)

Kernels are stored ``(in_features, out_features)``, i.e. the transpose of a PyTorch
``nn.Linear.weight``.

Padding: ``attention_mask`` (B, T) with 1 for real tokens and 0 for padding. Keys with mask 0
are excluded from attention and position ids are ``cumsum(mask) - 1`` (clipped at 0), so a
left- or right-padded sequence gives the same logits on its real tokens as the unpadded one.
Logits at padded positions are finite but meaningless.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from ntk_jax.models.layers import ConfigMixin, attend_f32, attention_scores, linear_f32, with_dtypes
from ntk_jax.models.lora import LoRALinear

Array = jax.Array

MODEL_TYPE = "ntk_jax_decoder"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

__all__ = [
    "DecoderConfig",
    "RMSNorm",
    "Attention",
    "MLP",
    "DecoderBlock",
    "DecoderLM",
    "rope_inv_freq",
    "ROPE_SCALING_TYPES",
    "rope_cos_sin",
    "rotate_half",
    "apply_rope",
    "position_ids_from_mask",
    "flatten_state",
    "unflatten_state",
    "save_pretrained",
    "load_pretrained",
]


# ---------------------------------------------------------------------------------------
# Config

LAYER_TYPES = ("full_attention", "sliding_attention")

# rope_type -> required keys (besides "rope_type"); HF names (``modeling_rope_utils``).
ROPE_SCALING_TYPES: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _normalize_rope_scaling(rs: Mapping[str, Any] | None) -> FrozenDict | None:
    """Validates HF-style RoPE scaling and returns it as a hashable ``FrozenDict``.

    Accepts the type under ``"rope_type"`` or HF's legacy ``"type"``; ``None`` and
    ``"default"`` mean no scaling. Unknown types, missing or unknown keys raise ``ValueError``.
    """
    if rs is None:
        return None
    if not isinstance(rs, Mapping):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(rs).__name__}")
    d = dict(rs)
    rtype = d.pop("rope_type", None)
    legacy = d.pop("type", None)
    rtype = rtype if rtype is not None else legacy
    if rtype is None:
        raise ValueError(f"rope_scaling {dict(rs)} has no 'rope_type'")
    if rtype == "default":
        if d:
            raise ValueError(f"rope_scaling of type 'default' takes no parameters, got {sorted(d)}")
        return None
    if rtype not in ROPE_SCALING_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rtype!r}; supported: "
                         f"{sorted(ROPE_SCALING_TYPES)} (or None / 'default')")
    required = ROPE_SCALING_TYPES[rtype]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"rope_scaling of type {rtype!r} is missing {missing}")
    unknown = sorted(set(d) - set(required))
    if unknown:
        raise ValueError(f"rope_scaling of type {rtype!r} has unsupported keys {unknown}; "
                         f"expected exactly {list(required)}")
    out: dict[str, Any] = {"rope_type": rtype}
    for k in required:
        v = d[k]
        out[k] = int(v) if k == "original_max_position_embeddings" else float(v)
        if out[k] <= 0:
            raise ValueError(f"rope_scaling[{k!r}] must be positive, got {v!r}")
    if rtype == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")
    return FrozenDict(out)


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ConfigMixin):
    """Hyper-parameters of :class:`DecoderLM` (names follow HF's ``LlamaConfig`` loosely).

    ``num_kv_heads=None`` means ``num_heads`` (multi-head attention) and ``head_dim=None``
    means ``hidden_size // num_heads``; both are resolved on construction, so ``to_dict``
    always holds explicit values. ``initializer_range=None`` uses LeCun-normal kernels and
    Flax's default embedding init; a float uses ``normal(initializer_range)`` everywhere
    (HF's init).

    HF-variant switches (all off by default): ``attention_bias`` (q/k/v biases),
    ``o_proj_bias``, ``mlp_bias``, ``qk_norm`` (Qwen3), ``rope_scaling`` (a dict, stored as an
    immutable ``FrozenDict`` with the type under ``"rope_type"``; ``{"rope_type": "default"}``
    is normalised to ``None``), ``sliding_window`` (int window, ``None`` = full causal
    attention) and ``layer_types`` (``None``: every layer uses ``sliding_window``; else one of
    ``"full_attention"`` / ``"sliding_attention"`` per layer).
    """

    vocab_size: int
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 128
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float | None = None
    qk_norm: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: Mapping[str, Any] | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {v!r}")
        kv = self.num_heads if self.num_kv_heads is None else int(self.num_kv_heads)
        if kv <= 0 or self.num_heads % kv:
            raise ValueError(f"num_kv_heads={kv} must be positive and divide num_heads={self.num_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads="
                                 f"{self.num_heads}; set head_dim explicitly")
            hd = self.hidden_size // self.num_heads
        else:
            hd = int(self.head_dim)
        if hd <= 0 or hd % 2:
            raise ValueError(f"head_dim must be a positive even number (RoPE rotates pairs), got {hd}")
        object.__setattr__(self, "num_kv_heads", kv)
        object.__setattr__(self, "head_dim", hd)
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"DecoderConfig.{name}={getattr(self, name)!r} is not a dtype name") from e
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        object.__setattr__(self, "rope_scaling", _normalize_rope_scaling(self.rope_scaling))
        if self.sliding_window is not None:
            w = self.sliding_window
            if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w <= 0:
                raise ValueError(f"sliding_window must be a positive int or None, got {w!r}")
            object.__setattr__(self, "sliding_window", int(w))
        if self.layer_types is not None:
            lt = tuple(str(t) for t in self.layer_types)
            bad = sorted(set(lt) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"layer_types {bad} not supported; use {list(LAYER_TYPES)}")
            if len(lt) != self.num_layers:
                raise ValueError(f"layer_types has {len(lt)} entries for num_layers={self.num_layers}")
            if self.sliding_window is None and "sliding_attention" in lt:
                raise ValueError("layer_types marks sliding_attention layers but sliding_window is None")
            object.__setattr__(self, "layer_types", lt)

    def uses_sliding_window(self, layer: int) -> bool:
        """Whether layer ``layer`` restricts attention to the last ``sliding_window`` keys."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (``rope_scaling`` a dict, ``layer_types`` a list)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if d["rope_scaling"] is not None:
            d["rope_scaling"] = dict(d["rope_scaling"])
        if d["layer_types"] is not None:
            d["layer_types"] = list(d["layer_types"])
        return d


# ---------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nnx.Module):
    """``weight * x / sqrt(mean(x²) + eps)``, the normalisation computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        h = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * h.astype(dtype)


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: Mapping[str, Any] | None = None) -> Array:
    """HF's ``inv_freq = 1 / theta^(arange(0, d, 2) / d)`` (float32, shape (d/2,)).

    ``rope_scaling`` (see :data:`ROPE_SCALING_TYPES`) rescales it as ``transformers`` does,
    in float32: ``"linear"`` divides by ``factor``; ``"llama3"`` divides the low frequencies
    (wavelength > ``original_max_position_embeddings / low_freq_factor``) by ``factor``, keeps
    the high ones (wavelength < ``original / high_freq_factor``) and interpolates smoothly in
    between. Both have attention factor 1 (cos/sin are not rescaled).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    rs = _normalize_rope_scaling(rope_scaling)
    if rs is None:
        return inv_freq
    factor = rs["factor"]
    if rs["rope_type"] == "linear":
        return inv_freq / factor
    # llama3 (transformers.modeling_rope_utils._compute_llama3_parameters)
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return jnp.where(is_medium, smoothed, inv_freq_llama)


def rope_cos_sin(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
    """``cos``/``sin`` of ``concat(freqs, freqs)``, ``freqs = pos ⊗ inv_freq``: (..., T, d)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: Array) -> Array:
    """``concat(-x2, x1)`` with ``x1, x2`` the two halves of the last axis (HF convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x`` (B, T, H, D) by ``cos``/``sin`` (B, T, D)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def position_ids_from_mask(attention_mask: Array | None, batch: int, length: int) -> Array:
    """``cumsum(mask) - 1`` clipped at 0, or ``arange(T)`` without a mask: (B, T) int32."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    m = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def _mask_value(dtype) -> float:
    # A large finite negative: fully masked rows give a uniform softmax, never NaN.
    return float(jnp.finfo(dtype).min)


def _kernel_init(config: DecoderConfig):
    if config.initializer_range is None:
        return nnx.initializers.lecun_normal()
    return nnx.initializers.normal(config.initializer_range)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE (``self_attn``)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = config
        self.num_heads = c.num_heads
        self.num_kv_heads = c.num_kv_heads
        self.head_dim = c.head_dim
        kw = dict(rngs=rngs, dtype=c.compute_dtype, param_dtype=c.params_dtype,
                  kernel_init=_kernel_init(c))
        self.q_proj = LoRALinear(c.hidden_size, c.num_heads * c.head_dim, use_bias=c.attention_bias, **kw)
        self.k_proj = LoRALinear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.attention_bias, **kw)
        self.v_proj = LoRALinear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.attention_bias, **kw)
        self.o_proj = LoRALinear(c.num_heads * c.head_dim, c.hidden_size, use_bias=c.o_proj_bias, **kw)
        if c.qk_norm:  # Qwen3: RMSNorm over head_dim of each head, before RoPE
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, param_dtype=c.params_dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, param_dtype=c.params_dtype)
        else:
            self.q_norm = None
            self.k_norm = None

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        """``x`` (B, T, hidden); ``mask`` (B, T_q, T_k) bool, True where attention is allowed."""
        B, T, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        rep = H // KV
        q = self.q_proj(x).reshape(B, T, H, D)
        k = self.k_proj(x).reshape(B, T, KV, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        v = self.v_proj(x).reshape(B, T, KV, D)
        # Query head h = g * rep + r uses key/value head g (HF repeat_kv), without materialising it.
        q = q.reshape(B, T, KV, rep, D)
        scores = attention_scores("bqgrd,bkgd->bgrqk", q, k, D ** -0.5)  # float32 (bf16 compute)
        scores = jnp.where(mask[:, None, None, :, :], scores, _mask_value(scores.dtype))
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v).reshape(B, T, H * D)
        return self.o_proj(out)


class MLP(nnx.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(rngs=rngs, dtype=c.compute_dtype, param_dtype=c.params_dtype,
                  kernel_init=_kernel_init(c), use_bias=c.mlp_bias)
        self.gate_proj = LoRALinear(c.hidden_size, c.intermediate_size, **kw)
        self.up_proj = LoRALinear(c.hidden_size, c.intermediate_size, **kw)
        self.down_proj = LoRALinear(c.intermediate_size, c.hidden_size, **kw)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=c.params_dtype)
        self.self_attn = Attention(c, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=c.params_dtype)
        self.mlp = MLP(c, rngs=rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderLM(nnx.Module):
    """Llama-architecture causal LM. ``model(input_ids, attention_mask) -> logits (B, T, V) f32``."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        if c.initializer_range is None:
            embed_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        else:
            embed_init = nnx.initializers.normal(c.initializer_range)
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=c.compute_dtype,
                                      param_dtype=c.params_dtype, embedding_init=embed_init, rngs=rngs)
        self.layers = nnx.List([DecoderBlock(c, rngs=rngs) for _ in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=c.params_dtype)
        if c.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = LoRALinear(c.hidden_size, c.vocab_size, use_bias=False, rngs=rngs,
                                      dtype=c.compute_dtype, param_dtype=c.params_dtype,
                                      kernel_init=_kernel_init(c))

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Final-norm hidden states (B, T, hidden) in the compute dtype."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {input_ids.shape}")
        B, T = input_ids.shape
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {(B, T)}")
        positions = position_ids_from_mask(attention_mask, B, T)
        c = self.config
        cos, sin = rope_cos_sin(positions, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
        causal = jnp.tril(jnp.ones((T, T), dtype=bool))
        keys_ok = None if attention_mask is None else (attention_mask[:, None, :] != 0)

        def full(m):
            m = m[None]
            if keys_ok is not None:
                m = m & keys_ok
            return jnp.broadcast_to(m, (B, T, T))

        mask = full(causal)
        sliding = None
        if c.sliding_window is not None and c.sliding_window < T:
            # HF sliding_window_overlay: key j visible from query i iff j > i - window
            idx = jnp.arange(T)
            sliding = full(causal & (idx[None, :] > idx[:, None] - c.sliding_window))
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, sliding if sliding is not None and c.uses_sliding_window(i) else mask)
        return self.norm(x)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        h = self.hidden_states(input_ids, attention_mask)
        # The output matmul accumulates into float32 whatever the compute dtype.
        if self.lm_head is None:
            return attend_f32(self.embed_tokens, h)
        return linear_f32(self.lm_head, h)


# ---------------------------------------------------------------------------------------
# Flat dotted names and safetensors I/O


def _key_str(k) -> str:
    return str(k)


def flatten_state(tree: dict, sep: str = ".") -> dict[str, Any]:
    """Flattens a nested pure dict (``nnx.to_pure_dict(state)``) to ``{'a.0.b': leaf}``."""
    out: dict[str, Any] = {}

    def rec(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                rec(v, f"{prefix}{sep}{_key_str(k)}" if prefix else _key_str(k))
        else:
            out[prefix] = node

    rec(tree, "")
    return out


def unflatten_state(flat: dict[str, Any], sep: str = ".") -> dict:
    """Inverse of :func:`flatten_state`; all-digit components become ``int`` keys (``nnx.List``)."""
    tree: dict = {}
    for name, leaf in flat.items():
        parts = [int(p) if p.isdigit() else p for p in name.split(sep)]
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"tensor name {name!r} clashes with another tensor at {p!r}")
        node[parts[-1]] = leaf
    return tree


def _base_params_filter():
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def save_pretrained(model: DecoderLM, directory: str | os.PathLike) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (base weights; LoRA factors excluded).

    Merge adapters first (:func:`ntk_jax.models.lora.merge_lora`) to export a fine-tuned model.
    """
    from safetensors.flax import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model, _base_params_filter()))
    flat = {k: jnp.asarray(v) for k, v in flatten_state(state).items()}
    cfg = {"model_type": MODEL_TYPE, **model.config.to_dict()}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    save_file(flat, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "flax"})


def load_own_config(directory: str | os.PathLike) -> DecoderConfig:
    """The :class:`DecoderConfig` of a directory in this repo's format (``ntk_jax_decoder``)."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}")
    with open(path) as f:
        d = json.load(f)
    model_type = d.pop("model_type", None)
    if model_type != MODEL_TYPE:
        raise ValueError(f"{path}: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
    return DecoderConfig.from_dict(d)


def load_pretrained(directory: str | os.PathLike, *, rngs: nnx.Rngs | None = None,
                    dtype: Any = None, param_dtype: Any = None) -> DecoderLM:
    """Loads a model written by :func:`save_pretrained`.

    ``dtype`` / ``param_dtype`` (dtype names or objects) override the saved config's compute
    and parameter dtypes when given.

    Without ``rngs`` the model skeleton is built abstractly (no random init); with ``rngs`` it
    is initialised with them first (useful if LoRA adapters are attached afterwards with the
    same streams). Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming
    the tensor for a missing, unexpected or wrongly shaped tensor. Tensors are cast to the
    config's ``param_dtype``.
    """
    from safetensors import safe_open

    directory = os.fspath(directory)
    config = with_dtypes(load_own_config(directory), dtype, param_dtype)
    wpath = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")
    if rngs is None:
        model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    else:
        model = DecoderLM(config, rngs=rngs)
    state = nnx.state(model, _base_params_filter())
    expected = flatten_state(nnx.to_pure_dict(state))
    loaded: dict[str, Any] = {}
    with safe_open(wpath, framework="flax") as f:
        names = set(f.keys())
        missing = sorted(set(expected) - names)
        if missing:
            raise ValueError(f"{wpath}: missing tensor(s) {missing}")
        unexpected = sorted(names - set(expected))
        if unexpected:
            raise ValueError(f"{wpath}: unexpected tensor(s) {unexpected}")
        for name, ref in expected.items():
            arr = f.get_tensor(name)
            if tuple(arr.shape) != tuple(ref.shape):
                raise ValueError(f"{wpath}: tensor {name!r} has shape {tuple(arr.shape)}, "
                                 f"expected {tuple(ref.shape)}")
            loaded[name] = jnp.asarray(arr, dtype=ref.dtype)
    nnx.replace_by_pure_dict(state, unflatten_state(loaded))
    nnx.update(model, state)
    return model
