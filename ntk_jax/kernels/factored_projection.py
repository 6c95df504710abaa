"""Factored (Kronecker-structured) JL projections of per-example gradients (docs/theory.md §2.6; LoGra,
Choe et al. 2024).

For a linear site ``y_t = x_t W`` (found as in :mod:`ntk_jax.kernels.structured`), the
per-example gradient of a scalar ``s`` is ``G = Σ_t x_t δ_tᵀ`` (``d_in × d_out``, δ = ∂s/∂y_t).
With seeded random factors ``P_in (k_in × d_in)`` and ``P_out (k_out × d_out)`` the projected
gradient is

    vec(P_in G P_outᵀ) = Σ_t (P_in x_t) ⊗ (P_out δ_t) ∈ R^{k_in·k_out},   k_in·k_out = p,

computed from the projected factors: ``G`` is never formed. ``P_in ⊗ P_out`` has i.i.d.-like
±1/√k (or N(0, 1/k)) factors, so ``E ⟨(P_in ⊗ P_out) g, (P_in ⊗ P_out) g'⟩ = ⟨g, g'⟩``.
Every linear leaf is mapped into the same ``p`` dimensions and the maps are summed (as the
row blocks of a dense :class:`~ntk_jax.kernels.projection.RandomProjection` are); leaves that
are not linear sites (biases, norms, embeddings, tied weights) take a dense
``RandomProjection(p, seed)`` of their gradients, added in.

Choosing ``k_in, k_out`` (:meth:`FactoredProjection.split`): the error of a Kronecker JL map
grows like ``1/k_in + 1/k_out``, so the sides are balanced (``k_in ≈ k_out ≈ √p``), except
that a side of size ``d ≤ √p`` that divides ``p`` is kept exact (``P = I_d``, no error from
that side) and the other side gets ``k = p / d``. One side exact and the other random keeps
every leaf's map zero-mean, so the leaves' sum stays unbiased.

Small sites (``sparse_sites=True``, the default): where forming a site's per-example gradient
costs less than projecting its two sides — per token ``d_in·d_out < d_in·k_in + d_out·k_out +
k_in·k_out`` (the exact sides not counted), which holds for every LoRA factor (``d · r``
entries against a ``p/r``-row projection of the ``d`` side) — ``G`` is formed and mapped by a
sparse sign hash (CountSketch; Charikar et al. 2002, the sparse JL transform of Kane & Nelson
2014 with one nonzero per column): coordinate ``j`` of the concatenated small-site gradients
goes to bucket ``h(j)`` with sign ``σ(j)``. When the small sites hold ``M ≤ p`` coordinates
in all, ``h`` is injective (``h(j) = j``, seeded signs), so the map preserves their inner
products exactly (any injection would; the other leaves' maps are random and zero-mean, so the
cross terms stay unbiased); otherwise ``h`` folds a seeded random order of the coordinates
onto the p buckets (a gather and a sum: deterministic on every backend, unlike a scatter-add)
and ``E⟨Sg, Sg'⟩ = ⟨g, g'⟩`` with about the variance of a
dense Rademacher map (docs/theory.md §2.6). It costs ``O(d_in·d_out)`` per example instead of the
``p·d_in``-order work of the factors. Which sites are small depends only on the shapes and
``p`` (never on the sequence length), so every batch gets the same map. ``sparse_sites=False``
maps every linear site by its Kronecker factors.

Seeded and deterministic: the factors of leaf ``i`` come from
``fold_in(fold_in(fold_in(key(seed), TAG), i), side)``; the same seed, parameter structure
and ``p`` give the same map in every process.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ntk_jax.kernels import structured
from ntk_jax.kernels.features import batch_size_of, slice_batch
from ntk_jax.kernels.projection import KINDS, RandomProjection, _generate_matrix

_TAG = 0x6B726F6E  # separates the factor keys from RandomProjection's fold_in(leaf, chunk) keys
_SPARSE_TAG = 0x68617368  # the key of the small sites' sign hash


def _divisors(p: int) -> list[int]:
    return [d for d in range(1, p + 1) if p % d == 0]


@dataclasses.dataclass(frozen=True)
class FactoredProjection:
    """Per-layer Kronecker JL map of per-example gradients to ``dim`` = p features.

    Attributes:
      dim: output dimension p (a power of two splits best; any p works).
      seed: integer seed of every factor and of the dense fallback.
      kind: ``"rademacher"`` (±1/√k) or ``"gaussian"`` (N(0, 1/k)) factors (the sparse
        hash of small sites always uses ±1 signs).
      sparse_sites: map the linear sites whose per-example gradient is cheaper to form than to
        project (module docstring; every LoRA factor) by a sparse sign hash of the formed
        gradient; ``False``: every linear site by its Kronecker factors.
    """

    dim: int
    seed: int = 0
    kind: str = "rademacher"
    sparse_sites: bool = True
    is_factored = True  # duck-typed by kernels.features (no import cycle)

    def __post_init__(self):
        if self.dim <= 0:
            raise ValueError(f"projection dim must be positive, got {self.dim}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}; use one of {KINDS}")

    def split(self, d_in: int, d_out: int) -> tuple[int, int, bool, bool]:
        """``(k_in, k_out, exact_in, exact_out)`` with ``k_in · k_out = dim`` (module docstring)."""
        p, root = self.dim, math.sqrt(self.dim)
        for d, first in sorted(((d_in, True), (d_out, False))):
            if d <= root and p % d == 0:
                return (d, p // d, True, False) if first else (p // d, d, False, True)
        k_in = min(_divisors(p), key=lambda k: (abs(math.log(k / root)), -k))
        return k_in, p // k_in, False, False

    def is_sparse(self, d_in: int, d_out: int) -> bool:
        """Whether a ``(d_in, d_out)`` linear site is mapped by the sparse hash: ``sparse_sites``
        and forming its gradient costs less per token than its Kronecker factors (exact sides
        free). Shapes and ``p`` only."""
        if not self.sparse_sites:
            return False
        k_in, k_out, exact_in, exact_out = self.split(d_in, d_out)
        factored = (0 if exact_in else d_in * k_in) + (0 if exact_out else d_out * k_out) + k_in * k_out
        return d_in * d_out < factored

    def _sign_key(self):
        return jax.random.fold_in(jax.random.key(self.seed), _SPARSE_TAG)

    def sparse_layout(self, sizes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        """``(buckets (M,) int32, signs (M,) float32)`` of the sparse hash over the concatenated
        small-site gradients (``sizes``: each site's ``d_in·d_out``, in leaf order; ``M`` their
        sum): the injection ``j ↦ j`` when ``M ≤ p``; otherwise a seeded random order of the M
        coordinates folded onto the p buckets (position ``q`` in the order goes to bucket
        ``q mod p``: each bucket gets ``⌈M/p⌉`` or ``⌊M/p⌋`` coordinates, and two coordinates
        share one with probability ≈ 1/p); seeded ±1 signs. :meth:`hash_features` applies it."""
        m = int(sum(sizes))
        if m <= self.dim:
            buckets = jnp.arange(m)
        else:
            buckets = jnp.asarray(np.argsort(_fold_order(self.seed, m)) % self.dim)
        signs = jax.random.rademacher(self._sign_key(), (m,), dtype=jnp.float32)
        return buckets.astype(jnp.int32), signs

    def hash_features(self, grads: list[jax.Array], dtype) -> jax.Array:
        """``(n, dim)``: the sparse hash of the small sites' per-example gradients ``grads``
        (each ``(n, d_in, d_out)``, in leaf order). A gather and a sum over a reshape — no
        scatter, so the sums run in the same order on every backend (deterministic)."""
        n = grads[0].shape[0]
        vals = jnp.concatenate([g.reshape(n, -1).astype(dtype) for g in grads], axis=1)
        m = vals.shape[1]
        vals = vals * jax.random.rademacher(self._sign_key(), (m,), dtype=dtype)
        if m <= self.dim:  # injective, h(j) = j
            return jnp.concatenate([vals, jnp.zeros((n, self.dim - m), dtype)], axis=1)
        folds = -(-m // self.dim)
        ordered = jnp.take(vals, _fold_order(self.seed, m), axis=1)  # position q: coordinate order[q]
        ordered = jnp.pad(ordered, ((0, 0), (0, folds * self.dim - m)))
        return ordered.reshape(n, folds, self.dim).sum(axis=1)

    def factor(self, leaf_index: int, side: int, k: int, d: int, dtype=jnp.float32) -> jax.Array:
        """The ``(k, d)`` factor of leaf ``leaf_index`` (``side`` 0 = input, 1 = output)."""
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), _TAG),
                                                    leaf_index), side)
        if self.kind == "rademacher":
            m = jax.random.rademacher(key, (k, d), dtype=dtype)
        else:
            m = jax.random.normal(key, (k, d), dtype=dtype)
        return m * jnp.asarray(1.0 / math.sqrt(k), dtype)

    def factors(self, leaf_index: int, d_in: int, d_out: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """``(P_in (k_in, d_in), P_out (k_out, d_out))`` of a linear leaf (identity on an exact side)."""
        k_in, k_out, exact_in, exact_out = self.split(d_in, d_out)
        p_in = jnp.eye(d_in, dtype=dtype) if exact_in else self.factor(leaf_index, 0, k_in, d_in, dtype)
        p_out = jnp.eye(d_out, dtype=dtype) if exact_out else self.factor(leaf_index, 1, k_out, d_out, dtype)
        return p_in, p_out

    @property
    def fallback(self) -> RandomProjection:
        """The dense projection of the leaves that are not linear sites."""
        return RandomProjection(self.dim, seed=self.seed, kind=self.kind, cache_bytes=0)

    def plan(self, scalar_fn, params, x) -> list[dict]:
        """Per parameter leaf: ``{"path", "kind": "factored" | "sparse" | "dense", "d_in",
        "d_out", "k_in", "k_out"}`` (shapes only; ``k_*`` for factored sites)."""
        _, interp, n_leaves = structured._analyse(scalar_fn, params, slice_batch(x, 0, 1))
        linear = structured._linear_sites(interp, n_leaves)
        out = []
        for i, (path, _) in enumerate(jax.tree_util.tree_leaves_with_path(params)):
            if i in linear:
                site = interp.sites[linear[i]]
                if self.is_sparse(site.d_in, site.d_out):
                    out.append({"path": jax.tree_util.keystr(path), "kind": "sparse", "d_in": site.d_in,
                                "d_out": site.d_out})
                    continue
                k_in, k_out, _, _ = self.split(site.d_in, site.d_out)
                out.append({"path": jax.tree_util.keystr(path), "kind": "factored", "d_in": site.d_in,
                            "d_out": site.d_out, "k_in": k_in, "k_out": k_out})
            else:
                out.append({"path": jax.tree_util.keystr(path), "kind": "dense"})
        return out

    def project_features(self, scalar_fn, params, x) -> jax.Array:
        """``(n, dim)`` projected per-example gradients of ``scalar_fn(params, x) -> (n,)``
        (pure and jittable; the site analysis runs at trace time)."""
        n = batch_size_of(x)
        closed, interp, n_leaves = structured._analyse(scalar_fn, params, slice_batch(x, 0, 1))
        linear = structured._linear_sites(interp, n_leaves)
        taps, cotangents, out = structured._factors(scalar_fn, params, x, closed, interp, linear, n_leaves)
        if out.shape != (n, 1):
            raise ValueError(f"scalar_fn must return one scalar per example (n,); got {out.shape[1]} per example")
        deltas, fb = cotangents(jnp.ones_like(out))
        dtype = jnp.promote_types(out.dtype, jnp.float32)
        groups: dict = {}  # sites with the same split share one accumulation
        sparse = []        # small sites: their gradients, hashed together
        for leaf, s in sorted(linear.items()):
            site = interp.sites[s]
            if self.is_sparse(site.d_in, site.d_out):
                sparse.append(jnp.einsum("ntc,ntf->ncf", taps[s].astype(dtype), deltas[s].astype(dtype)))
                continue
            groups.setdefault(self.split(site.d_in, site.d_out), []).append(
                (leaf, taps[s].astype(dtype), deltas[s].astype(dtype)))
        total = jnp.zeros((n, self.dim), dtype)
        for split, members in groups.items():
            total = total + self._project_group(split, members, dtype)
        if sparse:
            total = total + self.hash_features(sparse, dtype)
        if fb:
            total = total + self.fallback(list(fb)).astype(dtype)
        return total

    def bind(self, scalar_fn, params, x) -> "BoundFactoredProjection":
        """This map as a linear map of gradient pytrees shaped like ``params`` — the same
        ``Πᵀ`` that :meth:`project_features` applies to ``scalar_fn``'s per-example gradients,
        with ``__call__(grads)`` and ``adjoint(w, params)`` like
        :class:`~ntk_jax.kernels.projection.RandomProjection`. Which leaves are linear sites,
        and how each leaf is laid out as ``(d_in, d_out)``, is read from ``scalar_fn`` at
        ``params`` and one example of ``x`` (shapes only)."""
        _, interp, n_leaves = structured._analyse(scalar_fn, params, slice_batch(x, 0, 1))
        linear = structured._linear_sites(interp, n_leaves)
        return BoundFactoredProjection(self, {leaf: interp.sites[s] for leaf, s in linear.items()}, n_leaves)

    def _project_group(self, split, members, dtype) -> jax.Array:
        """``(n, dim)``: ``Σ_s vec(P_in,s (x_sᵀ d_s) P_out,sᵀ)`` over linear sites ``s`` with the
        same ``split`` (``members``: ``(leaf, x (n, T_s, d_in,s), d (n, T_s, d_out,s))``), in
        the cheaper order for the group — factored ``Σ_s Σ_t (P_in,s x_st) ⊗ (P_out,s d_st)`` or
        through each site's ``d_in × d_out`` gradient ``G_s`` (cheaper when T is large or a side
        is exact). The sum over sites runs inside one contraction (the sites' factors and
        operands concatenated along the contracted axis), so no per-site ``(n, dim)`` array is
        formed; an exact side (``P = I``) is not multiplied."""
        k_in, k_out, exact_in, exact_out = split
        n = members[0][1].shape[0]
        mats = [(x, d) + self.factors(leaf, x.shape[2], d.shape[2], dtype) for leaf, x, d in members]
        factored = through_g = 0
        for x, d, _, _ in mats:
            T, d_in, d_out = x.shape[1], x.shape[2], d.shape[2]
            factored += T * ((0 if exact_in else d_in * k_in) + (0 if exact_out else d_out * k_out) + k_in * k_out)
            through_g += (T * d_in * d_out + (0 if exact_in else k_in * d_in * d_out)
                          + (0 if exact_out else k_in * d_out * k_out))
        if factored < through_g:  # Σ over (site, t) of outer products: concatenate along t
            a = jnp.concatenate([x if exact_in else jnp.einsum("ntc,kc->ntk", x, p_in) for x, _, p_in, _ in mats], 1)
            b = jnp.concatenate([d if exact_out else jnp.einsum("ntf,lf->ntl", d, p_out) for _, d, _, p_out in mats], 1)
            return jnp.einsum("ntk,ntl->nkl", a, b).reshape(n, self.dim)
        grads = [jnp.einsum("ntc,ntf->ncf", x, d) for x, d, _, _ in mats]  # G_s (n, d_in, d_out)
        if exact_out:  # Σ_s P_in,s G_s, one contraction over the concatenated input axes (split
            # keeps at most one side exact)
            p_in = jnp.concatenate([m[2] for m in mats], axis=1)  # (k_in, Σ d_in)
            return jnp.einsum("kc,ncf->nkf", p_in, jnp.concatenate(grads, axis=1)).reshape(n, self.dim)
        left = [g if exact_in else jnp.einsum("kc,ncf->nkf", m[2], g) for g, m in zip(grads, mats)]
        p_out = jnp.concatenate([m[3] for m in mats], axis=1)  # (k_out, Σ d_out)
        return jnp.einsum("nkf,lf->nkl", jnp.concatenate(left, axis=2), p_out).reshape(n, self.dim)

    def explicit_matrix(self, params, linear_dims: dict[int, tuple[int, int]], dtype="float64") -> np.ndarray:
        """The ``(P, dim)`` matrix of this map for parameter leaves whose linear sites have
        ``(d_in, d_out)`` = ``linear_dims[leaf]`` and whose gradients are laid out
        ``(d_in, d_out)`` row-major (``x @ W`` kernels); other leaves get the dense fallback's
        rows. For tests on small P: ``features = flat_grad @ M``."""
        leaves = jax.tree.leaves(params)
        fb_idx = [i for i in range(len(leaves)) if i not in linear_dims]
        fb_sizes = tuple(int(np.prod(np.shape(leaves[i]))) for i in fb_idx)
        fb_matrix = np.asarray(_generate_matrix(self.fallback, fb_sizes, jnp.dtype(dtype).name)) if fb_idx else None
        sparse_idx = [i for i in sorted(linear_dims) if self.is_sparse(*linear_dims[i])]
        sparse_rows = {}
        if sparse_idx:
            sizes = tuple(int(np.prod(linear_dims[i])) for i in sparse_idx)
            buckets, signs = (np.asarray(a) for a in self.sparse_layout(sizes))
            start = 0
            for i, size in zip(sparse_idx, sizes):
                rows = np.zeros((size, self.dim), jnp.dtype(dtype))
                rows[np.arange(size), buckets[start:start + size]] = signs[start:start + size]
                sparse_rows[i], start = rows, start + size
        blocks, fb_start = [], 0
        for i, leaf in enumerate(leaves):
            if i in sparse_rows:
                blocks.append(sparse_rows[i])
            elif i in linear_dims:
                d_in, d_out = linear_dims[i]
                p_in, p_out = self.factors(i, d_in, d_out, jnp.dtype(dtype))
                blocks.append(np.kron(np.asarray(p_in).T, np.asarray(p_out).T))  # vec(G) row-major
            else:
                size = int(np.prod(np.shape(leaf)))
                blocks.append(fb_matrix[fb_start:fb_start + size])
                fb_start += size
        return np.concatenate(blocks, axis=0)


@functools.lru_cache(maxsize=8)
def _fold_order(seed: int, m: int) -> np.ndarray:
    """The seeded random order ``(m,)`` of the small-site coordinates that the sparse hash folds
    onto the buckets — a host array, drawn once per (seed, M) and embedded in the compiled
    programs (no per-batch shuffle)."""
    order = np.random.default_rng([int(seed), _SPARSE_TAG]).permutation(int(m)).astype(np.int32)
    order.flags.writeable = False
    return order


@dataclasses.dataclass(frozen=True, eq=False)
class BoundFactoredProjection:
    """A :class:`FactoredProjection` bound to one function's parameter layout
    (:meth:`FactoredProjection.bind`): ``Πᵀ`` of gradient pytrees, and its transpose.

    ``self(g)`` equals ``projection.project_features(scalar_fn, params, x)`` when ``g`` holds
    the per-example gradients of ``scalar_fn`` (tests/test_factored_projection.py); it forms
    each linear leaf's gradient, so it is for a few vectors (a domain direction), not a pool.
    """

    projection: FactoredProjection
    sites: dict          # leaf index -> structured._Site of its linear site
    n_leaves: int

    @property
    def dim(self) -> int:
        return self.projection.dim

    def __call__(self, grads, batch_axis: bool = True) -> jax.Array:
        """``(b, dim)`` (``(dim,)`` without ``batch_axis``) for a gradient pytree shaped like
        the bound ``params`` (leaves ``(b, *leaf)`` with ``batch_axis``)."""
        if not batch_axis:
            return self(jax.tree.map(lambda a: jnp.asarray(a)[None], grads))[0]
        leaves = jax.tree.leaves(grads)
        if len(leaves) != self.n_leaves:
            raise ValueError(f"the gradient pytree has {len(leaves)} leaves; the projection was bound to "
                             f"parameters with {self.n_leaves}")
        b = leaves[0].shape[0]
        dtype = jnp.promote_types(leaves[0].dtype, jnp.float32)
        total = jnp.zeros((b, self.dim), dtype)
        fallback, sparse = [], []
        for i, g in enumerate(leaves):
            g = jnp.asarray(g).astype(dtype)
            if i not in self.sites:
                fallback.append(g)
                continue
            site = self.sites[i]
            if self.projection.is_sparse(site.d_in, site.d_out):
                sparse.append(jax.vmap(lambda a: structured.site_matrix(site, a))(g))
                continue
            p_in, p_out = self.projection.factors(i, site.d_in, site.d_out, dtype)
            m = jax.vmap(lambda a: structured.site_matrix(site, a))(g)          # (b, d_in, d_out)
            total = total + jnp.einsum("kc,bcf,lf->bkl", p_in, m, p_out).reshape(b, self.dim)
        if sparse:
            total = total + self.projection.hash_features(sparse, dtype)
        if fallback:
            total = total + self.projection.fallback(fallback).astype(dtype)
        return total

    def adjoint(self, w, params):
        """``Π w`` shaped like ``params`` (float32): ``⟨g, Π w⟩ = ⟨Πᵀ g, w⟩`` for every
        gradient pytree ``g``."""
        w = jnp.asarray(w, jnp.float32)
        if w.shape != (self.dim,):
            raise ValueError(f"w must have shape ({self.dim},) (the projection dim), got {w.shape}")
        return _bound_adjoint(self, jax.tree.map(lambda a: jnp.zeros(np.shape(a), jnp.float32), params), w)


@functools.partial(jax.jit, static_argnums=0)
def _bound_adjoint(projection: BoundFactoredProjection, zeros, w: jax.Array):
    """The cotangent map of the linear ``g ↦ Πᵀ g`` (taken at ``g = 0``) applied to ``w``."""
    _, vjp = jax.vjp(lambda g: projection(g, batch_axis=False), zeros)
    return vjp(w)[0]


def bind_projection(projection, scalar_fn, params, x):
    """``projection`` as a linear map of gradient pytrees shaped like ``params``: a
    :class:`~ntk_jax.kernels.projection.RandomProjection` as it is, a
    :class:`FactoredProjection` bound to ``scalar_fn``'s layout (:meth:`FactoredProjection.bind`)."""
    return projection.bind(scalar_fn, params, x) if getattr(projection, "is_factored", False) else projection


PROJECTION_TYPES = ("dense", "factored")


def make_projection(dim: int, seed: int = 0, projection_type: str = "dense", kind: str = "rademacher"):
    """The JL projection a config names: ``None`` for ``dim == 0`` (exact gradients),
    ``RandomProjection(dim, seed, kind)`` for ``projection_type="dense"``,
    ``FactoredProjection(dim, seed, kind)`` for ``"factored"``."""
    if int(dim) < 0:
        raise ValueError(f"projection dim must be >= 0 (0: no projection), got {dim}")
    if projection_type not in PROJECTION_TYPES:
        raise ValueError(f"unknown projection type {projection_type!r}; use one of {PROJECTION_TYPES}")
    if not int(dim):
        return None
    cls = FactoredProjection if projection_type == "factored" else RandomProjection
    return cls(int(dim), seed=int(seed), kind=str(kind))
