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

    return f


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
