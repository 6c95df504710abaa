"""One selection job with method 'random' (SPEC §6; experiments/select.py) on the controlled
benchmark by default (set select.domain_path / pool_path for your own JSONL).

    python -m ntk_jax.main --config=configs/select_random.py --workdir=runs/select_random
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ["select"]
    config.select.method = "random"
    return config
