"""docs/theory.md §5.3: the Jacobian-free approximation Θ̃ vs the exact eNTK tr Θ, and the cross-output
terms vs width (experiments/approximation.py).

    python -m ntk_jax.main --config=configs/approximation.py --workdir=runs/approximation
"""
from ntk_jax.launcher.config_lib import PRETRAIN_TASKS, base_config


def get_config():
    config = base_config()
    config.experiments = ("approximation",)
    c = config.approximation
    c.tasks = PRETRAIN_TASKS    # examples of every pre-training task: similar and unrelated pairs
    c.n_examples = 48           # all 48·49/2 = 1176 pairs i ≤ j are compared
    c.projection_dims = (1024, 8192)  # a small JL dimension and the paper's p = 8192
    c.lora.targets = ("q_proj", "v_proj")  # LoRA r=8, α=16 on q and v of every layer, as elsewhere
    c.lora.b_init_std = 0.02    # B ≠ 0, so Θ is not degenerate at the LoRA init (as in stability)
    c.widths = (16, 32, 64, 128)  # hidden sizes of fresh models: cross terms vs d^(-1/2)
    c.n_width_examples = 8      # examples per width model: the exact full eNTK costs more as d grows
    return config
