"""Helpers for tests that start several local processes (``jax.distributed`` on localhost)."""
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA flags of the test processes (tests/conftest.py; the worker processes below; the 8-device
# subprocesses): the suite's programs are small, so its time is mostly XLA compilation. Without
# LLVM's backend optimisations, and with XLA:CPU's elemental emitters instead of its MLIR fusion
# emitters, the same programs compile 2-3x faster with the same results up to float rounding
# (measured: a train step of the tiny model 6.5 s -> 3.7 s CPU, cold cache). Tests check values,
# never speed; the benchmarks (run outside pytest) keep XLA's defaults.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def with_fast_compile(flags: str = "") -> str:
    """``flags`` (an ``XLA_FLAGS`` value) plus each :data:`FAST_COMPILE` flag it does not set."""
    return " ".join(flags.split() + [f for f in FAST_COMPILE if f.split("=")[0] not in flags])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """The environment for worker processes: this checkout first on the path, CPU only, no
    progress bars, no inherited device-count flags or ``jax.distributed`` settings, the test
    run's compile flags."""
    env = dict(os.environ, NTK_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
    # this checkout's code, not whichever one an editable install points at
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env["XLA_FLAGS"] = with_fast_compile()
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def run_workers(worker: str, args_per_process, *, timeout: float = 300, kill_when_last_dies: bool = False):
    """Runs ``python worker *args`` once per entry of ``args_per_process`` (concurrently);
    returns ``[(returncode, output)]``.

    ``kill_when_last_dies``: the last process is expected to die midway (a simulated crash);
    as soon as it has exited, the survivors (which would otherwise wait at a barrier until
    ``jax.distributed``'s heartbeat timeout, ~100 s) are killed, as a scheduler tearing the job
    down would.
    """
    procs = [subprocess.Popen([sys.executable, worker, *a], cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for a in args_per_process]
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if kill_when_last_dies and procs[-1].poll() is not None:
                for p in procs[:-1]:
                    p.kill()
            if time.time() > deadline:
                raise TimeoutError(f"{os.path.basename(worker)}: {len(procs)} processes still running after {timeout}s")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, p.stdout.read()) for p in procs]


def start_worker_process(devices: int, num_processes: int, process_id: int, port: int):
    """Inside a worker (before anything imports JAX): this many simulated CPU ``devices`` and the
    test run's compile flags, then ``jax.distributed`` through the launcher's
    ``distributed.initialize`` when ``num_processes > 1``. Returns its ``ProcessInfo``."""
    os.environ["XLA_FLAGS"] = with_fast_compile(f"--xla_force_host_platform_device_count={devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    from ntk_jax.launcher import distributed
    from ntk_jax.launcher.config_lib import distributed_config

    cfg = distributed_config()
    if num_processes > 1:
        cfg.coordinator_address = f"localhost:{port}"
        cfg.num_processes = num_processes
        cfg.process_id = process_id
    info = distributed.initialize(cfg)
    assert info.process_count == num_processes, info
    return info
