"""The selection job runner shared by every method (:mod:`ntk_jax.selection.methods`).

    report = run_selection(context, sel_cfg, domain, pool, out_dir, seed=0)
    # one of n jax.distributed processes, all with the same arguments and a shared out_dir:
    report = run_selection(..., process_index=i, process_count=n, barrier=distributed.barrier)

The runner owns what every method shares; the method (``cfg.method``, a module of
:mod:`ntk_jax.selection.methods`) owns only its own stages and returns a
:class:`~ntk_jax.selection.methods.Selection`:

* ``validate``: non-empty pool, ``N <= |pool|``, unique ids (pool and domain), the length
  policy (``cfg.max_len``, ``cfg.truncation``: :func:`ntk_jax.data.records.fit_records`) over
  every domain and pool record before any model work — ``"error"`` stops here naming the
  record's file and line, ``"drop"`` and the records ``"left"`` / ``"right"`` cannot fit
  leave the job's pool (counts in ``report["data"]["lengths"]``) — and every domain record
  encodes with at least one loss token (else ``ValueError`` naming the record). The job
  encodes to ``cfg.max_len`` (:func:`selection_context`), never ``pretrain.max_len``;
* the method's stages, through the :class:`SelectionJob` it is handed: the warm-up
  (:meth:`SelectionJob.warm_up`, resumable through the trainer's orbax checkpoints),
  pool embeddings and per-candidate scores in resumable, fingerprinted shards of a
  :class:`~ntk_jax.selection.store.ScoreStore` (:meth:`SelectionJob.store`,
  :meth:`SelectionJob.score_shards`; a killed job restarts from the shards already written
  and never recomputes them), each stage timed in ``report["timings_s"]``;
* ``select``: ``selected.jsonl`` (the chosen records, unchanged, best first) and
  ``all_scores.npz`` are written atomically only once everything above is complete;
* diagnostics (:mod:`ntk_jax.selection.diagnostics`): selected vs pool share per task and
  role, Spearman of the score vs the candidate's feature norm and response length, and
  (``plot=True``) ``diagnostics.png``.

``report.json`` (written by the caller / launcher) holds the config, timings per stage,
counts, the diagnostics and — when pool records carry ``"role"`` (the controlled benchmark)
— ``precision_at_n`` (fraction of selected records with role ``useful``) against
``base_rate`` (the useful share of the pool).

Several processes (``jax.distributed``; the launcher runs ``experiments/select.py`` on every
process and passes its ``barrier``): the pool is split over the data axis by the
ScoreStore's deterministic assignment, shard ``k`` to process ``k mod process_count``. Each
process encodes and scores only the records of its own shards and writes its own shard files
into the shared ``out_dir``; after a barrier per stage every process merges all shards (so a
filter that needs every embedding comes out the same on every process). A warm-up is trained
by process 0 alone (its orbax checkpoints are process-local, see
:func:`ntk_jax.training.trainer.checkpoint_manager`); the others wait at a barrier, then
restore its checkpoints read-only, so every process holds the same parameters bitwise.
Process 0 writes ``all_scores.npz`` and ``selected.jsonl`` after the last merge; scores and
selection equal a one-process run bitwise. A process that dies leaves the others waiting at
the next barrier (``jax.distributed`` aborts them when its heartbeat times out) and no
``selected.jsonl``; rerunning the job (with any number of processes) recomputes only the
shards not yet written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable

import numpy as np

from ntk_jax.data.records import (ASSISTANT_TURNS, LENGTH_POLICIES, encode_records, first_of_duplicates, fit_records,
                                  layout_counts, map_length_buckets, renderings, source_record)
from ntk_jax.models.lora import LoRAConfig, lora_filter
from ntk_jax.models.subset import param_subset
from ntk_jax.selection import diagnostics
from ntk_jax.selection.methods import Selection, get_method
from ntk_jax.selection.ntk_selector import POOLINGS
from ntk_jax.selection.store import ScoreStore, fill_store, fingerprint_of
from ntk_jax.training.trainer import (CHECKPOINT_DIR, TrainConfig, checkpoint_manager, make_optimizer,
                                      restore_checkpoint, train)
from ntk_jax.utils import atomic_write, to_jsonable, write_npz

SELECTED_NAME = "selected.jsonl"


# ------------------------------------------------------------------------------ helpers
def check_unique_ids(records: list[dict], what: str) -> None:
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        rid = str(r.get("id", i))
        if rid in seen:
            raise ValueError(f"{what}: duplicate id {rid!r} (records {seen[rid]} and {i})")
        seen[rid] = i


def resolve_n_select(value, pool_size: int) -> int:
    """``select.n_select`` as a count: an integer N ≥ 1 as given, or a fraction ``0 < f < 1``
    of the pool, ``round(f · pool_size)`` (at least 1; LESS's "top 5 %" is ``0.05``).
    ValueError naming the setting otherwise, or when N exceeds the pool."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"select.n_select must be a positive integer or a fraction in (0, 1), got {value!r}")
    if float(value).is_integer() and value >= 1:
        n = int(value)
    elif 0 < value < 1:
        n = max(1, int(np.floor(float(value) * pool_size + 0.5)))
    else:
        raise ValueError(f"select.n_select must be a positive integer or a fraction in (0, 1), got {value!r}")
    if n > pool_size:
        raise ValueError(f"N={n} is larger than the pool ({pool_size} candidates)")
    return n


def write_records_atomic(path: str, records: list[dict]) -> None:
    """JSONL of ``records`` as they were read (a record converted from another format is
    written in that format: :func:`~ntk_jax.data.records.source_record`), atomically."""
    with atomic_write(path) as f:
        for r in records:
            f.write(json.dumps(source_record(r)) + "\n")


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


def train_config(d, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a config section (dict / ConfigDict) with ``overrides``."""
    d = plain(d)
    d.update(overrides)
    return TrainConfig.from_dict(d)


def _train_target(params, wcfg: TrainConfig) -> dict:
    """The structure :func:`~ntk_jax.training.trainer.train` checkpoints, for restoring."""
    import jax.numpy as jnp

    return {"params": params, "opt_state": make_optimizer(wcfg).init(params), "step": jnp.asarray(0, jnp.int32)}


def restore_steps(ckpt_dir: str, params, wcfg: TrainConfig, steps: list[int] | None = None) -> dict:
    """``{step: restored state}`` (``params``, ``opt_state``, ``step``) of the warm-up
    checkpoints in ``ckpt_dir`` (all of them, or ``steps``), through a read-only manager
    (several processes may read at once). ``params``: a template of the trained subset."""
    target = _train_target(params, wcfg)
    with checkpoint_manager(ckpt_dir, read_only=True) as mngr:
        available = sorted(mngr.all_steps())
        steps = available if steps is None else list(steps)
        missing = sorted(set(steps) - set(available))
        if missing:
            raise FileNotFoundError(f"warm-up checkpoints {missing} are missing in {ckpt_dir!r} "
                                    f"(found {available})")
        return {s: restore_checkpoint(mngr, s, target) for s in steps}


def selection_context(context, cfg):
    """``context`` with the selection jobs' own encoding length, ``cfg.max_len`` (the
    ``select`` section; ``pretrain.max_len`` is the embedded model's pre-training length
    only). ValueError naming the setting when it is not an integer >= 2."""
    max_len = cfg["max_len"]
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
        raise ValueError(f"select.max_len must be an integer >= 2 (tokens per encoded record), got {max_len!r}")
    return dataclasses.replace(context, max_len=int(max_len))


def encoding_options(cfg) -> dict:
    """The :func:`~ntk_jax.data.records.encode_records` options of the ``select`` section:
    ``truncation`` (``"left"`` / ``"right"`` as set; ``"error"`` under ``"error"`` and
    ``"drop"``, whose over-long records the length check removed) and ``assistant_turns``."""
    policy = str(cfg["truncation"])
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"unknown select.truncation {policy!r}; choose one of {LENGTH_POLICIES}")
    turns = str(cfg["assistant_turns"])
    if turns not in ASSISTANT_TURNS:
        raise ValueError(f"unknown select.assistant_turns {turns!r}; choose one of {ASSISTANT_TURNS}")
    return {"truncation": policy if policy in ("left", "right") else "error", "assistant_turns": turns}


def fit_to_length(context, cfg, records: list[dict], what: str, path: str | None = None):
    """``(kept records, LengthCheck)``: the length policy of the ``select`` section
    (``cfg.truncation`` at ``cfg.max_len``, :func:`ntk_jax.data.records.fit_records`) applied
    to ``records`` read from ``path`` (errors name its lines), before any model work."""
    return fit_records(context.tokenizer, records, int(cfg["max_len"]), str(cfg["truncation"]), path=path or None,
                       what=what, assistant_turns=str(cfg["assistant_turns"]))


def _check_processes(process_index: int, process_count: int, barrier) -> None:
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
        if barrier is None:
            raise ValueError("run_selection with process_count > 1 needs barrier= (e.g. "
                             "ntk_jax.launcher.distributed.barrier)")


# ------------------------------------------------------------------------------ the job
@dataclasses.dataclass
class SelectionJob:
    """What a selection method is handed: the inputs, and the shared machinery of a job.

    Attributes: ``context`` (:class:`ntk_jax.launcher.context.Context`), ``cfg`` (the
    ``select`` section as a plain dict), ``domain`` / ``pool`` (records), ``domain_arrays``
    (the domain encoded, ``(n_dom, max_len)`` arrays), ``out_dir``, ``seed``,
    ``process_index`` / ``process_count``, ``timings`` (stage → seconds, filled by
    :meth:`timed`), ``extra`` (method-specific report entries).
    """

    context: Any
    cfg: dict
    domain: list[dict]
    pool: list[dict]
    domain_arrays: dict
    out_dir: str
    seed: int
    process_index: int = 0
    process_count: int = 1
    encoding: dict = dataclasses.field(default_factory=dict)
    pool_lengths: np.ndarray | None = None
    barrier: Callable[[str], None] | None = None
    stop_after_shards: int | None = None
    on_shard: Callable[[int], None] | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.cfg["method"])

    @property
    def primary(self) -> bool:
        return self.process_index == 0

    @property
    def pool_ids(self) -> list[str]:
        return [str(r["id"]) for r in self.pool]

    @property
    def feature_batch_size(self) -> int:
        return int(self.cfg["feature_batch_size"])

    def sync(self, stage: str) -> None:
        """Every process waits here until all have finished ``stage`` (no-op alone)."""
        if self.process_count > 1:
            self.barrier(f"ntk_jax.select.{self.method}.{stage}")

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Adds the time spent inside to ``timings[stage]``."""
        t = time.time()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.time() - t

    def fingerprint(self, stage: str, **inputs) -> str:
        """The store fingerprint of ``stage``: config, method, seed, model, max_len, domain
        ids, and ``inputs`` (e.g. the candidate ids)."""
        return fingerprint_of({"cfg": to_jsonable(self.cfg), "seed": int(self.seed),
                               "model_dir": os.path.abspath(self.context.model_dir),
                               "max_len": int(self.context.max_len),
                               "domain_ids": [str(r["id"]) for r in self.domain], "stage": stage, **inputs})

    def store(self, name: str, ids: list[str], stage: str) -> ScoreStore:
        """A :class:`ScoreStore` under ``out_dir/name`` for the candidates ``ids``."""
        return ScoreStore(os.path.join(self.out_dir, name), ids, int(self.cfg["shard_size"]),
                          self.fingerprint(stage, candidates=list(ids)))

    def map_records(self, fn: Callable[[dict], Any], lo: int, hi: int, index: np.ndarray | None = None) -> np.ndarray:
        """``fn(arrays)`` over the pool records of store positions ``[lo, hi)`` (positions
        into ``index`` if given, else into the pool), in length buckets of
        ``feature_batch_size`` rows (``cfg.bucket_multiple``), results in store order."""
        rows = np.arange(lo, hi) if index is None else np.asarray(index[lo:hi], dtype=np.int64)
        recs = [self.pool[int(i)] for i in rows]
        fbs = self.feature_batch_size
        lengths = None if self.pool_lengths is None else self.pool_lengths[rows]
        return map_length_buckets(fn, self.context.tokenizer, recs, min(fbs, len(recs)),
                                  multiple=int(self.cfg.get("bucket_multiple", 0) or 0), max_len=self.context.max_len,
                                  lengths=lengths, **self.encoding)

    def encode(self, records: list[dict]) -> dict:
        """``records`` encoded as the job encodes every record: ``(n, max_len)`` arrays of
        :func:`~ntk_jax.data.records.encode_records` with the job's truncation and
        ``assistant_turns``."""
        return encode_records(self.context.tokenizer, records, self.context.max_len, **self.encoding)

    def score_shards(self, store: ScoreStore, score_fn: Callable[[int, int], Any], *, desc: str,
                     with_features: bool = False) -> int:
        """Computes and writes every missing shard of this process
        (:func:`~ntk_jax.selection.store.fill_store`), then waits for the others; returns how
        many this process computed. ``score_fn(lo, hi)`` → scores ``(hi-lo,)`` (or
        ``(scores, features (hi-lo, d))`` with ``with_features``)."""
        done = fill_store(store, score_fn, desc=desc, with_features=with_features,
                          process_index=self.process_index, process_count=self.process_count,
                          stop_after_shards=self.stop_after_shards, on_shard=self.on_shard)
        self.sync(f"shards.{os.path.basename(store.directory)}")
        return done

    def warm_up(self, lora: dict, warmup: dict, data: dict | None = None, *, workdir: str = "warmup",
                **overrides):
        """A fresh LoRA model (``lora``, seeded by the job's seed) trained by ``warmup``
        (a ``TrainConfig`` section; ``overrides`` on top) on ``data`` (default: the domain
        arrays), resumable in ``out_dir/workdir``. Process 0 trains; the others wait, then
        load its final checkpoint. Returns ``(model, TrainConfig)``; no training when
        ``total_steps == 0``."""
        model = self.context.load_model(LoRAConfig.from_dict(lora), seed=self.seed)
        data = self.domain_arrays if data is None else data
        n = int(np.asarray(data["input_ids"]).shape[0])
        wcfg = train_config(warmup, seed=int(self.seed), **overrides)
        wcfg = train_config(wcfg.to_dict(), batch_size=min(wcfg.batch_size, n))
        if wcfg.total_steps > 0:
            wdir = os.path.join(self.out_dir, workdir)
            if self.primary:
                train(model, data, wcfg, workdir=wdir)
            self.sync(f"warmup.{workdir}")
            if not self.primary:
                sub = param_subset(model, lora_filter())
                state = restore_steps(os.path.join(wdir, CHECKPOINT_DIR), sub.params, wcfg, [wcfg.total_steps])
                sub.update_model(model, state[wcfg.total_steps]["params"])
                model.eval()
        return model, wcfg

    def checkpoints(self, model, wcfg: TrainConfig, *, workdir: str = "warmup", steps=None) -> dict:
        """``{step: state}`` of the warm-up checkpoints written by :meth:`warm_up`."""
        sub = param_subset(model, lora_filter())
        return restore_steps(os.path.join(self.out_dir, workdir, CHECKPOINT_DIR), sub.params, wcfg, steps)


def run_selection(context, cfg, domain: list[dict], pool: list[dict], out_dir: str, *, seed: int,
                  stop_after_shards: int | None = None, on_shard: Callable[[int], None] | None = None,
                  process_index: int = 0, process_count: int = 1, barrier: Callable[[str], None] | None = None,
                  plot: bool = True) -> dict:
    """Runs one selection job (``cfg.method``, a module of :mod:`ntk_jax.selection.methods`)
    into ``out_dir``.

    Args:
      context: :class:`ntk_jax.launcher.context.Context` (model, tokenizer, max_len).
      cfg: the ``select`` config section (``ConfigDict`` or dict; see
        ``experiments/select.py:config``).
      domain, pool: records (pool order defines the store order; every process passes the
        same lists).
      out_dir: job directory (stores, ``warmup/``, ``selected.jsonl``), shared by all processes.
      seed: the job's seed (LoRA init, warm-up batches, random selection).
      stop_after_shards, on_shard: test hooks (simulate a kill; count computed shards), per
        process and per store.
      process_index, process_count, barrier: this process's share of the shards (see the
        module docstring); ``process_count > 1`` needs ``jax.distributed`` with that many
        processes, all calling this function, and ``barrier(name)`` (e.g.
        :func:`ntk_jax.launcher.distributed.barrier`).
      plot: write ``diagnostics.png`` (process 0).

    Returns the report dict (the caller writes ``report.json``; with several processes every
    process returns it, but only process 0 writes ``selected.jsonl`` / ``all_scores.npz``).
    """
    cfg = plain(cfg)
    method = get_method(str(cfg["method"]))  # ValueError naming the known methods
    _check_processes(process_index, process_count, barrier)
    n_setting = cfg["n_select"]
    t = time.time()
    # ---- validate
    if not pool:
        raise ValueError("the candidate pool is empty: nothing to select from")
    if not domain:
        raise ValueError("the domain set is empty")
    n_select = resolve_n_select(n_setting, len(pool))
    check_unique_ids(pool, "pool")
    check_unique_ids(domain, "domain")
    # ---- the length policy, over every record before any model work (errors name file and line)
    context, encoding = selection_context(context, cfg), encoding_options(cfg)
    t_lengths = time.time()
    domain, dom_check = fit_to_length(context, cfg, domain, "domain", cfg.get("domain_path"))
    pool, pool_check = fit_to_length(context, cfg, pool, "pool", cfg.get("pool_path"))
    lengths = {"domain": dom_check.summary, "pool": pool_check.summary}
    pool_lengths, dedup = pool_check.lengths, {"policy": str(cfg.get("dedup", "none"))}
    if dedup["policy"] == "exact":  # after the length policy, whose errors locate records by position
        kept = first_of_duplicates(pool)
        dropped = sorted(set(range(len(pool))) - set(kept.tolist()))
        dedup.update(dropped=len(dropped), dropped_ids=[str(pool[i]["id"]) for i in dropped[:20]])
        pool, pool_lengths = [pool[i] for i in kept], pool_lengths[kept]
        if dropped:
            print(f"[select] pool: {len(dropped)} exact duplicate records dropped (select.dedup='exact')", flush=True)
    elif dedup["policy"] != "none":
        raise ValueError(f"unknown select.dedup {dedup['policy']!r}; choose one of ('none', 'exact')")
    layouts = {"domain": layout_counts(domain), "pool": layout_counts(pool)}
    rendered = {"domain": renderings(context.tokenizer, domain), "pool": renderings(context.tokenizer, pool)}
    if rendered["domain"] != rendered["pool"]:
        layouts["warning"] = (f"the domain is rendered {'+'.join(sorted(rendered['domain']))} and the pool "
                              f"{'+'.join(sorted(rendered['pool']))} (chat: as a conversation, with 'User:' / "
                              "'Assistant:' headers when the tokenizer has no chat template; plain: prompt and "
                              "response, or text, as they are), so pool records look unlike the domain to every "
                              "score; give both in one layout (or use a tokenizer with a chat template)")
        print(f"[select] warning: {layouts['warning']}", flush=True)
    t_lengths = time.time() - t_lengths
    for what, summ in lengths.items():
        if summ["n_over"]:
            print(f"[select] {what}: {summ['n_over']} of {summ['records']} records longer than "
                  f"select.max_len={summ['max_len']} (longest {summ['longest']}): truncation={summ['truncation']} "
                  f"truncates {summ['truncated']}, drops {summ['dropped']}", flush=True)
    n_select = resolve_n_select(n_setting, len(pool))  # a fraction: of the records the policy kept
    if n_select > len(pool):
        raise ValueError(f"N={n_select} is larger than the pool ({len(pool)} candidates after the length policy "
                         f"dropped {pool_check.summary['dropped']})")
    cfg["n_select"] = n_select  # what every method reads (and the stores' fingerprints hold)
    domain_arrays = encode_records(context.tokenizer, domain, context.max_len, **encoding)
    if float(np.min(domain_arrays["loss_mask"].sum(axis=1))) <= 0:
        raise ValueError("a domain record has zero loss tokens after masking")
    pooling = str(cfg.get("knn_pooling", "all"))
    if pooling not in POOLINGS:
        raise ValueError(f"unknown select.knn_pooling {pooling!r}; choose one of {POOLINGS}")
    method.check_config(cfg)
    os.makedirs(out_dir, exist_ok=True)
    selected_path = os.path.join(out_dir, SELECTED_NAME)
    if process_index == 0 and os.path.exists(selected_path):
        os.remove(selected_path)  # a stale selection never passes for this run's result
    job = SelectionJob(context=context, cfg=cfg, domain=domain, pool=pool, domain_arrays=domain_arrays,
                       out_dir=out_dir, seed=int(seed), process_index=process_index, process_count=process_count,
                       barrier=barrier, stop_after_shards=stop_after_shards, on_shard=on_shard, encoding=encoding,
                       pool_lengths=pool_lengths)
    job.timings["validate"] = time.time() - t - t_lengths
    job.timings["lengths"] = t_lengths  # the length pass over every domain and pool record

    result: Selection = method.select(job)

    # ---- write the selection (process 0, atomically, only now that everything is complete)
    chosen = [int(i) for i in result.chosen]
    if len(chosen) != n_select or len(set(chosen)) != n_select:
        raise RuntimeError(f"method {job.method!r} returned {len(chosen)} indices ({len(set(chosen))} distinct), "
                           f"expected N={n_select} distinct")
    selected = [pool[i] for i in chosen]
    diag = diagnostics.selection_diagnostics(pool, chosen, result, context.tokenizer,
                                             assistant_turns=encoding["assistant_turns"])
    if job.primary:
        if result.scores is not None:
            write_npz(os.path.join(out_dir, "all_scores.npz"),
                      **{k: np.asarray(v) for k, v in result.report_arrays(pool).items()})
        if plot:
            diag["plot"] = diagnostics.plot_diagnostics(diag, pool, result, os.path.join(out_dir, "diagnostics.png"),
                                                        title=f"{job.method} (seed {seed})")
        write_records_atomic(selected_path, selected)
    job.sync("select")  # on return, selected.jsonl exists for every process
    return {"method": job.method, "seed": int(seed), "config": to_jsonable(cfg), "timings_s": job.timings,
            "counts": {"domain": len(domain), "pool": len(pool), "selected": len(selected)},
            "data": {"lengths": lengths, "layouts": layouts, "dedup": dedup},
            "processes": int(process_count), "mesh": (context.info or {}).get("mesh"),
            "selected_ids": [r["id"] for r in selected], **precision_report(selected, pool),
            "diagnostics": diag, **job.extra}


def load_selection_data(cfg, data_dir: str, seed: int) -> dict:
    """``{"domain", "pool", "test", "source"}`` records for a job: the files named by
    ``cfg.domain_path`` / ``pool_path`` / ``test_path`` (:func:`ntk_jax.data.records.read_records`
    validates them; malformed JSONL raises naming file and line), or — when ``domain_path``
    and ``pool_path`` are empty — the controlled benchmark target ``cfg.benchmark.target``
    (:data:`ntk_jax.data.controlled.TARGETS`) for ``seed`` written into
    ``data_dir`` (reused if already there). ``test`` is ``None`` without a test path."""
    from ntk_jax.data.controlled import load_controlled_benchmark, make_benchmark, write_controlled_benchmark
    from ntk_jax.data.records import read_records

    if cfg["domain_path"] or cfg["pool_path"]:
        if not (cfg["domain_path"] and cfg["pool_path"]):
            raise ValueError("set both select.domain_path and select.pool_path (or neither, for the controlled "
                             "benchmark)")
        return {"domain": read_records(cfg["domain_path"]), "pool": read_records(cfg["pool_path"]),
                "test": read_records(cfg["test_path"]) if cfg["test_path"] else None,
                "source": {k: os.path.abspath(cfg[k]) for k in ("domain_path", "pool_path", "test_path") if cfg[k]}}
    b = plain(cfg["benchmark"])
    wanted = {"target": str(b.get("target") or "flipped_sentiment"), "seed": int(seed),
              "variant": str(b.get("variant") or "contradicting"), "n_domain": int(b["n_domain"]),
              "n_test": int(b["n_test"])}
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        bench = load_controlled_benchmark(data_dir)
        found = {k: bench.meta.get(k) for k in wanted}
        if found.get("target") is None:  # written before the suite had targets
            found["target"] = "flipped_sentiment"
        if found != wanted:
            raise ValueError(f"{data_dir!r} holds a controlled benchmark made with {found}, but the config asks for "
                             f"{wanted}; use another workdir or delete that directory")
    else:
        bench = make_benchmark(wanted["target"], wanted["seed"], n_domain=wanted["n_domain"],
                               n_test=wanted["n_test"], n_pool_per_family=int(b["n_pool_per_family"]),
                               variant=wanted["variant"])
        write_controlled_benchmark(data_dir, bench)
    return {"domain": bench.domain, "pool": bench.pool, "test": bench.test,
            "source": {"controlled_benchmark": os.path.abspath(data_dir), "target": wanted["target"],
                       "seed": int(seed), "variant": wanted["variant"]}}
