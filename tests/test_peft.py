"""PEFT export of LoRA adapters: the PyTorch model with the exported adapter (``peft``) has
the Flax model's logits, merging equals ``W + (alpha/r) A B`` and PEFT's own
``merge_and_unload``, and an adapter read back reproduces the model.

Tiny random checkpoints are built with ``transformers`` (nothing downloaded), loaded with
``from_pretrained(path, lora=...)``, the adapters trained for a few Adam steps (so that
``B != 0`` and the logits move), exported with :func:`save_peft_adapter` and opened with
``peft.PeftModel.from_pretrained`` on a fresh PyTorch model. Float32 throughout; max-abs
tolerance 1e-4 on O(1-10) logits.
"""
from __future__ import annotations

import json

import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file  # noqa: E402

from ntk_jax.models.hf_loading import from_pretrained  # noqa: E402
from ntk_jax.models.lora import LoRAConfig, iter_linears, merge_lora  # noqa: E402
from ntk_jax.models.peft_export import (load_peft_adapter, peft_module_names,  # noqa: E402
                                        save_peft_adapter)

V = 50
TOL = 1e-4


def randomize(model, seed: int):
    """O(1) random weights (norm weights around 1) so errors in any tensor show up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = "norm" in name.lower() or ".ln_" in name or name.startswith("ln_")
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def make_ckpt(tmp_path, cfg_cls, model_cls, seed=0, **kw):
    torch.manual_seed(seed)
    model = randomize(model_cls(cfg_cls(**kw)), seed)
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    return str(d), model_cls


def inputs(seed=0, B=3, T=8):
    return np.random.default_rng(seed).integers(1, V, (B, T)).astype(np.int32)


def flax_out(model, ids):
    return np.asarray(model(ids, attention_mask=np.ones_like(ids)))


def torch_out(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def train_lora(model, ids, steps: int = 5, lr: float = 0.05, seed: int = 1):
    """A few Adam steps on the LoRA factors towards random target outputs."""
    target = np.random.default_rng(seed).normal(size=flax_out(model, ids).shape).astype(np.float32)
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt, ids, target):
        def loss_fn(m):
            return ((m(ids, attention_mask=np.ones(ids.shape, np.int32)) - target) ** 2).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, ids, target)) for _ in range(steps)]
    assert losses[-1] < losses[0]
    return model


def check_adapter(model, model_cls, ckpt, adapter_dir, ids, merge_weight_of):
    """PEFT logits == Flax logits; merged weights == base + (alpha/r) A B == PEFT's merge."""
    y = flax_out(model, ids)
    tm = peft.PeftModel.from_pretrained(model_cls.from_pretrained(ckpt).eval(), adapter_dir).eval()
    assert max_err(torch_out(tm, ids), y) <= TOL
    # The adapters did something (the comparison above is not base vs base).
    base_y = torch_out(model_cls.from_pretrained(ckpt).eval(), ids)
    assert max_err(base_y, y) > 1e-2
    # Merging: our merge_lora == W + (alpha/r) A B (numpy) == PEFT's merge_and_unload.
    expected = {}
    for path, lin in iter_linears(model):
        if lin.lora is not None:
            a, b = np.asarray(lin.lora.lora_a[...], np.float64), np.asarray(lin.lora.lora_b[...], np.float64)
            expected[path] = np.asarray(lin.kernel[...], np.float64) + (lin.lora.scale) * a @ b
    merged_torch = dict(tm.merge_and_unload().named_modules())
    names = peft_module_names(model)
    assert merge_lora(model) == len(expected)
    lins = dict(iter_linears(model))
    for path, want in expected.items():
        got = np.asarray(lins[path].kernel[...])
        assert lins[path].lora is None
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(merge_weight_of(merged_torch[names[path].name], names[path]), want, atol=1e-5)
    assert max_err(flax_out(model, ids), y) <= TOL


def linear_weight(module, pm):
    """A merged PyTorch module's weight in our kernel layout (in, out)."""
    w = module.weight.detach().numpy()
    return w if pm.conv1d else w.T


def test_llama_layer_subset_several_targets(tmp_path):
    ckpt, cls = make_ckpt(tmp_path, transformers.LlamaConfig, transformers.LlamaForCausalLM,
                          vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    ids = inputs(0)
    base = from_pretrained(ckpt)
    lcfg = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "gate_proj", "down_proj"), layers=(0, 2))
    model = from_pretrained(ckpt, lora=lcfg, rngs=nnx.Rngs(1))
    # B = 0: the adapted model is the base model.
    assert max_err(flax_out(model, ids), flax_out(base, ids)) <= 1e-6
    train_lora(model, ids)
    adapter = tmp_path / "adapter"
    cfg = save_peft_adapter(model, adapter, base_model_name_or_path=ckpt)
    on_disk = json.loads((adapter / "adapter_config.json").read_text())
    assert on_disk == cfg
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "q_proj", "v_proj"]
    assert cfg["layers_to_transform"] == [0, 2] and cfg["fan_in_fan_out"] is False
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 4 * 2
    a = tensors["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 48) and b.shape == (32, 4)
    np.testing.assert_array_equal(a, np.asarray(model.layers[2].mlp.down_proj.lora.lora_a[...]).T)
    # Every exported module exists in the transformers model under that name.
    torch_names = dict(cls.from_pretrained(ckpt).named_modules())
    assert all(pm.name in torch_names for pm in peft_module_names(model).values())
    # Round trip: a fresh Flax model reads the adapter back (attaching it from the config).
    fresh = from_pretrained(ckpt)
    done = load_peft_adapter(fresh, adapter)
    assert len(done) == 8
    assert max_err(flax_out(fresh, ids), flax_out(model, ids)) == 0.0
    check_adapter(model, cls, ckpt, str(adapter), ids, linear_weight)


def test_qwen3_tied_all_layers(tmp_path):
    ckpt, cls = make_ckpt(tmp_path, transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                          vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                          tie_word_embeddings=True, max_position_embeddings=32)
    ids = inputs(1)
    model = from_pretrained(ckpt, lora=LoRAConfig(rank=2, alpha=6.0, targets=("k_proj", "o_proj", "up_proj")),
                            rngs=nnx.Rngs(2))
    train_lora(model, ids)
    cfg = save_peft_adapter(model, tmp_path / "adapter")
    assert cfg["layers_to_transform"] is None and cfg["lora_alpha"] == 6
    check_adapter(model, cls, ckpt, str(tmp_path / "adapter"), ids, linear_weight)


def test_gpt2_conv1d(tmp_path):
    ckpt, cls = make_ckpt(tmp_path, transformers.GPT2Config, transformers.GPT2LMHeadModel,
                          vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                          bos_token_id=0, eos_token_id=0)
    ids = inputs(2)
    model = from_pretrained(ckpt, lora=LoRAConfig(rank=3, alpha=3.0, targets=("c_attn", "c_proj", "c_fc"),
                                                  layers=(1,)), rngs=nnx.Rngs(3))
    train_lora(model, ids)
    cfg = save_peft_adapter(model, tmp_path / "adapter")
    assert cfg["fan_in_fan_out"] is True and cfg["layers_to_transform"] == [1]
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"].shape == (96, 3)
    assert tensors["base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"].shape == (3, 32)
    check_adapter(model, cls, ckpt, str(tmp_path / "adapter"), ids, linear_weight)


def test_bert_sequence_classification_with_head(tmp_path):
    ckpt, cls = make_ckpt(tmp_path, transformers.BertConfig, transformers.BertForSequenceClassification,
                          vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=32, num_labels=3)
    ids = inputs(3)
    model = from_pretrained(ckpt, lora=LoRAConfig(rank=2, alpha=4.0, targets=("query", "value", "dense"),
                                                  layers=(0,)), rngs=nnx.Rngs(4))
    assert sum(lin.lora is not None for _, lin in iter_linears(model)) == 5  # q, v, 3 dense of layer 0
    train_lora(model, ids, steps=8)
    # A changed head (as after full fine-tuning of the head) is exported as modules_to_save.
    model.classifier.kernel[...] = model.classifier.kernel[...] * 1.5
    cfg = save_peft_adapter(model, tmp_path / "adapter")
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    np.testing.assert_allclose(tensors["base_model.model.classifier.weight"],
                               np.asarray(model.classifier.kernel[...]).T)
    fresh = from_pretrained(ckpt)
    load_peft_adapter(fresh, tmp_path / "adapter")
    assert max_err(flax_out(fresh, ids), flax_out(model, ids)) == 0.0
    check_adapter(model, cls, ckpt, str(tmp_path / "adapter"), ids, linear_weight)


def test_errors(tmp_path):
    ckpt, _ = make_ckpt(tmp_path, transformers.LlamaConfig, transformers.LlamaForCausalLM,
                        vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft_adapter(from_pretrained(ckpt), tmp_path / "x")
    m = from_pretrained(ckpt, lora=LoRAConfig(rank=2, targets=("q_proj",)))
    cfg = save_peft_adapter(m, tmp_path / "a")
    assert cfg["target_modules"] == ["q_proj"] and cfg["layers_to_transform"] is None
    # A model adapted elsewhere does not silently take the adapter.
    other = from_pretrained(ckpt, lora=LoRAConfig(rank=2, targets=("v_proj",)))
    with pytest.raises(ValueError, match="adapted modules differ"):
        load_peft_adapter(other, tmp_path / "a")
    wrong_rank = from_pretrained(ckpt, lora=LoRAConfig(rank=4, targets=("q_proj",)))
    with pytest.raises(ValueError, match="rank 4"):
        load_peft_adapter(wrong_rank, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(other, tmp_path / "nothing")
    # Mixed ranks cannot be one LoraConfig.
    from ntk_jax.models.lora import apply_lora
    mixed = from_pretrained(ckpt, lora=LoRAConfig(rank=2, targets=("q_proj",)))
    apply_lora(mixed, LoRAConfig(rank=3, targets=("v_proj",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="differ in"):
        save_peft_adapter(mixed, tmp_path / "b")
    # A set of adapters that is not (targets x layers) is exported by full module names.
    irregular = from_pretrained(ckpt, lora=LoRAConfig(rank=2, targets=("q_proj",), layers=(0,)))
    apply_lora(irregular, LoRAConfig(rank=2, targets=("v_proj",), layers=(1,)), rngs=nnx.Rngs(0))
    cfg = save_peft_adapter(irregular, tmp_path / "c")
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert cfg["layers_to_transform"] is None


def test_adapter_made_by_peft_loads_into_flax(tmp_path):
    """The other direction: an adapter written by PEFT itself (random non-zero A and B,
    layer subset) gives the PyTorch PEFT model's logits once read into the Flax port."""
    ckpt, cls = make_ckpt(tmp_path, transformers.MistralConfig, transformers.MistralForCausalLM,
                          vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32,
                          sliding_window=None)
    ids = inputs(5)
    lc = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "up_proj"], layers_to_transform=[1],
                         init_lora_weights=False, task_type="CAUSAL_LM")
    tm = peft.get_peft_model(cls.from_pretrained(ckpt).eval(), lc).eval()
    tm.save_pretrained(tmp_path / "peft_adapter")
    model = from_pretrained(ckpt)
    done = load_peft_adapter(model, tmp_path / "peft_adapter")
    assert sorted(done) == ["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.k_proj"]
    assert model.layers[1].self_attn.k_proj.lora.scale == pytest.approx(5 / 3)
    y = flax_out(model, ids)
    assert max_err(y, torch_out(tm, ids)) <= TOL
    assert max_err(y, flax_out(from_pretrained(ckpt), ids)) > 1e-2  # the adapter matters
