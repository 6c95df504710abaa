"""One selection job with method 'random' (docs/theory.md §6.2; experiments/select.py) on the controlled
benchmark by default (set select.domain_path / pool_path for your own JSONL).

    python -m ntk_jax.main --config=configs/select_random.py --workdir=runs/select_random
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ("select",)
    # N pool records drawn uniformly with the job's seed: the floor every method must beat.
    # No model is used, so the LoRA, warm-up and projection settings of select do not apply.
    config.select.method = "random"
    config.select.n_select = 64  # N = 2× the 32 domain records of the controlled benchmark
    return config
