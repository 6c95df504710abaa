"""A held-out check of the recommended selector: targets defined after the default was chosen.

The suite's five targets (``ntk_jax.data.controlled.TARGETS``) chose the recommended pipeline
(``ntk``: the kNN filter to 4N, then the loss change Δ_j of the kept) and were used again to
compare it with a 3× longer warm-up, so none of them is held out any more. This script
registers three targets that no selection setting was ever tuned on — each a new rule under a
new template with two useful families (the rule under other templates), two conflicting
families (another rule on the target's inputs, in the target's template and in a useful one)
and the long-answer unrelated families — and runs every arm as a selection job with the
job's defaults (precision@N, no fine-tuning; resumable: a finished job is read back):

* ``successor`` (arithmetic): ``"{a} plus one="`` → a + 1; conflicting rule a − 1;
* ``swap_ends`` (string transform): ``"swap {s}:"`` → the word with its first and last letters
  exchanged; conflicting rule: rotated left by one letter;
* ``max_digit`` (lookup): ``"{d} largest?"`` → the largest digit; conflicting: the smallest.

Printed JSON: per (target, variant, seed) and arm precision@N and the pool's base rate; per
arm and variant the mean precision, its 95 % bootstrap interval over cells, the minimum
multiple of the base rate, and the per-target means.

``--suite``: instead, the selection suite itself (``configs/select_suite.py``: every selection
fine-tuned and evaluated on the target's test records beside domain-only and the oracles, 3
seeds; ``suite_table.{json,md}``) on the held-out targets, with ``--arms`` as its methods.

    python benchmarks/held_out_targets.py --workdir runs/held_out > held_out.json
    python benchmarks/held_out_targets.py --suite --workdir runs/held_out_suite --arms random embedding ntk@paper ntk
    # a large pool with a 1.3 % useful share (precision@N is then the useful records' recall):
    python benchmarks/held_out_targets.py --workdir runs/held_out_large_pool --targets max_digit sort_words mirror \
        --seeds 0 1 --arms random embedding ntk ntk@loss_change --pool-counts useful=32,conflicting=64,unrelated=600
    # a 4x wider, deeper embedded model, every target with a conflicting rule, contradicting only:
    python benchmarks/held_out_targets.py --workdir runs/held_out_h256 --variants contradicting --arms random ntk \
        --arch hidden_size=256,num_layers=4,num_heads=8,num_kv_heads=4,intermediate_size=512 \
        --targets successor swap_ends max_digit mirror last_letter double sort_words
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ntk_jax.data import controlled as ctl  # noqa: E402
from ntk_jax.launcher.config_lib import base_config  # noqa: E402
from ntk_jax.launcher.context import prepare_context  # noqa: E402
from ntk_jax.selection.jobs import plain, run_selection  # noqa: E402
from ntk_jax.selection.methods import apply_preset  # noqa: E402
from ntk_jax.stats import bootstrap_interval  # noqa: E402
from ntk_jax.utils import write_json  # noqa: E402

ARMS = ("random", "embedding", "ntk@paper", "ntk", "ntk[warmup.total_steps=120]")


def _successor(x):
    return str(int(x["a"]) + 1)


def _predecessor(x):
    return str(int(x["a"]) - 1)


def _draw_positive(rng):
    return {"a": int(rng.integers(1, 1000))}


def _swap_ends(x):
    s = x["s"]
    return s[-1] + s[1:-1] + s[0]


def _rotate_left(x):
    s = x["s"]
    return s[1:] + s[0]


def _draw_word4(rng):  # 4-6 letters: swapping the ends and rotating by one always differ in form
    return {"s": ctl._letters(rng, 4, 6)}


def _max_digit(x):
    return max(x["d"])


def _min_digit(x):
    return min(x["d"])


HELD_OUT = (
    ctl.TargetSpec(
        name="successor", kind="arithmetic", description="a + 1 (a in 1..999) under 'A plus one='",
        template="{a} plus one=", draw=_draw_positive, rule=_successor, fields={"a": r"\d+"},
        families={"plus_one_spaced": ctl.useful("{a} plus one ="), "one_more_than": ctl.useful("one more than {a}="),
                  "plus_one_minus": ctl.conflicting(_predecessor),
                  "plus_one_spaced_minus": ctl.conflicting(_predecessor, "{a} plus one ="),
                  **ctl._LONG_UNRELATED},
        length_contrast="useful_shorter"),
    ctl.TargetSpec(
        name="swap_ends", kind="string_transform", description="swap the first and last letters under 'swap S:'",
        template="swap {s}:", draw=_draw_word4, rule=_swap_ends, fields={"s": "[a-z]+"},
        families={"swap_spaced": ctl.useful("swap {s} :"), "ends_swapped": ctl.useful("ends swapped {s}:"),
                  "swap_rotate": ctl.conflicting(_rotate_left),
                  "swap_spaced_rotate": ctl.conflicting(_rotate_left, "swap {s} :"),
                  **{f: ctl.unrelated(f) for f in ("add", "sub", "count", "parity", "sentiment", "noise")}},
        length_contrast="similar"),
    ctl.TargetSpec(
        name="max_digit", kind="character_lookup", description="the largest digit under 'D largest?'",
        template="{d} largest?", draw=ctl._draw_digits, rule=_max_digit, fields={"d": "[0-9]+"},
        families={"largest_spaced": ctl.useful("{d} largest ?"), "largest_of": ctl.useful("largest of {d}?"),
                  "largest_min": ctl.conflicting(_min_digit),
                  "largest_spaced_min": ctl.conflicting(_min_digit, "{d} largest ?"),
                  **ctl._LONG_UNRELATED},
        length_contrast="useful_shorter"),
)


def apply_arch(config, spec: str) -> None:
    """Sets ``config.model.arch`` entries from ``"key=int,key=int"`` (``""``: unchanged)."""
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in config.model.arch:
            raise ValueError(f"--arch: the embedded model has no setting {key.strip()!r}; "
                             f"settings: {sorted(config.model.arch)}")
        config.model.arch[key.strip()] = int(value)


def pool_counts(spec, variant: str, by_role: str, default: int):
    """``n_pool_per_family`` for ``spec``'s ``variant``: ``default`` records per family, or per
    role from ``"useful=32,conflicting=64,unrelated=600"`` (roles not named keep ``default``)."""
    if not by_role:
        return default
    roles = {}
    for item in by_role.split(","):
        role, _, value = item.partition("=")
        if role.strip() not in ctl.POOL_ROLES:
            raise ValueError(f"--pool-counts: unknown role {role.strip()!r}; roles: {list(ctl.POOL_ROLES)}")
        roles[role.strip()] = int(value)
    return {f: roles.get(spec.roles[f], default) for f in spec.variant_families(variant)}


def register() -> list[str]:
    """Registers :data:`HELD_OUT` (once per process); returns their names."""
    for spec in HELD_OUT:
        if spec.name not in ctl.TARGETS:
            ctl.register_target(spec)
    return [s.name for s in HELD_OUT]


def run_arm(context, select: dict, bench, arm: str, out_dir: str, seed: int) -> dict:
    path = os.path.join(out_dir, "report.json")
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    rep = run_selection(context, apply_preset(select, arm), bench.domain, bench.pool, out_dir, seed=seed, plot=False)
    write_json(path, rep)
    return rep


def run_suite(workdir: str, targets, arms, seeds, variants) -> dict:
    """``configs/select_suite.py`` on ``targets`` with ``arms`` as its methods (the launcher's
    ``run``; resumable). Returns the launcher's result."""
    import importlib.util

    from ntk_jax.launcher.run import run

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "select_suite.py")
    spec = importlib.util.spec_from_file_location("select_suite_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.select_suite.targets = tuple(targets)
    config.select_suite.variants = tuple(variants)
    config.select_compare.methods = tuple(arms)
    config.select_compare.seeds = tuple(seeds)
    return run(config, workdir)


def filter_sweep(cell_dir: str, pool: list[dict], n: int, factors=(2, 4, 8, 16, 32)) -> dict:
    """The recommended pipeline with other kNN filter sizes, from two saved jobs of one cell:
    the ``ntk`` job's votes (every pool record) and the ``ntk@loss_change`` job's Δ (every pool
    record; the same warm-up). Per factor k: the useful records' recall in the kept k·N and
    precision@N of Δ within them (and of the relative Δ, Δ / ℓ(θ_0)); ``"whole"``: the whole pool."""
    ids = [str(r["id"]) for r in pool]
    pos = {i: k for k, i in enumerate(ids)}
    useful = np.array([r.get("role") == "useful" for r in pool])

    def pool_order(arm: str, key: str) -> np.ndarray:
        with np.load(os.path.join(cell_dir, arm, "all_scores.npz")) as z:
            out = np.full(len(ids), -np.inf)
            out[[pos[str(i)] for i in z["ids"]]] = z[key]
        return out

    votes, delta = pool_order("ntk", "votes"), pool_order("ntk@loss_change", "scores")
    base = pool_order("ntk@loss_change", "loss_base")
    relative = np.where(np.isfinite(delta), delta / np.maximum(base, 1e-12), -np.inf)  # loss_change.relative
    first = np.lexsort((np.arange(len(ids)), -votes))

    def precision(score: np.ndarray) -> float:
        return float(useful[np.lexsort((np.arange(len(ids)), -score))[:n]].mean())

    out = {}
    for k in factors:
        kept = first[: k * n]
        row = {"recall": float(useful[kept].sum() / max(useful.sum(), 1))}
        for name, values in (("precision_at_n", delta), ("precision_at_n_relative", relative)):
            score = np.full(len(ids), -np.inf)
            score[kept] = values[kept]
            row[name] = precision(score)
        out[f"{k}N"] = row
    out["whole"] = {"recall": 1.0, "precision_at_n": precision(delta), "precision_at_n_relative": precision(relative)}
    return out


def summarise(cells: dict, arms, variants) -> dict:
    """Per arm and variant: mean precision@N over cells with a 95 % bootstrap interval, the
    smallest multiple of the base rate, and the mean per target."""
    out = {}
    for arm in arms:
        for variant in variants:
            rows = [(k.split("/")[0], c[arm], c["base_rate"]) for k, c in cells.items()
                    if k.split("/")[1] == variant and arm in c]
            if not rows:
                continue
            p = np.array([r[1] for r in rows])
            ci = bootstrap_interval(lambda a: float(np.mean(a)), p, seed=0)
            per_target = {t: float(np.mean([r[1] for r in rows if r[0] == t])) for t in sorted({r[0] for r in rows})}
            out[f"{arm} / {variant}"] = {"mean": float(p.mean()), "ci95": [ci["low"], ci["high"]], "cells": len(rows),
                                         "min_multiple_of_base": float(min(r[1] / r[2] for r in rows)),
                                         "per_target": per_target}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--targets", nargs="+", default=None, help="default: every held-out target")
    ap.add_argument("--variants", nargs="+", default=["no_conflict", "contradicting"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--suite", action="store_true", help="run configs/select_suite.py on the held-out targets")
    ap.add_argument("--pool-counts", default="", help="records per pool family by role, e.g. 'useful=32,"
                                                       "conflicting=64,unrelated=600' (a large pool with a small "
                                                       "useful share; default: the job's n_pool_per_family)")
    ap.add_argument("--arch", default="", help="the embedded model's architecture, e.g. 'hidden_size=256,num_layers=4,"
                                               "num_heads=8,num_kv_heads=4,intermediate_size=512' (pre-trained into "
                                               "WORKDIR/base_model; default: the job's)")
    args = ap.parse_args(argv)
    targets = args.targets or register()
    register()
    if args.suite:
        return run_suite(args.workdir, targets, args.arms, args.seeds, args.variants)
    config = base_config()
    apply_arch(config, args.arch)
    context = prepare_context(config, args.workdir)
    select = plain(config.select)
    b = select["benchmark"]
    cells = {}
    for target in targets:
        for variant in args.variants:
            for seed in args.seeds:
                counts = pool_counts(ctl.TARGETS[target], variant, args.pool_counts, int(b["n_pool_per_family"]))
                bench = ctl.make_benchmark(target, seed, n_domain=int(b["n_domain"]), n_test=int(b["n_test"]),
                                           n_pool_per_family=counts, variant=variant)
                key = f"{target}/{variant}/seed{seed}"
                cell = {}
                for arm in args.arms:
                    rep = run_arm(context, select, bench, arm, os.path.join(args.workdir, key, arm), seed)
                    cell[arm] = rep["precision_at_n"]
                    cell["base_rate"] = rep["base_rate"]
                if {"ntk", "ntk@loss_change"} <= set(args.arms):
                    cell["filter_sweep"] = filter_sweep(os.path.join(args.workdir, key), bench.pool, int(select["n_select"]))
                cells[key] = cell
                print(f"held_out: {key}: " + ", ".join(f"{a} {cell[a]:.2f}" for a in args.arms)
                      + f" (base {cell['base_rate']:.2f})", file=sys.stderr, flush=True)
    result = {"arms": list(args.arms), "cells": cells, "summary": summarise(cells, args.arms, args.variants)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
