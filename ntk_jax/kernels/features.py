"""Per-example gradient features: the building block of the Jacobian-free kernel, the
loss-gradient (LESS/TracIn) kernel, lpNTK and the selection scores.

Conventions (as in neural-tangents' ``empirical.py``):

* ``f(params, x)`` maps a batch ``x`` (any pytree whose leaves share the leading axis n) to
  outputs ``(n, *out_shape)``.
* A *scalar function* ``s(params, x) -> (n,)`` gives one scalar per example (for example the
  sum of logits, or the per-example loss); its per-example gradients are the features.
* Features are returned as a ``(n, P)`` matrix (flattened gradients, leaves in
  ``jax.tree.leaves`` order) or, with a :class:`RandomProjection`, as ``(n, p)``.

Device meshes: :func:`gradient_features` and :func:`directional_derivatives` run
data-parallel on the ``("data", "model")`` mesh the parameters live on
(:func:`ntk_jax.mesh.resolve_mesh`; ``mesh=`` to name it): each block of examples
is padded to a multiple of the ``data`` size and split over it
(:func:`ntk_jax.mesh.place_rows`), the padding dropped from the result. Without a
mesh, or on one device, batches are passed on unplaced, as before.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntk_jax.kernels.jit import jit_constants_as_args
from ntk_jax.kernels.projection import RandomProjection
from ntk_jax.mesh import onto_mesh, place_rows, resolve_mesh, round_up_to_data
from ntk_jax.utils import progress

PyTree = Any
ScalarFn = Callable[[PyTree, PyTree], jax.Array]


def batch_size_of(x: PyTree, name: str = "x") -> int:
    """The common leading-axis length of every leaf of ``x``.

    Raises ``ValueError`` if ``x`` has no array leaf, if a leaf is a scalar, or if the leading
    axes disagree (the message lists them).
    """
    leaves = jax.tree_util.tree_leaves_with_path(x)
    if not leaves:
        raise ValueError(f"{name} has no array leaves")
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} is a scalar; every leaf needs a leading batch axis")
        sizes[jax.tree_util.keystr(path) or "<root>"] = shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name} leaves have mismatched leading (batch) axes: {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{name} is an empty batch (leading axis 0)")
    return n


def slice_batch(x: PyTree, start: int, stop: int) -> PyTree:
    return jax.tree.map(lambda a: a[start:stop], x)


def pad_batch(x: PyTree, size: int) -> PyTree:
    """Pads the leading axis to ``size`` by repeating the first example (results for padded
    rows are discarded; this keeps one compiled shape for every block)."""
    n = batch_size_of(x)
    if n == size:
        return x
    return jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], size - n, axis=0)], axis=0), x)


def sum_of_outputs(f: Callable) -> ScalarFn:
    """``s(params, x) = Σ_k f_k(params, x)``, summing every output axis: ``(n,)``. The same
    ``f`` (by identity; the last 8) gives the same ``s``, so the programs memoised on ``s``
    (features, scores) are compiled once across calls such as repeated
    :func:`~ntk_jax.kernels.ntk.jacobian_free_ntk` calls. For an ``f`` read through a fixed
    head narrower than its outputs (``f.linear_head``, set by
    :func:`ntk_jax.kernels.outputs.lm_output_fn`), ``s = u · (W 1)``: an LM's sum of logits
    without the ``(n, T, V)`` logits or the output matmul."""
    try:
        return _sum_of_outputs(f)
    except TypeError:  # an unhashable callable
        return _sum_of_outputs.__wrapped__(f)


@functools.lru_cache(maxsize=8)
def _sum_of_outputs(f: Callable) -> ScalarFn:
    head_of = getattr(f, "linear_head", None)  # f = u · W with W fixed (outputs.lm_output_fn)
    head = head_of() if callable(head_of) else None
    if head is not None and head[1].shape[0] < head[1].shape[1]:
        # Σ_k f_k = u · (W 1): the (n, T, V) logits are never formed (for an LLM, V = 128k)
        with jax.ensure_compile_time_eval():  # a constant even when first asked for inside a trace
            w_sum = jnp.sum(head[1], axis=1, dtype=jnp.float32)  # (d,), accumulated in float32
        u = head[0]

        def s(params, x):
            out = u(params, x)
            return (out @ w_sum.astype(out.dtype)).reshape(out.shape[0], -1).sum(axis=1)

        return s

    def s(params, x):
        out = f(params, x)
        return out.reshape(out.shape[0], -1).sum(axis=1)

    return s


def per_example_grads(scalar_fn: ScalarFn, params: PyTree, x: PyTree) -> PyTree:
    """Gradients of ``scalar_fn`` for each example separately.

    Returns a pytree like ``params`` whose leaves have a leading axis n:
    ``leaf[i] = ∂ scalar_fn(params, x[i:i+1])[0] / ∂ leaf``.
    """

    def one(xi):
        xi = jax.tree.map(lambda a: a[None], xi)
        return jax.grad(lambda p: scalar_fn(p, xi)[0])(params)

    return jax.vmap(one)(x)


def flatten_per_example(grads: PyTree) -> jax.Array:
    """Per-example gradient pytree (leaves ``(n, ...)``) → ``(n, P)``."""
    leaves = jax.tree.leaves(grads)
    n = leaves[0].shape[0]
    return jnp.concatenate([g.reshape(n, -1) for g in leaves], axis=1)


def _projection_matrix(projection: RandomProjection, params: PyTree) -> jax.Array | None:
    """The cached whole matrix for per-example gradients shaped like ``params`` (one shared
    float dtype), or ``None`` (on-the-fly path: traced params, mixed dtypes, over budget;
    factored projections, which have no whole matrix)."""
    if getattr(projection, "is_factored", False):
        return None
    leaves = jax.tree.leaves(params)
    dtypes = {jnp.promote_types(jnp.result_type(leaf), jnp.float32) for leaf in leaves}
    if len(dtypes) != 1:
        return None
    return projection.cached_matrix(params, dtypes.pop())


def make_feature_fn(scalar_fn: ScalarFn, projection: RandomProjection | None = None,
                    transform: Callable[[PyTree], PyTree] | None = None) -> Callable:
    """A ``features(params, x, mesh=None) -> (n, P | p)`` for one batch (one compiled program
    per shape and placement; ``x`` already placed by the caller, e.g. with
    :func:`ntk_jax.mesh.place_rows`; ``mesh``, default the one ``params`` live on,
    only says where the cached projection matrix is replicated).

    Per-example gradients are ``vmap(grad)`` of ``scalar_fn``; with a projection whose whole
    ``(P, p)`` matrix fits its ``cache_bytes``, the matrix is generated once (cached on the
    device, see :mod:`ntk_jax.kernels.projection`) and passed to the compiled program, so the
    batch is projected with one ``(n, P) @ (P, p)`` GEMM; otherwise (huge P, or ``params``
    traced by an enclosing transformation) Π is generated on the fly inside the program.

    A :class:`~ntk_jax.kernels.factored_projection.FactoredProjection` projects linear layers
    through their input / output-gradient factors (the per-example gradient of those layers is
    never formed); it takes no ``transform`` (a preconditioner acts on gradient entries).

    Args:
      scalar_fn: ``s(params, x) -> (n,)``.
      projection: optional JL projection applied to each example's gradient
        (:class:`RandomProjection` or ``FactoredProjection``).
      transform: optional map applied to the per-example gradient pytree before projection
        (e.g. an Adam preconditioner ``g -> m'/(sqrt(v')+eps)``; leaves carry the batch axis).
    """
    factored = getattr(projection, "is_factored", False)
    if factored and transform is not None:
        raise ValueError("a FactoredProjection cannot apply a gradient transform (the per-example "
                         "gradients of linear layers are never formed); use RandomProjection")

    @jit_constants_as_args
    def compiled(params, x, matrix):
        if factored:
            return projection.project_features(scalar_fn, params, x)
        g = per_example_grads(scalar_fn, params, x)
        if transform is not None:
            g = transform(g)
        if projection is None:
            return flatten_per_example(g)
        sizes = tuple(int(np.prod(leaf.shape[1:])) for leaf in jax.tree.leaves(g))
        if matrix is not None and sum(sizes) == matrix.shape[0]:
            return projection.project_with_matrix(g, matrix)
        return projection(g)

    replicated: dict = {}  # (id(matrix), mesh) -> (matrix, its copy on the mesh): one entry

    def on_mesh(matrix, mesh, params):
        """The cached matrix replicated over the mesh of the call once (not transferred on
        every call)."""
        if matrix is None:
            return None
        mesh = resolve_mesh(mesh, params)
        if mesh is None:
            return matrix
        key = (id(matrix), mesh)
        if key not in replicated:
            replicated.clear()
            replicated[key] = (matrix, jax.device_put(matrix, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
        return replicated[key][1]

    def features(params, x, mesh=None):
        matrix = None if projection is None else _projection_matrix(projection, params)
        return compiled(params, x, on_mesh(matrix, mesh, params))

    features.compiled = compiled  # (params, x, matrix-or-None), e.g. for cost analysis
    features.projection_matrix = (lambda params: None if projection is None
                                  else _projection_matrix(projection, params))
    return features


@functools.lru_cache(maxsize=8)
def _shared_feature_fn(scalar_fn: ScalarFn, projection: RandomProjection | None,
                       transform: Callable | None) -> Callable:
    """:func:`make_feature_fn` memoised on (scalar_fn, projection, transform) — functions by
    identity, projections by value — so repeated :func:`gradient_features` calls (shards of
    a pool, pool chunks) reuse one compiled program instead of re-tracing and re-compiling.
    Holds the last 8 combinations (and what their closures reference)."""
    return make_feature_fn(scalar_fn, projection, transform)


def gradient_features(scalar_fn: ScalarFn, params: PyTree, x: PyTree, *,
                      projection: RandomProjection | None = None, batch_size: int | None = None,
                      transform: Callable | None = None, progress_desc: str | None = None,
                      mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """Per-example gradient features of ``scalar_fn`` over ``params``.

    Args:
      scalar_fn: ``s(params, x) -> (n,)`` one scalar per example.
      params: the parameters the gradient is taken over (θ_train).
      x: batch pytree with leading axis n.
      projection: optional :class:`RandomProjection` (p = ``projection.dim``).
      batch_size: examples per compiled call (memory ∝ batch_size × P); default all. On a
        mesh it is rounded up to a multiple of the ``data`` size.
      transform: optional per-example gradient transform (see :func:`make_feature_fn`).
      mesh: the ``("data", "model")`` mesh to split each block's examples over (default: the
        mesh ``params`` live on, if any; see the module docstring).

    Returns:
      ``(n, P)`` or ``(n, p)`` numpy array (host memory).
    """
    n = batch_size_of(x)
    mesh = resolve_mesh(mesh, params)
    bs = round_up_to_data(min(batch_size or n, n), mesh)
    try:
        fn = _shared_feature_fn(scalar_fn, projection, transform)
    except TypeError:  # an unhashable callable: compile for this call only
        fn = make_feature_fn(scalar_fn, projection, transform)
    out, pending = [], None
    for start in progress(range(0, n, bs), desc=progress_desc or "features", total=-(-n // bs)):
        stop = min(start + bs, n)
        block = place_rows(pad_batch(slice_batch(x, start, stop), bs), mesh)
        feats = fn(params, block, mesh)  # dispatched asynchronously
        if pending is not None:  # copy the previous block to host while this one computes
            out.append(np.asarray(pending[0][: pending[1]]))
        pending = (feats, stop - start)
    out.append(np.asarray(pending[0][: pending[1]]))
    return np.concatenate(out, axis=0)


@functools.lru_cache(maxsize=8)
def _shared_jvp_fn(scalar_fn: ScalarFn) -> Callable:
    @jit_constants_as_args
    def directional(params, x, tangent):
        return jax.jvp(lambda p: scalar_fn(p, x), (params,), (tangent,))[1]

    return directional


def directional_derivatives(scalar_fn: ScalarFn, params: PyTree, x: PyTree, tangent: PyTree, *,
                            batch_size: int | None = None, progress_desc: str | None = None,
                            mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """``⟨∇_θ s(θ, x_i), tangent⟩`` for every example i: ``(n,)`` numpy array.

    One forward-mode JVP per block of examples (a forward pass carrying one tangent): no
    per-example gradient is formed, so the cost is ≈ 2–3 forward passes per example whatever
    P is. Scores that are inner products of projected features with ONE fixed vector need
    nothing more: ``⟨Πᵀ g_j, u⟩ = ⟨g_j, Π u⟩``, so with ``tangent = projection.adjoint(u,
    params)`` this returns ``features_j · u`` for the features of :func:`gradient_features`
    (e.g. the NTK-Selector score ``s_j = mean_i Θ̃(x_i, x_j)`` with ``u`` the mean projected
    feature of the domain set), up to float rounding.

    Args:
      scalar_fn: ``s(params, x) -> (n,)``.
      params: θ_train; ``tangent`` must have the same structure (and shapes).
      x: batch pytree with leading axis n.
      batch_size: examples per compiled call (default all; on a mesh rounded up to a multiple
        of the ``data`` size).
      mesh: as in :func:`gradient_features` (default: the mesh ``params`` live on); the
        tangent is laid out like ``params``.
    """
    mesh = resolve_mesh(mesh, params)
    tangent = like_params(tangent, params, mesh, "tangent")
    try:
        fn = _shared_jvp_fn(scalar_fn)
    except TypeError:  # unhashable callable
        fn = _shared_jvp_fn.__wrapped__(scalar_fn)
    return _map_row_blocks(lambda block: fn(params, block, tangent), x, batch_size, mesh,
                           progress_desc or "directional derivatives")


def _map_row_blocks(fn: Callable[[PyTree], jax.Array], x: PyTree, batch_size: int | None, mesh,
                    desc: str) -> np.ndarray:
    """``fn(block) -> (bs,)`` over blocks of ``bs = round_up_to_data(min(batch_size, n))``
    examples of ``x`` (the last padded, each placed over the mesh's ``data`` axis); the
    ``(n,)`` results, padding dropped. Calls are dispatched before earlier results are read."""
    n = batch_size_of(x)
    bs = round_up_to_data(min(batch_size or n, n), mesh)
    out = []
    for start in progress(range(0, n, bs), desc=desc, total=-(-n // bs)):
        stop = min(start + bs, n)
        block = place_rows(pad_batch(slice_batch(x, start, stop), bs), mesh)
        out.append((fn(block), stop - start))
    return np.concatenate([np.asarray(v[:k]) for v, k in out], axis=0)


@functools.lru_cache(maxsize=8)
def _shared_value_fn(scalar_fn: ScalarFn) -> Callable:
    return jit_constants_as_args(scalar_fn)


def scalar_values(scalar_fn: ScalarFn, params: PyTree, x: PyTree, *, batch_size: int | None = None,
                  progress_desc: str | None = None, mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """``s(params, x_i)`` for every example i: ``(n,)`` numpy array — forward passes only (no
    derivative), in compiled blocks of ``batch_size`` examples laid out as in
    :func:`directional_derivatives` (the frozen weights ``scalar_fn`` closes over are
    program arguments, :func:`~ntk_jax.kernels.jit.jit_constants_as_args`). E.g. the
    per-record response loss at several parameter points (loss-change selection scores)."""
    mesh = resolve_mesh(mesh, params)
    try:
        fn = _shared_value_fn(scalar_fn)
    except TypeError:  # unhashable callable
        fn = _shared_value_fn.__wrapped__(scalar_fn)
    return _map_row_blocks(lambda block: fn(params, block), x, batch_size, mesh, progress_desc or "forward values")


def like_params(tree: PyTree, params: PyTree, mesh, name: str = "tangent") -> PyTree:
    """``tree`` (same structure and leaf shapes as ``params``, else ``ValueError`` naming it)
    cast to the parameters' dtypes and, on a mesh, laid out as each parameter (replicated
    where a parameter is not on the mesh)."""
    if jax.tree.structure(tree) != jax.tree.structure(params):
        raise ValueError(f"{name} must have the structure of params")
    for t, p in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
        if np.shape(t) != np.shape(p):
            raise ValueError(f"{name} leaf shape {np.shape(t)} != parameter leaf shape {np.shape(p)}")
    tree = jax.tree.map(lambda t, p: jnp.asarray(t, jnp.result_type(p)), tree, params)
    if mesh is not None:
        tree = onto_mesh(jax.tree.map(
            lambda t, p: jax.device_put(t, p.sharding) if _on(p, mesh) else t, tree, params), mesh)
    return tree


def _on(p, mesh) -> bool:
    """Whether ``p`` is laid out on ``mesh`` (a ``NamedSharding`` of it)."""
    sharding = getattr(p, "sharding", None)
    return isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh


def _tree_vdot_rows(g: PyTree, t: PyTree) -> jax.Array:
    """``(n,)``: ``⟨g_i, t⟩`` for per-example leaves ``(n, ...)`` and a parameter-shaped ``t``."""
    return sum(jnp.sum((gl * tl[None]).reshape(gl.shape[0], -1), axis=1)
               for gl, tl in zip(jax.tree.leaves(g), jax.tree.leaves(t)))


def _tree_sq_norm_rows(g: PyTree, metric: PyTree | None) -> jax.Array:
    """``(n,)``: ``Σ w g_i²`` (``w`` = 1 without a metric)."""
    if metric is None:
        return sum(jnp.sum((gl * gl).reshape(gl.shape[0], -1), axis=1) for gl in jax.tree.leaves(g))
    return _tree_vdot_rows(jax.tree.map(lambda a: a * a, g), metric)


@functools.lru_cache(maxsize=8)
def _shared_mean_gradient_fn(scalar_fn: ScalarFn, normalize: bool) -> Callable:
    @jit_constants_as_args
    def block_sum(params, x, weights, metric):
        g = per_example_grads(scalar_fn, params, x)
        sq = _tree_sq_norm_rows(g, metric)
        coef = weights / jnp.sqrt(jnp.maximum(sq, 1e-30)) if normalize else weights
        total = jax.tree.map(lambda gl: jnp.einsum("n,n...->...", coef.astype(gl.dtype), gl), g)
        return total, sq

    return block_sum


def mean_gradient(scalar_fn: ScalarFn, params: PyTree, x: PyTree, *, normalize: bool = False,
                  metric: PyTree | None = None, batch_size: int | None = None, progress_desc: str | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> tuple[PyTree, np.ndarray]:
    """The mean per-example gradient ``u = (1/n) Σ_i g_i`` (``normalize=True``:
    ``(1/n) Σ_i g_i / ‖g_i‖_w``) of ``scalar_fn`` over ``params``, accumulated block by block
    (memory: one block's per-example gradients; the ``(n, P)`` matrix is never formed).

    Args:
      scalar_fn: ``s(params, x) -> (n,)``; g_i = ∇_θ s(θ, x_i).
      params: θ_train (pytree).
      x: batch pytree with leading axis n.
      normalize: divide each g_i by its norm first.
      metric: optional positive pytree ``w`` shaped like ``params``: norms are
        ``‖g‖_w = √(Σ w g²)`` (e.g. a diagonal Adam preconditioner); default ``w = 1``.
      batch_size, mesh: as in :func:`gradient_features`.

    Returns:
      ``(u, sq_norms)``: ``u`` a pytree like ``params`` (float32), ``sq_norms`` ``(n,)`` numpy
      ``‖g_i‖_w²``.
    """
    n = batch_size_of(x)
    mesh = resolve_mesh(mesh, params)
    metric = None if metric is None else like_params(metric, params, mesh, "metric")
    bs = round_up_to_data(min(batch_size or n, n), mesh)
    fn = _shared_mean_gradient_fn(scalar_fn, bool(normalize))
    total, sq = None, []
    for start in progress(range(0, n, bs), desc=progress_desc or "mean gradient", total=-(-n // bs)):
        stop = min(start + bs, n)
        block = place_rows(pad_batch(slice_batch(x, start, stop), bs), mesh)
        weights = jnp.asarray((np.arange(bs) < stop - start).astype(np.float32))  # padded rows count 0
        part, part_sq = fn(params, block, weights, metric)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
        sq.append(np.asarray(part_sq)[: stop - start])
    return jax.tree.map(lambda a: a / n, total), np.concatenate(sq).astype(np.float64)


@functools.lru_cache(maxsize=8)
def _shared_inner_product_fn(scalar_fn: ScalarFn) -> Callable:
    @jit_constants_as_args
    def inner(params, x, tangent, metric):
        g = per_example_grads(scalar_fn, params, x)
        return _tree_vdot_rows(g, tangent), _tree_sq_norm_rows(g, metric)

    return inner


def gradient_inner_products(scalar_fn: ScalarFn, params: PyTree, x: PyTree, tangent: PyTree, *,
                            metric: PyTree | None = None, batch_size: int | None = None,
                            progress_desc: str | None = None,
                            mesh: jax.sharding.Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(⟨g_i, tangent⟩, ‖g_i‖_w²)`` for every example: two ``(n,)`` float64 arrays, from one
    per-example gradient per example (``vmap(grad)``; nothing is projected or stored).

    The inner products equal :func:`directional_derivatives` (which needs only a JVP, but gives
    no norm) up to float rounding; use this when the norms are needed too (cosine-normalised
    scores, norm diagnostics). ``metric``: as in :func:`mean_gradient`. ``batch_size``,
    ``mesh``: as in :func:`gradient_features`.
    """
    n = batch_size_of(x)
    mesh = resolve_mesh(mesh, params)
    tangent = like_params(tangent, params, mesh, "tangent")
    metric = None if metric is None else like_params(metric, params, mesh, "metric")
    bs = round_up_to_data(min(batch_size or n, n), mesh)
    fn = _shared_inner_product_fn(scalar_fn)
    dots, sq = [], []
    for start in progress(range(0, n, bs), desc=progress_desc or "gradient inner products", total=-(-n // bs)):
        stop = min(start + bs, n)
        block = place_rows(pad_batch(slice_batch(x, start, stop), bs), mesh)
        d, s = fn(params, block, tangent, metric)
        dots.append(np.asarray(d)[: stop - start])
        sq.append(np.asarray(s)[: stop - start])
    return np.concatenate(dots).astype(np.float64), np.concatenate(sq).astype(np.float64)
