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

from ntk_jax.launcher import distributed
from ntk_jax.selection.jobs import load_selection_data, run_selection

DISTRIBUTED = True


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


def summary(report):
    out = {k: report[k] for k in ("method", "counts", "processes") if k in report}
    for k in ("precision_at_n", "base_rate"):
        if k in report:
            out[k] = round(report[k], 4)
    out["timings_s"] = {k: round(v, 2) for k, v in report["timings_s"].items()}
    return out
