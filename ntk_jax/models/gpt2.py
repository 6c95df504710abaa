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

The module also holds the small helpers the BERT port shares (:class:`LayerNorm`,
:func:`get_activation`, :class:`SafetensorsCheckpoint`, :func:`load_hf_params`,
:func:`save_hf_safetensors`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import warnings
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ntk_jax.models.lora import LoRAConfig, LoRALinear, apply_lora, iter_linears

Array = jax.Array

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

__all__ = [
    "GPT2Config",
    "LayerNorm",
    "GPT2Attention",
    "GPT2MLP",
    "GPT2Block",
    "GPT2LMHeadModel",
    "get_activation",
    "position_ids_from_mask",
    "SafetensorsCheckpoint",
    "load_hf_params",
    "effective_kernels",
    "save_hf_safetensors",
    "read_hf_config",
    "from_pretrained",
    "save_pretrained",
    "to_hf_state_dict",
]


# =======================================================================================
# Helpers shared with the BERT port


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` (HF ``nn.LayerNorm``), computed in
    (at least) float32 and returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        h = x.astype(jnp.promote_types(dtype, jnp.float32))
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        h = h * self.weight[...].astype(h.dtype) + self.bias[...].astype(h.dtype)
        return h.astype(dtype)


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """The activation HF names ``name`` (``ACT2FN``): ``gelu`` is exact (erf), ``gelu_new`` /
    ``gelu_pytorch_tanh`` / ``gelu_fast`` the tanh approximation."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


def position_ids_from_mask(attention_mask: Array | None, batch: int, length: int) -> Array:
    """``cumsum(mask) - 1`` clipped at 0, or ``arange(T)`` without a mask: (B, T) int32."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    m = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def _mask_value(dtype) -> float:
    # A large finite negative: fully masked rows give a uniform softmax, never NaN.
    return float(jnp.finfo(dtype).min)


def _resolve_dtype(name: str, field: str) -> str:
    try:
        return jnp.dtype(name).name
    except TypeError as e:
        raise ValueError(f"{field}={name!r} is not a dtype name") from e


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, name))
        else:
            out[name] = v
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, leaf in flat.items():
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return tree


def read_hf_config(directory: str | os.PathLike) -> dict:
    """The ``config.json`` of a local HF checkpoint directory as a dict."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}")
    with open(path) as f:
        return json.load(f)


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool"}


class SafetensorsCheckpoint:
    """Read access to the tensors of a local HF checkpoint directory: ``model.safetensors``
    or the shards listed in ``model.safetensors.index.json``. Tensors come back as numpy
    arrays (``safe_open(..., framework="numpy")``; bfloat16 via ``ml_dtypes``)."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.directory = os.fspath(directory)
        single = os.path.join(self.directory, WEIGHTS_NAME)
        index = os.path.join(self.directory, WEIGHTS_INDEX_NAME)
        self._handles: dict[str, Any] = {}
        self._weight_map: dict[str, str] = {}
        if os.path.isfile(single):
            h = safe_open(single, framework="numpy")
            self._handles[single] = h
            self._weight_map = {k: single for k in h.keys()}
        elif os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' dict")
            for name, shard in weight_map.items():
                path = os.path.join(self.directory, shard)
                if path not in self._handles:
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"{index} lists shard {shard!r}, which is not in {self.directory!r}")
                    self._handles[path] = safe_open(path, framework="numpy")
                self._weight_map[name] = path
        else:
            extra = ""
            if any(os.path.isfile(os.path.join(self.directory, n)) for n in ("pytorch_model.bin", "tf_model.h5")):
                extra = " (only PyTorch .bin / TF weights found: re-save with safetensors)"
            raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {self.directory!r}{extra}")

    def keys(self) -> set[str]:
        return set(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._weight_map[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        path = self._weight_map[name]
        try:
            return self._handles[path].get_tensor(name)
        except TypeError:  # numpy has no bfloat16: read the raw bytes
            return self._read_raw(path, name)

    @staticmethod
    def _read_raw(path: str, name: str) -> np.ndarray:
        import ml_dtypes  # a jax dependency

        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            info = header[name]
            start, end = info["data_offsets"]
            f.seek(8 + n + start)
            buf = f.read(end - start)
        dt = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dt is None:
            raise TypeError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = ml_dtypes.bfloat16 if dt == "bfloat16" else np.dtype(dt)
        return np.frombuffer(buf, dtype=dtype).reshape(info["shape"]).copy()


def load_hf_params(model: nnx.Module, ckpt: SafetensorsCheckpoint,
                   name_map: Callable[[str], tuple[list[str], bool]], *,
                   ignore: Iterable[str] = (), init_missing: Callable[[str], bool] | None = None,
                   init_std: float = 0.02, rngs: nnx.Rngs | None = None) -> None:
    """Fills every ``nnx.Param`` of ``model`` (no LoRA factors yet) from ``ckpt``, in place.

    ``name_map(nnx_name)`` gives the candidate checkpoint names of a parameter (first one
    present wins) and whether the tensor is transposed (PyTorch ``nn.Linear`` layout).
    Parameters for which ``init_missing(nnx_name)`` is true may be absent from the checkpoint;
    they are then freshly initialised (HF's init: kernels/embeddings ``normal(init_std)``,
    biases 0, LayerNorm weights 1). Checkpoint tensors matching none of the parameters and no
    ``ignore`` regex are reported with a warning.

    Raises ``ValueError`` naming the tensor(s) for missing tensors and shape mismatches.
    """
    state = nnx.state(model, nnx.Param)
    expected = _flatten(nnx.to_pure_dict(state))
    plan: dict[str, tuple[str, bool]] = {}
    missing: list[str] = []
    fresh: list[str] = []
    for nnx_name, ref in expected.items():
        candidates, transpose = name_map(nnx_name)
        hit = next((c for c in candidates if c in ckpt), None)
        if hit is None:
            if init_missing is not None and init_missing(nnx_name):
                fresh.append(nnx_name)
            else:
                missing.append(candidates[0])
            continue
        want = tuple(ref.shape)[::-1] if transpose else tuple(ref.shape)
        got = ckpt.shape(hit)
        if got != want:
            raise ValueError(f"{ckpt.directory}: tensor {hit!r} has shape {got}, expected {want} "
                             f"(for parameter {nnx_name!r}; does config.json match the weights?)")
        plan[nnx_name] = (hit, transpose)
    if missing:
        raise ValueError(f"{ckpt.directory}: checkpoint is missing tensor(s) {sorted(missing)}")
    ignore_re = [re.compile(p) for p in ignore]
    used = {hit for hit, _ in plan.values()}
    unused = sorted(k for k in ckpt.keys() - used if not any(r.search(k) for r in ignore_re))
    if unused:
        shown = unused if len(unused) <= 10 else unused[:10] + [f"... ({len(unused) - 10} more)"]
        warnings.warn(f"{ckpt.directory}: checkpoint tensors not used by {type(model).__name__}: {shown}",
                      stacklevel=3)
    loaded: dict[str, Any] = {}
    for nnx_name, (hit, transpose) in plan.items():
        arr = ckpt.get(hit)
        if transpose:
            arr = arr.T
        loaded[nnx_name] = jnp.asarray(np.asarray(arr), dtype=expected[nnx_name].dtype)
    if fresh:
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        for nnx_name in fresh:
            ref = expected[nnx_name]
            leaf = nnx_name.rsplit(".", 1)[-1]
            if leaf in ("kernel", "embedding"):
                val = init_std * jax.random.normal(rngs.params(), ref.shape, ref.dtype)
            elif leaf == "weight":  # LayerNorm
                val = jnp.ones(ref.shape, ref.dtype)
            else:
                val = jnp.zeros(ref.shape, ref.dtype)
            loaded[nnx_name] = val
    nnx.replace_by_pure_dict(state, _unflatten(loaded))
    nnx.update(model, state)


def effective_kernels(model: nnx.Module) -> dict[str, Array]:
    """Flat NNX name -> value of every base parameter, with LoRA adapters folded into their
    kernels (``W + (alpha/r) A B``); the model is not modified."""
    flat = _flatten(nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))
    for path, lin in iter_linears(model):
        if lin.lora is not None:
            name = ".".join(str(p) for p in path) + ".kernel"
            delta = (lin.lora.lora_a[...] @ lin.lora.lora_b[...]) * lin.lora.scale
            flat[name] = (flat[name] + delta).astype(flat[name].dtype)
    return flat


def save_hf_safetensors(tensors: dict[str, Any], config: dict, directory: str | os.PathLike) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (numpy; ``format: pt`` metadata so
    ``transformers`` loads it)."""
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(arrays, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def _dtype_overrides(dtype, param_dtype) -> dict[str, str]:
    out = {}
    if dtype is not None:
        out["dtype"] = jnp.dtype(dtype).name
    if param_dtype is not None:
        out["param_dtype"] = jnp.dtype(param_dtype).name
    return out


def _lora_config(lora) -> LoRAConfig | None:
    if lora is None or isinstance(lora, LoRAConfig):
        return lora
    return LoRAConfig.from_dict(lora)


# =======================================================================================
# Config


@dataclasses.dataclass(frozen=True)
class GPT2Config:
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
        object.__setattr__(self, "dtype", _resolve_dtype(self.dtype, "GPT2Config.dtype"))
        object.__setattr__(self, "param_dtype", _resolve_dtype(self.param_dtype, "GPT2Config.param_dtype"))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "GPT2Config":
        """Builds from a dict / ``ConfigDict``; unknown keys raise ``ValueError`` naming them."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPT2Config keys {unknown}; known: {sorted(known)}")
        return cls(**d)

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
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32)) * self.scaling
        scores = jnp.where(mask[:, None], scores, _mask_value(scores.dtype))
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, E)
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
        logits = self.wte.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, param_dtype=None, lora=None,
                        rngs: nnx.Rngs | None = None) -> "GPT2LMHeadModel":
        """See :func:`from_pretrained`."""
        return from_pretrained(path, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)


# =======================================================================================
# Loading / saving HF checkpoints

_GPT2_IGNORE = (r"(^|\.)attn\.(bias|masked_bias)$",)


def from_pretrained(path: str | os.PathLike, *, dtype=None, param_dtype=None, lora=None,
                    rngs: nnx.Rngs | None = None) -> GPT2LMHeadModel:
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

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the tensor for
    a missing or wrongly shaped tensor. Unused checkpoint tensors (other than HF's attention
    mask buffers and a tied ``lm_head.weight``) are reported with a warning.
    """
    path = os.fspath(path)
    config = GPT2Config.from_hf_dict(read_hf_config(path), **_dtype_overrides(dtype, param_dtype))
    ckpt = SafetensorsCheckpoint(path)
    prefix = "transformer." if "transformer.wte.weight" in ckpt else ""
    model = nnx.eval_shape(lambda: GPT2LMHeadModel(config, rngs=nnx.Rngs(0)))

    def name_map(n: str) -> tuple[list[str], bool]:
        if n == "lm_head.kernel":
            return ["lm_head.weight"], True
        base = re.sub(r"\.(kernel|embedding)$", ".weight", n)
        return [prefix + base], False

    ignore = list(_GPT2_IGNORE)
    if config.tie_word_embeddings:
        ignore.append(r"^lm_head\.weight$")
    load_hf_params(model, ckpt, name_map, ignore=ignore)
    lcfg = _lora_config(lora)
    if lcfg is not None:
        apply_lora(model, lcfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
    return model


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
