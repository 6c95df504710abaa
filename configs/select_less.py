"""One selection job with method 'less' (docs/theory.md §6.2; experiments/select.py) on the controlled
benchmark by default (set select.domain_path / pool_path for your own JSONL).

    python -m ntk_jax.main --config=configs/select_less.py --workdir=runs/select_less
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ("select",)
    # LESS (Xia et al. 2024): its own LoRA warm-up on a sample of the pool (select.less: 5 % of
    # the pool, 4 epochs, a checkpoint per epoch, as in the paper), Adam-preconditioned loss
    # gradients projected to select.projection_dim = 8192, cosine scores.
    config.select.method = "less"
    config.select.n_select = 64  # N = 2× the 32 domain records of the controlled benchmark
    return config
