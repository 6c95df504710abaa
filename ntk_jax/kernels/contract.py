"""Contractions of per-example Jacobian rows shared by the exact eNTK methods
(:mod:`ntk_jax.kernels.ntk`, :mod:`ntk_jax.kernels.structured`), and the output size O."""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ntk_jax.kernels.features import slice_batch

PyTree = Any


def output_size(f: Callable, params: PyTree, x: PyTree) -> int:
    """O = prod(out_shape) of ``f``, checking that ``f`` keeps the batch axis."""
    x1 = slice_batch(x, 0, 1)
    out = jax.eval_shape(f, params, x1)
    if not out.shape or out.shape[0] != 1:
        raise ValueError(f"f(params, x) must return (n, *out_shape) with the batch axis first; "
                         f"for a batch of 1 it returned shape {out.shape}")
    return int(math.prod(out.shape[1:]))


def contract_jacobians(j1: PyTree, j2: PyTree, trace: bool) -> jax.Array:
    """Σ over leaves of ``J1 J2ᵀ``: ``(n1, n2)`` if ``trace`` else ``(n1, n2, O, O)``."""
    total = None
    for a, b in zip(jax.tree.leaves(j1), jax.tree.leaves(j2)):
        a = a.reshape(a.shape[0], a.shape[1], -1)
        b = b.reshape(b.shape[0], b.shape[1], -1)
        if trace:
            k = a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T
        else:
            k = jnp.einsum("iap,jbp->ijab", a, b)
        total = k if total is None else total + k
    return total


def gram(c1: PyTree, c2: PyTree) -> jax.Array:
    """Σ over leaves of ``c1 c2ᵀ`` for leaves ``(n1, ...)``, ``(n2, ...)`` → ``(n1, n2)``."""
    return sum(a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T
               for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)))
