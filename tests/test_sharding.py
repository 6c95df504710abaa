"""Device-mesh sharding (ntk_jax.models.sharding, from_pretrained(mesh=)) and the memory
estimator (ntk_jax.launcher.memory, benchmarks/memory_table.py).

The 8-device checks run in ONE subprocess (``tests/sharding_checks.py``) started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, because this process already has JAX
with one CPU device. Everything else runs here on abstract (``nnx.eval_shape``) models.
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
from jax.sharding import PartitionSpec as P

from ntk_jax.mesh import shard_batch
from ntk_jax.models import sharding as sh
from ntk_jax.models.lora import LoRAConfig, apply_lora
from ntk_jax.launcher.memory import LLAMA3_8B, QWEN3_8B, abstract_model, decoder_config, estimate_memory, param_memory
from ntk_jax.models.transformer import DecoderConfig, DecoderLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env8():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu",
               NTK_JAX_NO_PROGRESS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


# ----------------------------------------------------------------------------- mesh / rules


def test_make_mesh_axes_and_device_count_error():
    mesh = sh.make_mesh(1, 1)
    assert mesh.axis_names == ("data", "model") and sh.mesh_shape(mesh) == (1, 1)
    with pytest.raises(ValueError, match=r"data\*model = 2\*1 = 2 does not match the 1 device"):
        sh.make_mesh(2, 1)
    with pytest.raises(ValueError, match="positive int"):
        sh.make_mesh(0, 1)


def test_fit_spec_fallback_and_strict():
    axes = {"data": 2, "model": 4}
    assert sh.fit_spec("w", P("data", "model"), (6, 8), axes) == (P("data", "model"), [])
    spec, notes = sh.fit_spec("wte.embedding", P("model", "data"), (50, 32), axes)
    assert spec == P(None, "data") and "wte.embedding" in notes[0] and "50" in notes[0]
    with pytest.raises(ValueError, match=r"wte\.embedding: dim 0 \(size 50\)"):
        sh.fit_spec("wte.embedding", P("model", "data"), (50, 32), axes, strict=True)
    # axes of size 1 are dropped
    assert sh.fit_spec("w", P("data", "model"), (6, 8), {"data": 1, "model": 8})[0] == P(None, "model")
    with pytest.raises(ValueError, match="has 2 entries"):
        sh.fit_spec("b", P("data", "model"), (8,), axes)


def test_unmatched_parameter_is_named():
    with pytest.raises(ValueError, match="no partition rule matches parameter 'foo.weird'"):
        sh.spec_for("foo.weird")


def _all_specs(model):
    plan = sh.sharding_plan(model, sh.make_mesh(1, 1))  # completeness: raises on an unmatched leaf
    return {n: sh.spec_for(n) for n in plan.specs if not n.endswith(("count", "key"))}


def test_rules_cover_decoder_with_megatron_roles():
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12,
                        intermediate_size=48, attention_bias=True, o_proj_bias=True, mlp_bias=True, qk_norm=True)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    m = abstract_model(cfg, LoRAConfig(rank=4, targets=targets))
    specs = _all_specs(m)
    col, row = P("data", "model"), P("model", "data")
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert specs[f"layers.1.{proj}.kernel"] == col
        assert specs[f"layers.1.{proj}.bias"] == P("model")
        assert specs[f"layers.1.{proj}.lora.lora_b"] == P(None, "model")
        assert specs[f"layers.1.{proj}.lora.lora_a"] == P()
    for proj in ("self_attn.o_proj", "mlp.down_proj"):
        assert specs[f"layers.1.{proj}.kernel"] == row
        assert specs[f"layers.1.{proj}.bias"] == P()
        assert specs[f"layers.1.{proj}.lora.lora_a"] == P("model", None)
        assert specs[f"layers.1.{proj}.lora.lora_b"] == P()
    assert specs["embed_tokens.embedding"] == P("model", "data")
    assert specs["lm_head.kernel"] == col and specs["lm_head.lora.lora_b"] == P(None, "model")
    for n in ("norm.weight", "layers.0.input_layernorm.weight", "layers.0.self_attn.q_norm.weight",
              "layers.0.self_attn.k_norm.weight", "layers.0.post_attention_layernorm.weight"):
        assert specs[n] == P()


def test_rules_cover_gpt2_and_bert():
    from ntk_jax.models import bert, gpt2

    def build_gpt2():
        m = gpt2.GPT2LMHeadModel(gpt2.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                                                 tie_word_embeddings=False), rngs=nnx.Rngs(0))
        apply_lora(m, LoRAConfig(rank=2, targets=("c_attn", "c_proj", "c_fc")), rngs=nnx.Rngs(1))
        return m

    g = nnx.eval_shape(build_gpt2)
    specs = _all_specs(g)
    assert specs["h.0.attn.c_attn.kernel"] == P("data", "model")
    assert specs["h.0.attn.c_proj.kernel"] == P("model", "data")
    assert specs["h.0.mlp.c_fc.kernel"] == P("data", "model")
    assert specs["h.0.mlp.c_proj.kernel"] == P("model", "data")
    assert specs["wte.embedding"] == P("model", "data") and specs["wpe.embedding"] == P(None, "data")
    assert specs["h.0.ln_1.weight"] == P() and specs["ln_f.bias"] == P()
    c = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
    for cls, base in ((bert.BertForSequenceClassification, "bert"), (bert.RobertaForSequenceClassification, "roberta")):
        m = nnx.eval_shape(lambda: cls(c, rngs=nnx.Rngs(0)))  # noqa: B023
        specs = _all_specs(m)
        lay = f"{base}.encoder.layer.0."
        assert specs[lay + "attention.self.query.kernel"] == P("data", "model")
        assert specs[lay + "attention.output.dense.kernel"] == P("model", "data")
        assert specs[lay + "intermediate.dense.kernel"] == P("data", "model")
        assert specs[lay + "output.dense.kernel"] == P("model", "data")
        assert specs[lay + "output.LayerNorm.weight"] == P()
        assert specs[f"{base}.embeddings.word_embeddings.embedding"] == P("model", "data")
        assert all(s == P() for n, s in specs.items() if n.startswith("classifier"))


def test_shard_model_and_batch_on_one_device():
    m = DecoderLM(DecoderConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16),
                  rngs=nnx.Rngs(0))
    mesh = sh.make_mesh(1, 1)
    before = np.asarray(m.layers[0].mlp.up_proj.kernel[...])
    plan = sh.shard_model(m, mesh)
    assert not plan.fallbacks
    np.testing.assert_array_equal(np.asarray(m.layers[0].mlp.up_proj.kernel[...]), before)
    b = shard_batch({"input_ids": np.zeros((3, 4), np.int32)}, mesh)
    assert b["input_ids"].sharding.spec == P("data")
    with pytest.raises(ValueError, match="is a scalar"):
        shard_batch({"x": np.float32(1.0)}, mesh)


def test_from_pretrained_rejects_non_mesh(tiny_model_dir):
    from ntk_jax.models.hf_loading import from_pretrained

    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        from_pretrained(tiny_model_dir, mesh=(1, 8))


def test_from_pretrained_mesh_own_format_one_device(tiny_model_dir):
    """The sharded load path of this repo's own format equals the plain load (1x1 mesh)."""
    from ntk_jax.models.hf_loading import from_pretrained

    lora = LoRAConfig(rank=2, targets=("q_proj",), b_init_std=0.1)
    a = from_pretrained(tiny_model_dir, lora=lora, rngs=nnx.Rngs(3))
    b = from_pretrained(tiny_model_dir, lora=lora, rngs=nnx.Rngs(3), mesh=sh.make_mesh(1, 1))
    la, lb = (jax.tree.leaves(nnx.state(x, nnx.Param)) for x in (a, b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- 8 devices


@pytest.mark.slow
def test_meshes_match_one_device(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharding_checks.py"), str(out)],
                          env=_env8(), cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["devices"] == 8
    scale = r["scale"]
    assert r["sizes"]["features"][1] > 1000  # P: LoRA factors of 5 projections
    for mesh_name, entry in r["meshes"].items():
        for k in ("logits", "features", "projected", "grad", "factored_sparse64", "factored_sparse4096",
                  "factored_kronecker64"):
            assert entry[k] <= 2e-5 * max(scale[k], 1.0), (mesh_name, k, entry[k], scale[k])
        assert entry["all_leaves_on_mesh"] and entry["feature_devices"] == 8
    place = {m: r["meshes"][m]["placement"] for m in r["meshes"]}
    # (1,8): the MLP up kernel (32, 48) is split over its output features on all 8 devices
    up = place["1x8"]["layers.0.mlp.up_proj.kernel"]
    assert up["num_devices"] == 8 and up["shard_shape"] == [32, 6]
    assert place["1x8"]["embed_tokens.embedding"]["shard_shape"] == [8, 32]
    assert place["1x8"]["layers.0.mlp.down_proj.lora.lora_a"]["shard_shape"] == [6, 4]
    assert place["1x8"]["layers.0.self_attn.q_proj.lora.lora_b"]["shard_shape"] == [4, 6]
    # (8,1): FSDP over the hidden dimension
    assert place["8x1"]["layers.0.mlp.up_proj.kernel"]["shard_shape"] == [4, 48]
    assert place["8x1"]["layers.0.mlp.down_proj.kernel"]["shard_shape"] == [48, 4]
    # (2,4): both
    assert place["2x4"]["layers.0.mlp.up_proj.kernel"]["shard_shape"] == [16, 12]
    assert place["2x4"]["lm_head.kernel"]["shard_shape"] == [16, 16]
    for m in place:
        assert place[m]["layers.0.self_attn.q_norm.weight"]["shard_shape"] == [12]  # replicated
    assert r["own_format"]["logits"] <= 2e-5 * scale["logits"]
    assert r["own_format"]["placement"]["layers.0.mlp.up_proj.kernel"]["shard_shape"] == [16, 12]
    for name in ("gpt2", "bert"):
        assert r[name]["logits"] <= 2e-5 * max(r[name]["scale"], 1.0), (name, r[name])
    # GPT-2 vocab 50 is not divisible by model=4: replicated along the vocabulary, hidden split over data
    assert r["gpt2"]["placement"]["wte.embedding"]["shard_shape"] == [50, 16]
    assert r["gpt2"]["placement"]["h.0.attn.c_attn.kernel"]["shard_shape"] == [16, 24]
    assert r["bert"]["placement"]["bert.encoder.layer.0.output.dense.kernel"]["shard_shape"] == [12, 16]
    assert r["bert"]["placement"]["classifier.kernel"]["shard_shape"] == [32, 3]


# ----------------------------------------------------------------------------- memory


def _closed_form_counts(c: DecoderConfig, rank: int, targets):
    H, I, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = H * q + 2 * H * kv + q * H + 3 * H * I + 2 * H + (2 * c.head_dim if c.qk_norm else 0)
    base = V * H + L * per_layer + H + (0 if c.tie_word_embeddings else H * V)
    dims = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    lora = L * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)
    return base, lora


@pytest.mark.parametrize("qk_norm,tied", [(False, False), (True, True)])
def test_param_memory_closed_form(qk_norm, tied):
    cfg = DecoderConfig(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12,
                        intermediate_size=40, qk_norm=qk_norm, tie_word_embeddings=tied)
    targets = ("q_proj", "v_proj", "down_proj")
    cfg16 = decoder_config(cfg)  # bf16 parameters
    r = estimate_memory(cfg16, LoRAConfig(rank=4, targets=targets), compile=False)["params"]
    base, lora = _closed_form_counts(cfg, 4, targets)
    assert (r["base_params"], r["lora_params"]) == (base, lora)
    assert (r["base_bytes"], r["lora_bytes"]) == (2 * base, 2 * lora)
    assert r["base_bytes_per_device"] == r["base_bytes"]  # 1x1 mesh
    # (1,4): every dimension here that the rules split is divisible by 4, so every split leaf is /4;
    # replicated leaves (norms, o/down biases, unsplit LoRA factors) stay whole.
    m = abstract_model(cfg16, LoRAConfig(rank=4, targets=targets))
    p4 = param_memory(m, (1, 4))
    replicated = 2 * (cfg.num_layers * (2 * cfg.hidden_size + (2 * cfg.head_dim if qk_norm else 0)) + cfg.hidden_size)
    assert p4["base_bytes_per_device"] == replicated + (r["base_bytes"] - replicated) // 4


def test_8b_parameter_counts_match_published_sizes():
    """Llama-3-8B has 8.03 B parameters, Qwen3-8B 8.19 B (model cards); LoRA r=8 on q,k,v,o
    of Llama-3-8B: 32·8·(2·(4096+4096) + 2·(4096+1024)) = 6.82 M."""
    tg = ("q_proj", "k_proj", "v_proj", "o_proj")
    ll = estimate_memory(LLAMA3_8B, LoRAConfig(rank=8, targets=tg), compile=False)["params"]
    qw = estimate_memory(QWEN3_8B, LoRAConfig(rank=8, targets=tg), compile=False)["params"]
    assert abs(ll["base_params"] / 1e9 - 8.03) < 0.01 and abs(qw["base_params"] / 1e9 - 8.19) < 0.01
    assert ll["lora_params"] == 32 * 8 * (2 * 8192 + 2 * 5120)
    assert ll["base_bytes"] == 2 * ll["base_params"]


@pytest.mark.slow
@pytest.mark.benchmark
def test_memory_table_quick(tmp_path):
    out_md = tmp_path / "memory.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "memory_table.py"), "--quick",
                           "--out", str(out_md)], env=_env8(), cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout)["rows"]
    assert [tuple(r["mesh"]) for r in rows] == [(1, 1), (2, 4)]
    one, eight = rows
    # weights per device shrink under the 2x4 mesh; per-example gradients are (n, P) float32 on one device
    assert eight["params"]["base_bytes_per_device"] < one["params"]["base_bytes_per_device"]
    P_lora = one["params"]["lora_params"]
    assert one["per_example_grad_bytes"] == 8 * P_lora * 2  # n=8, bf16 gradients
    for r in rows:
        chk = r["extrapolation_check"]
        for prog in ("forward", "features"):
            assert abs(chk[prog]["temp_extrapolated"] - chk[prog]["temp_measured"]) <= 0.1 * chk[prog]["temp_measured"]
            assert chk[prog]["output_extrapolated"] == chk[prog]["output_measured"]
    text = out_md.read_text()
    assert "| tiny | 4 | 2x4 |" in text and "per-ex grads" in text
