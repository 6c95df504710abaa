"""docs/theory.md §5.1: NTK-like stability during LoRA fine-tuning (experiments/stability.py).

    python -m ntk_jax.main --config=configs/stability.py --workdir=runs/stability
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ("stability",)
    c = config.stability
    c.task = "add_spaced"       # not in the pre-training mix: fine-tuning has to move the model
    c.n_train = 512             # 100 steps × batch 16 = about 3 epochs over these
    c.n_probe = 16              # Θ_t: the exact traced eNTK of these 16 probes (16×16)
    c.kernel_every = 10         # Θ_t at 11 points of the run: S(t), a*(t), u(t) per 10 steps
    c.lora.b_init_std = 0.02    # B ≠ 0 at init, else ∂f/∂A = 0 and Θ_0 is degenerate (docs/theory.md §3.4)
    c.train.total_steps = 100   # the train loss falls from ~2.7 to ~1.3 (report.json: train_loss)
    c.train.learning_rate = 2e-3  # the fine-tuning default (ntk_jax.training.trainer.finetune_train_config)
    c.epsilon = 0.01            # "NTK-like" checked as S(t) ≥ 0.99, the level the paper reports
    return config
