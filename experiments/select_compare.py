"""The selection comparison (docs/selection.md): for every seed, select N pool records with
each arm of ``config.select_compare.methods`` (a method of :mod:`ntk_jax.selection.methods`,
or ``"<method>@<preset>"`` such as ``"ntk@paper"``; settings from ``config.select``), fine-tune a fresh LoRA on the domain alone
and on domain ∪ selected(method), and evaluate on the held-out domain test set (loss;
accuracy by option log-likelihood when test records carry ``options``). On the controlled
benchmark, ``config.select_compare.oracles`` adds arms ``oracle_<role>`` that add N pool
records of a known role (``oracle_useful``: what a perfect selector reaches;
``oracle_conflicting``: the damage of the worst choice).

Data: the controlled benchmark of each seed (``seed_<s>/data``), or ``config.select``'s
JSONL paths (then the same data for every seed; ``test_path`` required).

Several ``jax.distributed`` processes: every process runs this job; each selection is split
over the processes (:func:`ntk_jax.selection.jobs.run_selection`), process 0 fine-tunes,
evaluates and writes.

Outputs: ``seed_<s>/<arm>/`` (each a selection job: ``scores/``, ``selected.jsonl``,
``report.json``), ``results.json`` (one entry per (seed, arm), appended atomically; a
restarted job skips finished selections and fine-tunes), ``table.json``, ``table.md``,
``comparison.png``. Each entry carries the fingerprint of what it depends on (the arm's
resolved ``select`` settings, the fine-tune and evaluation settings): a rerun whose arm now
means something else — an edited preset or default — stops with an error naming the arm
instead of reusing its old result (entries written before fingerprints are adopted as they are).
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from experiments.plotting import save, subplots
from ntk_jax.launcher.distributed import barrier
from ntk_jax.models.lora import lora_config
from ntk_jax.selection.evaluation import finetune_and_evaluate
from ntk_jax.selection.jobs import (encoding_options, fit_to_length, load_selection_data, plain, resolve_n_select,
                                    run_selection,
                                    selection_context)
from ntk_jax.selection.methods import apply_preset
from ntk_jax.selection.store import fingerprint_of
from ntk_jax.training.trainer import finetune_train_config
from ntk_jax.utils import read_json, write_json

RESULTS_NAME = "results.json"
DISTRIBUTED = True  # every jax.distributed process runs it: selections are split over processes


def config() -> ml_collections.ConfigDict:
    """docs/theory.md §7.2 (docs/selection.md): domain-only vs domain ∪ selected(method) over seeds
    (experiments/select_compare.py); selection settings come from ``config.select``."""
    return ml_collections.ConfigDict(dict(
        methods=("random", "embedding", "less", "ntk"),
        # controlled benchmark only: arms "oracle_<role>" train on domain ∪ N pool items of that
        # role (the best / worst a selector of N items can do)
        oracles=("useful", "conflicting"),
        seeds=(0, 1, 2),
        lora=lora_config(),
        # the benchmark's documented setting (ntk_jax.data.controlled.FINETUNE)
        finetune=finetune_train_config(total_steps=150, learning_rate=5e-3, warmup_steps=5, batch_size=16),
        eval_batch_size=128,
    ))


def _mean_std(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals))


def build_table(results: dict, arms: list[str]) -> dict:
    """Per arm: mean ± std over seeds of precision@N, base rate, test loss and accuracy."""
    table = {}
    for arm in arms:
        rows = [r for r in results.values() if r["arm"] == arm]
        entry = {"n_seeds": len(rows)}
        for key in ("precision_at_n", "base_rate", "test_loss", "accuracy", "selection_s"):
            m, s = _mean_std([r.get(key) for r in rows])
            entry[key] = m
            entry[f"{key}_std"] = s
        table[arm] = entry
    return table


def _fmt(m, s, digits=3):
    if m is None:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(table: dict) -> str:
    lines = ["| arm | precision@N | pool base rate | test loss | test accuracy | seeds |",
             "|---|---|---|---|---|---|"]
    for arm, e in table.items():
        lines.append(f"| {arm} | {_fmt(e['precision_at_n'], e['precision_at_n_std'])} | "
                     f"{_fmt(e['base_rate'], e['base_rate_std'])} | {_fmt(e['test_loss'], e['test_loss_std'], 4)} | "
                     f"{_fmt(e['accuracy'], e['accuracy_std'])} | {e['n_seeds']} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: str) -> str:
    arms = list(table)
    fig, axes = subplots(3, width=4.2)
    x = np.arange(len(arms))
    for ax, key, title in zip(axes, ("precision_at_n", "test_loss", "accuracy"),
                              ("precision@N (line: pool base rate)", "target test loss", "target test accuracy")):
        vals = [table[a][key] if table[a][key] is not None else np.nan for a in arms]
        errs = [table[a][f"{key}_std"] or 0.0 for a in arms]
        ax.bar(x, vals, yerr=errs, color="tab:blue", alpha=0.8, capsize=3)
        ax.set_xticks(x, arms, rotation=30, ha="right")
        ax.set_title(title, fontsize=9)
        if key == "precision_at_n":
            base = [table[a]["base_rate"] for a in arms if table[a]["base_rate"] is not None]
            if base:
                ax.axhline(float(np.mean(base)), color="k", ls="--", lw=1)
    return save(fig, path)


def oracle_records(pool: list[dict], role: str, n: int) -> list[dict]:
    """The first ``n`` pool records (pool order, which the benchmark shuffles) with ``role``:
    what a selector that knew the truth would add (``"useful"``: the best N; ``"conflicting"``:
    the worst). ValueError if the pool has no record with that role."""
    chosen = [r for r in pool if r.get("role") == role][:n]
    if not chosen:
        raise ValueError(f"oracle arm: no pool record has role {role!r}")
    return chosen


def arms_of(cc, sel) -> list[str]:
    """``domain_only``, the oracle arms, then the method arms (``"<method>"`` or
    ``"<method>@<preset>"``, validated here: an unknown method or preset fails before anything
    runs)."""
    oracles = [f"oracle_{role}" for role in cc["oracles"]]
    if oracles and (sel["domain_path"] or sel["pool_path"]):
        raise ValueError("select_compare.oracles need the controlled benchmark (pool records with a 'role'); "
                         "set select_compare.oracles=() for JSONL data")
    for arm in cc["methods"]:
        apply_preset(plain(sel), arm)
    return ["domain_only"] + oracles + list(cc["methods"])


def arm_fingerprint(sel: dict, cc: dict, arm: str) -> str:
    """The fingerprint of one (seed, arm) result's inputs besides the seed: a method arm's
    resolved ``select`` section (preset applied), or for ``domain_only`` / ``oracle_*`` the
    section's data settings (its scalars and ``benchmark``); and the fine-tune, LoRA and
    evaluation settings of ``select_compare``."""
    if arm == "domain_only" or arm.startswith("oracle_"):
        selection = {k: v for k, v in sel.items() if not isinstance(v, dict) or k == "benchmark"}
    else:
        selection = apply_preset(sel, arm)
    return fingerprint_of({"arm": arm, "select": selection, "finetune": cc["finetune"], "lora": cc["lora"],
                           "eval_batch_size": cc["eval_batch_size"]})


def _check_cached(results: dict, key: str, fingerprint: str, out_dir: str) -> bool:
    """Whether ``results[key]`` can be reused: ``True`` if it was computed with ``fingerprint``
    (entries without one are adopted), ``False`` if absent; ``ValueError`` if it was computed
    with other settings."""
    if key not in results:
        return False
    old = results[key].setdefault("config_fingerprint", fingerprint)
    if old != fingerprint:
        seed, arm = key.split("/", 1)
        raise ValueError(
            f"select_compare: the result of arm {arm!r} (seed {seed}) in {out_dir} was computed with other "
            f"settings than the arm has now (an edited preset, default or fine-tune setting). Use a new workdir, "
            f"or delete {os.path.join(out_dir, f'seed_{seed}', arm)} and the entry {key!r} of "
            f"{os.path.join(out_dir, RESULTS_NAME)} to recompute it")
    return True


def _process(context):
    proc = getattr(context, "process", None)
    return (proc.process_index, proc.process_count) if proc is not None else (0, 1)


def compare(context, sel, cc, out_dir: str) -> dict:
    """The comparison of every arm over ``cc.seeds`` on the data of ``sel`` (see the module
    docstring), in ``out_dir``; resumable. Every ``jax.distributed`` process calls it: the
    selections run on all of them (each scores its own shards), process 0 fine-tunes,
    evaluates and writes. Returns ``{"table", "results", "arms"}``."""
    sel, cc = plain(sel), plain(cc)
    if not cc["seeds"]:
        raise ValueError("select_compare.seeds is empty")
    index, count = _process(context)
    primary = index == 0
    arms = arms_of(cc, sel)
    ctx, encoding = selection_context(context, sel), encoding_options(sel)  # select.max_len / truncation
    barrier(f"ntk_jax.compare.start.{out_dir}")  # nobody reads results.json while process 0 writes it
    results_path = os.path.join(out_dir, RESULTS_NAME)
    results = read_json(results_path) if os.path.exists(results_path) else {}
    for seed in cc["seeds"]:
        seed = int(seed)
        sdir = os.path.join(out_dir, f"seed_{seed}")
        if primary:  # may write the controlled benchmark
            data = load_selection_data(sel, os.path.join(sdir, "data"), seed)
        barrier(f"ntk_jax.compare.data.{sdir}")
        if not primary:
            data = load_selection_data(sel, os.path.join(sdir, "data"), seed)
        if data["test"] is None:
            raise ValueError("select_compare needs a held-out test set: set select.test_path")
        # the length policy on what is fine-tuned on and evaluated (run_selection applies it to its own inputs)
        fitted = {what: fit_to_length(ctx, sel, data[what], what, sel[f"{what}_path"])[0]
                  for what in ("domain", "pool", "test")}
        for arm in arms:
            key = f"{seed}/{arm}"
            fingerprint = arm_fingerprint(sel, cc, arm)
            if _check_cached(results, key, fingerprint, out_dir):
                continue
            entry = {"seed": seed, "arm": arm, "config_fingerprint": fingerprint}
            train_records = list(fitted["domain"])
            if arm.startswith("oracle_"):
                extra = oracle_records(fitted["pool"], arm[len("oracle_"):],
                                       resolve_n_select(sel["n_select"], len(fitted["pool"])))
                train_records += extra
                entry["n_added"] = len(extra)
            elif arm != "domain_only":
                jdir = os.path.join(sdir, arm)
                rpath = os.path.join(jdir, "report.json")
                if os.path.exists(rpath):
                    report = read_json(rpath)
                else:
                    report = run_selection(context, apply_preset(sel, arm), data["domain"], data["pool"], jdir,
                                           seed=seed, process_index=index, process_count=count, barrier=barrier)
                    if primary:
                        write_json(rpath, report)
                by_id = {r["id"]: r for r in data["pool"]}
                train_records += [by_id[i] for i in report["selected_ids"]]
                entry.update({k: report.get(k) for k in ("precision_at_n", "base_rate", "selected_roles")})
                diag = report.get("diagnostics", {})
                entry.update({k: diag.get(k) for k in ("spearman_score_vs_feature_norm",
                                                       "spearman_score_vs_response_length")})
                entry["selection_s"] = float(sum(report["timings_s"].values()))
            if not primary:
                continue  # process 0 fine-tunes and evaluates
            entry.update(finetune_and_evaluate(ctx, train_records, fitted["test"], lora=cc["lora"],
                                               train_cfg=cc["finetune"], seed=seed,
                                               eval_batch_size=int(cc["eval_batch_size"]), encoding=encoding))
            results[key] = entry
            write_json(results_path, results)
            print(f"[select_compare] {os.path.basename(out_dir)} seed {seed} {arm}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in entry.items() if isinstance(v, float)), flush=True)
    barrier(f"ntk_jax.compare.end.{out_dir}")
    if not primary:
        results = read_json(results_path)
    seeds = [int(s) for s in cc["seeds"]]
    table = build_table({k: v for k, v in results.items() if int(v["seed"]) in seeds}, arms)
    return {"table": table, "results": results, "arms": arms}


def run(config, out_dir, context):
    out = compare(context, config.select, config.select_compare, out_dir)
    table = out["table"]
    md = markdown_table(table)
    plot_path = None
    if _process(context)[0] == 0:
        write_json(os.path.join(out_dir, "table.json"), table)
        with open(os.path.join(out_dir, "table.md"), "w") as f:
            f.write(md)
        plot_path = plot(table, os.path.join(out_dir, "comparison.png"))
    return {"table": table, "results": out["results"], "markdown": md, "plot": plot_path,
            "config": {"select": plain(config.select), "select_compare": plain(config.select_compare)}}


def summary(report):
    return {arm: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()
                  if k in ("precision_at_n", "base_rate", "test_loss", "accuracy")}
            for arm, e in report["table"].items()}
