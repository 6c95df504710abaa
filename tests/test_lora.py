"""LoRA attachment by name/layer, parameter subsets, and their errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_jax.models.lora import LoRAConfig, apply_lora, linear_names, lora_filter
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
