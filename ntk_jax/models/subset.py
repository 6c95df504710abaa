"""Take an NNX model's parameters as a subset: ``θ_train`` (a plain pytree the kernel and
the optimiser see) and ``θ_frozen`` (everything else, closed over).

    subset = param_subset(model, wrt=lora_filter(layers=[0], targets=["q_proj"]))
    f = subset.apply_fn(lambda m, x: m(x["input_ids"]))   # f(params, x)
    K = empirical_ntk(f, subset.params, x)

``subset.params`` is a nested dict of arrays (``nnx.to_pure_dict(state)``), so it works with
any pytree code — ``jax.vjp``, optax, neural-tangents, orbax.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

PyTree = Any


def _count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def merge_params(graphdef, template, params: PyTree, frozen) -> nnx.Module:
    """Rebuilds a model from its graphdef, the selected parameters as a pure dict (laid into
    a copy of the ``template`` state) and the ``frozen`` state (also copied).

    Copying makes fresh Variable containers at the current trace level, so the model may
    update its own state (e.g. RNG counters of dropout) inside ``jax.grad``/``jit`` even
    when ``template``/``frozen`` came from an outer trace.
    """
    state = jax.tree.map(lambda v: v, template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, jax.tree.map(lambda v: v, frozen))


@dataclasses.dataclass(frozen=True)
class ParamSubset:
    """A model split into trainable parameters and the rest.

    Attributes:
      graphdef: the model's static structure.
      params: the selected parameters, a nested dict of arrays (``θ_train``).
      frozen: every other state of the model (``nnx.State``), held fixed.
    """

    graphdef: Any
    params: PyTree
    frozen: Any
    _template: Any

    @property
    def num_params(self) -> int:
        """P, the number of scalar parameters in ``params``."""
        return _count(self.params)

    def merge(self, params: PyTree) -> nnx.Module:
        """A model with ``params`` substituted for the selected parameters (pure; traceable)."""
        return merge_params(self.graphdef, self._template, params, self.frozen)

    def apply_fn(self, call: Callable[[nnx.Module, PyTree], jax.Array]) -> Callable[[PyTree, PyTree], jax.Array]:
        """Wraps ``call(model, x)`` as ``f(params, x)`` over the selected parameters."""

        def f(params, x):
            return call(self.merge(params), x)

        return f

    def update_model(self, model: nnx.Module, params: PyTree) -> None:
        """Writes ``params`` back into ``model`` in place."""
        state = jax.tree.map(lambda v: v, self._template)
        nnx.replace_by_pure_dict(state, params)
        nnx.update(model, state)


def param_subset(model: nnx.Module, wrt: Any = nnx.LoRAParam) -> ParamSubset:
    """Splits ``model`` by the NNX filter ``wrt`` (default: every LoRA factor).

    Raises ``ValueError`` if the filter selects no parameter (for example a LoRA filter on a
    model without adapters, or on layers that have none).
    """
    graphdef, selected, frozen = nnx.split(model, wrt, ...)
    params = nnx.to_pure_dict(selected)
    if not jax.tree.leaves(params):
        raise ValueError(
            f"parameter subset is empty: filter {wrt!r} selects no parameter of "
            f"{type(model).__name__} (does the model carry LoRA adapters on those layers/projections?)")
    return ParamSubset(graphdef=graphdef, params=params, frozen=frozen, _template=selected)
