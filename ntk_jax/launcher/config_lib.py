"""Building blocks of the ``configs/*.py`` files (big_vision style: each config file has a
``get_config()`` that starts from :func:`base_config` and sets what it needs).

Every field the launcher reads is defined here, so ``--config.x.y=...`` on an unknown key is
an error (the launcher locks the config).
"""
from __future__ import annotations

import ml_collections

# The validation experiments the default job runs (SPEC §3). Any job with a section in
# SECTIONS below can be listed in ``config.experiments``.
EXPERIMENTS = ("stability", "spectrum", "approximation")

# The tasks the embedded default model is pre-trained on (ntk_jax.data.synthetic.TASKS).
PRETRAIN_TASKS = ("add", "sub", "copy", "reverse", "sort", "count", "sentiment", "parity")


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # A local directory with config.json + weights (+ tokenizer). Empty: the embedded
        # default model, pre-trained by the job itself into WORKDIR/base_model.
        path="",
        # Architecture of the embedded default model (ntk_jax.models.transformer.DecoderConfig).
        arch=dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=128,
                  max_position_embeddings=64, rope_theta=10000.0),
        dtype="float32",
    ))


def pretrain_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        tasks=list(PRETRAIN_TASKS),
        n_per_task=1500,
        max_len=32,
        train=dict(learning_rate=3e-3, warmup_steps=50, total_steps=800, schedule="cosine",
                   weight_decay=0.01, grad_clip=1.0, batch_size=64, seed=0, eval_every=0,
                   checkpoint_every=200, log_every=20, max_to_keep=1),
    ))


def lora_config(**overrides) -> ml_collections.ConfigDict:
    d = dict(rank=8, alpha=16.0, dropout=0.0, targets=["q_proj", "v_proj"], layers=None,
             b_init_std=0.0)
    d.update(overrides)
    return ml_collections.ConfigDict(d, type_safe=False)


def finetune_train_config(**overrides) -> ml_collections.ConfigDict:
    d = dict(learning_rate=2e-3, warmup_steps=5, total_steps=60, schedule="linear", weight_decay=0.0,
             grad_clip=1.0, batch_size=16, seed=0, eval_every=0, checkpoint_every=0, log_every=5,
             max_to_keep=1)
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def stability_config() -> ml_collections.ConfigDict:
    """SPEC §3.1: Θ_t on a fixed probe set during LoRA fine-tuning."""
    return ml_collections.ConfigDict(dict(
        task="add_spaced",          # fine-tuning task (not in the pre-training mix)
        n_train=512,
        n_probe=16,
        kernel_every=10,            # compute Θ_t every this many steps
        # B ~ N(0, b_init_std²) instead of B = 0, so the gradient w.r.t. A (and Θ_0) is not
        # degenerate at step 0 (SPEC §3.1 note).
        lora=lora_config(b_init_std=0.02),
        train=finetune_train_config(total_steps=100, learning_rate=2e-3),
        epsilon=0.01,               # the NTK-like threshold checked in the report (S ≥ 1-ε)
    ))


def spectrum_config() -> ml_collections.ConfigDict:
    """SPEC §3.2: κ and risk bounds over LoRA placements, then fine-tune each."""
    return ml_collections.ConfigDict(dict(
        task="sentiment_flipped",  # labels opposite to pre-training: fine-tuning must move
        n_kernel=32,                # examples in the kernel (the paper: 32)
        sigma=1e-4,                 # ridge (the paper: 1e-4)
        placements=[                # (targets, layers) sweep, after the paper's Table 1
            dict(targets=["q_proj", "v_proj"], layers=[0]),
            dict(targets=["q_proj", "v_proj"], layers=[0, 2]),
            dict(targets=["q_proj", "v_proj"], layers=[0, 1, 2]),
            dict(targets=["k_proj"], layers=[0]),
            dict(targets=["k_proj"], layers=[0, 2]),
            dict(targets=["k_proj"], layers=[0, 1, 2]),
        ],
        lora=lora_config(),
        n_train=256,
        n_eval=256,
        train=finetune_train_config(total_steps=60),
        n_random_kernels=500,       # random PSD kernels for the printed-bound failure rate
    ))


def approximation_config() -> ml_collections.ConfigDict:
    """SPEC §3.3: Jacobian-free Θ̃ vs exact tr Θ, and cross-output terms vs width."""
    return ml_collections.ConfigDict(dict(
        tasks=list(PRETRAIN_TASKS),
        n_examples=48,              # all pairs of these examples are compared
        projection_dims=[1024, 8192],
        lora=lora_config(targets=["q_proj", "v_proj"], b_init_std=0.02),
        widths=[16, 32, 64, 128],   # hidden sizes of fresh (random-init) models for the scaling
        n_width_examples=8,
    ))


def distributed_config() -> ml_collections.ConfigDict:
    """``jax.distributed`` settings (see :mod:`ntk_jax.launcher.distributed`)."""
    return ml_collections.ConfigDict(dict(
        mode="auto",                # auto | on | off
        coordinator_address="",     # host:port of process 0 (or JAX_COORDINATOR_ADDRESS)
        num_processes=0,            # 0: from JAX_NUM_PROCESSES / the cluster
        process_id=-1,              # -1: from JAX_PROCESS_ID / the cluster
        cpu_collectives="gloo",     # CPU backend's cross-process collectives ("" = JAX default)
    ))


def mesh_config() -> ml_collections.ConfigDict:
    """The device mesh each process builds from its local devices: ``data`` × ``model``
    (-1: all remaining devices)."""
    return ml_collections.ConfigDict(dict(data=-1, model=1))


# Job name (``experiments/<name>.py``) -> builder of its config section ``config.<name>``.
# A new job adds its ``<name>_config()`` here; every section is always present, so any
# ``--config.<name>.<key>=...`` override is checked against the defaults.
SECTIONS = {
    "stability": stability_config,
    "spectrum": spectrum_config,
    "approximation": approximation_config,
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiments = list(EXPERIMENTS)
    c.seed = 0
    c.enable_x64 = False
    c.model = model_config()
    c.pretrain = pretrain_config()
    c.distributed = distributed_config()
    c.mesh = mesh_config()
    for name, section in SECTIONS.items():
        c[name] = section()
    return c
