"""Experiments as plug-ins: the launcher finds them by name.

An experiment is one module ``experiments/<name>.py`` defining

* ``config() -> ml_collections.ConfigDict`` — the defaults of its section ``config.<name>``
  (every key an override ``--config.<name>.<key>=...`` may set; others are an error);
* ``run(config, out_dir, context) -> report`` (a JSON-able dict) and ``summary(report) -> dict``
  (the console line); optionally ``DISTRIBUTED = True`` (every process runs it).

Nothing else lists it: :func:`ntk_jax.launcher.config_lib.base_config` holds the section of
every experiment found here, and ``config.experiments`` may name it. Its values live in
``configs/<name>.py`` (``get_config()`` from ``base_config()``). Directories in the
``NTK_JAX_EXPERIMENTS_PATH`` environment variable (``os.pathsep``-separated) are searched too,
so an experiment kept outside the repository is one file there (``tests/test_experiment_plugins.py``).

The library never imports ``experiments`` (docs/README.md, ``tests/test_import_graph.py``):
the package is imported by name, here at the launcher's boundary, and only when present.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from types import ModuleType
from typing import Callable

PACKAGE = "experiments"
PATH_ENV = "NTK_JAX_EXPERIMENTS_PATH"


def _package() -> ModuleType | None:
    """The experiments package with the directories of ``PATH_ENV`` on its path; ``None``
    when it is not importable (the library used without the repository's experiments)."""
    try:
        pkg = importlib.import_module(PACKAGE)
    except ModuleNotFoundError as e:
        if e.name != PACKAGE:
            raise
        return None
    for d in os.environ.get(PATH_ENV, "").split(os.pathsep):
        if d and os.path.abspath(d) not in pkg.__path__:
            pkg.__path__.append(os.path.abspath(d))
    return pkg


def is_experiment(module: ModuleType) -> bool:
    """Whether ``module`` is a plug-in experiment (callable ``config`` and ``run``)."""
    return callable(getattr(module, "config", None)) and callable(getattr(module, "run", None))


def experiment_names() -> tuple[str, ...]:
    """The plug-in experiments: modules of the experiments package (and of ``PATH_ENV``) that
    define ``config()`` and ``run()``, sorted."""
    pkg = _package()
    if pkg is None:
        return ()
    names = {info.name for info in pkgutil.iter_modules(pkg.__path__) if not info.ispkg and not info.name.startswith("_")}
    return tuple(sorted(n for n in names if is_experiment(importlib.import_module(f"{PACKAGE}.{n}"))))


def experiment_sections() -> dict[str, Callable]:
    """``{name: config}``: the section builder of every plug-in experiment."""
    return {name: importlib.import_module(f"{PACKAGE}.{name}").config for name in experiment_names()}


def experiment_module(name: str) -> ModuleType:
    """The module of experiment ``name`` (``experiments/<name>.py``, or a ``PATH_ENV``
    directory's ``<name>.py``), with ``run`` and ``summary``. ValueError naming what is missing."""
    pkg = _package()
    where = "no experiments package" if pkg is None else f"searched {list(pkg.__path__)}"
    try:
        module = importlib.import_module(f"{PACKAGE}.{name}")
    except ModuleNotFoundError as e:
        if e.name not in (PACKAGE, f"{PACKAGE}.{name}"):
            raise
        raise ValueError(f"experiment {name!r} has no module {PACKAGE}/{name}.py ({where}; add directories "
                         f"with ${PATH_ENV})") from None
    missing = [f for f in ("run", "summary") if not callable(getattr(module, f, None))]
    if missing:
        raise ValueError(f"experiment module {module.__name__} ({module.__file__}) lacks {missing}")
    return module
