"""docs/theory.md §6.4 — first-order subset estimation (GradEx), judged against real fine-tuning
and against the trivial estimators (docs/gradex.md).

    python -m ntk_jax.main --config=configs/gradex.py --workdir=runs/gradex

Auxiliary tasks: synthetic task families (``config.gradex.aux_tasks``, each its own task);
target: one more family (default ``add_spaced``, not in the pre-training mix). Every seed of
``config.gradex.seeds`` is a replicate of its own in ``seed_<s>/`` (its own data draw,
meta-initialisation, projection, calibration, ensemble and verified subsets). Stages, each
saved as it finishes (a restarted job skips finished work; a changed config is refused by a
fingerprint check rather than mixed with old results):

1. data (:func:`prepare_data`); 2. θ* (:func:`meta_stage`, ``meta_init/``, orbax checkpoints);
3. features (:func:`feature_stage`): ``f(θ*, x)`` and projected LoRA gradients ``g̃`` (dim d)
   of every auxiliary and target example in the shards of a ScoreStore (``features/``);
4. calibration (:func:`calibration_stage`): C from ``C_grid`` by the squared error on
   ``n_calibrate`` extra fine-tuned subsets, never used for anything else;
5. ensemble (:func:`ensemble_stage`): the linearised estimate ``L̂(S)`` and the real model at
   θ* + Δ_S on ``n_subsets`` random subsets; task scores, greedy, ridge surrogate;
6. verification (:func:`verification_stage`): ``n_verify`` subsets at evenly spaced ranks of
   L̂ really fine-tuned from θ* (fine-tunes in ScoreStore shards of ``verify_shard_size``,
   ``verify_<ids>/``: a killed job recomputes only unwritten shards), plus the selection
   check (selected, greedy, all tasks and random subsets of the selected size, ``compare_<ids>/``);
7. report (:func:`seed_report`, :func:`job_report`): the error of the change and Spearman /
   Kendall within seeds with bootstrap intervals, for GradEx and the trivial estimators
   (:func:`ntk_jax.selection.gradex.estimator_metrics`).

The target loss is measured identically everywhere by :class:`ntk_jax.selection.gradex.TargetLosses`:
``logistic`` = mean_j log(1+exp(−f(x_j))) (what the linearised estimate predicts; primary) and
``ce`` = mean_j token-mean cross-entropy.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from experiments.plotting import save, subplots
from ntk_jax.data.synthetic import TASKS, generate_task
from ntk_jax.kernels.factored_projection import make_projection
from ntk_jax.models.lora import LoRAConfig, lora_config
from ntk_jax.models.subset import param_subset
from ntk_jax.selection import gradex as gx
from ntk_jax.selection.store import ScoreStore, check_workdir_fingerprint, fill_store, fingerprint_of
from ntk_jax.stats import spearman
from ntk_jax.training.trainer import TrainConfig, finetune_train_config, train
from ntk_jax.utils import progress, read_json, write_json, write_npz


def config() -> ml_collections.ConfigDict:
    """docs/theory.md §6.4: first-order subset estimation (GradEx) over synthetic auxiliary tasks,
    judged against real LoRA fine-tunes and the trivial estimators (experiments/gradex.py,
    docs/gradex.md)."""
    return ml_collections.ConfigDict(dict(
        target="add_spaced",        # target task (not in the pre-training mix)
        aux_tasks=("add", "sub", "copy", "reverse", "sort", "count", "sentiment", "parity",
                   "sentiment_flipped", "add_mod10", "noise"),
        seeds=(0, 1, 2),            # replicates: each its own data draw, θ*, projection and subsets (seed_<s>/)
        n_train_per_task=256,       # training examples per auxiliary task (meta-init, fits, fine-tunes)
        n_target_train=0,           # target examples added to every subset (0: auxiliary tasks only)
        n_target_eval=128,          # target examples the target loss is measured on
        lora=lora_config(),
        meta_train=finetune_train_config(total_steps=300, learning_rate=2e-3, warmup_steps=20,
                                         schedule="cosine", batch_size=32, checkpoint_every=100,
                                         log_every=10),
        finetune=finetune_train_config(total_steps=60),  # the real fine-tunes, from θ*
        projection_dim=200,         # d (the paper's code: 100-400)
        projection_seed=0,          # + the replicate's seed
        projection_kind="rademacher",
        projection_type="dense",    # or "factored" (per-layer Kronecker map; docs/kernels.md)
        clip_eps=1e-4,              # q clipped to [eps, 1-eps] in f = mean log(q/(1-q))
        # Logistic fit: sum of the subset's losses + |w|^2/(2C). C sets the size of Δ (nothing is
        # rescaled). With calibrate_C, C is picked from C_grid on n_calibrate extra really
        # fine-tuned subsets (never used for the error check; their cost counts in the timing);
        # otherwise C is used as given. C_grid also gives a post-hoc sensitivity table.
        C=1e-3,
        calibrate_C=True,
        n_calibrate=2,
        C_grid=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0),
        feature_batch_size=64,
        shard_size=256,             # features in resumable shards of this many examples (features/)
        eval_batch_size=128,
        n_subsets=200,              # random ensemble size m
        subset_prob=0.5,
        keep_fraction=0.3,          # top fraction of tasks kept by the ensemble scores
        greedy=True,                # also greedy forward selection on the estimates
        ridge_lambda=1.0,           # ridge surrogate on subset indicators (of the estimates)
        surrogate_holdout=0.2,      # fraction of the ensemble held out for the surrogate's Spearman
        n_verify=24,                # subsets really fine-tuned per seed (evenly spaced ranks of the estimate)
        verify_shard_size=4,        # fine-tunes per resumable store shard (verify_*/, calibrate_*/, compare_*/)
        compare_selection=True,     # fine-tune the selected, greedy, all-task and random same-size subsets
        n_random_compare=4,         # random subsets of the selected size in that check, per seed
        baseline_lambdas=(0.01, 0.1, 1.0, 10.0, 100.0),  # λ grid of the leave-one-out ridge baselines
        baseline_few=8,             # the indicator ridge also fitted on only this many real fine-tunes
        n_boot=1000,                # bootstrap resamples of every interval
    ))

FEATURES_DIR = "features"  # the ScoreStore of f(θ*, x) (scores) and g̃ (features), one row per example

# Seed offsets of the data streams (generate_task draws per (task, seed)) and subset streams.
AUX_SEED_OFFSET = 101
TARGET_TRAIN_SEED_OFFSET = 101
TARGET_EVAL_SEED_OFFSET = 202
ENSEMBLE_SEED_OFFSET = 7
CALIBRATION_SEED_OFFSET = 11
RANDOM_COMPARE_SEED_OFFSET = 23

# Columns of a fine-tune store's ``features`` (its ``scores`` are the true target logistic
# losses); after them, the flattened displacement θ_S − θ* (P values).
FINETUNE_COLUMNS = ("true_ce", "distance", "first_order_at_true_logistic", "finetune_time_s", "steps")

# Keys that only affect the (cheap, always recomputed) estimation stages or the fine-tunes'
# choice of subsets (stores keyed by their subsets' ids); changing them reuses a workdir.
ESTIMATION_ONLY_KEYS = ("C", "C_grid", "calibrate_C", "n_calibrate", "n_subsets", "subset_prob", "keep_fraction",
                        "greedy", "ridge_lambda", "surrogate_holdout", "n_verify", "verify_shard_size",
                        "compare_selection", "n_random_compare", "baseline_lambdas", "baseline_few", "n_boot",
                        "feature_batch_size", "eval_batch_size", "seeds")


def check_setup(c) -> tuple[list[str], str, list[int]]:
    """The auxiliary task list, the target and the seeds, validated (clear errors)."""
    aux, target, seeds = list(c.aux_tasks), str(c.target), [int(s) for s in c.seeds]
    unknown = [t for t in aux + [target] if t not in TASKS]
    if unknown:
        raise ValueError(f"gradex: unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    if len(aux) < 2 or len(set(aux)) != len(aux):
        raise ValueError(f"gradex needs at least 2 distinct auxiliary tasks, got {aux}")
    if target in aux:
        raise ValueError(f"gradex: the target {target!r} is also an auxiliary task")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"gradex.seeds must be distinct and non-empty, got {seeds}")
    if int(c.n_verify) < 3:
        raise ValueError(f"gradex.n_verify must be >= 3 (rank statistics), got {c.n_verify}")
    for name in ("n_train_per_task", "n_target_eval", "n_subsets", "projection_dim", "verify_shard_size"):
        if int(c[name]) <= 0:
            raise ValueError(f"gradex.{name} must be positive, got {c[name]}")
    if int(c.n_target_train) < 0:
        raise ValueError(f"gradex.n_target_train must be >= 0, got {c.n_target_train}")
    return aux, target, seeds


def _concat(arrays: list[dict]) -> dict:
    return {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}


# ----------------------------------------------------------------------------- stages


@dataclasses.dataclass(frozen=True)
class Data:
    """The encoded examples of one seed: ``encoded[task]`` per auxiliary task, their
    ``union`` and ``task_index`` (N,), the target evaluation (and optional training) set."""
    aux: list
    encoded: dict
    union: dict
    task_index: np.ndarray
    target_eval: dict
    target_train: dict | None


def prepare_data(c, ctx, seed: int, aux: list[str], target: str) -> Data:
    encoded = {t: ctx.encode(generate_task(t, int(c.n_train_per_task), seed=seed + AUX_SEED_OFFSET)) for t in aux}
    target_eval = ctx.encode(generate_task(target, int(c.n_target_eval), seed=seed + TARGET_EVAL_SEED_OFFSET))
    target_train = (ctx.encode(generate_task(target, int(c.n_target_train), seed=seed + TARGET_TRAIN_SEED_OFFSET))
                    if int(c.n_target_train) else None)
    task_index = np.concatenate([np.full(len(encoded[t]["input_ids"]), k) for k, t in enumerate(aux)])
    return Data(aux, encoded, _concat([encoded[t] for t in aux]), task_index, target_eval, target_train)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every later stage of one seed needs (immutable): the model context, θ*, the LoRA
    subset, the output function, the target-loss evaluator and the fine-tune config."""
    ctx: Any
    lora: LoRAConfig
    data: Data
    seed: int
    seed_dir: str
    fingerprint: str
    theta_star: Any
    subset: Any
    f_fn: Any
    target_losses: gx.TargetLosses
    finetune: TrainConfig


def meta_stage(c, ctx, data: Data, seed: int, seed_dir: str, fingerprint: str) -> tuple[Setup, dict]:
    """θ*: LoRA fine-tuning on the union of the auxiliary tasks (resumed from ``meta_init/``)."""
    lora = LoRAConfig.from_dict(c.lora)
    meta_dir = os.path.join(seed_dir, "meta_init")
    meta_cfg = TrainConfig.from_dict({**dict(c.meta_train), "seed": seed})
    model = ctx.load_model(lora, seed=seed)
    t0 = time.time()
    meta = gx.meta_initialise(model, data.union, meta_cfg, workdir=meta_dir)
    info_path = os.path.join(meta_dir, "result.json")
    if not os.path.exists(info_path):
        losses = [h["loss"] for h in meta.history if "loss" in h]
        write_json(info_path, {"time_s": time.time() - t0, "steps": meta.final_step,
                               "first_loss": losses[0], "final_loss": float(np.mean(losses[-3:]))})
    subset = param_subset(model, nnx.LoRAParam)
    f_fn = gx.gradex_output_fn(subset, clip_eps=float(c.clip_eps))
    losses = gx.TargetLosses(subset, data.target_eval, clip_eps=float(c.clip_eps), batch_size=int(c.eval_batch_size))
    setup = Setup(ctx, lora, data, seed, seed_dir, fingerprint, meta.params, subset, f_fn, losses,
                  TrainConfig.from_dict({**dict(c.finetune), "seed": seed}))
    return setup, {**read_json(info_path), "config": meta_cfg.to_dict()}


def _feature_rows(setup: Setup, everything: dict, projection, batch_size: int, lo: int, hi: int):
    rows = {k: v[lo:hi] for k, v in everything.items()}
    G = gx.projected_gradients(setup.f_fn, setup.theta_star, rows, projection, batch_size=batch_size, desc=None)
    return gx.output_values(setup.f_fn, setup.theta_star, rows, batch_size=batch_size), G


def feature_stage(c, setup: Setup) -> tuple[gx.SubsetEstimator, Any, float]:
    """Features at θ* of every example (resumable shards); returns the estimator (C as
    configured), the back-projection Π and the features' compute seconds."""
    data = setup.data
    projection = make_projection(int(c.projection_dim), int(c.projection_seed) + setup.seed,
                                 str(c.projection_type), kind=str(c.projection_kind))
    parts = {"aux": data.union, "target": data.target_eval}
    if data.target_train is not None:
        parts["always"] = data.target_train
    everything = _concat([{k: d[k] for k in gx.MODEL_INPUTS} for d in parts.values()])
    ids = [f"{name}/{i}" for name, d in parts.items() for i in range(len(d["input_ids"]))]
    store = ScoreStore(os.path.join(setup.seed_dir, FEATURES_DIR), ids, int(c.shard_size), setup.fingerprint)
    fill_store(store, functools.partial(_feature_rows, setup, everything, projection, int(c.feature_batch_size)),
               desc="gradex features", with_features=True)
    _, f_all, G = store.merge(with_features=True)
    bounds = np.cumsum([0] + [len(d["input_ids"]) for d in parts.values()])
    feats = {name: (G[lo:hi], f_all[lo:hi]) for name, lo, hi in zip(parts, bounds[:-1], bounds[1:])}
    always = feats.get("always", (None, None))
    estimator = gx.SubsetEstimator(task_names=data.aux, G=feats["aux"][0], f=feats["aux"][1],
                                   task_index=data.task_index, G_target=feats["target"][0],
                                   f_target=feats["target"][1], C=float(c.C), G_always=always[0], f_always=always[1])
    back = gx.parameter_projection(projection, setup.f_fn, setup.theta_star, everything)
    return estimator, back, store.compute_seconds()


def finetune_subset(setup: Setup, mask: np.ndarray) -> dict:
    """Real LoRA fine-tuning from θ* on the subset's examples (in memory: the store shard is
    the unit of resumption): the target losses, ‖θ_S − θ*‖, the first-order loss at θ_S − θ*."""
    data = setup.data
    rows = _concat([data.encoded[t] for t, inside in zip(data.aux, mask) if inside]
                   + ([data.target_train] if data.target_train is not None else []))
    model = setup.ctx.load_model(setup.lora, seed=setup.seed)
    param_subset(model, nnx.LoRAParam).update_model(model, setup.theta_star)
    t0 = time.time()
    result = train(model, rows, setup.finetune)
    seconds = time.time() - t0
    true = setup.target_losses(result.params)
    delta = jax.tree.map(lambda a, b: a - b, result.params, setup.theta_star)
    flat = gx.tree_flatten_vector(delta)
    first = gx.first_order_target_loss(setup.f_fn, setup.theta_star, delta, data.target_eval)
    return {"true_logistic": true["logistic"], "true_ce": true["ce"], "distance": float(np.linalg.norm(flat)),
            "first_order_at_true_logistic": first, "finetune_time_s": seconds, "steps": result.final_step,
            "delta": flat}


def _finetune_rows(setup: Setup, masks: list, lo: int, hi: int):
    out = [finetune_subset(setup, m) for m in masks[lo:hi]]
    cols = np.array([[r[k] for k in FINETUNE_COLUMNS] for r in out], np.float64)
    return np.array([r["true_logistic"] for r in out]), np.concatenate([cols, np.stack([r["delta"] for r in out])], 1)


def finetune_store(setup: Setup, name: str, masks: list, shard_size: int, desc: str) -> dict[str, dict]:
    """Fine-tunes every subset in ``masks`` in the resumable shards of a ScoreStore in
    ``<name>_<hash of the subsets>/``; returns ``{subset key: row}`` (the FINETUNE_COLUMNS,
    ``true_logistic`` and ``delta`` (P,))."""
    keys = [gx.subset_key(setup.data.aux, m) for m in masks]
    directory = os.path.join(setup.seed_dir, f"{name}_{fingerprint_of(keys)[:10]}")
    store = ScoreStore(directory, keys, shard_size, setup.fingerprint)
    fill_store(store, functools.partial(_finetune_rows, setup, list(masks)), desc=desc, with_features=True)
    ids, scores, feats = store.merge(with_features=True)
    k = len(FINETUNE_COLUMNS)
    return {key: {"subset": key, "true_logistic": float(s), **dict(zip(FINETUNE_COLUMNS, map(float, f[:k]))),
                  "delta": f[k:]} for key, s, f in zip(ids, scores, feats)}


def distinct_subsets(n_tasks: int, n: int, prob: float, seed: int, *, size: int | None = None,
                     exclude: frozenset = frozenset()) -> list[np.ndarray]:
    """``n`` distinct random subsets (each task in with probability ``prob``, or exactly
    ``size`` tasks), none of whose bytes are in ``exclude``; a stream of its own per seed."""
    rng = np.random.default_rng(seed)
    out: dict[bytes, np.ndarray] = {}
    for _ in range(100 * n + 100):
        if size is None:
            m = rng.random(n_tasks) < prob
        else:
            m = np.zeros(n_tasks, bool)
            m[rng.choice(n_tasks, size, replace=False)] = True
        if m.any() and m.tobytes() not in exclude:
            out.setdefault(m.tobytes(), m)
        if len(out) == n:
            return list(out.values())
    raise ValueError(f"could not draw {n} distinct subsets of {n_tasks} tasks")


def calibration_stage(c, setup: Setup, estimator: gx.SubsetEstimator) -> tuple[float, dict | None]:
    """C: the value in ``C_grid`` with the least squared error Σ(est − true)² on
    ``n_calibrate`` extra fine-tuned subsets (used for nothing else); ``C`` as given without
    ``calibrate_C``."""
    if not c.calibrate_C:
        return float(c.C), None
    masks = distinct_subsets(estimator.n_tasks, int(c.n_calibrate), float(c.subset_prob),
                             setup.seed + CALIBRATION_SEED_OFFSET)
    rows = finetune_store(setup, "calibrate", masks, int(c.verify_shard_size), "gradex calibration fine-tunes")
    true = [r["true_logistic"] for r in rows.values()]
    table = []
    for C in list(c.C_grid):
        est_C = dataclasses.replace(estimator, C=float(C))
        vals = [est_C.estimate(m)[0] for m in masks]
        table.append({"C": float(C), "squared_error": float(np.sum((np.array(vals) - true) ** 2))})
    C_used = min(table, key=lambda row: row["squared_error"])["C"]
    return C_used, {"subsets": list(rows), "table": table, "C": C_used,
                    "finetune_times_s": [r["finetune_time_s"] for r in rows.values()],
                    "rule": "C in C_grid minimising sum (est-true)^2 on these subsets only"}


def estimate_subset(setup: Setup, estimator: gx.SubsetEstimator, back, mask: np.ndarray) -> dict:
    """One subset's estimates: the linearised loss L̂(S) and the real model at θ* + Δ_S."""
    t = time.time()
    loss, w = estimator.estimate(mask)
    fit_s = time.time() - t
    t = time.time()
    delta = gx.project_back(back, setup.theta_star, w)
    at_delta = setup.target_losses(gx.add_delta(setup.theta_star, delta))
    return {"linearised_logistic": loss, "w_norm": float(np.linalg.norm(w)),
            "delta_norm": float(np.linalg.norm(gx.tree_flatten_vector(delta))),
            "model_at_delta_logistic": at_delta["logistic"], "model_at_delta_ce": at_delta["ce"],
            "fit_time_s": fit_s, "model_at_delta_time_s": time.time() - t, "w": w}


def cached_estimates(setup: Setup, estimator: gx.SubsetEstimator, back, masks: np.ndarray, keys: list) -> dict:
    """:func:`estimate_subset` of every distinct subset, saved in ``estimates_<hash>.npz``
    (hash of the subsets and C, under the seed's fingerprint) so that a rerun that only
    rebuilds the report does not refit them."""
    first = dict(zip(reversed(keys), reversed(range(len(keys)))))
    order = sorted(first, key=first.get)
    path = os.path.join(setup.seed_dir, f"estimates_{fingerprint_of({'keys': order, 'C': estimator.C})[:10]}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            return {k: {**{name: float(z[name][i]) for name in z.files if name != "w"}, "w": z["w"][i]}
                    for i, k in enumerate(order)}
    rows = {k: estimate_subset(setup, estimator, back, masks[first[k]]) for k in progress(order, desc="gradex estimates")}
    write_npz(path, w=np.stack([rows[k]["w"] for k in order]),
              **{name: np.array([rows[k][name] for k in order]) for name in rows[order[0]] if name != "w"})
    return rows


def ensemble_stage(c, setup: Setup, estimator: gx.SubsetEstimator, back) -> dict:
    """Estimates on the random ensemble (seconds; recomputed on restart) and the selection
    made from them: task scores and the top fraction, greedy, the ridge surrogate."""
    aux = setup.data.aux
    masks = gx.sample_subsets(len(aux), int(c.n_subsets), prob=float(c.subset_prob),
                              seed=setup.seed + ENSEMBLE_SEED_OFFSET)
    keys = [gx.subset_key(aux, m) for m in masks]
    rows = cached_estimates(setup, estimator, back, masks, keys)
    est_lin = np.array([rows[k]["linearised_logistic"] for k in keys])
    scores = gx.ensemble_task_scores(masks, -est_lin)
    selected = np.zeros(len(aux), bool)
    selected[gx.select_top(scores, float(c.keep_fraction))] = True
    greedy = None
    if c.greedy:
        g = gx.greedy_forward_selection(lambda m: estimator.estimate(m)[0], len(aux))
        greedy = {"order": [aux[k] for k in g["order"]], "losses": g["losses"], "mask": g["selected"],
                  "selected": [aux[k] for k in np.flatnonzero(g["selected"])]}
    return {"masks": masks, "keys": keys, "rows": rows, "est_lin": est_lin, "scores": scores,
            "selected_mask": selected, "greedy": greedy,
            "surrogate": _surrogate_report(masks, est_lin, aux, float(c.ridge_lambda), float(c.surrogate_holdout))}


def verification_stage(c, setup: Setup, estimator, back, ens: dict, excluded: set) -> list[dict]:
    """``n_verify`` subsets at evenly spaced ranks of L̂ (no calibration subset) really
    fine-tuned, each row with its estimates and the diagnostics (cosine of Δ_S and θ_S − θ*)."""
    idx = verification_indices(ens["est_lin"], ens["keys"], int(c.n_verify), exclude=excluded)
    masks = [ens["masks"][i] for i in idx]
    truth = finetune_store(setup, "verify", masks, int(c.verify_shard_size), "gradex verification fine-tunes")
    pi = back.matrix(setup.theta_star).astype(np.float64) if hasattr(back, "matrix") else None
    return [_joined_row(setup, estimator, pi, ens["rows"][ens["keys"][i]], truth[ens["keys"][i]], back) for i in idx]


def _joined_row(setup: Setup, estimator: gx.SubsetEstimator, pi, est: dict, true: dict, back) -> dict:
    """A verified subset's truth and estimates, with the diagnostics: the cosine and norm
    ratio of Δ_S = Π w_S and θ_S − θ*, and (dense projections, ``pi`` the (P, d) matrix) the
    first-order target loss at the part of θ_S − θ* inside the fit's subspace (Π w*, w* the
    least-squares fit of θ_S − θ*): what the best Δ the d-dim fit could choose would give."""
    delta_s = gx.tree_flatten_vector(gx.project_back(back, setup.theta_star, est["w"]))
    n_s, n_t = float(np.linalg.norm(delta_s)), float(np.linalg.norm(true["delta"]))
    cos = float(delta_s @ true["delta"] / (n_s * n_t)) if n_s > 0 and n_t > 0 else None
    in_sub = {}
    if pi is not None:
        w_star = np.linalg.lstsq(pi, true["delta"], rcond=None)[0]
        in_sub = {"first_order_in_subspace_logistic": gx.linearised_logistic_loss(
                      estimator.G_target, estimator.f_target, w_star),
                  "subspace_norm_share": float(np.linalg.norm(pi @ w_star)) / n_t if n_t > 0 else None}
    tasks = true["subset"].split("+")
    return {**{k: v for k, v in true.items() if k != "delta"}, **{k: v for k, v in est.items() if k != "w"},
            "tasks": tasks, "mask": [t in tasks for t in setup.data.aux], "seed": setup.seed,
            "cos_delta_fit_vs_true": cos, "norm_ratio_fit_vs_true": n_s / n_t if n_t > 0 else None, **in_sub}


def selection_stage(c, setup: Setup, ens: dict) -> dict | None:
    """The selection check: the real fine-tuned target loss of the selected tasks, the greedy
    subset, all tasks, and ``n_random_compare`` random subsets of the selected size."""
    if not c.compare_selection:
        return None
    aux, sel = setup.data.aux, ens["selected_mask"]
    named = {"selected": sel, "all_tasks": np.ones(len(aux), bool)}
    if ens["greedy"] is not None:
        named["greedy"] = ens["greedy"]["mask"]
    randoms = distinct_subsets(len(aux), int(c.n_random_compare), 0.5, setup.seed + RANDOM_COMPARE_SEED_OFFSET,
                               size=int(sel.sum()), exclude=frozenset({sel.tobytes()}))
    masks = list({m.tobytes(): m for m in [*named.values(), *randoms]}.values())
    truth = finetune_store(setup, "compare", masks, int(c.verify_shard_size), "gradex selection check")
    key = functools.partial(gx.subset_key, aux)
    out = {name: {"subset": key(m), "true_logistic": truth[key(m)]["true_logistic"],
                  "true_ce": truth[key(m)]["true_ce"]} for name, m in named.items()}
    out["random"] = [{"subset": key(m), "true_logistic": truth[key(m)]["true_logistic"],
                      "true_ce": truth[key(m)]["true_ce"]} for m in randoms]
    return out


def verification_indices(estimates: np.ndarray, keys: list[str], n_verify: int, *,
                         exclude: set[str] = frozenset()) -> list[int]:
    """Indices of ``n_verify`` distinct subsets (none of them in ``exclude``) at evenly spaced
    ranks of the estimates (lowest to highest), so that the check spans the range of
    estimated losses."""
    first = {}
    for i, k in enumerate(keys):
        if k not in exclude:
            first.setdefault(k, i)
    unique = sorted(first.values(), key=lambda i: (estimates[i], i))
    if len(unique) < n_verify:
        raise ValueError(f"only {len(unique)} distinct subsets in the ensemble, fewer than n_verify={n_verify}")
    ranks = np.unique(np.round(np.linspace(0, len(unique) - 1, n_verify)).astype(int))
    return [unique[r] for r in ranks]


def _surrogate_report(masks, values, aux, lam: float, holdout: float) -> dict:
    full = gx.fit_ridge_surrogate(masks, values, lam)
    out = {"lambda": lam, "coef": {t: float(v) for t, v in zip(aux, full.coef)}, "intercept": full.intercept,
           "spearman_in_sample": spearman(full.predict(masks), values)}
    n_hold = int(round(holdout * len(values)))
    if 3 <= n_hold < len(values) - 1:
        part = gx.fit_ridge_surrogate(masks[:-n_hold], values[:-n_hold], lam)
        out["spearman_held_out"] = spearman(part.predict(masks[-n_hold:]), values[-n_hold:])
        out["n_held_out"] = n_hold
    return out


# ----------------------------------------------------------------------------- the job


def _fingerprint_payload(c, ctx, seed: int) -> dict:
    """What every cached stage of one seed depends on: the section (less the estimation-only
    keys), the model, the seed and the sequence length."""
    return {"gradex": {k: v for k, v in c.to_dict().items() if k not in ESTIMATION_ONLY_KEYS},
            "model_dir": os.path.abspath(ctx.model_dir), "seed": int(seed), "max_len": int(ctx.max_len)}


def run_seed(c, ctx, aux: list[str], target: str, seed: int, seed_dir: str) -> dict:
    """Every stage of one seed (a replicate with its own data, θ*, projection and subsets)."""
    fingerprint = check_workdir_fingerprint(seed_dir, _fingerprint_payload(c, ctx, seed), "gradex")
    data = prepare_data(c, ctx, seed, aux, target)
    setup, meta_info = meta_stage(c, ctx, data, seed, seed_dir, fingerprint)
    estimator, back, feature_time = feature_stage(c, setup)
    C, calibration = calibration_stage(c, setup, estimator)
    estimator = dataclasses.replace(estimator, C=C)
    ens = ensemble_stage(c, setup, estimator, back)
    rows = verification_stage(c, setup, estimator, back, ens, set(calibration["subsets"]) if calibration else set())
    report = seed_report(c, setup, estimator, ens, rows, calibration)
    report["selection"]["check"] = selection_stage(c, setup, ens)
    report["meta_init"] = meta_info
    report["timing"] = _timing_report(rows, feature_time, ens, meta_info, calibration)
    return report


def run(config, out_dir: str, ctx) -> dict:
    c = config.gradex
    aux, target, seeds = check_setup(c)
    per_seed = [run_seed(c, ctx, aux, target, s, os.path.join(out_dir, f"seed_{s}"))
                for s in progress(seeds, desc="gradex seeds")]
    report = job_report(c, ctx, per_seed)
    report["plots"] = [plot(report, os.path.join(out_dir, "gradex.png"))]
    return report


def seed_report(c, setup: Setup, estimator: gx.SubsetEstimator, ens: dict, rows: list[dict],
                calibration: dict | None) -> dict:
    aux = setup.data.aux
    est_lin = ens["est_lin"]
    true = np.array([r["true_logistic"] for r in rows])
    base = setup.target_losses(setup.theta_star)
    sensitivity = []
    for C in list(c.C_grid):
        est = dataclasses.replace(estimator, C=float(C))
        vals = np.array([est.estimate(np.array(r["mask"]))[0] for r in rows])
        sensitivity.append({"C": float(C), "error_of_change": gx.change_error(vals, true, base["logistic"]),
                            "spearman": spearman(vals, true)})
    return {
        "seed": setup.seed, "C": estimator.C, "calibration": calibration, "theta_star_target": base,
        "num_lora_params": setup.subset.num_params,
        "ensemble": {"n_subsets": len(ens["keys"]), "n_distinct": len(ens["rows"]),
                     "linearised_logistic": {"min": float(est_lin.min()), "max": float(est_lin.max())},
                     "spearman_linearised_vs_model_at_delta": spearman(
                         est_lin, [ens["rows"][k]["model_at_delta_logistic"] for k in ens["keys"]])},
        "selection": {"task_scores": {t: float(v) for t, v in zip(aux, ens["scores"])},
                      "selected": [t for t, m in zip(aux, ens["selected_mask"]) if m],
                      "greedy": None if ens["greedy"] is None else {
                          k: v for k, v in ens["greedy"].items() if k != "mask"},
                      "surrogate": ens["surrogate"]},
        "verification": rows,
        "C_sensitivity_post_hoc": sensitivity,
    }


ESTIMATORS_NOTE = (
    "error_of_change = sum (est-true)^2 / sum (true - L(theta*))^2 over all verified subsets of all seeds "
    "(L(theta*) of each row's seed; 1 = no better than predicting no change); spearman / kendall of "
    "estimated vs true losses within each seed, averaged over seeds; intervals: 95% percentile bootstrap over "
    "the verified subsets (n_boot resamples). Estimators: gradex_linearised = L-hat(S), the linearised model "
    "f(theta*)+<grad f, Pi w_S>; gradex_model_at_delta = the real model at theta*+Pi w_S; no_finetune = "
    "theta*'s loss; loo_mean = mean of the other verified subsets of the seed; ridge_indicators_loo / "
    "ridge_size_loo = ridge regression of the true loss on the subset's task indicators / on its number of "
    "tasks, fitted on the other verified subsets of the seed (leave-one-out; lambda from baseline_lambdas by an "
    "inner leave-one-out on those rows only); ridge_indicators_<k> = the indicator ridge fitted on only k "
    "other verified subsets of the seed (interleaved folds of the subsets ordered by the estimate; each fold "
    "predicted by the fit on the next fold; lambda by leave-one-out inside it). level_ratio = sum (est-true)^2 / sum true^2, the paper's figure: "
    "dominated by the loss level all subsets share (compare no_finetune's).")


def _per_seed_loo(fn, rows: list[dict], seeds: np.ndarray, *args) -> np.ndarray:
    out = np.empty(len(rows))
    for s in np.unique(seeds):
        idx = np.flatnonzero(seeds == s)
        out[idx] = fn([rows[i] for i in idx], *args)
    return out


def _loo_mean(rows):
    return gx.leave_one_out_mean([r["true_logistic"] for r in rows])


def _loo_ridge(rows, lambdas, size_only: bool):
    X = np.array([r["mask"] for r in rows], np.float64)
    X = X.sum(1, keepdims=True) if size_only else X
    return gx.leave_one_out_ridge(X, [r["true_logistic"] for r in rows], lambdas)


def _few_ridge(rows, lambdas, n_fit: int):
    X = np.array([r["mask"] for r in rows], np.float64)
    return gx.few_fit_ridge(X, [r["true_logistic"] for r in rows], n_fit, lambdas)


def honest_tables(rows: list[dict], base: dict[int, dict], lambdas, n_boot: int, n_few: int) -> dict:
    """The estimators' honest figures (:func:`ntk_jax.selection.gradex.estimator_metrics`) over
    every verified row of every seed, and the diagnostics of why an estimate fails."""
    seeds = np.array([r["seed"] for r in rows])
    col = lambda k: np.array([np.nan if r[k] is None else r[k] for r in rows], np.float64)  # noqa: E731
    true, b = col("true_logistic"), np.array([base[s]["logistic"] for s in seeds])
    estimators = {"gradex_linearised": col("linearised_logistic"),
                  "gradex_model_at_delta": col("model_at_delta_logistic"),
                  "no_finetune": b, "loo_mean": _per_seed_loo(_loo_mean, rows, seeds),
                  "ridge_indicators_loo": _per_seed_loo(_loo_ridge, rows, seeds, lambdas, False),
                  "ridge_size_loo": _per_seed_loo(_loo_ridge, rows, seeds, lambdas, True),
                  f"ridge_indicators_{n_few}": _per_seed_loo(_few_ridge, rows, seeds, lambdas, n_few)}
    metrics = functools.partial(gx.estimator_metrics, group=seeds, n_boot=n_boot)
    table = {name: metrics(est, true, b) for name, est in estimators.items()}
    b_ce = np.array([base[s]["ce"] for s in seeds])
    dist = col("distance")
    diagnostics = {
        "first_order_at_true_displacement": metrics(col("first_order_at_true_logistic"), true, b),
        "fit_vs_first_order_at_true": gx.change_error(col("linearised_logistic"), col("first_order_at_true_logistic"), b),
        **({"first_order_in_subspace": metrics(col("first_order_in_subspace_logistic"), true, b),
            "subspace_norm_share_median": float(np.median(col("subspace_norm_share")))}
           if "first_order_in_subspace_logistic" in rows[0] else {}),
        "model_at_delta_ce": metrics(col("model_at_delta_ce"), col("true_ce"), b_ce),
        "distance": {"min": float(dist.min()), "median": float(np.median(dist)), "max": float(dist.max())},
        "delta_norm_median": float(np.median(col("delta_norm"))),
        "cos_delta_fit_vs_true_median": float(np.nanmedian(col("cos_delta_fit_vs_true"))),
        "spearman_distance_vs_abs_error": spearman(dist, np.abs(col("linearised_logistic") - true)),
        "notes": ("first_order_at_true_displacement: the model linearised at theta* moved by the real fine-tune's "
                  "theta_S - theta* (exact JVP, no projection): its error is the linearisation's own at that "
                  "distance; fit_vs_first_order_at_true: sum (L-hat - that)^2 / sum (true - L(theta*))^2, what the "
                  "logistic fit's Delta_S loses against the real displacement; cos_delta: cosine of Pi w_S and "
                  "theta_S - theta*; first_order_in_subspace: the first-order loss at the least-squares projection of "
                  "theta_S - theta* onto the fit's d-dim subspace (range of Pi), subspace_norm_share its share of the norm"),
    }
    return {"n_verified": len(rows), "n_per_seed": {str(s): int((seeds == s).sum()) for s in np.unique(seeds)},
            "estimators": table, "diagnostics": diagnostics, "notes": ESTIMATORS_NOTE}


def _selection_summary(per_seed: list[dict]) -> dict | None:
    checks = [r["selection"]["check"] for r in per_seed if r["selection"]["check"]]
    if not checks:
        return None
    out = {}
    for name in ("selected", "greedy", "all_tasks"):
        vals = [ch[name]["true_logistic"] for ch in checks if name in ch]
        if vals:
            out[name] = {"mean": float(np.mean(vals)), "per_seed": vals}
    rand = [float(np.mean([x["true_logistic"] for x in ch["random"]])) for ch in checks]
    out["random_same_size"] = {"mean": float(np.mean(rand)), "per_seed": rand,
                               "n_per_seed": len(checks[0]["random"])}
    out["no_finetune"] = {"mean": float(np.mean([r["theta_star_target"]["logistic"] for r in per_seed]))}
    return out


def job_report(c, ctx, per_seed: list[dict]) -> dict:
    rows = [row for r in per_seed for row in r["verification"]]
    honest = honest_tables(rows, {r["seed"]: r["theta_star_target"] for r in per_seed},
                           list(c.baseline_lambdas), int(c.n_boot), int(c.baseline_few))
    est = honest["estimators"]
    g = est["gradex_linearised"]
    trivial = [k for k in est if not k.startswith("gradex")]
    best_err = min(v["error_of_change"]["value"] for k, v in est.items() if k in trivial)
    best_rho = max((est[k]["spearman"]["value"] or -1.0) for k in trivial if k.startswith("ridge"))
    target = {"spearman_ge_0.8": (g["spearman"]["value"] or -1) >= 0.8,
              "error_of_change_le_0.3": g["error_of_change"]["value"] <= 0.3,
              "beats_every_trivial_error": g["error_of_change"]["value"] < best_err,
              "beats_every_trivial_spearman": (g["spearman"]["value"] or -1) > best_rho}
    target["met"] = all(target.values())
    return {"experiment": "gradex",
            "setup": {"target": str(c.target), "aux_tasks": list(c.aux_tasks), "seeds": [r["seed"] for r in per_seed],
                      "n_train_per_task": int(c.n_train_per_task), "n_target_eval": int(c.n_target_eval),
                      "n_target_train": int(c.n_target_train), "lora": dict(c.lora),
                      "meta_train": dict(c.meta_train), "finetune": dict(c.finetune),
                      "projection": {"dim": int(c.projection_dim), "type": str(c.projection_type),
                                     "kind": str(c.projection_kind)},
                      "C_per_seed": [r["C"] for r in per_seed], "n_subsets": int(c.n_subsets),
                      "n_verify": int(c.n_verify), "model": ctx.info},
            "honest": honest, "target": target, "selection": _selection_summary(per_seed), "per_seed": per_seed}


def _timing_report(rows, feature_time: float, ens: dict, meta_info: dict, calibration: dict | None) -> dict:
    ft = np.array([r["finetune_time_s"] for r in rows])
    fit = np.array([e["fit_time_s"] for e in ens["rows"].values()])
    at_delta = np.array([e["model_at_delta_time_s"] for e in ens["rows"].values()])
    calib = float(np.sum(calibration["finetune_times_s"])) if calibration else 0.0
    all_estimates = feature_time + calib + float(np.sum(fit))
    per_ft = float(np.median(ft))
    return {"meta_init_s": meta_info["time_s"], "features_s": feature_time, "calibration_finetunes_s": calib,
            "fit_per_subset_s": float(np.mean(fit)), "model_at_delta_per_subset_s": float(np.mean(at_delta)),
            "finetune_per_subset_s_median": per_ft, "n_distinct_ensemble_subsets": len(fit),
            "all_estimates_s": all_estimates, "retrain_all_ensemble_s_extrapolated": per_ft * len(fit),
            "speedup_ensemble": per_ft * len(fit) / all_estimates,
            "notes": ("all_estimates_s = features + calibration fine-tunes + one logistic fit per distinct ensemble "
                      "subset; retraining them is extrapolated from the median verification fine-tune time. The "
                      "meta-initialisation is shared by both and excluded. Wall-clock on the job's machine.")}


def _fmt(m: dict) -> str:
    v, lo, hi = m["value"], m["low"], m["high"]
    if v is None:
        return "undefined"
    return f"{v:.3g} [{lo:.3g}, {hi:.3g}]" if lo is not None else f"{v:.3g}"


def summary(report: dict) -> dict:
    h = report["honest"]
    out = {"n_verified": h["n_verified"], "seeds": report["setup"]["seeds"]}
    for name, m in h["estimators"].items():
        out[name] = {"error_of_change": _fmt(m["error_of_change"]), "spearman": _fmt(m["spearman"]),
                     "kendall": _fmt(m["kendall"]), "level_ratio (paper's, level-dominated)": round(m["level_ratio"], 4)}
    out["target_met"] = report["target"]["met"]
    out["median_distance"] = round(h["diagnostics"]["distance"]["median"], 4)
    out["speedup_ensemble"] = round(float(np.mean([r["timing"]["speedup_ensemble"] for r in report["per_seed"]])), 2)
    sel = report["selection"]
    if sel:
        out["selection_true_logistic"] = {k: round(v["mean"], 4) for k, v in sel.items()}
    return out


def plot(report: dict, path: str) -> str:
    """Estimated vs true target loss per seed (linearised and model at θ*+Δ), the error of
    the change of every estimator with its interval, and |est − true| against ‖θ_S − θ*‖."""
    rows = [r for s in report["per_seed"] for r in s["verification"]]
    base = {s["seed"]: s["theta_star_target"]["logistic"] for s in report["per_seed"]}
    fig, ax = subplots(3, width=4.4)
    for s in sorted(base):
        rs = [r for r in rows if r["seed"] == s]
        ax[0].plot([r["true_logistic"] for r in rs], [r["linearised_logistic"] for r in rs], "o", ms=4,
                   label=f"seed {s}: L̂ (θ* {base[s]:.3g})")
        ax[0].plot([r["true_logistic"] for r in rs], [r["model_at_delta_logistic"] for r in rs], "x", ms=4,
                   color=ax[0].lines[-1].get_color())
    vals = [r[k] for r in rows for k in ("true_logistic", "linearised_logistic", "model_at_delta_logistic")]
    ax[0].plot([min(vals), max(vals)], [min(vals), max(vals)], "--", color="gray")
    ax[0].set(title="target logistic loss (o: linearised, x: model at θ*+Δ)", xlabel="true (fine-tuned)",
              ylabel="estimated")
    ax[0].legend(fontsize=6)
    est = report["honest"]["estimators"]
    names = list(est)
    errs = [est[n]["error_of_change"] for n in names]
    ax[1].barh(range(len(names)), [e["value"] for e in errs],
               xerr=np.array([[e["value"] - (e["low"] or e["value"]), (e["high"] or e["value"]) - e["value"]]
                              for e in errs]).T,
               color=["tab:blue" if n.startswith("gradex") else "tab:gray" for n in names])
    ax[1].set_yticks(range(len(names)), names, fontsize=7)
    ax[1].axvline(1.0, color="k", lw=0.6, ls=":")
    ax[1].set(title="error of the change (95% bootstrap)", xlabel="Σ(est−true)² / Σ(true−θ*)²")
    ax[2].plot([r["distance"] for r in rows], [abs(r["linearised_logistic"] - r["true_logistic"]) for r in rows],
               "o", ms=4, label="|L̂ − true|")
    ax[2].plot([r["distance"] for r in rows], [abs(r["true_logistic"] - base[r["seed"]]) for r in rows],
               ".", color="gray", label="|true − θ*| (the effect)")
    ax[2].set(title="error vs distance moved", xlabel="‖θ_S − θ*‖ (real fine-tune)", ylabel="target logistic")
    ax[2].legend(fontsize=6)
    return save(fig, path)
