"""The 8B-config rehearsal (benchmarks/rehearse_scale.py): its pieces by default (the overrides
change only sizes and paths, the multi-host commands, the memory watchdog, the tiny checkpoints);
all 12 rehearsals (2 models × 6 platforms, the multi-host ones as 4 processes) only with
``pytest -m benchmark`` (30–40 minutes on a 2-core host shared with other jobs)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from test_scale_configs import load

from configs import common_8b
from ntk_jax.launcher import platforms as plat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "rehearse_scale.py")
_spec = importlib.util.spec_from_file_location("rehearse_scale", SCRIPT)
rs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rs)

# What the rehearsal may change in a platform's config: paths and the sizes of a tiny run.
CHANGED = {"model.path", "select.domain_path", "select.pool_path", "select.n_select", "select.warmup.total_steps",
           "select.warmup.warmup_steps", "select.warmup.checkpoint_every", "select.shard_size", "select.max_len",
           "pretrain.max_len"}


def flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("platform", ["gpu1", "v5e-8", "v4-32"])
def test_overrides_change_only_paths_and_sizes(platform):
    flags = rs.overrides("/m", "/d.jsonl", "/p.jsonl", n_select=64, warmup_steps=10, max_len=64, shard_size=64)
    base = flat(load("select_llama3_8b.py", platform))
    got = flat(load("select_llama3_8b.py", platform, *flags))
    changed = {k for k in base if base[k] != got[k]}
    assert changed <= CHANGED and {"model.path", "select.n_select"} <= changed, changed
    lay = plat.layout(platform)
    assert (got["mesh.model"], got["model.param_dtype"], got["select.feature_batch_size"],
            got["select.warmup.batch_size"]) == (lay.mesh[1], lay.param_dtype, lay.feature_batch_size,
                                                 lay.train_batch_size)
    assert (got["select.projection_type"], got["select.projection_dim"], got["select.lora.rank"]) == (
        base["select.projection_type"], common_8b.PROJECTION_DIM, common_8b.LORA["rank"])


def test_multi_host_platforms_run_as_processes():
    one = rs.job_commands("qwen3", "v5e-8", "/w", [], real_devices=False)
    assert len(one) == 1 and not any(a.startswith("--process_id") for a in one[0])
    four = rs.job_commands("llama3", "v4-32", "/w", ["--config.select.n_select=64"], real_devices=False)
    assert [c[-1] for c in four] == [f"--process_id={i}" for i in range(4)]
    assert len({c[-3] for c in four}) == 1 and four[0][-2] == "--num_processes=4"  # one coordinator
    assert len(rs.job_commands("llama3", "v4-32", "/w", [], real_devices=True)) == 1
    env = rs.process_env(4)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4" and env["JAX_PLATFORMS"] == "cpu"
    assert "XLA_FLAGS" not in rs.process_env(None) and "JAX_PROCESS_ID" not in rs.process_env(None)


def test_watchdog_kills_a_process_over_the_limit(tmp_path):
    hog = [sys.executable, "-c", "import time; b = bytearray(400 * 10**6); b[::4096] = b'x' * len(b[::4096]); "
                                 "time.sleep(30)"]
    res = rs.run_watched([hog], dict(os.environ), log_dir=str(tmp_path), mem_limit=0.2e9, total_limit=1e9,
                         timeout=60)
    assert res["status"].startswith("killed: memory > 0.2 GB") and res["wall_s"] < 20, res
    ok = rs.run_watched([[sys.executable, "-c", "pass"]] * 2, dict(os.environ), log_dir=str(tmp_path / "ok"),
                        mem_limit=2e9, total_limit=4e9, timeout=60)
    assert ok["status"] == "ok" and ok["returncodes"] == [0, 0] and len(ok["maxrss_gb"]) == 2


def test_scores_digest_sees_one_changed_bit(tmp_path):
    import numpy as np

    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    x = np.linspace(0, 1, 7, dtype=np.float32)
    np.savez(a, ids=np.array(["p0", "p1"]), scores=x)
    y = x.copy()
    y.view(np.uint32)[3] ^= 1  # the last bit of one score
    np.savez(b, ids=np.array(["p0", "p1"]), scores=y)
    assert rs.scores_digest(str(a)) == rs.scores_digest(str(a)) != rs.scores_digest(str(b))
    assert rs.scores_digest(str(tmp_path / "missing.npz")) is None


def test_tiny_checkpoints_are_the_8b_families(tmp_path):
    pytest.importorskip("transformers")
    from ntk_jax.data.records import encode_records
    from ntk_jax.launcher.context import load_tokenizer
    from ntk_jax.models.hf_loading import config_from_hf

    _, _, records = rs.write_data(str(tmp_path), 48, 4)
    texts = [r["prompt"] + r["response"] for r in records]
    for family in ("llama3", "qwen3"):
        d = rs.build_checkpoint(family, str(tmp_path / family), texts)
        with open(os.path.join(d, "config.json")) as fh:
            hf = json.load(fh)
        cfg = config_from_hf(hf)
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (64, 2, 4, 2)
        assert hf["vocab_size"] == rs.VOCAB
        if family == "llama3":
            assert hf["model_type"] == "llama" and (hf.get("rope_parameters") or hf["rope_scaling"])["rope_type"] == "llama3"
        else:
            assert hf["model_type"] == "qwen3" and cfg.head_dim == 32 != 64 // 4
        tok = load_tokenizer(d)
        enc = encode_records(tok, records[:4], 64)
        assert enc["loss_mask"].sum() > 0 and enc["input_ids"].max() < rs.VOCAB


@pytest.mark.slow
@pytest.mark.benchmark
def test_rehearsal_of_every_platform(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--workdir", str(tmp_path / "w"), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    rows = {(r["model"], r["platform"]): r for r in result["rows"]}
    assert len(rows) == 12 and result["summary"]["all_ok"], [(k, r["status"]) for k, r in rows.items()]
    for (model, platform), r in rows.items():
        assert r["processes"] == plat.platform(platform).hosts, (model, platform)
        assert r["projection"] == ["dense", common_8b.PROJECTION_DIM]
        assert max(r["maxrss_gb"]) < 4.0, (model, platform, r["maxrss_gb"])  # was 24 GB (OOM) on v5e-8
    for model, c in result["summary"]["consistency"].items():
        same = c["same_arithmetic"]["float32 2/2"]  # v4-8 (1 process) = v4-32 (4 processes)
        assert same["identical"] and same["scores_bitwise_equal"], (model, c)


def test_consistency_and_table():
    def row(platform, ids, dtype, batch):
        return {"model": "llama3", "platform": platform, "processes": 1, "devices_per_host": 1, "mesh": [1, 1],
                "param_dtype": dtype, "status": "ok", "wall_s": 1.0, "maxrss_gb": [1.0], "selected_ids": ids,
                "batch_feature_train": batch, "timings_s": {"warmup": 1.0, "score": 2.0}, "estimate": {}}

    rows = [row("v4-8", ["a", "b"], "float32", [2, 2]), row("v4-32", ["b", "a"], "float32", [2, 2]),
            row("gpu1", ["a", "c"], "bfloat16", [1, 1])]
    c = rs.consistency(rows)["llama3"]
    assert c["overlap"]["gpu1"]["v4-8"] == 0.5 and c["overlap"]["v4-8"]["v4-32"] == 1.0
    # a set; no score files here, so both digests are None (equal)
    assert c["same_arithmetic"] == {"float32 2/2": {"platforms": ["v4-32", "v4-8"], "identical": True,
                                                    "scores_bitwise_equal": True}}
    rows[1]["scores_sha256"] = "x"
    assert not rs.consistency(rows)["llama3"]["same_arithmetic"]["float32 2/2"]["scores_bitwise_equal"]
    result = {"rows": rows, "summary": {"ok": 3, "runs": 3, "total_wall_s": 3.0, "baseline_rss_gb": {"1": 0.5},
                                        "consistency": rs.consistency(rows)}}
    table = rs.render(result)
    assert table.startswith(rs.DOC_BEGIN) and table.endswith(rs.DOC_END) and "| llama3 | v4-32 | 1 × 1 |" in table
