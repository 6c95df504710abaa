"""Seeded Johnson–Lindenstrauss random projections of gradient pytrees.

A projection maps a parameter-shaped pytree ``g`` (P scalars in all) to ``Π g ∈ R^p`` with
``Π`` a ``(P, p)`` matrix of i.i.d. Rademacher (±1) or Gaussian entries scaled by ``1/√p``,
so that ``E ⟨Πg, Πg'⟩ = ⟨g, g'⟩``. ``Π`` is never held whole: it is generated on the fly,
per parameter leaf and per chunk of ``chunk_rows`` rows, from ``fold_in(fold_in(key(seed),
leaf_index), chunk_index)``. The matrix therefore depends only on the seed, the parameter
structure and the chunk size — identical for every example, batch, device and process.

Peak extra memory is one ``(chunk_rows, p)`` block (64 MiB at the defaults in float32).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("rademacher", "gaussian")


@dataclasses.dataclass(frozen=True)
class RandomProjection:
    """A seeded ``(P, dim)`` JL projection applied leaf-by-leaf to gradient pytrees.

    Attributes:
      dim: output dimension p.
      seed: integer seed of the matrix.
      kind: ``"rademacher"`` (±1/√p) or ``"gaussian"`` (N(0, 1/p)).
      chunk_rows: rows of Π generated at a time (bounds memory to chunk_rows × p).
    """

    dim: int
    seed: int = 0
    kind: str = "rademacher"
    chunk_rows: int = 2048

    def __post_init__(self):
        if self.dim <= 0:
            raise ValueError(f"projection dim must be positive, got {self.dim}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}; use one of {KINDS}")
        if self.chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {self.chunk_rows}")

    def _block(self, leaf_index: int, chunk_index, rows: int, dtype) -> jax.Array:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), leaf_index), chunk_index)
        scale = 1.0 / math.sqrt(self.dim)
        if self.kind == "rademacher":
            m = jax.random.rademacher(key, (rows, self.dim), dtype=dtype)
        else:
            m = jax.random.normal(key, (rows, self.dim), dtype=dtype)
        return m * jnp.asarray(scale, dtype)

    def _project_flat(self, leaf_index: int, g: jax.Array) -> jax.Array:
        """``g: (b, P_leaf)`` → ``(b, dim)`` for one leaf, chunked over its rows."""
        b, n_rows = g.shape
        acc_dtype = jnp.promote_types(g.dtype, jnp.float32)
        c = self.chunk_rows
        n_full, rem = divmod(n_rows, c)
        out = jnp.zeros((b, self.dim), acc_dtype)
        if n_full:
            g_full = g[:, : n_full * c].reshape(b, n_full, c)

            def body(i, acc):
                gi = jax.lax.dynamic_index_in_dim(g_full, i, axis=1, keepdims=False)
                return acc + jnp.dot(gi.astype(acc_dtype), self._block(leaf_index, i, c, acc_dtype),
                                     preferred_element_type=acc_dtype)

            out = jax.lax.fori_loop(0, n_full, body, out)
        if rem:
            out = out + jnp.dot(g[:, n_full * c:].astype(acc_dtype),
                                self._block(leaf_index, n_full, rem, acc_dtype),
                                preferred_element_type=acc_dtype)
        return out

    def __call__(self, grads, batch_axis: bool = True) -> jax.Array:
        """Projects a gradient pytree.

        Args:
          grads: pytree of arrays; with ``batch_axis`` every leaf is ``(b, *leaf_shape)``.
          batch_axis: whether leaves carry a leading batch axis.

        Returns:
          ``(b, dim)`` (or ``(dim,)`` without a batch axis), float32 or wider.
        """
        leaves = jax.tree.leaves(grads)
        if not leaves:
            raise ValueError("cannot project an empty gradient pytree")
        if not batch_axis:
            return self(jax.tree.map(lambda x: x[None], grads))[0]
        b = leaves[0].shape[0]
        total = None
        for i, leaf in enumerate(leaves):
            part = self._project_flat(i, leaf.reshape(b, -1))
            total = part if total is None else total + part
        return total

    def matrix(self, params) -> np.ndarray:
        """The explicit ``(P, dim)`` matrix for ``params``' structure (tests / small P only)."""
        blocks = []
        for i, leaf in enumerate(jax.tree.leaves(params)):
            n_rows = int(np.prod(leaf.shape))
            for c in range(math.ceil(n_rows / self.chunk_rows)):
                rows = min(self.chunk_rows, n_rows - c * self.chunk_rows)
                blocks.append(np.asarray(self._block(i, c, rows, jnp.float32)))
        return np.concatenate(blocks, axis=0)
