"""Selection and training pieces under ``config.mesh`` on 8 simulated CPU devices (run by
``tests/test_mesh_jobs.py`` in a subprocess: the pytest process already has JAX with one
device).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python tests/mesh_jobs_checks.py OUT.json

A small random decoder in this repo's checkpoint format (with the character tokenizer) is
loaded through the launcher: ``prepare_context`` builds ``Context.mesh`` from
``config.mesh`` and ``Context.load_model`` puts the model (LoRA factors included) on it. For
meshes (8,1) and (2,4) against a context without a mesh (one device), with the same LoRA
init, the script records max-abs differences of

* NTK-Selector features (JL-projected), JVP scores and mean hidden states, with a block
  size that needs padding on both meshes;
* a short LoRA fine-tune (batch 6: padded to 8 on the (8,1) mesh): per-step losses and
  gradient norms, the trained LoRA factors, the eval loss;
* on (2,4): ``finetune_and_evaluate`` (test loss, option accuracy) and a fine-tune killed
  after 2 steps and resumed from its orbax checkpoint;

plus where arrays live, how many programs the train step compiled, and the errors of bad
``config.mesh`` values. The pytest side asserts on the JSON report.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NTK_JAX_NO_PROGRESS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ntk_jax.data.encoding import LM_INPUTS, lm_batch  # noqa: E402
from ntk_jax.data.records import encode_records  # noqa: E402
from ntk_jax.data.tokenizer import CharTokenizer  # noqa: E402
from ntk_jax.kernels.features import directional_derivatives, gradient_features  # noqa: E402
from ntk_jax.kernels.projection import RandomProjection  # noqa: E402
from ntk_jax.launcher.config_lib import base_config  # noqa: E402
from ntk_jax.launcher.context import Context, load_tokenizer, prepare_context  # noqa: E402
from ntk_jax.models import sharding as sh  # noqa: E402
from ntk_jax.models.subset import param_subset  # noqa: E402
from ntk_jax.models.transformer import DecoderConfig, DecoderLM, save_pretrained  # noqa: E402
from ntk_jax.selection import evaluation  # noqa: E402
from ntk_jax.selection.methods.ntk import domain_direction  # noqa: E402
from ntk_jax.selection.ntk_selector import mean_hidden_states, ntk_scalar_fn  # noqa: E402
from ntk_jax.training import trainer  # noqa: E402

MESHES = [(8, 1), (2, 4)]
MAX_LEN = 24
LORA = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "o_proj", "down_proj"],
        "b_init_std": 0.1}
TRAIN = trainer.TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=4, schedule="linear", batch_size=6,
                            seed=3, log_every=1, grad_clip=1.0)
FEATURE_BLOCK = 5  # not a multiple of 8 or 2: every block is padded on a mesh


def records(n: int, seed: int, options: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (int(v) for v in rng.integers(0, 50, 2))
        r = {"id": f"r{seed}-{i}", "prompt": f"{a}+{b}=", "response": str(a + b)}
        if options:
            r["options"] = [str(a + b), str(a + b + 1), str(abs(a - b))]
            r["options"] = list(dict.fromkeys(r["options"]))
        out.append(r)
    return out


def checkpoint(directory: str) -> None:
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_LEN)
    save_pretrained(DecoderLM(cfg, rngs=nnx.Rngs(0)), directory)
    CharTokenizer().save_pretrained(directory)


def maxabs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def flat(params) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)])


def quantities(ctx: Context, domain: dict, pool: dict, train_data: dict, test: list[dict] | None) -> dict:
    """Everything compared across meshes, computed the way the selection job does."""
    model = ctx.load_model(LORA, seed=7)
    subset = param_subset(model, nnx.LoRAParam)
    sfn = ntk_scalar_fn(subset)
    out = {"on_mesh": None if ctx.mesh is None else all(
        set(x.sharding.device_set) == set(ctx.mesh.devices.flat) for x in jax.tree.leaves(nnx.state(model)))}
    proj = RandomProjection(64, seed=1)
    out["dom_features"], out["pool_features"] = (
        gradient_features(sfn, subset.params, lm_batch(b, LM_INPUTS), projection=proj, batch_size=FEATURE_BLOCK)
        for b in (domain, pool))
    # the job's scores: the domain direction, then one JVP per candidate
    tangent = domain_direction(subset, sfn, domain, normalize="none", projection_dim=64, projection_seed=1,
                               batch_size=FEATURE_BLOCK)
    out["jvp_scores"] = np.asarray(directional_derivatives(sfn, subset.params, lm_batch(pool, LM_INPUTS), tangent,
                                                           batch_size=FEATURE_BLOCK), np.float64)
    out["hidden"] = mean_hidden_states(model, pool, batch_size=FEATURE_BLOCK)
    before = trainer.train_step_program._cache_size()
    result = trainer.train(model, train_data, TRAIN)
    out["train_compiles"] = trainer.train_step_program._cache_size() - before
    out["losses"] = [r["loss"] for r in result.history]
    out["grad_norms"] = [r["grad_norm"] for r in result.history]
    out["trained"] = flat(result.params)
    out["trained_on_mesh"] = None if ctx.mesh is None else all(
        set(x.sharding.device_set) == set(ctx.mesh.devices.flat) for x in jax.tree.leaves(result.params))
    out["eval_loss"] = trainer.evaluate(model, train_data, 5)
    if test is not None:
        out["finetune"] = evaluation.finetune_and_evaluate(ctx, records(12, 5), test, lora=LORA,
                                                           train_cfg=TRAIN.to_dict(), seed=2, eval_batch_size=7)
    return out


def resume_check(ctx: Context, train_data: dict, tmp: str, once: dict) -> dict:
    """Stop after 2 of 4 steps and resume from the checkpoint under the mesh, vs the
    uninterrupted run of :func:`quantities` on the same mesh (``once``)."""
    wd = os.path.join(tmp, "resumed")
    trainer.train(ctx.load_model(LORA, seed=7), train_data, TRAIN, workdir=wd, stop_at=2)
    resumed = trainer.train(ctx.load_model(LORA, seed=7), train_data, TRAIN, workdir=wd)
    return {"params": maxabs(once["trained"], flat(resumed.params)),
            "losses": maxabs(once["losses"], [r["loss"] for r in resumed.history]),
            "restored_on_mesh": all(set(x.sharding.device_set) == set(ctx.mesh.devices.flat)
                                    for x in jax.tree.leaves(resumed.params))}


def main(out_path: str) -> None:
    t0 = time.time()
    assert jax.device_count() == 8, jax.devices()
    tmp = tempfile.mkdtemp()
    model_dir = os.path.join(tmp, "model")
    checkpoint(model_dir)
    tok = load_tokenizer(model_dir)
    domain = encode_records(tok, records(6, 1), MAX_LEN)
    pool = encode_records(tok, records(11, 2), MAX_LEN)
    train_data = encode_records(tok, records(14, 3), MAX_LEN)
    test = records(9, 4, options=True)

    ref_ctx = Context(model_dir=model_dir, tokenizer=tok, max_len=MAX_LEN, seed=0, info={})
    ref = quantities(ref_ctx, domain, pool, train_data, test)
    report = {"devices": jax.device_count(), "meshes": {},
              "scale": {k: float(np.max(np.abs(ref[k]))) for k in
                        ("dom_features", "pool_features", "jvp_scores", "hidden", "trained")},
              "ref": {"losses": ref["losses"], "train_compiles": ref["train_compiles"],
                      "finetune": ref["finetune"], "eval_loss": ref["eval_loss"]},
              # independent oracle: JVP scores = <mean domain feature, candidate features>
              "jvp_vs_features": maxabs(ref["jvp_scores"], np.asarray(ref["pool_features"], np.float64)
                                         @ np.asarray(ref["dom_features"], np.float64).mean(axis=0))}

    for data, model_axis in MESHES:
        config = base_config()
        config.model.path = model_dir
        config.pretrain.max_len = MAX_LEN
        config.mesh.data, config.mesh.model = (-1, model_axis) if data == 8 else (data, model_axis)
        ctx = prepare_context(config, os.path.join(tmp, "work"))
        got = quantities(ctx, domain, pool, train_data, test if (data, model_axis) == (2, 4) else None)
        entry = {"mesh_shape": list(sh.mesh_shape(ctx.mesh)), "on_mesh": got["on_mesh"],
                 "trained_on_mesh": got["trained_on_mesh"], "train_compiles": got["train_compiles"],
                 "losses": got["losses"], "finetune": got.get("finetune"), "eval_loss": got["eval_loss"]}
        for k in ("dom_features", "pool_features", "jvp_scores", "hidden", "trained",
                  "losses", "grad_norms"):
            entry[k + "_err"] = maxabs(got[k], ref[k])
        report["meshes"][f"{data}x{model_axis}"] = entry
        if (data, model_axis) == (2, 4):
            report["resume"] = resume_check(ctx, train_data, tmp, got)

    errors = {}
    for name, (d, m) in {"no_fit": (3, 1), "no_divide": (-1, 3), "both_free": (-1, -1), "zero": (0, 1)}.items():
        config = base_config()
        config.model.path = model_dir
        config.mesh.data, config.mesh.model = d, m
        try:
            prepare_context(config, os.path.join(tmp, "work"))
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    report["mesh_errors"] = errors
    report["elapsed_s"] = time.time() - t0
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
