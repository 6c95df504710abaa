"""Adding a validation experiment or a selection method is one file (plus its ``configs/`` file),
shown with files kept outside the library, as ``tests/test_ports.py`` does for model ports:

* an experiment: ``<dir>/<name>.py`` with ``config()``, ``run()`` and ``summary()``, found by the
  launcher through ``NTK_JAX_EXPERIMENTS_PATH`` (``ntk_jax.launcher.discovery``), its section
  in ``base_config()``, its values in its own config file, overrides checked against it;
* a selection method: ``<dir>/<name>.py`` with ``select(job)`` and ``config()``, on the path of
  ``ntk_jax.selection.methods``, run by the ``select`` experiment through the launcher.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

import experiments
from ntk_jax.data.synthetic import generate_task, write_jsonl
from ntk_jax.launcher import discovery
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.launcher.run import check_config, run
from ntk_jax.selection import methods

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags' loader

EXPERIMENT = '''
"""A toy validation experiment: the parameter count of the model, scaled."""
import ml_collections
from flax import nnx


def config():
    return ml_collections.ConfigDict(dict(scale=1.0, repeats=1))


def run(config, out_dir, context):
    c = config.toy_count
    model = context.load_model()
    n = sum(int(x.size) for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))
    return {"num_params": n, "value": c.scale * c.repeats * n}


def summary(report):
    return {"value": report["value"]}
'''

EXPERIMENT_CONFIG = '''
from ntk_jax.launcher.config_lib import base_config


def get_config():
    config = base_config()
    config.experiments = ("toy_count",)
    config.toy_count.repeats = 3   # the file's value
    return config
'''

METHOD = '''
"""A toy selection method: the N pool records with the shortest (or longest) prompt."""
import ml_collections
import numpy as np

from ntk_jax.selection.methods import Selection
from ntk_jax.selection.ntk_selector import top_n


def config():
    return ml_collections.ConfigDict(dict(longest=False))


def select(job):
    lengths = np.array([len(r["prompt"]) for r in job.pool], np.float64)
    scores = lengths if job.cfg["toy_length"]["longest"] else -lengths
    return Selection(chosen=top_n(scores, int(job.cfg["n_select"])), scored=np.arange(len(job.pool)), scores=scores)
'''


@pytest.fixture
def plugin_dirs(tmp_path, monkeypatch):
    """An experiment directory on ``NTK_JAX_EXPERIMENTS_PATH`` and a method directory on the
    methods package's path, both outside the library; undone afterwards."""
    exp_dir, method_dir = tmp_path / "my_experiments", tmp_path / "my_methods"
    exp_dir.mkdir()
    method_dir.mkdir()
    (exp_dir / "toy_count.py").write_text(textwrap.dedent(EXPERIMENT))
    (tmp_path / "toy_count_config.py").write_text(textwrap.dedent(EXPERIMENT_CONFIG))
    (method_dir / "toy_length.py").write_text(textwrap.dedent(METHOD))
    monkeypatch.setenv(discovery.PATH_ENV, str(exp_dir))
    monkeypatch.setattr(experiments, "__path__", list(experiments.__path__))
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(method_dir)])
    yield tmp_path
    for name in ("experiments.toy_count", "ntk_jax.selection.methods.toy_length"):
        sys.modules.pop(name, None)


def load(config_file: str, *overrides: str):
    """The config as ``python -m ntk_jax.main --config=FILE OVERRIDES`` sees it."""
    argv = ["prog", f"--config={config_file}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_out_of_tree_experiment_runs_through_the_launcher(plugin_dirs, tiny_model_dir):
    assert "toy_count" in discovery.experiment_names()
    assert dict(base_config().toy_count) == {"scale": 1.0, "repeats": 1}  # the module's defaults
    cfg_file = str(plugin_dirs / "toy_count_config.py")
    with pytest.raises(Exception, match="no_such_key"):  # overrides are checked against the defaults
        load(cfg_file, "--config.toy_count.no_such_key=1")
    config = load(cfg_file, f"--config.model.path={tiny_model_dir}", "--config.toy_count.scale=0.5")
    reports = run(config, str(plugin_dirs / "job"))
    rep = reports["toy_count"]
    assert rep["num_params"] > 0 and rep["value"] == 0.5 * 3 * rep["num_params"]
    with open(plugin_dirs / "job" / "toy_count" / "report.json") as fh:
        assert json.load(fh)["value"] == rep["value"]


def test_unknown_or_incomplete_experiment_is_a_clear_error(plugin_dirs):
    c = base_config()
    c.experiments = ("toy_countt",)
    with pytest.raises(ValueError, match=r"unknown experiment\(s\) \['toy_countt'\].*experiments/<name>.py"):
        check_config(c)
    (plugin_dirs / "my_experiments" / "half_done.py").write_text("def config():\n    return {}\n\ndef run(c, o, x):\n"
                                                                  "    return {}\n")
    try:
        with pytest.raises(ValueError, match=r"half_done.*lacks \['summary'\]"):
            discovery.experiment_module("half_done")
    finally:
        sys.modules.pop("experiments.half_done", None)


def test_out_of_tree_selection_method_runs_through_the_launcher(plugin_dirs, tiny_model_dir):
    assert "toy_length" in methods.method_names()
    assert dict(base_config().select.toy_length) == {"longest": False}  # its section, from its module
    domain, pool = generate_task("add", 4, seed=0), generate_task("add", 24, seed=1)
    write_jsonl(domain, plugin_dirs / "domain.jsonl")
    write_jsonl(pool, plugin_dirs / "pool.jsonl")
    c = base_config()
    c.experiments = ("select",)
    c.model.path = tiny_model_dir
    c.select.update(method="toy_length", n_select=5, domain_path=str(plugin_dirs / "domain.jsonl"),
                    pool_path=str(plugin_dirs / "pool.jsonl"))
    c.select.toy_length.longest = True
    rep = run(c, str(plugin_dirs / "job"))["select"]
    assert rep["method"] == "toy_length"
    with open(plugin_dirs / "job" / "select" / "selected.jsonl") as fh:
        chosen = [json.loads(line)["id"] for line in fh]
    longest = sorted(range(len(pool)), key=lambda i: (-len(pool[i]["prompt"]), i))[:5]
    assert chosen == [pool[i]["id"] for i in longest]
