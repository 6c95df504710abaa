"""The main job: pre-train the embedded tiny model (about a minute on CPU), then run the
three validation experiments of SPEC §3 (stability, spectrum, approximation).

    python -m ntk_jax.main --config=configs/default.py --workdir=runs/default
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    return base_config()
