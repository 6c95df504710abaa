"""Memory/feasibility estimates for LoRA NTK work on large decoders, computed by XLA.

:func:`estimate_memory` takes a decoder config (a :class:`DecoderConfig` or an HF
``config.json`` dict such as :data:`LLAMA3_8B` / :data:`QWEN3_8B`), a LoRA config, a mesh
shape ``(data, model)``, a batch size and sequence length and dtypes, and returns per-device
byte counts. Nothing is allocated:

* **parameters** — the model is built with ``nnx.eval_shape`` (shapes only) at full depth;
  parameter counts and bytes are summed over its leaves, and per-device bytes over the
  per-device blocks of each leaf under the partition rules of
  :mod:`ntk_jax.models.sharding` (exact, not extrapolated);
* **forward** and **per-example-gradient feature step** — the programs (``model(ids, mask)``
  → logits, and :func:`ntk_jax.kernels.features.make_feature_fn` of the sum-of-logits scalar
  function of :func:`ntk_jax.kernels.outputs.lm_output_fn` over the LoRA factors, exact
  features ``(n, P)``) are lowered with abstract sharded arguments and compiled;
  ``compiled.memory_analysis()`` gives XLA's per-device ``temp`` (activations, gradients,
  workspace), ``argument`` and ``output`` sizes. ``programs=`` adds the other programs of a
  selection job, compiled the same way: ``"hidden"`` (mean final hidden states, the coarse
  filter's embedding), ``"loss"`` (the per-record response loss at one parameter point: the
  forward pass of the loss-change stage, :mod:`ntk_jax.selection.loss_change`, logits over the
  vocabulary included), ``"projected"`` (the NTK-Selector features: per-example gradients
  JL-projected to ``projection_dim`` on the fly, as :func:`ntk_jax.kernels.features.gradient_features`
  does when the ``(P, p)`` matrix is too big to cache), ``"jvp"`` (the JVP candidate scores of
  :func:`ntk_jax.kernels.features.directional_derivatives`) and ``"train"`` (the LoRA
  fine-tuning step of :func:`ntk_jax.training.trainer.train`: loss, gradients, AdamW update
  with its optimiser state, batch ``train_batch_size``). Compiling all 32–36 layers of an 8B model is slow on CPU,
  so the programs are compiled at ``measure_layers`` depths (default 1 and 2 layers) and the
  per-layer slope is extrapolated linearly to the full depth:
  ``q(L) = q(L1) + (L - L1) · (q(L2) - q(L1)) / (L2 - L1)``. Everything else (embeddings,
  lm_head, logits) is in the intercept. ``check_layers`` compiles one more depth to report
  the extrapolation error.

**The CPU bf16 upcast.** XLA:CPU has no native bf16 matmul: it converts every bf16 matmul
weight operand to a float32 copy, and keeps those copies (for the backward pass, or because
the weight-only converts are scheduled early), so a bf16 program compiled for the CPU holds
an extra 4 bytes per matmul-weight element of each device's (``model``-split, ``data``-gathered)
weights, which a GPU/TPU (native bf16 dots) does not: e.g. the per-layer slope of the
forward pass of Llama-3-8B on a ``(1, 4)`` mesh is 0.22 GiB, the float32 copy of a quarter of
a layer's 218 M weights being 0.20 GiB. :func:`cpu_upcast_bytes` counts these copies
exactly from the parameter shapes and the mesh; ``estimate_memory`` reports the compiled
totals (an upper bound there) and ``device_totals`` = totals minus those copies (the
GPU/TPU estimate). On a non-CPU backend nothing is subtracted.

Per-device compiled numbers need a mesh of real (or simulated) devices:
``data * model <= jax.device_count()`` (on CPU start JAX with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``). CPU buffer assignment is a proxy
for GPU/TPU (fusion and scheduling differ), so treat ``temp`` as an order-of-magnitude
estimate; the parameter columns are exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ntk_jax.data.encoding import LM_INPUTS, LM_TRAIN_INPUTS
from ntk_jax.models import sharding as sh
from ntk_jax.models.lora import LoRAConfig, apply_lora
from ntk_jax.models.transformer import DecoderConfig, DecoderLM

__all__ = ["LLAMA3_8B", "QWEN3_8B", "MODEL_CONFIGS", "PROGRAMS", "PROGRAM_BUILDERS", "ProgramInputs",
           "register_program", "decoder_config", "abstract_model",
           "param_memory", "cpu_upcast_bytes", "compiled_memory", "job_programs", "estimate_memory"]

# Hugging Face config.json values (meta-llama/Meta-Llama-3-8B, Qwen/Qwen3-8B).
LLAMA3_8B: dict[str, Any] = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu")
QWEN3_8B: dict[str, Any] = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
    hidden_act="silu")
MODEL_CONFIGS = {"Llama-3-8B": LLAMA3_8B, "Qwen3-8B": QWEN3_8B}


def decoder_config(config: DecoderConfig | Mapping[str, Any], *, dtype: str = "bfloat16",
                   param_dtype: str = "bfloat16") -> DecoderConfig:
    """A :class:`DecoderConfig` (from an HF ``config.json`` dict if needed) with the dtypes."""
    if isinstance(config, DecoderConfig):
        cfg = config
    elif isinstance(config, Mapping):
        from ntk_jax.models.hf_loading import config_from_hf

        cfg = config_from_hf(config)
    else:
        raise TypeError(f"config must be a DecoderConfig or an HF config dict, got {type(config).__name__}")
    return dataclasses.replace(cfg, dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(param_dtype).name)


def abstract_model(config: DecoderConfig, lora: LoRAConfig | None = None) -> DecoderLM:
    """``DecoderLM(config)`` with ``lora`` attached, built by ``nnx.eval_shape`` (leaves are
    ``jax.ShapeDtypeStruct``; nothing allocated)."""

    def build():
        m = DecoderLM(config, rngs=nnx.Rngs(0))
        if lora is not None:
            apply_lora(m, lora, rngs=nnx.Rngs(1))
        return m

    return nnx.eval_shape(build)


def param_memory(model: nnx.Module, mesh_shape: tuple[int, int] = (1, 1),
                 rules: sh.Rules | None = None) -> dict[str, Any]:
    """Parameter counts and bytes of a (possibly abstract) model: totals, the LoRA part, and
    the largest per-device share under a ``(data, model)`` mesh (dimensions the axis does not
    divide are replicated, as :func:`ntk_jax.models.sharding.fit_spec` does)."""
    axes = {"data": int(mesh_shape[0]), "model": int(mesh_shape[1])}
    out = {"base_params": 0, "lora_params": 0, "base_bytes": 0, "lora_bytes": 0,
           "base_bytes_per_device": 0, "lora_bytes_per_device": 0}
    for name, var in sh._flat_variables(nnx.state(model, nnx.Param)):
        shape, dtype = tuple(var.get_value().shape), jnp.dtype(var.get_value().dtype)
        spec, _ = sh.fit_spec(name, sh.spec_for(name, rules), shape, axes)
        kind = "lora" if isinstance(var, nnx.LoRAParam) else "base"
        count = int(np.prod(shape, dtype=np.int64))
        out[f"{kind}_params"] += count
        out[f"{kind}_bytes"] += count * dtype.itemsize
        out[f"{kind}_bytes_per_device"] += int(np.prod(sh.shard_shape(shape, spec, axes), dtype=np.int64)) * dtype.itemsize
    return out


def cpu_upcast_bytes(model: nnx.Module, mesh_shape: tuple[int, int] = (1, 1), dtype: str = "bfloat16",
                     rules: sh.Rules | None = None) -> int:
    """Bytes of the float32 copies XLA:CPU makes of the matmul weights of one device when the
    compute ``dtype`` is 16-bit (see the module docstring); 0 for a 32-bit compute dtype.

    Every 2-D parameter except embedding tables (which are gathered, not multiplied) is a
    matmul operand — projections, ``lm_head``, LoRA factors; its per-device block is split by
    its spec's ``"model"`` entries only (an FSDP weight is all-gathered over ``"data"``
    before its matmul)."""
    if jnp.dtype(dtype).itemsize >= 4:
        return 0
    axes = {"data": 1, "model": int(mesh_shape[1])}
    total = 0
    for name, var in sh._flat_variables(nnx.state(model, nnx.Param)):
        shape = tuple(var.get_value().shape)
        if len(shape) != 2 or name.endswith(".embedding"):
            continue
        spec, _ = sh.fit_spec(name, sh.spec_for(name, rules), shape, {"data": int(mesh_shape[0]), **axes})
        total += 4 * int(np.prod(sh.shard_shape(shape, spec, axes), dtype=np.int64))
    return total


def _mesh(mesh_shape: tuple[int, int], devices: Sequence[jax.Device] | None):
    data, model = int(mesh_shape[0]), int(mesh_shape[1])
    devs = list(jax.devices() if devices is None else devices)
    if data * model > len(devs):
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices, only {len(devs)} available "
                         "(on CPU start JAX with XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return sh.make_mesh(data, model, devices=devs[: data * model])


def _analysis(compiled) -> dict[str, int]:
    ma = compiled.memory_analysis()
    return {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}


def _opt_state_abstract(optimizer, params_abs, mesh):
    """Abstract optimiser state for ``params_abs``: moment leaves laid out as the parameter
    they mirror (matched by path suffix), counters replicated."""
    by_name = {sh.path_name(p): x.sharding for p, x in jax.tree_util.tree_leaves_with_path(params_abs)}
    state = jax.eval_shape(optimizer.init, params_abs)
    replicated = NamedSharding(mesh, P())

    def place(path, x):
        name = sh.path_name(path)
        match = [n for n in by_name if name == n or name.endswith("." + n)]
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=by_name[max(match, key=len)] if match else replicated)

    return jax.tree_util.tree_map_with_path(place, state)


@dataclasses.dataclass(frozen=True)
class ProgramInputs:
    """What a program builder compiles from: the abstract model split into ``graphdef`` /
    sharded ``state``, the sharded LM batch of ``batch_size`` rows (``lm_batch(n, train)``
    builds others), and, with LoRA, the LoRA subset's abstract parameters / template / frozen
    state and the sum-of-logits ``scalar_fn(params, frozen)`` of the feature programs."""
    graphdef: Any
    state: Any
    batch: dict
    lm_batch: Callable[..., dict]
    mesh: Any
    batch_size: int
    projection_dim: int
    train_batch_size: int | None
    subset: Any = None
    params: Any = None
    template: Any = None
    frozen: Any = None
    scalar_fn: Callable | None = None


# name -> (builder(inputs) -> memory analysis, needs LoRA). Builders run in this order.
PROGRAM_BUILDERS: dict[str, tuple[Callable[[ProgramInputs], dict[str, int]], bool]] = {}


def register_program(name: str, *, needs_lora: bool):
    """Decorator: ``builder(inputs: ProgramInputs) -> {"argument", "output", "temp", "alias"}``
    (bytes per device, :func:`_analysis` of the compiled program) under ``name``."""
    def deco(builder):
        PROGRAM_BUILDERS[name] = (builder, needs_lora)
        return builder
    return deco


def _compile(fn, *args):
    return _analysis(jax.jit(fn).lower(*args).compile())


@register_program("forward", needs_lora=False)
def _forward_program(x: ProgramInputs):
    def forward(state, batch):
        return nnx.merge(x.graphdef, state)(batch["input_ids"], attention_mask=batch["attention_mask"])

    return _compile(forward, x.state, x.batch)


@register_program("hidden", needs_lora=False)
def _hidden_program(x: ProgramInputs):
    from ntk_jax.selection.ntk_selector import mean_hidden_program

    return _analysis(mean_hidden_program.lower(x.state, x.batch["input_ids"], x.batch["attention_mask"],
                                               graphdef=x.graphdef).compile())


@register_program("features", needs_lora=True)
def _features_program(x: ProgramInputs):
    from ntk_jax.kernels.features import make_feature_fn

    def feature_step(params, frozen, batch):
        return make_feature_fn(x.scalar_fn(params, frozen)).compiled(params, batch, None)

    return _compile(feature_step, x.params, x.frozen, x.batch)


@register_program("loss", needs_lora=True)
def _loss_program(x: ProgramInputs):
    from ntk_jax.selection.ntk_selector import selection_scalar_fn

    def loss_step(params, frozen, batch):  # the loss change's forward pass (one parameter point)
        s = selection_scalar_fn(dataclasses.replace(x.subset, params=params, frozen=frozen), "loss", "mean")
        return s(params, batch)

    return _compile(loss_step, x.params, x.frozen, x.lm_batch(x.batch_size, train=True))


@register_program("projected", needs_lora=True)
def _projected_program(x: ProgramInputs):
    from ntk_jax.kernels.features import make_feature_fn
    from ntk_jax.kernels.projection import RandomProjection

    projection = RandomProjection(int(x.projection_dim))

    def projected_step(params, frozen, batch):
        return make_feature_fn(x.scalar_fn(params, frozen), projection).compiled(params, batch, None)

    return _compile(projected_step, x.params, x.frozen, x.batch)


@register_program("jvp", needs_lora=True)
def _jvp_program(x: ProgramInputs):
    def jvp_step(params, frozen, batch, tangent):
        s = x.scalar_fn(params, frozen)
        return jax.jvp(lambda p: s(p, batch), (params,), (tangent,))[1]

    return _compile(jvp_step, x.params, x.frozen, x.batch, x.params)


@register_program("train", needs_lora=True)
def _train_program(x: ProgramInputs):
    from ntk_jax.training import trainer
    from ntk_jax.training.losses import lm_loss

    cfg = trainer.step_config(trainer.TrainConfig())
    opt_abs = _opt_state_abstract(trainer.make_optimizer(cfg), x.params, x.mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.uint32)
    lowered = trainer.train_step_program.lower(x.params, opt_abs, x.template, x.frozen,
                                               x.lm_batch(x.train_batch_size or x.batch_size, train=True), scalar,
                                               jax.ShapeDtypeStruct((), jnp.int32), graphdef=x.subset.graphdef,
                                               cfg=cfg, loss_fn=lm_loss)
    return _analysis(lowered.compile())


PROGRAMS = tuple(PROGRAM_BUILDERS)


def _program_inputs(model, mesh, batch_size: int, seq_len: int, projection_dim: int,
                    train_batch_size: int | None, with_lora: bool) -> ProgramInputs:
    from ntk_jax.kernels.features import sum_of_outputs
    from ntk_jax.kernels.outputs import lm_output_fn
    from ntk_jax.models.subset import param_subset

    rows = NamedSharding(mesh, P("data"))

    def lm_batch(n, train=False):
        tok = jax.ShapeDtypeStruct((n, seq_len), jnp.int32, sharding=rows)
        return {k: tok for k in (LM_TRAIN_INPUTS if train else LM_INPUTS)}

    graphdef, state = nnx.split(model)
    x = ProgramInputs(graphdef=graphdef, state=sh.abstract_sharded_state(state, mesh), batch=lm_batch(batch_size),
                      lm_batch=lm_batch, mesh=mesh, batch_size=batch_size, projection_dim=projection_dim,
                      train_batch_size=train_batch_size)
    if not with_lora:
        return x
    subset = param_subset(model, nnx.LoRAParam)

    def scalar_fn(params, frozen):
        return sum_of_outputs(lm_output_fn(dataclasses.replace(subset, params=params, frozen=frozen)))

    template = sh.abstract_sharded_state(subset._template, mesh)
    return dataclasses.replace(x, subset=subset, params=nnx.to_pure_dict(template), template=template,
                               frozen=sh.abstract_sharded_state(subset.frozen, mesh), scalar_fn=scalar_fn)


def compiled_memory(config: DecoderConfig, lora: LoRAConfig | None, mesh, batch_size: int,
                    seq_len: int, *, programs: Sequence[str] = ("forward", "features"),
                    projection_dim: int = 8192, train_batch_size: int | None = None) -> dict[str, dict[str, int]]:
    """XLA's per-device memory analysis of ``programs`` (see :data:`PROGRAMS` and the module
    docstring; default: the forward pass and the exact per-example-gradient feature step, sum
    of masked-mean logits over every LoRA factor) for ``DecoderLM(config)`` with ``lora``,
    compiled from abstract arguments sharded over ``mesh`` (batch over ``"data"``, parameters
    by the default rules). ``batch_size`` examples per call (``train_batch_size`` for
    ``"train"``, default ``batch_size``) of ``seq_len`` tokens. Each program is built by its
    :data:`PROGRAM_BUILDERS` entry (:func:`register_program`)."""
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ValueError(f"unknown program(s) {unknown}; choose from {PROGRAMS}")
    needs_lora = sorted(p for p in set(programs) if PROGRAM_BUILDERS[p][1])
    if lora is None and needs_lora:
        raise ValueError(f"program(s) {needs_lora} take gradients over LoRA factors: pass lora")
    x = _program_inputs(abstract_model(config, lora), mesh, batch_size, seq_len, projection_dim,
                        train_batch_size, with_lora=lora is not None)
    return {name: builder(x) for name, (builder, _) in PROGRAM_BUILDERS.items() if name in programs}


def job_programs(select: Mapping[str, Any]) -> tuple[str, ...]:
    """The :data:`PROGRAMS` a selection job with the ``select`` section runs on its devices
    (method ``ntk``; other methods: the warm-up and the feature step): the warm-up step
    (``"train"``), the pool-wide stage (``"hidden"`` for the kNN filter, ``"loss"`` for the loss
    change, in either stage) and, with a gradient stage, the candidate scores (``"jvp"`` when unnormalised
    without norms, else ``"features"``: a per-example gradient) and the domain direction's
    projected features (``"projected"``, when ``projection_dim > 0``)."""
    if select.get("method", "ntk") != "ntk":
        return ("train", "features")
    n = select["ntk"]
    progs = ["train"] + {"knn": ["hidden"], "loss_change": ["loss"], "none": []}[n["filter"]]
    if n["rescore"] == "loss_change":
        progs.append("loss")
    if n["rescore"] == "gradient":
        progs.append("jvp" if n["normalize"] == "none" and not n["feature_norms"] else "features")
        if int(select.get("projection_dim") or 0) > 0:
            progs.append("projected")
    return tuple(progs)


def _extrapolate(measured: dict[int, dict], depth: int, layers: tuple[int, int]) -> dict[str, float]:
    l1, l2 = layers
    a, b = measured[l1], measured[l2]
    return {k: a[k] + (depth - l1) * (b[k] - a[k]) / (l2 - l1) for k in a}


def estimate_memory(config: DecoderConfig | Mapping[str, Any], lora: LoRAConfig | None, *,
                    mesh_shape: tuple[int, int] = (1, 1), batch_size: int = 8, seq_len: int = 512,
                    dtype: str = "bfloat16", param_dtype: str = "bfloat16",
                    measure_layers: tuple[int, int] = (1, 2), check_layers: int | None = None,
                    devices: Sequence[jax.Device] | None = None, compile: bool = True,
                    programs: Sequence[str] | None = None, projection_dim: int = 8192,
                    train_batch_size: int | None = None) -> dict[str, Any]:
    """Per-device memory of parameters, forward and per-example-gradient features (and of
    the other ``programs`` of a selection job).

    Args:
      config: a :class:`DecoderConfig` or an HF ``config.json`` dict (llama/mistral/qwen2/qwen3).
      lora: the adapters (``None``: no LoRA; then no feature step is compiled).
      mesh_shape: ``(data, model)``; the batch is split over ``data`` (``batch_size`` must be a
        multiple of it).
      batch_size, seq_len: the per-step batch (all devices together) and sequence length.
      dtype, param_dtype: compute and parameter dtypes (default bf16 / bf16).
      measure_layers: the two depths compiled; per-layer terms are extrapolated linearly.
      check_layers: also compile this depth and report ``extrapolation_check`` (measured vs
        extrapolated temp), e.g. to validate the linear model on a small config.
      compile: ``False`` gives the parameter columns only (no devices needed).
      programs: the programs to compile (:data:`PROGRAMS`); default ``("forward",
        "features")`` (``("forward",)`` without LoRA).
      projection_dim, train_batch_size: p of the ``"projected"`` program; the batch of the
        ``"train"`` step (default ``batch_size``; a multiple of the data axis).

    Returns a JSON-able dict: ``params`` (see :func:`param_memory`), ``forward`` / ``features``
    (``{"temp", "output", "argument"}`` per device, extrapolated to full depth, bytes),
    ``per_example_grad_bytes`` (the ``(n, P)`` feature output per device),
    ``total_features_per_device`` (parameters + temp + output of the feature step),
    ``totals`` (per program: argument + temp + output, i.e. everything that program holds on
    a device while it runs, its inputs — weights, LoRA factors, optimiser state, batch —
    included), ``peak_per_device`` (the largest of ``totals``: the programs run one after
    another), ``cpu_upcast_bytes`` (:func:`cpu_upcast_bytes` when compiled for the CPU, else
    0), ``device_totals`` / ``device_peak_per_device`` (the same minus those copies: the
    GPU/TPU estimate) and ``measured`` (the raw compiled numbers per depth).
    """
    cfg = decoder_config(config, dtype=dtype, param_dtype=param_dtype)
    data, model_axis = (int(v) for v in mesh_shape)
    if batch_size % data:
        raise ValueError(f"batch_size={batch_size} is not a multiple of the data axis {data}")
    if train_batch_size is not None and train_batch_size % data:
        raise ValueError(f"train_batch_size={train_batch_size} is not a multiple of the data axis {data}")
    programs = tuple(programs) if programs is not None else (("forward",) if lora is None else ("forward", "features"))
    full = abstract_model(cfg, lora)
    out: dict[str, Any] = {
        "mesh": [data, model_axis], "batch_size": batch_size, "seq_len": seq_len, "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype, "num_layers": cfg.num_layers,
        "lora": None if lora is None else {"rank": lora.rank, "targets": list(lora.targets)},
        "params": param_memory(full, (data, model_axis)), "programs": list(programs),
    }
    if "projected" in programs:
        out["projection_dim"] = int(projection_dim)
    if "train" in programs:
        out["train_batch_size"] = int(train_batch_size or batch_size)
    if not compile:
        return out
    mesh = _mesh((data, model_axis), devices)
    depths = sorted(set(measure_layers) | ({check_layers} if check_layers else set()))
    measured = {}
    for L in depths:
        if L > cfg.num_layers:
            raise ValueError(f"measure/check depth {L} exceeds the model's {cfg.num_layers} layers")
        sub = dataclasses.replace(cfg, num_layers=L, layer_types=None if cfg.layer_types is None
                                  else cfg.layer_types[:L])
        measured[L] = compiled_memory(sub, lora, mesh, batch_size, seq_len, programs=programs,
                                      projection_dim=projection_dim, train_batch_size=train_batch_size)
    layers = tuple(measure_layers)
    for prog in programs:
        out[prog] = _extrapolate({L: measured[L][prog] for L in layers}, cfg.num_layers, layers)
    out["totals"] = {prog: out[prog]["argument"] + out[prog]["temp"] + out[prog]["output"] for prog in programs}
    out["peak_per_device"] = max(out["totals"].values())
    out["peak_program"] = max(out["totals"], key=out["totals"].get)
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    out["cpu_upcast_bytes"] = cpu_upcast_bytes(full, (data, model_axis), cfg.dtype) if on_cpu else 0
    out["device_totals"] = {prog: v - out["cpu_upcast_bytes"] for prog, v in out["totals"].items()}
    out["device_peak_per_device"] = max(out["device_totals"].values())
    if "features" in programs:
        out["per_example_grad_bytes"] = out["features"]["output"]
        p = out["params"]
        out["total_features_per_device"] = (p["base_bytes_per_device"] + p["lora_bytes_per_device"]
                                            + out["features"]["temp"] + out["features"]["output"])
    if "forward" in programs:
        out["total_forward_per_device"] = (out["params"]["base_bytes_per_device"]
                                           + out["params"]["lora_bytes_per_device"]
                                           + out["forward"]["temp"] + out["forward"]["output"])
    out["measured"] = {str(L): v for L, v in measured.items()}
    if check_layers:
        check = {}
        for prog in programs:
            ext = _extrapolate({L: measured[L][prog] for L in layers}, check_layers, layers)
            got = measured[check_layers][prog]
            check[prog] = {"temp_measured": got["temp"], "temp_extrapolated": ext["temp"],
                           "output_measured": got["output"], "output_extrapolated": ext["output"]}
        out["extrapolation_check"] = {"layers": check_layers, **check}
    return out
