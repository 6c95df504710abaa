"""Screen of NTK-Selector pipelines on the controlled suite: precision@N of every arm (no
fine-tuning), and the first-order vs exact comparison (docs/selection.md).

For each target × variant × seed of the suite's controlled benchmark (the embedded model the
suite uses, pre-trained into ``WORKDIR/base_model``), every arm of :data:`ARMS` runs as a
selection job (``run_selection``; resumable: a finished arm is read back, not rerun). The
projection is off (``p = 0``: exact directions), as in the earlier variant screen. Printed
JSON: per cell and arm precision@N and base rate; per arm the mean and minimum over cells; and
per cell the Spearman correlations of the label-aware gradient scores at θ_0, θ_w and
θ_0+θ_w with the loss change Δ_j (40 and 120 warm-up steps), with the precision of the
records each picks that the other does not; and the precision of the loss change over every
window of the warm-up path (``loss_change_windows``, from the four-checkpoint job).

    python benchmarks/selection_screen.py --workdir runs/screen --targets flipped_sentiment mirror \\
        --variants no_conflict contradicting --seeds 0 > screen.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ntk_jax.data.controlled import TARGETS, VARIANTS, make_benchmark  # noqa: E402
from ntk_jax.launcher.config_lib import base_config  # noqa: E402
from ntk_jax.launcher.context import prepare_context  # noqa: E402
from ntk_jax.selection.jobs import plain, run_selection  # noqa: E402
from ntk_jax.selection.methods import apply_overrides, apply_preset  # noqa: E402
from ntk_jax.utils import write_json  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

# Arms run as selection jobs: name -> (arm, select-section overrides with dotted keys).
ARMS = {
    "paper": ("ntk@paper", {}),
    "grad_base": ("ntk@gradient", {"ntk.point": "base"}),
    "grad_warm": ("ntk@gradient", {"ntk.point": "warmup"}),
    "lc": ("ntk@loss_change", {}),
    "lc_sum": ("ntk@loss_change", {"ntk.loss_change.reduce": "sum"}),
    "lc_rel": ("ntk@loss_change", {"ntk.loss_change.relative": True}),
    "lc_ckpt4": ("ntk@loss_change", {"ntk.loss_change.checkpoints": 4}),
    "lc_xfit": ("ntk@loss_change", {"ntk.loss_change.cross_fit": True}),
    "lc_120": ("ntk@loss_change", {"warmup.total_steps": 120}),
    # Δ from a warm-up on the domain with its responses permuted (the answers' form, not the rule)
    "lc_shuf": ("ntk@loss_change", {"ntk.loss_change.reference": "shuffled"}),
    # kNN votes over mean hidden states at θ_0 (no warm-up: the pass that gives ℓ(θ_0)) and at θ_w
    "knn0": ("embedding", {"warmup.total_steps": 0}),
    "knnw": ("embedding", {}),
    # ... the same over the scored positions only (select.knn_pooling="response")
    "knn0_resp": ("embedding", {"warmup.total_steps": 0, "knn_pooling": "response"}),
    "knnw_resp": ("embedding", {"knn_pooling": "response"}),
    # the recommended pipeline as the job runs it, and with LoRA on every projection of the blocks
    # (q/k/v/o and the MLP's) for its warm-up instead of q/v
    "rec": ("ntk", {}),
    "rec_all_linear": ("ntk", {"lora.targets": "all-linear"}),
}
# Arms computed from the jobs' saved scores, exactly as the staged pipeline combines them
# (ntk_jax.selection.methods.ntk.select): "gradient" is the mean of the two points' scores
# (the preset ntk@gradient); "<Δ arm>><gradient>@<k>[:filter]" keeps the top k·N by Δ and ranks
# them by the mean of the two ranks (":filter": by the gradient score alone).
GRADIENTS = {"gradient": ("grad_base", "grad_warm"), "grad_base": ("grad_base",), "grad_warm": ("grad_warm",)}
DERIVED = (["gradient"] + [f"{d}>{g}@{k}{c}" for d in ("lc", "lc_120", "lc_xfit") for g in GRADIENTS
                           for k in (2, 4) for c in ("", ":filter")]
           + [f"{knn}>lc@{k}:filter" for knn in ("knn0", "knnw") for k in (2, 4)])
DERIVED_NEEDS = {"lc", "lc_120", "lc_xfit", "grad_base", "grad_warm", "knn0", "knnw"}
# ... and with the shuffled-reference Δ (when its arm ran)
DERIVED_SHUFFLED = ["knnw>lc_shuf@4:filter", "lc_shuf>grad_base@4:filter"]
DERIVED_SHUFFLED_NEEDS = {"lc_shuf", "knnw", "grad_base"}
# ... and with the response-pooled kNN filters
DERIVED_RESPONSE = [f"{knn}>lc@{k}:filter" for knn in ("knn0_resp", "knnw_resp") for k in (2, 4)]
DERIVED_RESPONSE_NEEDS = {"lc", "knn0_resp", "knnw_resp"}


def arm_config(select: dict, arm: str, overrides: dict) -> dict:
    cfg = apply_preset(select, arm)
    apply_overrides(cfg, {**overrides, "projection_dim": 0})
    return cfg


def run_arm(context, select: dict, bench, name: str, out_dir: str, seed: int) -> dict:
    path = os.path.join(out_dir, "report.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    arm, overrides = ARMS[name]
    rep = run_selection(context, arm_config(select, arm, overrides), bench.domain, bench.pool, out_dir, seed=seed,
                        plot=False)
    write_json(path, rep)
    return rep


def _scores(out_dir: str, pool_ids: list[str]) -> np.ndarray:
    """The arm's scores in pool order (NaN where it scored nothing)."""
    z = np.load(os.path.join(out_dir, "all_scores.npz"))
    pos = {i: k for k, i in enumerate(pool_ids)}
    out = np.full(len(pool_ids), np.nan)
    out[[pos[str(i)] for i in z["ids"]]] = z["scores"]
    return out


def _ranks(scores: np.ndarray) -> np.ndarray:
    return np.argsort(np.lexsort((np.arange(len(scores)), -scores)), kind="stable").astype(float)


def derived_scores(cell_dir: str, pool_ids: list[str], name: str, n: int) -> np.ndarray:
    """Pool-order scores of a :data:`DERIVED` arm (``-inf`` for records it does not keep)."""
    def grad(g):
        return np.mean([_scores(os.path.join(cell_dir, a), pool_ids) for a in GRADIENTS[g]], axis=0)

    if name in GRADIENTS:
        return grad(name)
    if name.startswith("knn"):  # kNN votes keep k·N, the loss change ranks them
        spec, _, k = name.partition(":")[0].partition("@")
        knn_arm, _, delta_arm = spec.partition(">")
        key, delta = _scores(os.path.join(cell_dir, knn_arm), pool_ids), _scores(os.path.join(cell_dir, delta_arm), pool_ids)
        kept = np.lexsort((np.arange(len(key)), -key))[: int(k) * n]
        out = np.full(len(key), -np.inf)
        out[kept] = delta[kept]
        return out
    spec, _, combine = name.partition(":")
    delta_arm, _, rest = spec.partition(">")
    g_name, _, k = rest.partition("@")
    delta, g = _scores(os.path.join(cell_dir, delta_arm), pool_ids), grad(g_name)
    kept = np.sort(np.lexsort((np.arange(len(delta)), -delta))[: int(k) * n])
    out = np.full(len(delta), -np.inf)
    out[kept] = g[kept] if combine == "filter" else -0.5 * (_ranks(delta[kept]) + _ranks(g[kept]))
    return out


def precision(scores: np.ndarray, pool: list[dict], n: int) -> float:
    top = np.lexsort((np.arange(len(scores)), -scores))[:n]
    return float(np.mean([pool[i].get("role") == "useful" for i in top]))


def loss_change_windows(arm_dir: str, pool: list[dict], n: int) -> dict:
    """Precision@N of the loss change over windows of the warm-up path, from a job with several
    loss-change checkpoints (``lc_ckpt4``: its stored losses ``ℓ(θ_0), ℓ(θ_s1), …`` per record):
    ``"a-b"`` ranks by ``ℓ(θ_a) − ℓ(θ_b)`` for every pair of steps ``a < b`` (``"0-<last>"`` is
    Δ; the late windows test whether the end of the warm-up, after the answer's form is learnt,
    carries the rule)."""
    with open(os.path.join(arm_dir, "report.json")) as fh:
        steps = [0] + [int(s) for s in json.load(fh)["loss_change"]["checkpoint_steps"]]
    with open(os.path.join(arm_dir, "loss_change", "meta.json")) as fh:
        num_shards = int(json.load(fh)["num_shards"])
    ids, losses = [], []
    for k in range(num_shards):
        with np.load(os.path.join(arm_dir, "loss_change", f"shard_{k:05d}.npz")) as z:
            ids += [str(i) for i in z["ids"]]
            losses.append(z["features"])  # (rows, 1 + K): ℓ at θ_0 and each checkpoint
    L = np.concatenate(losses)
    role = {str(r["id"]): r.get("role") for r in pool}
    useful = np.array([role[i] == "useful" for i in ids])
    out = {}
    for i, a in enumerate(steps):
        for j in range(i + 1, len(steps)):
            s = L[:, i] - L[:, j]
            out[f"{a}-{steps[j]}"] = float(useful[np.lexsort((np.arange(len(s)), -s))[:n]].mean())
    return out


def first_order_vs_exact(cell_dir: str, pool: list[dict], n: int) -> dict:
    """Spearman of each gradient score with Δ (40, 120 steps) over the pool, and where the
    top-N sets differ, the useful share of the records only one of them picks."""
    ids = [str(r["id"]) for r in pool]
    useful = np.array([r.get("role") == "useful" for r in pool])
    out = {}
    for delta_arm in ("lc", "lc_120"):
        d = _scores(os.path.join(cell_dir, delta_arm), ids)
        top_d = set(np.argsort(-d, kind="stable")[:n])
        for grad_arm in GRADIENTS:
            g = derived_scores(cell_dir, ids, grad_arm, n)
            top_g = set(np.argsort(-g, kind="stable")[:n])
            only_d, only_g = sorted(top_d - top_g), sorted(top_g - top_d)
            out[f"{grad_arm}~{delta_arm}"] = {
                "spearman": float(spearmanr(g, d).statistic), "overlap": len(top_d & top_g) / n,
                "only_delta_useful": float(useful[only_d].mean()) if only_d else None,
                "only_gradient_useful": float(useful[only_g].mean()) if only_g else None}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/selection_screen")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    args = ap.parse_args(argv)
    config = base_config()
    context = prepare_context(config, args.workdir)
    select = plain(config.select)
    b = select["benchmark"]
    cells, per_arm = {}, {a: [] for a in args.arms}
    for target in args.targets:
        for variant in args.variants:
            for seed in args.seeds:
                bench = make_benchmark(target, seed, n_domain=int(b["n_domain"]), n_test=int(b["n_test"]),
                                       n_pool_per_family=int(b["n_pool_per_family"]), variant=variant)
                cell_dir = os.path.join(args.workdir, target, variant, f"seed{seed}")
                row = {}
                for name in args.arms:
                    rep = run_arm(context, select, bench, name, os.path.join(cell_dir, name), seed)
                    row[name] = {"precision_at_n": rep["precision_at_n"], "base_rate": rep["base_rate"],
                                 "seconds": float(sum(rep["timings_s"].values()))}
                    per_arm[name].append(rep["precision_at_n"])
                ids = [str(r["id"]) for r in bench.pool]
                for needs, derived in ((DERIVED_NEEDS, DERIVED), (DERIVED_SHUFFLED_NEEDS, DERIVED_SHUFFLED),
                                       (DERIVED_RESPONSE_NEEDS, DERIVED_RESPONSE)):
                    if not needs <= set(args.arms):
                        continue
                    for name in derived:
                        p = precision(derived_scores(cell_dir, ids, name, int(select["n_select"])), bench.pool,
                                      int(select["n_select"]))
                        row[name] = {"precision_at_n": p, "base_rate": row[args.arms[0]]["base_rate"]}
                        per_arm.setdefault(name, []).append(p)
                cell = {"arms": row}
                if {"lc", "lc_120", "grad_base", "grad_warm"} <= set(args.arms):
                    cell["first_order_vs_exact"] = first_order_vs_exact(cell_dir, bench.pool,
                                                                        int(select["n_select"]))
                if "lc_ckpt4" in args.arms:
                    cell["loss_change_windows"] = loss_change_windows(os.path.join(cell_dir, "lc_ckpt4"), bench.pool,
                                                                      int(select["n_select"]))
                cells[f"{target}/{variant}/seed{seed}"] = cell
                print(json.dumps({f"{target}/{variant}/seed{seed}": row}), file=sys.stderr, flush=True)
    summary = {a: {v: {"mean": float(np.mean([cells[c]["arms"][a]["precision_at_n"] for c in cells
                                                 if f"/{v}/" in c])),
                       "min": float(np.min([cells[c]["arms"][a]["precision_at_n"] for c in cells if f"/{v}/" in c]))}
                   for v in args.variants} for a in per_arm}
    result = {"cells": cells, "summary": summary}
    write_json(os.path.join(args.workdir, "screen.json"), result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
