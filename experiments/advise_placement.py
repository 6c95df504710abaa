"""docs/theory.md §6.8 — the LoRA placement advisor: rank candidate placements (targets × layers ×
rank) by a predictor computed from the eNTK at initialisation and the training labels, before
any fine-tuning; optionally validate the ranking against real fine-tunes over seeds.

Per seed (``advise_placement.seeds`` when ``validate``, else the job's seed) and placement: the
exact traced eNTK at θ_0 (:func:`advise`) on ``n_kernel`` training inputs followed by ``n_kernel_test``
held-out inputs (the kernel of :mod:`experiments.spectrum`, from one model per LoRA rank adapted
at the union of the placements' sites, split by leaf), and every predictor of
:data:`ntk_jax.kernels.placement.PREDICTORS` (κ, λmax, tr K, effective rank, kernel–target
alignment, the risk R, the linearised model's train / held-out loss after the job's schedule,
MSE and cross-entropy), plus the trivial baseline "more LoRA parameters is better". With
``validate`` every placement is then fine-tuned (the job's ``train`` settings) and evaluated;
each fine-tune and each seed's advice is one shard under ``shards/`` (a killed run resumes from
them; a shard written with other settings is refused). Report: the ranking by ``predictor``,
the advisor's time against fine-tuning every placement, and (validated) per predictor the
Spearman with the fine-tuned eval loss (and accuracy) with bootstrap intervals over
placements, the per-seed values, and the regret of the top-ranked placement.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from experiments.model_tasks import Split, make_model_task
from experiments.plotting import save, subplots
from experiments.spectrum import placement_label, placement_lora
from ntk_jax.kernels.checks import check_finite
from ntk_jax.kernels.contract import output_size
from ntk_jax.kernels.placement import PREDICTORS, leaf_kernels, placement_predictors
from ntk_jax.models.lora import _check_targets, lora_config, lora_filter
from ntk_jax.models.subset import ParamSubset, param_subset
from ntk_jax.stats import bootstrap_interval, spearman
from ntk_jax.training.trainer import TrainConfig, finetune_train_config, make_schedule, train
from ntk_jax.utils import progress, read_json, to_jsonable, write_json


def config() -> ml_collections.ConfigDict:
    """docs/theory.md §6.8: rank LoRA placements by a predictor from the eNTK at θ_0, optionally
    validated against real fine-tunes (experiments/advise_placement.py)."""
    return ml_collections.ConfigDict(dict(
        task="sentiment_flipped",   # two-label task (lm backend; the lexicon for classification)
        # candidate placements: plain dicts {'targets', 'layers'[, 'rank']}, as spectrum.placements
        placements=tuple(dict(targets=t, layers=l) for t in (("q_proj", "v_proj"), ("k_proj",))
                         for l in ((0,), (0, 1, 2))),
        predictor="lin_eval_loss_ce",  # a name of ntk_jax.kernels.placement.PREDICTORS (or num_params)
        n_kernel=32,                # training inputs of the kernel
        n_kernel_test=32,           # held-out inputs of the test-train kernel
        sigma=1e-4,                 # ridge of κ and R
        # traced kernel over O outputs from k random ±1 output probes (unbiased; k VJPs instead of
        # O); 0 or k >= O: exact
        output_probes=8,
        lora=lora_config(),
        train=finetune_train_config(total_steps=60),  # the fine-tuning job the advice is for
        validate=False,             # also fine-tune every placement over seeds and rank-correlate
        seeds=(0, 1, 2),            # validation seeds (without validate: the job's seed)
        n_train=256,
        n_eval=256,
        n_boot=1000,                # bootstrap draws over placements
    ))

# the trivial baseline ranked beside the kernel predictors: more trained parameters, lower loss
BASELINES = {"num_params": -1}
PLACEMENT_KEYS = ("targets", "layers", "rank")


def check_placements(placements) -> list[dict]:
    """The candidate placements as plain dicts ``{"targets", "layers"[, "rank"]}``; ValueError on
    an empty list, an unknown key, or empty targets / layers."""
    placements = list(placements or ())
    if not placements:
        raise ValueError("advise_placement.placements is empty: list at least two candidate placements, "
                         "e.g. ({'targets': ('q_proj',), 'layers': (0,)}, ...)")
    out = []
    for i, p in enumerate(placements):
        p = dict(p)
        unknown = set(p) - set(PLACEMENT_KEYS)
        if unknown or not p.get("targets") or not p.get("layers"):
            raise ValueError(f"placement {i} ({p}) must have non-empty 'targets' and 'layers' and at most "
                             f"the keys {PLACEMENT_KEYS}; unknown keys: {sorted(unknown)}")
        out.append({k: (tuple(v) if k != "rank" else int(v)) for k, v in p.items() if v is not None})
    return out


def _schedule(train_cfg: TrainConfig) -> np.ndarray:
    """The job's step sizes ``(T,)`` (warm-up and decay included)."""
    sched = make_schedule(train_cfg)
    return np.array([float(sched(k)) for k in range(int(train_cfg.total_steps))])


def _kernel_inputs(mtask, splits) -> dict:
    """The kernel's inputs: the ``kernel`` split followed by the held-out ``probe`` split."""
    a, b = splits["kernel"].arrays, splits["probe"].arrays
    return mtask.kernel_inputs(Split({k: np.concatenate([a[k], b[k]]) for k in mtask.KERNEL_KEYS}))


def union_lora(loras: list):
    """One LoRA config adapting every site of ``loras`` (all of one rank): the union of their
    targets and layers."""
    targets = tuple(sorted({t for lo in loras for t in lo.targets}))
    layers = None if any(lo.layers is None for lo in loras) else tuple(sorted({i for lo in loras for i in lo.layers}))
    return dataclasses.replace(loras[0], targets=targets, layers=layers)


def placement_kernel(leaf_K, lora) -> np.ndarray:
    """The traced eNTK of one placement from the per-leaf kernels of a model adapted at a superset
    of its sites: its LoRA leaves (targets × layers) plus every non-LoRA leaf (a trained head)."""
    select = lora_filter(lora.layers, lora.targets)
    probe = nnx.LoRAParam(np.zeros(()))
    total = None
    for path, K in jax.tree_util.tree_flatten_with_path(leaf_K)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        if "lora" not in keys or select(keys, probe):
            total = np.asarray(K, np.float64) if total is None else total + np.asarray(K, np.float64)
    return total


def advise(mtask, splits, loras, c, train_cfg) -> dict:
    """Every predictor for every placement (one seed), and the time it took. The kernels come
    from one model per LoRA rank, adapted at the union of the sites of that rank's placements:
    with B = 0 at init the other sites' adapters leave the outputs unchanged, so a placement's
    kernel is the sum of its sites' per-leaf kernels (:func:`ntk_jax.kernels.placement.leaf_kernels`;
    with ``output_probes`` k < O outputs, its unbiased k-probe estimate). The union model draws
    its own A factors: the same distribution as a fine-tune's init, not the same values."""
    if any(lo.b_init_std for lo in loras):
        raise ValueError("the advisor's union kernel needs B = 0 at init (lora.b_init_std = 0): with "
                         "B != 0 every adapted site changes the others' gradients")
    t0 = time.time()
    x = _kernel_inputs(mtask, splits)
    y = np.concatenate([mtask.binary_targets(splits["kernel"]), mtask.binary_targets(splits["probe"])])
    lrs = _schedule(train_cfg)
    rows = [None] * len(loras)
    for rank in progress(sorted({lo.rank for lo in loras}), desc="advisor (one model per rank)"):
        idx = [i for i, lo in enumerate(loras) if lo.rank == rank]
        subset = param_subset(mtask.load_model(union_lora([loras[i] for i in idx])), mtask.wrt)
        O = output_size(mtask.output_fn(subset), subset.params, x)
        probes = _probes(int(c.output_probes), O, mtask.ctx.seed)
        leaf_K = _leaf_program(mtask, subset, O, probes is None)(subset.params, subset._template,
                                                                   subset.frozen, x, probes)
        for i in idx:
            K = check_finite(placement_kernel(leaf_K, loras[i]), "eNTK")
            row = placement_predictors(K, y, splits["kernel"].n, sigma=float(c.sigma), lr=lrs, output_dim=O)
            rows[i] = {**row, "num_params": _num_params(subset.params, loras[i])}
    return {"rows": rows, "advisor_s": time.time() - t0}


_PROGRAMS: dict = {}


def _leaf_program(mtask, subset, O: int, exact: bool):
    """The jitted ``leaf_kernels`` of ``subset``'s model structure, compiled once per (mtask,
    structure, O) and shared across seeds: the frozen weights and template are arguments (as in
    :func:`experiments.stability.probe_programs`)."""
    key = (type(mtask), subset.graphdef, int(O), exact)
    if key not in _PROGRAMS:
        graphdef, output_fn = subset.graphdef, mtask.output_fn

        @jax.jit
        def program(params, template, frozen, x, probes):
            f = output_fn(ParamSubset(graphdef, None, frozen, template))
            return leaf_kernels(f, params, x, int(O), probes=probes)
        _PROGRAMS[key] = program
    return _PROGRAMS[key]


def _probes(k: int, O: int, seed: int):
    """``k`` Rademacher output probes ``(k, O)`` (the estimated traced kernel), or ``None`` (the
    exact one) when ``k`` is 0 or ``k >= O``."""
    if k <= 0 or k >= O:
        return None
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=(k, O)).astype(np.float32)


def _num_params(params, lora) -> int:
    """Trained parameters of one placement: its LoRA factors plus every non-LoRA leaf (a head)."""
    return int(sum(placement_kernel(jax.tree.map(lambda v: np.full((1, 1), float(np.size(v))), params), lora)[0]))


def finetune(mtask, splits, lora, train_cfg) -> dict:
    """Fine-tune one placement from θ_0 and evaluate it on the ``eval`` split."""
    t0 = time.time()
    model = mtask.load_model(lora)
    result = train(model, splits["train"].arrays, train_cfg, wrt=mtask.wrt, loss_fn=mtask.loss_fn)
    after = mtask.evaluate(model, splits["eval"])
    losses = [h["loss"] for h in result.history if "loss" in h]
    return {"eval_loss": after["loss"], "eval_accuracy": after.get("accuracy"),
            "train_loss_final": float(np.mean(losses[-3:])), "finetune_s": time.time() - t0}


def _settings(config) -> dict:
    """What a shard's contents depend on (a resumed shard must have been written with these)."""
    c = config.advise_placement.to_dict()
    for k in ("seeds", "predictor", "validate", "n_boot"):
        c.pop(k, None)
    return json.loads(json.dumps(to_jsonable({"advise_placement": c, "model": config.model.to_dict(),
                                              "lexicon": config.lexicon.to_dict()}), sort_keys=True))


def shard(path: str, meta: dict, compute):
    """``compute()``'s result, cached at ``path`` with ``meta``; refuses a shard with other meta."""
    meta = json.loads(json.dumps(to_jsonable(meta)))  # compared as report.json holds it
    if os.path.exists(path):
        saved = read_json(path)
        if saved["meta"] != meta:
            raise ValueError(f"{path} was written with other settings; delete it (or use another workdir) "
                             f"to recompute it. Saved: {saved['meta']}; now: {meta}")
        return saved["result"]
    result = json.loads(json.dumps(to_jsonable(compute())))
    write_json(path, {"meta": meta, "result": result})
    return result


def _run_seed(config, ctx, seed: int, placements, out_dir: str) -> dict:
    """One seed: the advice and (``validate``) the fine-tunes, each through its shard."""
    c = config.advise_placement
    sctx = dataclasses.replace(ctx, seed=int(seed))
    mtask = make_model_task(config, sctx)
    splits = mtask.splits({"kernel": c.n_kernel, "probe": c.n_kernel_test, "train": c.n_train,
                             "eval": c.n_eval}, c.task)
    train_cfg = TrainConfig.from_dict({**dict(c.train), "seed": int(seed)})
    loras = [placement_lora(c.lora, p) for p in placements]
    model = mtask.load_model(loras[0])
    for lora in loras:  # every placement's targets / layers exist, before any work
        _check_targets(model, lora.targets, lora.layers)
    meta = {"seed": int(seed), "settings": _settings(config)}
    d = os.path.join(out_dir, "shards", f"seed{int(seed)}")
    adv = shard(os.path.join(d, "advisor.json"), meta, lambda: advise(mtask, splits, loras, c, train_cfg))
    fts = []
    if c.validate:
        for i, lora in enumerate(progress(loras, desc=f"fine-tunes seed {seed}")):
            fts.append(shard(os.path.join(d, f"finetune_{i:03d}.json"), {**meta, "placement": placements[i]},
                             lambda lora=lora: finetune(mtask, splits, lora, train_cfg)))
    return {"seed": int(seed), **adv, "finetunes": fts, "split_sizes": mtask.describe()["split_sizes"]}


def _ranks(values: np.ndarray, sign: int) -> np.ndarray:
    """0-based ranks of the placements by predicted quality (0 = best) for one seed."""
    order = np.argsort(sign * values, kind="stable")  # sign +1: low is good (a loss); -1: high is good
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def ranking(seeds: list[dict], placements, predictor: str) -> list[dict]:
    """Placements ordered by the predictor's mean rank over the seeds (best first)."""
    sign = {**PREDICTORS, **BASELINES}[predictor]
    if not sign:
        raise ValueError(f"predictor {predictor!r} has no predicted sign; choose one of "
                         f"{sorted(k for k, v in {**PREDICTORS, **BASELINES}.items() if v)}")
    ranks = np.mean([_ranks(np.array([r[predictor] for r in s["rows"]]), sign) for s in seeds], axis=0)
    values = np.mean([[r[predictor] for r in s["rows"]] for s in seeds], axis=0)
    order = np.argsort(ranks, kind="stable")
    return [{"placement": placements[i], "label": placement_label(placements[i]),
             "mean_rank": float(ranks[i]), predictor: float(values[i])} for i in order]


def _stat(pred_ranks: np.ndarray, outcome: np.ndarray, n_boot: int) -> dict:
    """Spearman of the seed-mean predicted rank with the seed-mean outcome, bootstrapped over
    placements."""
    return bootstrap_interval(spearman, pred_ranks, outcome, n_boot=n_boot, seed=0)


def validation(seeds: list[dict], n_boot: int) -> dict:
    """Per predictor: Spearman of its ranking (mean rank over seeds; rank 0 = predicted best)
    with the seed-mean fine-tuned eval loss (and accuracy), its bootstrap interval over
    placements, the per-seed values, and the regret of the top-ranked placement."""
    loss = np.mean([[f["eval_loss"] for f in s["finetunes"]] for s in seeds], axis=0)
    acc = None
    if seeds[0]["finetunes"][0].get("eval_accuracy") is not None:
        acc = np.mean([[f["eval_accuracy"] for f in s["finetunes"]] for s in seeds], axis=0)
    out = {}
    for name, sign in {**PREDICTORS, **BASELINES}.items():
        per_seed = [np.array([r[name] for r in s["rows"]]) for s in seeds]
        # rank 0 = predicted best; for a predictor without a sign, rank by its value ascending
        ranks = [_ranks(v, sign or 1) for v in per_seed]
        mean_rank = np.mean(ranks, axis=0)
        own = [spearman(v, [f["eval_loss"] for f in s["finetunes"]]) for v, s in zip(per_seed, seeds)]
        top = [int(np.argmin(r)) for r in ranks]
        entry = {"theory_sign_vs_loss": sign,
                 # the predicted ranking vs the loss (sign removed: > 0 means it orders as theory says)
                 "spearman_rank_vs_eval_loss": _stat(mean_rank, loss, n_boot),
                 "spearman_value_vs_eval_loss_per_seed": own,
                 "regret_eval_loss": float(np.mean([loss[t] - loss.min() for t in top]))}
        rho = entry["spearman_rank_vs_eval_loss"]["value"]
        # the predictor's own Spearman with the loss (value vs loss) is sign·ρ(rank, loss)
        entry["spearman_value_vs_eval_loss"] = None if rho is None else (sign or 1) * rho
        # the target: |Spearman| >= 0.8 in the sign the predictor's theory predicts
        entry["meets_target"] = bool(sign and rho is not None and rho >= 0.8)
        if acc is not None:
            entry["spearman_rank_vs_eval_accuracy"] = _stat(mean_rank, acc, n_boot)
            entry["regret_eval_accuracy"] = float(np.mean([acc.max() - acc[t] for t in top]))
        out[name] = entry
    baseline = {"random_placement_regret_eval_loss": float(loss.mean() - loss.min())}
    if acc is not None:
        baseline["random_placement_regret_eval_accuracy"] = float(acc.max() - acc.mean())
    return {"predictors": out, "baseline": baseline, "eval_loss_mean": loss.tolist(),
            "eval_accuracy_mean": None if acc is None else acc.tolist(),
            "eval_loss_range": [float(loss.min()), float(loss.max())]}


def _timing(seeds: list[dict], validate: bool) -> dict:
    adv = [s["advisor_s"] for s in seeds]
    out = {"advisor_s_per_seed": adv, "advisor_s": float(np.mean(adv))}
    if validate:
        ft = [sum(f["finetune_s"] for f in s["finetunes"]) for s in seeds]
        out.update(finetune_all_s_per_seed=ft, finetune_all_s=float(np.mean(ft)),
                   advisor_over_finetune_all=float(np.mean(adv) / np.mean(ft)))
        out["within_one_fifth"] = out["advisor_over_finetune_all"] <= 0.2
    return out


def _how_validated(c, validate: bool, n_seeds: int, n_placements: int) -> str:
    if not validate:
        return ("Not validated in this run (advise_placement.validate=False). The predictors were "
                "validated against real fine-tunes of >= 12 placements x 3 seeds on the toy decoder "
                "and on all-MiniLM-L6-v2: docs/validation.md, section 'The LoRA placement advisor' "
                "(configs/advise_placement.py, configs/advise_placement_minilm.py with validate=True).")
    return (f"This run fine-tuned all {n_placements} placements from θ_0 for {int(c.train.total_steps)} "
            f"steps (lr {float(c.train.learning_rate)}, batch {int(c.train.batch_size)}) over {n_seeds} "
            f"seed(s) (seed: data splits, LoRA/head init, batch order) and evaluated each on "
            f"{int(c.n_eval)} held-out examples. Per predictor: Spearman of its ranking (mean rank "
            "over seeds) with the seed-mean eval loss and accuracy, percentile bootstrap over "
            f"placements ({int(c.n_boot)} draws), per-seed Spearman, and the regret of each seed's "
            "top-ranked placement against the best placement (trivial baseline: a random placement, "
            "and 'more LoRA parameters').")


def run(config, out_dir: str, ctx) -> dict:
    c = config.advise_placement
    placements = check_placements(c.placements)
    if c.predictor not in {**PREDICTORS, **BASELINES}:
        raise ValueError(f"unknown advise_placement.predictor {c.predictor!r}; one of "
                         f"{sorted({**PREDICTORS, **BASELINES})}")
    validate = bool(c.validate)
    seed_list = [int(s) for s in c.seeds] if validate else [int(ctx.seed)]
    seeds = [_run_seed(config, ctx, s, placements, out_dir) for s in seed_list]
    placements = json.loads(json.dumps(placements))  # as report.json holds them (lists)
    report = {
        "experiment": "advise_placement",
        "setup": {"task": c.task, "n_kernel": c.n_kernel, "n_kernel_test": c.n_kernel_test, "sigma": c.sigma,
                  "lora": dict(c.lora), "train": dict(c.train), "seeds": seed_list, "model": ctx.info,
                  "mtask": make_model_task(config, ctx).describe() | {"split_sizes": seeds[0]["split_sizes"]},
                  "linearised_model": ("per-output kernel tr Θ/O, f_0 = 0, full-batch GD with the job's "
                                       "schedule η_k (docs/theory.md §6.8)")},
        "predictor": c.predictor,
        "ranking": ranking(seeds, placements, c.predictor),
        "placements": [{"placement": p, **{k: [s["rows"][i][k] for s in seeds] for k in seeds[0]["rows"][i]},
                        **({"eval_loss": [s["finetunes"][i]["eval_loss"] for s in seeds],
                            "eval_accuracy": [s["finetunes"][i]["eval_accuracy"] for s in seeds]} if validate else {})}
                       for i, p in enumerate(placements)],
        "timing": _timing(seeds, validate),
        "how_validated": _how_validated(c, validate, len(seed_list), len(placements)),
    }
    if validate:
        report["validation"] = validation(seeds, int(c.n_boot))
        with open(os.path.join(out_dir, "table.md"), "w") as fh:
            fh.write(table_md(report))
        report["table"] = "table.md"
    report["plots"] = [plot(report, os.path.join(out_dir, "advise_placement.png"))]
    return report


def _fmt(b: dict, sign: int = 1) -> str:
    if b["value"] is None:
        return "–"
    if b["low"] is None:
        return f"{sign * b['value']:+.2f}"
    lo, hi = sorted((sign * b["low"], sign * b["high"]))
    return f"{sign * b['value']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def table_md(report: dict) -> str:
    """The validation as a markdown table: per predictor its Spearman with the eval loss (value vs
    loss, 95 % bootstrap interval over placements; and with accuracy), the per-seed values, the
    regret of its top-ranked placement, and the trivial baselines."""
    v = report["validation"]
    has_acc = v["eval_accuracy_mean"] is not None
    head = ("| predictor | theory sign vs loss | Spearman(value, eval loss) [95 % CI] | per seed |"
            + (" Spearman(value, eval acc) [95 % CI] |" if has_acc else "") + " regret (eval loss)"
            + (" / (acc)" if has_acc else "") + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, e in v["predictors"].items():
        s = e["theory_sign_vs_loss"]
        per = ", ".join("–" if r is None else f"{r:+.2f}" for r in e["spearman_value_vs_eval_loss_per_seed"])
        sign = "+" if s > 0 else "−" if s < 0 else "none"
        row = f"| {name} | {sign} | {_fmt(e['spearman_rank_vs_eval_loss'], s or 1)} | {per} |"
        if has_acc:
            row += f" {_fmt(e['spearman_rank_vs_eval_accuracy'], s or 1)} |"
        row += f" {e['regret_eval_loss']:.3f}" + (f" / {e['regret_eval_accuracy']:.3f}" if has_acc else "") + " |"
        lines.append(row)
    b = v["baseline"]
    lines.append(f"| random placement (expected) | | | | " + ("| " if has_acc else "")
                 + f"{b['random_placement_regret_eval_loss']:.3f}"
                 + (f" / {b['random_placement_regret_eval_accuracy']:.3f}" if has_acc else "") + " |")
    t = report["timing"]
    lines.append(f"\nAdvisor {t['advisor_s']:.0f} s per seed vs fine-tuning all placements "
                 f"{t['finetune_all_s']:.0f} s per seed (ratio {t['advisor_over_finetune_all']:.3f}); "
                 f"eval loss range {v['eval_loss_range'][0]:.3f}–{v['eval_loss_range'][1]:.3f}.\n")
    return "\n".join(lines) + "\n"


def summary(report: dict) -> dict:
    out = {"predictor": report["predictor"], "best": report["ranking"][0]["label"],
           "advisor_s": round(report["timing"]["advisor_s"], 1)}
    if "validation" in report:
        v = report["validation"]["predictors"]
        out["spearman_vs_eval_loss"] = {k: None if e["spearman_value_vs_eval_loss"] is None
                                        else round(e["spearman_value_vs_eval_loss"], 2) for k, e in v.items()}
        out["advisor_over_finetune_all"] = round(report["timing"]["advisor_over_finetune_all"], 3)
    return out


def plot(report: dict, path: str) -> str:
    """Left: the chosen predictor's ranking (mean rank; with validation, against the eval loss).
    Right (validated): Spearman of each predictor's value with the eval loss, 95 % interval."""
    fig, ax = subplots(2 if "validation" in report else 1, width=5.0)
    name = report["predictor"]
    labels = [r["label"] for r in report["ranking"]]
    if "validation" not in report:
        ax[0].barh(labels[::-1], [r["mean_rank"] for r in report["ranking"]][::-1])
        ax[0].set(title=f"advice by {name} (0 = best)", xlabel="mean rank")
        return save(fig, path)
    v = report["validation"]
    loss = np.array(v["eval_loss_mean"])
    by_label = {placement_label(p["placement"]): i for i, p in enumerate(report["placements"])}
    ranks = [r["mean_rank"] for r in report["ranking"]]
    ax[0].plot(ranks, [loss[by_label[lab]] for lab in labels], "o")
    for rk, lab in zip(ranks, labels):
        ax[0].annotate(lab, (rk, loss[by_label[lab]]), fontsize=6)
    rho = v["predictors"][name]["spearman_rank_vs_eval_loss"]["value"]
    ax[0].set(title=f"{name}: predicted rank vs eval loss (ρ={rho:.2f})", xlabel="mean predicted rank",
              ylabel="fine-tuned eval loss (seed mean)")
    names = list(v["predictors"])
    for j, k in enumerate(names):
        e = v["predictors"][k]
        s = e["theory_sign_vs_loss"] or 1
        b = e["spearman_rank_vs_eval_loss"]
        if b["value"] is None:
            continue
        lo, hi = (s * b["low"], s * b["high"]) if b["low"] is not None else (s * b["value"],) * 2
        ax[1].errorbar(s * b["value"], j, xerr=[[s * b["value"] - min(lo, hi)], [max(lo, hi) - s * b["value"]]],
                       fmt="o", color="C2" if e["theory_sign_vs_loss"] and b["value"] > 0 else "C3")
    ax[1].axvline(0, color="k", lw=0.5)
    ax[1].set_yticks(range(len(names)), names, fontsize=7)
    ax[1].set(title="Spearman(predictor, eval loss), 95 % CI", xlabel="ρ (green: theory's sign)", xlim=(-1.05, 1.05))
    return save(fig, path)
