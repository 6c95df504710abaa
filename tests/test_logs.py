"""The job's log routing (:mod:`ntk_jax.launcher.logs`): absl and Python log records (orbax
logs through absl, JAX through ``logging``) go to ``WORKDIR/log.txt``, not to the console;
errors still reach stderr; ``--alsologtostderr`` shows everything on the console too.

Each case is a small ``app.run`` program in a subprocess (absl only routes records once its
flags are parsed, which must not happen inside the pytest process)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = """
import logging as std_logging, sys
from absl import app, logging
from ntk_jax.launcher.logs import log_to_file

def main(argv):
    print("path", log_to_file(sys.argv[1]))
    logging.info("orbax-like info")
    logging.warning("routine warning")
    std_logging.getLogger("jax._src.xla_bridge").info("jax-like info")
    logging.error("real error")

app.run(main, argv=sys.argv[:1] + sys.argv[2:])
"""


def run_program(workdir, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", PROGRAM, str(workdir), *flags], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)


def test_log_records_go_to_the_workdir_file(tmp_path):
    proc = run_program(tmp_path)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "log.txt").read_text()
    for line in ("orbax-like info", "routine warning", "jax-like info", "real error"):
        assert line in log
    assert proc.stdout.strip() == f"path {tmp_path / 'log.txt'}"
    assert "real error" in proc.stderr
    assert not any(line in proc.stderr for line in ("orbax-like info", "routine warning", "jax-like info"))


def test_alsologtostderr_shows_them_on_the_console(tmp_path):
    proc = run_program(tmp_path, "--alsologtostderr")
    assert proc.returncode == 0, proc.stderr
    assert "orbax-like info" in proc.stderr and "orbax-like info" in (tmp_path / "log.txt").read_text()
