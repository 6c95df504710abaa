"""The NTK speed benchmark runs end to end (``--quick``): structure, agreement, memory bound.

No timing assertions: speed targets are reported by the benchmark, not tested.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "ntk_speed.py")

LIBRARY_METHODS = ("jacobian", "ntk_vp", "structured", "neural_tangents_jacobian_contraction",
                   "neural_tangents_ntk_vector_products", "jacobian_free", "jacobian_free_proj8192")
NT_MODES = ("neural_tangents_jacobian_contraction", "neural_tangents_ntk_vector_products")


@pytest.mark.slow
@pytest.mark.benchmark
def test_ntk_speed_quick():
    env = {**os.environ, "NTK_JAX_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object

    for key in ("device", "jax_version", "model", "timings_s", "ratios_vs_best_neural_tangents",
                "best_exact_method", "speedup_best_exact_vs_best_nt", "agreement_max_rel_diff",
                "blocked_kernel"):
        assert key in out, key
    model = out["model"]
    assert (model["O"], model["n"]) == (50, 8)
    assert model["P"] == 3 * 8 * (64 + 64) + 3 * 8 * (64 + 32)  # LoRA r=8 on q (64→64), v (64→32)

    forms = ("cross", "symmetric")
    for key in ("timings_s", "ratios_vs_best_neural_tangents", "best_exact_method",
                "best_neural_tangents_mode", "speedup_best_exact_vs_best_nt", "agreement_max_rel_diff"):
        assert set(out[key]) == set(forms), key
    for form in forms:
        assert set(out["timings_s"][form]) == set(LIBRARY_METHODS)
        assert set(out["ratios_vs_best_neural_tangents"][form]) == set(LIBRARY_METHODS)
        for m in LIBRARY_METHODS:
            assert out["timings_s"][form][m] > 0
            assert out["ratios_vs_best_neural_tangents"][form][m] > 0
        assert out["best_exact_method"][form] in ("jacobian", "ntk_vp", "structured")
        assert out["best_neural_tangents_mode"][form] in NT_MODES
        assert out["speedup_best_exact_vs_best_nt"][form] > 0
    assert not any(k.startswith("proto") for k in out), "prototype section must be gone"
    assert out["settings"]["basis_batch_arg"] is None  # library default

    agreement = out["agreement_max_rel_diff"]
    # Every exact method in both forms is compared with the cross `jacobian` kernel.
    assert {"ntk_vp", "structured", "neural_tangents_jacobian_contraction", "neural_tangents_ntk_vector_products",
            "jacobian_free_vs_sum_of_full_kernel"} <= set(agreement["cross"])
    assert {"jacobian", "ntk_vp", "structured", "neural_tangents_jacobian_contraction",
            "neural_tangents_ntk_vector_products",
            "jacobian_free_vs_sum_of_full_kernel"} <= set(agreement["symmetric"])
    for form in forms:
        for m, diff in agreement[form].items():
            assert 0 <= diff < 1e-3, (form, m, diff)
    # The projected kernel is approximate: only a loose JL sanity check.
    assert out["jacobian_free_projected_rel_error_fro"] < 0.5

    blocked = out["blocked_kernel"]
    assert (blocked["n"], blocked["block_size"]) == (96, 32)
    assert blocked["method"] == out["best_exact_method"]["cross"]
    assert blocked["n_blocks_computed"] == 6 and blocked["n_diagonal_blocks"] == 3
    assert blocked["kernel_shape"] == [96, 96] and blocked["kernel_finite"]
    assert blocked["wall_s"] > 0 and blocked["bound_mb"] > 0
    assert "bound_definition" in blocked
    assert blocked["repeats"] == 3 and len(blocked["peak_rss_growth_mb_per_run"]) == 3
    assert blocked["peak_rss_growth_mb"] == min(blocked["peak_rss_growth_mb_per_run"])
    assert blocked["within_bound"] is True, blocked

    # Every form (traced/full × cross/symmetric) of both problems: best ours vs best neural-tangents.
    comp = out["every_form_comparison"]
    assert comp["n"] == 8 and set(comp["results"]) == {"mlp", "cnn"}  # --quick: the transformer's forms are above
    for problem, kinds in comp["results"].items():
        assert set(kinds) == {"traced", "full"}
        for kind, by_form in kinds.items():
            assert set(by_form) == set(forms)
            for form, r in by_form.items():
                assert r["best_library_method"] in ("jacobian", "ntk_vp", "structured")
                assert r["best_neural_tangents_mode"] in NT_MODES
                assert r["speedup_best_library_vs_best_nt"] > 0
                assert r["auto_choice"] in ("jacobian", "ntk_vp", "structured")
                assert r["auto_time_over_best_library"] >= 1.0  # no timing target in a test: reported
                assert r["auto_within_10pct_of_best"] == (r["auto_time_over_best_library"] <= 1.10)
                assert r["agreement_max_rel_diff_vs_cross_jacobian"]["structured"] < 1e-3, (problem, kind, form)
                assert r["backward_floor_s"] > 0 and r["best_nt_over_floor"] > 0
    assert comp["structured_plan_summary"]["mlp/traced"].get("factored", 0) >= 1
    assert "| mlp | traced | cross |" in comp["table_markdown"]


@pytest.mark.benchmark
def test_linear_head_ntk_quick():
    """benchmarks/linear_head_ntk.py runs (``--quick``) and its two kernels agree."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "linear_head_ntk.py"), "--quick"],
                          cwd=ROOT, env={**os.environ, "NTK_JAX_NO_PROGRESS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = json.loads(proc.stdout)["rows"]
    assert row["vocab"] == 128 and row["hidden"] == 32
    assert set(row["seconds"]) == {"logits", "linear_head", "sum_of_logits_kernel_logits", "sum_of_logits_kernel_head"}
    assert row["max_rel_diff"] < 1e-4 and row["sum_of_logits_max_rel_diff"] < 1e-4
