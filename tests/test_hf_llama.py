"""Hugging Face Llama-family checkpoints -> ntk_jax DecoderLM: logits equal to PyTorch.

Every test builds a tiny random model with ``transformers`` itself (no hub access), writes it
with ``save_pretrained`` and loads it with :func:`ntk_jax.models.hf_loading.from_pretrained`.
Weights are re-drawn at O(1) scale (norm weights and biases included), so logits are O(1-10)
and an absolute tolerance of 1e-4 is meaningful.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ntk_jax.models import hf_loading, layers, ports  # noqa: E402
from ntk_jax.models.hf_loading import (config_from_hf, from_pretrained, load_safetensors_dir,  # noqa: E402
                                       load_tokenizer)
from ntk_jax.models.lora import LoRAConfig, iter_linears  # noqa: E402
from ntk_jax.models.ports import register_architecture  # noqa: E402
from ntk_jax.models.transformer import DecoderConfig, DecoderLM  # noqa: E402

V = 64
ATOL = 1e-4
MAX_ERR: dict[str, float] = {}  # measured max-abs errors, printed at the end (pytest -s)

HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)

CASES = {
    # GQA ratio 1 (MHA), untied
    "llama_mha": ("llama", dict(num_key_value_heads=4)),
    # GQA ratio 2, tied embeddings
    "llama_gqa2_tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # GQA ratio 4 (MQA), attention_bias (q/k/v/o biases) and mlp_bias
    "llama_mqa_bias": ("llama", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    # llama3 rope scaling (head_dim 8, theta 500: one high, one medium, two low frequencies)
    "llama3_rope": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "linear_rope": ("llama", dict(num_key_value_heads=2,
                                  rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    # YaRN (head_dim 8 over 16 original positions: the ramp spans the middle frequencies;
    # attention factor 0.1 ln 4 + 1 on cos/sin), and with every optional key
    "yarn_rope": ("llama", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
    "qwen3_yarn_options": ("qwen3", dict(num_key_value_heads=2, head_dim=16, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=8.0, original_max_position_embeddings=8, beta_fast=16.0,
        beta_slow=2.0, truncate=False, mscale=0.707, mscale_all_dim=1.0))),
    "mistral_yarn_attention_factor": ("mistral", dict(num_key_value_heads=2, sliding_window=None, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=2.0, original_max_position_embeddings=32,
        attention_factor=1.3))),
    # Qwen2: q/k/v biases, no o_proj bias
    "qwen2": ("qwen2", dict(num_key_value_heads=2)),
    # a gated MLP with another activation than SiLU (HF's ACT2FN name)
    "llama_gelu_tanh_act": ("llama", dict(num_key_value_heads=2, hidden_act="gelu_pytorch_tanh")),
    # Qwen3: q/k RMSNorm, head_dim != hidden / heads
    "qwen3_headdim": ("qwen3", dict(num_key_value_heads=2, head_dim=12)),
    # Qwen3 with sliding window on layer 1 only (max_window_layers=1), biases, tied
    "qwen3_sliding": ("qwen3", dict(num_key_value_heads=1, head_dim=12, attention_bias=True,
                                    tie_word_embeddings=True, use_sliding_window=True,
                                    sliding_window=3, max_window_layers=1)),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
    # Mistral sliding window (3 < sequence length 9) on every layer
    "mistral_sliding": ("mistral", dict(num_key_value_heads=1, sliding_window=3)),
}


def make_hf_model(arch: str, seed: int = 0, **kw):
    """A tiny random ``*ForCausalLM`` in float32 eval mode, weights at O(1) scale."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[arch])
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5)
    base.update(kw)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**base)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(noise)
            else:
                p.copy_(0.3 * noise)
    return model


def batch(seed: int = 0):
    """3 rows of length 9: unpadded, left-padded (3 pads), right-padded (2 pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (3, 9)).astype(np.int32)
    mask = np.ones((3, 9), np.int32)
    mask[1, :3] = 0
    mask[2, 7:] = 0
    return ids, mask


def torch_logits(model, ids, mask=None):
    """HF logits; position ids ``cumsum(mask) - 1`` as ``generate`` does (and DecoderLM)."""
    kw = {}
    if mask is not None:
        pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
        kw = dict(attention_mask=torch.tensor(mask, dtype=torch.long),
                  position_ids=torch.tensor(pos, dtype=torch.long))
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


@nnx.jit
def fwd(model, ids, mask=None):
    return model(ids, attention_mask=mask)


def max_err_real(a, b, mask):
    """Max |a - b| over real-token positions."""
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask) != 0].max())


def check_logits(model, hf_model, seed=0, atol=ATOL, name=None):
    ids, mask = batch(seed)
    err_pad = max_err_real(fwd(model, ids, mask), torch_logits(hf_model, ids, mask), mask)
    # unpadded: an all-ones mask for DecoderLM (same compiled shape), no mask for torch
    full = np.ones_like(mask)
    err_nopad = max_err_real(fwd(model, ids, full), torch_logits(hf_model, ids), full)
    if name:
        MAX_ERR[name] = max(err_pad, err_nopad)
    assert err_pad <= atol and err_nopad <= atol, (err_pad, err_nopad)
    return ids, mask


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if MAX_ERR:
        print("\nmax-abs logit errors vs transformers:")
        for k, v in MAX_ERR.items():
            print(f"  {k:24s} {v:.2e}")


# ------------------------------------------------------------------------------ architectures


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    arch, kw = CASES[case]
    hf = make_hf_model(arch, seed=len(case), **kw)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    cfg = model.config
    assert isinstance(model, DecoderLM) and cfg.param_dtype == "float32"
    assert cfg.num_kv_heads == kw["num_key_value_heads"]
    assert (model.lm_head is None) == bool(kw.get("tie_word_embeddings", False))
    assert cfg.qk_norm == (arch == "qwen3")
    if case == "qwen3_headdim":
        assert cfg.head_dim == 12 and model.layers[0].self_attn.q_proj.kernel.shape == (32, 48)
    if case == "qwen2":
        assert cfg.attention_bias and not cfg.o_proj_bias
        assert model.layers[0].self_attn.o_proj.bias is None
    if case == "llama_mqa_bias":
        assert model.layers[0].self_attn.o_proj.bias is not None and model.layers[0].mlp.up_proj.bias is not None
    if case == "llama3_rope":
        assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500.0
    if case == "qwen3_sliding":
        assert cfg.sliding_window == 3 and cfg.layer_types == ("full_attention", "sliding_attention")
    if case == "mistral_sliding":
        assert cfg.sliding_window == 3 and cfg.layer_types is None
    ids, mask = check_logits(model, hf, seed=len(case), name=case)
    if cfg.sliding_window is not None or cfg.rope_scaling is not None:
        # the feature changes the logits at this length, so the comparison above tests it
        import dataclasses
        plain = dataclasses.replace(cfg, sliding_window=None, layer_types=None, rope_scaling=None)
        other = DecoderLM(plain, rngs=nnx.Rngs(0))
        nnx.update(other, nnx.state(model, nnx.Param))
        full = np.ones_like(mask)
        assert np.abs(np.asarray(fwd(other, ids, full)) - np.asarray(fwd(model, ids, full))).max() > 1e-2


@pytest.mark.parametrize("case", ["llama_gqa2_tied", "llama_mqa_bias", "qwen3_sliding", "mistral_sliding"])
def test_blocked_causal_attention_matches_transformers(tmp_path, case, monkeypatch):
    """Causal attention in query blocks of 4 rows (blocks 4, 4, 1 of the length-9 rows), with
    left and right padding, GQA/MQA and sliding windows, against ``transformers``."""
    monkeypatch.setattr(layers, "CAUSAL_QUERY_BLOCK", 4)
    arch, kw = CASES[case]
    hf = make_hf_model(arch, seed=len(case), **kw)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    ids, mask = batch(len(case))
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))  # eager: traced with the patched block
    assert max_err_real(out, torch_logits(hf, ids, mask), mask) <= ATOL


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model("llama", seed=3, num_key_value_heads=2)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    tensors = load_safetensors_dir(tmp_path)
    assert len(tensors) == len(hf.state_dict())
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.q_proj.weight"],
                                  hf.model.layers[1].self_attn.q_proj.weight.detach().numpy())
    check_logits(from_pretrained(tmp_path), hf, seed=3, name="llama_sharded")


def test_bf16_checkpoint(tmp_path):
    import ml_dtypes

    import copy

    hf32 = make_hf_model("qwen3", seed=4, num_key_value_heads=2)
    with torch.no_grad():  # bf16-representable float32 weights
        for p in hf32.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    # (a copy: .to() also casts the RoPE inv_freq buffer, which the fp32 reference must keep)
    hf = copy.deepcopy(hf32).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    tensors = load_safetensors_dir(tmp_path)
    assert tensors["model.norm.weight"].dtype == ml_dtypes.bfloat16
    # float32 parameters (default): exactly the bf16 values, compared with the fp32 model of them
    model = from_pretrained(tmp_path)
    assert model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32
    check_logits(model, hf32, seed=4, name="qwen3_bf16_ckpt_fp32")
    # bf16 parameters and compute vs torch in bf16 (different kernels: a loose tolerance)
    model16 = from_pretrained(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    assert model16.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    ids, mask = batch(4)
    ref = torch_logits(hf, ids, mask)
    err = max_err_real(fwd(model16, ids, mask), ref, mask)
    MAX_ERR["qwen3_bf16_compute"] = err
    assert err <= 0.05 * np.abs(ref).max(), (err, np.abs(ref).max())


def test_lora_after_loading_is_identity(tmp_path):
    hf = make_hf_model("llama", seed=5, num_key_value_heads=2)
    hf.save_pretrained(tmp_path)
    base = from_pretrained(tmp_path)
    lcfg = LoRAConfig(rank=2, targets=("q_proj", "v_proj", "down_proj"), layers=(1,))
    model = from_pretrained(tmp_path, lora=lcfg, rngs=nnx.Rngs(7))
    adapted = [p for p, lin in iter_linears(model) if lin.lora is not None]
    assert sorted(adapted) == sorted([("layers", 1, "self_attn", "q_proj"), ("layers", 1, "self_attn", "v_proj"),
                                      ("layers", 1, "mlp", "down_proj")])
    ids, mask = batch(5)
    np.testing.assert_array_equal(np.asarray(fwd(model, ids, mask)), np.asarray(fwd(base, ids, mask)))
    check_logits(model, hf, seed=5)


# ------------------------------------------------------------------------------ config / errors


def test_config_conversion_and_rope_errors():
    hf = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  rope_parameters=LLAMA3_ROPE).to_dict()
    cfg = config_from_hf(hf)
    assert cfg.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert DecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hash(cfg)  # static config of an NNX module: must stay hashable
    # transformers v4 layout: top-level rope_theta, legacy "type" key
    v4 = {k: v for k, v in hf.items() if k != "rope_parameters"}
    v4.update(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})
    c4 = config_from_hf(v4)
    assert c4.rope_theta == 1e4 and dict(c4.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="'yarn' is missing \\['original_max_position_embeddings'\\]"):
        config_from_hf({**v4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'dynamic'.*yarn"):
        config_from_hf({**v4, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="unsupported keys \\['beta'\\].*optionally"):
        config_from_hf({**v4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 8, "beta": 1.0}})
    assert config_from_hf({**v4, "hidden_act": "gelu"}).hidden_act == "gelu"
    with pytest.raises(ValueError, match="unsupported activation 'xielu'; supported: .*silu"):
        config_from_hf({**v4, "hidden_act": "xielu"})
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'.*llama.*mistral.*qwen2.*qwen3"):
        config_from_hf({**v4, "model_type": "gpt_neox"})


def _save_tiny(tmp_path):
    hf = make_hf_model("llama", seed=6, num_key_value_heads=2)
    hf.save_pretrained(tmp_path)
    return load_safetensors_dir(tmp_path)


def test_load_errors(tmp_path):
    from safetensors.numpy import save_file

    tensors = _save_tiny(tmp_path)
    wpath = str(tmp_path / "model.safetensors")

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, wpath, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(tmp_path)

    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = np.ones((12, 32), np.float32)
    save_file(bad, wpath, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(12, 32\).*\(16, 32\)"):
        from_pretrained(tmp_path)

    extra = dict(tensors)
    extra["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(extra, wpath, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.2\.mlp\.up_proj\.weight"):
        from_pretrained(tmp_path)

    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**cfg, "model_type": "gpt_neox"}, f)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
        from_pretrained(tmp_path)

    os.remove(wpath)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="mesh"):
        from_pretrained(tmp_path, mesh=object())


def test_own_format_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ntk_jax.models.transformer import save_pretrained

    cfg = DecoderConfig(vocab_size=V, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                        qk_norm=True, rope_scaling={"rope_type": "linear", "factor": 2.0}, sliding_window=4)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, param_dtype="bfloat16")
    assert loaded.config == DecoderConfig.from_dict({**cfg.to_dict(), "param_dtype": "bfloat16"})
    assert loaded.layers[0].self_attn.q_norm.weight[...].dtype == jnp.bfloat16

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok")("hello world foo")["input_ids"] == [1, 2, 0]


def test_register_architecture(tmp_path, monkeypatch):
    """A toy architecture with dropout (non-parameter RNG state) through the generic loader."""
    import dataclasses

    from safetensors.numpy import save_file

    from ntk_jax.models.lora import LoRALinear

    from ntk_jax.models import ports

    ports.discover_ports()  # the library's ports registered before the registry is swapped for a copy
    monkeypatch.setattr(ports, "_REGISTRY", dict(ports._REGISTRY))

    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        d_in: int
        d_out: int
        dtype: str = "float32"
        param_dtype: str = "float32"

    class Toy(nnx.Module):
        def __init__(self, c, *, rngs):
            self.fc = LoRALinear(c.d_in, c.d_out, use_bias=True, rngs=rngs, param_dtype=jnp.dtype(c.param_dtype))
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.fc(x))

    def weight_map(c, names):
        return hf_loading.WeightMap((hf_loading.TensorMap("toy.fc.weight", "fc.kernel", transpose=True),
                                     hf_loading.TensorMap("toy.fc.bias", "fc.bias")), ignore=(r"^toy\.buffer$",))

    register_architecture("toy", lambda d: ToyConfig(d["d_in"], d["d_out"]), Toy, weight_map)
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("toy", lambda d: None, Toy, weight_map)
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    save_file({"toy.fc.weight": w, "toy.fc.bias": np.ones(3, np.float32), "toy.buffer": np.zeros(1, np.float32)},
              str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "toy", "d_in": 2, "d_out": 3}, f)
    model = from_pretrained(tmp_path, lora=LoRAConfig(rank=1, targets=("fc",)))
    np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), w.T)
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(jnp.ones((1, 2)))), [[2.0, 6.0, 10.0]])
    model.train()
    assert model(jnp.ones((4, 2))).shape == (4, 3)  # dropout RNG state was materialised
    assert "toy" in ports.supported_model_types()
