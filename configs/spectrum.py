"""SPEC §3.2: eNTK spectrum, κ and the risk bounds over LoRA placements.

    python -m ntk_jax.main --config=configs/spectrum.py --workdir=runs/spectrum
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ["spectrum"]
    return config
