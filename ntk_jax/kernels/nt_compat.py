"""Import neural-tangents 0.6.5 on current JAX, without TensorFlow.

neural-tangents 0.6.5 (2023, unmaintained) is installed with ``pip install --no-deps``
(its declared dependencies pull TensorFlow and tf2jax, ~2 GB) plus ``frozendict``. On
jax 0.10 it fails to import because

* ``jax.core`` no longer exports ``Jaxpr``, ``JaxprEqn``, ``Literal``, ``Var``,
  ``Primitive``, ``get_aval`` … (moved to ``jax.extend.core`` / ``jax._src.core``);
* ``jax.util`` was removed (``safe_map``, ``safe_zip``);
* ``jax.interpreters.ad.zeros_like_p`` was removed (only used to register a
  STRUCTURED_DERIVATIVES rule);
* the package ``__init__`` imports ``neural_tangents.experimental``, which imports
  ``jax.experimental.jax2tf`` and TensorFlow.

This module patches the moved names back (only names that are *missing*; nothing present is
overwritten), and imports ``neural_tangents._src.empirical`` *without* running the
package's ``__init__`` (so ``experimental``/``stax`` and TensorFlow are never imported).
Only ``empirical_ntk_fn`` with ``JACOBIAN_CONTRACTION`` and ``NTK_VECTOR_PRODUCTS`` is
supported; ``STRUCTURED_DERIVATIVES`` does not work on current JAX and is refused here.

Usage::

    from ntk_jax.kernels import nt_compat
    kernel_fn = nt_compat.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0,
                                           implementation="jacobian_contraction")
"""
from __future__ import annotations

import enum

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Callable

_NT = "neural_tangents"
_empirical = None

class NtImplementation(str, enum.Enum):
    """The neural-tangents modes that work on current JAX, with neural-tangents'
    ``NtkImplementation`` value (STRUCTURED_DERIVATIVES, 3, does not)."""

    JACOBIAN_CONTRACTION = "jacobian_contraction"
    NTK_VECTOR_PRODUCTS = "ntk_vector_products"


# mode -> neural-tangents' NtkImplementation enum value
IMPLEMENTATIONS = {NtImplementation.JACOBIAN_CONTRACTION.value: 1, NtImplementation.NTK_VECTOR_PRODUCTS.value: 2}


class NeuralTangentsUnavailable(ImportError):
    pass


def _patch_jax() -> None:
    import jax
    import jax.core
    import jax.extend.core as ext_core
    from jax._src import core as src_core
    from jax._src import util as src_util
    from jax.interpreters import ad

    for name in ("Jaxpr", "JaxprEqn", "Literal", "Var", "Primitive", "ClosedJaxpr"):
        if not hasattr(jax.core, name):
            setattr(jax.core, name, getattr(ext_core, name))
    for name in ("ShapedArray", "Value", "AbstractValue", "get_aval", "eval_context",
                 "DShapedArray", "lattice_join"):
        if not hasattr(jax.core, name) and hasattr(src_core, name):
            setattr(jax.core, name, getattr(src_core, name))

    if "jax.util" not in sys.modules:
        util = types.ModuleType("jax.util")
        util.safe_map = src_util.safe_map
        util.safe_zip = src_util.safe_zip
        sys.modules["jax.util"] = util
        jax.util = util  # type: ignore[attr-defined]

    if not hasattr(ad, "zeros_like_p"):
        # Only referenced as a dict key of the STRUCTURED_DERIVATIVES rule tables; a fresh,
        # never-bound primitive keeps those tables well-formed.
        ad.zeros_like_p = ext_core.Primitive("ntk_jax_compat_zeros_like")


def _load_empirical():
    """Imports ``neural_tangents._src.empirical`` without the package ``__init__``."""
    global _empirical
    if _empirical is not None:
        return _empirical
    spec = importlib.util.find_spec(_NT) if _NT not in sys.modules else None
    if _NT in sys.modules:
        pkg = sys.modules[_NT]
        if not hasattr(pkg, "__path__"):
            raise NeuralTangentsUnavailable("a non-package module named neural_tangents is loaded")
    else:
        if spec is None or not spec.submodule_search_locations:
            raise NeuralTangentsUnavailable(
                "neural-tangents is not installed: pip install --no-deps neural-tangents==0.6.5 frozendict")
        _patch_jax()
        # An empty package shell: submodules resolve from the real install location, but the
        # real __init__ (which imports TensorFlow through `experimental`) never runs.
        pkg = types.ModuleType(_NT)
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = importlib.machinery.ModuleSpec(_NT, None, is_package=True)
        pkg.__spec__.submodule_search_locations = pkg.__path__
        pkg.__version__ = "0.6.5"
        sys.modules[_NT] = pkg
    _patch_jax()
    _empirical = importlib.import_module(f"{_NT}._src.empirical")
    return _empirical


def available() -> bool:
    try:
        _load_empirical()
        return True
    except ImportError:
        return False


def empirical_ntk_fn(f: Callable, *, trace_axes=(-1,), diagonal_axes=(), vmap_axes=0,
                     implementation: str = "jacobian_contraction") -> Callable:
    """neural-tangents' ``empirical_ntk_fn`` for ``f(params, x)``.

    Args:
      f: ``f(params, x) -> (n, *out_shape)``.
      trace_axes, diagonal_axes, vmap_axes: as in neural-tangents.
      implementation: ``"jacobian_contraction"`` or ``"ntk_vector_products"``.

    Returns:
      ``kernel_fn(x1, x2, params)`` from neural-tangents.
    """
    implementation = getattr(implementation, "value", implementation)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unsupported neural-tangents implementation {implementation!r}; use one of "
            f"{sorted(IMPLEMENTATIONS)} (STRUCTURED_DERIVATIVES does not work on current JAX)")
    emp = _load_empirical()
    impl = emp.NtkImplementation(IMPLEMENTATIONS[implementation])
    return emp.empirical_ntk_fn(f, trace_axes=tuple(trace_axes), diagonal_axes=tuple(diagonal_axes),
                                vmap_axes=vmap_axes, implementation=impl)
