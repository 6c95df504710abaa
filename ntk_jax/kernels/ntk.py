"""Empirical neural tangent kernels of ``f(params, x)`` with respect to ``params``.

Notation (docs/theory.md §1, §2): ``f(θ, x) ∈ R^O`` per example, ``J(x) = ∂f/∂θ ∈ R^{O×P}`` over the
parameters passed in (θ_train; take a subset with :func:`ntk_jax.models.subset.param_subset`).

* :func:`empirical_ntk` — exact ``Θ(x, x') = J(x) J(x')ᵀ``: ``(n1, n2, O, O)``, or
  ``(n1, n2)`` with the output axis traced (``Σ_k Θ_kk``). Three independent methods:
  ``"jacobian"`` (per-example reverse-mode Jacobians, contracted), ``"ntk_vp"``
  (NTK-vector products ``J(x)(J(x')ᵀ e_b)`` by ``vjp`` then ``jvp``; J is never formed) and
  ``"neural_tangents"`` (the neural-tangents library, as an oracle); plus ``"structured"``
  (linear layers contracted through their input / output-cotangent factors,
  :mod:`ntk_jax.kernels.structured`, docs/theory.md §2.5) and ``"auto"`` (the default of
  :func:`empirical_ntk`: the cheapest by :func:`~ntk_jax.kernels.structured.structured_plan`'s
  cost model; docs/kernels.md).
* :func:`linear_head_ntk` — the exact kernel of ``f = u(θ, x) · W`` with a fixed head ``W``
  (``d × O``, e.g. a language model's output matrix over the final hidden states) from ``u``'s
  Jacobian: ``min(d, O)`` backward passes per example instead of ``O`` (docs/theory.md §2.7).
* :func:`jacobian_free_ntk` — ``Θ̃(x, x') = ⟨∇θ Σ_k f_k(x), ∇θ Σ_k f_k(x')⟩`` (NTK-Selector
  Def. 2), exact or through a seeded JL projection.
* :func:`loss_gradient_kernel` — ``⟨∇θ L(x), ∇θ L(x')⟩`` (LESS/TracIn style).

All drivers accept ``block_size``: the kernel is computed in (rows × columns) blocks of that
many examples, so device memory is bounded by the block, not by n; results are assembled in
host memory (numpy). Blocks are padded to one shape, so each driver compiles once.
"""
from __future__ import annotations

import enum
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntk_jax.kernels import contract, nt_compat
from ntk_jax.kernels.checks import check_finite
from ntk_jax.kernels.contract import contract_jacobians, gram as _gram, output_size
from ntk_jax.kernels.features import (ScalarFn, batch_size_of, gradient_features, pad_batch,
                                      slice_batch, sum_of_outputs)
from ntk_jax.kernels.projection import RandomProjection
from ntk_jax.kernels.jit import ConstantsAsArgs, jit_constants_as_args
from ntk_jax.kernels.structured import StructuredPlan, structured_block, structured_plan
from ntk_jax.utils import progress

PyTree = Any


class NtkMethod(str, enum.Enum):
    """How an exact eNTK block is computed (a ``str`` enum: ``method="ntk_vp"`` and
    ``method=NtkMethod.NTK_VP`` are the same)."""

    JACOBIAN = "jacobian"                # per-example Jacobian rows, contracted
    NTK_VP = "ntk_vp"                    # NTK-vector products: J is never formed
    NEURAL_TANGENTS = "neural_tangents"  # the neural-tangents library (oracle; nt_compat)
    STRUCTURED = "structured"            # linear layers through their factors (kernels.structured)
    AUTO = "auto"                        # the cheapest of the above by the structured plan's cost model


METHODS = tuple(m.value for m in NtkMethod)


def ntk_method(method) -> NtkMethod:
    """``method`` (a name or :class:`NtkMethod`) validated: ``ValueError`` naming the choices."""
    try:
        return NtkMethod(method)
    except ValueError:
        raise ValueError(f"unknown NTK method {method!r}; use one of {METHODS}") from None


# --- one block, as pure jittable functions -------------------------------------------------


def _flat(f: Callable) -> Callable:
    """``f`` with outputs flattened to ``(n, O)``."""
    return lambda p, x: f(p, x).reshape(batch_size_of(x), -1)


def per_example_jacobians(f: Callable, params: PyTree, x: PyTree) -> PyTree:
    """``J(x_i)`` for every example: a pytree like ``params`` with leaves ``(n, O, *leaf)``."""

    def one(xi):
        xi = jax.tree.map(lambda a: a[None], xi)
        return jax.jacrev(lambda p: f(p, xi).reshape(-1))(params)

    return jax.vmap(one)(x)


def per_example_vjp(f: Callable, params: PyTree, x: PyTree):
    """``v ↦ (J(x_i)ᵀ v_i)_i`` for cotangents ``v (n, O)``, from one forward pass over the batch.

    Per-example VJPs without summing across examples: every example gets its own copy of the
    parameters (a broadcast, not a copy in memory) and the VJP is taken w.r.t. the stack.
    Returns ``(vjp, outputs (n, O))``; ``vjp(v)`` is a 1-tuple of a pytree with leaves
    ``(n, *leaf)``.
    """
    n = batch_size_of(x)
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), params)
    per_ex = jax.vmap(lambda p, xj: f(p, jax.tree.map(lambda a: a[None], xj)).reshape(-1))
    out, vjp = jax.vjp(lambda ps: per_ex(ps, x), stacked)
    return vjp, out


def _full_rows_fit(params, x1, x2, O) -> bool:
    """Whether both sides' whole per-example Jacobian rows ``(n, O, P)`` take at most
    :data:`contract.CONCAT_MAX_BYTES`."""
    leaves = jax.tree.leaves(params)
    row = O * sum(int(np.prod(np.shape(a))) * jnp.dtype(jnp.result_type(a)).itemsize for a in leaves)
    n = batch_size_of(x1) + (0 if x2 is None else batch_size_of(x2))
    return n * row <= contract.CONCAT_MAX_BYTES


def _jacobian_block(f, trace, O, basis_batch):
    """Jacobian contraction. Traced: ``Σ_b ⟨J(x1)ᵀe_b, J(x2)ᵀe_b⟩`` with ``basis_batch``
    output rows of the per-example Jacobians alive at a time (faster than forming all
    ``(n, O, P)`` rows and bounds memory). Full: whole per-example Jacobians, contracted.
    ``x2=None`` reuses ``x1``'s Jacobian rows."""

    def traced(params, x1, x2):
        if _full_rows_fit(params, x1, x2, O) and contract.uses_convolution(f, params, x1):
            # Convolutions: whole per-example Jacobians by vmap(jacrev) (shared parameters),
            # then the traced contraction (contract.uses_convolution says why).
            j1 = per_example_jacobians(f, params, x1)
            j2 = j1 if x2 is None else per_example_jacobians(f, params, x2)
            return contract_jacobians(j1, j2, trace=True)
        vjp1, out1 = per_example_vjp(f, params, x1)
        vjp2, out2 = (vjp1, out1) if x2 is None else per_example_vjp(f, params, x2)

        def rows(b):
            e = jax.nn.one_hot(b, O, dtype=out1.dtype)
            (c1,) = vjp1(jnp.broadcast_to(e, out1.shape))
            if x2 is None:
                return _gram(c1, c1)
            (c2,) = vjp2(jnp.broadcast_to(e, out2.shape))
            return _gram(c1, c2)

        return jax.lax.map(rows, jnp.arange(O), batch_size=basis_batch).sum(axis=0)

    def full(params, x1, x2):
        j1 = per_example_jacobians(f, params, x1)
        j2 = j1 if x2 is None else per_example_jacobians(f, params, x2)
        return contract_jacobians(j1, j2, trace=False)

    return traced if trace else full


def _ntk_vp_block(f, trace, O, basis_batch):
    f_flat = _flat(f)

    def block(params, x1, x2):
        x2 = x1 if x2 is None else x2
        # J(x1) t for a parameter tangent t, sharing one linearised forward pass over x1.
        _, jvp1 = jax.linearize(lambda p: f_flat(p, x1), params)
        vjp2, out2 = per_example_vjp(f, params, x2)

        def column(b):
            e = jnp.broadcast_to(jax.nn.one_hot(b, O, dtype=out2.dtype), out2.shape)
            (cts,) = vjp2(e)  # leaves (n2, *leaf): J(x2_j)ᵀ e_b
            cols = jax.vmap(jvp1)(cts)  # (n2, n1, O): J(x1_i) J(x2_j)ᵀ e_b
            return cols[:, :, b] if trace else cols

        res = jax.lax.map(column, jnp.arange(O), batch_size=basis_batch)
        if trace:
            return res.sum(axis=0).T  # (O, n2, n1) → (n1, n2)
        return jnp.transpose(res, (2, 1, 3, 0))  # (b, j, i, a) → (i, j, a, b)

    return block


def _neural_tangents_block(f, trace, implementation, O):
    kernel_fn = nt_compat.empirical_ntk_fn(_flat(f), trace_axes=(-1,) if trace else (),
                                           vmap_axes=0, implementation=implementation)

    def block(params, x1, x2):
        # neural-tangents *averages* over traced axes; this library's trace is the sum.
        k = kernel_fn(x1, x2, params)
        return k * O if trace else k

    return block


# Output basis vectors per step: jacobian groups rows (8 was fastest on CPU in
# benchmarks/ntk_speed.py); ntk_vp is fastest one at a time.
DEFAULT_BASIS_BATCH = {"jacobian": 8, "ntk_vp": 1, "structured": 8}

# method -> block builder (f, trace, O, basis_batch, nt_implementation) -> kernel(params, x1, x2)
_BLOCK_BUILDERS: dict[NtkMethod, Callable] = {
    NtkMethod.JACOBIAN: lambda f, trace, O, bb, impl: _jacobian_block(f, trace, O, bb),
    NtkMethod.NTK_VP: lambda f, trace, O, bb, impl: _ntk_vp_block(f, trace, O, bb),
    NtkMethod.NEURAL_TANGENTS: lambda f, trace, O, bb, impl: _neural_tangents_block(f, trace, impl, O),
    NtkMethod.STRUCTURED: lambda f, trace, O, bb, impl: structured_block(f, trace, O, bb),
}


def ntk_fn(f: Callable, *, trace: bool = True, method: str = "jacobian",
           nt_implementation: str = "jacobian_contraction", output_dim: int | None = None,
           basis_batch: int | None = None) -> Callable:
    """A pure, jittable ``kernel(params, x1, x2)`` (no blocking, no checks); ``x2=None``
    means ``x2 = x1`` (the ``jacobian`` method then differentiates x1 once).

    ``output_dim`` (O) is required for every method but ``jacobian`` with ``trace=False``;
    ``basis_batch`` output basis vectors are pushed through ``vjp``/``jvp`` at a time
    (default :data:`DEFAULT_BASIS_BATCH`).
    """
    method = ntk_method(method)
    if method is NtkMethod.AUTO:
        raise ValueError("method='auto' is resolved from the input shapes by empirical_ntk (or "
                         "structured_plan(...).auto); ntk_fn needs a concrete method")
    if output_dim is None and (trace or method is not NtkMethod.JACOBIAN):
        raise ValueError(f"method={method.value!r} needs output_dim (O)")
    bb = min(basis_batch or DEFAULT_BASIS_BATCH.get(method.value, 1), output_dim or 1)
    return _BLOCK_BUILDERS[method](f, trace, output_dim, bb, nt_implementation)


@functools.lru_cache(maxsize=8)
def _shared_kernel_fn(f: Callable, trace: bool, method: str, nt_implementation: str, output_dim: int | None,
                      basis_batch: int | None) -> ConstantsAsArgs:
    """:func:`ntk_fn` compiled (:func:`~ntk_jax.kernels.jit.jit_constants_as_args`) and memoised
    on its arguments — ``f`` by identity, as ``jax.jit`` caches a function's traces — so that
    repeated :func:`empirical_ntk` calls with the same ``f`` (a kernel at every checkpoint of a
    fine-tune, blocks of a large kernel) reuse one compiled program instead of re-tracing and
    re-compiling it each call. Holds the last 8 combinations (and what their closures reference)."""
    return jit_constants_as_args(ntk_fn(f, trace=trace, method=method, nt_implementation=nt_implementation,
                                        output_dim=output_dim, basis_batch=basis_batch))


# --- blocked drivers -----------------------------------------------------------------------


def blocked_kernel(block_fn: Callable, params: PyTree, x1: PyTree, x2: PyTree | None,
                   block_size: int | None, *, full: bool = False, desc: str = "kernel blocks") -> np.ndarray:
    """Evaluates ``block_fn(params, xa, xb)`` over row × column blocks into a host array
    (compiled here unless it already is a :class:`~ntk_jax.kernels.jit.ConstantsAsArgs`).

    With ``x2=None`` the kernel is symmetric and only blocks on or above the diagonal are
    computed (mirrored, transposing the output axes too when ``full``); diagonal blocks are
    evaluated as ``block_fn(params, xa, None)``, which ``block_fn`` must read as ``xb = xa``.
    """
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    n1, n2 = batch_size_of(x1, "x1"), batch_size_of(x2, "x2")
    fn = block_fn if isinstance(block_fn, ConstantsAsArgs) else jit_constants_as_args(block_fn)
    if block_size is None:
        return np.asarray(fn(params, x1, None if symmetric else x2))
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    b1, b2 = min(block_size, n1), min(block_size, n2)
    blocks = [(i, j) for i in range(0, n1, b1) for j in range(0, n2, b2) if not symmetric or j >= i]
    K = None
    for i, j in progress(blocks, desc=desc):
        i1, j1 = min(i + b1, n1), min(j + b2, n2)
        xa = pad_batch(slice_batch(x1, i, i1), b1)
        xb = None if symmetric and i == j else pad_batch(slice_batch(x2, j, j1), b2)
        kb = np.asarray(fn(params, xa, xb))
        kb = kb[: i1 - i, : j1 - j]
        if K is None:
            K = np.zeros((n1, n2) + kb.shape[2:], kb.dtype)
        K[i:i1, j:j1] = kb
        if symmetric and j > i:
            K[j:j1, i:i1] = np.swapaxes(np.swapaxes(kb, 0, 1), 2, 3) if full else kb.T
    return K


def empirical_ntk(f: Callable, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                  trace: bool = True, method: str = "auto", block_size: int | None = None,
                  nt_implementation: str = "jacobian_contraction", basis_batch: int | None = None,
                  check: bool = True, return_info: bool = False):
    """The exact empirical NTK ``Θ(x1, x2) = J(x1) J(x2)ᵀ`` over ``params``.

    Args:
      f: ``f(params, x) -> (n, *out_shape)``; ``x`` is any pytree with leading batch axis n.
      params: pytree of the parameters the kernel is taken over.
      x1: batch of n1 examples. x2: batch of n2 examples, or ``None`` for ``x2 = x1``.
      trace: ``True`` → ``(n1, n2)`` = Σ_k Θ_kk (trace over the O output entries);
        ``False`` → ``(n1, n2, O, O)`` with ``O = prod(out_shape)``.
      method: ``"jacobian"``, ``"ntk_vp"``, ``"neural_tangents"``, ``"structured"`` (linear
        layers contracted through their input / output-cotangent factors, every other leaf
        as ``jacobian``; :mod:`ntk_jax.kernels.structured`) or ``"auto"`` (the default: the
        cheapest of ``structured`` / ``jacobian`` / ``ntk_vp`` by :func:`structured_plan`'s
        cost model for the block shape; docs/kernels.md). With ``"auto"``, an ``f`` that
        carries ``f.linear_head``, a callable returning ``(u, W)`` with ``f = u · W`` and ``W``
        ``(d, O)`` fixed (or ``None``; :func:`ntk_jax.kernels.outputs.lm_output_fn` sets it), and
        ``d < O`` goes through :func:`linear_head_ntk` (``d`` passes per example instead of ``O``). Every method gives the same kernel
        up to float rounding; ``return_info`` says which one ran.
      block_size: examples per row/column block (bounds device memory); ``None`` = one block.
      nt_implementation: neural-tangents mode, ``"jacobian_contraction"`` or
        ``"ntk_vector_products"``.
      basis_batch: output basis vectors per ``vjp``/``jvp`` step (``jacobian`` traced and
        ``ntk_vp``); default :data:`DEFAULT_BASIS_BATCH`.
      check: raise :class:`NonFiniteKernelError` on NaN/inf.
      return_info: also return ``{"method": <method run>, "plan": StructuredPlan | None}``
        (the plan — per-leaf factored / materialized / fallback — for ``structured`` and
        ``auto``).

    Returns:
      numpy array ``(n1, n2)`` or ``(n1, n2, O, O)`` (and the info dict with ``return_info``).
    """
    method = ntk_method(method).value
    n1 = batch_size_of(x1, "x1")
    if x2 is not None:
        batch_size_of(x2, "x2")
        t1 = jax.tree.structure(x1)
        if t1 != jax.tree.structure(x2):
            raise ValueError(f"x1 and x2 must have the same pytree structure; got {t1} and {jax.tree.structure(x2)}")
    if not jax.tree.leaves(params):
        raise ValueError("params is empty: the kernel needs at least one parameter")
    head_of = getattr(f, "linear_head", None)  # () -> (u, W) with f = u · W, W fixed (outputs.lm_output_fn)
    head = head_of() if method == "auto" and callable(head_of) else None
    if head is not None and head[1].shape[0] < head[1].shape[1]:
        out = linear_head_ntk(head[0], head[1], params, x1, x2, trace=trace, method="auto", block_size=block_size,
                              nt_implementation=nt_implementation, basis_batch=basis_batch, check=check,
                              return_info=return_info)
        if return_info:
            out[1]["method"] = f"linear_head+{out[1]['method']}"
        return out
    O = output_size(f, params, x1)
    plan: StructuredPlan | None = None
    if method in ("structured", "auto"):
        plan = structured_plan(f, params, x1, x2, trace=trace, block_size=block_size)
        method = plan.auto if method == "auto" else method
    try:
        block = _shared_kernel_fn(f, trace, method, nt_implementation, O, basis_batch)
    except TypeError:  # an unhashable f: compile for this call only
        block = ntk_fn(f, trace=trace, method=method, nt_implementation=nt_implementation,
                       output_dim=O, basis_batch=basis_batch)
    K = blocked_kernel(block, params, x1, x2, block_size, full=not trace, desc=f"eNTK ({method})")
    del n1
    K = check_finite(K, f"eNTK ({method})") if check else K
    return (K, {"method": method, "plan": plan}) if return_info else K


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Every row of ``x`` ``(n, d)`` scaled to unit Euclidean norm (zero rows stay zero), in
    ``x``'s dtype."""
    x = np.asarray(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def feature_kernel(F1: np.ndarray, F2: np.ndarray | None = None, *, normalize: bool = False) -> np.ndarray:
    """Gram matrix ``F1 F2ᵀ`` of feature rows ``(n1, d)``, ``(n2, d)`` → ``(n1, n2)``.

    ``normalize`` scales every row to unit norm first (cosine kernel, as LESS does). With
    ``F2=None`` the product is ``F1 @ F1.T`` of one array (normalised once), which numpy
    computes as a symmetric rank-k update (BLAS ``syrk``: one triangle, exactly symmetric).
    """
    F1 = np.asarray(F1)
    same = F2 is None
    F2 = F1 if same else np.asarray(F2)
    if F1.ndim != 2 or F2.ndim != 2 or F1.shape[1] != F2.shape[1]:
        raise ValueError(f"feature matrices must be (n1, d) and (n2, d); got {F1.shape} and {F2.shape}")
    check_finite(F1, "features")
    if not same:
        check_finite(F2, "features")
    if normalize:
        F1 = normalize_rows(F1)
        F2 = F1 if same else normalize_rows(F2)
    return F1 @ F2.T


@functools.lru_cache(maxsize=8)
def _through_factor(u: Callable, shape: tuple[int, int], data: bytes) -> Callable:
    """``x ↦ u(θ, x) @ L`` for the float32 factor ``L`` given by ``shape`` and its bytes; the same
    function for the same ``(u, L)``, so the kernel programs compiled for it are reused."""
    factor = np.frombuffer(data, dtype=np.float32).reshape(shape)

    def f(params, x):
        out = u(params, x)
        return jnp.einsum("...d,dr->...r", out, jnp.asarray(factor, out.dtype))

    return f


def _checked_head(head) -> np.ndarray:
    W = np.asarray(head, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"head must be a (d, O) matrix, got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        raise ValueError("head has non-finite entries")
    return W


def traced_head_output(u: Callable, head) -> Callable | None:
    """``ũ(θ, x) = u(θ, x) · L`` with ``L Lᵀ = W Wᵀ`` (``L`` ``(d, r)``, ``r = rank W``): a
    function of ``r ≤ min(d, O)`` outputs whose *traced* eNTK equals that of ``u · W``
    (docs/theory.md §2.7); the same function for the same ``(u, W)``. ``None`` when ``W = 0``."""
    if getattr(head, "ndim", None) != 2:
        raise ValueError(f"head must be a (d, O) matrix, got shape {getattr(head, 'shape', None)}")
    # W Wᵀ on the device, accumulated in float32 (an LLM's head is d × 128k); eigh in float64
    G = np.asarray(jnp.einsum("do,eo->de", jnp.asarray(head), jnp.asarray(head),
                              preferred_element_type=jnp.float32), np.float64)
    if not np.all(np.isfinite(G)):
        raise ValueError("head has non-finite entries")
    evals, evecs = np.linalg.eigh((G + G.T) / 2)
    keep = evals > max(float(evals.max()), 0.0) * G.shape[0] * np.finfo(np.float32).eps
    if not keep.any():
        return None
    L = np.ascontiguousarray((evecs[:, keep] * np.sqrt(evals[keep])).astype(np.float32))
    return _through_factor(u, L.shape, L.tobytes())


def linear_head_ntk(u: Callable, head, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                    trace: bool = True, **kwargs):
    """The exact eNTK of ``f(θ, x) = u(θ, x) · W`` for a fixed head ``W`` (not in ``params``).

    Args:
      u: ``u(params, x) -> (n, *lead, d)``: the features the head reads (e.g. an LM's final
        hidden states averaged over the scored positions, :func:`ntk_jax.kernels.outputs.lm_hidden_output_fn`).
      head: ``(d, O)`` array ``W``, applied to ``u``'s last axis (e.g. the LM's output matrix,
        :func:`ntk_jax.kernels.outputs.lm_output_head`).
      params, x1, x2, block_size, method, ...: as :func:`empirical_ntk` (``kwargs`` are passed on).
      trace: ``True`` → ``(n1, n2)`` traced over every output of ``f`` (``lead`` axes and ``O``);
        ``False`` → ``(n1, n2, O_f, O_f)`` with ``O_f = prod(lead) · O``, ordered as ``f``'s
        outputs flattened.

    Since ``J_f = J_u W`` (per lead position), ``Θ_f(x, x') = Wᵀ Θ_u(x, x') W``. Traced, with
    ``W Wᵀ = L Lᵀ`` (``L`` ``d × r``, ``r = rank W ≤ min(d, O)``, from a float64 eigendecomposition),
    ``tr Θ_f = tr Θ_ũ`` for ``ũ = u · L``: the traced kernel of ``r`` outputs, i.e. ``r``
    backward passes per example instead of ``O`` — for a language model's logits ``O`` is the
    vocabulary (32k–150k) and ``d`` the hidden size. The full form computes ``Θ_u`` (``d``
    outputs) and applies ``W`` on both sides. Returns numpy arrays like :func:`empirical_ntk`.
    """
    if trace:
        u_tilde = traced_head_output(u, head)
        if u_tilde is None:  # W = 0
            return np.zeros((batch_size_of(x1, "x1"), batch_size_of(x1 if x2 is None else x2, "x2")))
        return empirical_ntk(u_tilde, params, x1, x2, trace=True, **kwargs)
    W = _checked_head(head)
    d = int(W.shape[0])
    out = kwargs.pop("return_info", False)
    theta_u = empirical_ntk(u, params, x1, x2, trace=False, return_info=out, **kwargs)
    theta_u, info = theta_u if out else (theta_u, None)
    n1, n2, Ou, _ = theta_u.shape
    if Ou % d:
        raise ValueError(f"u has {Ou} outputs per example, not a multiple of the head's d = {d}")
    lead = Ou // d
    t = theta_u.reshape(n1, n2, lead, d, lead, d)
    theta_f = np.einsum("ijadbe,do,ep->ijaobp", t, W, W, optimize=True).reshape(
        n1, n2, lead * W.shape[1], lead * W.shape[1]).astype(theta_u.dtype)
    theta_f = check_finite(theta_f, "linear-head kernel")
    return (theta_f, info) if out else theta_f


def gradient_kernel(scalar_fn: ScalarFn, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                    projection_dim: int | None = None, seed: int = 0, kind: str = "rademacher",
                    block_size: int | None = None, normalize: bool = False) -> np.ndarray:
    """``⟨∇θ s(x), ∇θ s(x')⟩`` for a per-example scalar function ``s(params, x) -> (n,)``.

    With ``projection_dim = p`` gradients are JL-projected to ``p`` dims first (seeded by
    ``seed``; identical matrix for x1 and x2). ``block_size`` examples are differentiated per
    compiled call. Returns ``(n1, n2)``.
    """
    proj = RandomProjection(projection_dim, seed=seed, kind=kind) if projection_dim else None
    F1 = gradient_features(scalar_fn, params, x1, projection=proj, batch_size=block_size)
    F2 = None if x2 is None else gradient_features(scalar_fn, params, x2, projection=proj, batch_size=block_size)
    return check_finite(feature_kernel(F1, F2, normalize=normalize), "gradient kernel")


def jacobian_free_ntk(f: Callable, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                      projection_dim: int | None = None, seed: int = 0, block_size: int | None = None,
                      kind: str = "rademacher") -> np.ndarray:
    """The Jacobian-free (sum-of-logits) kernel ``⟨∇θ Σ_k f_k(x), ∇θ Σ_k f_k(x')⟩``: ``(n1, n2)``.

    Equals ``tr Θ(x, x') + Σ_{k≠m} ⟨∇f_k(x), ∇f_m(x')⟩``; one backward pass per example
    instead of O. For language models, pass an ``f`` that already averages the logits over
    the positions that count (:func:`ntk_jax.kernels.outputs.masked_mean_logits`).
    """
    return gradient_kernel(sum_of_outputs(f), params, x1, x2, projection_dim=projection_dim,
                           seed=seed, kind=kind, block_size=block_size)


def loss_gradient_kernel(loss_fn: ScalarFn, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                         projection_dim: int | None = None, seed: int = 0, block_size: int | None = None,
                         normalize: bool = False) -> np.ndarray:
    """``⟨∇θ L(x), ∇θ L(x')⟩`` with ``loss_fn(params, x) -> (n,)`` per-example losses.

    ``normalize=True`` gives the cosine form used by LESS. Returns ``(n1, n2)``.
    """
    return gradient_kernel(loss_fn, params, x1, x2, projection_dim=projection_dim, seed=seed,
                           block_size=block_size, normalize=normalize)
