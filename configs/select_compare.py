"""The whole selection comparison (ntk_jax issue 4, item 7): domain-only, the oracle arms,
random, embedding, LESS and NTK-Selector over three seeds on the controlled benchmark (or the
JSONL paths in config.select); writes table.json, table.md and comparison.png.

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
    config.experiments = ["select_compare"]
    config.select.benchmark.variant = variant
    if variant == "no_conflict":
        config.select_compare.oracles = ["useful"]
    return config
