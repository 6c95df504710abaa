"""``config.mesh`` → ``Context.mesh`` and data-parallel features / JVP scores / hidden states /
fine-tuning / evaluation (docs/theory.md §8.3; docs/scale.md).

The 8-device comparison runs in a subprocess (``tests/mesh_jobs_checks.py``, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``); the one-device behaviour is checked
here in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ntk_jax.kernels.features import gradient_features
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.launcher.context import Context, load_tokenizer, prepare_context
from ntk_jax.mesh import data_size, mesh_of, place_rows, resolve_mesh, round_up_to_data
from ntk_jax.models import sharding as sh
from ntk_jax.models.subset import param_subset
from ntk_jax.selection.ntk_selector import ntk_scalar_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 2e-5  # max-abs error relative to the largest magnitude of the compared quantity (float32)


def test_mesh_from_config_on_one_device():
    assert sh.mesh_shape(sh.mesh_from_config(-1, 1)) == (1, 1)
    assert sh.mesh_shape(sh.mesh_from_config(1, -1)) == (1, 1)
    with pytest.raises(ValueError, match=r"data\*model = 2\*1 = 2 does not match the 1 local device"):
        sh.mesh_from_config(2, 1)
    with pytest.raises(ValueError, match="config.mesh.model=2 does not divide the 1 local device"):
        sh.mesh_from_config(-1, 2)
    with pytest.raises(ValueError, match="config.mesh.model must be a positive int or -1"):
        sh.mesh_from_config(1, 1.5)


def test_one_device_mesh_places_nothing():
    mesh = sh.mesh_from_config(-1, 1)
    assert resolve_mesh(mesh) is None and resolve_mesh(None, {"w": np.ones(3)}) is None
    assert mesh_of({"w": jax.numpy.ones(3)}) is None
    batch = {"x": np.ones((3, 2))}
    assert place_rows(batch, None) is batch
    assert round_up_to_data(5, None) == 5 and data_size(None) == 1


def test_prepare_context_one_device_unchanged(tiny_model_dir, tmp_path):
    """With one device the context's mesh is 1x1, the model is not placed, and the features
    equal those of a context without a mesh (bitwise: the same programs run)."""
    config = base_config()
    config.model.path = tiny_model_dir
    ctx = prepare_context(config, str(tmp_path))
    assert isinstance(ctx.mesh, jax.sharding.Mesh) and sh.mesh_shape(ctx.mesh) == (1, 1)
    plain = Context(model_dir=tiny_model_dir, tokenizer=load_tokenizer(tiny_model_dir), max_len=ctx.max_len,
                    seed=ctx.seed, info={})
    lora = {"rank": 2, "targets": ["q_proj", "v_proj"], "b_init_std": 0.1}
    a, b = ctx.load_model(lora, seed=1), plain.load_model(lora, seed=1)
    assert not any(isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(nnx.state(a)))
    sa, sb = param_subset(a, nnx.LoRAParam), param_subset(b, nnx.LoRAParam)
    rng = np.random.default_rng(0)
    x = {"input_ids": rng.integers(4, 40, (5, 8)).astype(np.int32), "attention_mask": np.ones((5, 8), np.int32),
         "loss_mask": np.ones((5, 8), np.int32)}
    fa = gradient_features(ntk_scalar_fn(sa), sa.params, x, batch_size=3, mesh=ctx.mesh)
    fb = gradient_features(ntk_scalar_fn(sb), sb.params, x, batch_size=3)
    np.testing.assert_array_equal(fa, fb)


def test_prepare_context_rejects_bad_mesh(tiny_model_dir, tmp_path):
    config = base_config()
    config.model.path = tiny_model_dir
    config.mesh.data = 4
    with pytest.raises(ValueError, match="config.mesh data\\*model = 4\\*1 = 4 does not match"):
        prepare_context(config, str(tmp_path))


@pytest.mark.slow
def test_meshes_match_one_device_for_selection_and_training(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu",
               NTK_JAX_NO_PROGRESS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mesh_jobs_checks.py"), str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["devices"] == 8
    scale = r["scale"]
    # the JVP scores are the projected-feature scores (an independent route to the same numbers)
    assert r["jvp_vs_features"] <= TOL * scale["jvp_scores"]
    assert set(r["meshes"]) == {"8x1", "2x4"}
    for name, e in r["meshes"].items():
        assert e["mesh_shape"] == [int(v) for v in name.split("x")]  # prepare_context built it from config.mesh
        assert e["on_mesh"] and e["trained_on_mesh"], name  # the whole model, LoRA included, lives on the mesh
        for k in ("dom_features", "pool_features", "jvp_scores", "hidden", "trained"):
            assert e[k + "_err"] <= TOL * max(scale[k], 1.0), (name, k, e[k + "_err"], scale[k])
        assert len(e["losses"]) == len(r["ref"]["losses"]) == 4
        assert e["losses_err"] <= 1e-5 * max(abs(v) for v in r["ref"]["losses"]), name
        assert e["grad_norms_err"] <= 1e-5, name
        assert abs(e["eval_loss"] - r["ref"]["eval_loss"]) <= 1e-5 * r["ref"]["eval_loss"]
        assert e["train_compiles"] == r["ref"]["train_compiles"] == 1, name  # no recompilation per step
    ft, ft_ref = r["meshes"]["2x4"]["finetune"], r["ref"]["finetune"]
    assert ft["accuracy"] == ft_ref["accuracy"] and ft["n_train"] == ft_ref["n_train"]
    for k in ("test_loss", "final_train_loss"):
        assert abs(ft[k] - ft_ref[k]) <= 1e-5 * abs(ft_ref[k]), k
    # killed after 2 of 4 steps and resumed under the mesh = one uninterrupted run
    assert r["resume"]["restored_on_mesh"]
    assert r["resume"]["params"] <= 1e-6 and r["resume"]["losses"] <= 1e-6
    errs = r["mesh_errors"]
    assert "3*1 = 3 does not match the 8 local device" in errs["no_fit"]
    assert "config.mesh.model=3 does not divide the 8 local device" in errs["no_divide"]
    assert "at most one of data / model may be -1" in errs["both_free"]
    assert "positive int or -1" in errs["zero"]
