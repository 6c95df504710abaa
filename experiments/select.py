"""One data-selection job (ntk_jax issue 4, item 6): ``config.select.method`` in
{ntk, less, random, embedding} selects ``config.select.n_select`` records of the pool for the
domain set; writes ``scores/`` (resumable ScoreStore), ``selected.jsonl`` (atomic, only when
complete) and ``report.json``. See :mod:`ntk_jax.selection.jobs`.

    python -m ntk_jax.main --config=configs/select_ntk.py --workdir=runs/select_ntk
"""
from __future__ import annotations

import os

from ntk_jax.selection.jobs import load_selection_data, run_selection


def run(config, out_dir, context):
    cfg = config.select
    data = load_selection_data(cfg, os.path.join(out_dir, "data"), int(config.seed))
    report = run_selection(context, cfg, data["domain"], data["pool"], out_dir, seed=int(config.seed))
    report["data"] = data["source"]
    return report


def summary(report):
    out = {k: report[k] for k in ("method", "counts") if k in report}
    for k in ("precision_at_n", "base_rate"):
        if k in report:
            out[k] = round(report[k], 4)
    out["timings_s"] = {k: round(v, 2) for k, v in report["timings_s"].items()}
    return out
