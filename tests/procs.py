"""Helpers for tests that start several local processes (``jax.distributed`` on localhost)."""
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """The environment for worker processes: this checkout first on the path, CPU only, no
    progress bars, no inherited device-count flags or ``jax.distributed`` settings."""
    env = dict(os.environ, NTK_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
    # this checkout's code, not whichever one an editable install points at
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env.pop("XLA_FLAGS", None)
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
