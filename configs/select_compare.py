"""The whole selection comparison (ntk_jax issue 4, item 7): domain-only, random, embedding,
LESS and NTK-Selector over several seeds on the controlled benchmark (or the JSONL paths in
config.select); writes table.json, table.md and comparison.png.

    python -m ntk_jax.main --config=configs/select_compare.py --workdir=runs/select_compare
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ["select_compare"]
    return config
