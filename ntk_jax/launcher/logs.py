"""Where a job's log lines go: into ``WORKDIR/log.txt``, not onto the console.

``python -m ntk_jax.main`` logs through absl's handler, which the root logger writes through,
so it catches orbax's checkpoint INFO lines, JAX's backend messages and the launcher's own
lines. :func:`log_to_file` points that handler at a file in the workdir; the console keeps the
progress bars, one result line per experiment and the paths of the reports and plots (printed
by :func:`ntk_jax.launcher.run.run`), and log records of level ERROR and above.

absl's own flags change this:

* ``--alsologtostderr``: every log line on the console as well (and still in the file);
* ``--logtostderr``: log lines on the console only (no file);
* ``--stderrthreshold=warning``: WARNING and above on the console too (default here: ``error``);
* ``--verbosity=1`` (DEBUG) / ``-1`` (WARNING): what is logged at all (default 0, INFO).

With several processes, process 0 writes ``log.txt`` and process ``i`` ``log.process<i>.txt``
(lines logged before ``jax.distributed`` starts land in ``log.txt``).
"""
from __future__ import annotations

import os
import sys

from absl import flags, logging

LOG_NAME = "log.txt"

_path: str | None = None  # the file log_to_file opened (None: logging is absl's default)


def log_to_file(workdir: str, name: str = LOG_NAME) -> str | None:
    """Appends absl's log records (INFO and up, see ``--verbosity``) to ``workdir/name``
    instead of stderr, unless ``--logtostderr``; ERROR and up still reach stderr (unless
    ``--stderrthreshold`` says otherwise). Call after the flags are parsed (inside
    ``app.run``). Returns the log file's path, or ``None`` when nothing was redirected."""
    global _path
    if flags.FLAGS["logtostderr"].value:
        return None
    if not flags.FLAGS["stderrthreshold"].present:
        flags.FLAGS.stderrthreshold = "error"
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.path.abspath(workdir), name)
    handler = logging.get_absl_handler().python_handler
    old, handler.stream = handler.stream, open(path, "a", encoding="utf-8")
    if old is not None and old not in (sys.stderr, sys.stdout):
        old.close()
    _path = path
    return path


def log_path() -> str | None:
    """The file :func:`log_to_file` sends log records to (``None``: it was not called)."""
    return _path


def log_per_process(workdir: str, process_index: int) -> None:
    """Process ``process_index`` > 0 of a multi-process job moves its log to
    ``workdir/log.process<i>.txt`` (only when :func:`log_to_file` is in use)."""
    if _path is not None and process_index > 0:
        log_to_file(workdir, f"log.process{process_index}.txt")
