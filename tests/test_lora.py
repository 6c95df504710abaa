"""LoRA attachment by name/layer, parameter subsets, and their errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_jax.models.lora import (LoRAConfig, apply_lora, block_linear_names, iter_linears, linear_names, lora_config,
                                 lora_filter, resolve_targets)
from ntk_jax.models.subset import param_subset
from ntk_jax.models.transformer import DecoderConfig, DecoderLM


def model_with_lora(**kw):
    m = DecoderLM(DecoderConfig(vocab_size=13, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24),
                  rngs=nnx.Rngs(0))
    apply_lora(m, LoRAConfig(**{"rank": 2, "targets": ("q_proj", "v_proj", "down_proj"), **kw}), rngs=nnx.Rngs(1))
    return m


def test_apply_lora_by_name_and_layer():
    m = DecoderLM(DecoderConfig(vocab_size=13, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24),
                  rngs=nnx.Rngs(0))
    paths = apply_lora(m, LoRAConfig(rank=2, targets=("q_proj", "down_proj"), layers=(0, 2)), rngs=nnx.Rngs(1))
    assert sorted(paths) == [("layers", 0, "mlp", "down_proj"), ("layers", 0, "self_attn", "q_proj"),
                             ("layers", 2, "mlp", "down_proj"), ("layers", 2, "self_attn", "q_proj")]
    assert m.layers[1].self_attn.q_proj.lora is None
    assert m.layers[0].self_attn.q_proj.lora.lora_a[...].shape == (16, 2)
    assert m.layers[0].mlp.down_proj.lora.lora_b[...].shape == (2, 16)


def test_subset_sizes_follow_the_filter():
    m = model_with_lora()
    per_layer_q = 16 * 2 + 2 * 16
    per_layer_v = 16 * 2 + 2 * 16  # 2 kv heads * head_dim 8 = 16
    per_layer_down = 24 * 2 + 2 * 16
    assert param_subset(m).num_params == 3 * (per_layer_q + per_layer_v + per_layer_down)
    assert param_subset(m, lora_filter(layers=[1])).num_params == per_layer_q + per_layer_v + per_layer_down
    assert param_subset(m, lora_filter(layers=[0, 2], targets=["q_proj"])).num_params == 2 * per_layer_q


def test_subset_apply_fn_gradients_touch_only_the_subset():
    m = model_with_lora(b_init_std=0.1)
    sub = param_subset(m, lora_filter(layers=[2], targets=["v_proj"]))
    f = sub.apply_fn(lambda model, x: model(x))
    x = jnp.array([[1, 2, 3, 4]])
    np.testing.assert_allclose(f(sub.params, x), m(x), rtol=1e-6)
    g = jax.grad(lambda p: f(p, x).sum())(sub.params)
    assert set(g["layers"]) == {2} and set(g["layers"][2]["self_attn"]) == {"v_proj"}
    moved = jax.tree.map(lambda a: a + 1.0, sub.params)
    sub.update_model(m, moved)
    np.testing.assert_array_equal(m.layers[2].self_attn.v_proj.lora.lora_a[...],
                                  moved["layers"][2]["self_attn"]["v_proj"]["lora"]["lora_a"])


def test_errors():
    m = model_with_lora()
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qproj'\]"):
        apply_lora(m, LoRAConfig(targets=("qproj",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="out of range"):
        apply_lora(m, LoRAConfig(targets=("q_proj",), layers=(3,)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="parameter subset is empty"):
        param_subset(m, lora_filter(targets=["k_proj"]))
    base = DecoderLM(DecoderConfig(vocab_size=13, hidden_size=16, num_layers=1, num_heads=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="parameter subset is empty"):
        param_subset(base)
    with pytest.raises(ValueError, match="unknown LoRA config keys"):
        LoRAConfig.from_dict({"rank": 4, "rnak": 2})
    with pytest.raises(ValueError, match="rank must be positive"):
        LoRAConfig(rank=0)
    assert "gate_proj" in linear_names(m)


def test_all_linear_adapts_every_block_projection_and_not_the_head():
    cfg = DecoderConfig(vocab_size=13, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                        tie_word_embeddings=False)
    m = DecoderLM(cfg, rngs=nnx.Rngs(0))
    assert "lm_head" in linear_names(m) and "lm_head" not in block_linear_names(m)
    paths = apply_lora(m, LoRAConfig(rank=2, targets="all-linear"), rngs=nnx.Rngs(1))
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert resolve_targets(m, ("all-linear",)) == tuple(sorted(names))
    assert len(paths) == 2 * len(names) and {p[-1] for p in paths} == set(names)
    assert m.lm_head.lora is None
    # the same adapters as naming the seven projections
    m2 = DecoderLM(cfg, rngs=nnx.Rngs(0))
    assert sorted(apply_lora(m2, LoRAConfig(rank=2, targets=names), rngs=nnx.Rngs(1))) == sorted(paths)
    assert param_subset(m).num_params == param_subset(m2).num_params


def test_all_linear_on_the_gpt2_and_bert_ports():
    from ntk_jax.models import bert, gpt2
    g = gpt2.GPT2LMHeadModel(gpt2.GPT2Config(vocab_size=10, n_embd=16, n_head=2, n_layer=2), rngs=nnx.Rngs(0))
    paths = apply_lora(g, LoRAConfig(rank=2, targets=("all-linear",)), rngs=nnx.Rngs(1))
    assert sorted({p[-1] for p in paths}) == ["c_attn", "c_fc", "c_proj"] and len(paths) == 8
    bcfg = bert.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, num_labels=3)
    b = bert.BertForSequenceClassification(bcfg, rngs=nnx.Rngs(0))
    outside = [p for p, _ in iter_linears(b) if not any(isinstance(i, int) for i in p)]
    assert ("bert", "pooler", "dense") in outside and ("classifier",) in outside
    paths = apply_lora(b, LoRAConfig(rank=2, targets="all-linear"), rngs=nnx.Rngs(1))
    assert len(paths) == 2 * 6 and all(any(isinstance(i, int) for i in p) for p in paths)
    assert all(lin.lora is None for p, lin in iter_linears(b) if p in outside)
    # naming "dense" adapts every projection of that name, the pooler's too
    b2 = bert.BertForSequenceClassification(bcfg, rngs=nnx.Rngs(0))
    named = apply_lora(b2, LoRAConfig(rank=2, targets=("dense",)), rngs=nnx.Rngs(1))
    assert ("bert", "pooler", "dense") in named


def test_targets_as_a_string_and_all_linear_errors():
    assert LoRAConfig(targets="q_proj").targets == ("q_proj",)
    assert LoRAConfig.from_dict({"targets": "all-linear"}).targets == ("all-linear",)
    assert tuple(lora_config(targets="all-linear").targets) == ("all-linear",)
    with pytest.raises(ValueError, match="give it alone"):
        LoRAConfig(targets=("all-linear", "q_proj"))
    m = model_with_lora()
    assert resolve_targets(m, ("q_proj", "v_proj")) == ("q_proj", "v_proj")
