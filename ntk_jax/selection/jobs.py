"""The selection job runner shared by every method (ntk, less, random, embedding).

    report = run_selection(context, sel_cfg, domain, pool, out_dir, seed=0)

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
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import numpy as np

from ntk_jax.data.records import encode_records
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
from ntk_jax.training.trainer import TrainConfig, make_schedule, train
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


def _restore_checkpoint(ckpt_dir: str, step: int, params, opt_state):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    target = {"params": params, "opt_state": opt_state, "step": jnp.asarray(0, jnp.int32)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.CheckpointManager(ckpt_dir) as mngr:
        restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    return restored["params"], restored["opt_state"]


# ------------------------------------------------------------------------------ the job
def run_selection(context, cfg, domain: list[dict], pool: list[dict], out_dir: str, *, seed: int,
                  stop_after_shards: int | None = None, on_shard: Callable[[int], None] | None = None) -> dict:
    """Runs one selection job (``cfg.method`` in :data:`METHODS`) into ``out_dir``.

    Args:
      context: :class:`ntk_jax.launcher.context.Context` (model, tokenizer, max_len).
      cfg: the ``select`` config section (``ConfigDict`` or dict; see
        :func:`ntk_jax.launcher.config_lib.select_config`).
      domain, pool: records (pool order defines the store order).
      out_dir: job directory (``scores/``, ``embeddings/``, ``warmup/``, ``selected.jsonl``).
      seed: the job's seed (LoRA init, warm-up batches, random selection, projection seed
        offset).
      stop_after_shards, on_shard: test hooks (simulate a kill; count computed shards).

    Returns the report dict (the caller writes ``report.json``).
    """
    method = str(cfg["method"])
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {METHODS}")
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
    if os.path.exists(selected_path):
        os.remove(selected_path)  # a stale selection never passes for this run's result
    timings["validate"] = time.time() - t

    pool_ids = [str(r["id"]) for r in pool]
    fp_common = {"cfg": to_jsonable(plain(cfg)), "seed": int(seed), "model_dir": os.path.abspath(context.model_dir),
                 "max_len": int(max_len), "domain_ids": [str(r["id"]) for r in domain]}
    shard_size = int(cfg["shard_size"])
    fbs = int(cfg["feature_batch_size"])
    lora = LoRAConfig.from_dict(cfg["lora"])
    extra: dict = {}

    def encode_slice(lo, hi, subset_idx=None):
        recs = pool[lo:hi] if subset_idx is None else [pool[int(i)] for i in subset_idx[lo:hi]]
        return encode_records(tok, recs, max_len)

    if method == "random":
        t = time.time()
        chosen = random_selection(len(pool), n_select, seed)
        scores_for_report = None
        timings["select"] = time.time() - t
    elif method in ("ntk", "embedding"):
        # ---- warm-up on the domain
        t = time.time()
        model = context.load_model(lora, seed=seed)
        wcfg = _train_cfg(cfg["warmup"], seed=int(seed))
        wcfg = _train_cfg(wcfg.to_dict(), batch_size=min(wcfg.batch_size, len(domain)))
        if wcfg.total_steps > 0:
            train(model, domain_arrays, wcfg, workdir=os.path.join(out_dir, "warmup"))
        timings["warmup"] = time.time() - t
        # ---- embed the pool (resumable shards)
        t = time.time()
        estore = ScoreStore(os.path.join(out_dir, "embeddings"), pool_ids, shard_size,
                            fingerprint_of({**fp_common, "stage": "embed", "pool": pool_ids}))

        def embed(lo, hi):
            e = mean_hidden_states(model, encode_slice(lo, hi), batch_size=fbs)
            return np.linalg.norm(e, axis=1), e

        _score_shards(estore, embed, desc=f"{method}: embed pool", stop_after_shards=stop_after_shards,
                      on_shard=on_shard, with_features=True)
        _, _, cand_emb = estore.merge(with_features=True)
        dom_emb = mean_hidden_states(model, domain_arrays, batch_size=fbs)
        timings["embed"] = time.time() - t
        # ---- coarse filter
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

            def score(lo, hi):
                batch = encode_slice(lo, hi, kept_sorted)
                if p:  # s_j = ⟨g_j, Π u⟩: one JVP per candidate, no candidate features
                    return ntk_scores_by_jvp(subset, dom_feat, batch, projection_dim=p, projection_seed=pseed,
                                             batch_size=fbs, scalar_fn=sfn)
                return ntk_scores(dom_feat, ntk_features(subset, batch, projection_dim=0, batch_size=fbs,
                                                         scalar_fn=sfn))

            _score_shards(store, score, desc="ntk: score candidates", stop_after_shards=stop_after_shards,
                          on_shard=on_shard)
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
        sample = encode_records(tok, [pool[int(i)] for i in sample_idx], max_len)
        bs = min(int(lcfg["train"]["batch_size"]), n_sample)
        steps_per_epoch = n_sample // bs
        epochs = int(lcfg["epochs"])
        wcfg = _train_cfg(lcfg["train"], seed=int(seed), batch_size=bs, total_steps=epochs * steps_per_epoch,
                          checkpoint_every=steps_per_epoch, max_to_keep=epochs)
        model = context.load_model(LoRAConfig.from_dict(lcfg["lora"]), seed=seed)
        wdir = os.path.join(out_dir, "warmup")
        result = train(model, sample, wcfg, workdir=wdir)
        timings["warmup"] = time.time() - t
        t = time.time()
        import optax  # noqa: F401  (state classes used by the restore template)
        from ntk_jax.training.trainer import make_optimizer
        subset = param_subset(model, nnx_lora_filter())
        import orbax.checkpoint as ocp
        with ocp.CheckpointManager(os.path.join(wdir, "checkpoints")) as mngr:
            steps = sorted(mngr.all_steps())
        schedule = make_schedule(wcfg)
        ckpts = []
        for s_ in steps:
            params, opt_state = _restore_checkpoint(os.path.join(wdir, "checkpoints"), s_, result.params,
                                                    make_optimizer(wcfg).init(result.params))
            adam = find_adam_state(opt_state)
            ckpts.append((s_, params, adam, float(schedule(s_ - 1))))
        projection = RandomProjection(int(cfg["projection_dim"]), seed=int(cfg["projection_seed"]))
        groups = subtask_groups(domain)
        lfn = loss_scalar_fn(subset)
        targets = [less_features(subset, params, domain_arrays, projection=projection, batch_size=fbs, scalar_fn=lfn)
                   for _, params, _, _ in ckpts]
        transforms = [adam_preconditioner(adam.mu, adam.nu) for _, _, adam, _ in ckpts]
        lrs = [lr for *_, lr in ckpts]
        store = ScoreStore(os.path.join(out_dir, "scores"), pool_ids, shard_size,
                           fingerprint_of({**fp_common, "stage": "less_scores", "pool": pool_ids}))

        def score(lo, hi):
            batch = encode_slice(lo, hi)
            cands = [less_features(subset, params, batch, projection=projection, transform=tr, batch_size=fbs,
                                   scalar_fn=lfn)
                     for (_, params, _, _), tr in zip(ckpts, transforms)]
            return less_scores(cands, targets, lrs, groups)

        _score_shards(store, score, desc="less: score pool", stop_after_shards=stop_after_shards, on_shard=on_shard)
        _, s = store.merge()
        timings["score"] = time.time() - t
        t = time.time()
        chosen = top_n(s, n_select)
        scores_for_report = {"ids": pool_ids, "scores": s}
        timings["select"] = time.time() - t
        extra.update(less_checkpoints=[int(c[0]) for c in ckpts], less_lrs=lrs, less_sample=int(n_sample),
                     less_subtasks=list(groups))

    # ---- write the selection (atomically, only now that everything is complete)
    chosen = [int(i) for i in chosen]
    selected = [pool[i] for i in chosen]
    write_records_atomic(selected_path, selected)
    if scores_for_report is not None:
        np.savez(os.path.join(out_dir, "all_scores.npz"), **{k: np.asarray(v) for k, v in scores_for_report.items()})
    return {"method": method, "seed": int(seed), "config": to_jsonable(plain(cfg)), "timings_s": timings,
            "counts": {"domain": len(domain), "pool": len(pool), "selected": len(selected)},
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
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        bench = load_controlled_benchmark(data_dir)
    else:
        b = plain(cfg["benchmark"])
        bench = make_controlled_benchmark(int(seed), n_domain=int(b["n_domain"]), n_test=int(b["n_test"]),
                                          n_pool_per_family=int(b["n_pool_per_family"]))
        write_controlled_benchmark(data_dir, bench)
    return {"domain": bench.domain, "pool": bench.pool, "test": bench.test,
            "source": {"controlled_benchmark": os.path.abspath(data_dir), "seed": int(seed)}}
