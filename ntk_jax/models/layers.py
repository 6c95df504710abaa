"""Small pieces shared by the model ports (:mod:`~ntk_jax.models.transformer`,
:mod:`~ntk_jax.models.gpt2`, :mod:`~ntk_jax.models.bert`): HF-style ``LayerNorm``, HF
activation names, the dtype / dict helpers of their config dataclasses, and flat dotted
parameter names (:func:`flatten_state` / :func:`unflatten_state`, :func:`base_params_filter`).

Imports only jax / flax, so every model module can import it without cycles.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ntk_jax.utils import DictConfig

Array = jax.Array

__all__ = ["LayerNorm", "get_activation", "resolve_dtype", "with_dtypes", "ConfigMixin", "accum_dtype",
           "attention_scores", "dot_product_attention", "mask_value", "CAUSAL_QUERY_BLOCK", "linear_f32", "attend_f32", "flatten_state", "unflatten_state",
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


def mask_value(dtype) -> float:
    """The score of a masked (query, key) pair: a large finite negative, so a row with no
    visible key gets a uniform softmax, never NaN."""
    return float(jnp.finfo(dtype).min)


# Query rows per block of the causal attention (:func:`dot_product_attention`). Measured on the
# 2-core CPU host (docs/kernels.md, "The model pass"): 32-64 are within a few per cent of each
# other from T = 64 to 512, a whole-sequence block is 1.3-2.5x slower at T >= 256.
CAUSAL_QUERY_BLOCK = 64


def _attention_probs(rows: Array, keys: Array, mask: Array | None, rep: int, scale: float) -> Array:
    """Softmax probabilities ``(B, KV, rep·n, K)`` (float32 or wider) of one block of query rows
    ``rows (B, KV, rep·n, D)`` against ``keys (B, KV, K, D)``; ``mask (B, n | 1, K)`` or None."""
    B, KV, R, _ = rows.shape
    K = keys.shape[2]
    scores = attention_scores("bgqd,bgkd->bgqk", rows, keys, scale)
    if mask is not None:
        scores = scores.reshape(B, KV, rep, R // rep, K)
        scores = jnp.where(mask[:, None, None], scores, mask_value(scores.dtype)).reshape(B, KV, R, K)
    return jax.nn.softmax(scores, axis=-1)


def _attention_block_plain(rows, keys, values, mask, rep, scale):
    """``softmax(rows·keysᵀ·scale, masked) @ values`` for one block: ``(B, KV, rep·n, D)`` in
    ``values``' dtype (differentiated by JAX op by op)."""
    probs = _attention_probs(rows, keys, mask, rep, scale)
    return jnp.einsum("bgqk,bgkd->bgqd", probs.astype(values.dtype), values)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _attention_block(rows, keys, values, mask, rep, scale):
    """:func:`_attention_block_plain` with its derivative written out (below)."""
    return _attention_block_plain(rows, keys, values, mask, rep, scale)


@_attention_block.defjvp
def _attention_block_jvp(rep, scale, primals, tangents):
    """``dO = (P ⊙ dS) V − rowsum(P ⊙ dS) ⊙ O + P dV`` with ``dS = (dQ Kᵀ + Q dKᵀ) · scale``
    (zero on masked pairs): the derivative of ``O = softmax(S) V`` with the softmax's row term
    taken through the output. Its transpose, which reverse mode runs, is the FlashAttention
    backward ``dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O))``: a row sum over the head dimension instead of
    over the keys, and no gradient through the mask's select. Exact (not an approximation);
    forward mode and higher derivatives differentiate this rule."""
    rows, keys, values, mask = primals
    d_rows, d_keys, d_values = tangents[:3]
    probs = _attention_probs(rows, keys, mask, rep, scale)
    out = jnp.einsum("bgqk,bgkd->bgqd", probs.astype(values.dtype), values)
    acc = probs.dtype
    d_scores = (jnp.einsum("bgqd,bgkd->bgqk", d_rows, keys, preferred_element_type=acc)
                + jnp.einsum("bgqd,bgkd->bgqk", rows, d_keys, preferred_element_type=acc)).astype(acc) * scale
    if mask is not None:
        B, KV, R, K = d_scores.shape
        d_scores = jnp.where(mask[:, None, None], d_scores.reshape(B, KV, rep, R // rep, K), 0.0).reshape(B, KV, R, K)
    pds = probs * d_scores
    row = pds.sum(-1, keepdims=True)
    d_out = (jnp.einsum("bgqk,bgkd->bgqd", pds.astype(values.dtype), values, preferred_element_type=acc)
             - row * out.astype(acc)
             + jnp.einsum("bgqk,bgkd->bgqd", probs.astype(values.dtype), d_values, preferred_element_type=acc))
    return out, d_out.astype(out.dtype)


# Whether :func:`dot_product_attention` differentiates through :func:`_attention_block`'s
# written-out rule (True) or op by op (False; kept for A/B timing, docs/kernels.md).
ATTENTION_JVP_RULE = True


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float, *,
                          causal: bool = False, query_block: int | None = None) -> Array:
    """Softmax attention with grouped-query heads, computed head-major.

    Shapes: ``q (B, T, H, D)``, ``k``/``v`` ``(B, S, KV, D)`` with ``KV`` dividing ``H`` (query
    head ``h`` uses key/value head ``h // (H // KV)``, HF's ``repeat_kv``, never materialised);
    ``mask`` ``(B, T, S)`` or ``(B, 1, S)`` bool, True where query ``i`` may see key ``j``, or
    ``None``. Returns ``(B, T, H * D)`` in ``v``'s dtype.

    Scores ``q·k * scale`` accumulate in (at least) float32 (:func:`attention_scores`), masked
    pairs get :func:`mask_value`, the softmax runs in float32 and the probabilities are cast to
    ``v``'s dtype before ``p @ v``. The query rows of one key/value head are folded into one
    ``(H/KV · T, D)`` operand, so each contraction is one batched GEMM over ``(B, KV)``.

    ``causal=True`` promises that ``mask`` hides every key ``j > i`` (``T == S``; a causal mask,
    possibly with padding or a sliding window on top). The queries are then processed in blocks
    of ``query_block`` rows (default :data:`CAUSAL_QUERY_BLOCK`, read at trace time), each against keys ``[0, block end)`` only: the blocks above the
    diagonal, which the mask would zero, are never computed (about half of the score and
    ``p @ v`` work for long sequences, and of its gradient). Rows with a visible key are the
    same as the unblocked computation up to float rounding; a row with none (a padding query)
    averages the values of its block's keys instead of all keys — finite and meaningless either
    way.

    Each block is differentiated by a written-out rule (:func:`_attention_block`), whose
    transpose is the FlashAttention backward; forward mode and higher derivatives work as for
    any JAX function.
    """
    B, T, H, D = q.shape
    S, KV = k.shape[1], k.shape[2]
    if H % KV or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention shapes q {q.shape}, k {k.shape}, v {v.shape}: key/value heads must "
                         f"divide query heads and k, v must agree")
    rep = H // KV
    if causal and S != T:
        raise ValueError(f"causal attention needs as many keys as queries, got T={T}, S={S}")
    qh = q.reshape(B, T, KV, rep, D).transpose(0, 2, 3, 1, 4)  # (B, KV, rep, T, D)
    kh = k.transpose(0, 2, 1, 3)  # (B, KV, S, D)
    vh = v.transpose(0, 2, 1, 3)
    if query_block is None:
        query_block = CAUSAL_QUERY_BLOCK
    if query_block < 1:
        raise ValueError(f"query_block must be positive, got {query_block}")
    step = query_block if causal else T
    outs = []
    for start in range(0, T, step):
        end = min(T, start + step)
        keys = end if causal else S
        n = end - start
        rows = qh[:, :, :, start:end].reshape(B, KV, rep * n, D)
        m = None
        if mask is not None:
            m = mask[:, start:end, :keys] if mask.shape[1] != 1 else mask[:, :, :keys]
        block = _attention_block if ATTENTION_JVP_RULE else _attention_block_plain
        outs.append(block(rows, kh[:, :, :keys], vh[:, :, :keys], m, rep, float(scale)).reshape(B, KV, rep, n, D))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * D)


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
