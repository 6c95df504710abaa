"""The selection job runner shared by every method (ntk, less, random, embedding).

    report = run_selection(context, sel_cfg, domain, pool, out_dir, seed=0)
    # one of n jax.distributed processes, all with the same arguments and a shared out_dir:
    report = run_selection(..., process_index=i, process_count=n)

Stages (each timed in ``report["timings_s"]``, with progress bars):

* ``validate``: non-empty pool, ``N <= |pool|``, unique ids (pool and domain), every domain
  record encodes with at least one loss token (else ``ValueError`` naming the record);
* ``warmup`` (ntk, embedding: LoRA on the domain; less: LoRA on a ``sample_fraction`` sample
  of the pool, checkpoint per epoch), resumable through the trainer's orbax checkpoints;
* ``embed`` (ntk, embedding): mean final hidden states of the pool, in shards of a
  :class:`~ntk_jax.selection.store.ScoreStore` under ``embeddings/``;
* ``filter`` (ntk, embedding): kNN votes, keep ``M = filter_factor · N`` (ntk) / top N;
* ``score`` (ntk: the M filtered candidates; less: the whole pool): per-candidate scores
  in shards of the ScoreStore under ``scores/``. A killed job restarts from the shards
  already written and never recomputes them; the store's fingerprint (config, method,
  seed, model, candidate and domain ids) guards against mixing results of another job;
* ``select``: top N; ``selected.jsonl`` (the chosen records, unchanged, best first) is
  written atomically only once everything above is complete.

``report.json`` (written by the caller / launcher) holds the config, timings per stage,
counts, and — when pool records carry ``"role"`` (the controlled benchmark) —
``precision_at_n`` (fraction of selected records with role ``useful``) against
``base_rate`` (the useful share of the pool).

Several processes (``jax.distributed``; the launcher runs ``experiments/select.py`` on every
process): the pool is split over the data axis by the ScoreStore's deterministic assignment,
shard ``k`` (pool positions ``[k·shard_size, (k+1)·shard_size)``) to process
``k mod process_count``. Each process encodes and scores only the records of its own shards
and writes its own shard files into the shared ``out_dir``; after a barrier per stage every
process merges all shards (so the coarse filter, which needs every embedding, comes out the
same on every process). The warm-up is trained by process 0 alone (its orbax checkpoints are
process-local, see :func:`ntk_jax.training.trainer.checkpoint_manager`); the others wait at a
barrier, then restore its final (ntk, embedding) or per-epoch (less) checkpoints read-only,
so every process holds the same parameters bitwise. Process 0 writes ``all_scores.npz`` and
``selected.jsonl`` after the last merge; each process's computation of a shard is the one a
single process would do, so scores and selection equal a one-process run bitwise. A process
that dies leaves the others waiting at the next barrier (``jax.distributed`` aborts them when
its heartbeat times out) and no ``selected.jsonl``; rerunning the job (with any number of
processes) recomputes only the shards not yet written.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import numpy as np

from ntk_jax.data.records import encode_records, map_length_buckets
from ntk_jax.kernels.projection import RandomProjection
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.models.subset import param_subset
from ntk_jax.selection.baselines import random_selection
from ntk_jax.selection.less import (adam_preconditioner, loss_scalar_fn, find_adam_state, less_features, less_scores,
                                    subtask_groups)
from ntk_jax.selection.ntk_selector import (knn_votes, ntk_scalar_fn, mean_hidden_states, ntk_features, ntk_scores,
                                            ntk_scores_by_jvp,
                                            top_by_votes, top_n)
from ntk_jax.selection.store import ScoreStore, fingerprint_of
from ntk_jax.training.trainer import (CHECKPOINT_DIR, TrainConfig, checkpoint_manager, make_optimizer, make_schedule,
                                      restore_checkpoint, train)
from ntk_jax.utils import progress, to_jsonable

METHODS = ("ntk", "less", "random", "embedding")
SELECTED_NAME = "selected.jsonl"


class StopRequested(RuntimeError):
    """Raised by the scoring loop after ``stop_after_shards`` new shards (tests simulate a
    killed job with it)."""


# ------------------------------------------------------------------------------ helpers
def check_unique_ids(records: list[dict], what: str) -> None:
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        rid = str(r.get("id", i))
        if rid in seen:
            raise ValueError(f"{what}: duplicate id {rid!r} (records {seen[rid]} and {i})")
        seen[rid] = i


def write_records_atomic(path: str, records: list[dict]) -> None:
    """JSONL of ``records`` unchanged, written to a temp file then renamed."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def role_counts(records: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if "role" in r:
            out[r["role"]] = out.get(r["role"], 0) + 1
    return out


def precision_report(selected: list[dict], pool: list[dict]) -> dict:
    """``precision_at_n`` (useful share of the selection) vs ``base_rate`` (useful share of
    the pool), with per-role counts; empty dict if the pool has no ``role`` fields."""
    if not pool or "role" not in pool[0]:
        return {}
    useful_sel = sum(r.get("role") == "useful" for r in selected)
    useful_pool = sum(r.get("role") == "useful" for r in pool)
    return {"precision_at_n": useful_sel / max(len(selected), 1), "base_rate": useful_pool / len(pool),
            "selected_roles": role_counts(selected), "pool_roles": role_counts(pool)}


def plain(cfg) -> dict:
    """A ``ConfigDict`` (or dict) as a plain nested dict."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _train_cfg(d, **overrides) -> TrainConfig:
    d = plain(d)
    d.update(overrides)
    return TrainConfig.from_dict(d)


def _score_shards(store: ScoreStore, score_fn: Callable[[int, int], np.ndarray], *, desc: str,
                  stop_after_shards: int | None, on_shard: Callable[[int], None] | None,
                  process_index: int = 0, process_count: int = 1, with_features: bool = False) -> int:
    """Computes and writes every missing shard of this process; returns how many were
    computed. ``score_fn(lo, hi)`` → scores ``(hi-lo,)`` (or ``(scores, features)``)."""
    todo = [k for k in store.shards_for_process(process_index, process_count) if not store.has_shard(k)]
    done = 0
    for k in progress(todo, desc=desc, total=len(todo)):
        if stop_after_shards is not None and done >= stop_after_shards:
            raise StopRequested(f"{desc}: stopped after {done} shards (stop_after_shards)")
        lo, hi = store.shard_bounds(k)
        out = score_fn(lo, hi)
        if with_features:
            store.write_shard(k, out[0], out[1])
        else:
            store.write_shard(k, out)
        done += 1
        if on_shard is not None:
            on_shard(k)
    return done


def _train_target(params, wcfg: TrainConfig) -> dict:
    """The structure :func:`~ntk_jax.training.trainer.train` checkpoints, for restoring."""
    import jax.numpy as jnp

    return {"params": params, "opt_state": make_optimizer(wcfg).init(params), "step": jnp.asarray(0, jnp.int32)}


def _restore_steps(ckpt_dir: str, params, wcfg: TrainConfig, steps: list[int] | None = None) -> dict:
    """``{step: restored state}`` of the warm-up checkpoints in ``ckpt_dir`` (all of them, or
    ``steps``), through a read-only manager (several processes may read at once).
    ``params``: a template of the trained subset (shapes, dtypes)."""
    target = _train_target(params, wcfg)
    with checkpoint_manager(ckpt_dir, read_only=True) as mngr:
        available = sorted(mngr.all_steps())
        steps = available if steps is None else list(steps)
        missing = sorted(set(steps) - set(available))
        if missing:
            raise FileNotFoundError(f"warm-up checkpoints {missing} are missing in {ckpt_dir!r} "
                                    f"(found {available})")
        return {s: restore_checkpoint(mngr, s, target) for s in steps}


def _warm_up(model, data: dict, wcfg: TrainConfig, workdir: str, *, primary: bool, sync) -> None:
    """Trains the LoRA factors of ``model`` on ``data`` (process 0, resumable in ``workdir``);
    the other processes wait, then load the final checkpoint into ``model``."""
    if primary:
        train(model, data, wcfg, workdir=workdir)
    sync("warmup")
    if not primary:
        sub = param_subset(model, nnx_lora_filter())
        state = _restore_steps(os.path.join(workdir, CHECKPOINT_DIR), sub.params, wcfg, [wcfg.total_steps])
        sub.update_model(model, state[wcfg.total_steps]["params"])
        model.eval()


def _save_npz_atomic(path: str, arrays: dict) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the job
def _check_processes(process_index: int, process_count: int) -> None:
    if isinstance(process_count, bool) or int(process_count) != process_count or process_count < 1:
        raise ValueError(f"process_count must be a positive integer, got {process_count!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    if process_count > 1:
        import jax

        if jax.process_count() != process_count:
            raise ValueError(f"run_selection as process {process_index} of {process_count} needs jax.distributed "
                             f"started with {process_count} processes (jax.process_count() is "
                             f"{jax.process_count()}); see ntk_jax.launcher.distributed")


def run_selection(context, cfg, domain: list[dict], pool: list[dict], out_dir: str, *, seed: int,
                  stop_after_shards: int | None = None, on_shard: Callable[[int], None] | None = None,
                  process_index: int = 0, process_count: int = 1) -> dict:
    """Runs one selection job (``cfg.method`` in :data:`METHODS`) into ``out_dir``.

    Args:
      context: :class:`ntk_jax.launcher.context.Context` (model, tokenizer, max_len).
      cfg: the ``select`` config section (``ConfigDict`` or dict; see
        :func:`ntk_jax.launcher.config_lib.select_config`).
      domain, pool: records (pool order defines the store order; every process passes the
        same lists).
      out_dir: job directory (``scores/``, ``embeddings/``, ``warmup/``, ``selected.jsonl``),
        shared by all processes.
      seed: the job's seed (LoRA init, warm-up batches, random selection, projection seed
        offset).
      stop_after_shards, on_shard: test hooks (simulate a kill; count computed shards), per
        process and per stage.
      process_index, process_count: this process's share of the shards (see the module
        docstring); ``process_count > 1`` needs ``jax.distributed`` with that many processes,
        all calling this function. The default runs everything here, also inside a
        multi-process job (e.g. a job that only process 0 runs).

    Returns the report dict (the caller writes ``report.json``; with several processes every
    process returns it, but only process 0 writes ``selected.jsonl`` / ``all_scores.npz``).
    """
    method = str(cfg["method"])
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {METHODS}")
    _check_processes(process_index, process_count)
    primary = process_index == 0

    def sync(stage: str) -> None:
        """Every process waits here until all have finished ``stage`` (no-op alone)."""
        if process_count > 1:
            from ntk_jax.launcher import distributed

            distributed.barrier(f"ntk_jax.select.{method}.{stage}")

    shard_kw = dict(stop_after_shards=stop_after_shards, on_shard=on_shard, process_index=process_index,
                    process_count=process_count)
    n_select = int(cfg["n_select"])
    timings: dict[str, float] = {}
    t = time.time()
    # ---- validate
    if not pool:
        raise ValueError("the candidate pool is empty: nothing to select from")
    if not domain:
        raise ValueError("the domain set is empty")
    if n_select <= 0:
        raise ValueError(f"n_select must be positive, got {n_select}")
    if n_select > len(pool):
        raise ValueError(f"N={n_select} is larger than the pool ({len(pool)} candidates)")
    check_unique_ids(pool, "pool")
    check_unique_ids(domain, "domain")
    tok, max_len = context.tokenizer, context.max_len
    domain_arrays = encode_records(tok, domain, max_len)  # ValueError names a zero-loss-token record
    if float(np.min(domain_arrays["loss_mask"].sum(axis=1))) <= 0:
        raise ValueError("a domain record has zero loss tokens after masking")
    os.makedirs(out_dir, exist_ok=True)
    selected_path = os.path.join(out_dir, SELECTED_NAME)
    if primary and os.path.exists(selected_path):
        os.remove(selected_path)  # a stale selection never passes for this run's result
    timings["validate"] = time.time() - t

    pool_ids = [str(r["id"]) for r in pool]
    fp_common = {"cfg": to_jsonable(plain(cfg)), "seed": int(seed), "model_dir": os.path.abspath(context.model_dir),
                 "max_len": int(max_len), "domain_ids": [str(r["id"]) for r in domain]}
    shard_size = int(cfg["shard_size"])
    fbs = int(cfg["feature_batch_size"])
    lora = LoRAConfig.from_dict(cfg["lora"])
    extra: dict = {}

    bucket_multiple = int(cfg.get("bucket_multiple", 0) or 0)

    def map_slice(fn, lo, hi, subset_idx=None):
        """``fn(arrays)`` over the pool records of store positions [lo, hi) (a shard: each
        process encodes only its own), in length buckets of ``feature_batch_size`` rows
        (``cfg.bucket_multiple``), results in store order."""
        recs = pool[lo:hi] if subset_idx is None else [pool[int(i)] for i in subset_idx[lo:hi]]
        return map_length_buckets(fn, tok, recs, min(fbs, len(recs)), multiple=bucket_multiple, max_len=max_len)

    if method == "random":
        t = time.time()
        chosen = random_selection(len(pool), n_select, seed)
        scores_for_report = None
        timings["select"] = time.time() - t
    elif method in ("ntk", "embedding"):
        # ---- warm-up on the domain (process 0; the others load its result)
        t = time.time()
        model = context.load_model(lora, seed=seed)
        wcfg = _train_cfg(cfg["warmup"], seed=int(seed))
        wcfg = _train_cfg(wcfg.to_dict(), batch_size=min(wcfg.batch_size, len(domain)))
        if wcfg.total_steps > 0:
            _warm_up(model, domain_arrays, wcfg, os.path.join(out_dir, "warmup"), primary=primary, sync=sync)
        timings["warmup"] = time.time() - t
        # ---- embed the pool (resumable shards, this process's share)
        t = time.time()
        estore = ScoreStore(os.path.join(out_dir, "embeddings"), pool_ids, shard_size,
                            fingerprint_of({**fp_common, "stage": "embed", "pool": pool_ids}))

        def embed(lo, hi):
            e = map_slice(lambda arrays: mean_hidden_states(model, arrays, batch_size=fbs), lo, hi)
            return np.linalg.norm(e, axis=1), e

        _score_shards(estore, embed, desc=f"{method}: embed pool", with_features=True, **shard_kw)
        sync("embed")
        _, _, cand_emb = estore.merge(with_features=True)
        dom_emb = mean_hidden_states(model, domain_arrays, batch_size=fbs)
        timings["embed"] = time.time() - t
        # ---- coarse filter (every process, on the merged embeddings: the same result)
        t = time.time()
        votes, mean_cos = knn_votes(dom_emb, cand_emb, int(cfg["knn_k"]))
        m = n_select if method == "embedding" else min(int(cfg["filter_factor"]) * n_select, len(pool))
        kept = top_by_votes(votes, mean_cos, m)
        timings["filter"] = time.time() - t
        extra.update(n_filtered=int(m), n_voted=int((votes > 0).sum()))
        if method == "embedding":
            chosen = kept
            scores_for_report = {"ids": pool_ids, "votes": votes, "mean_cos": mean_cos}
        else:
            # ---- NTK features + scores of the kept candidates
            t = time.time()
            subset = param_subset(model, nnx_lora_filter())
            p, pseed = int(cfg["projection_dim"]), int(cfg["projection_seed"])
            sfn = ntk_scalar_fn(subset)
            dom_feat = ntk_features(subset, domain_arrays, projection_dim=p, projection_seed=pseed, batch_size=fbs,
                                    scalar_fn=sfn)
            kept_sorted = np.sort(kept)  # store in pool order
            kept_ids = [pool_ids[int(i)] for i in kept_sorted]
            store = ScoreStore(os.path.join(out_dir, "scores"), kept_ids, shard_size,
                               fingerprint_of({**fp_common, "stage": "ntk_scores", "candidates": kept_ids}))

            def score_rows(batch):
                if p:  # s_j = ⟨g_j, Π u⟩: one JVP per candidate, no candidate features
                    return ntk_scores_by_jvp(subset, dom_feat, batch, projection_dim=p, projection_seed=pseed,
                                             batch_size=fbs, scalar_fn=sfn)
                return ntk_scores(dom_feat, ntk_features(subset, batch, projection_dim=0, batch_size=fbs,
                                                         scalar_fn=sfn))

            def score(lo, hi):
                return map_slice(score_rows, lo, hi, kept_sorted)

            _score_shards(store, score, desc="ntk: score candidates", **shard_kw)
            sync("score")
            _, s = store.merge()
            timings["score"] = time.time() - t
            t = time.time()
            chosen = kept_sorted[top_n(s, n_select)]
            scores_for_report = {"ids": kept_ids, "scores": s}
            timings["select"] = time.time() - t
    else:  # less
        lcfg = cfg["less"]
        t = time.time()
        rng = np.random.default_rng([int(seed), 5])
        n_sample = min(len(pool), max(int(round(float(lcfg["sample_fraction"]) * len(pool))), int(lcfg["min_sample"])))
        sample_idx = np.sort(rng.choice(len(pool), size=n_sample, replace=False))
        bs = min(int(lcfg["train"]["batch_size"]), n_sample)
        steps_per_epoch = n_sample // bs
        epochs = int(lcfg["epochs"])
        wcfg = _train_cfg(lcfg["train"], seed=int(seed), batch_size=bs, total_steps=epochs * steps_per_epoch,
                          checkpoint_every=steps_per_epoch, max_to_keep=epochs)
        model = context.load_model(LoRAConfig.from_dict(lcfg["lora"]), seed=seed)
        wdir = os.path.join(out_dir, "warmup")
        if primary:  # the others only need the checkpoints, after the barrier
            sample = encode_records(tok, [pool[int(i)] for i in sample_idx], max_len)
            train(model, sample, wcfg, workdir=wdir)
        sync("warmup")
        timings["warmup"] = time.time() - t
        t = time.time()
        subset = param_subset(model, nnx_lora_filter())
        restored = _restore_steps(os.path.join(wdir, CHECKPOINT_DIR), subset.params, wcfg)
        schedule = make_schedule(wcfg)
        ckpts = []
        for s_, state in restored.items():
            adam = find_adam_state(state["opt_state"])
            ckpts.append((s_, state["params"], adam, float(schedule(s_ - 1))))
        projection = RandomProjection(int(cfg["projection_dim"]), seed=int(cfg["projection_seed"]))
        groups = subtask_groups(domain)
        lfn = loss_scalar_fn(subset)
        targets = [less_features(subset, params, domain_arrays, projection=projection, batch_size=fbs, scalar_fn=lfn)
                   for _, params, _, _ in ckpts]
        transforms = [adam_preconditioner(adam.mu, adam.nu) for _, _, adam, _ in ckpts]
        lrs = [lr for *_, lr in ckpts]
        store = ScoreStore(os.path.join(out_dir, "scores"), pool_ids, shard_size,
                           fingerprint_of({**fp_common, "stage": "less_scores", "pool": pool_ids}))

        def score_rows(batch):
            cands = [less_features(subset, params, batch, projection=projection, transform=tr, batch_size=fbs,
                                   scalar_fn=lfn)
                     for (_, params, _, _), tr in zip(ckpts, transforms)]
            return less_scores(cands, targets, lrs, groups)

        def score(lo, hi):
            return map_slice(score_rows, lo, hi)

        _score_shards(store, score, desc="less: score pool", **shard_kw)
        sync("score")
        _, s = store.merge()
        timings["score"] = time.time() - t
        t = time.time()
        chosen = top_n(s, n_select)
        scores_for_report = {"ids": pool_ids, "scores": s}
        timings["select"] = time.time() - t
        extra.update(less_checkpoints=[int(c[0]) for c in ckpts], less_lrs=lrs, less_sample=int(n_sample),
                     less_subtasks=list(groups))

    # ---- write the selection (process 0, atomically, only now that everything is complete)
    chosen = [int(i) for i in chosen]
    selected = [pool[i] for i in chosen]
    if primary:
        if scores_for_report is not None:
            _save_npz_atomic(os.path.join(out_dir, "all_scores.npz"),
                             {k: np.asarray(v) for k, v in scores_for_report.items()})
        write_records_atomic(selected_path, selected)
    sync("select")  # on return, selected.jsonl exists for every process
    return {"method": method, "seed": int(seed), "config": to_jsonable(plain(cfg)), "timings_s": timings,
            "counts": {"domain": len(domain), "pool": len(pool), "selected": len(selected)},
            "processes": int(process_count),
            "selected_ids": [r["id"] for r in selected], **precision_report(selected, pool), **extra}


def nnx_lora_filter():
    from flax import nnx
    return nnx.LoRAParam


def load_selection_data(cfg, data_dir: str, seed: int) -> dict:
    """``{"domain", "pool", "test", "source"}`` records for a job: the files named by
    ``cfg.domain_path`` / ``pool_path`` / ``test_path`` (:func:`ntk_jax.data.records.read_records`
    validates them; malformed JSONL raises naming file and line), or — when ``domain_path``
    and ``pool_path`` are empty — the controlled benchmark for ``seed`` written into
    ``data_dir`` (reused if already there). ``test`` is ``None`` without a test path."""
    from ntk_jax.data.controlled import load_controlled_benchmark, make_controlled_benchmark, write_controlled_benchmark
    from ntk_jax.data.records import read_records

    if cfg["domain_path"] or cfg["pool_path"]:
        if not (cfg["domain_path"] and cfg["pool_path"]):
            raise ValueError("set both select.domain_path and select.pool_path (or neither, for the controlled "
                             "benchmark)")
        return {"domain": read_records(cfg["domain_path"]), "pool": read_records(cfg["pool_path"]),
                "test": read_records(cfg["test_path"]) if cfg["test_path"] else None,
                "source": {k: os.path.abspath(cfg[k]) for k in ("domain_path", "pool_path", "test_path") if cfg[k]}}
    b = plain(cfg["benchmark"])
    wanted = {"seed": int(seed), "variant": str(b.get("variant") or "contradicting"), "n_domain": int(b["n_domain"]),
              "n_test": int(b["n_test"])}
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        bench = load_controlled_benchmark(data_dir)
        found = {k: bench.meta.get(k) for k in wanted}
        if found != wanted:
            raise ValueError(f"{data_dir!r} holds a controlled benchmark made with {found}, but the config asks for "
                             f"{wanted}; use another workdir or delete that directory")
    else:
        bench = make_controlled_benchmark(wanted["seed"], n_domain=wanted["n_domain"], n_test=wanted["n_test"],
                                          n_pool_per_family=int(b["n_pool_per_family"]), variant=wanted["variant"])
        write_controlled_benchmark(data_dir, bench)
    return {"domain": bench.domain, "pool": bench.pool, "test": bench.test,
            "source": {"controlled_benchmark": os.path.abspath(data_dir), "seed": int(seed),
                       "variant": wanted["variant"]}}
