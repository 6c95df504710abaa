"""The one entry point:

    python -m ntk_jax.main --config=configs/default.py --workdir=runs/default \
        [--config.seed=1 --config.stability.n_probe=32 ...]

Runs the experiments listed in ``config.experiments`` (see ``configs/``); each writes
``WORKDIR/<experiment>/report.json`` and PNG plots. Unknown ``--config.*`` keys are an error.
"""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for models, checkpoints and reports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ntk_jax.launcher.run import run

    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
