"""LoRA for NNX models: a linear layer that can carry a low-rank adapter, attaching
adapters by projection name and layer index, and merging them into the base weights.

Conventions (shared by every model in `ntk_jax.models`):

* Every projection that may take an adapter is a :class:`LoRALinear`, stored under the
  Hugging Face name of that projection (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
  ``gate_proj``, ``up_proj``, ``down_proj``; GPT-2/BERT ports use their own names).
* The layer index of a projection is the first integer in its NNX graph path
  (``('layers', 3, 'self_attn', 'q_proj')`` is layer 3), because every model keeps its blocks
  in one ``nnx.List``.
* The adapter computes ``y = x W + b + (alpha / rank) * dropout(x) A B`` with
  ``A: (in_features, rank)`` and ``B: (rank, out_features)`` stored as ``nnx.LoRAParam``
  (PEFT stores ``lora_A.weight = Aᵀ`` and ``lora_B.weight = Bᵀ``). With ``B = 0`` (the usual
  init) the adapted model equals the base model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# The LoRA target that names every projection of the blocks (PEFT's ``target_modules="all-linear"``).
ALL_LINEAR = "all-linear"


def as_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """LoRA targets as a tuple of names; a single string is one name (``"all-linear"`` stays
    whole instead of splitting into characters)."""
    return (targets,) if isinstance(targets, str) else tuple(targets)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters and how they are initialised.

    Attributes:
      rank: adapter rank r.
      alpha: scaling numerator; the update is scaled by ``alpha / rank``.
      dropout: dropout rate on the adapter's input (training mode only).
      targets: projection names, e.g. ``("q_proj", "v_proj")``, or :data:`ALL_LINEAR`
        (``"all-linear"``, PEFT's name, alone): every projection inside the model's blocks —
        attention and MLP — and not the output head, a pooler or a classifier. A single
        string is one target.
      layers: layer indices to adapt; ``None`` adapts every layer.
      b_init_std: std of the normal init of ``B``. 0 (default) is the usual LoRA init,
        which makes the gradient w.r.t. ``A`` zero at step 0; NTK experiments that need a
        non-degenerate kernel at t=0 set a small positive value and say so.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] | None = None
    b_init_std: float = 0.0

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        targets = as_targets(self.targets)
        if not targets:
            raise ValueError("LoRA targets is empty: name at least one projection, e.g. ('q_proj',)")
        if ALL_LINEAR in targets and len(targets) > 1:
            raise ValueError(f"LoRA targets {list(targets)}: {ALL_LINEAR!r} adapts every projection of the "
                             f"blocks; give it alone")
        object.__setattr__(self, "targets", targets)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, d: Any) -> "LoRAConfig":
        """Builds from a dict or ``ml_collections.ConfigDict`` (unknown keys are an error)."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LoRA config keys {sorted(unknown)}; known: {sorted(known)}")
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        if "targets" in d:
            d["targets"] = as_targets(d["targets"])
        return cls(**d)


class LoRAAdapter(nnx.Module):
    """The low-rank update ``(alpha/r) * dropout(x) @ A @ B``."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        r = config.rank
        # PEFT's default: kaiming-uniform(a=sqrt(5)) on A, i.e. U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = nnx.LoRAParam(
            jax.random.uniform(rngs.params(), (in_features, r), param_dtype, -bound, bound))
        if config.b_init_std > 0:
            b = config.b_init_std * jax.random.normal(rngs.params(), (r, out_features), param_dtype)
        else:
            b = jnp.zeros((r, out_features), param_dtype)
        self.lora_b = nnx.LoRAParam(b)
        self.scale = config.scale
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None

    def __call__(self, x: Array) -> Array:
        if self.dropout is not None:
            x = self.dropout(x)
        a = self.lora_a[...].astype(x.dtype)
        b = self.lora_b[...].astype(x.dtype)
        return (x @ a @ b) * self.scale


class LoRALinear(nnx.Module):
    """Dense layer ``x @ kernel + bias`` with an optional LoRA adapter.

    Shapes: ``kernel (in_features, out_features)``, ``bias (out_features,)``;
    input ``(..., in_features)`` → output ``(..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 kernel_init=nnx.initializers.lecun_normal()):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.lora: LoRAAdapter | None = nnx.data(None)

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = x @ self.kernel[...].astype(dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if self.lora is not None:
            y = y + self.lora(x)
        return y


def _layer_index(path: Sequence[Any]) -> int | None:
    for p in path:
        if isinstance(p, int):
            return p
    return None


def iter_linears(model: nnx.Module) -> Iterable[tuple[tuple, LoRALinear]]:
    """Yields ``(path, module)`` for every :class:`LoRALinear` in ``model``."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            yield tuple(path), node


def linear_names(model: nnx.Module) -> list[str]:
    """Sorted projection names that can take an adapter in ``model``."""
    return sorted({path[-1] for path, _ in iter_linears(model)})


def block_linear_names(model: nnx.Module) -> list[str]:
    """Sorted names of the projections inside the model's blocks (paths with a layer index):
    what :data:`ALL_LINEAR` adapts. The output head, a pooler or a classifier are not in it."""
    return sorted({path[-1] for path, _ in iter_linears(model) if _layer_index(path) is not None})


def resolve_targets(model: nnx.Module, targets: str | Iterable[str]) -> tuple[str, ...]:
    """The projection names ``targets`` selects in ``model``: :data:`ALL_LINEAR` becomes
    :func:`block_linear_names`, other names are returned as given (checked by
    :func:`apply_lora`)."""
    targets = as_targets(targets)
    if targets == (ALL_LINEAR,):
        names = block_linear_names(model)
        if not names:
            raise ValueError(f"LoRA target {ALL_LINEAR!r}: {type(model).__name__} has no projections inside "
                             f"numbered blocks")
        return tuple(names)
    return targets


def num_layers(model: nnx.Module) -> int:
    idx = [_layer_index(p) for p, _ in iter_linears(model)]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 0


def _check_targets(model: nnx.Module, targets: Iterable[str], layers: Iterable[int] | None):
    names = linear_names(model)
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; this model's projections are {names}")
    if layers is not None:
        n = num_layers(model)
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"LoRA layer indices {bad} out of range: the model has {n} layers (0..{n - 1})")


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[tuple]:
    """Attaches a fresh adapter to every targeted projection, in place (``config.targets`` of
    :data:`ALL_LINEAR`: every projection inside the blocks, :func:`resolve_targets`).

    Returns the paths of the adapted projections. Raises ``ValueError`` for a target name the
    model does not have or a layer index out of range.
    """
    targets = resolve_targets(model, config.targets)
    _check_targets(model, targets, config.layers)
    every_block_linear = config.targets == (ALL_LINEAR,)
    adapted = []
    for path, lin in iter_linears(model):
        layer = _layer_index(path)
        if path[-1] not in targets or (every_block_linear and layer is None):
            continue
        if config.layers is not None and layer not in config.layers:
            continue
        lin.lora = nnx.data(LoRAAdapter(lin.in_features, lin.out_features, config, rngs=rngs,
                                        param_dtype=lin.kernel[...].dtype))
        adapted.append(path)
    return adapted


def lora_filter(layers: Iterable[int] | None = None, targets: Iterable[str] | None = None):
    """An NNX filter selecting the LoRA factors of the given layers and projections.

    ``None`` means all. Use it as ``wrt`` of :func:`ntk_jax.models.subset.param_subset` to
    take a kernel over, say, only layer 0's ``q_proj`` adapters of a model adapted everywhere.
    """
    layers = None if layers is None else frozenset(int(i) for i in layers)
    targets = None if targets is None else frozenset(targets)

    def select(path, value) -> bool:
        if not isinstance(value, nnx.LoRAParam):
            return False
        proj = path[-3] if len(path) >= 3 else None  # (..., proj, 'lora', 'lora_a')
        if targets is not None and proj not in targets:
            return False
        if layers is not None and _layer_index(path) not in layers:
            return False
        return True

    return select


def merge_lora(model: nnx.Module) -> int:
    """Folds every adapter into its base kernel (``W += (alpha/r) A B``) and removes it.

    In place; returns the number of merged projections.
    """
    count = 0
    for _, lin in iter_linears(model):
        if lin.lora is not None:
            delta = (lin.lora.lora_a[...] @ lin.lora.lora_b[...]) * lin.lora.scale
            lin.kernel[...] = (lin.kernel[...] + delta).astype(lin.kernel[...].dtype)
            lin.lora = nnx.data(None)
            count += 1
    return count


def lora_config(**overrides):
    """The ``lora`` section of a job config (an ``ml_collections.ConfigDict`` of
    :class:`LoRAConfig` fields): r=8, α=16 on q_proj and v_proj of every layer, B = 0 at init;
    ``overrides`` on top.

    ``targets`` (projection names, or ``("all-linear",)``) and ``layers`` are tuples, so both can be set from the command line
    (``--config.<job>.lora.layers='(0,2)'``); ``layers=None`` (every layer) is kept as an
    ``ml_collections`` tuple placeholder, which the flag parser can set but not reset to
    ``None`` (omit the flag for every layer)."""
    import ml_collections

    d = dict(rank=8, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj"), layers=None, b_init_std=0.0)
    d.update(overrides)
    d["targets"] = as_targets(d["targets"])
    d["layers"] = ml_collections.config_dict.placeholder(tuple) if d["layers"] is None else tuple(d["layers"])
    return ml_collections.ConfigDict(d, type_safe=False)
