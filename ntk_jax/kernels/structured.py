"""Structured (layer-factored) exact eNTK: linear layers contracted through their factors.

For a parameter ``W`` that enters ``f`` only through one linear map ``y_t = x_t W`` (``t``
over sequence positions and other shared-weight uses; the models' ``LoRALinear`` kernels,
LoRA ``A``/``B`` factors, HF ports' projections), the per-example Jacobian row of output
``a`` is ``∂f_a/∂W = Σ_t x_t ⊗ δ_{t,a}`` with ``δ_{t,a} = ∂f_a/∂y_t``, so

    ⟨∂f_a(x_i)/∂W, ∂f_b(x_j)/∂W⟩ = Σ_{t,t'} (x_it · x_jt') (δ_ita · δ_jt'b)

costs ``O(T²(d_in + d_out))`` per pair instead of ``O(d_in d_out)`` (Novak et al. 2022,
"Fast Finite Width NTK", structured derivatives). This module finds such layers
automatically and computes the kernel from ``x`` and ``δ`` (``method="structured"`` of
:func:`ntk_jax.kernels.ntk.empirical_ntk`):

1. ``f`` is traced for ONE example to a jaxpr. A parameter leaf is *linear* when its only
   use — through bijective relabellings (``convert_element_type``, ``reshape``,
   ``transpose``, ``squeeze``, ``expand_dims``, ``copy``, and nested ``jit`` calls) and
   scalings by a scalar (``W * c``, ``W / c``: standard parameterisation; the scale goes into
   the recorded ``x``) — is one operand of one ``dot_general`` without batch dimensions on its
   side. Every other leaf
   (norm scales, biases, embeddings, tied weights, weights used twice or non-linearly)
   *falls back* to per-example Jacobian rows, contracted as the ``jacobian`` method does.
2. The jaxpr is re-evaluated by a small interpreter that records the other operand ``x``
   (reshaped ``(T, d_in)``) of every linear site and adds a zero *probe* to its output; the
   output cotangents ``δ`` are the per-example VJPs w.r.t. the probes (``(T, d_out)`` per
   output basis vector), from the same backward passes that give the fallback rows.
3. Per site, a FLOP model (:func:`site_costs`) picks *factored* (the Gram of ``x`` times the
   Gram of ``δ``) or *materialised* (``g = xᵀδ``, then inner products); the choice per leaf
   is in the :class:`StructuredPlan` returned by :func:`structured_plan`.

Because the per-example gradient w.r.t. a relabelled copy ``W'`` of ``W`` is a permutation
of the one w.r.t. ``W``, inner products — the kernel — are unchanged.

The plan also carries a rough cost of the existing methods (``jacobian``, ``ntk_vp``) so that
``method="auto"`` can pick the cheapest (:func:`auto_method`; docs/kernels.md).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from ntk_jax.kernels import contract
from ntk_jax.kernels.features import batch_size_of, slice_batch

PyTree = Any

# Primitives that relabel the entries of an array one-to-one (gradients are permuted, inner
# products unchanged). convert_element_type is a cast: exact in the parameter's own dtype.
_ALIAS = frozenset({"convert_element_type", "reshape", "transpose", "squeeze", "expand_dims", "copy",
                    "copy_p"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})

# A factored site whose intermediate would exceed this many scalars (and the materialised
# one's) is materialised instead.
FACTORED_MAX_SCALARS = 2 ** 27
# A site is factored only when its multiply-adds are below 1/FACTORED_MARGIN of the
# materialised ones: the factored einsum chain writes (n1, n2, ...) intermediates and runs at
# lower efficiency than one GEMM (benchmarks/ntk_speed.py, transformer + LoRA full kernel at
# n = 64: LoRA-A sites with 0.87x the materialised FLOPs ran 2x slower factored).
FACTORED_MARGIN = 2.0
# ``None``: the cost model decides per site; ``"factored"`` / ``"materialized"`` force one
# contraction for every linear site (tests and benchmarks of both paths).
FORCE_KIND: str | None = None


# --- the jaxpr interpreter ---------------------------------------------------------------


@dataclasses.dataclass
class _Site:
    """A dot_general whose one operand is (a relabelling of) parameter leaf ``leaf``."""

    leaf: int
    param_is_lhs: bool
    x_perm: tuple[int, ...]   # X operand axes → (free..., contracting...)
    T: int                    # product of X's free dims (incl. the size-1 batch axis)
    d_in: int                 # contracted size
    d_out: int                # product of W's free dims
    out_shape: tuple[int, ...]
    out_dtype: Any
    out_perm: tuple[int, ...]  # output axes → (X free..., W free...)
    # How the leaf becomes W: the relabelling primitives applied to it, in order, then W's
    # axes as (contracting..., free...) — so ``site_matrix`` maps a leaf-shaped array to the
    # ``(d_in, d_out)`` layout of the gradient ``Σ_t x_tᵀ δ_t``.
    w_chain: tuple = ()
    w_perm: tuple[int, ...] = ()


class _Interp:
    """Evaluates a jaxpr, tracking which values are relabellings of parameter leaves.

    ``mode="analyse"`` records sites and other uses; ``mode="run"`` adds ``probes[site]`` to
    the outputs of the sites in ``active`` and records their X operands in ``taps``.
    """

    def __init__(self, mode: str, active=(), probes=None):
        self.mode, self.active, self.probes = mode, frozenset(active), probes or {}
        self.counter = 0
        self.sites: dict[int, _Site] = {}
        self.other_uses: dict[int, set[str]] = {}  # leaf -> primitives using it otherwise
        self.taps: dict[int, jax.Array] = {}
        self.dot_flops = 0

    def eval(self, jaxpr, consts, args, tags, chains=None):
        """``(outputs, their leaf tags, their relabelling chains)``; ``tags[i]`` is the leaf
        index of ``args[i]`` (or ``None``), ``chains[i]`` the relabellings applied to it so far."""
        env: dict = {}
        vtags: dict = {}
        vchains: dict = {}
        chains = chains if chains is not None else [()] * len(args)

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a, t, c in zip(jaxpr.invars, args, tags, chains):
            env[v] = a
            if t is not None:
                vtags[v], vchains[v] = t, c
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            in_tags = [None if isinstance(v, jcore.Literal) else vtags.get(v) for v in eqn.invars]
            in_chains = [() if isinstance(v, jcore.Literal) else vchains.get(v, ()) for v in eqn.invars]
            name = eqn.primitive.name
            out_tags = [None] * len(eqn.outvars)
            out_chains = [()] * len(eqn.outvars)
            if name in _CALLS and "jaxpr" in eqn.params:
                closed = eqn.params["jaxpr"]
                outs, out_tags, out_chains = self.eval(closed.jaxpr, closed.consts, invals, in_tags, in_chains)
            else:
                with eqn.ctx.manager:
                    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
                self.dot_flops += _matmul_flops(eqn)
                if any(t is not None for t in in_tags):
                    if name in _ALIAS and len(eqn.invars) >= 1 and in_tags[0] is not None and len(outs) == 1:
                        out_tags = [in_tags[0]]
                        out_chains = [in_chains[0] + ((eqn.primitive, eqn.primitive.get_bind_params(eqn.params)),)]
                    elif name == "dot_general":
                        outs = [self._dot(eqn, invals, in_tags, in_chains, outs[0])]
                    elif (scaled := _scalar_scaling(name, invals, in_tags)) is not None:
                        i, factor = scaled  # W·c or W/c with a scalar c: still linear in W
                        out_tags = [in_tags[i]]
                        out_chains = [in_chains[i] + ((_SCALE, factor if self.mode == "run" else None),)]
                    else:
                        self._other(in_tags, name)
            for v, o, t, c in zip(eqn.outvars, outs, out_tags, out_chains):
                env[v] = o
                if t is not None:
                    vtags[v], vchains[v] = t, c
        live = [not isinstance(v, jcore.Literal) for v in jaxpr.outvars]
        return ([read(v) for v in jaxpr.outvars],
                [vtags.get(v) if ok else None for v, ok in zip(jaxpr.outvars, live)],
                [vchains.get(v, ()) if ok else () for v, ok in zip(jaxpr.outvars, live)])

    def _other(self, in_tags, what: str):
        for t in in_tags:
            if t is not None:
                self.other_uses.setdefault(t, set()).add(what)

    def _dot(self, eqn, invals, in_tags, in_chains, out):
        site_id = self.counter
        self.counter += 1
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if (in_tags[0] is None) == (in_tags[1] is None) or lb or rb:
            self._other(in_tags, "dot_general (batched, or of two parameters)")
            return out
        p_lhs = in_tags[0] is not None
        leaf = in_tags[0] if p_lhs else in_tags[1]
        x, w = (invals[1], invals[0]) if p_lhs else (invals[0], invals[1])
        xc, wc = (rc, lc) if p_lhs else (lc, rc)
        x_free = [d for d in range(np.ndim(x)) if d not in xc]
        w_free = [d for d in range(np.ndim(w)) if d not in wc]
        T = int(math.prod(np.shape(x)[d] for d in x_free))
        d_in = int(math.prod(np.shape(x)[d] for d in xc))
        d_out = int(math.prod(np.shape(w)[d] for d in w_free))
        nxf, nwf = len(x_free), len(w_free)
        # dot_general output axes: (lhs free..., rhs free...)
        out_perm = (tuple(range(nwf, nwf + nxf)) + tuple(range(nwf))) if p_lhs else tuple(range(nxf + nwf))
        if self.mode == "analyse":
            self.sites[site_id] = _Site(leaf, p_lhs, tuple(x_free) + tuple(xc), T, d_in, d_out,
                                        tuple(np.shape(out)), jnp.result_type(out), out_perm,
                                        in_chains[0] if p_lhs else in_chains[1], tuple(wc) + tuple(w_free))
            return out
        if site_id in self.active:
            site = self.sites[site_id]
            tap = jnp.transpose(x, site.x_perm).reshape(T, d_in)
            for entry in (in_chains[0] if site.param_is_lhs else in_chains[1]):
                if entry[0] is _SCALE:  # ∂f/∂W = c xᵀδ for W·c: the scale goes into the tap
                    tap = tap * jnp.asarray(entry[1], tap.dtype)
            self.taps[site_id] = tap
            out = out + self.probes[site_id]
        return out


_CASTS = frozenset({"convert_element_type", "copy", "copy_p"})
_SCALE = "scale"  # chain entry (_SCALE, c): the leaf multiplied by the scalar c on its way to W


def _scalar_scaling(name: str, invals, in_tags):
    """``(index of the tagged operand, factor)`` when the equation scales one parameter
    relabelling by an untagged scalar (``W * c``, ``c * W``, ``W / c``), else ``None``."""
    if name not in ("mul", "div") or len(invals) != 2 or (in_tags[0] is None) == (in_tags[1] is None):
        return None
    i = 0 if in_tags[0] is not None else 1
    other = invals[1 - i]
    if np.ndim(other) != 0 or not jnp.issubdtype(jnp.result_type(other), jnp.inexact):
        return None
    if name == "div":
        return (0, 1.0 / other) if i == 0 else None
    return i, other


def site_matrix(site: _Site, leaf_value: jax.Array) -> jax.Array:
    """``(d_in, d_out)``: a parameter-leaf-shaped array (e.g. a gradient) in the layout of the
    site's gradient ``Σ_t x_tᵀ δ_t`` — the leaf's relabellings replayed (casts skipped: the
    value keeps its dtype), then W's axes ordered (contracting..., free...). A permutation."""
    v = leaf_value
    for primitive, params in site.w_chain:
        if primitive is not _SCALE and primitive.name not in _CASTS:  # scales live in the taps
            v = primitive.bind(v, **params)
    return jnp.transpose(v, site.w_perm).reshape(site.d_in, site.d_out)


def _matmul_flops(eqn) -> int:
    """Multiply-adds of a dot_general or convolution (the rough cost model's forward pass);
    0 for every other primitive."""
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        return int(math.prod(out) * math.prod(eqn.invars[0].aval.shape[d] for d in lc))
    if eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        o_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        return int(math.prod(out) * math.prod(rhs) // max(rhs[o_dim], 1))
    return 0


# --- plan -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one parameter leaf is contracted.

    ``kind``: ``"factored"`` (Gram of x ∘ Gram of δ), ``"materialized"`` (per-example
    ``xᵀδ``), or ``"fallback"`` (per-example Jacobian rows; ``reason`` says why).
    ``T, d_in, d_out``: the linear site's shared uses, contracted and free sizes (0 for
    fallback). ``flops``: ``{"factored": .., "materialized": ..}`` multiply-adds of the
    contraction for the block shape the plan was made for.
    """

    path: str
    shape: tuple[int, ...]
    kind: str
    reason: str = ""
    T: int = 0
    d_in: int = 0
    d_out: int = 0
    flops: dict | None = None


@dataclasses.dataclass(frozen=True)
class StructuredPlan:
    """The per-leaf plan of the structured method for one block shape ``(n1, n2)``.

    ``leaves``: one :class:`LeafPlan` per parameter leaf (``jax.tree.leaves`` order);
    ``method_costs``: rough multiply-add counts of ``structured``, ``jacobian`` and
    ``ntk_vp`` for this block (:func:`site_costs`; forward ≈ Σ dot_general FLOPs of one
    example, backward ≈ 2 forwards, a JVP ≈ 2 forwards); ``auto``: the cheapest of them.
    """

    n1: int
    n2: int
    output_dim: int
    trace: bool
    leaves: tuple[LeafPlan, ...]
    forward_flops: int
    method_costs: dict
    auto: str

    def summary(self) -> dict:
        """``{kind: number of leaves}``."""
        out: dict = {}
        for leaf in self.leaves:
            out[leaf.kind] = out.get(leaf.kind, 0) + 1
        return out


def site_costs(n1: int, n2: int, O: int, T: int, d_in: int, d_out: int, trace: bool) -> dict:
    """Multiply-adds (and peak intermediate scalars) of contracting one linear site.

    factored — traced: ``n1 n2 T² (d_in + O (d_out + 1))``; full: ``n1 n2 (T² d_in +
    O T² d_out + O² T d_out)``. materialized — forming ``xᵀδ`` ``(n1 + n2) O T d_in d_out``
    plus the Gram ``n1 n2 O d_in d_out`` (traced) or ``n1 n2 O² d_in d_out`` (full).
    """
    form = (n1 + n2) * O * T * d_in * d_out
    if trace:
        fact = n1 * n2 * T * T * (d_in + O * (d_out + 1))
        fact_mem = n1 * n2 * T * T
        mat = form + n1 * n2 * O * d_in * d_out
    else:
        fact = n1 * n2 * (T * T * d_in + O * T * T * d_out + O * O * T * d_out)
        fact_mem = n1 * n2 * max(T * T, O * T * d_out)
        mat = form + n1 * n2 * O * O * d_in * d_out
    mat_mem = (n1 + n2) * O * d_in * d_out
    return {"factored": int(fact), "materialized": int(mat), "factored_scalars": int(fact_mem),
            "materialized_scalars": int(mat_mem)}


def _choose(costs: dict) -> str:
    if FORCE_KIND is not None:
        return FORCE_KIND
    too_big = costs["factored_scalars"] > max(FACTORED_MAX_SCALARS, costs["materialized_scalars"])
    cheaper = FACTORED_MARGIN * costs["factored"] <= costs["materialized"]
    return "factored" if cheaper and not too_big else "materialized"


def _example_struct(x: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(np.shape(a))[1:], jnp.result_type(a)), x)


def _analyse(f: Callable, params: PyTree, x: PyTree):
    """(closed jaxpr of f for one example, interpreter holding the sites, leaf count)."""
    p_struct = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), params)
    x_struct = _example_struct(x)
    closed = jax.make_jaxpr(f)(p_struct, x_struct)
    n_leaves = len(jax.tree.leaves(params))
    interp = _Interp("analyse")
    args = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    tags = list(range(n_leaves)) + [None] * (len(args) - n_leaves)

    def run(*a):
        outs, out_tags, _ = interp.eval(closed.jaxpr, closed.consts, a, tags)
        interp._other(out_tags, "output of f")
        return outs

    jax.eval_shape(run, *args)
    return closed, interp, n_leaves


def _linear_sites(interp: _Interp, n_leaves: int) -> dict[int, int]:
    """``{leaf: site}`` for leaves used exactly once, in one unbatched dot_general."""
    uses: dict[int, list[int]] = {}
    for s, site in interp.sites.items():
        uses.setdefault(site.leaf, []).append(s)
    return {leaf: ss[0] for leaf, ss in uses.items()
            if len(ss) == 1 and leaf not in interp.other_uses and leaf < n_leaves}


def _make_plan(f, params, x, n1, n2, O, trace):
    closed, interp, n_leaves = _analyse(f, params, x)
    linear = _linear_sites(interp, n_leaves)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    shapes = [tuple(np.shape(a)) for a in jax.tree.leaves(params)]
    leaves, choice = [], {}
    struct_cost = 0
    fb_size = 0
    for i in range(n_leaves):
        size = int(math.prod(shapes[i]))
        if i not in linear:
            n_dots = sum(s.leaf == i for s in interp.sites.values())
            others = sorted(interp.other_uses.get(i, ()))
            reason = (f"used by {', '.join(others)}" if others else
                      f"operand of {n_dots} dot_generals" if n_dots > 1 else "not used by f")
            leaves.append(LeafPlan(paths[i], shapes[i], "fallback", reason))
            fb_size += size
            continue
        s = linear[i]
        site = interp.sites[s]
        c = site_costs(n1, n2, O, site.T, site.d_in, site.d_out, trace)
        kind = _choose(c)
        choice[s] = kind
        struct_cost += c[kind]
        leaves.append(LeafPlan(paths[i], shapes[i], "factored" if kind == "factored" else "materialized",
                               T=site.T, d_in=site.d_in, d_out=site.d_out,
                               flops={"factored": c["factored"], "materialized": c["materialized"]}))
    P = sum(int(math.prod(s)) for s in shapes)
    F = max(interp.dot_flops, 1)
    backward = 3 * F * O * (n1 + n2)          # forward + O backward passes per example
    gram = n1 * n2 * (O if trace else O * O)  # per parameter
    costs = {"structured": backward + struct_cost + gram * fb_size,
             "jacobian": backward + gram * P,
             "ntk_vp": 3 * F * O * n2 + 2 * F * O * n1 * n2}
    auto = min(("structured", "jacobian", "ntk_vp"), key=lambda m: (costs[m], m != "structured"))
    if auto == "structured" and not any(k == "factored" for k in choice.values()):
        auto = "jacobian"  # nothing to gain from the structure: keep the plain method
    if contract.jaxpr_has_convolution(closed):
        # structured and ntk_vp take per-example VJPs over stacked parameters, which turn the
        # convolutions into grouped ones; jacobian keeps the parameters shared
        # (contract.uses_convolution). The FLOP counts above do not see that.
        auto = "jacobian"
    plan = StructuredPlan(n1, n2, O, trace, tuple(leaves), int(F), costs, auto)
    return plan, closed, interp, linear, choice


def structured_plan(f: Callable, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                    trace: bool = True, block_size: int | None = None) -> StructuredPlan:
    """The :class:`StructuredPlan` that ``empirical_ntk(..., method="structured")`` uses for
    these inputs: per leaf, factored / materialised / fallback, with the FLOP counts, and
    the method ``"auto"`` picks. Shapes only (nothing is computed on the data)."""
    n1 = batch_size_of(x1, "x1")
    n2 = n1 if x2 is None else batch_size_of(x2, "x2")
    if block_size is not None:
        n1, n2 = min(block_size, n1), min(block_size, n2)
    O = contract.output_size(f, params, x1)
    return _make_plan(f, params, slice_batch(x1, 0, 1), n1, n2, O, trace)[0]


# --- the kernel -----------------------------------------------------------------------------


def _factors(f, params, x, closed, interp, linear, n_leaves):
    """Per-example taps ``{site: (n, T, d_in)}`` and the per-example VJP
    ``v (n, O) -> ({site: (n, T, d_out)}, fallback rows (n, *leaf))``."""
    n = batch_size_of(x)
    p_leaves, p_def = jax.tree.flatten(params)
    x_leaves = jax.tree.leaves(x)
    fb_idx = [i for i in range(n_leaves) if i not in linear]
    active = {s: leaf for leaf, s in linear.items()}
    sites = {s: interp.sites[s] for s in active}

    def one(probes, fb, xi):
        leaves = list(p_leaves)
        for i, v in zip(fb_idx, fb):
            leaves[i] = v
        run = _Interp("run", active, probes)
        run.sites = interp.sites
        tags = list(range(n_leaves)) + [None] * len(xi)
        outs = run.eval(closed.jaxpr, closed.consts, leaves + [a[None] for a in xi], tags)[0]
        return outs[0].reshape(-1), run.taps

    probes0 = {s: jnp.zeros((n,) + site.out_shape, site.out_dtype) for s, site in sites.items()}
    fb0 = [jnp.broadcast_to(p_leaves[i], (n,) + np.shape(p_leaves[i])) for i in fb_idx]
    out, vjp, taps = jax.vjp(lambda pr, fb: jax.vmap(one)(pr, fb, x_leaves), probes0, fb0, has_aux=True)
    taps = {s: t.astype(_acc(t.dtype)) for s, t in taps.items()}  # bf16 models: contract in f32

    def cotangents(v):
        d, fb = vjp(v.astype(out.dtype))
        deltas = {}
        for s, site in sites.items():
            ds = jnp.transpose(d[s], (0,) + tuple(a + 1 for a in site.out_perm))
            deltas[s] = ds.reshape(n, site.T, site.d_out).astype(_acc(ds.dtype))
        return deltas, fb

    return taps, cotangents, out


def site_cotangents(f: Callable, params: PyTree, x: PyTree, O: int, basis_batch: int = 8) -> tuple[dict, list]:
    """The per-output backward passes of ``f(params, x) -> (n, O)``, and nothing else: for
    every output ``o``, the cotangent ``δ`` of each linear site's output ``{site: (O, n, T,
    d_out)}`` and the gradients of the other parameter leaves (leading axis O) — one forward,
    then O backward passes over the batch, no weight gradient of a linear site formed, nothing
    contracted. Every exact eNTK method needs at least these (they are the rows of the
    Jacobian's factors), so ``benchmarks/ntk_speed.py`` times this as the floor of any exact
    method on a problem. The outputs are taken ``basis_batch`` at a time (``jax.lax.map``), as
    the ``jacobian`` and ``structured`` methods take them by default. Pure and jittable."""
    closed, interp, n_leaves = _analyse(f, params, slice_batch(x, 0, 1))
    linear = _linear_sites(interp, n_leaves)
    _, cotangents, out = _factors(f, params, x, closed, interp, linear, n_leaves)
    basis = jnp.eye(O, dtype=out.dtype)
    return jax.lax.map(lambda e: cotangents(jnp.broadcast_to(e, out.shape)), basis, batch_size=basis_batch)


def _acc(dtype):
    return jnp.promote_types(dtype, jnp.float32)


# Examples per block of the triangle when a factored site's contraction is symmetric
# (x2=None; :func:`contract.num_blocks`): a plain contraction below 2 · this many examples.
# Measured with benchmarks/symmetric_contraction.py (docs/kernels.md).
STRUCTURED_BLOCK_EXAMPLES = 16


def _tap_gram(t1: jax.Array, t2: jax.Array | None) -> jax.Array:
    """``kx = Σ_c x1_itc x2_jsc`` ``(n1, n2, T, T)`` of taps ``(n, T, d_in)``; ``t2=None``:
    ``x2 = x1``, one triangle of the ``(n·T, n·T)`` Gram (:func:`contract.symmetric_gram`)."""
    if t2 is not None:
        return jnp.einsum("itc,jsc->ijts", t1, t2)
    n, T, _ = t1.shape
    return contract.symmetric_gram(t1.reshape(n * T, -1)).reshape(n, T, n, T).transpose(0, 2, 1, 3)


def _factored_site(kx: jax.Array, d1: jax.Array, d2: jax.Array | None, trace: bool) -> jax.Array:
    """One factored site's kernel from ``kx`` ``(n1, n2, T, T)`` and output cotangents ``δ``:
    traced ``Σ_{t,s,f} kx_ijts δ1_itf δ2_jsf`` → ``(n1, n2)`` with ``δ`` ``(n, T, d_out)``;
    full ``Σ kx_ijts δ1_aitf δ2_bjsf`` → ``(n1, n2, O, O)`` with ``δ`` ``(O, n, T, d_out)``.
    ``d2=None``: ``x2 = x1``, only the blocks on or above the diagonal
    (:func:`contract.symmetric_blocks`, :data:`STRUCTURED_BLOCK_EXAMPLES` examples a block)."""

    def pair(i0, i1, j0, j1, da=d1, db=d1 if d2 is None else d2):
        k = kx[i0:i1, j0:j1]
        if trace:
            return jnp.einsum("ijts,itf,jsf->ij", k, da[i0:i1], db[j0:j1])
        tmp = jnp.einsum("ijts,aitf->ijasf", k, da[:, i0:i1])
        return jnp.einsum("ijasf,bjsf->ijab", tmp, db[:, j0:j1])

    n1, n2 = kx.shape[:2]
    if d2 is None:
        return contract.symmetric_blocks(pair, n1, contract.num_blocks(n1, STRUCTURED_BLOCK_EXAMPLES))
    return pair(0, n1, 0, n2)


def structured_block(f: Callable, trace: bool, O: int, basis_batch: int) -> Callable:
    """``kernel(params, x1, x2)`` of the structured method (``x2=None``: ``x2 = x1``,
    differentiated once, and every contraction symmetric — one triangle, the kernel exactly
    symmetric); ``(n1, n2)`` traced or ``(n1, n2, O, O)``. Pure and jittable: the plan is made
    from the shapes when the function is traced."""

    def block(params, x1, x2):
        sym = x2 is None
        n1 = batch_size_of(x1)
        n2 = n1 if sym else batch_size_of(x2)
        _, closed, interp, linear, choice = _make_plan(f, params, slice_batch(x1, 0, 1), n1, n2, O, trace)
        n_leaves = len(jax.tree.leaves(params))
        taps1, cot1, out1 = _factors(f, params, x1, closed, interp, linear, n_leaves)
        taps2, cot2, out2 = (taps1, cot1, out1) if sym else _factors(f, params, x2, closed, interp,
                                                                     linear, n_leaves)
        fact = [s for s, k in choice.items() if k == "factored"]
        mat = [s for s, k in choice.items() if k == "materialized"]
        kx = {s: _tap_gram(taps1[s], None if sym else taps2[s]) for s in fact}

        if trace:
            def rows(b):
                e = jax.nn.one_hot(b, O, dtype=out1.dtype)
                d1, fb1 = cot1(jnp.broadcast_to(e, out1.shape))
                d2, fb2 = (d1, fb1) if sym else cot2(jnp.broadcast_to(e, out2.shape))
                k = jnp.zeros((n1, n2), _acc(out1.dtype)) + contract.gram(fb1, fb2)
                for s in fact:
                    k = k + _factored_site(kx[s], d1[s], None if sym else d2[s], trace=True)
                for s in mat:
                    g1 = jnp.einsum("itc,itf->icf", taps1[s], d1[s])
                    g2 = g1 if sym else jnp.einsum("itc,itf->icf", taps2[s], d2[s])
                    k = k + contract.gram(g1, g2)
                return k

            return jax.lax.map(rows, jnp.arange(O), batch_size=basis_batch).sum(axis=0)

        eye = jnp.eye(O, dtype=out1.dtype)

        def all_rows(cot, out):
            return jax.vmap(lambda e: cot(jnp.broadcast_to(e, out.shape)))(eye)  # leading axis O

        d1, fb1 = all_rows(cot1, out1)
        d2, fb2 = (d1, fb1) if sym else all_rows(cot2, out2)
        k = jnp.zeros((n1, n2, O, O), _acc(out1.dtype))
        for s in fact:
            k = k + _factored_site(kx[s], d1[s], None if sym else d2[s], trace=False)
        # Per-example Jacobian rows (n, O, *leaf) of the fallback leaves ((O, n, *leaf) here) and
        # of the materialised sites, contracted together in one GEMM (one triangle if sym).
        rows1 = [jnp.swapaxes(a, 0, 1) for a in fb1]
        rows1 += [jnp.einsum("itc,aitf->iacf", taps1[s], d1[s]).reshape(n1, O, -1) for s in mat]
        if sym:
            rows2 = rows1
        else:
            rows2 = [jnp.swapaxes(b, 0, 1) for b in fb2]
            rows2 += [jnp.einsum("itc,aitf->iacf", taps2[s], d2[s]).reshape(n2, O, -1) for s in mat]
        if rows1:
            k = k + contract.contract_jacobians(rows1, rows2, trace=False)
        return k

    return block
