"""Masked language-modelling losses.

Batches are dicts with ``input_ids`` (B, T) int, ``targets`` (B, T) int (``input_ids``
shifted left by one), ``loss_mask`` (B, T) float 0/1 (1 where the *target* is a response
token) and ``attention_mask`` (B, T) 0/1, as produced by
:func:`ntk_jax.data.encoding.encode_examples`.

Targets at positions with ``loss_mask == 0`` may hold any value (a pad id, or ``-100``):
they are clipped into the vocabulary before indexing and then weighted by zero.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["token_log_probs", "masked_lm_loss", "per_example_lm_loss", "lm_loss"]


def token_log_probs(logits: Array, targets: Array) -> Array:
    """``log softmax(logits)[..., targets]``: (B, T, V), (B, T) → (B, T) float32."""
    logits = jnp.asarray(logits)
    targets = jnp.asarray(targets)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree "
                         "(expected logits (..., V) and targets (...))")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    idx = jnp.clip(targets.astype(jnp.int32), 0, logits.shape[-1] - 1)
    return jnp.take_along_axis(logp, idx[..., None], axis=-1)[..., 0]


def masked_lm_loss(logits: Array, targets: Array, loss_mask: Array) -> Array:
    """Token-mean negative log-likelihood over the batch: ``Σ m·nll / max(Σ m, 1)``."""
    nll = -token_log_probs(logits, targets)
    m = jnp.asarray(loss_mask, jnp.float32)
    return jnp.sum(m * nll) / jnp.maximum(jnp.sum(m), 1.0)


def per_example_lm_loss(logits: Array, targets: Array, loss_mask: Array) -> Array:
    """Per-example token-mean NLL ``Σ_t m·nll / max(Σ_t m, 1)``: shape (B,)."""
    nll = -token_log_probs(logits, targets)
    m = jnp.asarray(loss_mask, jnp.float32)
    return jnp.sum(m * nll, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def lm_loss(model: Any, batch: Mapping[str, Array]) -> Array:
    """``masked_lm_loss`` of ``model(input_ids, attention_mask=...)`` on a batch dict.

    The default ``loss_fn(model, batch)`` of :func:`ntk_jax.training.trainer.train`.
    """
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return masked_lm_loss(logits, batch["targets"], batch["loss_mask"])
