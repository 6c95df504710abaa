"""docs/theory.md §6.8: the LoRA placement advisor on the embedded toy decoder
(experiments/advise_placement.py), with its validation against real fine-tunes.

    python -m ntk_jax.main --config=configs/advise_placement.py --workdir=runs/advise_placement

Advice only (no fine-tuning): ``--config.advise_placement.validate=False``. Another checkpoint:
``--config.model.path=DIR``; MiniLM: configs/advise_placement_minilm.py. Results:
docs/validation.md, "The LoRA placement advisor".
"""
from ntk_jax.launcher.config_lib import base_config

QV = ("q_proj", "v_proj")
ALL = (0, 1, 2)


def get_config():
    config = base_config()
    config.experiments = ("advise_placement",)
    c = config.advise_placement
    c.task = "sentiment_flipped"        # labels opposite to pre-training: fine-tuning must move the model
    # 12 placements fixed before any run: attention and MLP projections, one layer or all,
    # and the LoRA rank (2 / 8 / 32) on {q,v} of every layer
    c.placements = (
        dict(targets=QV, layers=(0,)), dict(targets=QV, layers=(2,)), dict(targets=QV, layers=ALL),
        dict(targets=("k_proj",), layers=(0,)), dict(targets=("k_proj",), layers=ALL),
        dict(targets=("o_proj",), layers=(1,)), dict(targets=("o_proj",), layers=ALL),
        dict(targets=("up_proj", "down_proj"), layers=(0,)), dict(targets=("up_proj", "down_proj"), layers=ALL),
        dict(targets=("gate_proj",), layers=(2,)),
        dict(targets=QV, layers=ALL, rank=2), dict(targets=QV, layers=ALL, rank=32),
    )
    c.predictor = "lin_eval_loss_ce"    # chosen a priori: the job's loss, held out, after the job's schedule
    c.n_kernel = 32
    c.n_kernel_test = 32
    c.sigma = 1e-4                      # the NTK-spectrum paper's ridge
    c.output_probes = 8                 # O = V = 50 logits: the traced kernel from 8 output probes
    c.train.total_steps = 60            # the fine-tuning default (as the spectrum job)
    c.validate = True
    c.seeds = (0, 1, 2)
    c.n_train = 256
    c.n_eval = 256
    return config
