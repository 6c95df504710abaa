"""docs/theory.md §6.4: first-order subset estimation (GradEx) — meta-initialisation, projected
gradients, per-subset linearised logistic fits, task selection — judged against real LoRA
fine-tunes of 24 subsets × 3 seeds and against the trivial estimators (experiments/gradex.py,
docs/gradex.md).

    python -m ntk_jax.main --config=configs/gradex.py --workdir=runs/gradex
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ("gradex",)
    c = config.gradex
    c.target = "add_spaced"     # not in the pre-training mix; add (same rule, other form) is an aux task
    # the 8 pre-training tasks + sentiment_flipped (contradicts sentiment), add_mod10, noise
    c.aux_tasks = ("add", "sub", "copy", "reverse", "sort", "count", "sentiment", "parity",
                   "sentiment_flipped", "add_mod10", "noise")
    c.seeds = (0, 1, 2)         # 3 replicates (data, θ*, projection, subsets): a Spearman over one is noise
    c.projection_dim = 200      # d: the paper's code uses 100-400
    c.calibrate_C = True        # C from C_grid on n_calibrate extra fine-tuned subsets (never the checked ones)
    c.n_calibrate = 2
    c.n_subsets = 200           # random ensemble size m (the paper: 200-1000)
    c.subset_prob = 0.5         # each task in a subset with probability 1/2 (the paper's)
    c.n_verify = 24             # really fine-tuned subsets per seed, evenly spaced over the estimate's range
    c.finetune.total_steps = 60  # those fine-tunes, from θ* (the fine-tuning default)
    return config
