"""SPEC §3.3: Jacobian-free approximation vs the exact eNTK, and cross terms vs width.

    python -m ntk_jax.main --config=configs/approximation.py --workdir=runs/approximation
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ["approximation"]
    return config
