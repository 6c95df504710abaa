"""Every field of every ``configs/*.py`` can be set on the command line.

Each config is loaded the way ``python -m ntk_jax.main --config=configs/FILE[:ARG]`` loads it
(``ml_collections.config_flags``, locked) and parsed by the real absl flag parser with a fresh
``FlagValues``. No field holds a list (ml_collections cannot override lists) or a bare
``None``; every sequence field (tuples, tuple placeholders such as ``lora.layers``) is
overridden at once and must arrive as given.
"""
from __future__ import annotations

import glob
import importlib.util
import inspect
import os

import pytest
from absl import flags
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_path

from experiments.spectrum import placement_lora
from ntk_jax.launcher.config_lib import EXPERIMENTS
from ntk_jax.models.lora import LoRAConfig

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags' loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the job configs (``get_config`` files), not the settings modules they share (``common_8b.py``)
CONFIG_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if "def get_config" in open(p).read())
# One valid argument for each config file whose get_config takes one.
ARGS = {"select_compare.py": "no_conflict", "select_ntk.py": "paper", "select_llama3_8b.py": "gpu8", "select_qwen3_8b.py": "v5e-8"}
# Field types the config flag parser can set (ml_collections.config_flags._FIELD_TYPE_TO_PARSER;
# ``object``: a Python literal, for a field that takes values of several types).
OVERRIDABLE = (int, float, bool, str, tuple, object)


def load(file: str, *overrides: str):
    """The config as ``python -m ntk_jax.main --config=configs/FILE[:ARG] OVERRIDES`` sees it."""
    arg = ARGS.get(file)
    spec = os.path.join(ROOT, "configs", file) + (f":{arg}" if arg else "")
    argv = ["prog", f"--config={spec}", *overrides]
    fv = flags.FlagValues()
    # (config_flags finds the override flags in the argv it is given at definition time)
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def leaves(cfg, prefix: str = ""):
    """``(dotted path, value)`` of every field of ``cfg`` that is not a ``ConfigDict``."""
    for key in sorted(cfg.keys()):
        value, path = cfg[key], f"{prefix}{key}"
        if isinstance(value, config_dict.ConfigDict):
            yield from leaves(value, path + ".")
        else:
            yield path, value


def other_value(value: tuple | None) -> tuple:
    """A tuple different from the field's ``value`` (``None``: an unset tuple placeholder)."""
    if value is None:
        return (0, 1)
    if len(value) > 1:
        return value[:1]
    return value * 2 if value else ("a",)


def test_every_config_file_is_covered():
    for file in CONFIG_FILES:
        spec = importlib.util.spec_from_file_location(file[:-3], os.path.join(ROOT, "configs", file))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        takes_arg = bool(inspect.signature(module.get_config).parameters)
        assert takes_arg == (file in ARGS), f"configs/{file}: list its argument in ARGS"


@pytest.mark.parametrize("file", CONFIG_FILES)
def test_every_sequence_field_is_overridable(file):
    config = load(file)
    sequences = {}
    for path, value in leaves(config):
        assert not isinstance(value, list), f"configs/{file}: {path} is a list; make it a tuple"
        field_type = config_path.get_type(path, config)
        assert field_type in OVERRIDABLE, f"configs/{file}: {path} ({field_type}) cannot be set by a flag"
        if field_type is tuple:
            sequences[path] = other_value(value)
    assert "experiments" in sequences and any(p.endswith("lora.layers") for p in sequences)
    overridden = dict(leaves(load(file, *(f"--config.{p}={v!r}" for p, v in sequences.items()))))
    for path, value in sequences.items():
        assert overridden[path] == value and isinstance(overridden[path], tuple), path


@pytest.mark.parametrize("argv", [["(0,1)"], ["[0,1]"], ["0,1"], ["0", "1"]])
def test_sequence_syntaxes(argv):
    """A tuple, a list, bare commas, or the flag repeated once per element."""
    c = load("select_compare.py", *(f"--config.select_compare.seeds={a}" for a in argv))
    assert c.select_compare.seeds == (0, 1)


@pytest.mark.parametrize("value, want", [("0.05", 0.05), ("16", 16)])
def test_n_select_takes_a_count_or_a_fraction(value, want):
    n = load("select_ntk.py", f"--config.select.n_select={value}").select.n_select
    assert n == want and type(n) is type(want)


def test_overridden_lora_fields_reach_the_experiments():
    c = load("spectrum.py", "--config.spectrum.lora.layers=(0,2)", "--config.spectrum.lora.targets=k_proj",
             "--config.spectrum.placements=({'targets': ['o_proj'], 'layers': (1,)},)")
    assert LoRAConfig.from_dict(c.spectrum.lora) == LoRAConfig(targets=("k_proj",), layers=(0, 2))
    (placement,) = c.spectrum.placements
    assert placement_lora(c.spectrum.lora, placement) == LoRAConfig(targets=("o_proj",), layers=(1,))
    assert LoRAConfig.from_dict(load("spectrum.py").spectrum.lora).layers is None  # default: every layer


@pytest.mark.parametrize("value", ["all-linear", "('all-linear',)"])
def test_all_linear_lora_target_from_the_command_line(value):
    lora = LoRAConfig.from_dict(load("select_ntk.py", f"--config.select.lora.targets={value}").select.lora)
    assert lora.targets == ("all-linear",)


def test_job_configs_state_what_the_main_job_runs():
    """``configs/<experiment>.py`` restates its section's values; the main job runs the same."""
    main = load("default.py")
    assert main.experiments == EXPERIMENTS
    for name in EXPERIMENTS:
        job = load(f"{name}.py")
        assert job.experiments == (name,)
        assert job[name].to_dict() == main[name].to_dict(), name
        assert job.pretrain.to_dict() == main.pretrain.to_dict()
