"""The selection benchmark suite (docs/selection.md): every target of
ntk_jax.data.controlled.TARGETS × {no_conflict, contradicting} × the arms below × 3 seeds,
each cell fine-tuned and evaluated like select_compare; writes suite_table.{json,md} and
suite.png. Resumable (rerun the same command).

    python -m ntk_jax.main --config=configs/select_suite.py --workdir=runs/select_suite

One target: ``--config.select_suite.targets='("mirror",)'``.
"""
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ("select_suite",)
    # arms: the baselines, the paper's NTK-Selector, the earlier defaults (label-aware gradient
    # scores; the loss change over the whole pool), the recommended pipeline (select.ntk: the
    # paper's kNN filter to 4N, then the loss change of the kept) and the same with a 3x longer
    # domain warm-up
    config.select_compare.methods = ("random", "embedding", "less", "ntk@paper", "ntk@gradient", "ntk@loss_change",
                                     "ntk", "ntk[warmup.total_steps=120]")
    config.select_compare.oracles = ("useful", "conflicting")  # no_conflict cells drop "conflicting"
    config.select_compare.seeds = (0, 1, 2)
    return config
