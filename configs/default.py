"""The main job: pre-train the embedded tiny model (about a minute on CPU), then run the
three validation experiments of docs/theory.md §5 (stability, spectrum, approximation) with the settings
stated in ``configs/stability.py``, ``configs/spectrum.py`` and ``configs/approximation.py``
(``tests/test_config_overrides.py`` checks that they are the same).

    python -m ntk_jax.main --config=configs/default.py --workdir=runs/default
"""
from ntk_jax.launcher.config_lib import EXPERIMENTS, PRETRAIN_TASKS, base_config


def get_config():
    config = base_config()
    config.experiments = EXPERIMENTS  # ("stability", "spectrum", "approximation")
    # The embedded model every job without --config.model.path uses (WORKDIR/base_model, reused
    # when present): model.arch, a 3-layer decoder with hidden size 64, fast on a CPU.
    p = config.pretrain
    p.tasks = PRETRAIN_TASKS    # 8 synthetic families; the fine-tuning tasks (add_spaced, ...) are kept out
    p.n_per_task = 1500         # 12 000 records: 800 steps × batch 64 ≈ 4 epochs
    p.max_len = 32              # every synthetic record fits (≤ 26 tokens with bos and eos)
    p.train.total_steps = 800   # train loss 2.75 → 0.38 (base_model/pretrain_report.json)
    return config
