"""Load local Hugging Face checkpoints (``config.json`` + safetensors) into NNX models.

Public API::

    model = from_pretrained("/path/to/ckpt")             # dispatches on config.json's model_type
    model = from_pretrained(path, lora=LoRAConfig(rank=8, targets=("q_proj", "v_proj")))
    tok = load_tokenizer(path)                            # transformers.AutoTokenizer, local only
    cfg = config_from_hf(json.load(open(path + "/config.json")))
    tensors = load_safetensors_dir(path)                  # {hf name: np.ndarray}

Supported ``model_type`` values are those the ports register (:mod:`ntk_jax.models.ports`):
``"llama"``, ``"mistral"``, ``"qwen2"``, ``"qwen3"`` and this repo's own ``"ntk_jax_decoder"``
(:mod:`~ntk_jax.models.transformer`), ``"gpt2"`` (:mod:`~ntk_jax.models.gpt2`), ``"bert"``,
``"roberta"``, ``"xlm-roberta"``, ``"camembert"`` (:mod:`~ntk_jax.models.bert`). This module
knows none of them: it holds the machinery they register with.

Loading never initialises the model randomly: the module tree is built abstractly with
``nnx.eval_shape`` and the parameters are then filled tensor by tensor from the checkpoint
(cast to the config's ``param_dtype``, float32 unless ``param_dtype=`` says otherwise; bf16 /
fp16 / fp32 checkpoints are read with ``safetensors``' numpy backend, bf16 as
``ml_dtypes.bfloat16``). Errors are ``FileNotFoundError`` for a missing file and
``ValueError`` naming the tensor for a missing, unexpected or wrongly shaped tensor.

Sharded loading: ``from_pretrained(path, mesh=make_mesh(data, model))`` (see
:mod:`ntk_jax.models.sharding`) reads each tensor on the host, one at a time, and places it with
``jax.make_array_from_callback`` directly into the layout its partition rule gives, so no device
ever holds the whole model; LoRA factors and other state are placed after. Every port gets this
from :func:`load_model` (a ``load_fn`` receives ``mesh=`` and ``rules=`` and passes them on).

Adding a port
-------------
A port is one module of ``ntk_jax/models/`` that calls
:func:`~ntk_jax.models.ports.register_architecture` at import time (it is found by
:func:`~ntk_jax.models.ports.discover_ports` on the first lookup of an unknown type; nothing
else lists it):

* ``config_fn(hf_config: dict) -> config`` — a dataclass with ``dtype`` and ``param_dtype``
  fields (overridden by ``from_pretrained(dtype=, param_dtype=)`` via ``dataclasses.replace``);
* ``build_fn(config, *, rngs: nnx.Rngs) -> nnx.Module`` — the model constructor (run under
  ``nnx.eval_shape``; non-parameter state such as dropout RNG streams is then created by a
  jitted constructor whose parameter initialisers XLA discards);
* ``weight_map_fn(config, hf_names: set[str]) -> WeightMap`` — for every base parameter
  (``nnx.Param`` but not ``nnx.LoRAParam``, flat dotted NNX path) the HF tensor it comes from
  (:class:`TensorMap`: ``transpose=True`` for ``nn.Linear`` weights, or any ``transform``,
  e.g. a slice of a fused tensor) plus regexes of HF tensors that may be present and are
  dropped. ``hf_names`` lets the map adapt to prefixes (``model.`` / ``transformer.``);

or, instead of the last two, ``load_fn(path, *, dtype, param_dtype, lora, rngs, mesh, rules)``
(a complete loader, built on :class:`SafetensorsDir`, :func:`rename_weight_map` (a weight map
from a renaming function) and :func:`load_model` (with ``unexpected="warn"`` and fresh
initialisation of parameters a checkpoint may lack)); plus ``partition=PartitionNames(...)``
(its column- / row-parallel projections, embeddings and replicated modules, for
:func:`ntk_jax.models.sharding.default_rules`) and ``peft={ModelClass: PeftSpec(...)}`` (the HF
module of each ``LoRALinear``, for :mod:`~ntk_jax.models.peft_export`). Saving goes through
:func:`save_hf_safetensors`. ``tests/test_ports.py`` adds a port in a test file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ntk_jax.models.layers import base_params_filter, flatten_state, unflatten_state, with_dtypes
from ntk_jax.models.lora import LoRAConfig, apply_lora, iter_linears
from ntk_jax.models.ports import get_architecture

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

__all__ = [
    "TensorMap",
    "WeightMap",
    "read_hf_config",
    "config_from_hf",
    "SafetensorsDir",
    "load_safetensors_dir",
    "rename_weight_map",
    "load_weights",
    "load_model",
    "as_lora_config",
    "effective_kernels",
    "save_hf_safetensors",
    "from_pretrained",
    "load_tokenizer",
]


# ---------------------------------------------------------------------------------------
# Weight maps


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One NNX parameter taken from one HF tensor.

    ``transpose=True``: the parameter is ``tensor.T`` (PyTorch ``nn.Linear.weight`` (out, in)
    -> ``kernel`` (in, out)). ``transform``: any other ``np.ndarray -> np.ndarray`` (e.g. a
    slice of a fused qkv tensor); mutually exclusive with ``transpose``.
    """

    hf_name: str
    nnx_name: str
    transpose: bool = False
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    def __post_init__(self):
        if self.transpose and self.transform is not None:
            raise ValueError(f"TensorMap {self.hf_name!r}: give transpose or transform, not both")

    def apply(self, arr: np.ndarray) -> np.ndarray:
        if self.transpose:
            return arr.T
        if self.transform is not None:
            return self.transform(arr)
        return arr


@dataclasses.dataclass(frozen=True)
class WeightMap:
    """Every base parameter's source tensor, and HF tensors that may be present but unused."""

    tensors: tuple[TensorMap, ...]
    ignore: tuple[str, ...] = ()
    # Parameters with no tensor in this checkpoint, initialised afresh (load_weights' init_fresh).
    fresh: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------
# Files


def _check_dir(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} (with {CONFIG_NAME}) does not exist "
                                "(only local directories are supported; no hub access)")
    return path


def read_hf_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint directory as a dict."""
    path = _check_dir(path)
    cpath = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cpath):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r}")
    with open(cpath) as f:
        return json.load(f)


class SafetensorsDir:
    """Lazy read access to the tensors of a checkpoint directory: ``model.safetensors`` or
    the shards of ``model.safetensors.index.json``. Tensors come back as numpy arrays
    (``safe_open(framework="numpy")``; bf16 as ``ml_dtypes.bfloat16``)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = _check_dir(path)
        single = os.path.join(self.path, WEIGHTS_NAME)
        index = os.path.join(self.path, WEIGHTS_INDEX_NAME)
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        if os.path.isfile(single):
            files = {single: None}
        elif os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' dict")
            files = {}
            for name, shard in weight_map.items():
                spath = os.path.join(self.path, shard)
                if not os.path.isfile(spath):
                    raise FileNotFoundError(f"{index} lists shard {shard!r} (for {name!r}), which is "
                                            f"not in {self.path!r}")
                files[spath] = None
        else:
            hint = ""
            if any(os.path.isfile(os.path.join(self.path, n))
                   for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
                hint = " (only PyTorch .bin weights found: re-save them with safe_serialization=True)"
            raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {self.path!r}{hint}")
        for fpath in files:
            h = safe_open(fpath, framework="numpy")
            self._files[fpath] = h
            for name in h.keys():
                if name in self._where:
                    raise ValueError(f"tensor {name!r} is in both {self._where[name]!r} and {fpath!r}")
                self._where[name] = fpath

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._files[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        fpath = self._where[name]
        try:
            return self._files[fpath].get_tensor(name)
        except TypeError:  # a safetensors without numpy bf16 support: read the raw bytes
            return _read_raw(fpath, name)


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool"}


def _read_raw(path: str, name: str) -> np.ndarray:
    import ml_dtypes  # a jax dependency

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[name]
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    dt = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dt is None:
        raise TypeError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    dtype = ml_dtypes.bfloat16 if dt == "bfloat16" else np.dtype(dt)
    return np.frombuffer(buf, dtype=dtype).reshape(info["shape"]).copy()


def load_safetensors_dir(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` (or of the shards listed in
    ``model.safetensors.index.json``) as ``{name: np.ndarray}`` in their stored dtype
    (bf16 as ``ml_dtypes.bfloat16``)."""
    src = SafetensorsDir(path)
    return {name: src.get(name) for name in sorted(src.names)}


# ---------------------------------------------------------------------------------------
# Generic loading


def rename_weight_map(model: nnx.Module, hf_names: Iterable[str],
                      rename: Callable[[str], tuple[Sequence[str], bool]], *, ignore: Iterable[str] = (),
                      optional: Callable[[str], bool] | None = None) -> WeightMap:
    """A :class:`WeightMap` for ``model``'s base parameters from a renaming function.

    ``rename(nnx_name)`` gives the candidate HF names of a parameter (the first one in
    ``hf_names`` is used; the first one is reported if none is) and whether the tensor is
    transposed (PyTorch ``nn.Linear`` layout). Parameters for which ``optional(nnx_name)`` is
    true and that have no tensor go to ``WeightMap.fresh``. ``ignore``: as ``WeightMap.ignore``.
    """
    hf_names = set(hf_names)
    maps, fresh = [], []
    for nnx_name in flatten_state(nnx.to_pure_dict(nnx.state(model, base_params_filter()))):
        candidates, transpose = rename(nnx_name)
        hit = next((c for c in candidates if c in hf_names), None)
        if hit is None and optional is not None and optional(nnx_name):
            fresh.append(nnx_name)
            continue
        maps.append(TensorMap(candidates[0] if hit is None else hit, nnx_name, transpose=transpose))
    return WeightMap(tuple(maps), tuple(ignore), tuple(fresh))


def load_weights(model: nnx.Module, source: SafetensorsDir | Mapping[str, np.ndarray],
                 weight_map: WeightMap, *, where: str = "checkpoint", unexpected: str = "error",
                 init_fresh: Callable[[str, Any], Any] | None = None,
                 shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> None:
    """Fills every base parameter of ``model`` (possibly abstract, from ``nnx.eval_shape``)
    from ``source`` following ``weight_map``, in place, casting to each parameter's dtype.

    Raises ``ValueError`` naming the tensor(s) for missing tensors and shape mismatches (both
    shapes given), and for unexpected tensors (not used and not matched by
    ``weight_map.ignore``) with ``unexpected="error"``; ``unexpected="warn"`` reports them
    with a ``UserWarning`` instead. The parameters in ``weight_map.fresh`` are set to
    ``init_fresh(nnx_name, abstract_param)`` (called in that order).

    ``shardings``: flat NNX name -> ``jax.sharding.Sharding`` (e.g. from
    :func:`ntk_jax.models.sharding.sharding_plan`). Each tensor is then read on the host (one
    at a time) and placed with ``jax.make_array_from_callback``, every device receiving only
    its own slice (cast to the parameter dtype slice by slice), so the full model is never
    materialised on one device. Without it parameters go to the default device.
    """
    if unexpected not in ("error", "warn"):
        raise ValueError(f"unexpected must be 'error' or 'warn', got {unexpected!r}")
    if weight_map.fresh and init_fresh is None:
        raise ValueError(f"weight map has parameters to initialise {list(weight_map.fresh)} but no init_fresh")
    if isinstance(source, Mapping):
        tensors = dict(source)
        names, shape_of, get = set(tensors), (lambda n: tuple(tensors[n].shape)), tensors.__getitem__
    else:
        names, shape_of, get = source.names, source.shape, source.get
    state = nnx.state(model, base_params_filter())
    expected = flatten_state(nnx.to_pure_dict(state))
    by_nnx: dict[str, TensorMap | None] = {}
    for t in weight_map.tensors + tuple(weight_map.fresh):
        n = t if isinstance(t, str) else t.nnx_name
        if n in by_nnx:
            raise ValueError(f"weight map gives parameter {n!r} twice")
        by_nnx[n] = t
    unmapped, unknown = sorted(set(expected) - set(by_nnx)), sorted(set(by_nnx) - set(expected))
    if unmapped or unknown:
        raise ValueError(f"weight map does not match {type(model).__name__}: parameters without a source "
                         f"tensor {unmapped}; mapped names the model lacks {unknown}")
    missing = sorted({t.hf_name for t in weight_map.tensors if t.hf_name not in names})
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {missing}")
    ignore = [re.compile(p) for p in weight_map.ignore]
    used = {t.hf_name for t in weight_map.tensors}
    unused = sorted(n for n in names - used if not any(r.search(n) for r in ignore))
    if unused and unexpected == "error":
        raise ValueError(f"{where}: unexpected tensor(s) {unused} (not used by {type(model).__name__}; "
                         "does config.json match the weights?)")
    if unused:
        shown = unused if len(unused) <= 10 else unused[:10] + [f"... ({len(unused) - 10} more)"]
        warnings.warn(f"{where}: checkpoint tensors not used by {type(model).__name__}: {shown}",
                      stacklevel=3)
    # Shapes from the headers first, so a mismatch is reported before anything is read.
    for t in weight_map.tensors:
        if t.transform is None:
            want = tuple(expected[t.nnx_name].shape)
            want = want[::-1] if t.transpose else want
            got = shape_of(t.hf_name)
            if got != want:
                raise ValueError(f"{where}: tensor {t.hf_name!r} has shape {got}, expected {want} "
                                 f"(-> parameter {t.nnx_name!r}; does config.json match the weights?)")
    loaded: dict[str, Any] = {}
    cache: tuple[str, np.ndarray] | None = None
    for t in sorted(weight_map.tensors, key=lambda t: t.hf_name):
        if cache is None or cache[0] != t.hf_name:
            cache = (t.hf_name, get(t.hf_name))
        arr = t.apply(cache[1])
        ref = expected[t.nnx_name]
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"{where}: tensor {t.hf_name!r} (shape {tuple(cache[1].shape)}) converts to shape "
                             f"{tuple(arr.shape)}, expected {tuple(ref.shape)} for parameter {t.nnx_name!r}")
        loaded[t.nnx_name] = _place(arr, ref.dtype, None if shardings is None else shardings[t.nnx_name])
    cache = None
    for n in weight_map.fresh:
        loaded[n] = jnp.asarray(init_fresh(n, expected[n]), dtype=expected[n].dtype)
        if shardings is not None:
            loaded[n] = jax.device_put(loaded[n], shardings[n])
    nnx.replace_by_pure_dict(state, unflatten_state(loaded))
    nnx.update(model, state)


def _place(arr: np.ndarray, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Host tensor -> device array of ``dtype``: on the default device, or laid out as
    ``sharding`` with each device given only its slice (``make_array_from_callback``)."""
    if sharding is None:
        return jnp.asarray(np.asarray(arr).astype(dtype, copy=False))
    arr = np.asarray(arr)
    return jax.make_array_from_callback(
        arr.shape, sharding, lambda index: np.ascontiguousarray(arr[index]).astype(dtype, copy=False))


def _place_model(model: nnx.Module, mesh: Any, rules: Any) -> None:
    """Places all of ``model``'s state (LoRA factors, RNG streams, ...) by ``rules``; arrays
    already in place are not copied."""
    from ntk_jax.models import sharding as _sh

    _sh.shard_model(model, mesh, rules)


def as_lora_config(lora: Any) -> LoRAConfig | None:
    """``lora`` (a :class:`LoRAConfig`, its dict, or ``None``) as a ``LoRAConfig`` or ``None``."""
    if lora is None or isinstance(lora, LoRAConfig):
        return lora
    if isinstance(lora, Mapping) or hasattr(lora, "keys"):
        return LoRAConfig.from_dict(lora)
    raise TypeError(f"lora must be a LoRAConfig, a dict or None, got {type(lora).__name__}")


def load_model(build_fn: Callable[..., nnx.Module], config: Any, source: SafetensorsDir,
               weight_map_fn: Callable[[nnx.Module, set[str]], WeightMap], *,
               rngs: nnx.Rngs | None = None, lora: LoRAConfig | Mapping | None = None,
               unexpected: str = "error", init_fresh: Callable[[str, Any], Any] | None = None,
               mesh: Any = None, rules: Any = None) -> nnx.Module:
    """``build_fn(config, rngs=...)`` built abstractly, its parameters loaded from ``source``
    following ``weight_map_fn(abstract_model, source.names)`` (see :func:`load_weights` for
    ``unexpected`` and ``init_fresh``), its non-parameter state initialised, and LoRA
    adapters attached if ``lora`` is given (with ``rngs``, default ``nnx.Rngs(0)``).

    ``mesh`` (a ``("data", "model")`` :class:`jax.sharding.Mesh`, see
    :func:`ntk_jax.models.sharding.make_mesh`): every checkpoint tensor is placed straight
    into its sharding by ``rules`` (default: the rules of every registered port,
    :func:`~ntk_jax.models.sharding.default_rules`; a dimension its mesh axis does
    not divide is replicated), and the LoRA factors (created on the default device; they are
    small) and the non-parameter state are then placed too."""
    lcfg = as_lora_config(lora)
    model = nnx.eval_shape(lambda: build_fn(config, rngs=nnx.Rngs(0)))
    shardings = None
    if mesh is not None:
        from ntk_jax.models import sharding as _sh

        plan = _sh.sharding_plan(nnx.state(model, base_params_filter()), mesh, rules)
        shardings = {n: plan.sharding(n) for n in plan.specs}
    load_weights(model, source, weight_map_fn(model, source.names), where=source.path,
                 unexpected=unexpected, init_fresh=init_fresh, shardings=shardings)
    rest = nnx.state(model, nnx.Not(base_params_filter()))
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(rest)):
        # Non-parameter state (e.g. dropout RNG streams): run the constructor under jit and
        # keep only that state; XLA drops the unused parameter initialisers.
        @nnx.jit
        def make_rest(r):
            return nnx.state(build_fn(config, rngs=r), nnx.Not(base_params_filter()))

        nnx.update(model, make_rest(rngs if rngs is not None else nnx.Rngs(0)))
    left = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))
            if isinstance(x, jax.ShapeDtypeStruct)]
    if left:
        raise RuntimeError(f"state left uninitialised after loading: {left}")
    if lcfg is not None:
        apply_lora(model, lcfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
    if mesh is not None:
        _place_model(model, mesh, rules)
    return model


def effective_kernels(model: nnx.Module) -> dict[str, jax.Array]:
    """Flat NNX name -> value of every base parameter, with LoRA adapters folded into their
    kernels (``W + (alpha/r) A B``); the model is not modified."""
    flat = flatten_state(nnx.to_pure_dict(nnx.state(model, base_params_filter())))
    for path, lin in iter_linears(model):
        if lin.lora is not None:
            name = ".".join(str(p) for p in path) + ".kernel"
            delta = (lin.lora.lora_a[...] @ lin.lora.lora_b[...]) * lin.lora.scale
            flat[name] = (flat[name] + delta).astype(flat[name].dtype)
    return flat


def save_hf_safetensors(tensors: Mapping[str, Any], config: dict, directory: str | os.PathLike, *,
                        weights_format: str = "pt") -> None:
    """Writes ``config.json`` and ``model.safetensors`` (numpy arrays, bf16 as
    ``ml_dtypes.bfloat16``; ``format`` metadata ``"pt"`` so ``transformers`` loads it)."""
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(arrays, os.path.join(directory, WEIGHTS_NAME), metadata={"format": weights_format})


def config_from_hf(hf_config: Mapping[str, Any]) -> Any:
    """The model config for a ``config.json`` dict, by its ``model_type`` (the registered
    port's ``config_fn``). ``ValueError`` for an unsupported type or setting."""
    d = dict(hf_config)
    mt = d.get("model_type")
    arch = get_architecture(mt)
    if arch.config_fn is None:
        raise ValueError(f"model_type {mt!r} is registered without a config converter")
    return arch.config_fn(d)


def from_pretrained(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
                    lora: LoRAConfig | Mapping | None = None, rngs: nnx.Rngs | None = None,
                    mesh: Any = None, rules: Any = None) -> nnx.Module:
    """Loads the checkpoint in directory ``path`` into an NNX model.

    Args:
      path: a local directory with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``), e.g. written by ``transformers``' ``save_pretrained``.
      dtype: compute dtype (default: the config's, float32 for HF checkpoints).
      param_dtype: parameter dtype (default float32 whatever the checkpoint's dtype; pass
        ``"bfloat16"`` to keep a bf16 checkpoint in bf16).
      lora: a :class:`~ntk_jax.models.lora.LoRAConfig` (or dict): adapters attached after
        loading (with ``B = 0`` the model's logits are the checkpoint's).
      rngs: random streams for the LoRA factors and any non-parameter state (default
        ``nnx.Rngs(0)``).
      mesh: a ``("data", "model")`` :class:`jax.sharding.Mesh`
        (:func:`ntk_jax.models.sharding.make_mesh`): every tensor is read from the checkpoint
        on the host, one at a time, and placed directly into its sharded layout (each device
        gets only its slice; the full model is never on one device), then the LoRA factors
        and any other state are placed. ``None``: everything on the default device.
      rules: partition rules ``[(regex, PartitionSpec), ...]`` (default: the rules of every
        registered port, :func:`ntk_jax.models.sharding.default_rules`).

    Raises ``FileNotFoundError`` (missing directory / file), ``ValueError`` (unsupported
    ``model_type`` or setting; missing, unexpected or wrongly shaped tensor, named).
    """
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see ntk_jax.models.sharding.make_mesh), "
                        f"got {type(mesh).__name__}")
    path = _check_dir(path)
    hf = read_hf_config(path)
    arch = get_architecture(hf.get("model_type"))
    lcfg = as_lora_config(lora)
    if arch.load_fn is not None:
        model = arch.load_fn(path, dtype=dtype, param_dtype=param_dtype, lora=lcfg, rngs=rngs, mesh=mesh,
                             rules=rules)
        if mesh is not None:
            _place_model(model, mesh, rules)  # no-op for arrays the loader already placed
        return model
    config = with_dtypes(arch.config_fn(hf), dtype, param_dtype)
    return load_model(arch.build_fn, config, SafetensorsDir(path),
                      lambda _model, names: arch.weight_map_fn(config, names), rngs=rngs, lora=lcfg,
                      mesh=mesh, rules=rules)


def load_tokenizer(path: str | os.PathLike, **kwargs):
    """``transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)``."""
    from transformers import AutoTokenizer

    path = _check_dir(path)
    kwargs.setdefault("local_files_only", True)
    return AutoTokenizer.from_pretrained(path, **kwargs)
