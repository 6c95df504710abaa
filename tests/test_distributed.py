"""Multi-process and multi-device runs (docs/theory.md §8.3; docs/scale.md): jax.distributed on localhost
CPU processes, row-striped exact kernels, resume after a process is killed, the launcher's
settings."""
import json
import os

import numpy as np
import pytest
from procs import ROOT, free_port, run_workers

from ntk_jax.launcher import distributed
from ntk_jax.launcher.config_lib import distributed_config

KERNEL_WORKER = os.path.join(ROOT, "tests", "workers", "kernel_stripes.py")
SUMS_WORKER = os.path.join(ROOT, "tests", "workers", "mesh_sums.py")


def kernel_job(out_dir, result, n, devices=1, die_after=None):
    port = str(free_port())
    args = []
    for pid in range(n):
        a = [out_dir, result, "--devices", str(devices)]
        if n > 1:
            a += ["--process_id", str(pid), "--num_processes", str(n), "--port", port]
        if die_after is not None and pid == n - 1:
            a += ["--die_after", str(die_after)]
        args.append(a)
    return run_workers(KERNEL_WORKER, args, timeout=240, kill_when_last_dies=die_after is not None)


def computed(out_dir, pid):
    """The stripes process ``pid`` computed in its last run ([] if it was killed before its first)."""
    path = os.path.join(out_dir, f"computed_{pid}.json")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return json.load(fh)


@pytest.mark.slow
def test_kernel_stripes_two_processes_equal_one_and_resume_after_kill(tmp_path):
    one = str(tmp_path / "one.npy")
    (rc, out), = kernel_job(str(tmp_path / "one"), one, 1)
    assert rc == 0, out
    K1 = np.load(one)

    two_dir, two = str(tmp_path / "two"), str(tmp_path / "two.npy")
    outs = kernel_job(two_dir, two, 2, die_after=1)
    assert outs[1][0] == 3, outs[1][1]            # process 1 was killed after one stripe
    assert not os.path.exists(two)                # ... so nothing was assembled
    done_before = set(computed(two_dir, 0)) | set(computed(two_dir, 1))
    assert computed(two_dir, 1) == [1]

    outs = kernel_job(two_dir, two, 2)            # restart: both processes
    assert all(rc == 0 for rc, _ in outs), outs
    recomputed = set(computed(two_dir, 1))
    assert 1 not in recomputed and recomputed == {3, 5, 7, 9}  # only process 1's missing stripes
    assert not (recomputed & done_before)
    np.testing.assert_array_equal(np.load(two), K1)  # same devices per process: bitwise


@pytest.mark.slow
def test_kernel_rows_sharded_over_8_devices_equal_one_device(tmp_path):
    (rc, out), = kernel_job(str(tmp_path / "one"), str(tmp_path / "one.npy"), 1)
    assert rc == 0, out
    (rc, out), = kernel_job(str(tmp_path / "eight"), str(tmp_path / "eight.npy"), 1, devices=8)
    assert rc == 0, out
    K1, K8 = np.load(tmp_path / "one.npy"), np.load(tmp_path / "eight.npy")
    np.testing.assert_allclose(K8, K1, rtol=1e-5, atol=1e-5 * np.abs(K1).max())


def test_a_process_mesh_sums_bitwise_as_in_one_process(tmp_path):
    # Each process runs a (1 x 4) mesh of its own devices whose matmuls all-reduce over "model".
    # With gloo as the CPU collectives (JAX's default), those sums took gloo's order and differed
    # from a one-process run in the last bits (a 4-process Qwen3 rehearsal selected differently);
    # the launcher leaves cross-process collectives off (config.distributed.cpu_collectives="none",
    # processes meet at coordination-service barriers).
    port = str(free_port())
    (rc, out), = run_workers(SUMS_WORKER, [[str(tmp_path / "one_")]], timeout=120)
    assert rc == 0, out
    two = [[str(tmp_path / "two_"), "--process_id", str(i), "--num_processes", "2", "--port", port] for i in range(2)]
    outs = run_workers(SUMS_WORKER, two, timeout=120)
    assert all(rc == 0 for rc, _ in outs), outs
    one = np.load(tmp_path / "one_0.npz")
    for i in range(2):
        got = np.load(tmp_path / f"two_{i}.npz")
        for k in one.files:
            np.testing.assert_array_equal(got[k], one[k], err_msg=f"process {i}, product {k}")


def test_sharded_kernel_matches_blocked_kernel_in_process(tmp_path):
    import jax
    import jax.numpy as jnp

    from ntk_jax.kernels.ntk import empirical_ntk
    from ntk_jax.kernels.sharded import assemble_kernel, sharded_empirical_ntk

    k = jax.random.split(jax.random.PRNGKey(1), 3)
    params = {"w1": jax.random.normal(k[0], (4, 9)), "w2": jax.random.normal(k[1], (9, 2))}
    f = lambda p, x: jnp.sin(x @ p["w1"]) @ p["w2"]  # noqa: E731
    x = jax.random.normal(k[2], (11, 4))
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()).reshape(-1, 1), ("data", "model"))
    for x2 in (None, x[:5] * 2):
        for trace in (True, False):
            ref = empirical_ntk(f, params, x, x2, trace=trace)
            got = sharded_empirical_ntk(f, params, x, x2, mesh=mesh, block_size=3, trace=trace)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    out_dir = str(tmp_path / "stripes")
    sharded_empirical_ntk(f, params, x, None, mesh=mesh, block_size=3, out_dir=out_dir)
    memmapped = assemble_kernel(out_dir, out_path=str(tmp_path / "K.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "K.npy"), empirical_ntk(f, params, x), rtol=1e-5, atol=1e-6)
    del memmapped
    with pytest.raises(ValueError, match="different kernel"):
        sharded_empirical_ntk(f, params, x[:8], None, mesh=mesh, block_size=3, out_dir=out_dir)
    os.remove(os.path.join(out_dir, "stripe_00002.npy"))
    with pytest.raises(FileNotFoundError, match=r"stripes \[2\]"):
        assemble_kernel(out_dir)


def _cfg(**kw):
    c = distributed_config()
    c.update(kw)
    return c


def test_distributed_settings_and_errors(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
              "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.explicit_settings(_cfg()) is None
    assert distributed.cluster_detected() is None
    info = distributed.initialize(_cfg())          # auto, nothing set: one process
    assert (info.process_index, info.process_count, info.initialized) == (0, 1, False)
    with pytest.raises(ValueError, match="mode='on'"):
        distributed.initialize(_cfg(mode="on"))
    with pytest.raises(ValueError, match="mode must be"):
        distributed.initialize(_cfg(mode="sometimes"))
    with pytest.raises(ValueError, match="num_processes/process_id"):
        distributed.explicit_settings(_cfg(coordinator_address="h:1"))
    with pytest.raises(ValueError, match="out of range"):
        distributed.explicit_settings(_cfg(coordinator_address="h:1", num_processes=2, process_id=2))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:2")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed.explicit_settings(_cfg()) == {"coordinator_address": "h:2", "num_processes": 4, "process_id": 3}
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed.explicit_settings(_cfg())
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.cluster_detected() == "slurm"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_NTASKS")
    two = dict(coordinator_address="h:1", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="cpu_collectives must be one of"):
        distributed.initialize(_cfg(cpu_collectives="nccl", **two))
    with pytest.raises(ValueError, match="barrier_timeout_s must be > 0"):
        distributed.initialize(_cfg(barrier_timeout_s=0, **two))
    assert distributed_config().cpu_collectives == "none"
