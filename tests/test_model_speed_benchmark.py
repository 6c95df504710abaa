"""The model speed benchmark runs end to end (``--quick``) and reports what it promises.

No timing assertions: speeds are reported by the benchmark, not tested. What is tested is
that both sides ran the same function (logits, loss and LoRA gradients agree), so the
reported ratio compares like with like.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "model_speed.py")
KINDS = ("forward", "forward_backward")


@pytest.mark.slow
@pytest.mark.benchmark
def test_model_speed_quick():
    env = {**os.environ, "NTK_JAX_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--threads", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object
    for key in ("device", "jax_version", "torch_version", "transformers_version", "peft_version",
                "threads", "settings", "sizes"):
        assert key in out, key
    assert out["jax_backend"] == "cpu" and out["torch_device"] == "cpu" and out["like_for_like"] is True
    # --threads 1 pins the process to one CPU (XLA's only single-threaded mode)
    assert out["threads"]["torch"] == 1 and out["threads"]["cores"] == 1
    s = out["settings"]
    assert (s["batch"], s["seq_len"], s["rounds"], s["per_round"]) == (2, [16], 2, 1)
    assert s["lora"] == {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}
    assert set(out["sizes"]) == {"tiny", "larger"}
    for name, r in out["sizes"].items():
        m = r["model"]
        h, kv_dim = m["hidden_size"], m["hidden_size"] // m["num_attention_heads"] * m["num_key_value_heads"]
        # LoRA r=8 on q (h -> h) and v (h -> kv_dim) of every layer, the same on both sides.
        assert m["n_lora_params"] == m["num_hidden_layers"] * 8 * ((h + h) + (h + kv_dim)), name
        assert m["n_params"] > m["n_lora_params"]
        for side in ("flax", "torch"):
            for kind in KINDS:
                assert r["tokens_per_s"][side][kind] > 0
                assert r["median_s"][f"{side}_{kind}"] > 0
        for kind in KINDS:
            want = r["tokens_per_s"]["flax"][kind] / r["tokens_per_s"]["torch"][kind]
            assert r["ratio_flax_over_torch"][kind] == pytest.approx(want, rel=1e-9)
            assert r["tokens_per_s"]["flax"][kind] == pytest.approx(32 / r["median_s"][f"flax_{kind}"])
            rr = r["ratio_per_round"][kind]
            assert 0 < rr["min"] <= rr["median"] <= rr["max"]
        assert r["max_abs_logit_diff"] < 1e-4
        assert r["loss"]["flax"] == pytest.approx(r["loss"]["torch"], rel=1e-5)
        assert r["max_lora_grad_rel_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.benchmark
def test_model_speed_several_lengths():
    """Several ``--seq-len`` values: one entry per length under each size."""
    env = {**os.environ, "NTK_JAX_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--sizes", "tiny", "--seq-len", "8", "12"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout)
    assert out["settings"]["seq_len"] == [8, 12]
    by_len = out["sizes"]["tiny"]
    assert set(by_len) == {"8", "12"}
    for T, r in by_len.items():
        assert r["tokens_per_s"]["flax"]["forward"] == pytest.approx(2 * int(T) / r["median_s"]["flax_forward"])
        assert r["max_abs_logit_diff"] < 1e-4


def _fake_result(ratios: dict, seq_len: list[int]) -> dict:
    """A benchmark result with only what the across-process summary reads."""
    sizes = {}
    for name, by_len in ratios.items():
        cells = {str(T): {"ratio_flax_over_torch": {"forward": r[0], "forward_backward": r[1]}}
                 for T, r in by_len.items()}
        sizes[name] = cells[str(seq_len[0])] if len(seq_len) == 1 else cells
    return {"settings": {"seq_len": seq_len}, "sizes": sizes}


def test_across_processes_summary():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import model_speed

    one = [_fake_result({"tiny": {16: r}}, [16]) for r in ((1.0, 0.8), (1.2, 0.9), (1.1, 1.3))]
    out = model_speed.across_processes(one)
    assert set(out) == {"tiny T16"}
    assert out["tiny T16"]["forward"] == {"median": 1.1, "min": 1.0, "max": 1.2, "values": [1.0, 1.2, 1.1]}
    assert out["tiny T16"]["forward_backward"]["median"] == 0.9
    several = [_fake_result({"tiny": {8: (1.0, 2.0), 12: (3.0, 4.0)}, "larger": {8: (5.0, 6.0), 12: (7.0, 8.0)}}, [8, 12])] * 2
    out = model_speed.across_processes(several)
    assert set(out) == {"tiny T8", "tiny T12", "larger T8", "larger T12"}
    assert out["larger T12"]["forward_backward"]["values"] == [8.0, 8.0]
    assert model_speed._without_processes(["--quick", "--processes", "3", "--sizes", "tiny", "--processes=2"]) == \
        ["--quick", "--sizes", "tiny"]


@pytest.mark.slow
@pytest.mark.benchmark
def test_model_speed_processes():
    """``--processes 2``: two fresh runs, each ratio summarised over them."""
    env = {**os.environ, "NTK_JAX_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--sizes", "tiny", "--processes", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout)
    assert len(out["processes"]) == 2 and out["sizes"] == out["processes"][0]["sizes"]
    s = out["across_processes"]["tiny T16"]
    for kind in KINDS:
        vals = [p["sizes"]["tiny"]["ratio_flax_over_torch"][kind] for p in out["processes"]]
        assert s[kind]["values"] == vals and s[kind]["min"] <= s[kind]["median"] <= s[kind]["max"]


@pytest.mark.slow
@pytest.mark.benchmark
def test_model_speed_cpu_devices():
    """``--cpu-devices 2``: the Flax programs also run data-parallel over two CPU devices in
    the same rounds; they compute the same function (logits, loss, gradients) and their
    ratios are reported beside the one-device ones, per process and across processes."""
    env = {**os.environ, "NTK_JAX_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--sizes", "tiny", "--cpu-devices", "2",
                           "--processes", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout)
    assert out["settings"]["cpu_devices"] == 2
    r = out["sizes"]["tiny"]
    dp = r["flax_dp"]
    assert dp["cpu_devices"] == 2
    assert dp["max_abs_logit_diff_vs_one_device"] < 1e-5 and dp["loss_diff_vs_one_device"] < 1e-6
    assert dp["max_lora_grad_rel_diff"] < 1e-4  # against PyTorch, as the one-device side
    for kind in KINDS:
        assert dp["ratio_over_torch"][kind] == pytest.approx(r["tokens_per_s"]["flax_dp"][kind]
                                                             / r["tokens_per_s"]["torch"][kind], rel=1e-9)
        assert dp["speedup_over_one_device"][kind] == pytest.approx(r["tokens_per_s"]["flax_dp"][kind]
                                                                    / r["tokens_per_s"]["flax"][kind], rel=1e-9)
        assert r["tokens_per_s"]["flax_dp"][kind] == pytest.approx(32 / r["median_s"][f"flax_dp_{kind}"])
        s = out["across_processes"]["tiny T16"][f"{kind}_dp"]
        assert s["values"] == [p["sizes"]["tiny"]["flax_dp"]["ratio_over_torch"][kind] for p in out["processes"]]


def test_model_speed_cpu_devices_must_divide_the_batch():
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--cpu-devices", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cpu-devices must be positive and divide --batch (2), got 3" in proc.stderr


def test_torch_device_follows_jax(monkeypatch):
    """PyTorch goes to CUDA only beside a GPU JAX and a CUDA build; otherwise a GPU run is
    flagged as comparing across devices."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import peers

    assert peers.torch_device() == "cpu" and peers.like_for_like()
    monkeypatch.setattr(peers.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peers.torch_device() == "cpu" and not peers.like_for_like()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert peers.torch_device() == "cuda" and peers.like_for_like()
    monkeypatch.setattr(peers.jax, "default_backend", lambda: "tpu")
    assert peers.torch_device() == "cpu" and not peers.like_for_like()
