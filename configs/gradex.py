"""SPEC §6.4: first-order subset estimation (GradEx) — meta-initialisation, projected
gradients, per-subset linearised logistic fits, task selection, and a check of the
estimates against real LoRA fine-tuning on a few subsets.

    python -m ntk_jax.main --config=configs/gradex.py --workdir=runs/gradex
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ["gradex"]
    return config
