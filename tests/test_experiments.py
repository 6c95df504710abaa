"""The launcher and the three validation experiments, end to end on a shrunken default
config (the same code path as the README's main command)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from experiment_checks import check_approximation, check_spectrum, check_stability

from ntk_jax.kernels.spectrum import condition_number
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.launcher.run import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config():
    c = base_config()
    c.model.arch.hidden_size = 32
    c.model.arch.intermediate_size = 64
    c.pretrain.n_per_task = 64
    c.pretrain.train.total_steps = 30
    c.pretrain.train.batch_size = 32
    c.pretrain.train.checkpoint_every = 0
    c.stability.n_train = 64
    c.stability.n_probe = 6
    c.stability.kernel_every = 5
    c.stability.train.total_steps = 15
    c.spectrum.n_kernel = 10
    c.spectrum.n_train = 32
    c.spectrum.n_eval = 32
    c.spectrum.train.total_steps = 5
    c.spectrum.placements = c.spectrum.placements[:1] + c.spectrum.placements[3:5]
    c.spectrum.n_random_kernels = 200
    c.approximation.n_examples = 10
    c.approximation.widths = [16, 32]
    c.approximation.n_width_examples = 4
    return c


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("job"))
    return workdir, run(small_config(), workdir)


@pytest.mark.slow  # the module's job (the `reports` fixture) runs in its setup
def test_reports_and_plots_written(reports):
    workdir, reps = reports
    for name in ("stability", "spectrum", "approximation"):
        assert os.path.isfile(os.path.join(workdir, name, "report.json"))
        for plot in reps[name]["plots"]:
            assert os.path.getsize(plot) > 10_000, plot
    assert os.path.isfile(os.path.join(workdir, "base_model", "model.safetensors"))
    # Pre-training really trained the model.
    pre = reps["stability"]["setup"]["model"]["pretrain"]
    assert pre["final_loss"] < pre["first_loss"]


def test_stability_report_matches_saved_kernels(reports):
    """S(t), a*(t), u(t), the kernel change, ε and the bound from the saved Θ_t (numpy)."""
    workdir, reps = reports
    r = reps["stability"]
    K = check_stability(os.path.join(workdir, "stability"), r)
    assert r["steps"] == [0, 5, 10, 15] and K.shape == (4, 6, 6)
    assert r["linearization_rel_error"][0] == 0.0
    # The kernel moved during training (the experiment is not measuring a frozen model).
    assert r["relative_change"][-1] > 0


def test_spectrum_report_matches_saved_kernels(reports):
    """κ, the risk and its correct bounds from the saved kernels (scipy.linalg.eigh, a solve)."""
    workdir, reps = reports
    r = reps["spectrum"]
    saved = check_spectrum(os.path.join(workdir, "spectrum"), r)
    assert saved["kernels"].shape == (3, 10, 10) and "y_regression" not in saved
    # The paper's printed lower bound fails on a measurable share of random PSD kernels.
    assert r["random_psd"]["printed_lower_violation_rate"] > 0.02
    assert r["random_psd"]["correct_bounds_violation_rate"] == 0.0


def test_approximation_report_matches_saved_kernels(reports):
    """The Θ̃-vs-tr Θ correlations and the cross-term size from the saved kernels."""
    workdir, reps = reports
    r = reps["approximation"]
    saved = check_approximation(os.path.join(workdir, "approximation"), r)
    assert saved["output_gram"].shape[1:] == (50, 50)  # O = V of the char tokenizer
    assert r["jacobian_free_consistency_rel"] < 1e-4  # jacobian_free_ntk == Σ_ab Θ_ab
    assert r["projected"]["8192"]["rel_frobenius_error_vs_exact_jf"] < 0.1
    assert [w["width"] for w in r["widths"]] == [16, 32]


def test_finished_experiments_are_not_rerun(reports):
    workdir, reps = reports
    again = run(small_config(), workdir)
    assert again["spectrum"]["elapsed_s"] == reps["spectrum"]["elapsed_s"]


def test_unknown_config_key_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ntk_jax.main", f"--config={ROOT}/configs/default.py",
                           f"--workdir={tmp_path}", "--config.stability.no_such_key=3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr


def test_unknown_experiment_is_an_error(tmp_path):
    c = small_config()
    c.experiments = ["stabilty"]
    with pytest.raises(ValueError, match="unknown experiment"):
        run(c, str(tmp_path))


def test_condition_number_rejects_nonpositive_sigma():
    with pytest.raises(ValueError, match="sigma"):
        condition_number(np.eye(3), 0.0)
