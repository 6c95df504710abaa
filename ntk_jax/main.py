"""The one entry point:

    python -m ntk_jax.main --config=configs/default.py --workdir=runs/default \
        [--config.seed=1 --config.stability.n_probe=32 ...]

Several processes (``jax.distributed``): start the same command on each with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or under SLURM /
Open MPI / a Cloud TPU slice, where JAX finds these itself) and one shared ``--workdir``.

Runs the experiments listed in ``config.experiments`` (see ``configs/``); each writes
``WORKDIR/<experiment>/report.json`` and PNG plots. Unknown ``--config.*`` keys are an error.

The console shows progress bars, one result line per experiment and where its report and plots
are; log lines (orbax, JAX, the launcher) go to ``WORKDIR/log.txt``. ``--alsologtostderr``
shows them on the console too (:mod:`ntk_jax.launcher.logs`).
"""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for models, checkpoints and reports.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "jax.distributed coordinator host:port (sets config.distributed.coordinator_address).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ntk_jax.launcher.logs import log_to_file

    log_to_file(_WORKDIR.value)
    from ntk_jax.launcher.run import run

    config = _CONFIG.value
    with config.unlocked():
        if _COORDINATOR.value is not None:
            config.distributed.coordinator_address = _COORDINATOR.value
        if _NUM_PROCESSES.value is not None:
            config.distributed.num_processes = _NUM_PROCESSES.value
        if _PROCESS_ID.value is not None:
            config.distributed.process_id = _PROCESS_ID.value
    run(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
