"""One selection job with method 'embedding' (docs/theory.md §6.2; experiments/select.py) on the controlled
benchmark by default (set select.domain_path / pool_path for your own JSONL).

    python -m ntk_jax.main --config=configs/select_embedding.py --workdir=runs/select_embedding
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ("select",)
    # NTK-Selector's coarse filter alone (mean final hidden states after the domain warm-up,
    # kNN votes): it shares select.lora, select.warmup and select.knn_k with 'ntk', so the two
    # differ only by the gradient scores.
    config.select.method = "embedding"
    config.select.n_select = 64  # N = 2× the 32 domain records of the controlled benchmark
    return config
