"""Contractions of per-example Jacobian rows shared by the exact eNTK methods
(:mod:`ntk_jax.kernels.ntk`, :mod:`ntk_jax.kernels.structured`), and the output size O.

Symmetric kernels (``x2=None``: both sides are the same object) go through
:func:`symmetric_blocks`, the one home of the blocked-triangle contraction: only the blocks on
or above the diagonal are computed, the lower triangle is their mirror, and the result is
exactly symmetric."""
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


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for u in (v if isinstance(v, (list, tuple)) else (v,)):
            if hasattr(u, "jaxpr") and hasattr(u, "consts"):  # ClosedJaxpr
                yield u.jaxpr
            elif hasattr(u, "eqns"):  # Jaxpr
                yield u


def jaxpr_has_convolution(jaxpr) -> bool:
    """Whether a (closed) jaxpr, or any jaxpr nested in it, runs ``conv_general_dilated``."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(eqn.primitive.name == "conv_general_dilated" or any(jaxpr_has_convolution(j) for j in _subjaxprs(eqn))
               for eqn in jaxpr.eqns)


def uses_convolution(f: Callable, params: PyTree, x: PyTree) -> bool:
    """Whether ``f(params, x)`` runs a convolution (traced on one example's shapes).

    Per-example VJPs over *stacked* parameters (:func:`ntk_jax.kernels.ntk.per_example_vjp`,
    the structured method's factors) give every example its own convolution kernel, which
    XLA lowers to a grouped convolution with one group per example — on XLA:CPU about 20x
    slower than the same convolutions with one shared kernel
    (``benchmarks/ntk_speed.py``, the CNN problem; docs/kernels.md). Per-example Jacobians by
    ``vmap(jacrev)`` keep the parameters shared, so the eNTK methods take that route for
    such models."""
    p_struct = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), params)
    x_struct = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(jnp.shape(a))[1:], jnp.result_type(a)), x)
    return jaxpr_has_convolution(jax.make_jaxpr(f)(p_struct, x_struct))


CONCAT_MAX_BYTES = 256 * 1024 ** 2  # full kernels: leaves concatenated into one GEMM up to this size

# --- symmetric (one-triangle) contractions ---------------------------------------------------

# Rows of a symmetric Gram ``A Aᵀ`` per block of the triangle (:func:`gram_num_blocks`).
# Measured on XLA:CPU (2 cores, YNNPACK GEMMs; benchmarks/symmetric_contraction.py and the
# micro-benchmark in docs/kernels.md): at (3200, 5376) — the transformer + LoRA full kernel —
# 8 blocks of 400 rows took 0.6x the time of the plain GEMM; at 640 rows (the MLP's full
# kernel, P = 333k) and below, any split was as slow or slower (smaller GEMMs run less
# efficiently and each block's operand slices are copied), so a Gram is split only from
# 2 · SYMMETRIC_BLOCK_ROWS rows on.
SYMMETRIC_BLOCK_ROWS = 384
SYMMETRIC_MAX_BLOCKS = 8


def num_blocks(n: int, min_block: int, max_blocks: int = SYMMETRIC_MAX_BLOCKS) -> int:
    """Blocks per side of an ``(n, n)`` triangle with at least ``min_block`` rows each (1 —
    no split — below ``2 · min_block``), at most ``max_blocks``."""
    return int(max(1, min(max_blocks, n // max(min_block, 1))))


def block_bounds(n: int, blocks: int) -> list[tuple[int, int]]:
    """``blocks`` contiguous ``(start, stop)`` ranges covering ``range(n)``, sizes differing
    by at most one (the first ``n % blocks`` are the larger)."""
    blocks = max(1, min(blocks, n))
    q, r = divmod(n, blocks)
    stops = [(k + 1) * q + min(k + 1, r) for k in range(blocks)]
    return list(zip([0] + stops[:-1], stops))


def mirror(k: jax.Array) -> jax.Array:
    """The transposed block of a symmetric kernel: ``(i, j) → (j, i)`` for ``(n1, n2)``,
    ``(i, j, a, b) → (j, i, b, a)`` for ``(n1, n2, O, O)``."""
    return k.T if k.ndim == 2 else jnp.transpose(k, (1, 0, 3, 2))


def exact_symmetric(k: jax.Array) -> jax.Array:
    """``k`` ``(n, n)`` or ``(n, n, O, O)`` made exactly symmetric (``k == mirror(k)``
    bit for bit) from its upper triangle in the ``(i, a) ≤ (j, b)`` row-major order: entries
    below are replaced by their mirror. For an already symmetric ``k`` up to rounding this
    changes nothing beyond that rounding."""
    n = k.shape[0]
    if k.ndim == 2:
        r = jnp.arange(n)
        return jnp.where(r[:, None] <= r[None, :], k, k.T)
    O = k.shape[2]
    idx = (jnp.arange(n)[:, None] * O + jnp.arange(O)[None, :])  # (n, O): (i, a) → i·O + a
    upper = idx[:, None, :, None] <= idx[None, :, None, :]       # (n, n, O, O)
    return jnp.where(upper, k, mirror(k))


def symmetric_blocks(block_fn: Callable[[int, int, int, int], jax.Array], n: int, blocks: int) -> jax.Array:
    """A symmetric kernel ``K`` ``(n, n[, O, O])`` from the blocks on or above the diagonal.

    ``block_fn(i0, i1, j0, j1)`` returns ``K[i0:i1, j0:j1]`` (``(i1-i0, j1-j0[, O, O])``); it
    is called once per block pair ``j ≥ i`` of ``blocks`` row blocks (static Python loops:
    jittable), the lower blocks are their :func:`mirror`, and the result is made exactly
    symmetric (:func:`exact_symmetric`: within the diagonal blocks too). ``blocks=1`` is one
    call over everything, then the mirror of its lower triangle."""
    bounds = block_bounds(n, blocks)
    nb = len(bounds)
    if nb == 1:
        return exact_symmetric(block_fn(0, n, 0, n))
    upper = {(a, c): block_fn(*bounds[a], *bounds[c]) for a in range(nb) for c in range(a, nb)}
    rows = [jnp.concatenate([upper[a, c] if c >= a else mirror(upper[c, a]) for c in range(nb)], axis=1)
            for a in range(nb)]
    return exact_symmetric(jnp.concatenate(rows, axis=0))


def _flat_rows(leaves) -> list[jax.Array]:
    """Leaves ``(m, ...)`` as ``(m, p)`` matrices."""
    return [a.reshape(a.shape[0], -1) for a in leaves]


def symmetric_gram(rows: PyTree, blocks: int | None = None) -> jax.Array:
    """``Σ_leaves A Aᵀ`` ``(m, m)`` for leaves ``A`` ``(m, ...)``, exactly symmetric, from the
    upper triangle of ``blocks`` row blocks (default :func:`num_blocks` with
    :data:`SYMMETRIC_BLOCK_ROWS`: a plain GEMM below ``2 · SYMMETRIC_BLOCK_ROWS`` rows);
    ``0`` for no leaves (as the sum over none)."""
    mats = _flat_rows(jax.tree.leaves(rows))
    if not mats:
        return 0
    m = mats[0].shape[0]
    blocks = num_blocks(m, SYMMETRIC_BLOCK_ROWS) if blocks is None else blocks

    def block(i0, i1, j0, j1):
        return sum(a[i0:i1] @ a[j0:j1].T for a in mats)

    return symmetric_blocks(block, m, blocks)


# --- contractions ---------------------------------------------------------------------------


def contract_jacobians(j1: PyTree, j2: PyTree, trace: bool) -> jax.Array:
    """Σ over leaves of ``J1 J2ᵀ``: ``(n1, n2)`` if ``trace`` else ``(n1, n2, O, O)``.

    Leaves are per-example Jacobian rows ``(n, O, *leaf)``; pass ``j2 is j1`` for a symmetric
    block: then only one triangle is contracted (:func:`symmetric_gram` over the ``(n·O, P)``
    rows, or the ``(n, O·P)`` rows traced) and the result is exactly symmetric. The full
    kernel is one ``(n1·O, P) @ (P, n2·O)`` GEMM over the leaves concatenated (while the rows
    take at most :data:`CONCAT_MAX_BYTES`; otherwise a sum of per-leaf GEMMs), accumulated as
    ``(n1, O, n2, O)`` and transposed once."""
    rows1 = [a.reshape(a.shape[0], a.shape[1], -1) for a in jax.tree.leaves(j1)]
    same = j2 is j1
    rows2 = rows1 if same else [b.reshape(b.shape[0], b.shape[1], -1) for b in jax.tree.leaves(j2)]
    if trace:
        if same:
            return symmetric_gram(rows1)
        return sum(a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T for a, b in zip(rows1, rows2))
    nbytes = sum(a.size * a.dtype.itemsize for a in rows1) * (1 if same else 2)
    if len(rows1) > 1 and nbytes <= CONCAT_MAX_BYTES:
        rows1 = [jnp.concatenate(rows1, axis=2)]
        rows2 = rows1 if same else [jnp.concatenate(rows2, axis=2)]
    n1, O = rows1[0].shape[:2]
    if same:
        total = symmetric_gram([a.reshape(n1 * O, -1) for a in rows1]).reshape(n1, O, n1, O)
    else:
        total = sum(jnp.einsum("iap,jbp->iajb", a, b) for a, b in zip(rows1, rows2))
    return total.transpose(0, 2, 1, 3)


def gram(c1: PyTree, c2: PyTree) -> jax.Array:
    """Σ over leaves of ``c1 c2ᵀ`` for leaves ``(n1, ...)``, ``(n2, ...)`` → ``(n1, n2)``;
    ``c2 is c1``: :func:`symmetric_gram` (one triangle, exactly symmetric)."""
    if c2 is c1:
        return symmetric_gram(c1)
    return sum(a @ b.T for a, b in zip(_flat_rows(jax.tree.leaves(c1)), _flat_rows(jax.tree.leaves(c2))))
