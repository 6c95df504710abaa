"""The selection-speed and cost-model benchmarks run end to end (``--quick``): JSON structure,
the JAX vs PyTorch ``torch.func`` feature agreement, the FLOP cross-check and the docs page.

No timing assertions: speeds are reported by the benchmarks, not tested.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(name, *args):
    env = {**os.environ, "NTK_JAX_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), "--quick", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)  # stdout is exactly one JSON object


@pytest.mark.benchmark
def test_selection_speed_factored_only():
    """``--factored-only``: the factored section alone, with the sparse-site map timed against
    the Kronecker-only one and scored against the exact scores (the tiny model's LoRA factors
    fit in p = 8192, so its scores are the exact ones)."""
    out = run_benchmark("selection_speed.py", "--factored-only")
    f = out["factored_projection"]
    assert set(f["seconds"]) == {"ours_features_factored", "ours_features_kronecker_only", "ours_features",
                                 "train_step_floor", "torch_func_features"}
    assert {row["kind"] for row in f["plan"]} == {"sparse"}
    assert f["score_spearman_vs_exact"]["factored"] == pytest.approx(1.0, abs=1e-9)
    assert f["score_spearman_vs_exact"]["kronecker_only"] > 0.9
    assert out["model"]["P"] == 5376 and "pipelines" not in out
    assert out["torch_device"] == "cpu" and out["like_for_like"] is True


@pytest.mark.slow
@pytest.mark.benchmark
def test_selection_speed_quick():
    out = run_benchmark("selection_speed.py")
    runners = {"train_step_floor", "ours_features", "torch_func_features", "ours_unprojected_grads",
               "ours_scores_jvp", "ours_scores_label_aware_jvp", "ours_scores_label_aware_normalised",
               "ours_loss_change", "ours_knn_embeddings"}
    assert out["torch_device"] == "cpu" and out["like_for_like"] is True
    for key in ("warmup_s", "seconds", "candidates_per_s"):
        assert set(out[key]) == runners, key
        assert all(v > 0 for v in out[key].values()), key
    pipes = out["pipelines"]
    assert pipes["pool_over_n"] == 50
    sec = out["seconds"]
    assert pipes["time_vs_train_step"]["staged"] == pytest.approx(
        (sec["ours_loss_change"] + 4 / 50 * 2 * sec["ours_scores_label_aware_normalised"]) / sec["train_step_floor"])
    assert pipes["time_vs_train_step"]["knn_loss_change"] == pytest.approx(
        (sec["ours_knn_embeddings"] + 4 / 50 * sec["ours_loss_change"]) / sec["train_step_floor"])
    model = out["model"]
    assert model["P"] == 3 * 8 * (64 + 64) + 3 * 8 * (64 + 32)  # LoRA r=8 on q (64→64), v (64→32)
    assert model["lora"]["targets"] == ["q_proj", "v_proj"] and model["lora"]["rank"] == 8
    s = out["settings"]
    assert s["projection_dim"] == 8192 and s["projection_cached"] is True
    assert out["ratio_ours_time_vs_floor"] == pytest.approx(out["seconds"]["ours_features"]
                                                            / out["seconds"]["train_step_floor"])
    assert out["speedup_ours_vs_torch_func"] == pytest.approx(out["seconds"]["torch_func_features"]
                                                              / out["seconds"]["ours_features"])
    assert set(out["targets"]) == {"within_2x_of_floor", "faster_than_torch_func", "scores_jvp_within_2x_of_floor",
                                   "label_aware_jvp_within_1_5x_of_scores_jvp"}
    assert out["ratio_label_aware_jvp_vs_scores_jvp"] == pytest.approx(
        out["seconds"]["ours_scores_label_aware_jvp"] / out["seconds"]["ours_scores_jvp"])

    # Same definition on both sides: torch.func per-example gradients of the HF Llama with
    # hand-made LoRA equal ours (float32 rounding), unprojected and through the same matrix.
    agreement = out["agreement"]
    assert agreement["n_examples"] >= 2 and agreement["feature_norm_mean"] > 0
    assert agreement["unprojected_max_rel_diff"] < 1e-4
    assert agreement["projected_max_rel_diff"] < 1e-4
    # Scores by one JVP along Π u equal the features' F @ u.
    assert agreement["scores_jvp_vs_features_max_rel_diff"] < 1e-4

    # the data pipeline: read / length pre-pass / encode rates with and without a chat template
    data = out["data_pipeline"]
    assert data["records"] == 200 and data["read_per_s"] > 0 and data["heap_gb_per_million"] > 0
    for name in ("chat_template", "plain"):
        d = data[name]
        assert d["length_prepass_per_s"] > 0 and d["encode_per_s"] > 0 and d["tokens_per_record_mean"] > 100
        assert d["paper_pool_one_core_s"]["total"] == pytest.approx(sum(
            d["paper_pool_one_core_s"][k] for k in ("read", "length_prepass", "encode")))
    assert data["bottleneck"] in ("accelerator", "data pipeline") and "estimated" in data["accelerator_estimate"]["source"]

    points = out["scaling"]["points"]
    assert [p["n"] for p in points] == [64, 128, 256]
    assert all(p["seconds"] > 0 and p["ms_per_candidate"] > 0 for p in points)
    fit = out["scaling"]["linear_fit"]
    assert set(fit) == {"intercept_s", "slope_s_per_candidate", "r2"} and fit["r2"] <= 1.0


@pytest.mark.slow
@pytest.mark.benchmark
def test_cost_model_quick(tmp_path):
    docs = tmp_path / "cost_model.md"
    out = run_benchmark("cost_model.py", "--docs", str(docs))
    (m,) = out["measured"]
    assert (m["hidden"], m["seq_len"], m["P"]) == (64, 32, 5376)
    assert m["seconds_per_example"] > 0
    # The analytic forward+backward FLOP count agrees with XLA's count of the compiled program.
    if m["xla_fwd_bwd_flops_per_token"] is not None:
        assert 0.8 < m["xla_over_analytic"] < 1.25, m["xla_over_analytic"]
    projected = {(r["model"], r["tokens_per_example"]): r for r in out["projected"]}
    assert set(projected) == {(n, t) for n in ("Llama-3-8B", "Qwen3-8B") for t in (512, 1024)}
    for r in projected.values():
        hours = r["accelerator_hours"]
        assert hours["A100 (bf16 dense)"] > hours["H100 SXM (bf16 dense)"] > 0
        assert 0 < r["projection_share"] < 0.05  # the projection is negligible at 8B
    # Twice the tokens → about twice the hours (linear in T up to the attention term).
    ratio = (projected[("Llama-3-8B", 1024)]["accelerator_hours"]["A100 (bf16 dense)"]
             / projected[("Llama-3-8B", 512)]["accelerator_hours"]["A100 (bf16 dense)"])
    assert 2.0 < ratio < 2.2
    text = docs.read_text()
    assert "Measured" in text and "Assumed" in text and "31 A100-hours" in text and "Llama-3-8B" in text


def test_cost_model_parameter_counts_match_published_sizes():
    """Matmul weights + input embedding of the 8B configs = the published parameter counts
    (Llama-3-8B: 8.03B; Qwen3-8B: 8.19B incl. untied LM head), so the FLOP formula sees the
    right N."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import cost_model
    finally:
        sys.path.pop(0)
    for shape, published in ((cost_model.LLAMA3_8B, 8.03e9), (cost_model.QWEN3_8B, 8.19e9)):
        total = shape.matmul_params() + shape.hidden * shape.vocab
        assert abs(total / published - 1) < 0.01, (shape.name, total)
    # LoRA r=8 on q/v: L·r·((d + H·d_h) + (d + H_kv·d_h)).
    assert cost_model.LLAMA3_8B.lora_params(8, ("q_proj", "v_proj")) == 32 * 8 * (8192 + 5120)


def test_lengthen_repeats_real_tokens_without_inner_padding():
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("selection_speed", os.path.join(ROOT, "benchmarks",
                                                                                "selection_speed.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pool = {"input_ids": np.array([[5, 6, 7, 0], [8, 9, 0, 0]]),
            "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]]),
            "loss_mask": np.array([[0, 1, 1, 0], [0, 1, 0, 0]], np.float32), "label": np.array([1, 2])}
    out = mod.lengthen(pool, 7)
    np.testing.assert_array_equal(out["input_ids"], [[5, 6, 7, 5, 6, 7, 5], [8, 9, 8, 9, 8, 9, 8]])
    np.testing.assert_array_equal(out["attention_mask"], np.ones((2, 7)))  # no padding inside a row
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1, 0]])
    np.testing.assert_array_equal(out["label"], [1, 2])
    assert mod.lengthen(pool, 4) is pool


def test_pipeline_flops_closed_forms():
    """The whole-pipeline counts of the cost model from F, G and J by hand: the recommended kNN →
    Δ pipeline is a forward pass of the pool plus two of the 4N kept, never above the paper's."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import cost_model
    finally:
        sys.path.pop(0)
    shape, tokens, pool, n, dom, p = cost_model.LLAMA3_8B, 512, 1_800_000, 9000, 1000, 8192
    per_tok = cost_model.flops_per_token(shape, tokens, cost_model.LORA.rank, cost_model.LORA.targets)
    F, G = tokens * per_tok["forward"], tokens * per_tok["feature_fwd_bwd"]
    for k in (1, 3):
        got = cost_model.pipeline_flops(shape, tokens, pool, n_select=n, n_domain=dom, projection_dim=p,
                                        targets_per_pool=k)
        assert got["knn_loss_change"] == pytest.approx(dom * G + pool * F + 8 * n * F)
        assert got["loss_change"] == pytest.approx(dom * G + pool * F * (1 + 1 / k))
        assert got["knn_loss_change"] < got["paper"] < got["gradient"]
