"""The selection comparison on one target (docs/selection.md): domain-only, the oracle arms,
random, embedding, LESS, the paper's NTK-Selector (``ntk@paper``), the label-aware gradient
scores (``ntk@gradient``) and the recommended pipeline (``ntk``: the forward-only loss change) over three seeds on the controlled benchmark (target
``select.benchmark.target``, default flipped_sentiment) or the JSONL paths in config.select;
writes table.json, table.md and comparison.png. The whole suite of targets:
configs/select_suite.py.

    python -m ntk_jax.main --config=configs/select_compare.py --workdir=runs/select_compare
    python -m ntk_jax.main --config=configs/select_compare.py:no_conflict --workdir=runs/select_compare_nc

The argument names the benchmark variant (ntk_jax.data.controlled.VARIANTS):
``contradicting`` (default; the pool also holds the target's inputs with the opposite labels)
or ``no_conflict`` (useful and unrelated families only, the NTK-Selector paper's setting).
docs/selection.md has the measured tables.
"""
from ntk_jax.data.controlled import VARIANTS
from ntk_jax.launcher.config_lib import base_config


def get_config(arg=None):
    variant = arg or "contradicting"
    if variant not in VARIANTS:
        raise ValueError(f"unknown benchmark variant {variant!r}; choose one of {sorted(VARIANTS)}")
    config = base_config()
    config.experiments = ("select_compare",)
    config.select.benchmark.variant = variant
    config.select_compare.methods = ("random", "embedding", "less", "ntk@paper", "ntk@gradient", "ntk")
    if variant == "no_conflict":
        config.select_compare.oracles = ("useful",)
    return config
