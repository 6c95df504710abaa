"""How many devices JAX's CPU backend exposes to a job (``config.cpu_devices``).

On a CPU-only machine JAX shows one CPU device whose programs run op by op, each op spread
over the cores by XLA's intra-op thread pool. Small and medium ops (a LoRA factor, the
attention of one block, a per-example gradient) do not fill a multi-core CPU that way. With
``config.cpu_devices = K`` the CPU backend exposes K devices; the job's ``data`` mesh
(``config.mesh``) then spans them and every batch — training steps, features, scores,
hidden states, kernels — is split over them as over GPUs, so K programs run side by side.
Measured on a 2-core machine (docs/kernels.md, "Data-parallel over CPU devices"): the
forward + LoRA-gradient pass of the benchmark decoders 1.1–1.9× faster with 2 devices, but
the jobs themselves no faster at those sizes (weights FSDP-sharded over ``data``, stages that
are more than the pass, compilation), so it is off by default.

* ``0`` (default): JAX's own count, untouched (one CPU device, or what
  ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` says);
* ``-1``: one device per core this process may run on;
* ``K > 0``: K devices.

Results stay deterministic for a given K, but a batch summed over K devices is summed in
another order than on one, so runs with different K agree to float rounding, not bitwise.
Only the CPU backend is affected: on a GPU/TPU machine the setting changes nothing that
runs there. It must be applied before JAX starts its backends (the launcher does this first).
"""
from __future__ import annotations

import os

import jax

__all__ = ["cores", "resolve_cpu_devices", "use_cpu_devices"]


def cores() -> int:
    """The number of cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_cpu_devices(value) -> int | None:
    """``config.cpu_devices`` as a device count: ``None`` for ``0`` (leave JAX's count), the
    core count for ``-1``, else the positive int itself. ``ValueError`` for anything else."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(f"config.cpu_devices must be 0 (JAX's own count), -1 (one per core) or a positive "
                         f"int, got {value!r}")
    if value == 0:
        return None
    return cores() if value == -1 else value


def use_cpu_devices(value) -> int | None:
    """Makes JAX's CPU backend expose :func:`resolve_cpu_devices` ``(value)`` devices
    (``jax_num_cpu_devices``, which overrides ``XLA_FLAGS``); returns that count, or ``None``
    when ``value`` is 0 (nothing changed).

    Must run before JAX starts its backends. If they are already started, a request for the
    count the CPU backend already has is accepted; any other raises ``ValueError`` saying so
    (run the job in a fresh process, or set it where the process starts)."""
    n = resolve_cpu_devices(value)
    if n is None:
        return None
    from jax._src import xla_bridge  # whether a backend was started (no public query)

    if xla_bridge.backends_are_initialized():
        have = len(jax.devices("cpu"))
        if have != n:
            raise ValueError(f"config.cpu_devices asks for {n} CPU device(s), but JAX's backends were started "
                             f"before the job with {have}: set it before anything runs on a device (a fresh "
                             "process, or jax.config.update('jax_num_cpu_devices', N) right after importing jax)")
        return n
    jax.config.update("jax_num_cpu_devices", n)
    return n
