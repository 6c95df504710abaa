"""Device-mesh sharding of the NNX ports: a ``("data", "model")`` mesh, partition rules per
parameter name, and placement of models and batches.

Axes (MaxText-style "FSDP × tensor parallel", kept small):

* ``"data"`` — the batch is split over it (:func:`ntk_jax.mesh.shard_batch`), and so is the *hidden*
  (``embed``) dimension of every large matrix (FSDP / ZeRO-3: each device stores 1/data of
  the weights; XLA all-gathers a layer's weights where it is used);
* ``"model"`` — tensor parallelism (Megatron): column-parallel projections (q/k/v, gate/up,
  GPT-2 ``c_attn``/``c_fc``, BERT query/key/value/intermediate, ``lm_head``) split their
  *output* features, row-parallel ones (o/down, GPT-2 ``c_proj``, BERT ``*.output.dense``)
  their *input* features; token embeddings split the vocabulary.

Partition rules are an ordered list of ``(regex, PartitionSpec)``; the first regex that
``re.search``-es a parameter's flat NNX path (``"layers.3.self_attn.q_proj.kernel"``) gives its
spec. The ports do not appear here: each registers its module names by role
(:class:`~ntk_jax.models.ports.PartitionNames`: column- / row-parallel projections, token and
position embeddings, replicated modules) and :func:`default_rules` builds the rules of every
registered port from them (:func:`rules_from_names`); :data:`DEFAULT_RULES` reads as those
rules, and ``rules=None`` everywhere means them:

==========================================  =================  ==========================
parameter                                   shape              spec
==========================================  =================  ==========================
token embeddings (``vocab``)                (V, H)             ("model", "data")
position / token-type embeddings            (N, H)             (None, "data")
column-parallel kernel (incl. ``lm_head``)  (H, out)           ("data", "model")
its bias                                    (out,)             ("model",)
row-parallel kernel                         (in, H)            ("model", "data")
its bias                                    (H,)               replicated
LoRA A of a row-parallel projection         (in, r)            ("model", None)
LoRA B of a column-parallel projection      (r, out)           (None, "model")
other LoRA factors                                             replicated
``replicated`` modules (norms, pooler, heads)                  replicated
==========================================  =================  ==========================

LoRA factors are small (``r·(in+out)`` per target), so they are not FSDP-sharded; the factor
whose large dimension is the one the base kernel splits over ``"model"`` is split the same
way, so the adapter's matmul needs no extra communication and its per-example gradients
(the kernel features) are split over ``"model"`` too. Non-parameter state (RNG streams) is
replicated.

Divisibility: a dimension whose size is not divisible by its mesh axis (e.g. GPT-2's vocab
50257 over 8 devices) is *replicated along that dimension* and reported in
``ShardingPlan.fallbacks``; ``strict=True`` raises ``ValueError`` naming the parameter instead.
A parameter no rule matches is a ``ValueError`` naming it (rules must be complete).

Loading: :func:`ntk_jax.models.hf_loading.from_pretrained` (``mesh=``) places each checkpoint
tensor directly into its sharded layout with ``jax.make_array_from_callback`` (each device
receives only its slice), so the whole model never sits on one device.

Jobs: :func:`mesh_from_config` builds the mesh of ``config.mesh`` over a process's local
devices (``Context.mesh``). Every batch loop that runs a model — per-example features, JVP
scores, hidden states, training, evaluation — places its batches with one mechanism, the
helpers of :mod:`ntk_jax.mesh`: the mesh is the one named or else the one the parameters live
on (``resolve_mesh``; ``None`` on one device, where nothing is placed), blocks are padded to a
multiple of the ``data`` size (``round_up_to_data``) and split over it (``place_rows``), and
other arrays a step takes (optimiser state, tangents) are put on the mesh by ``onto_mesh``.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence as _Sequence
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ntk_jax.mesh import AXES
from ntk_jax.models.ports import PartitionNames, partition_names

Rules = Sequence[tuple[str, P]]

__all__ = [
    "DEFAULT_RULES",
    "default_rules",
    "rules_from_names",
    "resolve_rules",
    "make_mesh",
    "mesh_from_config",
    "mesh_shape",
    "ShardingPlan",
    "path_name",
    "spec_for",
    "fit_spec",
    "sharding_plan",
    "shard_model",
    "abstract_sharded_state",
    "shard_shape",
    "describe_sharding",
]

def rules_from_names(names: Iterable[PartitionNames]) -> tuple[tuple[str, P], ...]:
    """The partition rules of ports with these :class:`~ntk_jax.models.ports.PartitionNames`
    (the table in the module docstring; names of all ports pooled, so the order of the ports
    does not matter)."""
    names = list(names)

    def role(field: str) -> str | None:
        alts = sorted({a for n in names for a in getattr(n, field)})
        return r"(^|\.)(" + "|".join(alts) + ")" if alts else None

    col, row, vocab, positions, replicated = (role(f) for f in ("column", "row", "vocab", "positions",
                                                               "replicated"))
    rules: list[tuple[str, P]] = []

    def add(prefix: str | None, suffix: str, spec: P) -> None:
        if prefix is not None:
            rules.append((prefix + suffix, spec))

    # LoRA factors first (their paths contain the projection name too).
    add(row, r"\.lora\.lora_a$", P("model", None))
    add(col, r"\.lora\.lora_b$", P(None, "model"))
    rules.append((r"\.lora\.lora_[ab]$", P()))
    add(replicated, r"(\.|$)", P())  # norms, poolers, classification heads
    add(row, r"\.kernel$", P("model", "data"))
    add(row, r"\.bias$", P())
    add(col, r"\.kernel$", P("data", "model"))
    add(col, r"\.bias$", P("model"))
    add(vocab, r"\.embedding$", P("model", "data"))
    add(positions, r"\.embedding$", P(None, "data"))
    return tuple(rules)


_RULES_CACHE: dict[tuple, tuple[tuple[str, P], ...]] = {}


def default_rules() -> tuple[tuple[str, P], ...]:
    """The partition rules of every registered port (:func:`rules_from_names` of
    :func:`ntk_jax.models.ports.partition_names`; the ports are imported if need be)."""
    key = tuple(partition_names())
    if key not in _RULES_CACHE:
        _RULES_CACHE[key] = rules_from_names(key)
    return _RULES_CACHE[key]


class _DefaultRules(_Sequence):
    """:func:`default_rules` as a sequence, computed when read (so it covers every port,
    including ones registered after this module was imported)."""

    def __getitem__(self, i):
        return default_rules()[i]

    def __len__(self) -> int:
        return len(default_rules())

    def __repr__(self) -> str:
        return f"DEFAULT_RULES{default_rules()!r}"


DEFAULT_RULES: Rules = _DefaultRules()


def resolve_rules(rules: Rules | None) -> Rules:
    """``rules``, or the rules of every registered port for ``None``."""
    return default_rules() if rules is None or isinstance(rules, _DefaultRules) else rules


# ---------------------------------------------------------------------------------------
# Meshes


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` of shape ``(data, model)`` with axis names ``("data", "model")``.

    ``devices``: the devices to use (default ``jax.devices()``); ``data * model`` must equal
    their number (``ValueError`` otherwise: pass ``devices=jax.devices()[:k]`` for a sub-mesh).
    On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before JAX starts)
    simulates 8 devices. All of ``jax.devices()`` are arranged by the topology helper
    (``mesh_utils.create_device_mesh``), a subset in the order given.
    """
    for name, v in (("data", data), ("model", model)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"make_mesh: {name} must be a positive int, got {v!r}")
    devs = list(jax.devices() if devices is None else devices)
    if data * model != len(devs):
        raise ValueError(f"make_mesh: data*model = {data}*{model} = {data * model} does not match the "
                         f"{len(devs)} device(s) given (pass devices=jax.devices()[:{data * model}] for a "
                         "sub-mesh; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                         "importing jax)")
    if devices is None or set(devs) == set(jax.devices()):
        try:
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh((data, model), devices=devs)
        except Exception:  # topology helpers are optional; plain order is always valid
            arr = np.array(devs, dtype=object).reshape(data, model)
    else:
        arr = np.array(devs, dtype=object).reshape(data, model)
    return Mesh(arr, AXES)


def mesh_from_config(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``(data, model)`` mesh of ``config.mesh`` over ``devices`` (default
    ``jax.local_devices()``: under ``jax.distributed`` every process builds a mesh of its own
    devices, and work is split across processes by shard assignment).

    One of ``data`` / ``model`` may be ``-1``: all the devices the other leaves
    (``data=-1, model=2`` on 8 devices is ``(4, 2)``). ``ValueError`` naming the sizes when the
    other does not divide the device count, when ``data * model`` differs from it, or for
    values that are not positive ints or -1.
    """
    devs = list(jax.local_devices() if devices is None else devices)
    n = len(devs)
    sizes = {}
    for name, v in (("data", data), ("model", model)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
            raise ValueError(f"config.mesh.{name} must be a positive int or -1 (all remaining devices), "
                             f"got {v!r}")
        sizes[name] = int(v)
    if sizes["data"] == -1 and sizes["model"] == -1:
        raise ValueError("config.mesh: at most one of data / model may be -1")
    for free, fixed in (("data", "model"), ("model", "data")):
        if sizes[free] == -1:
            if n % sizes[fixed]:
                raise ValueError(f"config.mesh.{fixed}={sizes[fixed]} does not divide the {n} local device(s) "
                                 f"(config.mesh.{free}=-1 takes the rest)")
            sizes[free] = n // sizes[fixed]
    if sizes["data"] * sizes["model"] != n:
        raise ValueError(f"config.mesh data*model = {sizes['data']}*{sizes['model']} = "
                         f"{sizes['data'] * sizes['model']} does not match the {n} local device(s) of this "
                         "process (set one of them to -1 to use all devices)")
    return make_mesh(sizes["data"], sizes["model"], devices=devs)


def mesh_shape(mesh: Mesh) -> tuple[int, int]:
    """``(data, model)`` sizes of a mesh (an axis it lacks counts as 1)."""
    return int(mesh.shape.get("data", 1)), int(mesh.shape.get("model", 1))


# ---------------------------------------------------------------------------------------
# Rules -> specs


def path_name(path: Iterable[Any]) -> str:
    """Dotted flat name of a pytree / NNX path (``DictKey``/``GetAttrKey``/plain keys; the
    trailing ``.value`` of NNX variables dropped): ``"layers.0.mlp.up_proj.kernel"``."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    if parts and parts[-1] in ("value", "raw_value"):
        parts = parts[:-1]
    return ".".join(parts)


def spec_for(name: str, rules: Rules | None = None) -> P:
    """The spec of the first rule whose regex ``re.search``-es ``name`` (``rules=None``: the
    rules of every registered port); ``ValueError`` naming the parameter when none does."""
    for pattern, spec in resolve_rules(rules):
        if re.search(pattern, name):
            return spec
    raise ValueError(f"no partition rule matches parameter {name!r}; add a (regex, PartitionSpec) "
                     "rule for it (rules must cover every parameter)")


def fit_spec(name: str, spec: P, shape: Sequence[int], mesh_axes: Mapping[str, int], *,
             strict: bool = False) -> tuple[P, list[str]]:
    """``spec`` adapted to an array of ``shape``: axes absent from the mesh or of size 1 are
    dropped, and a dimension not divisible by its axis size is replicated (``strict=True``:
    ``ValueError`` naming the parameter). Returns ``(spec, notes on fallbacks)``."""
    entries = tuple(spec)
    if len(entries) > len(shape):
        raise ValueError(f"partition spec {spec} of parameter {name!r} has {len(entries)} entries but the "
                         f"parameter has shape {tuple(shape)}")
    out, notes = [], []
    for dim, entry in enumerate(entries):
        if entry is None:
            out.append(None)
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        size = int(np.prod([mesh_axes.get(a, 1) for a in axes]))
        axes = tuple(a for a in axes if mesh_axes.get(a, 1) > 1)
        if not axes:
            out.append(None)
        elif shape[dim] % size:
            msg = (f"{name}: dim {dim} (size {shape[dim]}) is not divisible by mesh axis "
                   f"{'×'.join(axes)} (size {size})")
            if strict:
                raise ValueError(msg + "; use strict=False to replicate that dimension")
            notes.append(msg + "; replicated")
            out.append(None)
        else:
            out.append(axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out), notes


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Where every leaf of a model state goes.

    ``specs``: flat dotted name -> ``PartitionSpec`` (after :func:`fit_spec`);
    ``fallbacks``: notes for dimensions replicated because their axis does not divide them.
    """

    mesh: Mesh
    specs: dict[str, P]
    fallbacks: tuple[str, ...] = ()

    def sharding(self, name: str) -> NamedSharding:
        return NamedSharding(self.mesh, self.specs[name])


def _flat_variables(state) -> list[tuple[str, nnx.Variable]]:
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return [(path_name(p), v) for p, v in leaves]


def _state_of(model_or_state):
    return nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state


def sharding_plan(model_or_state, mesh: Mesh, rules: Rules | None = None, *,
                  strict: bool = False) -> ShardingPlan:
    """The :class:`ShardingPlan` of a model (concrete or from ``nnx.eval_shape``) or of its
    ``nnx.State``: ``nnx.Param`` leaves (LoRA factors included) by ``rules``, other state
    replicated (``rules=None``: the rules of every registered port)."""
    rules = resolve_rules(rules)
    axes = dict(mesh.shape)
    specs: dict[str, P] = {}
    notes: list[str] = []
    for name, var in _flat_variables(_state_of(model_or_state)):
        if isinstance(var, nnx.Param):
            spec, n = fit_spec(name, spec_for(name, rules), np.shape(var.get_value()), axes, strict=strict)
            notes.extend(n)
        else:
            spec = P()
        specs[name] = spec
    return ShardingPlan(mesh, specs, tuple(notes))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None, *,
                strict: bool = False) -> ShardingPlan:
    """Moves every array of ``model`` (in place) to its sharding under ``mesh``; returns the
    plan. Arrays already laid out that way are not copied."""
    state = nnx.state(model)
    plan = sharding_plan(state, mesh, rules, strict=strict)
    placed = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(x, plan.sharding(path_name(p))), state)
    nnx.update(model, placed)
    return plan


# ---------------------------------------------------------------------------------------
# Abstract (shape-only) placement, for compiling without allocating


def shard_shape(shape: Sequence[int], spec: P, mesh_axes: Mapping[str, int]) -> tuple[int, ...]:
    """The per-device block shape of an array of ``shape`` laid out as ``spec``."""
    out = list(shape)
    for dim, entry in enumerate(tuple(spec)):
        if entry is None:
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        out[dim] //= int(np.prod([mesh_axes.get(a, 1) for a in axes]))
    return tuple(out)


def abstract_sharded_state(abstract_state, mesh: Mesh, rules: Rules | None = None, *,
                           strict: bool = False):
    """An abstract state (leaves ``jax.ShapeDtypeStruct``, e.g. ``nnx.state`` of an
    ``nnx.eval_shape`` model) with each leaf's ``sharding`` set by ``rules``; for
    ``jax.jit(...).lower(...)`` without allocating."""
    plan = sharding_plan(abstract_state, mesh, rules, strict=strict)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=plan.sharding(path_name(p))),
        abstract_state)


def describe_sharding(x: jax.Array) -> dict:
    """``{"spec", "num_devices", "shard_shape"}`` of a placed array (for tests and logs)."""
    sh = x.sharding
    return {"spec": str(getattr(sh, "spec", None)), "num_devices": len(sh.device_set),
            "shard_shape": tuple(sh.shard_shape(x.shape))}
