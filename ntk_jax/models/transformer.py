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
* gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))`` with ``act`` HF's ``hidden_act``
  (``silu``, SwiGLU, in every Llama / Mistral / Qwen release; any name of
  ``layers.get_activation``, e.g. ``gelu_pytorch_tanh``);
* optional tied input/output embeddings.

Config switches cover the HF variants without copies of the decoder (the ``config.json``
converter :func:`decoder_config_from_hf` and the tensor map :func:`decoder_weight_map` are at
the end of this module):

* ``attention_bias`` — biases on ``q/k/v_proj`` (Qwen2; Llama/Qwen3 ``attention_bias``);
  ``o_proj_bias`` — a bias on ``o_proj`` (Llama/Qwen3 ``attention_bias``, *not* Qwen2);
  ``mlp_bias`` — biases on the MLP projections (Llama ``mlp_bias``);
* ``qk_norm`` — Qwen3's RMSNorm over ``head_dim`` of every query and key head
  (``self_attn.q_norm`` / ``self_attn.k_norm``, weight ``(head_dim,)``), before RoPE;
* ``rope_scaling`` — ``None`` or HF's ``{"rope_type": "linear", "factor"}`` /
  ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"}`` / ``{"rope_type": "yarn", "factor",
  "original_max_position_embeddings"}`` with YaRN's optional ``attention_factor``,
  ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``, ``truncate`` (other types raise
  ``ValueError``);
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

This module is the decoder's port (:mod:`ntk_jax.models.ports`): it registers
``model_type`` ``"llama"``, ``"mistral"``, ``"qwen2"``, ``"qwen3"`` (Hugging Face checkpoints)
and ``"ntk_jax_decoder"`` (this repo's format, :func:`save_pretrained` /
:func:`load_pretrained`: flat NNX names, ``config.json`` = the :class:`DecoderConfig` fields),
its column-/row-parallel projections for the sharding rules (:data:`PARTITION`) and its
PEFT module names, so :func:`ntk_jax.models.hf_loading.from_pretrained` loads all of them.

HF → NNX names (``transformers``' ``*ForCausalLM``; a checkpoint of the base ``*Model``
without the ``model.`` prefix is accepted too)::

    model.embed_tokens.weight (V, H)                 -> embed_tokens.embedding (V, H)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight -> layers.{i}.self_attn.{q,k,v,o}_proj.kernel  (transposed)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.bias   -> ... .bias
    model.layers.{i}.self_attn.{q,k}_norm.weight     -> layers.{i}.self_attn.{q,k}_norm.weight  (Qwen3)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight  -> layers.{i}.mlp.{gate,up,down}_proj.kernel  (transposed)
    model.layers.{i}.{input,post_attention}_layernorm.weight -> same without "model."
    model.norm.weight                                -> norm.weight
    lm_head.weight (V, H)                            -> lm_head.kernel (H, V)  (transposed; absent when tied)

Ignored if present: ``*.rotary_emb.inv_freq`` buffers and, with tied embeddings,
``lm_head.weight``.

Padding: ``attention_mask`` (B, T) with 1 for real tokens and 0 for padding. Keys with mask 0
are excluded from attention and position ids are ``cumsum(mask) - 1`` (clipped at 0), so a
left- or right-padded sequence gives the same logits on its real tokens as the unpadded one.
Logits at padded positions are finite but meaningless.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from ntk_jax.models.hf_loading import (CONFIG_NAME, SafetensorsDir, TensorMap, WeightMap, config_from_hf,
                                       load_model, read_hf_config, rename_weight_map, save_hf_safetensors)
from ntk_jax.models.layers import (ConfigMixin, attend_f32, base_params_filter, dot_product_attention,
                                   flatten_state, get_activation, linear_f32, with_dtypes)
from ntk_jax.models.lora import LoRALinear
from ntk_jax.models.ports import PartitionNames, PeftModule, PeftSpec, register_architecture

Array = jax.Array

MODEL_TYPE = "ntk_jax_decoder"

__all__ = [
    "DecoderConfig",
    "RMSNorm",
    "Attention",
    "MLP",
    "DecoderBlock",
    "DecoderLM",
    "rope_inv_freq",
    "rope_attention_factor",
    "ROPE_SCALING_TYPES",
    "rope_cos_sin",
    "rotate_half",
    "apply_rope",
    "position_ids_from_mask",
    "save_pretrained",
    "load_pretrained",
    "load_own_config",
    "load_config",
    "decoder_config_from_hf",
    "decoder_weight_map",
    "MODEL_TYPE",
    "PARTITION",
]


# ---------------------------------------------------------------------------------------
# Config

LAYER_TYPES = ("full_attention", "sliding_attention")

# rope_type -> required keys (besides "rope_type"); HF names (``modeling_rope_utils``).
ROPE_SCALING_TYPES: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
# rope_type -> optional keys (HF's defaults when absent or None)
ROPE_SCALING_OPTIONAL: dict[str, tuple[str, ...]] = {
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
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
    optional = ROPE_SCALING_OPTIONAL.get(rtype, ())
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rtype!r} is missing {missing}")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"rope_scaling of type {rtype!r} has unsupported keys {unknown}; "
                         f"expected {list(required)}" + (f" and optionally {list(optional)}" if optional else ""))
    out: dict[str, Any] = {"rope_type": rtype}
    for k in required + tuple(k for k in optional if d.get(k) is not None):
        v = d[k]
        if k == "truncate":
            out[k] = bool(v)
            continue
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
    ``"full_attention"`` / ``"sliding_attention"`` per layer). ``hidden_act``: the gated MLP's
    activation, an HF name (:func:`~ntk_jax.models.layers.get_activation`).
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
    hidden_act: str = "silu"

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
        get_activation(self.hidden_act)  # ValueError naming the supported ones
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
    between; ``"yarn"`` (YaRN, Peng et al. 2023; ``_compute_yarn_parameters``) blends the
    interpolated (``/ factor``) and the original frequencies with a linear ramp between the
    dimensions that make ``beta_fast`` and ``beta_slow`` rotations over
    ``original_max_position_embeddings``. The cos/sin scale is :func:`rope_attention_factor`.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    rs = _normalize_rope_scaling(rope_scaling)
    if rs is None:
        return inv_freq
    factor = rs["factor"]
    if rs["rope_type"] == "linear":
        return inv_freq / factor
    if rs["rope_type"] == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, rs)
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


def _yarn_inv_freq(inv_freq: Array, head_dim: int, theta: float, rs: Mapping[str, Any]) -> Array:
    """YaRN's frequencies (``transformers.modeling_rope_utils._compute_yarn_parameters``)."""
    factor, old_len = rs["factor"], rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast", 32.0), rs.get("beta_slow", 1.0)

    def correction_dim(rotations):
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    return (inv_freq / factor) * (1.0 - extrapolation) + inv_freq * extrapolation


def rope_attention_factor(rope_scaling: Mapping[str, Any] | None) -> float:
    """The scale ``transformers`` applies to RoPE's cos and sin: 1, except for ``"yarn"``:
    ``attention_factor`` if given, else ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``
    when both are given, else ``mscale(factor) = 0.1 · ln(factor) + 1`` (1 for ``factor ≤ 1``)."""
    rs = _normalize_rope_scaling(rope_scaling)
    if rs is None or rs["rope_type"] != "yarn":
        return 1.0
    if "attention_factor" in rs:
        return float(rs["attention_factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = rs["factor"]
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return float(mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"]))
    return float(mscale(factor))


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
        q = self.q_proj(x).reshape(B, T, H, D)
        k = self.k_proj(x).reshape(B, T, KV, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        v = self.v_proj(x).reshape(B, T, KV, D)
        # The decoder's masks are causal (with padding / a sliding window on top): blocks of
        # queries skip the keys after them.
        out = dot_product_attention(q, k, v, mask, D ** -0.5, causal=True)
        return self.o_proj(out)


class MLP(nnx.Module):
    """Gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))``, ``act`` the config's
    ``hidden_act`` (SiLU: SwiGLU)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(rngs=rngs, dtype=c.compute_dtype, param_dtype=c.params_dtype,
                  kernel_init=_kernel_init(c), use_bias=c.mlp_bias)
        self.gate_proj = LoRALinear(c.hidden_size, c.intermediate_size, **kw)
        self.up_proj = LoRALinear(c.hidden_size, c.intermediate_size, **kw)
        self.down_proj = LoRALinear(c.intermediate_size, c.hidden_size, **kw)
        self.act = get_activation(c.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


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
        scale = rope_attention_factor(c.rope_scaling)
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
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
# This repo's checkpoint format (model_type "ntk_jax_decoder"): flat NNX names, config.json =
# the DecoderConfig fields


def save_pretrained(model: DecoderLM, directory: str | os.PathLike) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (base weights; LoRA factors excluded).

    Merge adapters first (:func:`ntk_jax.models.lora.merge_lora`) to export a fine-tuned model.
    """
    flat = flatten_state(nnx.to_pure_dict(nnx.state(model, base_params_filter())))
    save_hf_safetensors(flat, {"model_type": MODEL_TYPE, **model.config.to_dict()}, directory,
                        weights_format="flax")


def _own_config(d: Mapping[str, Any]) -> DecoderConfig:
    return DecoderConfig.from_dict({k: v for k, v in d.items() if k != "model_type"})


def _same_name(nnx_name: str) -> tuple[list[str], bool]:
    return [nnx_name], False


def _own_weight_map(config: DecoderConfig, hf_names: Iterable[str]) -> WeightMap:
    """The identity map: this format stores every base parameter under its flat NNX name."""
    model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    return rename_weight_map(model, hf_names, _same_name)


def load_own_config(directory: str | os.PathLike) -> DecoderConfig:
    """The :class:`DecoderConfig` of a directory in this repo's format (``ntk_jax_decoder``)."""
    d = read_hf_config(directory)
    if d.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{os.path.join(os.fspath(directory), CONFIG_NAME)}: model_type is "
                         f"{d.get('model_type')!r}, expected {MODEL_TYPE!r}")
    return _own_config(d)


def load_pretrained(directory: str | os.PathLike, *, rngs: nnx.Rngs | None = None,
                    dtype: Any = None, param_dtype: Any = None) -> DecoderLM:
    """Loads a model written by :func:`save_pretrained` (with
    :func:`~ntk_jax.models.hf_loading.load_model`; ``from_pretrained(directory)`` does the same
    and also takes ``lora=`` and ``mesh=``).

    ``dtype`` / ``param_dtype`` (dtype names or objects) override the saved config's compute
    and parameter dtypes when given; tensors are cast to the ``param_dtype``. The model is
    built abstractly (no random init); ``rngs`` seeds any non-parameter state. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the tensor for a
    missing, unexpected or wrongly shaped tensor.
    """
    config = with_dtypes(load_own_config(directory), dtype, param_dtype)
    return load_model(DecoderLM, config, SafetensorsDir(directory),
                      lambda model, names: rename_weight_map(model, names, _same_name), rngs=rngs)


# ---------------------------------------------------------------------------------------
# Llama-family decoders -> DecoderLM

_DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _hf_rope(d: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a v5 ``rope_parameters`` or a v4 ``rope_theta`` +
    ``rope_scaling`` config."""
    rp = d.get("rope_parameters")
    if rp is None:
        rp = d.get("rope_scaling")
    rp = dict(rp or {})
    if rp and all(isinstance(v, Mapping) for v in rp.values()):
        raise ValueError(f"per-layer-type rope parameters are not supported: {sorted(rp)}")
    theta = float(rp.pop("rope_theta", d.get("rope_theta", 10000.0)))
    prf = rp.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if prf is not None and float(prf) != 1.0:
        raise ValueError(f"partial_rotary_factor={prf} is not supported (only 1.0)")
    if not rp:
        return theta, None
    if rp.get("rope_type", rp.get("type")) == "default":
        return theta, None
    return theta, rp  # validated (unknown types -> ValueError) by DecoderConfig


def decoder_config_from_hf(d: Mapping[str, Any]) -> DecoderConfig:
    """:class:`DecoderConfig` from a llama / mistral / qwen2 / qwen3 ``config.json`` dict
    (``transformers`` v4 or v5 layout)."""
    d = dict(d)
    mt = d.get("model_type")
    if mt not in _DECODER_TYPES:
        raise ValueError(f"decoder_config_from_hf: model_type {mt!r} is not one of {list(_DECODER_TYPES)}")
    missing = [k for k in _REQUIRED if d.get(k) is None]
    if missing:
        raise ValueError(f"{mt} config is missing {missing}")
    heads = int(d["num_attention_heads"])
    head_dim = d.get("head_dim")
    if head_dim is None:  # HF's Qwen3Config defaults head_dim to 128, the others to hidden / heads
        head_dim = 128 if mt == "qwen3" else int(d["hidden_size"]) // heads
    theta, rope_scaling = _hf_rope(d)

    sliding_window, layer_types = None, None
    if mt == "mistral":
        sliding_window = d.get("sliding_window")
    elif mt in ("qwen2", "qwen3") and d.get("use_sliding_window", False):
        sliding_window = d.get("sliding_window")
        if sliding_window is not None:
            layer_types = d.get("layer_types")
            if layer_types is None:
                mwl = int(d.get("max_window_layers", 28))
                layer_types = ["sliding_attention" if i >= mwl else "full_attention"
                               for i in range(int(d["num_hidden_layers"]))]
    if layer_types is not None and "sliding_attention" not in layer_types:
        sliding_window, layer_types = None, None

    attention_bias = bool(d.get("attention_bias", False))
    if mt == "qwen2":
        qkv_bias, o_bias = True, False  # hard-coded in transformers' Qwen2Attention
    elif mt == "mistral":
        qkv_bias, o_bias = False, False
    else:  # llama, qwen3: attention_bias covers q, k, v and o
        qkv_bias, o_bias = attention_bias, attention_bias
    mlp_bias = bool(d.get("mlp_bias", False)) if mt == "llama" else False
    init = d.get("initializer_range")
    return DecoderConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=int(d["intermediate_size"]),
        max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
        rope_theta=theta,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_proj_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=(mt == "qwen3"),
        rope_scaling=rope_scaling,
        sliding_window=None if sliding_window is None else int(sliding_window),
        layer_types=None if layer_types is None else tuple(layer_types),
        initializer_range=None if init is None else float(init),
        hidden_act=str(d.get("hidden_act", "silu")),
    )


def decoder_weight_map(config: DecoderConfig, hf_names: Iterable[str]) -> WeightMap:
    """HF ``*ForCausalLM`` tensor names for every parameter of ``DecoderLM(config)``."""
    hf_names = set(hf_names)
    pre = "" if ("embed_tokens.weight" in hf_names and "model.embed_tokens.weight" not in hf_names) else "model."
    maps: list[TensorMap] = [TensorMap(pre + "embed_tokens.weight", "embed_tokens.embedding")]

    def linear(hf: str, nn: str, bias: bool):
        maps.append(TensorMap(hf + ".weight", nn + ".kernel", transpose=True))
        if bias:
            maps.append(TensorMap(hf + ".bias", nn + ".bias"))

    for i in range(config.num_layers):
        h, n = f"{pre}layers.{i}.", f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            maps.append(TensorMap(h + norm + ".weight", n + norm + ".weight"))
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear(h + "self_attn." + proj, n + "self_attn." + proj, config.attention_bias)
        linear(h + "self_attn.o_proj", n + "self_attn.o_proj", config.o_proj_bias)
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                maps.append(TensorMap(h + "self_attn." + norm + ".weight", n + "self_attn." + norm + ".weight"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            linear(h + "mlp." + proj, n + "mlp." + proj, config.mlp_bias)
    maps.append(TensorMap(pre + "norm.weight", "norm.weight"))
    ignore = [r"(^|\.)rotary_emb\.inv_freq$"]
    if config.tie_word_embeddings:
        ignore.append(r"^lm_head\.weight$")
    else:
        maps.append(TensorMap("lm_head.weight", "lm_head.kernel", transpose=True))
    return WeightMap(tuple(maps), tuple(ignore))


def load_config(directory: str | os.PathLike) -> DecoderConfig:
    """The :class:`DecoderConfig` of a checkpoint directory: this repo's format or a Hugging
    Face Llama-family decoder (llama / mistral / qwen2 / qwen3 ``config.json``, converted by
    :func:`config_from_hf`). ``ValueError`` for other model types
    (e.g. GPT-2, BERT), whose configs are not a ``DecoderConfig``."""
    d = read_hf_config(directory)
    config = config_from_hf(d)
    if not isinstance(config, DecoderConfig):
        raise ValueError(f"{os.fspath(directory)!r}: model_type {d.get('model_type')!r} is not a Llama-family "
                         f"decoder (its config is a {type(config).__name__}, not a DecoderConfig)")
    return config


# ---------------------------------------------------------------------------------------
# The port: registration with ntk_jax.models.ports

PARTITION = PartitionNames(
    column=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"),
    row=("o_proj", "down_proj"),
    vocab=("embed_tokens",),
    replicated=("norm", "input_layernorm", "post_attention_layernorm", "q_norm", "k_norm"),
)


@functools.lru_cache(maxsize=16)
def _hf_linears(config: DecoderConfig) -> dict[str, str]:
    """Flat NNX path of every projection -> its HF ``nn.Linear`` module, read off
    :func:`decoder_weight_map` (the loader's own map)."""
    wm = decoder_weight_map(config, {"model.embed_tokens.weight"})
    return {t.nnx_name[: -len(".kernel")]: t.hf_name[: -len(".weight")] for t in wm.tensors
            if t.transpose and t.nnx_name.endswith(".kernel") and t.hf_name.endswith(".weight")}


def _peft_module(model: DecoderLM, path: str) -> PeftModule:
    name = _hf_linears(model.config).get(path)
    if name is None:
        raise ValueError(f"no Hugging Face nn.Linear for projection {path!r}")
    return PeftModule(name)


register_architecture(_DECODER_TYPES, decoder_config_from_hf, DecoderLM, decoder_weight_map,
                      partition=PARTITION, peft={DecoderLM: PeftSpec("CAUSAL_LM", _peft_module)})
register_architecture(MODEL_TYPE, _own_config, DecoderLM, _own_weight_map)
