"""The selection benchmark suite (docs/selection.md): every target of
:data:`ntk_jax.data.controlled.TARGETS` (or ``config.select_suite.targets``) × every variant
of ``config.select_suite.variants`` × the arms and seeds of ``config.select_compare``, each
cell a resumable comparison (:func:`experiments.select_compare.compare`) in
``<target>/<variant>/``.

Writes ``suite_table.json`` (per cell and arm: mean ± std over seeds of precision@N, base
rate, test loss, accuracy; per variant and arm the mean over targets), ``suite_table.md``
(the tables of docs/selection.md), ``suite.png`` (precision@N and test loss relative to
domain-only, per target and arm) and ``checks`` — what the suite must show, per arm, computed
from the table (nothing is asserted: a failed check is a result):

* ``precision_2.5x_base`` (no_conflict): precision@N ≥ 2.5 × the base rate on every target;
* ``beats_domain_and_random`` (no_conflict): test loss below domain-only and random on at
  least 4 of 5 targets (generally: all but one);
* ``above_base_conflict`` (contradicting): precision@N above the base rate on every target.

Every process of a ``jax.distributed`` job runs it (the selections are split over them).
"""
from __future__ import annotations

import copy
import os

import ml_collections
import numpy as np

from experiments.plotting import save, subplots
from experiments.select_compare import _process, compare
from ntk_jax.data.controlled import TARGETS, VARIANTS
from ntk_jax.selection.jobs import plain
from ntk_jax.utils import write_json

DISTRIBUTED = True
METRICS = ("precision_at_n", "base_rate", "test_loss", "accuracy")


def config() -> ml_collections.ConfigDict:
    """The benchmark suite (experiments/select_suite.py): every target × variant, each cell a
    comparison with the arms, seeds and fine-tuning of ``select_compare``."""
    return ml_collections.ConfigDict(dict(
        targets=(),                 # names of ntk_jax.data.controlled.TARGETS; empty: all of them
        variants=("no_conflict", "contradicting"),
    ))


def cells(config) -> list[tuple[str, str]]:
    """``(target, variant)`` pairs of the suite, validated (``ValueError`` naming the
    choices)."""
    sc = config.select_suite
    targets = list(sc.targets) or list(TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown suite target(s) {unknown}; choose from {sorted(TARGETS)}")
    bad = [v for v in sc.variants if v not in VARIANTS]
    if bad or not sc.variants:
        raise ValueError(f"select_suite.variants must name variants of {sorted(VARIANTS)}, got {list(sc.variants)}")
    return [(t, v) for t in targets for v in sc.variants]


def mean_over_targets(per_cell: dict, variant: str, arms: list[str]) -> dict:
    """Per arm, the mean over the targets of ``variant`` of each metric's seed mean."""
    out = {}
    for arm in arms:
        entry = {}
        for key in METRICS:
            vals = [c["table"][arm][key] for (t, v), c in per_cell.items()
                    if v == variant and arm in c["table"] and c["table"][arm][key] is not None]
            entry[key] = float(np.mean(vals)) if vals else None
        out[arm] = entry
    return out


def checks(per_cell: dict, arms: list[str]) -> dict:
    """The suite's must-show checks per method arm (see the module docstring)."""
    out = {}
    for arm in arms:
        if arm == "domain_only" or arm.startswith("oracle_"):
            continue
        nc = {t: c["table"] for (t, v), c in per_cell.items() if v == "no_conflict"}
        cf = {t: c["table"] for (t, v), c in per_cell.items() if v == "contradicting"}
        res = {}
        if nc:
            ratio = {t: tab[arm]["precision_at_n"] / tab[arm]["base_rate"] for t, tab in nc.items()}
            res["precision_over_base_no_conflict"] = ratio
            res["precision_2.5x_base"] = all(r >= 2.5 for r in ratio.values())
            wins = {t: bool(tab[arm]["test_loss"] < tab["domain_only"]["test_loss"]
                            and ("random" not in tab or tab[arm]["test_loss"] < tab["random"]["test_loss"]))
                    for t, tab in nc.items()}
            res["loss_wins_no_conflict"] = wins
            res["beats_domain_and_random"] = sum(wins.values()) >= max(len(wins) - 1, 1)
        if cf:
            above = {t: tab[arm]["precision_at_n"] - tab[arm]["base_rate"] for t, tab in cf.items()}
            res["precision_minus_base_conflict"] = above
            res["above_base_conflict"] = all(a > 0 for a in above.values())
        out[arm] = res
    return out


def _fmt(x, d=3):
    return "–" if x is None else f"{x:.{d}f}"


def markdown(per_cell: dict, means: dict, arms: list[str]) -> str:
    """One table per variant: rows target × arm (precision@N / test loss / accuracy), then
    the mean over targets."""
    lines = []
    for variant in sorted({v for _, v in per_cell}, key=lambda v: v != "no_conflict"):
        lines += [f"**{variant}** (mean ± std over seeds; precision@N with the pool base rate in brackets)", "",
                  "| target | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
        for (t, v), c in per_cell.items():
            if v != variant:
                continue
            tab = c["table"]
            cellfmt = []
            for a in arms:
                e = tab[a]
                prec = "" if e["precision_at_n"] is None else (
                    f"p {_fmt(e['precision_at_n'], 2)}±{_fmt(e['precision_at_n_std'], 2)} "
                    f"({_fmt(e['base_rate'], 2)})<br>")
                acc = "" if e["accuracy"] is None else f"<br>acc {_fmt(e['accuracy'], 2)}"
                cellfmt.append(f"{prec}loss {_fmt(e['test_loss'])}±{_fmt(e['test_loss_std'])}{acc}")
            lines.append(f"| {t} | " + " | ".join(cellfmt) + " |")
        m = means[variant]
        lines.append("| **mean** | " + " | ".join(
            ("" if m[a]["precision_at_n"] is None else f"p {_fmt(m[a]['precision_at_n'], 2)}<br>")
            + f"loss {_fmt(m[a]['test_loss'])}" for a in arms) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(per_cell: dict, arms: list[str], path: str) -> str:
    """Two rows per variant: precision@N / base rate and test loss / domain-only loss, bars per
    arm, groups per target."""
    variants = sorted({v for _, v in per_cell}, key=lambda v: v != "no_conflict")
    fig, axes = subplots(2 * len(variants), width=5.5, height=3.4)
    method_arms = [a for a in arms if a != "domain_only"]
    for vi, variant in enumerate(variants):
        targets = [t for (t, v) in per_cell if v == variant]
        x = np.arange(len(targets))
        w = 0.8 / max(len(method_arms), 1)
        for ai, arm in enumerate(method_arms):
            ratio, loss = [], []
            for t in targets:
                e = per_cell[(t, variant)]["table"][arm]
                ratio.append(e["precision_at_n"] / e["base_rate"] if e["precision_at_n"] is not None else np.nan)
                loss.append(e["test_loss"] / per_cell[(t, variant)]["table"]["domain_only"]["test_loss"])
            axes[2 * vi].bar(x + ai * w, ratio, w, label=arm)
            axes[2 * vi + 1].bar(x + ai * w, loss, w, label=arm)
        for k, (ax, title, line) in enumerate(((axes[2 * vi], "precision@N / base rate", 1.0),
                                               (axes[2 * vi + 1], "test loss / domain-only", 1.0))):
            ax.axhline(line, color="k", lw=1, ls="--")
            ax.set_xticks(x + 0.4 - w / 2, targets, rotation=30, ha="right", fontsize=7)
            ax.set_title(f"{variant}: {title}", fontsize=9)
        axes[2 * vi].legend(fontsize=6)
    return save(fig, path)


def run(config, out_dir, context):
    per_cell = {}
    for target, variant in cells(config):
        sel = plain(config.select)
        sel["benchmark"]["target"], sel["benchmark"]["variant"] = target, variant
        cc = copy.deepcopy(plain(config.select_compare))
        if variant == "no_conflict":  # no conflicting family to add
            cc["oracles"] = [o for o in cc["oracles"] if o != "conflicting"]
        per_cell[(target, variant)] = compare(context, sel, cc, os.path.join(out_dir, target, variant))
    all_arms = list(dict.fromkeys(a for c in per_cell.values() for a in c["arms"]))
    variants = sorted({v for _, v in per_cell})
    means = {v: mean_over_targets(per_cell, v, all_arms) for v in variants}
    table = {f"{t}/{v}": c["table"] for (t, v), c in per_cell.items()}
    report = {"table": table, "mean_over_targets": means, "checks": checks(per_cell, all_arms),
              "targets": sorted({t for t, _ in per_cell}), "variants": variants, "arms": all_arms,
              "config": {"select": plain(config.select), "select_compare": plain(config.select_compare),
                         "select_suite": plain(config.select_suite)}}
    common = [a for a in all_arms if all(a in c["table"] for c in per_cell.values())]  # e.g. not oracle_conflicting
    if _process(context)[0] == 0:
        md = markdown(per_cell, means, common)
        report["markdown"] = md
        with open(os.path.join(out_dir, "suite_table.md"), "w") as f:
            f.write(md)
        write_json(os.path.join(out_dir, "suite_table.json"), {k: v for k, v in report.items() if k != "markdown"})
        report["plot"] = plot(per_cell, common, os.path.join(out_dir, "suite.png"))
    return report


def summary(report):
    return {arm: {k: v for k, v in res.items() if isinstance(v, bool)} for arm, res in report["checks"].items()}
