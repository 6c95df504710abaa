"""The registry of model ports: everything the library needs to know about a model family,
registered by the family's own module (levanter's ``register_subclass`` pattern).

A port is one module of :mod:`ntk_jax.models` (:mod:`~ntk_jax.models.transformer`,
:mod:`~ntk_jax.models.gpt2`, :mod:`~ntk_jax.models.bert`) that calls
:func:`register_architecture` at import time with

* how to load a checkpoint whose ``config.json`` has ``model_type``: ``config_fn``,
  ``build_fn`` and ``weight_map_fn`` for :mod:`~ntk_jax.models.hf_loading`'s generic loader,
  or a complete ``load_fn`` (see :func:`register_architecture`);
* :class:`PartitionNames` — which of its modules are column- / row-parallel projections,
  token / position embeddings, or replicated (norms, heads), from which
  :func:`ntk_jax.models.sharding.default_rules` builds the partition rules;
* :class:`PeftSpec` per model class — the Hugging Face module behind each ``LoRALinear``,
  the PEFT task type and the heads PEFT saves in full (:mod:`~ntk_jax.models.peft_export`).

Nothing else lists the ports: the first lookup of an unknown ``model_type`` (or of the
partition names / PEFT spec of every port) imports every module of ``ntk_jax/models/``
(:func:`discover_ports`), so a new port is one new file there. This module imports nothing
from ``ntk_jax``, so every other module can use it without an import cycle.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from typing import Any, Callable, Iterator, Mapping, Sequence

__all__ = ["PartitionNames", "PeftModule", "PeftSpec", "Architecture", "register_architecture",
           "get_architecture", "supported_model_types", "discover_ports", "port_modules",
           "partition_names", "peft_spec", "LAZY_MODULES"]


@dataclasses.dataclass(frozen=True)
class PartitionNames:
    """A port's module names by sharding role; each entry is a regex matched against the
    components of a flat NNX path (``"q_proj"``, ``r"intermediate\\.dense"``).

    ``column``: projections whose output features are split over ``"model"`` (q/k/v, up,
    ``lm_head``); ``row``: projections whose input features are (o, down); ``vocab``: token
    embeddings ``(V, H)``; ``positions``: position / token-type embeddings ``(N, H)``;
    ``replicated``: modules whose parameters are replicated (norms, poolers, classification
    heads).
    """

    column: tuple[str, ...] = ()
    row: tuple[str, ...] = ()
    vocab: tuple[str, ...] = ()
    positions: tuple[str, ...] = ()
    replicated: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PeftModule:
    """The Hugging Face module behind one ``LoRALinear``.

    ``name``: its name in the ``transformers`` model (``model.layers.0.self_attn.q_proj``);
    ``conv1d``: GPT-2 ``Conv1D`` (weight ``(in, out)``) rather than ``nn.Linear`` (``(out, in)``).
    """

    name: str
    conv1d: bool = False


@dataclasses.dataclass(frozen=True)
class PeftSpec:
    """How one model class exports to PEFT.

    ``task_type``: PEFT's default ``task_type`` (``CAUSAL_LM``, ``SEQ_CLS``,
    ``FEATURE_EXTRACTION``); ``hf_module(model, path)``: the :class:`PeftModule` of the
    ``LoRALinear`` at dotted NNX ``path``; ``heads``: top-level modules PEFT saves in full for a
    ``SEQ_CLS`` adapter (``modules_to_save``).
    """

    task_type: str
    hf_module: Callable[[Any, str], PeftModule]
    heads: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One registered ``model_type`` (see :func:`register_architecture`); ``module``: the
    module that registered it."""

    model_type: str
    config_fn: Callable[[dict], Any] | None = None
    build_fn: Callable[..., Any] | None = None
    weight_map_fn: Callable[[Any, set[str]], Any] | None = None
    load_fn: Callable[..., Any] | None = None
    partition: PartitionNames = PartitionNames()
    peft: Mapping[type, PeftSpec] = dataclasses.field(default_factory=dict)
    module: str | None = None


_REGISTRY: dict[str, Architecture] = {}
_DISCOVERED: dict[str, str | None] = {}  # module -> None, or why importing it failed


def register_architecture(model_type: str | Sequence[str], config_fn: Callable[[dict], Any] | None = None,
                          build_fn: Callable[..., Any] | None = None,
                          weight_map_fn: Callable[[Any, set[str]], Any] | None = None, *,
                          load_fn: Callable[..., Any] | None = None, partition: PartitionNames | None = None,
                          peft: Mapping[type, PeftSpec] | None = None,
                          overwrite: bool = False) -> Architecture:
    """Registers a port for the checkpoints whose ``config.json`` has ``model_type`` (a
    string, or several sharing everything given here).

    Loading (:func:`ntk_jax.models.hf_loading.from_pretrained`) — give either

    * ``config_fn(hf_config: dict) -> config`` (a dataclass with ``dtype`` / ``param_dtype``),
      ``build_fn(config, *, rngs) -> nnx.Module`` and ``weight_map_fn(config, hf_names) ->
      WeightMap`` (the generic loader; see :mod:`~ntk_jax.models.hf_loading`), or
    * ``load_fn(path, *, dtype, param_dtype, lora, rngs, mesh, rules) -> nnx.Module`` (a
      complete loader, e.g. built on ``hf_loading.load_model``); ``config_fn`` is then
      optional and only used by ``config_from_hf``.

    ``partition``: the port's :class:`PartitionNames` (sharding rules); ``peft``: model class
    -> :class:`PeftSpec` (PEFT export). Re-registering a type raises ``ValueError`` unless
    ``overwrite=True``. Returns the (last) :class:`Architecture` registered.
    """
    types = (model_type,) if isinstance(model_type, str) else tuple(model_type)
    if not types or not all(isinstance(t, str) and t for t in types):
        raise ValueError(f"model_type must be a non-empty string (or several), got {model_type!r}")
    if load_fn is None and None in (config_fn, build_fn, weight_map_fn):
        raise ValueError(f"register_architecture({model_type!r}): give config_fn, build_fn and "
                         "weight_map_fn, or load_fn")
    taken = [t for t in types if t in _REGISTRY and not overwrite]
    if taken:
        raise ValueError(f"model_type {taken[0]!r} is already registered by {_REGISTRY[taken[0]].module} "
                         "(pass overwrite=True)")
    fn = load_fn if load_fn is not None else build_fn
    module = getattr(fn, "__module__", None)
    for t in types:
        arch = Architecture(t, config_fn, build_fn, weight_map_fn, load_fn, partition or PartitionNames(),
                            dict(peft or {}), module)
        _REGISTRY[t] = arch
    return arch


def discover_ports() -> None:
    """Imports every module of ``ntk_jax/models/`` once, so that every port has registered
    itself. A module that fails to import is remembered (and named when a ``model_type`` is
    not found) rather than raised."""
    if _DISCOVERED:
        return
    package = __name__.rpartition(".")[0]
    _DISCOVERED[__name__] = None
    for info in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))]):
        name = f"{package}.{info.name}"
        if info.name.startswith("_") or name in _DISCOVERED:
            continue
        _DISCOVERED[name] = None
        try:
            importlib.import_module(name)
        except ImportError as e:
            _DISCOVERED[name] = f"{type(e).__name__}: {e}"


def supported_model_types() -> list[str]:
    """Every ``model_type`` of every port (sorted)."""
    discover_ports()
    return sorted(_REGISTRY)


def get_architecture(model_type: str | None) -> Architecture:
    """The registry entry of ``model_type`` (ports are discovered on the first miss);
    ``ValueError`` listing the supported types otherwise."""
    if model_type not in _REGISTRY:
        discover_ports()
    if model_type not in _REGISTRY:
        failed = {m: why for m, why in _DISCOVERED.items() if why}
        note = f" (modules that failed to import: {failed})" if failed else ""
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(_REGISTRY)}{note}")
    return _REGISTRY[model_type]


def port_modules() -> dict[str, str]:
    """``model_type`` -> the module that registers it, for every port."""
    discover_ports()
    return {t: a.module for t, a in sorted(_REGISTRY.items())}


class _PortModules(Mapping):
    """:func:`port_modules` as a read-only mapping computed on access."""

    def __getitem__(self, model_type: str) -> str:
        return port_modules()[model_type]

    def __iter__(self) -> Iterator[str]:
        return iter(port_modules())

    def __len__(self) -> int:
        return len(port_modules())

    def __repr__(self) -> str:
        return f"LAZY_MODULES({port_modules()!r})"


# model_type -> module of its port (every port module is imported on first access).
LAZY_MODULES: Mapping[str, str] = _PortModules()


def partition_names() -> list[PartitionNames]:
    """The :class:`PartitionNames` of every port (each distinct one once)."""
    discover_ports()
    out: list[PartitionNames] = []
    for arch in _REGISTRY.values():
        if arch.partition not in out:
            out.append(arch.partition)
    return out


def peft_spec(model: Any) -> PeftSpec:
    """The :class:`PeftSpec` registered for ``type(model)`` (or its nearest base class);
    ``TypeError`` naming the supported classes otherwise."""
    for _ in range(2):
        specs = {cls: spec for arch in _REGISTRY.values() for cls, spec in arch.peft.items()}
        for cls in type(model).__mro__:
            if cls in specs:
                return specs[cls]
        discover_ports()
    names = sorted(c.__name__ for c in specs)
    raise TypeError(f"PEFT export supports {names}, got {type(model).__name__} (a port registers its "
                    "model classes with register_architecture(..., peft={cls: PeftSpec(...)}))")
