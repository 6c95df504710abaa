"""BERT / RoBERTa encoders in Flax NNX with Hugging Face naming, loading ``transformers``
checkpoints (``BertModel``, ``BertForSequenceClassification``, ``RobertaModel``,
``RobertaForSequenceClassification``, and the encoder of ``*ForMaskedLM`` checkpoints).

One implementation serves both; RoBERTa's differences are config switches:

* ``padding_aware_positions`` (RoBERTa): position ids are ``pad_token_id + cumsum(ids !=
  pad)`` on real tokens and ``pad_token_id`` on pad tokens (HF
  ``create_position_ids_from_input_ids``), so outputs on real tokens do not depend on
  padding. BERT (like HF) uses ``arange(T)``: left padding shifts the positions of real
  tokens (BERT tokenizers pad on the right).
* ``type_vocab_size`` (1 in real RoBERTa checkpoints).

Computation (HF, eval mode, no dropout other than LoRA's): embeddings ``LayerNorm(word +
position + token_type)``; post-LN layers ``a = LN(x + dense(attn(x)))``, ``out = LN(a +
dense(act(dense(a))))``; bidirectional multi-head attention over the keys whose
``attention_mask`` is 1, scores scaled by ``head_dim ** -0.5``, softmax in (at least) float32;
``hidden_act`` ``gelu`` is the exact (erf) GELU.

Module tree (NNX paths = HF names)::

    embeddings.{word,position,token_type}_embeddings   nnx.Embed  .embedding
    embeddings.LayerNorm                                LayerNorm  .weight, .bias
    encoder.layer[i].attention.self.{query,key,value}   LoRALinear .kernel (in, out), .bias
    encoder.layer[i].attention.output.dense             LoRALinear
    encoder.layer[i].attention.output.LayerNorm         LayerNorm
    encoder.layer[i].intermediate.dense                 LoRALinear
    encoder.layer[i].output.dense, .LayerNorm
    pooler.dense                                        LoRALinear (None without pooler)

:class:`BertForSequenceClassification` holds that tree under ``bert`` plus ``classifier``
(pooled output -> logits); :class:`RobertaForSequenceClassification` holds it under
``roberta`` (no pooler) plus ``classifier.dense`` / ``classifier.out_proj`` applied to the
first (``<s>``) token with a tanh between. HF ``nn.Linear`` weights are ``(out, in)`` and are
transposed on load. LoRA targets are the HF names ``query``, ``key``, ``value``, ``dense``
(every ``dense``: attention output, intermediate, output, pooler and RoBERTa's
``classifier.dense``; restricting ``layers`` keeps only those of the encoder layers, whose
index is the first integer of the path), ``classifier`` and ``out_proj``.

This module is the BERT/RoBERTa port (:mod:`ntk_jax.models.ports`): it registers
``"bert"``, ``"roberta"``, ``"xlm-roberta"`` and ``"camembert"`` (so
:func:`ntk_jax.models.hf_loading.from_pretrained` loads these checkpoints via
:func:`from_pretrained` here), its column-/row-parallel projections for the sharding rules and
its PEFT module names and task types.
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
from ntk_jax.models.layers import (ConfigMixin, LayerNorm, dot_product_attention, get_activation, linear_f32,
                                  resolve_dtype, with_dtypes)
from ntk_jax.models.lora import LoRALinear
from ntk_jax.models.ports import PartitionNames, PeftModule, PeftSpec, register_architecture

Array = jax.Array

ROBERTA_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert")

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertLayer",
    "BertModel",
    "RobertaModel",
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "mean_pool",
    "roberta_position_ids",
    "from_pretrained",
    "save_pretrained",
    "to_hf_state_dict",
]


# =======================================================================================
# Config


@dataclasses.dataclass(frozen=True)
class BertConfig(ConfigMixin):
    """Hyper-parameters of the BERT/RoBERTa encoder, with ``transformers``' names.

    ``model_type`` is ``"bert"`` or a RoBERTa type (``"roberta"``, ``"xlm-roberta"``,
    ``"camembert"``); ``padding_aware_positions=None`` resolves to True exactly for RoBERTa
    types. ``num_labels`` sizes the classification heads.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    num_labels: int = 2
    add_pooling_layer: bool = True
    model_type: str = "bert"
    padding_aware_positions: bool | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.model_type not in ("bert",) + ROBERTA_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {('bert',) + ROBERTA_MODEL_TYPES}")
        get_activation(self.hidden_act)
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if self.padding_aware_positions is None:
            object.__setattr__(self, "padding_aware_positions", self.model_type in ROBERTA_MODEL_TYPES)
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, "BertConfig.dtype"))
        object.__setattr__(self, "param_dtype", resolve_dtype(self.param_dtype, "BertConfig.param_dtype"))

    @property
    def is_roberta(self) -> bool:
        return self.model_type in ROBERTA_MODEL_TYPES

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "BertConfig":
        """From a ``transformers`` BERT/RoBERTa ``config.json`` dict (other keys ignored);
        ``num_labels`` is ``len(id2label)`` when present."""
        model_type = d.get("model_type", "bert")
        if model_type not in ("bert",) + ROBERTA_MODEL_TYPES:
            raise ValueError(f"config model_type is {model_type!r}; expected 'bert' or one of {ROBERTA_MODEL_TYPES}")
        pet = d.get("position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise NotImplementedError(f"position_embedding_type={pet!r} is not supported (only 'absolute')")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise NotImplementedError("decoder BERT (is_decoder / add_cross_attention) is not supported")
        known = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype", "padding_aware_positions",
                                                              "add_pooling_layer", "num_labels"}
        kw = {k: d[k] for k in known if d.get(k) is not None}
        if isinstance(d.get("id2label"), dict) and d["id2label"]:
            kw["num_labels"] = len(d["id2label"])
        elif d.get("num_labels") is not None:
            kw["num_labels"] = int(d["num_labels"])
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers``' Bert/RobertaConfig reads."""
        skip = ("dtype", "param_dtype", "padding_aware_positions", "add_pooling_layer", "num_labels")
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        d["architectures"] = [architecture]
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return d


# =======================================================================================
# Modules


def _linear(c: BertConfig, n_in: int, n_out: int, rngs: nnx.Rngs) -> LoRALinear:
    return LoRALinear(n_in, n_out, use_bias=True, rngs=rngs, dtype=c.compute_dtype,
                      param_dtype=c.params_dtype,
                      kernel_init=nnx.initializers.normal(c.initializer_range))


def _layer_norm(c: BertConfig) -> LayerNorm:
    return LayerNorm(c.hidden_size, c.layer_norm_eps, param_dtype=c.params_dtype)


def roberta_position_ids(input_ids: Array, padding_idx: int) -> Array:
    """HF ``create_position_ids_from_input_ids``: ``padding_idx + cumsum(ids != pad)`` on real
    tokens, ``padding_idx`` on pad tokens. (B, T) int32."""
    m = (jnp.asarray(input_ids) != padding_idx).astype(jnp.int32)
    return jnp.cumsum(m, axis=-1) * m + padding_idx


def mean_pool(hidden: Array, attention_mask: Array | None = None) -> Array:
    """Mean of ``hidden`` (B, T, H) over the real tokens (mask 1) -> (B, H) float32
    (sentence-transformers' mean pooling; the token count is clamped at 1e-9)."""
    h = hidden.astype(jnp.promote_types(hidden.dtype, jnp.float32))
    if attention_mask is None:
        return jnp.mean(h, axis=1)
    m = jnp.asarray(attention_mask).astype(h.dtype)[..., None]
    return jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


class BertEmbeddings(nnx.Module):
    """``LayerNorm(word_embeddings + position_embeddings + token_type_embeddings)``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype,
                  embedding_init=nnx.initializers.normal(c.initializer_range), rngs=rngs)
        self.word_embeddings = nnx.Embed(c.vocab_size, c.hidden_size, **kw)
        self.position_embeddings = nnx.Embed(c.max_position_embeddings, c.hidden_size, **kw)
        self.token_type_embeddings = nnx.Embed(c.type_vocab_size, c.hidden_size, **kw)
        self.LayerNorm = _layer_norm(c)

    def __call__(self, input_ids: Array, token_type_ids: Array | None = None,
                 position_ids: Array | None = None) -> Array:
        c = self.config
        B, T = input_ids.shape
        if position_ids is None:
            if c.padding_aware_positions:
                if T + c.pad_token_id + 1 > c.max_position_embeddings:
                    raise ValueError(f"sequence length {T} too long: position ids start at pad_token_id+1="
                                     f"{c.pad_token_id + 1} and max_position_embeddings={c.max_position_embeddings}")
                position_ids = roberta_position_ids(input_ids, c.pad_token_id)
            else:
                if T > c.max_position_embeddings:
                    raise ValueError(f"sequence length {T} exceeds max_position_embeddings={c.max_position_embeddings}")
                position_ids = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        else:
            position_ids = jnp.broadcast_to(jnp.asarray(position_ids), (B, T))
        if token_type_ids is None:
            token_type_ids = jnp.zeros((B, T), jnp.int32)
        else:
            token_type_ids = jnp.broadcast_to(jnp.asarray(token_type_ids), (B, T))
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.LayerNorm(x)


class BertSelfAttention(nnx.Module):
    """Bidirectional multi-head attention (``attention.self``): ``query``, ``key``, ``value``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        c = config
        self.num_heads = c.num_attention_heads
        self.head_dim = c.head_dim
        self.query = _linear(c, c.hidden_size, c.hidden_size, rngs)
        self.key = _linear(c, c.hidden_size, c.hidden_size, rngs)
        self.value = _linear(c, c.hidden_size, c.hidden_size, rngs)

    def __call__(self, x: Array, key_mask: Array | None) -> Array:
        """``x`` (B, T, H); ``key_mask`` (B, T) bool, True for keys that may be attended."""
        B, T, E = x.shape
        H, D = self.num_heads, self.head_dim
        q = self.query(x).reshape(B, T, H, D)
        k = self.key(x).reshape(B, T, H, D)
        v = self.value(x).reshape(B, T, H, D)
        return dot_product_attention(q, k, v, None if key_mask is None else key_mask[:, None, :], D ** -0.5)


class BertResidualOutput(nnx.Module):
    """``LayerNorm(dense(h) + residual)`` (HF ``BertSelfOutput`` / ``BertOutput``)."""

    def __init__(self, config: BertConfig, n_in: int, *, rngs: nnx.Rngs):
        self.dense = _linear(config, n_in, config.hidden_size, rngs)
        self.LayerNorm = _layer_norm(config)

    def __call__(self, h: Array, residual: Array) -> Array:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.self = BertSelfAttention(config, rngs=rngs)
        self.output = BertResidualOutput(config, config.hidden_size, rngs=rngs)

    def __call__(self, x: Array, key_mask: Array | None) -> Array:
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(config, config.hidden_size, config.intermediate_size, rngs)
        self.act = get_activation(config.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.act(self.dense(x))


class BertLayer(nnx.Module):
    """Post-LN encoder layer: ``attention`` -> ``intermediate`` -> ``output``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(config, rngs=rngs)
        self.intermediate = BertIntermediate(config, rngs=rngs)
        self.output = BertResidualOutput(config, config.intermediate_size, rngs=rngs)

    def __call__(self, x: Array, key_mask: Array | None) -> Array:
        a = self.attention(x, key_mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.layer = nnx.List([BertLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])

    def __call__(self, x: Array, key_mask: Array | None) -> Array:
        for layer in self.layer:
            x = layer(x, key_mask)
        return x


class BertPooler(nnx.Module):
    """``tanh(dense(h[:, 0]))``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(config, config.hidden_size, config.hidden_size, rngs)

    def __call__(self, h: Array) -> Array:
        return jnp.tanh(self.dense(h[:, 0]))


def _check_inputs(input_ids, attention_mask):
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {input_ids.shape}")
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    return input_ids, attention_mask


class BertModel(nnx.Module):
    """BERT/RoBERTa encoder.

    ``model(input_ids, attention_mask=None, token_type_ids=None, position_ids=None)`` returns
    ``(last_hidden_state (B, T, H), pooled (B, H) or None)``; :meth:`hidden_states` returns
    only the first. Outputs are in the compute dtype.
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.encoder = BertEncoder(config, rngs=rngs)
        self.pooler = BertPooler(config, rngs=rngs) if config.add_pooling_layer else nnx.data(None)

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None,
                      token_type_ids: Array | None = None, position_ids: Array | None = None) -> Array:
        """Last hidden states (B, T, H)."""
        input_ids, attention_mask = _check_inputs(input_ids, attention_mask)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        key_mask = None if attention_mask is None else attention_mask != 0
        return self.encoder(x, key_mask)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, position_ids: Array | None = None):
        h = self.hidden_states(input_ids, attention_mask, token_type_ids, position_ids)
        pooled = self.pooler(h) if self.pooler is not None else None
        return h, pooled

    def sentence_embedding(self, input_ids: Array, attention_mask: Array | None = None,
                           token_type_ids: Array | None = None) -> Array:
        """Mean-pooled last hidden states over real tokens (B, H) float32."""
        return mean_pool(self.hidden_states(input_ids, attention_mask, token_type_ids), attention_mask)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, param_dtype=None, lora=None,
                        rngs: nnx.Rngs | None = None, add_pooling_layer: bool | None = None, mesh=None,
                        rules=None) -> "BertModel":
        """Loads the encoder of any BERT/RoBERTa checkpoint (base, classification or MLM);
        ``add_pooling_layer=None`` keeps the pooler exactly when the checkpoint has one."""
        return _load(cls, path, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs,
                     add_pooling_layer=add_pooling_layer, mesh=mesh, rules=rules)


RobertaModel = BertModel


def _logits(x: Array) -> Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class _SequenceClassifier(nnx.Module):
    """What the two classification models share: the encoder under ``base_name`` and loading."""

    base_name: str

    @property
    def encoder_model(self) -> BertModel:
        return getattr(self, self.base_name)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, param_dtype=None, lora=None,
                        rngs: nnx.Rngs | None = None, num_labels: int | None = None,
                        new_head: bool = False, mesh=None, rules=None):
        """See :func:`from_pretrained` (``num_labels`` overrides the config's; ``new_head``
        initialises a head the checkpoint lacks)."""
        return _load(cls, path, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs,
                     num_labels=num_labels, new_head=new_head, mesh=mesh, rules=rules)


class BertForSequenceClassification(_SequenceClassifier):
    """``classifier(pooler(bert(x)))`` -> logits (B, num_labels) float32 (HF's dropout is
    the identity in eval mode)."""

    base_name = "bert"

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        if not config.add_pooling_layer:
            raise ValueError("BertForSequenceClassification needs the pooler (add_pooling_layer=True)")
        self.config = config
        self.bert = BertModel(config, rngs=rngs)
        self.classifier = _linear(config, config.hidden_size, config.num_labels, rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, position_ids: Array | None = None) -> Array:
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        return linear_f32(self.classifier, pooled)  # accumulated into float32


class RobertaClassificationHead(nnx.Module):
    """``out_proj(tanh(dense(h[:, 0])))`` (HF ``RobertaClassificationHead``)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(config, config.hidden_size, config.hidden_size, rngs)
        self.out_proj = _linear(config, config.hidden_size, config.num_labels, rngs)

    def __call__(self, h: Array) -> Array:
        return linear_f32(self.out_proj, jnp.tanh(self.dense(h[:, 0])))  # accumulated into float32


class RobertaForSequenceClassification(_SequenceClassifier):
    """``classifier(roberta(x))`` on the ``<s>`` token -> logits (B, num_labels) float32.
    The encoder has no pooler (as in HF)."""

    base_name = "roberta"

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        if config.add_pooling_layer:
            config = dataclasses.replace(config, add_pooling_layer=False)
        self.config = config
        self.roberta = BertModel(config, rngs=rngs)
        self.classifier = RobertaClassificationHead(config, rngs=rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, position_ids: Array | None = None) -> Array:
        h = self.roberta.hidden_states(input_ids, attention_mask, token_type_ids, position_ids)
        return _logits(self.classifier(h))


# =======================================================================================
# Loading / saving HF checkpoints

_BERT_IGNORE = (r"(^|\.)embeddings\.(position_ids|token_type_ids)$",)
_BASE_PREFIXES = ("", "bert.", "roberta.", "xlm-roberta.", "camembert.")


def _hf_leaf(name: str) -> str:
    return re.sub(r"\.(kernel|embedding)$", ".weight", name)


def _load(cls, path, *, dtype=None, param_dtype=None, lora=None, rngs=None, add_pooling_layer=None,
          num_labels=None, new_head=False, mesh=None, rules=None):
    path = os.fspath(path)
    hf = read_hf_config(path)
    ckpt = SafetensorsDir(path)
    # The checkpoint's prefix of the encoder tensors ("" for a BertModel checkpoint).
    prefix = next((p for p in _BASE_PREFIXES if f"{p}embeddings.word_embeddings.weight" in ckpt), None)
    if prefix is None:
        raise ValueError(f"{path}: checkpoint is missing tensor 'embeddings.word_embeddings.weight' "
                         f"(looked for prefixes {[p for p in _BASE_PREFIXES if p]} too)")
    overrides: dict[str, Any] = {}
    if num_labels is not None:
        overrides["num_labels"] = int(num_labels)
    if cls is BertModel:
        if add_pooling_layer is None:
            add_pooling_layer = f"{prefix}pooler.dense.weight" in ckpt
        overrides["add_pooling_layer"] = bool(add_pooling_layer)
    elif cls is BertForSequenceClassification:
        overrides["add_pooling_layer"] = True
    else:
        overrides["add_pooling_layer"] = False
    config = with_dtypes(BertConfig.from_hf_dict(hf, **overrides), dtype, param_dtype)
    base = None if cls is BertModel else cls.base_name + "."
    is_head = lambda n: base is not None and not n.startswith(base)  # noqa: E731

    def name_map(n: str) -> tuple[list[str], bool]:
        transpose = n.endswith(".kernel")
        hf_name = _hf_leaf(n)
        if base is not None:
            if is_head(n):
                return [hf_name], transpose
            hf_name = hf_name[len(base):]
        cands = [prefix + hf_name]
        if hf_name.endswith("LayerNorm.weight"):  # old TF-converted checkpoints
            cands.append(prefix + hf_name[:-len("weight")] + "gamma")
        elif hf_name.endswith("LayerNorm.bias"):
            cands.append(prefix + hf_name[:-len("bias")] + "beta")
        return cands, transpose

    ignore = list(_BERT_IGNORE)
    if not config.add_pooling_layer:
        ignore.append(r"(^|\.)pooler\.dense\.(weight|bias)$")
    head_rngs = rngs if rngs is not None else nnx.Rngs(0)

    def init_fresh(name: str, ref) -> Array:
        # HF's init: kernels / embeddings normal(initializer_range), biases 0, LayerNorm weights 1.
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("kernel", "embedding"):
            return config.initializer_range * jax.random.normal(head_rngs.params(), ref.shape, ref.dtype)
        return (jnp.ones if leaf == "weight" else jnp.zeros)(ref.shape, ref.dtype)

    return load_model(cls, config, ckpt,
                      lambda model, names: rename_weight_map(
                          model, names, name_map, ignore=ignore, optional=lambda n: new_head and is_head(n)),
                      rngs=rngs, lora=lora, unexpected="warn", init_fresh=init_fresh, mesh=mesh, rules=rules)


def from_pretrained(path: str | os.PathLike, *, dtype=None, param_dtype=None, lora=None,
                    rngs: nnx.Rngs | None = None, task: str | None = None, num_labels: int | None = None,
                    new_head: bool = False, mesh=None, rules=None):
    """Loads a ``transformers`` BERT/RoBERTa checkpoint (``config.json`` + ``model.safetensors``
    or a sharded ``model.safetensors.index.json``) from a local directory.

    Args:
      path: the checkpoint directory.
      dtype: compute dtype; ``None`` = float32. Classification logits are float32.
      param_dtype: parameter dtype; ``None`` = float32 whatever the checkpoint's dtype.
      lora: a :class:`~ntk_jax.models.lora.LoRAConfig` (or its dict) attached after loading.
      rngs: random streams for LoRA factors and a new head (default ``nnx.Rngs(0)``).
      task: ``"base"`` (:class:`BertModel`) or ``"sequence_classification"``
        (:class:`BertForSequenceClassification` / :class:`RobertaForSequenceClassification`
        by ``model_type``); ``None`` picks from the config's ``architectures``.
      num_labels: overrides the config's number of labels (classification only).
      new_head: initialise the classification head afresh (HF init: ``normal(
        initializer_range)`` kernels, zero biases) when the checkpoint has none — to
        fine-tune a base / MLM checkpoint. Without it a missing head is an error.
      mesh, rules: load sharded over a ``("data", "model")`` mesh by partition ``rules``
        (:func:`~ntk_jax.models.hf_loading.load_model`).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the tensor for a
    missing or wrongly shaped tensor; unused checkpoint tensors (e.g. an MLM head) are
    reported with a warning.
    """
    hf = read_hf_config(path)
    if task is None:
        archs = hf.get("architectures") or []
        task = "sequence_classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "base"
    if task == "base":
        if num_labels is not None or new_head:
            raise ValueError("num_labels / new_head apply to task='sequence_classification' only")
        return BertModel.from_pretrained(path, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs,
                                         mesh=mesh, rules=rules)
    if task != "sequence_classification":
        raise ValueError(f"task must be 'base' or 'sequence_classification', got {task!r}")
    cls = RobertaForSequenceClassification if hf.get("model_type") in ROBERTA_MODEL_TYPES \
        else BertForSequenceClassification
    return cls.from_pretrained(path, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs,
                               num_labels=num_labels, new_head=new_head, mesh=mesh, rules=rules)


def to_hf_state_dict(model) -> dict[str, np.ndarray]:
    """HF tensor names -> numpy arrays (``nn.Linear`` layout), LoRA adapters merged in.
    A :class:`BertModel` gets unprefixed names (HF ``BertModel``)."""
    out = {}
    for n, v in effective_kernels(model).items():
        a = np.asarray(v)
        out[_hf_leaf(n)] = a.T if n.endswith(".kernel") else a
    return out


def save_pretrained(model, directory: str | os.PathLike) -> None:
    """Writes a checkpoint that ``transformers`` (``AutoModel`` / the matching
    ``*ForSequenceClassification``) and :func:`from_pretrained` load; LoRA adapters are
    merged into the exported weights (the model is unchanged)."""
    c = model.config
    if isinstance(model, BertModel):
        arch = "RobertaModel" if c.is_roberta else "BertModel"
    elif isinstance(model, RobertaForSequenceClassification):
        arch = "RobertaForSequenceClassification"
    else:
        arch = "BertForSequenceClassification"
    save_hf_safetensors(to_hf_state_dict(model), c.to_hf_dict(arch), directory)


def _peft_module(model, path: str) -> PeftModule:
    """The NNX paths are the HF module names."""
    return PeftModule(path)


register_architecture(
    ("bert",) + ROBERTA_MODEL_TYPES, BertConfig.from_hf_dict, load_fn=from_pretrained,
    partition=PartitionNames(column=("query", "key", "value", r"intermediate\.dense"), row=(r"output\.dense",),
                             vocab=("word_embeddings",), positions=("position_embeddings", "token_type_embeddings"),
                             replicated=("LayerNorm", "pooler", "classifier")),
    peft={BertModel: PeftSpec("FEATURE_EXTRACTION", _peft_module),
          BertForSequenceClassification: PeftSpec("SEQ_CLS", _peft_module, heads=("classifier",)),
          RobertaForSequenceClassification: PeftSpec("SEQ_CLS", _peft_module, heads=("classifier",))})
