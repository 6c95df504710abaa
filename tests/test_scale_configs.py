"""The 8B selection configs (``configs/select_llama3_8b.py``, ``configs/select_qwen3_8b.py``)
for every platform of :mod:`ntk_jax.launcher.platforms` (docs/theory.md §8.3; docs/scale.md).

Each config is loaded the way ``ntk_jax.main`` loads it (ml_collections ``config_flags``
with ``--config=FILE:PLATFORM``, locked), checked by the launcher's checks, and its layout
checked against the memory estimate: the exact per-device parameter bytes (``param_memory``,
what ``estimate_memory(..., compile=False)`` reports) and the generated ``docs/scale.md``
rows for the same layout (the compiled estimate) must both fit the platform's device memory.
"""
from __future__ import annotations

import functools
import os
import re

import pytest
from absl import flags
from ml_collections import config_flags

from configs import common_8b
from ntk_jax.launcher import platforms as plat
from ntk_jax.launcher.config_lib import base_config, sections
from ntk_jax.launcher.context import prepare_context
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.launcher.memory import LLAMA3_8B, QWEN3_8B, abstract_model, decoder_config, param_memory
from ntk_jax.training.trainer import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"select_llama3_8b.py": ("Llama-3-8B", LLAMA3_8B), "select_qwen3_8b.py": ("Qwen3-8B", QWEN3_8B)}


def load(file: str, arg: str | None, *overrides: str):
    """The config as ``python -m ntk_jax.main --config=configs/FILE[:ARG] OVERRIDES`` sees it."""
    spec = os.path.join(ROOT, "configs", file) + (f":{arg}" if arg else "")
    argv = ["prog", f"--config={spec}", *overrides]
    fv = flags.FlagValues()
    # (config_flags finds the override flags in the argv it is given at definition time)
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


@functools.lru_cache(maxsize=None)
def abstract_8b(name: str, param_dtype: str):
    """The shape-only 8B model with the configs' LoRA (built once per model and dtype)."""
    hf = dict(CONFIGS.values())[name]
    return abstract_model(decoder_config(hf, dtype="bfloat16", param_dtype=param_dtype),
                          LoRAConfig.from_dict(common_8b.LORA))


def doc_rows() -> dict[tuple[str, str], dict]:
    """The generated per-platform rows of docs/scale.md: (model, platform) -> fields."""
    text = open(os.path.join(ROOT, "docs", "scale.md")).read()
    table = text.split("<!-- platform table -->", 1)[1].split("<!-- /platform table -->", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) == 17 and cells[0] in {m for m, _ in CONFIGS.values()}:
            rows[(cells[0], cells[1])] = {"mesh": cells[3], "param_dtype": cells[4], "batch": cells[5],
                                          "peak_device_gib": float(cells[14]),
                                          "memory_gib": float(re.search(r"\(([\d.]+) GiB\)", cells[15]).group(1))}
    return rows


@pytest.mark.parametrize("file", sorted(CONFIGS))
@pytest.mark.parametrize("platform", sorted(plat.PLATFORMS))
def test_config_loads_and_fits(file, platform):
    name, _ = CONFIGS[file]
    c = load(file, platform)
    assert c.experiments == ("select",) and all(e in sections() for e in c.experiments)
    lay, p = plat.layout(platform), plat.platform(platform)
    assert (c.mesh.data, c.mesh.model) == (-1, lay.mesh[1]) and lay.mesh[0] * lay.mesh[1] == p.devices_per_host
    s = c.select
    assert (s.method, s.n_select, s.projection_dim, s.max_len, s.truncation) == ("ntk", 9000, 8192, 1024, "left")
    assert c.pretrain.max_len == base_config().pretrain.max_len  # the toy pre-training length, untouched
    assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", lay.param_dtype)
    lora = LoRAConfig.from_dict(s.lora)
    assert (lora.rank, lora.alpha, lora.targets) == (128, 512.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
    warm = TrainConfig.from_dict(s.warmup)
    assert warm.batch_size == lay.train_batch_size and s.feature_batch_size == lay.feature_batch_size
    # exact per-device parameter bytes (weights + LoRA) under the platform's mesh (what
    # estimate_memory(..., compile=False) reports)
    est = param_memory(abstract_8b(name, lay.param_dtype), lay.mesh)
    weights = est["base_bytes_per_device"] + est["lora_bytes_per_device"]
    assert weights < 0.5 * p.device_memory, (platform, weights)
    # the compiled estimate of every program of the job, as generated into docs/scale.md
    row = doc_rows()[(name, platform)]
    assert row["mesh"] == f"{lay.mesh[0]}x{lay.mesh[1]}" and row["param_dtype"] == lay.param_dtype
    assert row["batch"] == f"{lay.feature_batch_size}/{lay.train_batch_size}"
    assert row["memory_gib"] == pytest.approx(p.device_memory / 2 ** 30, abs=0.01)
    assert row["peak_device_gib"] < 0.85 * row["memory_gib"], (name, platform, row)


def test_default_platform_overrides_and_unknown_platform():
    c = load("select_llama3_8b.py", None, "--config.model.path=/elsewhere", "--config.select.n_select=100")
    assert c.mesh.model == plat.layout("gpu8").mesh[1] and c.model.path == "/elsewhere" and c.select.n_select == 100
    with pytest.raises(Exception, match="unknown platform 'tpu-x'"):
        load("select_qwen3_8b.py", "tpu-x")
    with pytest.raises(Exception):  # the config is locked: a misspelt key is an error
        load("select_qwen3_8b.py", "gpu8", "--config.select.n_selct=1")


@pytest.mark.parametrize("file", sorted(CONFIGS))
def test_missing_checkpoint_is_a_clear_error(file, tmp_path):
    c = load(file, "gpu1")
    with pytest.raises(FileNotFoundError, match=r"config\.model\.path '/path/to/.*' is not a directory: set "
                                                r"--config\.model\.path=DIR"):
        prepare_context(c, str(tmp_path))


def test_docstrings_state_the_generated_numbers():
    """Each config's docstring carries the docs/scale.md peak for each platform."""
    rows = doc_rows()
    for file, (name, _) in CONFIGS.items():
        doc = open(os.path.join(ROOT, "configs", file)).read().split('"""')[1]
        for platform in plat.PLATFORMS:
            line = next((ln for ln in doc.splitlines() if ln.startswith(f"| {platform} |")), None)
            assert line is not None, (file, platform)
            assert f"{rows[(name, platform)]['peak_device_gib']:.2f}" in line, (file, platform, line)
