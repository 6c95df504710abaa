"""docs/theory.md §5.2: eNTK spectrum, κ and the risk bounds over LoRA placements (experiments/spectrum.py).

    python -m ntk_jax.main --config=configs/spectrum.py --workdir=runs/spectrum

One placement: ``--config.spectrum.placements="({'targets': ('k_proj',), 'layers': (0,)},)"``.
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ("spectrum",)
    c = config.spectrum
    c.task = "sentiment_flipped"  # labels opposite to pre-training: fine-tuning must move the model
    c.n_kernel = 32             # the paper's n
    c.sigma = 1e-4              # the paper's ridge σ
    # {q,v} and {k} × layers {0}, {0,2}, {0,1,2}: the paper's Table 1 ({0}, {0,11}, {0,5,11} of
    # RoBERTa-base) on the 3-layer embedded model
    c.placements = tuple(dict(targets=targets, layers=layers)
                         for targets in (("q_proj", "v_proj"), ("k_proj",))
                         for layers in ((0,), (0, 2), (0, 1, 2)))
    c.n_train = 256             # each placement is then fine-tuned on these ...
    c.n_eval = 256              # ... and its eval loss ranked against κ
    c.train.total_steps = 60    # the fine-tuning default (finetune_train_config), per placement
    c.n_random_kernels = 500    # random PSD kernels for the printed lower bound's failure rate
    return config
