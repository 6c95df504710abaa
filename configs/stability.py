"""SPEC §3.1: NTK-like stability during LoRA fine-tuning.

    python -m ntk_jax.main --config=configs/stability.py --workdir=runs/stability
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ["stability"]
    return config
