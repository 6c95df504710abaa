"""Memory preflight: before a job's experiments load the model, the per-device peak of the
programs they will run is estimated and compared with the device memory, so that a job that
cannot fit stops at once, not with an out-of-memory error after loading and the warm-up.

The estimate is :func:`ntk_jax.launcher.memory.estimate_memory` (docs/memory.md, docs/scale.md):
every program an experiment declares is compiled from abstract arguments (nothing allocated)
for the job's own mesh, batch sizes, sequence length and dtypes, at 1 and 2 layers and
extrapolated to the model's depth; a program's total is its arguments (weights, LoRA factors,
optimiser state, batch) + temporaries + outputs per device. An experiment declares its
programs with ``memory_plan(config) -> MemoryPlan | None`` (``experiments/select.py``).

``config.preflight``:

* ``enabled`` — ``False`` skips the check;
* ``device_memory_gib`` — ``0``: the device's own memory (``memory_stats()["bytes_limit"]`` of
  an accelerator; a CPU has none, so there the check runs only when this is set, e.g. to a
  fake small device in a test);
* ``fraction`` — the share of the device memory the estimate may take (the rest is headroom
  for what the estimate leaves out: buffers of the runtime, fragmentation).

When a program does not fit, :class:`DoesNotFit` names the experiment, the program, its
estimate, the device memory, and settings that would fit: smaller batches of the programs
that do not fit (halved, re-estimated), or a mesh with more model parallelism.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from ntk_jax.launcher.memory import PROGRAMS, estimate_memory
from ntk_jax.models.hf_loading import config_from_hf, read_hf_config
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.models.sharding import mesh_shape as shape_of
from ntk_jax.models.transformer import DecoderConfig

__all__ = ["MemoryPlan", "DoesNotFit", "device_memory", "fmt_bytes", "check"]

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What an experiment runs on its devices.

    Attributes:
      programs: names of :data:`ntk_jax.launcher.memory.PROGRAMS`.
      lora: the adapters the programs take gradients over.
      batch_size: rows per call of every program but ``"train"``; ``train_batch_size``: rows
        of a ``"train"`` step (both rounded up to a multiple of the mesh's ``data`` size, as
        the job pads them).
      seq_len: tokens per row (the longest the job encodes).
      projection_dim: p of the ``"projected"`` program.
      batch_key, train_batch_key: the config fields of the two batch sizes (named in the
        message).
    """

    programs: tuple[str, ...]
    lora: LoRAConfig
    batch_size: int
    train_batch_size: int
    seq_len: int
    projection_dim: int = 0
    batch_key: str = "batch_size"
    train_batch_key: str = "train_batch_size"

    def __post_init__(self):
        unknown = sorted(set(self.programs) - set(PROGRAMS))
        if unknown:
            raise ValueError(f"memory plan names unknown program(s) {unknown}; choose from {PROGRAMS}")


class DoesNotFit(RuntimeError):
    """A job's program needs more memory per device than the device has."""


def device_memory(preflight_cfg, devices) -> int | None:
    """Bytes of one device: ``device_memory_gib`` if set, else an accelerator's
    ``memory_stats()["bytes_limit"]``; ``None`` when unknown (a CPU)."""
    gib = float(preflight_cfg.get("device_memory_gib", 0) or 0)
    if gib > 0:
        return int(gib * GIB)
    if devices[0].platform == "cpu":
        return None
    stats = devices[0].memory_stats() or {}
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else None


def fmt_bytes(n: float) -> str:
    """``"3.21 GiB"``, or ``"4.7 MiB"`` below 1 GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def _round_up(n: int, k: int) -> int:
    return -(-int(n) // int(k)) * int(k)


def _estimator(plan: MemoryPlan, decoder: DecoderConfig, devices, dtype: str, param_dtype: str) -> Callable:
    """``estimate(mesh, batch_size, train_batch_size) -> {program: bytes per device}``."""
    def estimate(mesh: tuple[int, int], batch_size: int, train_batch_size: int) -> dict[str, int]:
        data = mesh[0]
        r = estimate_memory(decoder, plan.lora, mesh_shape=mesh, batch_size=_round_up(batch_size, data),
                            seq_len=plan.seq_len, dtype=dtype, param_dtype=param_dtype, devices=devices,
                            programs=plan.programs, projection_dim=max(int(plan.projection_dim), 1),
                            train_batch_size=_round_up(train_batch_size, data))
        return {k: int(v) for k, v in r["device_totals"].items()}
    return estimate


def _suggestions(plan: MemoryPlan, estimate: Callable, mesh: tuple[int, int], over: set[str], budget: float,
                 max_halvings: int = 4) -> list[str]:
    """Settings that fit, each checked by its own estimate: the batch of the programs over
    budget halved (down to the ``data`` size), then the ``data`` axis folded into ``model``."""
    out = []
    b, tb = plan.batch_size, plan.train_batch_size
    for _ in range(max_halvings):
        nb = max(mesh[0], b // 2) if over - {"train"} else b
        ntb = max(mesh[0], tb // 2) if "train" in over else tb
        if (nb, ntb) == (b, tb):
            break
        b, tb = nb, ntb
        peak = max(estimate(mesh, b, tb).values())
        if peak <= budget:
            changed = [f"--config.{plan.batch_key}={b}"] if b != plan.batch_size else []
            changed += [f"--config.{plan.train_batch_key}={tb}"] if tb != plan.train_batch_size else []
            out.append(f"{' '.join(changed)} (peak {fmt_bytes(peak)})")
            break
    data, model = mesh
    while data > 1 and data % 2 == 0:
        data, model = data // 2, model * 2
        peak = max(estimate((data, model), plan.batch_size, plan.train_batch_size).values())
        if peak <= budget:
            out.append(f"--config.mesh.data={data} --config.mesh.model={model} (peak {fmt_bytes(peak)})")
            break
    return out


def _settings(plan: MemoryPlan, mesh: tuple[int, int], dtype: str, param_dtype: str) -> str:
    return (f"mesh data={mesh[0]} x model={mesh[1]}, {plan.batch_key}={plan.batch_size}, "
            f"{plan.train_batch_key}={plan.train_batch_size}, {plan.seq_len} tokens, dtype {dtype} / "
            f"params {param_dtype}, LoRA rank {plan.lora.rank} on {list(plan.lora.targets)}")


def check(config, context, plans: dict[str, MemoryPlan]) -> dict | None:
    """Estimates every plan on ``context``'s mesh and model; raises :class:`DoesNotFit` for the
    first experiment with a program over budget. Returns ``{experiment: {program: bytes}}``
    (plus ``device_memory``), or ``None`` when the check does not run (disabled, no plan, no
    known device memory) or ``{"skipped": reason}`` (a model the estimate does not cover)."""
    pcfg = config.get("preflight")
    if pcfg is None or not pcfg.enabled or not plans:
        return None
    devices = list(context.mesh.devices.flat) if context.mesh is not None else jax.local_devices()[:1]
    limit = device_memory(pcfg, devices)
    if limit is None:
        return None
    hf = read_hf_config(context.model_dir)
    decoder = config_from_hf(hf)
    if not isinstance(decoder, DecoderConfig):
        return {"skipped": f"no memory estimate for model_type {hf.get('model_type')!r} (decoders only)"}
    dtype = jnp.dtype(context.dtype or decoder.dtype).name
    param_dtype = jnp.dtype(context.param_dtype or decoder.param_dtype).name
    mesh = shape_of(context.mesh) if context.mesh is not None else (1, 1)
    budget = float(pcfg.fraction) * limit
    out: dict = {"device_memory": limit, "fraction": float(pcfg.fraction)}
    for name, plan in plans.items():
        estimate = _estimator(plan, decoder, devices, dtype, param_dtype)
        totals = estimate(mesh, plan.batch_size, plan.train_batch_size)
        out[name] = totals
        over = {p for p, v in totals.items() if v > budget}
        if not over:
            continue
        worst = max(over, key=totals.get)
        fits = _suggestions(plan, estimate, mesh, over, budget)
        raise DoesNotFit(
            f"memory preflight: experiment {name!r} does not fit its devices: program {worst!r} needs an estimated "
            f"{fmt_bytes(totals[worst])} per device, over {pcfg.fraction:.0%} of the device memory "
            f"{fmt_bytes(limit)} ({_settings(plan, mesh, dtype, param_dtype)}; every program: "
            + ", ".join(f"{p} {fmt_bytes(v)}" for p, v in totals.items()) + "). "
            + ("Settings that fit: " + "; ".join(fits) if fits else
               "No smaller batch or more model-parallel mesh found that fits: use more devices per process "
               "or a smaller LoRA/sequence length")
            + ". Skip this check with --config.preflight.enabled=False.")
    return out
