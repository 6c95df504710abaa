"""Mesh-equivalence checks on 8 simulated CPU devices (run by ``tests/test_sharding.py`` in a
subprocess, because the pytest process has already started JAX with one device).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python tests/sharding_checks.py OUT.json

For meshes (8,1), (2,4), (1,8) against the unsharded model on one device (float32):

* a tiny random Qwen3 checkpoint (GQA, q/k norm, head_dim != hidden/heads) written by
  ``transformers`` and loaded with ``from_pretrained(path, mesh=mesh, lora=...)``: logits,
  per-example gradient features of the sum-of-logits scalar function over the LoRA factors
  (exact and JL-projected), and the gradient of the LM loss w.r.t. the LoRA factors;
* where parameters really live (spec, number of devices, per-device block shape);
* the same checkpoint in this repo's own format (``ntk_jax_decoder``) loads sharded;
* GPT-2 and BERT checkpoints load under the (2,4) mesh and give the same outputs.

Writes a JSON report (max-abs errors and placements); the pytest side asserts on it.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NTK_JAX_NO_PROGRESS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from ntk_jax.kernels.features import make_feature_fn, sum_of_outputs  # noqa: E402
from ntk_jax.kernels.outputs import lm_output_fn  # noqa: E402
from ntk_jax.kernels.factored_projection import FactoredProjection  # noqa: E402
from ntk_jax.kernels.projection import RandomProjection  # noqa: E402
from ntk_jax.mesh import shard_batch  # noqa: E402
from ntk_jax.models import sharding as sh  # noqa: E402
from ntk_jax.models.hf_loading import from_pretrained  # noqa: E402
from ntk_jax.models.lora import LoRAConfig  # noqa: E402
from ntk_jax.models.subset import param_subset  # noqa: E402
from ntk_jax.models.transformer import save_pretrained  # noqa: E402
from ntk_jax.training.losses import lm_loss  # noqa: E402

MESHES = [(8, 1), (2, 4), (1, 8)]
V, N, T = 64, 8, 9
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
                  b_init_std=0.1)
# Parameters whose placement is reported: (name, per-mesh expected spec is computed by the test).
WATCH = ["embed_tokens.embedding", "layers.0.mlp.up_proj.kernel", "layers.0.mlp.down_proj.kernel",
         "layers.0.self_attn.q_proj.lora.lora_b", "layers.0.mlp.down_proj.lora.lora_a",
         "layers.0.self_attn.q_proj.lora.lora_a", "layers.0.self_attn.q_norm.weight", "lm_head.kernel"]


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if name.endswith(("norm.weight", "LayerNorm.weight")) else 0.3 * noise)
    return model


def qwen3_checkpoint(d):
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                   max_position_embeddings=64, rms_norm_eps=1e-5)
    randomize(transformers.Qwen3ForCausalLM(cfg).eval(), 1).save_pretrained(d)


def lm_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (N, T)).astype(np.int32)
    mask = np.ones((N, T), np.int32)
    mask[1, :3] = 0  # left-padded
    mask[2, 7:] = 0  # right-padded
    loss_mask = mask.copy()
    loss_mask[:, :4] = 0  # "response" tokens only
    targets = np.roll(ids, -1, axis=1)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask, "targets": targets}


def maxabs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def lm_quantities(model, batch, mesh):
    """logits (N,T,V), features exact (N,P), projected (N,64) by the dense map, by the factored map
    (the LoRA factors by its sparse hash; P > 64, so buckets collide) and by the factored map at
    p = 4096 ≥ P (an injective hash: the exact features up to signs and zero padding) and with
    every site on its Kronecker factors; LoRA loss-gradient (P,)."""
    if mesh is not None:
        batch = shard_batch(batch, mesh)
    logits = nnx.jit(lambda m, b: m(b["input_ids"], attention_mask=b["attention_mask"]))(model, batch)
    subset = param_subset(model, nnx.LoRAParam)
    scalar = sum_of_outputs(lm_output_fn(subset))
    exact = make_feature_fn(scalar)(subset.params, batch)
    projected = make_feature_fn(scalar, RandomProjection(dim=64, seed=3))(subset.params, batch)
    factored = {f"factored_{name}": np.asarray(make_feature_fn(scalar, proj)(subset.params, batch))
                for name, proj in (("sparse64", FactoredProjection(64, seed=3)),
                                   ("sparse4096", FactoredProjection(4096, seed=3)),
                                   ("kronecker64", FactoredProjection(64, seed=3, sparse_sites=False)))}
    grad = jax.jit(jax.grad(lambda p, b: lm_loss(subset.merge(p), b)))(subset.params, batch)
    flat_grad = np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(grad)])
    return {"logits": np.asarray(logits), "features": np.asarray(exact), "projected": np.asarray(projected),
            "grad": flat_grad, **factored}, {"features": exact.sharding, "params": subset.params}


def placement(model, names):
    state = nnx.state(model)
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        name = sh.path_name(path)
        if name in names:
            out[name] = {**sh.describe_sharding(x), "shape": list(x.shape)}
    return out


def main(out_path):
    assert jax.device_count() == 8, jax.devices()
    report = {"devices": jax.device_count(), "meshes": {}}
    tmp = tempfile.mkdtemp()
    qdir = os.path.join(tmp, "qwen3")
    qwen3_checkpoint(qdir)
    batch = lm_batch()

    ref_model = from_pretrained(qdir, lora=LORA, rngs=nnx.Rngs(5))
    ref, _ = lm_quantities(ref_model, batch, None)
    report["scale"] = {k: float(np.max(np.abs(v))) for k, v in ref.items()}
    report["sizes"] = {k: list(v.shape) for k, v in ref.items()}

    for data, model_axis in MESHES:
        mesh = sh.make_mesh(data, model_axis)
        m = from_pretrained(qdir, mesh=mesh, lora=LORA, rngs=nnx.Rngs(5))
        got, extra = lm_quantities(m, batch, mesh)
        entry = {k: maxabs(got[k], ref[k]) for k in ref}
        entry["placement"] = placement(m, WATCH)
        entry["feature_devices"] = len(extra["features"].device_set)
        entry["all_leaves_on_mesh"] = all(
            set(x.sharding.device_set) == set(mesh.devices.flat) for x in jax.tree.leaves(nnx.state(m)))
        report["meshes"][f"{data}x{model_axis}"] = entry

    # this repo's own format, sharded load on (2,4): same logits as the HF load
    own = os.path.join(tmp, "own")
    save_pretrained(ref_model, own)
    mesh = sh.make_mesh(2, 4)
    m_own = from_pretrained(own, mesh=mesh, lora=LORA, rngs=nnx.Rngs(5))
    b = shard_batch(batch, mesh)
    lo = nnx.jit(lambda m, b: m(b["input_ids"], attention_mask=b["attention_mask"]))(m_own, b)
    report["own_format"] = {"logits": maxabs(lo, ref["logits"]),
                            "placement": placement(m_own, ["layers.0.mlp.up_proj.kernel"])}

    # GPT-2 (vocab 50: not divisible by 4 -> replicated along vocab) and BERT on (2,4)
    torch.manual_seed(0)
    gdir = os.path.join(tmp, "gpt2")
    randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=24)), 2).save_pretrained(gdir)
    ids = batch["input_ids"] % 50
    gl = {}
    for name, msh in (("none", None), ("2x4", mesh)):
        g = from_pretrained(gdir, mesh=msh, lora={"rank": 2, "targets": ["c_attn", "c_fc"], "b_init_std": 0.1})
        x = ids if msh is None else shard_batch(ids, msh)
        gl[name] = np.asarray(nnx.jit(lambda m, x: m(x))(g, x))
    report["gpt2"] = {"logits": maxabs(gl["none"], gl["2x4"]), "scale": float(np.abs(gl["none"]).max()),
                      "placement": placement(g, ["wte.embedding", "h.0.attn.c_attn.kernel", "h.0.mlp.c_proj.kernel"])}

    bdir = os.path.join(tmp, "bert")
    torch.manual_seed(0)
    randomize(transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=24, num_labels=3)).eval(), 3).save_pretrained(bdir)
    bl = {}
    for name, msh in (("none", None), ("2x4", mesh)):
        bm = from_pretrained(bdir, mesh=msh, lora={"rank": 2, "targets": ["query", "value"], "b_init_std": 0.1})
        xs = (batch["input_ids"], batch["attention_mask"], np.zeros_like(batch["input_ids"]))
        if msh is not None:
            xs = shard_batch(xs, msh)
        bl[name] = np.asarray(nnx.jit(lambda m, a, b, c: m(a, b, c))(bm, *xs))
    report["bert"] = {"logits": maxabs(bl["none"], bl["2x4"]), "scale": float(np.abs(bl["none"]).max()),
                      "placement": placement(bm, ["bert.encoder.layer.0.intermediate.dense.kernel",
                                                  "bert.encoder.layer.0.output.dense.kernel",
                                                  "classifier.kernel"])}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
