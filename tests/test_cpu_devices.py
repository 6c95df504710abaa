"""``config.cpu_devices`` (:mod:`ntk_jax.launcher.devices`): how many devices JAX's CPU
backend exposes to a job, so that its data mesh spans the cores."""
import json
import os
import subprocess
import sys

import jax
import pytest
from procs import ROOT, with_fast_compile, worker_env

from ntk_jax.launcher import devices
from ntk_jax.launcher.config_lib import base_config


def test_resolve_cpu_devices():
    assert devices.resolve_cpu_devices(0) is None
    assert devices.resolve_cpu_devices(3) == 3
    assert devices.resolve_cpu_devices(-1) == devices.cores() >= 1
    for bad in (-2, 1.5, "2", True, None):
        with pytest.raises(ValueError, match="config.cpu_devices must be 0 .JAX's own count., -1 .one per core."):
            devices.resolve_cpu_devices(bad)
    assert base_config().cpu_devices == 0  # JAX's own count unless asked


def test_too_late_for_another_count_is_a_clear_error():
    have = len(jax.devices("cpu"))  # this process's backends are started
    assert devices.use_cpu_devices(have) == have  # the count it already has: fine
    assert devices.use_cpu_devices(0) is None
    with pytest.raises(ValueError, match=f"asks for {have + 1} CPU device.s., but JAX's backends were started "
                                         f"before the job with {have}"):
        devices.use_cpu_devices(have + 1)


SCRIPT = r'''
import json, sys
from ntk_jax.launcher import devices
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.launcher.context import prepare_context
n = devices.use_cpu_devices(int(sys.argv[2]))  # overrides the XLA_FLAGS device count
config = base_config()
config.model.path = sys.argv[1]
ctx = prepare_context(config, sys.argv[3])
import jax
print(json.dumps({"n": n, "devices": len(jax.devices()), "mesh": ctx.info["mesh"]}))
'''


@pytest.mark.parametrize("value", [2, -1])
def test_the_job_mesh_spans_the_cpu_devices(tiny_model_dir, tmp_path, value):
    env = {**worker_env(), "XLA_FLAGS": with_fast_compile("--xla_force_host_platform_device_count=1")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_model_dir, str(value), str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    n = 2 if value == 2 else devices.cores()
    assert out == {"n": n, "devices": n, "mesh": {"data": n, "model": 1}}


@pytest.mark.slow
def test_selection_job_on_two_cpu_devices_equals_one(tiny_model_dir, tmp_path):
    """A selection job through the launcher with ``config.cpu_devices=2`` (its batches split over
    two CPU devices) selects what the one-device job selects, with scores equal to float
    rounding."""
    import numpy as np
    from test_distributed_selection import run_job

    runs = {}
    for k in (0, 2):
        workdir = str(tmp_path / f"cpu{k}")
        (rc, out), = run_job(workdir, tiny_model_dir, 1, small=True, extra=["--cpu_devices", str(k)])
        assert rc == 0, out[-3000:]
        job = os.path.join(workdir, "select")
        with open(os.path.join(job, "report.json")) as fh:
            report = json.load(fh)
        with open(os.path.join(workdir, "config.json")) as fh:
            assert json.load(fh)["cpu_devices"] == k
        with np.load(os.path.join(job, "all_scores.npz")) as z:
            runs[k] = report, {key: z[key] for key in z.files}
    (r0, s0), (r2, s2) = runs[0], runs[2]
    assert r0["mesh"] == {"data": 1, "model": 1} and r2["mesh"] == {"data": 2, "model": 1}
    assert sorted(s0) == sorted(s2)
    # the same selection, up to a swap of candidates tied to float rounding at the cut-off
    score = dict(zip(s0["ids"].tolist(), s0["scores"].tolist()))
    cut = min(score[i] for i in r0["selected_ids"])
    scale = max(abs(v) for v in score.values())
    for i in set(r0["selected_ids"]) ^ set(r2["selected_ids"]):
        assert abs(score[i] - cut) <= 1e-4 * scale, (i, score[i], cut)
    assert len(r2["selected_ids"]) == len(r0["selected_ids"])
    for key in s0:
        if s0[key].dtype.kind == "f":
            np.testing.assert_allclose(s2[key], s0[key], rtol=1e-4, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(s2[key], s0[key], err_msg=key)
