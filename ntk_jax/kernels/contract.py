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


CONCAT_MAX_BYTES = 256 * 1024 ** 2  # full kernels: leaves concatenated into one GEMM up to this size


def contract_jacobians(j1: PyTree, j2: PyTree, trace: bool) -> jax.Array:
    """Σ over leaves of ``J1 J2ᵀ``: ``(n1, n2)`` if ``trace`` else ``(n1, n2, O, O)``.

    Leaves are per-example Jacobian rows ``(n, O, *leaf)``; pass ``j2 is j1`` for a symmetric
    block. The full kernel is one ``(n1·O, P) @ (P, n2·O)`` GEMM over the leaves concatenated
    (while the rows take at most :data:`CONCAT_MAX_BYTES`; otherwise a sum of per-leaf GEMMs),
    accumulated as ``(n1, O, n2, O)`` and transposed once."""
    rows1 = [a.reshape(a.shape[0], a.shape[1], -1) for a in jax.tree.leaves(j1)]
    rows2 = rows1 if j2 is j1 else [b.reshape(b.shape[0], b.shape[1], -1) for b in jax.tree.leaves(j2)]
    if trace:
        return sum(a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T for a, b in zip(rows1, rows2))
    nbytes = sum(a.size * a.dtype.itemsize for a in rows1) * (1 if rows2 is rows1 else 2)
    if len(rows1) > 1 and nbytes <= CONCAT_MAX_BYTES:
        same = rows2 is rows1
        rows1 = [jnp.concatenate(rows1, axis=2)]
        rows2 = rows1 if same else [jnp.concatenate(rows2, axis=2)]
    total = sum(jnp.einsum("iap,jbp->iajb", a, b) for a, b in zip(rows1, rows2))
    return total.transpose(0, 2, 1, 3)


def gram(c1: PyTree, c2: PyTree) -> jax.Array:
    """Σ over leaves of ``c1 c2ᵀ`` for leaves ``(n1, ...)``, ``(n2, ...)`` → ``(n1, n2)``."""
    return sum(a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T
               for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)))
