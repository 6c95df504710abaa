"""SPEC §6.3: lpNTK data pruning (farthest-point clustering per class) vs random pruning on a
labelled synthetic task, retraining LoRA on each pruned set; test accuracy at the
best-validation checkpoint.

    python -m ntk_jax.main --config=configs/prune_lpntk.py --workdir=runs/prune_lpntk
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ["prune_lpntk"]
    return config
