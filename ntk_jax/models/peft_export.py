"""Export (and re-import) LoRA adapters in the PEFT layout, for use in a PyTorch stack.

A PEFT LoRA adapter is a directory with

* ``adapter_config.json`` — a ``peft.LoraConfig``: ``peft_type="LORA"``, ``r``,
  ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``layers_to_transform`` (when only
  some layers are adapted), ``bias="none"``, ``task_type``, ``fan_in_fan_out`` (GPT-2's
  ``Conv1D``), ``modules_to_save`` (the classification head of a ``SEQ_CLS`` adapter);
* ``adapter_model.safetensors`` — for every adapted module with Hugging Face name ``M``
  (e.g. ``model.layers.0.self_attn.q_proj``)::

      base_model.model.M.lora_A.weight   (r, in)   = A.T   (our LoRAAdapter.lora_a is (in, r))
      base_model.model.M.lora_B.weight   (out, r)  = B.T   (our LoRAAdapter.lora_b is (r, out))

  and, for ``SEQ_CLS``, the head's weights ``base_model.model.classifier....`` in the PyTorch
  layout (PEFT trains and saves the head in full: ``modules_to_save``).

PEFT computes ``W x + (lora_alpha / r) B_pt A_pt x`` with ``A_pt = A.T``, ``B_pt = B.T``,
which is our ``x W + (alpha / r) x A B`` transposed, so the PyTorch model with the adapter
has the Flax model's logits. For GPT-2 ``Conv1D`` (weight stored ``(in, out)``) the adapter
tensors have the same shapes; ``fan_in_fan_out=True`` only tells PEFT how to merge.

Hugging Face module names, task types and heads come from the ports: each registers a
:class:`~ntk_jax.models.ports.PeftSpec` per model class (``register_architecture(...,
peft={cls: PeftSpec(...)})``): the decoder's names are read off its weight map
(:func:`~ntk_jax.models.transformer.decoder_weight_map`: ``model.`` prefix, ``lm_head``),
GPT-2's are ``transformer.<path>`` (``Conv1D``) and ``lm_head``, BERT/RoBERTa's NNX paths are
the HF names. This module lists no model.

Public API::

    save_peft_adapter(model, directory, base_model_name_or_path=None, task_type=None) -> dict
    load_peft_adapter(model, directory) -> list[str]     # adapters set from the files
    peft_module_names(model) -> {nnx path: PeftModule}   # HF names of adaptable projections

Merging adapters into the base weights is :func:`ntk_jax.models.lora.merge_lora`.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ntk_jax.models.layers import base_params_filter, flatten_state, unflatten_state
from ntk_jax.models.lora import LoRAAdapter, LoRAConfig, LoRALinear, _layer_index, apply_lora, iter_linears
from ntk_jax.models.ports import PeftModule, peft_spec

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

__all__ = ["peft_module_names", "default_task_type", "head_modules", "save_peft_adapter",
           "load_peft_adapter", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"]


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def peft_module_names(model: nnx.Module) -> dict[tuple, PeftModule]:
    """NNX path of every :class:`LoRALinear` in ``model`` -> its Hugging Face module (by the
    :class:`~ntk_jax.models.ports.PeftSpec` its port registered; ``TypeError`` for a model
    class no port registered)."""
    spec = peft_spec(model)
    return {path: spec.hf_module(model, _dotted(path)) for path, _ in iter_linears(model)}


def default_task_type(model: nnx.Module) -> str:
    """PEFT's ``task_type`` for ``model``: ``CAUSAL_LM``, ``SEQ_CLS`` or ``FEATURE_EXTRACTION``."""
    return peft_spec(model).task_type


def head_modules(model: nnx.Module) -> list[str]:
    """Top-level module names PEFT saves in full for a ``SEQ_CLS`` adapter (its
    ``modules_to_save``): the classification head, ``["classifier"]``; ``[]`` otherwise."""
    return list(peft_spec(model).heads)


def _adapters(model: nnx.Module) -> list[tuple[tuple, LoRALinear]]:
    return [(p, lin) for p, lin in iter_linears(model) if lin.lora is not None]


def _hyper(lin: LoRALinear) -> tuple[int, float, float]:
    ad = lin.lora
    r = int(ad.lora_a[...].shape[1])
    return r, float(ad.scale) * r, 0.0 if ad.dropout is None else float(ad.dropout.rate)


def _targets_and_layers(model, adapted: list[tuple]) -> tuple[list[str], list[int] | None]:
    """``target_modules`` / ``layers_to_transform`` selecting exactly the adapted projections:
    projection names plus, when not every layer is adapted, the layer indices; if the adapted
    set is not such a product, the full HF module names (``layers_to_transform=None``)."""
    names = peft_module_names(model)
    all_paths = list(names)
    adapted_set = set(adapted)
    targets = sorted({p[-1] for p in adapted})
    layers = sorted({_layer_index(p) for p in adapted if _layer_index(p) is not None})

    def selected(layer_subset):
        return {p for p in all_paths if p[-1] in targets
                and (layer_subset is None or _layer_index(p) in layer_subset)}

    if selected(None) == adapted_set:
        return targets, None
    if layers and all(_layer_index(p) is not None for p in adapted) and selected(set(layers)) == adapted_set:
        return targets, layers
    return sorted(names[p].name for p in adapted), None


def _head_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The classification head's parameters under PEFT's ``modules_to_save`` key names
    (PyTorch layout: ``nn.Linear`` weights transposed)."""
    out = {}
    for head in head_modules(model):
        flat = flatten_state(nnx.to_pure_dict(nnx.state(getattr(model, head), base_params_filter())))
        for n, v in flat.items():
            a = np.asarray(v, np.float32)
            if n.endswith("kernel"):
                n, a = n[: -len("kernel")] + "weight", a.T
            out[PEFT_PREFIX + head + "." + n] = a
    return out


def save_peft_adapter(model: nnx.Module, directory: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None, task_type: str | None = None,
                      dtype: Any = np.float32) -> dict:
    """Writes ``model``'s LoRA adapters as a PEFT LoRA adapter directory.

    Args:
      model: a model of a port that registered a PEFT spec (:class:`DecoderLM`,
        ``GPT2LMHeadModel``, ``BertModel``, ``Bert/RobertaForSequenceClassification``) with
        adapters attached
        (:func:`~ntk_jax.models.lora.apply_lora` or ``from_pretrained(lora=...)``).
      directory: created if needed; ``adapter_config.json`` + ``adapter_model.safetensors``.
      base_model_name_or_path: recorded in the config (PEFT loads the base from it when the
        adapter is opened with ``AutoPeftModel*``); e.g. the checkpoint directory.
      task_type: PEFT task type; default by model (:func:`default_task_type`). With
        ``"SEQ_CLS"`` the classification head is exported in full (``modules_to_save``).
      dtype: dtype of the saved tensors (default float32).

    Returns the adapter config dict written. Raises ``ValueError`` if the model has no
    adapters, adapters of different rank / alpha / dropout (one ``LoraConfig`` cannot express
    them), or an adapter inside a head that PEFT saves in full.
    """
    from safetensors.numpy import save_file

    adapted = _adapters(model)
    if not adapted:
        raise ValueError("model has no LoRA adapters to export (attach them with apply_lora / lora=...)")
    hyper = {_hyper(lin) for _, lin in adapted}
    if len(hyper) != 1:
        raise ValueError(f"adapters differ in (rank, alpha, dropout) {sorted(hyper)}; a PEFT LoraConfig "
                         "holds one setting")
    (r, alpha, dropout), = hyper
    task_type = default_task_type(model) if task_type is None else task_type
    heads = head_modules(model) if task_type == "SEQ_CLS" else []
    in_head = [_dotted(p) for p, _ in adapted if str(p[0]) in heads]
    if in_head:
        raise ValueError(f"LoRA adapters inside the classification head {in_head}: PEFT trains and saves "
                         f"{heads} in full (modules_to_save); merge them first (merge_lora)")
    names = peft_module_names(model)
    tensors: dict[str, np.ndarray] = {}
    for path, lin in adapted:
        m = PEFT_PREFIX + names[path].name
        tensors[m + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(lin.lora.lora_a[...], np.float32).T)
        tensors[m + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(lin.lora.lora_b[...], np.float32).T)
    tensors.update(_head_tensors(model) if heads else {})
    tensors = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()}
    targets, layers = _targets_and_layers(model, [p for p, _ in adapted])
    conv = {names[p].conv1d for p, _ in adapted}
    if len(conv) != 1:
        raise ValueError("adapters on both Conv1D and nn.Linear modules (GPT-2 lm_head with transformer "
                         "projections): PEFT's fan_in_fan_out is one flag; export them separately")
    alpha_out: float | int = int(round(alpha)) if abs(alpha - round(alpha)) < 1e-6 else alpha
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha_out,
        "lora_dropout": dropout,
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": conv.pop(),
        "modules_to_save": heads or None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return config


def _read_adapter(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    directory = os.fspath(directory)
    cpath = os.path.join(directory, ADAPTER_CONFIG_NAME)
    wpath = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    for p in (cpath, wpath):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no {os.path.basename(p)} in {directory!r}")
    with open(cpath) as f:
        config = json.load(f)
    return config, load_file(wpath)


def load_peft_adapter(model: nnx.Module, directory: str | os.PathLike, *, rngs: nnx.Rngs | None = None) -> list[str]:
    """Sets ``model``'s LoRA factors from a PEFT LoRA adapter directory, in place.

    If ``model`` has no adapters yet they are attached first from ``adapter_config.json``
    (``r``, ``lora_alpha``, ``lora_dropout``, short ``target_modules`` names and
    ``layers_to_transform``). The adapted projections of ``model`` must then be exactly those
    in the file with the file's rank and alpha; a ``SEQ_CLS`` adapter's head weights
    (``modules_to_save``) are copied into the head too. Returns the HF module names set.

    Raises ``ValueError`` naming the problem: not a LoRA adapter, unsupported options (DoRA,
    rsLoRA, lora bias, rank/alpha patterns), modules missing on either side, wrong shapes.
    """
    config, tensors = _read_adapter(os.fspath(directory))
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory}: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    for key in ("use_dora", "use_rslora", "lora_bias"):
        if config.get(key):
            raise ValueError(f"{directory}: {key}=True is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{directory}: {key} (per-module rank/alpha) is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{directory}: bias={config.get('bias')!r} is not supported (only 'none')")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    names = peft_module_names(model)
    if not _adapters(model):
        targets = config.get("target_modules")
        if isinstance(targets, str) or not targets or any("." in t for t in targets):
            raise ValueError(f"{directory}: cannot attach adapters from target_modules={targets!r}; attach "
                             "them yourself (apply_lora) and call load_peft_adapter again")
        layers = config.get("layers_to_transform")
        layers = [layers] if isinstance(layers, int) else layers
        apply_lora(model, LoRAConfig(rank=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
                                     targets=tuple(targets), layers=None if layers is None else tuple(layers)),
                   rngs=rngs if rngs is not None else nnx.Rngs(0))
    ours = {PEFT_PREFIX + names[p].name: lin for p, lin in _adapters(model)}
    lora_keys = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}
    missing, extra = sorted(set(ours) - lora_keys), sorted(lora_keys - set(ours))
    if missing or extra:
        raise ValueError(f"{directory}: adapted modules differ: in the model but not the file "
                         f"{[m[len(PEFT_PREFIX):] for m in missing]}; in the file but not the model "
                         f"{[m[len(PEFT_PREFIX):] for m in extra]}")
    done = []
    for m, lin in sorted(ours.items()):
        mr, malpha, _ = _hyper(lin)
        if mr != r or abs(malpha - alpha) > 1e-6 * max(1.0, abs(alpha)):
            raise ValueError(f"{m}: model adapter has rank {mr}, alpha {malpha}; file has r={r}, "
                             f"lora_alpha={alpha}")
        ad: LoRAAdapter = lin.lora
        for key, param in (("lora_A", ad.lora_a), ("lora_B", ad.lora_b)):
            name = f"{m}.{key}.weight"
            if name not in tensors:
                raise ValueError(f"{directory}: missing tensor {name!r}")
            arr = tensors[name].T
            if arr.shape != param[...].shape:
                raise ValueError(f"{directory}: tensor {name!r} has shape {tensors[name].shape}, expected "
                                 f"{param[...].shape[::-1]}")
            param[...] = jnp.asarray(arr, dtype=param[...].dtype)
        done.append(m[len(PEFT_PREFIX):])
    heads = config.get("modules_to_save") or []
    head_tensors = {k: v for k, v in tensors.items() if ".lora_" not in k}
    if head_tensors:
        expected = _head_tensors(model) if head_modules(model) else {}
        unknown = sorted(set(head_tensors) - set(expected))
        if unknown:
            raise ValueError(f"{directory}: tensors {unknown} match no parameter of the model "
                             f"(modules_to_save={heads})")
        for head in head_modules(model):
            state = nnx.state(getattr(model, head), base_params_filter())
            flat = flatten_state(nnx.to_pure_dict(state))
            for n, ref in flat.items():
                hf = n[: -len("kernel")] + "weight" if n.endswith("kernel") else n
                key = PEFT_PREFIX + head + "." + hf
                if key in head_tensors:
                    arr = head_tensors[key].T if n.endswith("kernel") else head_tensors[key]
                    if arr.shape != ref.shape:
                        raise ValueError(f"{directory}: tensor {key!r} has the wrong shape {head_tensors[key].shape}")
                    flat[n] = jnp.asarray(arr, dtype=ref.dtype)
            nnx.replace_by_pure_dict(state, unflatten_state(flat))
            nnx.update(getattr(model, head), state)
    return done
