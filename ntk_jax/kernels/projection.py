"""Seeded Johnson–Lindenstrauss random projections of gradient pytrees.

A projection maps a parameter-shaped pytree ``g`` (P scalars in all) to ``Π g ∈ R^p`` with
``Π`` a ``(P, p)`` matrix of i.i.d. Rademacher (±1) or Gaussian entries scaled by ``1/√p``,
so that ``E ⟨Πg, Πg'⟩ = ⟨g, g'⟩``. ``Π`` is never held whole: it is generated on the fly,
per parameter leaf and per chunk of ``chunk_rows`` rows, from ``fold_in(fold_in(key(seed),
leaf_index), chunk_index)``. The matrix therefore depends only on the seed, the parameter
structure and the chunk size — identical for every example, batch, device and process.

Two ways to apply it, with the same matrix (bit-identical entries):

* on the fly (any P): peak extra memory is one ``(chunk_rows, p)`` block (64 MiB at the
  defaults in float32; generating it takes about 6× that in XLA:CPU temporaries), in :meth:`RandomProjection.__call__` and in
  :meth:`RandomProjection.adjoint` alike; the matrix is regenerated on every call, which costs
  more than the product itself when P is small (threefry bits for P·p entries per call).
  Eager calls run as one compiled program on the process's first local device, whatever mesh
  their arguments live on (a program over a mesh would generate every block on every device).
* cached (P·p·itemsize ≤ ``cache_bytes``): :meth:`RandomProjection.cached_matrix` generates
  the whole ``(P, p)`` matrix once per (seed, kind, dim, chunk_rows, leaf sizes, dtype) — from
  the same ``fold_in`` keys, block by block — and keeps it on the device in a process-wide LRU
  cache bounded by the largest ``cache_bytes`` in use; a batch is then projected with ONE GEMM
  ``(b, P) @ (P, p)``. :func:`ntk_jax.kernels.features.make_feature_fn` and eager calls of
  :meth:`RandomProjection.__call__` use it automatically when it fits; traced calls (inside a
  caller's ``jit``/``vjp``) and huge P (e.g. LoRA of 8B models: P·p·4 B ≈ 100 GB) take the
  on-the-fly path. The two paths agree to float rounding (the sum over P is ordered
  differently); the matrix itself is identical.

The cache budget defaults to ``NTK_JAX_PROJECTION_CACHE_MB`` (1024 MiB if unset).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("rademacher", "gaussian")
DEFAULT_CACHE_BYTES = int(float(os.environ.get("NTK_JAX_PROJECTION_CACHE_MB", "1024")) * 2 ** 20)

# Process-wide cache of generated matrices: key -> (P, dim) device array; LRU, bounded in bytes.
_CACHE: "collections.OrderedDict[tuple, jax.Array]" = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()


def leaf_sizes(tree) -> tuple[int, ...]:
    """Scalar count of every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``), leaf order."""
    return tuple(int(np.prod(np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape))
                 for leaf in jax.tree.leaves(tree))


def _is_traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class RandomProjection:
    """A seeded ``(P, dim)`` JL projection applied leaf-by-leaf to gradient pytrees.

    Attributes:
      dim: output dimension p.
      seed: integer seed of the matrix.
      kind: ``"rademacher"`` (±1/√p) or ``"gaussian"`` (N(0, 1/p)).
      chunk_rows: rows of Π generated at a time (bounds memory to chunk_rows × p).
      cache_bytes: largest ``(P, dim)`` matrix (in bytes) kept generated on the device for
        reuse (see the module docstring); 0 disables the cache. Does not change any value,
        so it takes no part in equality or hashing.
    """

    dim: int
    seed: int = 0
    kind: str = "rademacher"
    chunk_rows: int = 2048
    cache_bytes: int = dataclasses.field(default=DEFAULT_CACHE_BYTES, compare=False)

    def __post_init__(self):
        if self.dim <= 0:
            raise ValueError(f"projection dim must be positive, got {self.dim}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}; use one of {KINDS}")
        if self.chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {self.chunk_rows}")
        if self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {self.cache_bytes}")

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

    # --- the cached (whole-matrix) path ------------------------------------------------

    def _key(self, sizes: tuple[int, ...], dtype) -> tuple:
        return (self.seed, self.kind, self.dim, self.chunk_rows, tuple(sizes), jnp.dtype(dtype).name)

    def matrix_nbytes(self, sizes: tuple[int, ...], dtype=jnp.float32) -> int:
        """Bytes of the ``(P, dim)`` matrix for leaves of ``sizes`` scalars in ``dtype``."""
        return int(sum(sizes)) * self.dim * jnp.dtype(dtype).itemsize

    def cached_matrix(self, params, dtype=jnp.float32) -> jax.Array | None:
        """The whole ``(P, dim)`` matrix for ``params``' leaf structure, as a device array,
        generated once (from the same keys as the on-the-fly blocks: entries identical to
        :meth:`matrix`) and then reused; ``None`` if it would exceed ``cache_bytes`` or if
        ``params`` is being traced. ``params`` may hold ``ShapeDtypeStruct`` leaves."""
        if _is_traced(params):
            return None
        sizes = leaf_sizes(params)
        if not sizes:
            raise ValueError("cannot project an empty gradient pytree")
        nbytes = self.matrix_nbytes(sizes, dtype)
        if nbytes > self.cache_bytes:
            return None
        key = self._key(sizes, dtype)
        with _CACHE_LOCK:
            m = _CACHE.get(key)
            if m is not None:
                _CACHE.move_to_end(key)
                return m
        m = _generate_matrix(self, sizes, jnp.dtype(dtype).name)
        with _CACHE_LOCK:
            _CACHE[key] = m
            _CACHE.move_to_end(key)
            total = sum(v.nbytes for v in _CACHE.values())
            while len(_CACHE) > 1 and total > self.cache_bytes:  # evict least recently used
                old_key, old = _CACHE.popitem(last=False)
                total -= old.nbytes
        return m

    def project_with_matrix(self, grads, matrix: jax.Array) -> jax.Array:
        """``(b, P) @ (P, dim)`` for a batched gradient pytree (leaves ``(b, ...)``) and the
        whole matrix (:meth:`cached_matrix`): one GEMM, accumulation in ``matrix.dtype``."""
        leaves = jax.tree.leaves(grads)
        if not leaves:
            raise ValueError("cannot project an empty gradient pytree")
        b = leaves[0].shape[0]
        flat = jnp.concatenate([g.reshape(b, -1).astype(matrix.dtype) for g in leaves], axis=1)
        if flat.shape[1] != matrix.shape[0]:
            raise ValueError(f"gradient has {flat.shape[1]} scalars per example but the projection "
                             f"matrix has {matrix.shape[0]} rows")
        return jnp.dot(flat, matrix, preferred_element_type=matrix.dtype)

    def adjoint(self, w, params):
        """``Π w`` shaped like ``params`` (the transpose of this projection): for every
        gradient pytree ``g``, ``⟨g, Π w⟩ = ⟨Πᵀ g, w⟩`` where ``self(g) = Πᵀ g``.

        Args:
          w: ``(dim,)`` vector in projected space.
          params: pytree (arrays or ``ShapeDtypeStruct``) giving the leaf structure.

        Returns a float32 pytree like ``params``. Uses the cached matrix when it fits
        (``M @ w``), else the on-the-fly blocks (the VJP of the chunked projection).
        """
        w = jnp.asarray(w, jnp.float32)
        if w.shape != (self.dim,):
            raise ValueError(f"w must have shape ({self.dim},) (the projection dim), got {w.shape}")
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a) if not hasattr(a, "shape") else a.shape,
                                                             jnp.float32), params)
        m = self.cached_matrix(shapes, jnp.float32)
        if m is not None:
            flat = m @ w
            leaves, treedef = jax.tree.flatten(shapes)
            out, start = [], 0
            for leaf in leaves:
                size = int(np.prod(leaf.shape))
                out.append(flat[start:start + size].reshape(leaf.shape))
                start += size
            return jax.tree.unflatten(treedef, out)
        leaves, treedef = jax.tree.flatten(shapes)
        flat = _adjoint_on_the_fly(self, tuple(int(np.prod(leaf.shape)) for leaf in leaves), _on_one_device(w))
        return jax.tree.unflatten(treedef, [f.reshape(leaf.shape) for f, leaf in zip(flat, leaves)])

    def __call__(self, grads, batch_axis: bool = True) -> jax.Array:
        """Projects a gradient pytree.

        Eager calls use the cached whole matrix when it fits ``cache_bytes`` (one GEMM);
        traced calls generate Π on the fly, chunk by chunk.

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
        acc = {jnp.promote_types(leaf.dtype, jnp.float32) for leaf in leaves}
        if len(acc) == 1 and not _is_traced(grads):
            per_example = jax.tree.map(lambda g: jax.ShapeDtypeStruct(g.shape[1:], g.dtype), grads)
            m = self.cached_matrix(per_example, acc.pop())
            if m is not None:
                return _project_jit(self, grads, m)
        if not _is_traced(grads):  # eager: one compiled program on one device (see _on_one_device)
            return _project_on_the_fly(self, _on_one_device(grads))
        return self._project_leaves(grads)

    def _project_leaves(self, grads) -> jax.Array:
        """The on-the-fly projection of a batched gradient pytree, leaf by leaf."""
        leaves = jax.tree.leaves(grads)
        b = leaves[0].shape[0]
        total = None
        for i, leaf in enumerate(leaves):
            part = self._project_flat(i, leaf.reshape(b, -1))
            total = part if total is None else total + part
        return total

    def _adjoint_flat(self, leaf_index: int, n_rows: int, w: jax.Array) -> jax.Array:
        """``(n_rows,)``: one leaf's rows of ``Π w``, block by block (``lax.map`` over the
        chunks: one ``(chunk_rows, dim)`` block alive at a time; the same blocks, so the same
        matrix, as :meth:`_project_flat`)."""
        c = self.chunk_rows
        n_full, rem = divmod(n_rows, c)
        parts = []
        if n_full:
            rows = jax.lax.map(lambda i: jnp.dot(self._block(leaf_index, i, c, w.dtype), w,
                                                 preferred_element_type=w.dtype), jnp.arange(n_full))
            parts.append(rows.reshape(-1))
        if rem:
            parts.append(jnp.dot(self._block(leaf_index, n_full, rem, w.dtype), w, preferred_element_type=w.dtype))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    def matrix(self, params) -> np.ndarray:
        """The explicit ``(P, dim)`` float32 matrix for ``params``' structure (tests / small P
        only), generated block by block, eagerly, as the on-the-fly path does."""
        sizes = tuple(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
        return np.asarray(_generate_matrix(self, sizes, "float32"))


def _generate_matrix(projection: RandomProjection, sizes: tuple[int, ...], dtype: str) -> jax.Array:
    """The ``(P, dim)`` matrix: leaf blocks of ``chunk_rows`` rows stacked in leaf order,
    generated eagerly block by block as the on-the-fly projection does (so the entries are
    bit-identical to it, for Gaussian entries too)."""
    blocks = []
    for i, n_rows in enumerate(sizes):
        for c in range(math.ceil(n_rows / projection.chunk_rows)):
            rows = min(projection.chunk_rows, n_rows - c * projection.chunk_rows)
            blocks.append(projection._block(i, c, rows, jnp.dtype(dtype)))
    return jnp.concatenate(blocks, axis=0)


@functools.partial(jax.jit, static_argnums=0)
def _project_jit(projection: RandomProjection, grads, matrix: jax.Array) -> jax.Array:
    return projection.project_with_matrix(grads, matrix)


def _on_one_device(tree):
    """``tree`` on this process's first local device. The on-the-fly programs run there, not
    over the mesh the arguments may live on: a program whose inputs are replicated over a mesh
    runs once per device, each device generating every block of Π (and holding its own copy of
    the temporaries) — device memory and generation time multiplied by the device count for
    no gain. Only ``(b, P)`` gradients / a ``(dim,)`` vector move; Π is never materialised."""
    device = jax.local_devices()[0]
    return jax.tree.map(lambda a: jax.device_put(a, device), tree)


@functools.partial(jax.jit, static_argnums=0)
def _project_on_the_fly(projection: RandomProjection, grads) -> jax.Array:
    return projection._project_leaves(grads)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _adjoint_on_the_fly(projection: RandomProjection, sizes: tuple[int, ...], w: jax.Array) -> list[jax.Array]:
    """``Π w`` as one flat ``(P_leaf,)`` array per leaf, generated block by block: at most one
    ``(chunk_rows, dim)`` block is alive. (The VJP of the chunked projection would give the same
    values but keeps every block of the loop as a residual for the backward pass: the whole
    ``(P, dim)`` matrix, 3.7 GB at P = 114 k, p = 8192 — and ~3.6 TB for the LoRA factors of
    an 8B model.)"""
    return [projection._adjoint_flat(i, n, w) for i, n in enumerate(sizes)]
