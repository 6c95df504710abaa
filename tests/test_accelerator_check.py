"""``benchmarks/accelerator_check.sh``: one JSON from every benchmark, each step under its own
time limit. The toy-size run (``--quick``) is a benchmark test (``pytest -m benchmark``); the
time-limit handling is checked in the default run (every step stopped after 2 s)."""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "accelerator_check.sh")
STEPS = ("ntk_speed", "selection_speed", "model_speed", "memory_table", "model_profile")


def _run(out, *args, **env):
    proc = subprocess.run(["bash", SCRIPT, *args, str(out)], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "accelerator_check.json").read_text())


def test_a_step_out_of_time_is_recorded_and_the_check_goes_on(tmp_path):
    r = _run(tmp_path, "--quick", ACCELERATOR_CHECK_LIMIT_S="2")
    assert list(r["steps"]) == list(STEPS) and r["ok"] is False
    for name, step in r["steps"].items():
        assert step["rc"] == 124 and step["limit_s"] == 2 and step["result"] is None, (name, step)
        assert "stderr_tail" in step
    assert r["backend"] == "cpu" and r["devices"] and r["jax_version"]


@pytest.mark.slow
@pytest.mark.benchmark
def test_quick_check_runs_every_benchmark(tmp_path):
    r = _run(tmp_path, "--quick")
    assert r["ok"] is True and r["quick"] is True
    for name in STEPS:
        step = r["steps"][name]
        assert step["rc"] == 0 and isinstance(step["result"], dict) and step["wall_s"] <= step["limit_s"], name
    assert "speedup_best_exact_vs_best_nt" in r["steps"]["ntk_speed"]["result"]
    assert r["steps"]["memory_table"]["result"]["rows"]
    assert (tmp_path / "memory.md").is_file()
    assert r["steps"]["model_profile"]["result"]["ops_traced"] > 0


def test_usage_error_without_an_output_directory():
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "usage: benchmarks/accelerator_check.sh" in proc.stderr


@pytest.mark.parametrize("step", ["ntk_speed", "selection_speed", "model_speed", "model_profile"])
def test_full_size_arguments_parse(step, tmp_path):
    """The full-size (accelerator) arguments the script passes each benchmark are ones that
    benchmark accepts (they run only on a lent GPU, so nothing else would notice a rename)."""
    import importlib
    import re
    import shlex
    import sys

    text = open(SCRIPT).read()
    full = text[text.index("else\n"):text.index("fi\n", text.index("else\n"))]
    names = {"ntk_speed": "NTK_ARGS", "selection_speed": "SEL_ARGS", "model_speed": "MODEL_ARGS",
             "model_profile": "PROF_ARGS"}
    args = re.search(names[step] + r'="([^"]*)"', full).group(1)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        mod = importlib.import_module(step)
    finally:
        sys.path.pop(0)
    mod.parse_args(shlex.split(args.replace("$OUT", str(tmp_path))))  # argparse exits on a bad flag
