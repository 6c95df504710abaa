"""docs/theory.md §6.3 on a real image dataset, the lpNTK paper's kind of setting: a LeNet-like
CNN (ntk_jax/models/cnn.py, 13.7k parameters, all trained) on scikit-learn's 8x8 handwritten
digits (ntk_jax/data/digits.py; fixed stratified splits: 997 train / 300 val / 500 test). The
lpNTK over ALL parameters at the reference's best-validation checkpoint; per-class
farthest-point clustering and the three modes; baselines at the same kept ratios: random
pruning, EL2N and GraNd (keep the hardest of each class), the sum-of-logits kernel. Every pruned
set retrained from scratch per seed; test accuracy at the best-VALIDATION checkpoint
(experiments/prune_lpntk.py). The table (table.md) and plot come out of this one command:

    python -m ntk_jax.main --config=configs/prune_lpntk_digits.py --workdir=runs/prune_digits

(the launcher also prepares the embedded language model, which this job does not use; pass
--config.model.path=DIR of any checkpoint to skip its pre-training).
"""
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.training.trainer import finetune_train_config


def get_config():
    config = base_config()
    config.experiments = ("prune_lpntk",)
    c = config.prune_lpntk
    c.dataset = "digits"
    c.n_train = 0               # every image not in val / test: 997
    c.n_val = 300               # the best checkpoint is chosen here, never on the test split
    c.n_test = 500
    c.label_noise = 0.0         # clean labels, as the paper's MNIST / CIFAR-10 runs
    # Adam, batch 64: ~16 steps per epoch on the full set. The reference trains 30 epochs; a
    # retrain 25 epochs of the full set (the same number of steps for every pruned set, as in
    # the text job), validation every 20 steps.
    c.reference_train = finetune_train_config(total_steps=480, learning_rate=3e-3, warmup_steps=20,
                                              schedule="cosine", batch_size=64, log_every=100)
    c.retrain = finetune_train_config(total_steps=400, learning_rate=3e-3, warmup_steps=20,
                                      schedule="cosine", batch_size=64, log_every=100)
    c.eval_every = 20
    c.keep_ratios = (0.95, 0.9, 0.8, 0.7, 0.5)  # the lpNTK paper keeps ~0.87-0.95
    c.modes = ("centres", "random_member", "drop_largest_half")
    c.kernels = ("lpntk", "sum_logits")
    c.baselines = ("random", "el2n", "grand")
    c.score_runs = 4            # EL2N / GraNd averaged over 4 short runs ...
    c.score_steps = 48          # ... of 3 epochs (Paul et al. score early in training)
    c.seeds = (0, 1, 2, 3, 4)
    c.projection_dim = 0        # exact features: 13.7k parameters
    c.feature_batch_size = 128
    c.shard_size = 256
    return config
