"""docs/theory.md §6.3: lpNTK data pruning (farthest-point clustering per class) vs random pruning on a
labelled synthetic task, retraining LoRA on each pruned set; test accuracy at the
best-validation checkpoint (experiments/prune_lpntk.py).

    python -m ntk_jax.main --config=configs/prune_lpntk.py --workdir=runs/prune_lpntk
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ("prune_lpntk",)
    c = config.prune_lpntk
    # 2 classes, opposite to what the model was pre-trained on, so LoRA must learn the task
    # (add_mod10, 10 classes, stays near chance with this model and budget)
    c.task = "sentiment_flipped"
    c.n_val = 200               # the best checkpoint is chosen here, never on the test split (docs/theory.md §6.3)
    c.label_noise = 0.2         # 20 % of training labels flipped to the other class: a noisy set to prune
    c.keep_ratios = (0.1, 0.3)  # two budgets well below the full set
    c.modes = ("centres", "random_member", "drop_largest_half")  # the three modes of docs/theory.md §6.3
    c.seeds = (0, 1, 2)         # retrain seeds: accuracy as mean ± std
    c.projection_dim = 0        # exact lpNTK features: the LoRA parameter count is small
    return config
