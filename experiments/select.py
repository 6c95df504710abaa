"""One data-selection job: ``config.select.method`` (a module of
:mod:`ntk_jax.selection.methods`: ntk, less, random, embedding) selects ``config.select.n_select`` records of the pool for the
domain set; writes ``scores/`` (resumable ScoreStore), ``selected.jsonl`` (atomic, only when
complete) and ``report.json``. See :mod:`ntk_jax.selection.jobs`.

    python -m ntk_jax.main --config=configs/select_ntk.py --workdir=runs/select_ntk

``DISTRIBUTED``: started as several ``jax.distributed`` processes (the launcher's
``--coordinator_address`` / ``--num_processes`` / ``--process_id``), every process runs this
job and scores its share of the pool's shards; process 0 writes the controlled
benchmark (when no JSONL paths are given) before the others read it, and the selection.
"""
from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

from ntk_jax.launcher import distributed
from ntk_jax.launcher.memory import job_programs
from ntk_jax.launcher.preflight import MemoryPlan
from ntk_jax.models.lora import LoRAConfig, lora_config
from ntk_jax.selection.jobs import load_selection_data, plain, run_selection
from ntk_jax.selection.methods import get_method, method_names
from ntk_jax.training.trainer import finetune_train_config

DISTRIBUTED = True


def config() -> ml_collections.ConfigDict:
    """docs/theory.md §6.1/§6.2: one data-selection job (experiments/select.py); also the per-method
    settings the comparison (select_compare) uses."""
    c = ml_collections.ConfigDict(dict(
        method="ntk",               # a module of ntk_jax.selection.methods: ntk | less | random | embedding
        # N, or a fraction of the pool in (0, 1) (0.05: LESS's top 5 %); typed loosely so that
        # --config.select.n_select takes either
        n_select=config_dict.FieldReference(64, field_type=object),
        # JSONL files or local HF datasets dirs; empty: the controlled benchmark
        # (ntk_jax.data.controlled), generated into the job's directory.
        domain_path="",
        pool_path="",
        test_path="",
        # the controlled benchmark: a target of ntk_jax.data.controlled.TARGETS; variant
        # "contradicting" (the pool also holds conflicting families) or "no_conflict"
        benchmark=dict(target="flipped_sentiment", n_domain=32, n_test=256, n_pool_per_family=64,
                       variant="contradicting"),
        # The selection jobs' encoding (select, select_compare, select_suite; pretrain.max_len is
        # the embedded model's pre-training length only). max_len: tokens per encoded record
        # (bos + prompt/rendering + eos); 32 = the embedded model's, which the controlled
        # benchmark's records fit.
        max_len=32,
        # Records longer than max_len, checked over every record before any model work (counts
        # in report.json "data.lengths"): "error" stops naming the record's file: line, its
        # length and what each other policy would do; "left" drops leading prompt tokens and
        # keeps the response; "right" keeps the first max_len tokens; "drop" skips the record.
        # left/right drop the records they cannot fit (response alone too long / prompt fills
        # max_len). Default "error": the controlled benchmark never exceeds max_len, and a user's
        # own pool is told at once, before any model is loaded (the 8B configs use "left").
        truncation="error",
        # messages records: the loss on every assistant turn ("all") or on the last one ("last")
        assistant_turns="all",
        lora=lora_config(),
        warmup=finetune_train_config(total_steps=40, learning_rate=5e-3, batch_size=16),
        # "exact": drop pool records whose content (messages / prompt+response / text) repeats an
        # earlier one's before scoring (report data.dedup), so N is not spent on copies; "none"
        dedup="none",
        knn_k=32,                   # votes per domain example (coarse filter)
        # what the kNN filter's mean hidden states average over: every real token ("all", the
        # paper's) or the scored positions ("response": records with the same prompt and
        # different answers get different embeddings)
        knn_pooling="all",
        projection_dim=8192,        # p
        projection_seed=0,
        # "dense": a Rademacher (P, p) matrix (the paper's); "factored": per-layer Kronecker
        # factors of the layers' inputs and output gradients (LoGra; docs/kernels.md), which
        # never form a per-example gradient. LESS needs "dense".
        projection_type="dense",
        shard_size=128,             # candidates per ScoreStore shard
        feature_batch_size=64,
        # scoring/embedding in length buckets: widths rounded up to this multiple (at most
        # max_len / bucket_multiple compiled shapes); 0 pads every candidate to max_len
        bucket_multiple=16,
    ))
    # each method's own section (select.<method>), from its module (ntk_jax.selection.methods)
    for name in method_names():
        method = get_method(name)
        if method.config is not None:
            c[name] = method.config()
    return c


def run(config, out_dir, context):
    cfg = config.select
    proc = getattr(context, "process", None)
    index, count = (proc.process_index, proc.process_count) if proc is not None else (0, 1)
    data_dir = os.path.join(out_dir, "data")
    if index == 0:  # may write the controlled benchmark into data_dir
        data = load_selection_data(cfg, data_dir, int(config.seed))
    if count > 1:
        distributed.barrier("ntk_jax.select.data")
    if index != 0:  # reads what process 0 wrote (or the JSONL files)
        data = load_selection_data(cfg, data_dir, int(config.seed))
    report = run_selection(context, cfg, data["domain"], data["pool"], out_dir, seed=int(config.seed),
                           process_index=index, process_count=count, barrier=distributed.barrier)
    report["data"] = {**data["source"], **report.get("data", {})}  # the sources, and the length policy's counts
    return report


def memory_plan(config) -> MemoryPlan:
    """The programs this job runs on its devices (:func:`ntk_jax.launcher.memory.job_programs`),
    for the launcher's memory preflight: pool-wide programs at ``feature_batch_size`` rows of
    ``max_len`` tokens, the warm-up's train step at ``warmup.batch_size``."""
    s = plain(config.select)
    return MemoryPlan(programs=job_programs(s), lora=LoRAConfig.from_dict(s["lora"]),
                      batch_size=int(s["feature_batch_size"]), train_batch_size=int(s["warmup"]["batch_size"]),
                      seq_len=int(s["max_len"]), projection_dim=int(s["projection_dim"]),
                      batch_key="select.feature_batch_size", train_batch_key="select.warmup.batch_size")


def summary(report):
    out = {k: report[k] for k in ("method", "counts", "processes") if k in report}
    for k in ("precision_at_n", "base_rate"):
        if k in report:
            out[k] = round(report[k], 4)
    out["timings_s"] = {k: round(v, 2) for k, v in report["timings_s"].items()}
    return out
