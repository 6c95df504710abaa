"""Selection jobs split across jax.distributed processes (docs/theory.md §8.3; docs/scale.md): localhost
CPU processes run ``experiments/select.py`` through the launcher (tests/workers/
selection_worker.py); the shards, scores and selection must equal a one-process run bitwise,
each process must compute exactly its own shards (``k mod n``), and after one process is
killed midway a rerun must compute only the shards that are missing."""
import filecmp
import json
import os

import numpy as np
import pytest
from procs import ROOT, free_port, run_workers

WORKER = os.path.join(ROOT, "tests", "workers", "selection_worker.py")
STORES = ("embeddings", "scores")  # the stores of ntk@paper


def run_job(workdir, model_dir, n, *, method="ntk@paper", die_after=None, log="computed", timeout=300,
            experiment="select", heartbeat_timeout_s=None, small=False, extra=()):
    """Runs one selection job as ``n`` worker processes; returns ``[(rc, output)]`` per
    process. With ``die_after``, process ``n-1`` exits with 3 after that many score shards and
    the survivors (waiting at a barrier for it) are then killed — unless
    ``heartbeat_timeout_s`` is given: then they are left to notice it themselves."""
    port = str(free_port())
    args = []
    for pid in range(n):
        a = [workdir, model_dir, "--log", log, "--method", method, "--experiment", experiment] + ["--small"] * small
        a += list(extra)
        if heartbeat_timeout_s is not None:
            a += ["--heartbeat_timeout_s", str(heartbeat_timeout_s)]
        if n > 1:
            a += ["--process_id", str(pid), "--num_processes", str(n), "--port", port]
        if die_after is not None and pid == n - 1:
            a += ["--die_after", str(die_after)]
        args.append(a)
    return run_workers(WORKER, args, timeout=timeout,
                       kill_when_last_dies=die_after is not None and heartbeat_timeout_s is None)


def computed(workdir, pid, log="computed"):
    with open(os.path.join(workdir, f"{log}_{pid}.json")) as fh:
        return [tuple(x) for x in json.load(fh)]


def shards_on_disk(job):
    """``{(store, shard)}`` of every ScoreStore of the job (a directory with a ``meta.json``)."""
    stores = [st for st in sorted(os.listdir(job)) if os.path.exists(os.path.join(job, st, "meta.json"))]
    return {(st, int(f[len("shard_"):-len(".npz")])) for st in stores
            for f in os.listdir(os.path.join(job, st)) if f.startswith("shard_") and f.endswith(".npz")
            and ".tmp" not in f}


def assert_same_results(job, ref, n_select=8):
    """Every shard (ids, scores, features: dtype, shape, bits; not the compute ``seconds``),
    the merged scores and the selection of ``job`` equal those of ``ref``."""
    assert shards_on_disk(job) == shards_on_disk(ref)
    for st, k in sorted(shards_on_disk(ref)):
        name = os.path.join(st, f"shard_{k:05d}.npz")
        with np.load(os.path.join(ref, name)) as r, np.load(os.path.join(job, name)) as g:
            assert r.files == g.files, name
            for key in (f for f in r.files if f != "seconds"):
                assert r[key].dtype == g[key].dtype and r[key].shape == g[key].shape, (name, key)
                np.testing.assert_array_equal(g[key], r[key], err_msg=f"{name}:{key}")
    for st in sorted({st for st, _ in shards_on_disk(ref)}):  # the same fingerprint: config, model, inputs
        assert filecmp.cmp(os.path.join(ref, st, "meta.json"), os.path.join(job, st, "meta.json"), shallow=False)
    with np.load(os.path.join(ref, "all_scores.npz")) as r, np.load(os.path.join(job, "all_scores.npz")) as g:
        assert r.files == g.files
        for key in r.files:
            np.testing.assert_array_equal(g[key], r[key])
    assert filecmp.cmp(os.path.join(ref, "selected.jsonl"), os.path.join(job, "selected.jsonl"), shallow=False)
    with open(os.path.join(ref, "report.json")) as fr, open(os.path.join(job, "report.json")) as fj:
        rep_ref, rep = json.load(fr), json.load(fj)
    assert rep["selected_ids"] == rep_ref["selected_ids"] and len(rep["selected_ids"]) == n_select
    return rep


@pytest.mark.slow
def test_selection_two_processes_equal_one_and_resume_after_kill(tmp_path, tiny_model_dir):
    one = str(tmp_path / "one")
    (rc, out), = run_job(one, tiny_model_dir, 1)
    assert rc == 0, out
    ref = os.path.join(one, "select")
    n_emb, n_score = (len([k for st, k in shards_on_disk(ref) if st == s]) for s in STORES)
    assert n_emb == 7 and n_score == 4  # 52 candidates, 32 after the filter, shards of 8
    assert computed(one, 0) == [("embeddings", k) for k in range(7)] + [("scores", k) for k in range(4)]

    # Two processes; process 1 dies right after its first score shard (shard 1). Process 0
    # stops by itself after the heartbeat timeout: by the barrier's error (this library's
    # message) or by JAX's runtime aborting it first (its message); either way its log names
    # the setting and how to resume (the notice every process logs at the start).
    two = str(tmp_path / "two")
    job = os.path.join(two, "select")
    outs = run_job(two, tiny_model_dir, 2, die_after=1, log="first", heartbeat_timeout_s=5)
    assert outs[1][0] == 3, outs[1][1]
    rc, out = outs[0]
    assert rc != 0, out[-3000:]
    assert "barrier 'ntk_jax." in out or "distributed service detected fatal errors" in out, out[-3000:]
    notice = out[out.index("jax.distributed: process 0 of 2."):]
    assert "heartbeat_timeout_s" in notice[:400] and "Rerun the same command" in notice[:400], out[-3000:]
    assert not os.path.exists(os.path.join(job, "selected.jsonl"))
    assert not os.path.exists(os.path.join(job, "report.json"))
    first = {pid: computed(two, pid, "first") for pid in (0, 1)}
    assert first[1] == [("embeddings", 1), ("embeddings", 3), ("embeddings", 5), ("scores", 1)]
    assert [x for x in first[0] if x[0] == "embeddings"] == [("embeddings", k) for k in (0, 2, 4, 6)]
    done = shards_on_disk(job)
    assert done == set(first[0]) | set(first[1])
    missing = shards_on_disk(ref) - done
    assert ("scores", 3) in missing

    # The rerun (both processes) computes exactly the missing shards, each its own.
    outs = run_job(two, tiny_model_dir, 2, log="rerun")
    assert all(rc == 0 for rc, _ in outs), outs
    rerun = {pid: computed(two, pid, "rerun") for pid in (0, 1)}
    assert set(rerun[0]) | set(rerun[1]) == missing
    assert len(rerun[0]) + len(rerun[1]) == len(missing)  # nothing twice
    for pid in (0, 1):  # each process only ever computed its own shards: k mod 2 == pid
        assert all(k % 2 == pid for _, k in first[pid] + rerun[pid]), (pid, first[pid], rerun[pid])
    rep = assert_same_results(job, ref)
    assert rep["processes"] == 2


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NTK_JAX_EXTRA_PROCESS_TESTS"),
                    reason="about 2 min on 2 cores; set NTK_JAX_EXTRA_PROCESS_TESTS=1 to run")
@pytest.mark.parametrize("method,n", [("ntk@paper", 4), ("ntk", 2), ("ntk@staged", 2), ("ntk@gradient", 2),
                                      ("less", 2)])
def test_selection_n_processes_equal_one_process(tmp_path, tiny_model_dir, method, n):
    """Four processes (the paper's ntk) / the recommended ntk (loss change: the θ_0 and the
    warm-up stores), the staged pipeline (+ gradient scores of the kept), the gradient scores
    (two kernel points) and LESS (warm-up checkpoints restored by every process) on two:
    bitwise the one-process result, each process computing its own shards."""
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    (rc, out), = run_job(one, tiny_model_dir, 1, method=method)
    assert rc == 0, out
    outs = run_job(many, tiny_model_dir, n, method=method)
    assert all(rc == 0 for rc, _ in outs), outs
    work = [computed(many, pid) for pid in range(n)]
    for pid in range(n):
        assert work[pid] and all(k % n == pid for _, k in work[pid]), (pid, work[pid])
    assert sorted(x for w in work for x in w) == sorted(computed(one, 0))
    assert assert_same_results(os.path.join(many, "select"), os.path.join(one, "select"))["processes"] == n


EXTRA = pytest.mark.skipif(not os.environ.get("NTK_JAX_EXTRA_PROCESS_TESTS"),
                           reason="about 1 min on 2 cores; set NTK_JAX_EXTRA_PROCESS_TESTS=1 to run")


@pytest.mark.slow
@pytest.mark.parametrize("method,small,n_select", [("less", True, 4), pytest.param("ntk", False, 8, marks=EXTRA)])
def test_select_compare_on_two_processes_equals_one(tmp_path, tiny_model_dir, method, small, n_select):
    """select_compare runs its selections on every process (each scoring its own shards; LESS's
    warm-up checkpoints restored by every process); process 0 fine-tunes: the results, and the
    method's shards, scores and selection bitwise, equal a one-process run. LESS runs in the
    default run at a reduced size (26 candidates: 4 score shards, 2 per process);
    the recommended ntk at full size with NTK_JAX_EXTRA_PROCESS_TESTS=1."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    (rc, out), = run_job(one, tiny_model_dir, 1, method=method, experiment="select_compare", small=small)
    assert rc == 0, out
    outs = run_job(two, tiny_model_dir, 2, method=method, experiment="select_compare", small=small)
    assert all(rc == 0 for rc, _ in outs), outs
    work = [computed(two, pid) for pid in (0, 1)]
    assert work[0] and work[1]  # both processes scored shards, each its own
    assert all(k % 2 == pid for pid in (0, 1) for _, k in work[pid]), work
    assert sorted(x for w in work for x in w) == sorted(computed(one, 0))
    with open(os.path.join(one, "select_compare", "results.json")) as f1, \
            open(os.path.join(two, "select_compare", "results.json")) as f2:
        r1, r2 = json.load(f1), json.load(f2)
    assert set(r1) == set(r2) == {"0/domain_only", "0/oracle_useful", "0/random", f"0/{method}"}
    for key in r1:
        for field in ("precision_at_n", "test_loss", "accuracy"):
            assert r1[key].get(field) == r2[key].get(field), (key, field)
    assert len({r["test_loss"] for r in r1.values()}) > 1  # the fine-tunes moved the model
    rep = assert_same_results(os.path.join(two, "select_compare", "seed_0", method),
                              os.path.join(one, "select_compare", "seed_0", method), n_select=n_select)
    assert rep["processes"] == 2
    with np.load(os.path.join(two, "select_compare", "seed_0", method, "all_scores.npz")) as z:
        assert np.ptp(z["scores"]) > 0  # the scores tell candidates apart (not a degenerate case)
