"""Small pieces shared by the model ports (:mod:`~ntk_jax.models.transformer`,
:mod:`~ntk_jax.models.gpt2`, :mod:`~ntk_jax.models.bert`): HF-style ``LayerNorm``, HF
activation names, the dtype / dict helpers of their config dataclasses, and flat dotted
parameter names (:func:`flatten_state` / :func:`unflatten_state`, :func:`base_params_filter`).

Imports only jax / flax, so every model module can import it without cycles.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ntk_jax.utils import DictConfig

Array = jax.Array

__all__ = ["LayerNorm", "get_activation", "resolve_dtype", "with_dtypes", "ConfigMixin", "accum_dtype",
           "attention_scores", "linear_f32", "attend_f32", "flatten_state", "unflatten_state",
           "base_params_filter"]


# ---------------------------------------------------------------------------------------
# Mixed precision: with a bfloat16 (or float16) compute dtype the ports keep the residual
# stream, projections and MLPs in that dtype, and do in (at least) float32
#   * norm statistics (LayerNorm mean/variance, RMSNorm mean square; :class:`LayerNorm`,
#     ``transformer.RMSNorm``),
#   * attention scores (the q·k contraction accumulates into float32) and the softmax,
#   * the output logits (the last matmul accumulates into float32 and returns float32),
# so kernels built from the logits (``ntk_jax.kernels.outputs``) see float32 values.


def accum_dtype(dtype):
    """The dtype to accumulate/normalise in for compute dtype ``dtype``: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def attention_scores(spec: str, q: Array, k: Array, scale: float) -> Array:
    """``einsum(spec, q, k) * scale`` accumulated and returned in (at least) float32."""
    acc = accum_dtype(q.dtype)
    return jnp.einsum(spec, q, k, preferred_element_type=acc).astype(acc) * scale


def linear_f32(lin, x: Array) -> Array:
    """A :class:`~ntk_jax.models.lora.LoRALinear` applied with its matmul accumulated into
    (at least) float32 and a float32 result (for output heads); same values as ``lin(x)``
    in float32 compute. ``x (..., in) -> (..., out)``."""
    dtype = lin.dtype or x.dtype
    acc = accum_dtype(dtype)
    x = x.astype(dtype)
    y = jnp.matmul(x, lin.kernel[...].astype(dtype), preferred_element_type=acc).astype(acc)
    if lin.bias is not None:
        y = y + lin.bias[...].astype(acc)
    if lin.lora is not None:
        y = y + lin.lora(x).astype(acc)
    return y


def attend_f32(embed, h: Array) -> Array:
    """Tied output head ``h @ embedding.T`` (``nnx.Embed.attend``) accumulated into (at
    least) float32, float32 result. ``h (..., H) -> (..., V)``."""
    dtype = embed.dtype or h.dtype
    acc = accum_dtype(dtype)
    w = embed.embedding[...].astype(dtype)
    return jnp.einsum("...h,vh->...v", h.astype(dtype), w, preferred_element_type=acc).astype(acc)


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


def resolve_dtype(name: Any, field: str) -> str:
    """The canonical name of dtype ``name``; ``ValueError`` naming ``field`` if it is none."""
    try:
        return jnp.dtype(name).name
    except TypeError as e:
        raise ValueError(f"{field}={name!r} is not a dtype name") from e


def with_dtypes(config: Any, dtype: Any = None, param_dtype: Any = None) -> Any:
    """``config`` with its ``dtype`` / ``param_dtype`` fields replaced by those given (dtype
    names or objects; ``None`` keeps the config's)."""
    overrides = {k: jnp.dtype(v).name for k, v in (("dtype", dtype), ("param_dtype", param_dtype))
                 if v is not None}
    if not overrides:
        return config
    if not dataclasses.is_dataclass(config) or not all(
            k in {f.name for f in dataclasses.fields(config)} for k in overrides):
        raise ValueError(f"{type(config).__name__} has no {sorted(overrides)} fields to override")
    return dataclasses.replace(config, **overrides)


class ConfigMixin(DictConfig):
    """Shared methods of the frozen model config dataclasses (fields ``dtype`` / ``param_dtype``;
    ``to_dict`` / ``from_dict`` from :class:`ntk_jax.utils.DictConfig`)."""

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)



# ---------------------------------------------------------------------------------------
# Flat dotted parameter names (checkpoint tensor names of this repo's format)


def base_params_filter():
    """The NNX filter of base parameters: ``nnx.Param`` but not ``nnx.LoRAParam``."""
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def flatten_state(tree: dict, sep: str = ".") -> dict[str, Any]:
    """Flattens a nested pure dict (``nnx.to_pure_dict(state)``) to ``{'a.0.b': leaf}``."""
    out: dict[str, Any] = {}

    def rec(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                rec(v, f"{prefix}{sep}{k}" if prefix else str(k))
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
