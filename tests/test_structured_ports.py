"""Every model port with LoRA on its own projection names: the structured eNTK equals the
``jacobian`` method to float64 precision (the full cross kernel: every site's layout and
contraction; the traced form's contraction is port-independent, tests/test_structured_ntk.py),
and the factored projection
bound to the port's layout (``FactoredProjection.bind``) equals its features — so the linear
sites, their (d_in, d_out) layouts and the relabelling chains are read right on each port
(Llama, Qwen2 with q/k/v biases, Mistral, Qwen3 with q/k norms, GPT-2's fused c_attn,
BERT/RoBERTa classifiers)."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ntk_jax.kernels.factored_projection import FactoredProjection  # noqa: E402
from ntk_jax.kernels.features import gradient_features, per_example_grads, sum_of_outputs  # noqa: E402
from ntk_jax.kernels.ntk import empirical_ntk  # noqa: E402
from ntk_jax.kernels.outputs import classification_output_fn, lm_output_fn  # noqa: E402
from ntk_jax.kernels.structured import structured_plan  # noqa: E402
from ntk_jax.models.hf_loading import from_pretrained  # noqa: E402
from ntk_jax.models.lora import LoRAConfig, lora_filter  # noqa: E402
from ntk_jax.models.subset import param_subset  # noqa: E402

V = 37
DEC = dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=32)
BERT = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24)
PORTS = {  # name: (config, model class, LoRA targets, output)
    "llama": (lambda: transformers.LlamaConfig(**DEC), "LlamaForCausalLM", ("q_proj", "v_proj", "down_proj"), "lm"),
    "qwen2": (lambda: transformers.Qwen2Config(**DEC), "Qwen2ForCausalLM", ("q_proj", "k_proj", "o_proj"), "lm"),
    "mistral": (lambda: transformers.MistralConfig(**DEC, sliding_window=4), "MistralForCausalLM",
                ("v_proj", "gate_proj"), "lm"),
    "qwen3": (lambda: transformers.Qwen3Config(**DEC, head_dim=8), "Qwen3ForCausalLM", ("q_proj", "up_proj"), "lm"),
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                                             bos_token_id=0, eos_token_id=0),
             "GPT2LMHeadModel", ("c_attn", "c_proj", "c_fc"), "lm"),
    "bert": (lambda: transformers.BertConfig(**BERT, max_position_embeddings=32, num_labels=3),
             "BertForSequenceClassification", ("query", "value", "dense"), "classification"),
    "roberta": (lambda: transformers.RobertaConfig(**BERT, max_position_embeddings=40, num_labels=2, pad_token_id=1,
                                                   type_vocab_size=1),
                "RobertaForSequenceClassification", ("query", "key"), "classification"),
}


@pytest.fixture(autouse=True, scope="module")
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _batch(rng, n, T=6):
    mask = np.zeros((n, T))
    mask[:, 3:] = 1.0
    return {"input_ids": jnp.asarray(rng.integers(3, V, (n, T)), jnp.int32),
            "attention_mask": jnp.ones((n, T), jnp.int32), "loss_mask": jnp.asarray(mask)}


@pytest.mark.slow
@pytest.mark.parametrize("port", sorted(PORTS))
def test_structured_kernel_and_bound_projection_on_every_port(port, tmp_path):
    make_config, cls, targets, output = PORTS[port]
    torch.manual_seed(0)
    getattr(transformers, cls)(make_config()).save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, lora=LoRAConfig(rank=2, targets=targets, b_init_std=0.1), rngs=nnx.Rngs(1),
                            dtype="float64", param_dtype="float64")
    subset = param_subset(model, lora_filter())
    f = lm_output_fn(subset) if output == "lm" else classification_output_fn(subset)
    rng = np.random.default_rng(0)
    x1, x2 = _batch(rng, 3), _batch(rng, 2)
    plan = structured_plan(f, subset.params, x1, x2)
    assert plan.leaves and all(leaf.kind != "fallback" for leaf in plan.leaves), [
        (leaf.path, leaf.kind) for leaf in plan.leaves]  # every LoRA factor is a linear site
    ref = np.asarray(empirical_ntk(f, subset.params, x1, x2, trace=False, method="jacobian"))
    got = np.asarray(empirical_ntk(f, subset.params, x1, x2, trace=False, method="structured"))
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    s = sum_of_outputs(f)
    fp = FactoredProjection(64, seed=1)
    feats = np.asarray(gradient_features(s, subset.params, x1, projection=fp))
    bound = np.asarray(fp.bind(s, subset.params, x1)(per_example_grads(s, subset.params, x1)))
    np.testing.assert_allclose(bound, feats, rtol=1e-10, atol=1e-12 * np.abs(feats).max())
