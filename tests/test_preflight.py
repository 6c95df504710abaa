"""The memory preflight (``ntk_jax.launcher.preflight``) on CPU with a fake device memory: a
job whose programs cannot fit is refused before any experiment runs, with a message naming the
program, its estimate, the device memory and settings that fit (each re-estimated); a large
device passes; on CPU without a fake size, or switched off, nothing runs."""
from __future__ import annotations

import os
import re

import pytest

from ntk_jax.launcher.config_lib import base_config
from ntk_jax.launcher.context import Context, load_tokenizer
from ntk_jax.launcher.memory import job_programs
from ntk_jax.launcher.preflight import GIB, DoesNotFit, check, fmt_bytes
from ntk_jax.launcher.run import run
from ntk_jax.selection.jobs import plain

from experiments.select import memory_plan


def _config(model_dir, device_gib=0.0):
    c = base_config()
    c.experiments = ("select",)
    c.model.path = model_dir
    c.select.feature_batch_size = 16
    c.select.warmup.batch_size = 16
    c.select.projection_dim = 64
    c.preflight.device_memory_gib = float(device_gib)
    return c


@pytest.fixture(scope="module")
def context(tiny_model_dir):
    return Context(model_dir=tiny_model_dir, tokenizer=load_tokenizer(tiny_model_dir), max_len=32, seed=0, info={})


@pytest.fixture(scope="module")
def estimates(context, tiny_model_dir):
    """Per-program bytes at the config's batches (16) and at half of them (8), from a device
    large enough for both."""
    big = _config(tiny_model_dir, device_gib=64)
    half = _config(tiny_model_dir, device_gib=64)
    half.select.feature_batch_size = half.select.warmup.batch_size = 8
    return (check(big, context, {"select": memory_plan(big)})["select"],
            check(half, context, {"select": memory_plan(half)})["select"])


def test_plan_is_the_jobs_programs(tiny_model_dir):
    c = _config(tiny_model_dir)
    plan = memory_plan(c)
    assert plan.programs == job_programs(plain(c.select)) and "train" in plan.programs
    assert (plan.batch_size, plan.train_batch_size, plan.seq_len, plan.projection_dim) == (16, 16, 32, 64)
    c.select.ntk.update(filter="knn", rescore="gradient", normalize="cosine")
    assert memory_plan(c).programs == ("train", "hidden", "features", "projected")


def test_large_device_passes(estimates, context, tiny_model_dir):
    full, half = estimates
    assert set(full) == set(memory_plan(_config(tiny_model_dir)).programs)
    assert all(half[p] < full[p] for p in full)  # every program of the job holds a batch


def test_small_device_refuses_with_settings_that_fit(estimates, context, tiny_model_dir):
    full, half = estimates
    fraction = base_config().preflight.fraction
    # a device between the half-batch peak and the full-batch peak
    device = (max(half.values()) + max(full.values())) / 2 / fraction
    c = _config(tiny_model_dir, device_gib=device / GIB)
    with pytest.raises(DoesNotFit) as err:
        check(c, context, {"select": memory_plan(c)})
    msg = str(err.value)
    worst = max(full, key=full.get)
    assert f"experiment 'select'" in msg and f"program {worst!r}" in msg
    assert f"{fmt_bytes(full[worst])} per device" in msg and f"device memory {fmt_bytes(int(device))}" in msg
    assert fmt_bytes(full[worst]) != fmt_bytes(max(half.values()))  # the message tells the sizes apart
    assert "select.feature_batch_size=16" in msg and "mesh data=1 x model=1" in msg
    fits = re.search(r"Settings that fit: (.*?)\. Skip", msg)
    assert fits, msg
    assert "--config.select.feature_batch_size=8" in fits.group(1) or "--config.select.warmup.batch_size=8" in \
        fits.group(1)
    assert "--config.preflight.enabled=False" in msg


def test_hopeless_device_says_so(context, tiny_model_dir):
    c = _config(tiny_model_dir, device_gib=1e-6)
    c.select.feature_batch_size = c.select.warmup.batch_size = 2  # one halving to try
    with pytest.raises(DoesNotFit, match="No smaller batch or more model-parallel mesh found"):
        check(c, context, {"select": memory_plan(c)})


def test_off_on_cpu_without_fake_memory_and_when_disabled(context, tiny_model_dir):
    c = _config(tiny_model_dir)
    assert check(c, context, {"select": memory_plan(c)}) is None  # CPU: no device memory known
    c = _config(tiny_model_dir, device_gib=1e-6)
    c.preflight.enabled = False
    assert check(c, context, {"select": memory_plan(c)}) is None


def test_launcher_stops_before_the_job_runs(tmp_path, tiny_model_dir):
    c = _config(tiny_model_dir, device_gib=1e-6)
    with pytest.raises(DoesNotFit, match="program"):
        run(c, str(tmp_path))
    assert not os.path.exists(tmp_path / "select")  # nothing of the job ran
