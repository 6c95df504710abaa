"""Optimiser-state helpers the selection methods share: Adam's moments found inside an optax
state (the trainer's ``chain(clip, adamw)``, saved with each warm-up checkpoint) and the
diagonal preconditioner they define (docs/theory.md §6.2, §6.5).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["ADAM_B1", "ADAM_B2", "ADAM_EPS", "find_adam_state", "adam_diagonal"]

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # optax.adamw defaults, as the trainer uses


def find_adam_state(opt_state: Any) -> optax.ScaleByAdamState:
    """The (first) ``ScaleByAdamState`` inside an optax state (e.g. of the trainer's
    ``chain(clip, adamw)``). ValueError if there is none."""
    found = []

    def visit(node):
        if isinstance(node, optax.ScaleByAdamState):
            found.append(node)
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)

    visit(opt_state)
    if not found:
        raise ValueError("the optimizer state holds no Adam moments (optax ScaleByAdamState)")
    return found[0]


def adam_diagonal(nu: Any, step: int, *, b2: float = ADAM_B2, eps: float = ADAM_EPS) -> Any:
    """The diagonal of Adam's preconditioner after ``step`` updates, ``1/(√ν̂ + ε)`` with the
    bias-corrected second moment ``ν̂ = ν / (1 − β2^step)``: a pytree like ``nu`` (float32).
    An Adam step on a gradient g moves the parameters by ≈ −η·diag(·)·g (first moment and
    the g² update of ν left out), the linear part of LESS's
    :func:`ntk_jax.selection.less.adam_preconditioner`."""
    if int(step) < 1:
        raise ValueError(f"the Adam preconditioner needs at least one update (step={step})")
    corr = 1.0 - b2 ** int(step)
    return jax.tree.map(lambda v: (1.0 / (jnp.sqrt(jnp.asarray(v, jnp.float32) / corr) + eps)), nu)
