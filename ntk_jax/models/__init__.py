"""Models in Flax NNX with Hugging Face naming, and loading of local HF checkpoints.

* :mod:`~ntk_jax.models.transformer` — Llama-family decoder (:class:`DecoderLM`);
* :mod:`~ntk_jax.models.gpt2` — GPT-2 (:class:`GPT2LMHeadModel`);
* :mod:`~ntk_jax.models.bert` — BERT / RoBERTa encoders and sequence classifiers;
* :mod:`~ntk_jax.models.hf_loading` — ``from_pretrained(dir)`` dispatching on ``config.json``'s
  ``model_type`` (llama, mistral, qwen2, qwen3, gpt2, bert, roberta, xlm-roberta, camembert,
  ntk_jax_decoder) and ``load_tokenizer(dir)``;
* :mod:`~ntk_jax.models.layers` — pieces shared by the ports (``LayerNorm``, activations);
* :mod:`~ntk_jax.models.lora`, :mod:`~ntk_jax.models.subset` — LoRA adapters, parameter subsets.
"""
from ntk_jax.models.hf_loading import from_pretrained, load_tokenizer

__all__ = ["from_pretrained", "load_tokenizer"]
