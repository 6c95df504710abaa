"""Where does first-order subset estimation (GradEx) work? One command sweeps how far the real
fine-tune moves from θ* (its steps and learning rate), the meta-initialisation's length, the
projection dimension d and the ridge C, and plots the error of the change against the
distance ‖θ_S − θ*‖ (docs/gradex.md, docs/theory.md §6.4).

    python benchmarks/gradex_sweep.py --workdir runs/gradex_sweep > runs/gradex_sweep.json

Every setting is the GradEx job (``configs/gradex.py``) with the overrides of :data:`SETTINGS`
on top of :data:`SWEEP_BASE` (one seed, 12 verified subsets, a 40-subset ensemble, no greedy
or selection check: small enough that the whole sweep takes ~20 min on a 2-core CPU), each in
``WORKDIR/<setting>/`` through the launcher, so a killed sweep resumes (finished settings are
read back). C is swept post hoc on every setting's verified subsets (the job's
``C_sensitivity_post_hoc``: C from the grid chosen after seeing the truth — an upper bound on
what calibration can reach, reported as such). The embedded model is pre-trained once into
``WORKDIR/base_model``. Printed JSON: one row per setting; the plot goes to ``--plot``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.gradex import get_config  # noqa: E402
from experiments.plotting import save, subplots  # noqa: E402
from ntk_jax.launcher.context import prepare_context  # noqa: E402
from ntk_jax.launcher.run import run  # noqa: E402
from ntk_jax.utils import write_json  # noqa: E402

SWEEP_BASE = {"seeds": (0,), "n_verify": 12, "n_subsets": 40, "greedy": False, "compare_selection": False,
              "baseline_few": 4,
              "n_boot": 300}
# name -> overrides of config.gradex (dotted keys). "base" is configs/gradex.py's setting.
SETTINGS = {
    "base": {},
    "ft_steps_10": {"finetune.total_steps": 10},
    "ft_steps_120": {"finetune.total_steps": 120},
    "ft_lr_5e-4": {"finetune.learning_rate": 5e-4},
    "meta_100": {"meta_train.total_steps": 100},
    "meta_1000": {"meta_train.total_steps": 1000},
    "d_100": {"projection_dim": 100},
    "d_400": {"projection_dim": 400},
}


def setting_config(model_dir: str, overrides: dict):
    config = get_config()
    config.model.path = model_dir
    g = config.gradex
    for key, value in {**SWEEP_BASE, **overrides}.items():
        *path, last = key.split(".")
        section = g
        for p in path:
            section = section[p]
        section[last] = value
    return config


def row_of(name: str, overrides: dict, report: dict) -> dict:
    h = report["honest"]
    est, diag = h["estimators"], h["diagnostics"]
    seed = report["per_seed"][0]
    value = lambda m: m["value"]  # noqa: E731
    best_C = min(seed["C_sensitivity_post_hoc"], key=lambda r: r["error_of_change"])
    return {"setting": name, "overrides": overrides, "n_verified": h["n_verified"], "C": seed["C"],
            "error_of_change": {k: value(v["error_of_change"]) for k, v in est.items()},
            "spearman": {k: value(v["spearman"]) for k, v in est.items()},
            "spearman_interval_linearised": [est["gradex_linearised"]["spearman"]["low"],
                                             est["gradex_linearised"]["spearman"]["high"]],
            "first_order_at_true_error_of_change": value(diag["first_order_at_true_displacement"]["error_of_change"]),
            "first_order_at_true_spearman": value(diag["first_order_at_true_displacement"]["spearman"]),
            "fit_vs_first_order_at_true": diag["fit_vs_first_order_at_true"],
            "distance_median": diag["distance"]["median"], "delta_norm_median": diag["delta_norm_median"],
            "cos_delta_median": diag["cos_delta_fit_vs_true_median"],
            "effect_rms": float(np.sqrt(np.mean([(r["true_logistic"] - seed["theta_star_target"]["logistic"]) ** 2
                                                 for r in seed["verification"]]))),
            "C_post_hoc": seed["C_sensitivity_post_hoc"], "best_C_post_hoc": best_C}


def plot(rows: list[dict], path: str) -> str:
    fig, ax = subplots(2, width=5.0, height=3.8)
    x = [r["distance_median"] for r in rows]
    series = (("linearised L̂", lambda r: r["error_of_change"]["gradex_linearised"], "o"),
              ("model at θ*+Δ", lambda r: r["error_of_change"]["gradex_model_at_delta"], "s"),
              ("first order at the real θ_S−θ*", lambda r: r["first_order_at_true_error_of_change"], "^"),
              ("loo mean (trivial)", lambda r: r["error_of_change"]["loo_mean"], "x"))
    for label, fn, marker in series:
        ax[0].plot(x, [fn(r) for r in rows], marker, mfc="none", label=label)
    for r, xi in zip(rows, x):
        ax[0].annotate(r["setting"], (xi, r["error_of_change"]["gradex_linearised"]), fontsize=5)
    ax[0].axhline(1.0, color="k", lw=0.6, ls=":")
    ax[0].axhline(0.3, color="tab:green", lw=0.6, ls="--")
    ax[0].set(xscale="log", yscale="log", xlabel="median ‖θ_S − θ*‖ of the real fine-tunes",
              ylabel="error of the change", title="error of the change vs distance moved")
    ax[0].legend(fontsize=6)
    ax[1].plot(x, [r["spearman"]["gradex_linearised"] for r in rows], "o", mfc="none", label="linearised L̂")
    ax[1].plot(x, [r["spearman"]["gradex_model_at_delta"] for r in rows], "s", mfc="none", label="model at θ*+Δ")
    ax[1].plot(x, [r["first_order_at_true_spearman"] for r in rows], "^", mfc="none",
               label="first order at the real θ_S−θ*")
    ax[1].plot(x, [r["spearman"]["ridge_indicators_loo"] for r in rows], "x", label="ridge on indicators (trivial)")
    for r, xi in zip(rows, x):
        ax[1].annotate(r["setting"], (xi, r["spearman"]["gradex_linearised"]), fontsize=5)
    ax[1].axhline(0.8, color="tab:green", lw=0.6, ls="--")
    ax[1].set(xscale="log", xlabel="median ‖θ_S − θ*‖", ylabel="Spearman (est vs true)",
              title="rank agreement vs distance moved")
    ax[1].legend(fontsize=6)
    return save(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), help=f"subset of {list(SETTINGS)}")
    ap.add_argument("--plot", default="docs/img/gradex_sweep.png")
    args = ap.parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    model_dir = prepare_context(get_config(), workdir).model_dir   # pre-trains the embedded model once
    rows = []
    for name in args.settings:
        report = run(setting_config(model_dir, SETTINGS[name]), os.path.join(workdir, name))["gradex"]
        rows.append(row_of(name, SETTINGS[name], report))
    out = {"sweep_base": SWEEP_BASE, "rows": rows, "plot": plot(rows, args.plot)}
    write_json(os.path.join(workdir, "sweep.json"), out)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
