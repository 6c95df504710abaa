"""Multi-process runs on JAX's own distributed runtime (``jax.distributed``).

A job started as one of several processes (one per host, or one per GPU) calls
:func:`initialize` before anything touches a device. Where the processes come from:

* explicit settings — ``config.distributed.coordinator_address`` / ``num_processes`` /
  ``process_id`` (the launcher's ``--coordinator_address``, ``--num_processes``,
  ``--process_id`` flags set these), or the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
* a cluster JAX detects by itself — SLURM (``srun``, ``SLURM_NTASKS > 1``), Open MPI
  (``mpirun``, ``OMPI_COMM_WORLD_SIZE > 1``), Cloud TPU slices with several hosts
  (``TPU_WORKER_HOSTNAMES``) — then ``jax.distributed.initialize()`` is called without
  arguments and JAX reads the cluster.

``config.distributed.mode``: ``"auto"`` (initialise when either applies), ``"on"`` (always;
error if nothing says how) or ``"off"``. Processes meet at barriers of the coordination
service (:func:`barrier`); no program spans two processes, so the CPU backend runs without
cross-process collectives by default (``config.distributed.cpu_collectives="none"``): with
gloo, even a mesh of one process's own devices would sum in gloo's order, and a 4-process run
would differ in the last bits from one process. Work is split across processes by
deterministic shard assignment (shard ``k`` to process ``k % process_count``; see :mod:`ntk_jax.selection.store` and
:mod:`ntk_jax.kernels.sharded`); within a process, the ``data`` × ``model`` mesh of its
local devices shards each computation.
"""
from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging

from ntk_jax import mesh as mesh_lib

MODES = ("auto", "on", "off")
CPU_COLLECTIVES = ("none", "gloo", "mpi")
_HEARTBEAT_TIMEOUT_S = 100  # as initialize() set it (JAX's default until then)


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands: ``process_index`` of ``process_count``; ``initialized``
    says whether ``jax.distributed`` was started (by this call or earlier)."""

    process_index: int
    process_count: int
    initialized: bool

    @property
    def is_primary(self) -> bool:
        return self.process_index == 0


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "")
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def cluster_detected() -> str | None:
    """The name of a multi-process cluster environment JAX can read by itself, or ``None``."""
    if (_int_env("SLURM_NTASKS") or 1) > 1 and os.environ.get("SLURM_JOB_ID"):
        return "slurm"
    if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "cloud_tpu"
    return None


def explicit_settings(cfg) -> dict | None:
    """``coordinator_address``/``num_processes``/``process_id`` from the config, falling back
    to ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``; ``None`` if no
    coordinator is named. ``ValueError`` if a coordinator is named but the rest is incomplete."""
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not address:
        return None
    num = cfg.num_processes if cfg.num_processes > 0 else _int_env("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id >= 0 else _int_env("JAX_PROCESS_ID")
    if num is None or pid is None:
        raise ValueError(f"coordinator {address!r} given but num_processes/process_id are not "
                         "(set --num_processes/--process_id or JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    if not 0 <= pid < num:
        raise ValueError(f"process_id {pid} out of range for num_processes {num}")
    return {"coordinator_address": address, "num_processes": int(num), "process_id": int(pid)}


def initialize(cfg) -> ProcessInfo:
    """Starts ``jax.distributed`` as ``cfg`` (``config.distributed``) and the environment say.

    Must run before the first computation on a device. Idempotent.
    """
    if cfg.mode not in MODES:
        raise ValueError(f"config.distributed.mode must be one of {MODES}, got {cfg.mode!r}")
    if jax.distributed.is_initialized():
        return ProcessInfo(jax.process_index(), jax.process_count(), True)
    if cfg.mode == "off":
        return ProcessInfo(0, 1, False)
    settings = explicit_settings(cfg)
    cluster = None if settings else cluster_detected()
    if settings is None and cluster is None:
        if cfg.mode == "on":
            raise ValueError("config.distributed.mode='on' but no coordinator address is set and no "
                             "SLURM/Open MPI/Cloud TPU environment was detected")
        return ProcessInfo(0, 1, False)
    if settings is not None and settings["num_processes"] == 1:
        return ProcessInfo(0, 1, False)
    collectives = str(cfg.get("cpu_collectives", "none") or "none")
    if collectives not in CPU_COLLECTIVES:
        raise ValueError(f"config.distributed.cpu_collectives must be one of {CPU_COLLECTIVES}, got {collectives!r}")
    # The CPU backend's cross-process collectives (no effect on GPU/TPU): "none" unless a program
    # spans processes (none of this project's do; see the module docstring).
    jax.config.update("jax_cpu_collectives_implementation", None if collectives == "none" else collectives)
    barrier_timeout = float(cfg.get("barrier_timeout_s", mesh_lib.BARRIER_TIMEOUT_S))
    if not barrier_timeout > 0:
        raise ValueError(f"config.distributed.barrier_timeout_s must be > 0, got {barrier_timeout}")
    mesh_lib.BARRIER_TIMEOUT_S = barrier_timeout
    global _HEARTBEAT_TIMEOUT_S
    timeout = int(cfg.get("heartbeat_timeout_s", 100))
    if timeout < 1:
        raise ValueError(f"config.distributed.heartbeat_timeout_s must be >= 1, got {timeout}")
    _HEARTBEAT_TIMEOUT_S = timeout
    if settings is not None:
        logging.info("jax.distributed: process %d/%d, coordinator %s", settings["process_id"],
                     settings["num_processes"], settings["coordinator_address"])
        jax.distributed.initialize(**settings, heartbeat_timeout_seconds=timeout)
    else:
        logging.info("jax.distributed: %s environment detected", cluster)
        jax.distributed.initialize(heartbeat_timeout_seconds=timeout)
    logging.warning(resume_notice(jax.process_index(), jax.process_count(), timeout))
    return ProcessInfo(jax.process_index(), jax.process_count(), True)


def heartbeat_timeout_s() -> int:
    """The heartbeat timeout :func:`initialize` gave ``jax.distributed`` (JAX's default, 100 s,
    before it ran)."""
    return _HEARTBEAT_TIMEOUT_S


def resume_notice(process_index: int, process_count: int, heartbeat_timeout_s: int) -> str:
    """What every process logs when ``jax.distributed`` starts: how a dead process shows
    and how to resume.

    When a process dies, JAX's runtime usually terminates the survivors itself (an abort with
    its own message, "the JAX distributed service detected fatal errors") as soon as the
    coordination service notices, which can be before any of them reaches a
    :func:`barrier` and so before this library can say anything; the advice is therefore
    logged up front, where it is in every process's log whatever ends the job."""
    return (f"jax.distributed: process {process_index} of {process_count}. If a process dies, the others stop "
            f"within the heartbeat timeout ({heartbeat_timeout_s} s: config.distributed.heartbeat_timeout_s), "
            "often by JAX's own abort ('the JAX distributed service detected fatal errors'). Every finished "
            "shard is on disk: Rerun the same command, with any number of processes, to resume.")


def barrier(name: str) -> None:
    """Waits until every process reaches ``barrier(name)`` (no-op with one process;
    :func:`ntk_jax.mesh.process_barrier`).

    A process that died or stopped answering is noticed after the heartbeat timeout
    (``config.distributed.heartbeat_timeout_s``, JAX's default 100 s), a barrier that is never
    reached after ``config.distributed.barrier_timeout_s``. When the barrier's error reaches
    Python first, the survivors stop with a ``RuntimeError`` naming the barrier, both settings
    and how to resume (rerunning the same command recomputes only what is missing); JAX's
    runtime may instead abort them with its own message (:func:`resume_notice`, logged at the
    start, gives the same advice then)."""
    if jax.process_count() > 1:
        try:
            mesh_lib.process_barrier(name)
        except Exception as e:  # the runtime's error says little about what to do
            raise RuntimeError(
                f"process {jax.process_index()} of {jax.process_count()}: barrier {name!r} failed — another process "
                f"died or stopped answering (noticed after the heartbeat timeout, {_HEARTBEAT_TIMEOUT_S} s: "
                f"config.distributed.heartbeat_timeout_s), or did not arrive within {mesh_lib.BARRIER_TIMEOUT_S:.0f} s "
                "(config.distributed.barrier_timeout_s). Rerun the same command, with any number of processes, "
                f"to resume from the results written so far. Cause: {type(e).__name__}: {e}") from e
