"""``jax.jit`` for programs that close over large arrays: they become arguments, not constants.

The library's programs are closures: ``f = lm_output_fn(subset)`` closes over the model's
frozen weights (``subset.frozen``), and the feature, score and kernel programs close over
``f``. ``jax.jit`` embeds every closed-over array in the compiled program as a constant
(JAX's default, ``JAX_USE_SIMPLIFIED_JAXPR_CONSTANTS`` off): the weights are copied into
the HLO module, XLA's constant folding runs over them, a sharded weight is replicated, and an
8B model (16 GB of bf16 weights) cannot be compiled at all (a module over 2 GB does not
serialise). :func:`jit_constants_as_args` compiles the same program with those arrays passed
as arguments, where they stay on their devices with their shardings, shared and uncopied:

    fn = jit_constants_as_args(lambda params, x: f(params, x))
    fn(params, x)           # same values as jax.jit(...)(params, x)

How: per input signature (pytree structure and avals of the arguments) the function is
traced once with ``jax.make_jaxpr``; its closed-over device arrays (``jax.Array``) over
:data:`EMBED_MAX_BYTES` are hoisted and passed to a ``jax.jit`` that evaluates the jaxpr.
Smaller ones stay embedded (XLA may fold them), and so do host (numpy) arrays: as arguments
they would be copied to the device on every call, embedded they are copied once. Called with
tracers (inside an enclosing transformation), it behaves as ``jax.jit(fun)``: nothing is
compiled separately there.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np

EMBED_MAX_BYTES = 1 << 16  # closed-over arrays up to 64 KiB stay constants of the program
_INPUT_KWARGS = frozenset({"in_shardings", "static_argnums", "static_argnames", "donate_argnums",
                           "donate_argnames"})
_HOISTED = object()


class _Program:
    """One traced signature: the jaxpr, its embedded constants (``_HOISTED`` where hoisted)
    and the output pytree structure. Hashed by identity (a static argument of the jit)."""

    def __init__(self, jaxpr, consts: list, out_tree):
        self.jaxpr, self.consts, self.out_tree = jaxpr, consts, out_tree


def _evaluate(program: _Program, hoisted: list, *args):
    it = iter(hoisted)
    consts = [next(it) if c is _HOISTED else c for c in program.consts]
    out = jax.core.eval_jaxpr(program.jaxpr, consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(program.out_tree, out)


def _nbytes(c: Any) -> int:
    return int(np.prod(np.shape(c), dtype=np.int64)) * np.dtype(getattr(c, "dtype", np.float64)).itemsize \
        if hasattr(c, "dtype") else 0


def _is_tracer(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


class ConstantsAsArgs:
    """The compiled form of ``fun`` returned by :func:`jit_constants_as_args` (callable like
    ``jax.jit(fun)``; ``lower(*args)`` for cost / memory analysis)."""

    def __init__(self, fun: Callable, jit_kwargs: dict, embed_max_bytes: int, max_signatures: int):
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._plain = jax.jit(fun, **jit_kwargs)
        self._jitted = jax.jit(_evaluate, static_argnums=0, **jit_kwargs)
        self._embed_max_bytes = int(embed_max_bytes)
        self._max_signatures = int(max_signatures)
        self._programs: dict = {}

    def _program(self, args) -> tuple[_Program, list]:
        key = (jax.tree.structure(args), tuple(jax.typeof(leaf) for leaf in jax.tree.leaves(args)))
        hit = self._programs.get(key)
        if hit is None:
            closed, out_shape = jax.make_jaxpr(self._fun, return_shape=True)(*args)
            hoist = [isinstance(c, jax.Array) and _nbytes(c) > self._embed_max_bytes for c in closed.consts]
            program = _Program(closed.jaxpr, [_HOISTED if h else c for c, h in zip(closed.consts, hoist)],
                               jax.tree.structure(out_shape))
            hit = (program, [c for c, h in zip(closed.consts, hoist) if h])
            if len(self._programs) >= self._max_signatures:
                self._programs.pop(next(iter(self._programs)))
            self._programs[key] = hit
        return hit

    def hoisted_constants(self, *args) -> list:
        """The closed-over arrays passed as arguments for this signature (for inspection)."""
        return list(self._program(args)[1])

    def __call__(self, *args):
        if _is_tracer(args):
            return self._plain(*args)
        program, hoisted = self._program(args)
        return self._jitted(program, hoisted, *args)

    def lower(self, *args):
        """``jax.stages.Lowered`` of the program for ``args`` (hoisted constants as leading
        arguments)."""
        if _is_tracer(args):
            return self._plain.lower(*args)
        program, hoisted = self._program(args)
        return self._jitted.lower(program, hoisted, *args)


def jit_constants_as_args(fun: Callable | None = None, *, embed_max_bytes: int = EMBED_MAX_BYTES,
                          max_signatures: int = 16, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)`` with the arrays ``fun`` closes over passed to the
    compiled program as arguments (module docstring). Usable as a decorator, bare or with
    keyword arguments.

    Args:
      fun: the function; positional arguments only (no static arguments: close over
        Python values instead).
      embed_max_bytes: closed-over arrays up to this size stay embedded constants.
      max_signatures: traced input signatures kept (oldest dropped first).
      **jit_kwargs: passed to ``jax.jit`` — output-side options such as ``out_shardings``;
        options about the inputs (``in_shardings``, ``static_argnums``, ``donate_argnums``,
        ...) are refused, since the compiled program's inputs are the hoisted constants
        followed by the arguments.
    """
    bad = sorted(set(jit_kwargs) & _INPUT_KWARGS)
    if bad:
        raise TypeError(f"jit_constants_as_args does not take {bad}: the compiled program's inputs are "
                        "the hoisted constants followed by the arguments (close over static values)")
    if fun is None:
        return functools.partial(jit_constants_as_args, embed_max_bytes=embed_max_bytes,
                                 max_signatures=max_signatures, **jit_kwargs)
    return ConstantsAsArgs(fun, jit_kwargs, embed_max_bytes, max_signatures)
