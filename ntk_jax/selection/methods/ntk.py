"""NTK-Selector (docs/theory.md §6.1) and its score variants (docs/theory.md §6.5); the math is in
:mod:`ntk_jax.selection.ntk_selector` and :mod:`ntk_jax.kernels.features`.

A staged pipeline (docs/theory.md §6.7), every stage in resumable shards and timed:

0. the parameter points — the fresh LoRA factors θ_0 and, where a stage needs it, the LoRA
   warm-up on the domain set θ_w (``select.warmup``; resumable);
1. a cheap stage over the whole pool (``filter``): ``"knn"`` — each domain record votes for
   its ``knn_k`` nearest pool records by cosine of the warm-up model's mean hidden states (the
   paper's coarse filter; one forward pass per candidate); ``"loss_change"`` — the forward-only
   loss change ``Δ_j = ℓ_j(θ_0) − ℓ_j(θ_w)`` (:mod:`ntk_jax.selection.loss_change`, variants in
   ``select.ntk.loss_change``; two forward passes); ``"none"``. It keeps
   ``M = filter_factor · N`` candidates (``0``: all);
2. a second score of the kept candidates (``rescore``): ``"gradient"`` — the gradient scores
   below, at the kernel point(s) ``point``: ``"base"`` (θ_0), ``"warmup"`` (θ_w, the paper) or
   ``"base+warmup"`` (the mean of the two points' scores, a two-point TracIn-style sum);
   ``"loss_change"`` — Δ_j of the kept only (after the kNN filter: the paper's pipeline with
   the JVP scores replaced by two forward passes on the M kept); ``"none"`` — stage 1 alone;
3. the final score (``combine``): ``"rescore"`` — stage 2's score alone (the paper: the kNN
   filter then the kernel score); ``"rank_mean"`` — minus the mean of the two stages' ranks
   inside the kept set; with ``rescore="none"``, stage 1's score alone;
4. the top N.

The score of candidate j, with ``g(x) = ∇_θ s(θ, x)`` over the LoRA factors at the kernel
point and ``s`` set by ``select.ntk.output`` / ``reduce``
(:func:`~ntk_jax.selection.ntk_selector.selection_scalar_fn`):

* ``output="sum_of_logits"``: ``s = Σ_{t∈M} Σ_v z_{t,v}`` — ``⟨g(x_i), g(x_j)⟩`` is the
  Jacobian-free kernel ``Θ̃(x_i, x_j)`` of docs/theory.md §2.2 (label-blind);
* ``output="loss"`` (label-aware, docs/theory.md §6.5): ``s = Σ_{t∈M} −log p(y_t)``, so
  ``⟨g(x_i), g(x_j)⟩ = Σ_{t,t'} r_{i,t}ᵀ Θ(x_{i,t}, x_{j,t'}) r_{j,t'}`` with the residuals
  ``r = softmax(z) − e_y``: one SGD step of size η on j changes the domain loss by ≈ −η times
  the score;
* ``reduce``: ``"mean"`` divides ``s`` by the number of response tokens ``|M|`` (the paper),
  ``"sum"`` does not;
* ``normalize``: ``"none"`` — ``s_j = ⟨ḡ, g_j⟩`` with ``ḡ = (1/|D|) Σ_i g(x_i)``, i.e.
  ``(1/|D|) Σ_i Θ̃(x_i, x_j)`` (the paper); ``"cosine"`` — ``s_j = (1/|D|) Σ_i
  Θ̃(x_i,x_j)/√(Θ̃(x_i,x_i) Θ̃(x_j,x_j)) = ⟨(1/|D|) Σ_i g_i/‖g_i‖, g_j⟩ / ‖g_j‖``;
  ``"candidate"`` — ``⟨ḡ, g_j⟩ / ‖g_j‖`` (the candidate's norm only);
* ``precondition="adam"`` (at the warm-up point; not with ``point="base"``): inner products and norms in the metric
  ``D = diag(1/(√ν̂+ε))`` of the warm-up's final Adam state
  (:func:`~ntk_jax.selection.optimizer_state.adam_diagonal`): ``⟨ḡ, D g_j⟩`` — the first-order change of
  the domain loss under an Adam-like step on j, as LESS preconditions its candidates;
* ``projection_dim = p > 0``: the domain direction is replaced by its JL sketch
  ``Π Πᵀ (D) ḡ`` (seeded; ``select.projection_type="dense"``:
  :class:`~ntk_jax.kernels.projection.RandomProjection`, ``"factored"``: the per-layer
  Kronecker map :class:`~ntk_jax.kernels.factored_projection.FactoredProjection`), which makes
  ``s_j = ⟨Πᵀ ḡ, Πᵀ g_j⟩`` the score of projected features (the paper's features at p = 8192);
  ``p = 0`` uses the exact direction.

The domain direction is accumulated from per-example gradients of the |D| domain records
(:func:`~ntk_jax.kernels.features.mean_gradient`); candidates never get a stored feature:
with ``normalize="none"`` and ``feature_norms=False`` each costs one forward-mode JVP along
the direction (:func:`~ntk_jax.kernels.features.directional_derivatives`), otherwise one
per-example gradient that gives the inner product and ``‖g_j‖``
(:func:`~ntk_jax.kernels.features.gradient_inner_products`). docs/selection.md compares the
variants on the benchmark suite.
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from ntk_jax.data.encoding import lm_batch
from ntk_jax.kernels.features import directional_derivatives, gradient_inner_products, mean_gradient
from ntk_jax.kernels.factored_projection import PROJECTION_TYPES, bind_projection, make_projection
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.models.subset import param_subset
from ntk_jax.models.lora import lora_filter
from ntk_jax.selection.optimizer_state import adam_diagonal, find_adam_state
from ntk_jax.selection import loss_change
from ntk_jax.selection.methods import Selection, apply_overrides
from ntk_jax.selection.embeddings import pool_embeddings
from ntk_jax.selection.ntk_selector import (SCORE_OUTPUTS, TOKEN_REDUCTIONS, knn_votes, selection_scalar_fn,
                                            top_n)

NORMALIZATIONS = ("none", "cosine", "candidate")
POINTS = ("warmup", "base", "base+warmup")
PRECONDITIONERS = ("none", "adam")
FILTERS = ("none", "knn", "loss_change")

RESCORES = ("gradient", "loss_change", "none")
COMBINATIONS = ("rescore", "rank_mean")

PAPER = {"ntk.output": "sum_of_logits", "ntk.reduce": "mean", "ntk.normalize": "none", "ntk.point": "warmup",
         "ntk.precondition": "none", "ntk.filter": "knn", "ntk.filter_factor": 4, "ntk.rescore": "gradient",
         "ntk.combine": "rescore"}
"""NTK-Selector as the paper states it: length-normalised sum-of-logits gradients after the
domain warm-up, unnormalised mean kernel to the domain, kNN filter to 4N."""

GRADIENT = {"ntk.output": "loss", "ntk.reduce": "mean", "ntk.normalize": "cosine", "ntk.point": "base+warmup",
            "ntk.precondition": "none", "ntk.filter": "none", "ntk.filter_factor": 0, "ntk.rescore": "gradient",
            "ntk.combine": "rescore"}
"""The first-order label-aware score over the whole pool (the default until 2026-12-07,
docs/selection.md): loss gradients, cosine-normalised, averaged over the fresh-LoRA and the
warmed-up kernel points; one per-example gradient per candidate at each point."""

_DELTA = {"ntk.loss_change.reduce": "mean", "ntk.loss_change.relative": False, "ntk.loss_change.checkpoints": 1,
          "ntk.loss_change.cross_fit": False}

LOSS_CHANGE = {"ntk.filter": "loss_change", "ntk.filter_factor": 0, "ntk.rescore": "none",
               "ntk.combine": "rescore", **_DELTA}
"""Forward-only: the top N by the loss change Δ_j over the whole pool (two forward passes per
candidate, :mod:`ntk_jax.selection.loss_change`; the default 2026-12-07)."""

KNN_LOSS_CHANGE = {"ntk.filter": "knn", "ntk.filter_factor": 4, "ntk.rescore": "loss_change",
                   "ntk.combine": "rescore", **_DELTA}
"""The paper's pipeline with its JVP scores replaced by the loss change: the kNN filter (one
forward pass per candidate at θ_w) keeps 4N, Δ_j ranks them (two forward passes on the 4N)."""

STAGED = {**GRADIENT, "ntk.filter": "loss_change", "ntk.filter_factor": 4, "ntk.combine": "rank_mean", **_DELTA}
"""Δ_j over the whole pool, then the label-aware gradient score on its top 4N, and the mean of
the two ranks inside those 4N."""

RECOMMENDED = dict(KNN_LOSS_CHANGE)
"""The default (docs/selection.md, 2026-12-07): the paper's kNN filter to 4N, then the loss
change Δ_j of the kept. One forward pass per pool candidate plus two on the 4N kept — no more
than the paper's pipeline (a forward pass per candidate plus JVPs on 4N), where the loss change
over the whole pool (``ntk@loss_change``, the default before) costs two forward passes per
candidate. On the selection screen both reach the same precision (docs/selection.md); the kNN
filter drops the unrelated records Δ never needed to see, Δ separates the conflicting ones the
filter keeps."""

PRESETS = {"paper": PAPER, "gradient": GRADIENT, "loss_change": LOSS_CHANGE, "knn_loss_change": KNN_LOSS_CHANGE,
           "staged": STAGED, "recommended": RECOMMENDED}


def config() -> ml_collections.ConfigDict:
    """``select.ntk``: the pipeline and the score variant (see the module docstring). The
    defaults are :data:`RECOMMENDED`; other presets by name (an arm ``"ntk@paper"``, or
    ``configs/select_ntk.py:paper``)."""
    c = ml_collections.ConfigDict(dict(
        # stage 1, over the whole pool: none | knn (domain votes over mean hidden states of the
        # warm-up model, the paper) | loss_change (forward-only Δ_j, select.ntk.loss_change)
        filter="none",
        filter_factor=0,            # stage 1 keeps M = filter_factor·N for stage 2 (0: every candidate)
        rescore="gradient",         # stage 2 on the kept: gradient | loss_change | none (top N of stage 1)
        combine="rescore",          # rescore: stage 2's score alone | rank_mean: mean of both stages' ranks
        output="loss",              # loss (label-aware) | sum_of_logits (label-blind, the paper)
        reduce="mean",              # response tokens: mean (the paper) | sum
        normalize="cosine",         # cosine | candidate | none (the paper)
        point="base+warmup",        # kernel point: base (fresh LoRA) | warmup (after the domain
                                    # warm-up, the paper) | base+warmup (mean of the two points' scores)
        precondition="none",        # none | adam (the warm-up's Adam diagonal, at the warm-up point)
        feature_norms=True,         # also compute ‖g_j‖ for the diagnostics (one per-example
                                    # gradient per candidate instead of a JVP when normalize=none)
    ))
    c.loss_change = loss_change.config()
    apply_overrides(c, {key.partition(".")[2]: value for key, value in RECOMMENDED.items()})
    return c


def check_config(cfg: dict) -> None:
    n = cfg["ntk"]
    for key, allowed in (("output", SCORE_OUTPUTS), ("reduce", TOKEN_REDUCTIONS), ("normalize", NORMALIZATIONS),
                         ("point", POINTS), ("precondition", PRECONDITIONERS), ("filter", FILTERS),
                         ("rescore", RESCORES), ("combine", COMBINATIONS)):
        if n[key] not in allowed:
            raise ValueError(f"select.ntk.{key}={n[key]!r} is not one of {allowed}")
    if n["precondition"] == "adam" and n["point"] == "base":
        raise ValueError("select.ntk.precondition='adam' needs the warm-up's optimizer state: set "
                         "select.ntk.point='warmup' or 'base+warmup'")
    if n["precondition"] == "adam" and int(cfg["warmup"]["total_steps"]) < 1:
        raise ValueError("select.ntk.precondition='adam' needs a warm-up (select.warmup.total_steps >= 1)")
    if int(n["filter_factor"]) < 0 or int(cfg["projection_dim"]) < 0:
        raise ValueError("select.ntk.filter_factor and select.projection_dim must be >= 0")
    if n["filter"] == "none" and (n["rescore"] == "none" or n["combine"] != "rescore" or int(n["filter_factor"])):
        raise ValueError("select.ntk.filter='none' has no stage 1: it needs select.ntk.rescore='gradient' or "
                         "'loss_change', combine='rescore' and filter_factor=0")
    if n["filter"] == "loss_change" and n["rescore"] == "loss_change":
        raise ValueError("select.ntk.filter='loss_change' and rescore='loss_change' compute the same score twice: "
                         "set rescore='none' (Δ alone) or 'gradient'")
    if n["rescore"] == "none" and n["combine"] != "rescore":
        raise ValueError("select.ntk.combine='rank_mean' needs a second stage (select.ntk.rescore != 'none')")
    if _uses_loss_change(n):
        loss_change.check_config(n["loss_change"], cfg["warmup"])
    if cfg["projection_type"] not in PROJECTION_TYPES:
        raise ValueError(f"select.projection_type={cfg['projection_type']!r} is not one of {PROJECTION_TYPES}")


def domain_direction(subset, scalar_fn, domain_arrays: dict, *, normalize: str, metric=None, projection_dim: int = 0,
                     projection_seed: int = 0, projection_type: str = "dense", batch_size: int | None = None,
                     params=None):
    """The tangent ``t`` with ``s_j ∝ ⟨t, g_j⟩``: ``D · (1/|D|) Σ_i g_i [/‖g_i‖_D]`` (``D`` =
    ``metric`` or 1), replaced by ``Π Πᵀ t`` when ``projection_dim > 0`` (``projection_type``:
    ``"dense"`` or ``"factored"``, :func:`~ntk_jax.kernels.factored_projection.make_projection`).
    A pytree like ``subset.params``; gradients at ``params`` (default ``subset.params``)."""
    params = subset.params if params is None else params
    x = lm_batch(domain_arrays)
    u, _ = mean_gradient(scalar_fn, params, x, normalize=(normalize == "cosine"), metric=metric,
                         batch_size=batch_size, progress_desc="ntk: domain gradients")
    if metric is not None:
        u = jax.tree.map(lambda a, w: a * w, u, metric)
    projection = make_projection(projection_dim, projection_seed, projection_type)
    if projection is not None:
        projection = bind_projection(projection, scalar_fn, params, x)
        u = projection.adjoint(projection(u, batch_axis=False), params)
    return u


def _uses_loss_change(ncfg: dict) -> bool:
    """Whether a stage scores by the loss change Δ_j."""
    return ncfg["filter"] == "loss_change" or ncfg["rescore"] == "loss_change"


def _needs_warmup(ncfg: dict) -> bool:
    """Whether the full-domain warm-up is trained: for a warm-up kernel point, the kNN filter's
    embeddings, or a loss-change stage without cross-fitting."""
    return ((ncfg["rescore"] == "gradient" and ncfg["point"] in ("warmup", "base+warmup"))
            or ncfg["filter"] == "knn" or (_uses_loss_change(ncfg) and not ncfg["loss_change"]["cross_fit"]))


def kernel_points(job, ncfg: dict):
    """``(base model, warm-up (model, TrainConfig) or None, loss points or None)``: the fresh
    LoRA model (θ_0), the full-domain warm-up when a stage needs it, and the parameter points
    of a loss-change stage (:func:`ntk_jax.selection.loss_change.warmup_points`, which trains
    the warm-up with the checkpoints it needs; the gradient stage reuses it)."""
    cfg = job.cfg
    base = job.context.load_model(LoRAConfig.from_dict(cfg["lora"]), seed=job.seed)
    warm, lpoints = None, None
    if _uses_loss_change(ncfg):
        lpoints = loss_change.warmup_points(job, ncfg["loss_change"], base)
        if not ncfg["loss_change"]["cross_fit"]:
            warm = (lpoints.model, lpoints.wcfg)
    if warm is None and _needs_warmup(ncfg):
        warm = job.warm_up(cfg["lora"], cfg["warmup"])
    return base, warm, lpoints


def gradient_points(job, ncfg: dict, base, warm) -> list:
    """``[(name, params, metric)]``: the kernel points of the gradient stage (``point``) and the
    Adam metric of each (``None``: none)."""
    points = []
    if ncfg["point"] in ("base", "base+warmup"):
        points.append(("base", param_subset(base, lora_filter()).params, None))
    if ncfg["point"] in ("warmup", "base+warmup"):
        model, wcfg = warm
        metric = None
        if ncfg["precondition"] == "adam":
            state = job.checkpoints(model, wcfg, steps=[wcfg.total_steps])[wcfg.total_steps]
            metric = adam_diagonal(find_adam_state(state["opt_state"]).nu, wcfg.total_steps)
        points.append(("warmup", param_subset(model, lora_filter()).params, metric))
    return points


def gradient_stage(job, ncfg: dict, model, points: list, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Stage 2: the gradient score of the pool records ``kept`` (pool indices), the mean over
    the kernel ``points``, in resumable shards (store ``scores/``). Returns ``(scores (m,),
    ‖g_j‖ at the first point (m,) or None)``."""
    cfg = job.cfg
    fbs = job.feature_batch_size
    subset = param_subset(model, lora_filter())
    sfn = selection_scalar_fn(subset, ncfg["output"], ncfg["reduce"])
    tangents = [domain_direction(subset, sfn, job.domain_arrays, normalize=ncfg["normalize"], metric=metric,
                                 projection_dim=int(cfg["projection_dim"]),
                                 projection_seed=int(cfg["projection_seed"]),
                                 projection_type=cfg["projection_type"], batch_size=fbs, params=params)
                for _, params, metric in points]
    use_norms = ncfg["normalize"] != "none" or bool(ncfg["feature_norms"])
    store = job.store("scores", [job.pool_ids[int(i)] for i in kept], "ntk_scores")

    def score_rows(batch):
        x = lm_batch(batch)
        scores, norms = [], []
        for (_, params, metric), tangent in zip(points, tangents):
            if not use_norms:
                scores.append(directional_derivatives(sfn, params, x, tangent, batch_size=fbs))
                norms.append(np.full_like(scores[-1], np.nan))
                continue
            dots, sq = gradient_inner_products(sfn, params, x, tangent, metric=metric, batch_size=fbs)
            norms.append(np.sqrt(sq))
            scores.append(dots if ncfg["normalize"] == "none" else dots / np.maximum(norms[-1], 1e-30))
        return np.stack([np.mean(scores, axis=0), norms[0]], axis=1)  # norm at the first point

    def score(lo, hi):
        out = job.map_records(score_rows, lo, hi, kept)
        return out[:, 0], out[:, 1:]

    job.score_shards(store, score, desc="ntk: score candidates", with_features=True)
    _, s, norms = store.merge(with_features=True)
    return s, (norms[:, 0] if use_norms else None)


def ranks(scores: np.ndarray) -> np.ndarray:
    """``(m,)`` rank of each score, 0 = best (ties: lower index first)."""
    r = np.empty(len(scores), np.int64)
    r[top_n(scores, len(scores))] = np.arange(len(scores))
    return r


def _delta_stage(job, ncfg: dict, lpoints, kept: np.ndarray | None, store_name: str) -> tuple[np.ndarray, dict]:
    """Δ_j of the pool records ``kept`` (default all) and the arrays the report keeps."""
    delta, losses = loss_change.loss_change_stage(job, ncfg["loss_change"], lpoints, kept, store_name=store_name)
    job.extra.setdefault("loss_change", {}).update(**lpoints.info, points=[name for name, _ in lpoints.warm],
                                                   mean_change=float(np.mean(delta)), n_scored=int(len(delta)))
    reference = "loss_base" if ncfg["loss_change"]["reference"] == "base" else "loss_reference"
    return delta, {"loss_change": delta, reference: losses[:, 0], "loss_warm": losses[:, 1:].mean(axis=1)}


def first_stage(job, ncfg: dict, model, lpoints) -> tuple[np.ndarray | None, dict]:
    """Stage 1 over the whole pool: ``(score (n_pool,) or None for filter="none", arrays)``."""
    if ncfg["filter"] == "knn":
        dom_emb, cand_emb, _ = pool_embeddings(job, model)
        with job.timed("filter"):
            votes, mean_cos = knn_votes(dom_emb, cand_emb, int(job.cfg["knn_k"]))
        job.extra.update(n_voted=int((votes > 0).sum()))
        return votes + (np.asarray(mean_cos) + 1.0) / 2.0001, dict(votes=votes, mean_cos=mean_cos)  # ties: cosine
    if ncfg["filter"] == "loss_change":
        return _delta_stage(job, ncfg, lpoints, None, "loss_change")
    return None, {}


def select(job) -> Selection:
    """The staged pipeline: stage 1 over the whole pool (``filter``: kNN votes or loss change Δ_j)
    keeps ``M = filter_factor·N``; stage 2 scores those (``rescore``: gradients or Δ_j);
    ``combine`` gives the final score; top N."""
    cfg = job.cfg
    ncfg = cfg["ntk"]
    n_select = int(cfg["n_select"])
    with job.timed("warmup"):
        base, warm, lpoints = kernel_points(job, ncfg)
    model = warm[0] if warm is not None else (lpoints.model if lpoints is not None else base)
    # ---- stage 1: a cheap score of every pool record (every process merges all shards)
    first, arrays = first_stage(job, ncfg, model, lpoints)
    m = len(job.pool) if first is None or not int(ncfg["filter_factor"]) else \
        min(max(int(ncfg["filter_factor"]) * n_select, n_select), len(job.pool))
    if m == len(job.pool) or ncfg["rescore"] == "none":
        kept = np.arange(len(job.pool))
    else:
        kept = np.sort(top_n(first, m))  # the store in pool order
    job.extra.update(n_filtered=int(len(kept)))
    norms = None
    if ncfg["rescore"] == "none":  # stage 1 alone
        scores = first
    else:  # ---- stage 2: a second score of the kept
        arrays = {k: np.asarray(v)[kept] for k, v in arrays.items()}
        if ncfg["rescore"] == "gradient":
            with job.timed("score"):
                second, norms = gradient_stage(job, ncfg, model, gradient_points(job, ncfg, base, warm), kept)
            arrays["gradient_score"] = second
        else:
            second, delta_arrays = _delta_stage(job, ncfg, lpoints, kept, "loss_change_kept")
            arrays.update(delta_arrays)
        if ncfg["combine"] == "rank_mean":  # higher is better: minus the mean rank
            scores = -0.5 * (ranks(first[kept]) + ranks(second))
        else:
            scores = second
    with job.timed("select"):
        chosen = kept[top_n(scores, n_select)]
    job.extra.update(ntk_variant={k: ncfg[k] for k in ("filter", "filter_factor", "rescore", "combine", "output",
                                                       "reduce", "normalize", "point", "precondition")})
    return Selection(chosen=chosen, scored=kept, scores=scores, feature_norms=norms, arrays=arrays)
