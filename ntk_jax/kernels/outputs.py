"""Which model outputs a kernel is taken over: language models and sequence classifiers.

A language model's logits are ``(n, T, V)``. The kernels of this library need ``f(params, x)``
with one output vector per example; for LMs the positions that count (all real tokens, or only
response tokens) are given by a mask the caller passes, and positions are averaged so that
long and short examples are comparable (docs/theory.md §1.2):

* ``reduce="mean"``: ``f(x) = (1/|M_x|) Σ_{t∈M_x} z_t(x) ∈ R^V`` (O = V). Its sum of outputs
  is the length-normalised sum of logits of NTK-Selector; its traced exact kernel pairs equal
  vocabulary entries.
* ``reduce="none"``: ``f(x)_t = m_t z_t(x) / |M_x| ∈ R^{T×V}`` (O = T·V), positions aligned
  by index. Same sum of outputs as ``"mean"``.

A sequence classifier's logits are already ``(n, C)``: :func:`classification_output_fn` takes
them as they are (O = C; for a binary head the kernel is over the 2 logits).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # kernels sit below models: only the type is used here
    from ntk_jax.models.subset import ParamSubset

REDUCTIONS = ("mean", "none")


def masked_mean_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """``(n, T, V)`` logits, ``(n, T)`` 0/1 mask → ``(n, V)`` mean over masked positions."""
    mask = mask.astype(logits.dtype)
    count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    return jnp.einsum("ntv,nt->nv", logits, mask) / count


def masked_scaled_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """``(n, T, V)``, ``(n, T)`` → ``(n, T, V)``: ``m_t z_t / |M|`` (masked positions zero)."""
    mask = mask.astype(logits.dtype)
    count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    return logits * (mask / count)[..., None]


def default_lm_call(model, batch: dict) -> jax.Array:
    """``model(input_ids, attention_mask=...)`` → logits ``(n, T, V)``."""
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"))


def lm_output_fn(subset: "ParamSubset", *, reduce: str = "mean", mask_key: str = "loss_mask",
                 call: Callable[[Any, dict], jax.Array] = default_lm_call) -> Callable:
    """``f(params, batch)`` for a language model, over ``subset``'s parameters.

    ``batch`` is a dict with ``input_ids (n, T)``, ``attention_mask (n, T)`` and the mask of
    positions that count under ``mask_key`` (default the response-token ``loss_mask``).
    Output ``(n, V)`` for ``reduce="mean"``, ``(n, T, V)`` for ``reduce="none"``.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; use one of {REDUCTIONS}")
    head = masked_mean_logits if reduce == "mean" else masked_scaled_logits

    def f(params, batch):
        if mask_key not in batch:
            raise KeyError(f"batch has no {mask_key!r} entry (keys: {sorted(batch)})")
        logits = call(subset.merge(params), batch)
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 → f32
        return head(logits, batch[mask_key])

    if call is default_lm_call:  # f = u · W with W fixed: empirical_ntk's "auto" may go through the head
        f.linear_head = functools.partial(_linear_head, subset, reduce, mask_key)
    return f


def _linear_head(subset: "ParamSubset", reduce: str, mask_key: str):
    """``(u, W)`` with ``lm_output_fn(subset, reduce, mask_key) = u · W`` and ``W`` fixed, or
    ``None`` where that does not hold or cannot be read on the host (no ``hidden_states`` or
    head, the head among the parameters, a subset inside a trace)."""
    leaves = jax.tree.leaves((subset.params, subset.frozen))
    if subset.params is None or any(isinstance(x, jax.core.Tracer) for x in leaves):
        return None
    try:
        with jax.ensure_compile_time_eval():  # concrete values even when asked for inside a trace
            return (lm_hidden_output_fn(subset, reduce=reduce, mask_key=mask_key),
                    lm_output_head(subset.merge(subset.params)))
    except (TypeError, ValueError):
        return None


def lm_hidden_output_fn(subset: "ParamSubset", *, reduce: str = "mean", mask_key: str = "loss_mask") -> Callable:
    """``u(params, batch)``: what :func:`lm_output_fn` computes before the output matrix — the
    model's final hidden states (``model.hidden_states``, float32) averaged over the positions
    of ``mask_key`` (``reduce="mean"``, ``(n, d)``) or scaled by ``m_t / |M|`` (``"none"``,
    ``(n, T, d)``). With ``W = lm_output_head(model)``, ``lm_output_fn(subset, reduce=r)(p, b)
    == u(p, b) @ W``, so :func:`ntk_jax.kernels.ntk.linear_head_ntk` gives the logits' exact
    eNTK from ``min(d, V)`` backward passes per example instead of ``V``.

    ValueError if ``subset``'s parameters include the output matrix (then it is not fixed).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; use one of {REDUCTIONS}")
    model = subset.merge(subset.params)
    if not hasattr(model, "hidden_states"):
        raise TypeError(f"{type(model).__name__} has no hidden_states(input_ids, attention_mask) method")
    _head_module(model)  # TypeError for a model without a linear output head
    names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(subset.params)]
    tied = getattr(model, "lm_head", None) is None
    held = [n for n in names if n.startswith("lm_head") or (tied and n.startswith(("embed_tokens", "wte")))]
    if held:
        raise ValueError(f"the output matrix is among the kernel's parameters ({held[:3]}): the head is not fixed, "
                         "so the logits are not u · W with W constant; use lm_output_fn")
    pool = masked_mean_logits if reduce == "mean" else masked_scaled_logits

    def u(params, batch):
        if mask_key not in batch:
            raise KeyError(f"batch has no {mask_key!r} entry (keys: {sorted(batch)})")
        h = subset.merge(params).hidden_states(batch["input_ids"], batch.get("attention_mask"))
        return pool(h.astype(jnp.promote_types(h.dtype, jnp.float32)), batch[mask_key])

    return u


def _head_module(model):
    """``(module, kind)``: the output head of a causal LM port, ``kind`` ``"linear"`` (an
    ``lm_head`` layer, ``kernel`` ``(d, V)``) or ``"tied"`` (the input embedding, ``(V, d)``)."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        if getattr(head, "lora", None) is not None or getattr(head, "bias", None) is not None:
            raise ValueError("lm_head has a bias or LoRA factors: the logits are not a fixed matrix times the "
                             "hidden states")
        return head, "linear"
    for name in ("embed_tokens", "wte"):
        if hasattr(model, name):
            return getattr(model, name), "tied"
    raise TypeError(f"{type(model).__name__} has no lm_head and no tied input embedding (embed_tokens / wte)")


def lm_output_head(model) -> jax.Array:
    """The ``(d, V)`` matrix a causal LM port maps its final hidden states to logits with:
    ``lm_head``'s kernel, or the transposed input embedding when the two are tied — in the
    compute dtype, as the logits' matmul reads it (a bf16 model's head stays bf16: no float32
    copy of a 128k-row matrix)."""
    module, kind = _head_module(model)
    var = module.kernel if kind == "linear" else module.embedding
    w = var.get_value() if hasattr(var, "get_value") else var.value
    compute = getattr(module, "dtype", None) or w.dtype
    w = jnp.asarray(w).astype(compute)
    return w if kind == "linear" else w.T


def default_classifier_call(model, batch: dict) -> jax.Array:
    """``model(input_ids, attention_mask=..., token_type_ids=...)`` → logits ``(n, C)``
    (``token_type_ids`` only when the batch has them)."""
    kw = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), **kw)


def classification_output_fn(subset: "ParamSubset",
                             call: Callable[[Any, dict], jax.Array] = default_classifier_call) -> Callable:
    """``f(params, batch)`` → class logits ``(n, C)`` float32 of a sequence classifier, over
    ``subset``'s parameters. ``batch`` holds ``input_ids (n, T)`` and ``attention_mask (n, T)``
    (and optionally ``token_type_ids``)."""

    def f(params, batch):
        logits = call(subset.merge(params), batch)
        if logits.ndim != 2:
            raise ValueError(f"a classifier's logits must be (n, C); got shape {logits.shape}")
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    return f
