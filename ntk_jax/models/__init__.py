"""Models in Flax NNX with Hugging Face naming, and loading of local HF checkpoints.

The ports — each model family's module, which registers itself with
:mod:`~ntk_jax.models.ports` (loading, sharding roles, PEFT names; a new port is one new file
here):

* :mod:`~ntk_jax.models.transformer` — Llama-family decoder (:class:`DecoderLM`; model types
  llama, mistral, qwen2, qwen3 and this repo's ntk_jax_decoder);
* :mod:`~ntk_jax.models.gpt2` — GPT-2 (:class:`GPT2LMHeadModel`);
* :mod:`~ntk_jax.models.bert` — BERT / RoBERTa encoders and sequence classifiers (bert,
  roberta, xlm-roberta, camembert).

The machinery, which lists no port:

* :mod:`~ntk_jax.models.ports` — the registry the ports register with, and their discovery;
* :mod:`~ntk_jax.models.hf_loading` — ``from_pretrained(dir)`` dispatching on ``config.json``'s
  ``model_type`` to the registered port, and ``load_tokenizer(dir)``;
* :mod:`~ntk_jax.models.layers` — pieces shared by the ports (``LayerNorm``, activations,
  flat parameter names);
* :mod:`~ntk_jax.models.lora`, :mod:`~ntk_jax.models.subset` — LoRA adapters, parameter subsets;
* :mod:`~ntk_jax.models.sharding` — a ``("data", "model")`` device mesh (``make_mesh``), partition
  rules built from the ports' registered roles (FSDP over ``data``, tensor parallel over ``model``),
  ``shard_model`` / ``shard_batch``; ``from_pretrained(dir, mesh=mesh)`` places each checkpoint
  tensor straight into its sharded layout;
* :mod:`~ntk_jax.models.peft_export` — ``save_peft_adapter`` / ``load_peft_adapter`` in PEFT's
  LoRA layout (``adapter_config.json`` + ``adapter_model.safetensors``).

Per-device memory estimates of whole jobs (which compile the training and selection programs
too) are in :mod:`ntk_jax.launcher.memory`; the mesh helpers every batch loop uses in
:mod:`ntk_jax.mesh`.
"""
