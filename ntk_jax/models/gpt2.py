"""GPT-2 in Flax NNX with Hugging Face naming, loading ``transformers`` GPT-2 checkpoints.

Equivalent to ``transformers``' ``GPT2LMHeadModel`` in eval mode (no dropout other than
LoRA's):

* learned token (``wte``) and absolute position (``wpe``) embeddings;
* pre-LayerNorm blocks ``h = x + attn(ln_1(x)); out = h + mlp(ln_2(h))``, final ``ln_f``;
* causal multi-head attention from one fused ``c_attn`` projection (query, key, value in
  that order along the output axis), scores scaled by ``head_dim ** -0.5``
  (``scale_attn_weights``) and optionally by ``1 / (layer_idx + 1)``
  (``scale_attn_by_inverse_layer_idx``), softmax in (at least) float32;
* MLP ``c_proj(act(c_fc(x)))`` with ``activation_function`` (``gelu_new``: the tanh
  approximation of GELU), inner size ``n_inner`` (default ``4 * n_embd``);
* LM head tied to ``wte`` (``tie_word_embeddings``, the GPT-2 default) or a separate
  bias-free ``lm_head``.

Module tree (NNX paths = HF names without the ``transformer.`` prefix)::

    wte, wpe                    nnx.Embed     .embedding (vocab|n_positions, n_embd)
    h[i].ln_1, h[i].ln_2        LayerNorm     .weight, .bias (n_embd,)
    h[i].attn.c_attn            LoRALinear    .kernel (n_embd, 3 n_embd), .bias
    h[i].attn.c_proj            LoRALinear    .kernel (n_embd, n_embd), .bias
    h[i].mlp.c_fc               LoRALinear    .kernel (n_embd, n_inner), .bias
    h[i].mlp.c_proj             LoRALinear    .kernel (n_inner, n_embd), .bias
    ln_f                        LayerNorm
    lm_head                     LoRALinear (None when tied)

HF's GPT-2 ``Conv1D`` stores its weight as ``(in, out)``, the layout of ``LoRALinear.kernel``,
so checkpoint tensors are copied without a transpose (only an untied ``lm_head.weight``, an
``nn.Linear``, is transposed). LoRA targets are the HF names ``c_attn``, ``c_proj`` (both the
attention and the MLP output projection, as in PEFT), ``c_fc`` and ``lm_head``.

Padding: ``attention_mask`` (B, T), 1 for real tokens, 0 for padding. Padded keys are
excluded from attention and, unless ``position_ids`` are given, position ids are
``cumsum(mask) - 1`` clipped at 0, so left- and right-padded sequences give the logits of
the unpadded sequence on their real tokens. NOTE: ``transformers``' GPT-2 does *not* derive
position ids from the mask (it uses ``arange(T)``); the two agree for right padding, and for
left padding when the same ``position_ids`` are passed to the PyTorch model.

Loading and saving use the shared machinery of :mod:`ntk_jax.models.hf_loading`. This module
is GPT-2's port (:mod:`ntk_jax.models.ports`): it registers ``model_type="gpt2"`` (so
``hf_loading.from_pretrained`` loads GPT-2 checkpoints too), its column-/row-parallel
projections for the sharding rules and its PEFT module names; :class:`LayerNorm` and :func:`get_activation` live in
:mod:`ntk_jax.models.layers`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ntk_jax.models.hf_loading import (SafetensorsDir, effective_kernels, load_model, read_hf_config,
                                       rename_weight_map, save_hf_safetensors)
from ntk_jax.models.layers import (ConfigMixin, LayerNorm, attend_f32, dot_product_attention, get_activation,
                                  linear_f32, resolve_dtype, with_dtypes)
from ntk_jax.models.lora import LoRALinear
from ntk_jax.models.ports import PartitionNames, PeftModule, PeftSpec, register_architecture
from ntk_jax.models.transformer import position_ids_from_mask

Array = jax.Array

__all__ = [
    "GPT2Config",
    "GPT2Attention",
    "GPT2MLP",
    "GPT2Block",
    "GPT2LMHeadModel",
    "from_pretrained",
    "save_pretrained",
    "to_hf_state_dict",
]


# =======================================================================================
# Config


@dataclasses.dataclass(frozen=True)
class GPT2Config(ConfigMixin):
    """Hyper-parameters of :class:`GPT2LMHeadModel`, with ``transformers``' ``GPT2Config``
    names. ``n_inner=None`` means ``4 * n_embd`` (resolved on construction)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        inner = 4 * self.n_embd if self.n_inner is None else int(self.n_inner)
        if inner <= 0:
            raise ValueError(f"n_inner must be positive, got {inner}")
        object.__setattr__(self, "n_inner", inner)
        get_activation(self.activation_function)
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, "GPT2Config.dtype"))
        object.__setattr__(self, "param_dtype", resolve_dtype(self.param_dtype, "GPT2Config.param_dtype"))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "GPT2Config":
        """From a ``transformers`` GPT-2 ``config.json`` dict (other HF keys are ignored)."""
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"config model_type is {d.get('model_type')!r}, expected 'gpt2'")
        if d.get("add_cross_attention"):
            raise NotImplementedError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")
        known = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
        kw = {k: d[k] for k in known if d.get(k) is not None}
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.GPT2Config`` reads."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("dtype", "param_dtype")}
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **d}


# =======================================================================================
# Modules


def _linear(c: GPT2Config, n_in: int, n_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> LoRALinear:
    return LoRALinear(n_in, n_out, use_bias=use_bias, rngs=rngs, dtype=c.compute_dtype,
                      param_dtype=c.params_dtype,
                      kernel_init=nnx.initializers.normal(c.initializer_range))


class GPT2Attention(nnx.Module):
    """Causal multi-head self-attention (``attn``) with fused ``c_attn`` and ``c_proj``."""

    def __init__(self, config: GPT2Config, layer_idx: int = 0, *, rngs: nnx.Rngs):
        c = config
        self.num_heads = c.n_head
        self.head_dim = c.head_dim
        scaling = c.head_dim ** -0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scaling /= float(layer_idx + 1)
        self.scaling = scaling
        self.c_attn = _linear(c, c.n_embd, 3 * c.n_embd, rngs)
        self.c_proj = _linear(c, c.n_embd, c.n_embd, rngs)

    def __call__(self, x: Array, mask: Array) -> Array:
        """``x`` (B, T, n_embd); ``mask`` (B, T_q, T_k) bool, True where attention is allowed."""
        B, T, E = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (t.reshape(B, T, H, D) for t in (q, k, v))
        out = dot_product_attention(q, k, v, mask, self.scaling, causal=True)  # GPT-2's mask is causal
        return self.c_proj(out)


class GPT2MLP(nnx.Module):
    """``c_proj(act(c_fc(x)))``."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        c = config
        self.c_fc = _linear(c, c.n_embd, c.n_inner, rngs)
        self.c_proj = _linear(c, c.n_inner, c.n_embd, rngs)
        self.act = get_activation(c.activation_function)

    def __call__(self, x: Array) -> Array:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nnx.Module):
    """Pre-LN block: ``h = x + attn(ln_1(x)); out = h + mlp(ln_2(h))``."""

    def __init__(self, config: GPT2Config, layer_idx: int = 0, *, rngs: nnx.Rngs):
        c = config
        self.ln_1 = LayerNorm(c.n_embd, c.layer_norm_epsilon, param_dtype=c.params_dtype)
        self.attn = GPT2Attention(c, layer_idx, rngs=rngs)
        self.ln_2 = LayerNorm(c.n_embd, c.layer_norm_epsilon, param_dtype=c.params_dtype)
        self.mlp = GPT2MLP(c, rngs=rngs)

    def __call__(self, x: Array, mask: Array) -> Array:
        h = x + self.attn(self.ln_1(x), mask)
        return h + self.mlp(self.ln_2(h))


class GPT2LMHeadModel(nnx.Module):
    """GPT-2 causal LM: ``model(input_ids, attention_mask=None) -> logits (B, T, V)`` float32."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = nnx.initializers.normal(c.initializer_range)
        self.wte = nnx.Embed(c.vocab_size, c.n_embd, dtype=c.compute_dtype, param_dtype=c.params_dtype,
                             embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(c.n_positions, c.n_embd, dtype=c.compute_dtype, param_dtype=c.params_dtype,
                             embedding_init=init, rngs=rngs)
        self.h = nnx.List([GPT2Block(c, i, rngs=rngs) for i in range(c.n_layer)])
        self.ln_f = LayerNorm(c.n_embd, c.layer_norm_epsilon, param_dtype=c.params_dtype)
        if c.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = _linear(c, c.n_embd, c.vocab_size, rngs, use_bias=False)

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None,
                      position_ids: Array | None = None) -> Array:
        """Hidden states after ``ln_f``: (B, T, n_embd) in the compute dtype."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {input_ids.shape}")
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(f"sequence length {T} exceeds n_positions={self.config.n_positions}")
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {(B, T)}")
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, B, T)
        else:
            position_ids = jnp.broadcast_to(jnp.asarray(position_ids), (B, T))
        mask = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, :] != 0)
        mask = jnp.broadcast_to(mask, (B, T, T))
        x = self.wte(input_ids) + self.wpe(position_ids)
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 position_ids: Array | None = None) -> Array:
        h = self.hidden_states(input_ids, attention_mask, position_ids)
        # The output matmul accumulates into float32 whatever the compute dtype.
        return attend_f32(self.wte, h) if self.lm_head is None else linear_f32(self.lm_head, h)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, param_dtype=None, lora=None,
                        rngs: nnx.Rngs | None = None) -> "GPT2LMHeadModel":
        """See :func:`from_pretrained`."""
        return from_pretrained(path, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)


# =======================================================================================
# Loading / saving HF checkpoints

_GPT2_IGNORE = (r"(^|\.)attn\.(bias|masked_bias)$",)


def from_pretrained(path: str | os.PathLike, *, dtype=None, param_dtype=None, lora=None,
                    rngs: nnx.Rngs | None = None, mesh=None, rules=None) -> GPT2LMHeadModel:
    """Loads a ``transformers`` GPT-2 checkpoint (``config.json`` + ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``) from a local directory.

    Args:
      path: the checkpoint directory (``GPT2LMHeadModel`` / ``GPT2Model`` ``save_pretrained``
        output; tensor names with or without the ``transformer.`` prefix).
      dtype: compute dtype (e.g. ``"bfloat16"``); ``None`` = float32. Logits are float32.
      param_dtype: parameter dtype; ``None`` = float32 whatever the checkpoint's dtype
        (``"bfloat16"`` keeps a bf16 checkpoint in bf16).
      lora: a :class:`~ntk_jax.models.lora.LoRAConfig` (or its dict) to attach adapters
        after loading; targets ``c_attn``, ``c_proj``, ``c_fc`` (and ``lm_head`` if untied).
      rngs: random streams for the LoRA factors (default ``nnx.Rngs(0)``).
      mesh, rules: load sharded over a ``("data", "model")`` mesh by partition ``rules``
        (:func:`~ntk_jax.models.hf_loading.load_model`).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the tensor for
    a missing or wrongly shaped tensor. Unused checkpoint tensors (other than HF's attention
    mask buffers and a tied ``lm_head.weight``) are reported with a warning.
    """
    config = with_dtypes(GPT2Config.from_hf_dict(read_hf_config(path)), dtype, param_dtype)
    ckpt = SafetensorsDir(path)
    prefix = "transformer." if "transformer.wte.weight" in ckpt else ""

    def name_map(n: str) -> tuple[list[str], bool]:
        if n == "lm_head.kernel":
            return ["lm_head.weight"], True
        base = re.sub(r"\.(kernel|embedding)$", ".weight", n)
        return [prefix + base], False

    ignore = list(_GPT2_IGNORE)
    if config.tie_word_embeddings:
        ignore.append(r"^lm_head\.weight$")
    return load_model(GPT2LMHeadModel, config, ckpt,
                      lambda model, names: rename_weight_map(model, names, name_map, ignore=ignore),
                      rngs=rngs, lora=lora, unexpected="warn", mesh=mesh, rules=rules)


def to_hf_state_dict(model: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    """HF ``GPT2LMHeadModel`` tensor names -> numpy arrays, LoRA adapters merged in."""
    out = {}
    for n, v in effective_kernels(model).items():
        if n == "lm_head.kernel":
            out["lm_head.weight"] = np.asarray(v).T
        else:
            out["transformer." + re.sub(r"\.(kernel|embedding)$", ".weight", n)] = np.asarray(v)
    return out


def save_pretrained(model: GPT2LMHeadModel, directory: str | os.PathLike) -> None:
    """Writes a checkpoint ``transformers.GPT2LMHeadModel.from_pretrained`` (and
    :func:`from_pretrained`) can load; LoRA adapters are merged into the exported weights
    (the model itself is unchanged)."""
    save_hf_safetensors(to_hf_state_dict(model), model.config.to_hf_dict(), directory)


def _peft_module(model: GPT2LMHeadModel, path: str) -> PeftModule:
    """``lm_head`` is an ``nn.Linear``; every other projection is a ``Conv1D`` under ``transformer.``."""
    return PeftModule("lm_head") if path == "lm_head" else PeftModule("transformer." + path, conv1d=True)


register_architecture(
    "gpt2", GPT2Config.from_hf_dict, load_fn=from_pretrained,
    partition=PartitionNames(column=("c_attn", "c_fc", "lm_head"), row=("c_proj",), vocab=("wte",),
                             positions=("wpe",), replicated=(r"ln_\d+", "ln_f")),
    peft={GPT2LMHeadModel: PeftSpec("CAUSAL_LM", _peft_module)})
