"""Loss-change scores: the forward-only stage of NTK-Selector's staged pipeline
(:mod:`ntk_jax.selection.methods.ntk`, ``select.ntk.filter="loss_change"``).

The score of pool record j is the change of its own response loss that training on the domain
set causes (the cross-entropy difference of Moore & Lewis 2010; the idea behind RHO-LOSS):

    Δ_j = ℓ_j(θ_0) − ℓ_j(θ_w)

with ``ℓ_j`` the record's response-token NLL (``reduce``: mean or sum over the ``loss_mask``
tokens), ``θ_0`` the fresh LoRA factors (B = 0: the base model) and ``θ_w`` the LoRA factors
after the domain warm-up. Under gradient flow on the domain loss ``L_D``,
``Δ_j = ∫ η ⟨∇ℓ_j(θ_t), ∇L_D(θ_t)⟩ dt``: the label-aware NTK score integrated along the
warm-up path (docs/theory.md §6.7), of which the two-point gradient score is a
first-order approximation. It costs one forward pass per record and parameter point, no
backward pass.

Variants (``select.ntk.loss_change``):

* ``reduce``: ``"mean"`` (per-token, the default) | ``"sum"`` over the response tokens;
* ``relative``: ``Δ_j / ℓ_j(θ_0)`` (the fraction of the record's loss the warm-up removed);
* ``checkpoints = K``: ``Δ_j = (1/K) Σ_k [ℓ_j(θ_0) − ℓ_j(θ_k)]`` over K evenly spaced warm-up
  checkpoints (K = 1: the last; a TracIn-style sum over the path, which weights what the
  warm-up learnt early more than the last checkpoint alone does); K + 1 forward passes;
* ``cross_fit``: two warm-ups, each on one half of the domain (a seeded split), and ``Δ_j``
  averaged over them. Each half's held-out loss change (the other half's records) is reported,
  with its loss after the warm-up beside the trained-on half's: how much of the warm-up's effect
  generalises beyond memorising the domain records, i.e. the Δ a useful record can be expected
  to reach, and whether the warm-up learnt the rule at all. Three forward passes;
* ``reference``: the point the loss change is measured from. ``"base"`` (the default): θ_0.
  ``"shuffled"``: θ_s, the same warm-up (seed, steps, optimiser, fresh LoRA factors) trained on
  the domain records with their responses permuted among them
  (:func:`ntk_jax.data.records.shuffle_responses`), so ``Δ_j = ℓ_j(θ_s) − ℓ_j(θ_w)``. θ_s learns
  what the domain's answers look like (their tokens, lengths and template) and nothing of which
  answer goes with which input; the difference keeps the part of the loss change that the
  input-to-answer mapping causes — the rule — and cancels the part the answers' form causes,
  which a conflicting rule on the target's own inputs shares with the target (docs/theory.md
  §6.7). One more warm-up of the domain's size; still two forward passes per record. Not with
  ``cross_fit`` or ``checkpoints > 1``.

The stage writes ``ℓ_j(θ_0)`` into one resumable ScoreStore (``loss_base/``, or a cache shared
by jobs on the same pool: ``base_cache``, since θ_0 does not depend on the target) and
``(ℓ_j(θ_1), …)`` with ``Δ_j`` as the score into another (``loss_change/``), both split over
processes like every score.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from ntk_jax.data.encoding import lm_batch
from ntk_jax.data.records import encode_records, shuffle_responses
from ntk_jax.kernels.features import scalar_values
from ntk_jax.models.lora import lora_filter
from ntk_jax.models.subset import param_subset
from ntk_jax.selection.ntk_selector import TOKEN_REDUCTIONS, selection_scalar_fn
from ntk_jax.selection.store import ScoreStore, fingerprint_of

REFERENCES = ("base", "shuffled")

__all__ = ["REFERENCES", "config", "check_config", "loss_change", "LossPoints", "warmup_points", "base_loss_store",
           "loss_change_stage"]


def config() -> ml_collections.ConfigDict:
    """``select.ntk.loss_change``: the variant of the Δ_j score (module docstring)."""
    return ml_collections.ConfigDict(dict(
        reduce="mean",              # response tokens: mean | sum
        relative=False,             # Δ_j / ℓ_j(θ_0) instead of Δ_j
        checkpoints=1,              # K evenly spaced warm-up checkpoints, Δ averaged (1: the last)
        cross_fit=False,            # two warm-ups on halves of the domain, Δ averaged over them
        reference="base",           # Δ from: base (θ_0) | shuffled (a warm-up on the domain with its
                                    # responses permuted: Δ_j = ℓ_j(θ_s) − ℓ_j(θ_w))
        # a directory shared by jobs on the same pool and model: ℓ_j(θ_0) does not depend on the
        # target, so it is computed once and reused (empty: inside the job's directory)
        base_cache="",
    ))


def check_config(lcfg: dict, warmup: dict) -> None:
    """``ValueError`` naming a bad ``select.ntk.loss_change`` setting."""
    if lcfg["reduce"] not in TOKEN_REDUCTIONS:
        raise ValueError(f"select.ntk.loss_change.reduce={lcfg['reduce']!r} is not one of {TOKEN_REDUCTIONS}")
    k, steps = int(lcfg["checkpoints"]), int(warmup["total_steps"])
    if k < 1:
        raise ValueError(f"select.ntk.loss_change.checkpoints must be >= 1, got {k}")
    reference = lcfg.get("reference", "base")
    if reference not in REFERENCES:
        raise ValueError(f"select.ntk.loss_change.reference={reference!r} is not one of {REFERENCES}")
    if reference == "shuffled" and (lcfg["cross_fit"] or k > 1):
        raise ValueError("select.ntk.loss_change.reference='shuffled' is not supported together with cross_fit "
                         "or checkpoints > 1: set cross_fit=False and checkpoints=1, or reference='base'")
    if steps < 1:
        raise ValueError("loss-change scores need a warm-up: set select.warmup.total_steps >= 1")
    if k > steps:
        raise ValueError(f"select.ntk.loss_change.checkpoints={k} is more than the warm-up's "
                         f"{steps} steps (select.warmup.total_steps)")


def loss_change(base_loss: np.ndarray, point_losses: np.ndarray, *, relative: bool = False) -> np.ndarray:
    """``Δ_j = mean_k (ℓ_j(θ_0) − ℓ_j(θ_k))`` (``/ ℓ_j(θ_0)`` with ``relative``).

    Args:
      base_loss: ``(n,)`` losses at θ_0.
      point_losses: ``(n, K)`` losses at the K warmed-up points.
    Returns ``(n,)`` float64.
    """
    base = np.asarray(base_loss, np.float64)
    pts = np.asarray(point_losses, np.float64)
    if pts.ndim != 2 or pts.shape[0] != base.shape[0]:
        raise ValueError(f"point_losses must be (n, K) with n = {base.shape[0]}, got {pts.shape}")
    delta = (base[:, None] - pts).mean(axis=1)
    return delta / np.maximum(base, 1e-12) if relative else delta


@dataclasses.dataclass
class LossPoints:
    """The parameter points of the Δ stage: ``base`` (the reference point: θ_0, or θ_s with
    ``reference="shuffled"``) and ``warm`` (``[(name, params)]``,
    the K or 2K warmed-up LoRA factors), the last warm-up's model and ``TrainConfig``
    (``wcfg``), and report entries (``info``)."""

    model: object
    wcfg: object
    base: object
    warm: list
    info: dict


def _split_domain(arrays: dict, seed: int) -> tuple[dict, dict]:
    """Two halves of the encoded domain set by a seeded permutation (``(n, T)`` arrays each)."""
    n = int(np.asarray(arrays["input_ids"]).shape[0])
    if n < 2:
        raise ValueError("select.ntk.loss_change.cross_fit needs at least 2 domain records")
    perm = np.random.default_rng([int(seed), 2024]).permutation(n)
    halves = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
    return tuple({k: np.asarray(v)[h] for k, v in arrays.items()} for h in halves)


def _checkpoint_steps(total: int, k: int) -> list[int]:
    """K evenly spaced steps ending at ``total`` (``k=1``: ``[total]``)."""
    return sorted({int(round(total * (i + 1) / k)) for i in range(k)})


def warmup_points(job, lcfg: dict, base_model) -> LossPoints:
    """Trains (or resumes) the warm-up(s) the Δ score needs (``lcfg``: ``select.ntk.loss_change``)
    and returns their LoRA parameters. ``base_model``: the fresh-LoRA model (θ_0)."""
    cfg = job.cfg
    k = int(lcfg["checkpoints"])
    total = int(cfg["warmup"]["total_steps"])
    steps = _checkpoint_steps(total, k)
    overrides = {} if k == 1 else dict(checkpoint_every=steps[0], max_to_keep=len(steps) + 1)
    base = param_subset(base_model, lora_filter()).params
    if not lcfg["cross_fit"]:
        runs = [("warmup", None, "warmup")]
    else:
        half_a, half_b = _split_domain(job.domain_arrays, job.seed)
        runs = [("half_a", half_a, "warmup_half_a"), ("half_b", half_b, "warmup_half_b")]
    warm, model, info = [], None, {"checkpoint_steps": steps}
    for name, data, workdir in runs:
        model, wcfg = job.warm_up(cfg["lora"], cfg["warmup"], data, workdir=workdir, **overrides)
        if k == 1:
            warm.append((f"{name}@{total}", param_subset(model, lora_filter()).params))
        else:
            states = job.checkpoints(model, wcfg, workdir=workdir, steps=steps)
            warm += [(f"{name}@{s}", states[s]["params"]) for s in steps]
    if lcfg.get("reference", "base") == "shuffled":
        info["reference"] = "shuffled"
        model_s, _ = job.warm_up(cfg["lora"], cfg["warmup"], _shuffled_domain(job), workdir="warmup_shuffled")
        base = param_subset(model_s, lora_filter()).params
    if lcfg["cross_fit"]:
        info["held_out_domain"] = _held_out_change(job, lcfg, base_model, base, warm, half_a, half_b)
    return LossPoints(model=model, wcfg=wcfg, base=base, warm=warm, info=info)


def _shuffled_domain(job) -> dict:
    """The domain records with their responses permuted (seeded by the job's seed), encoded as
    the job encodes (over-long pairs truncated from the left, never refused: a prompt may now
    carry a longer answer than its own)."""
    opts = dict(job.encoding)
    if opts.get("truncation") == "error":
        opts["truncation"] = "left"
    return encode_records(job.context.tokenizer, shuffle_responses(job.domain, job.seed), job.context.max_len, **opts)


def _held_out_change(job, lcfg, model, base, warm, half_a, half_b) -> dict:
    """Mean Δ of each domain half's records under the warm-up trained on the other half (and,
    for contrast, on itself): how much of Δ generalises beyond the records trained on; and
    their mean loss after each warm-up's last checkpoint (``held_out_loss`` high while
    ``trained_on_loss`` is near 0: the warm-up memorised its half instead of learning the rule,
    and Δ will not tell a conflicting rule on the target's inputs from the target's own)."""
    sfn = selection_scalar_fn(param_subset(model, lora_filter()), "loss", lcfg["reduce"])
    fbs = job.feature_batch_size
    out = {}
    for held, trained in (("half_b", "half_a"), ("half_a", "half_b")):
        x = lm_batch(half_b if held == "half_b" else half_a)
        l0 = scalar_values(sfn, base, x, batch_size=fbs, progress_desc="loss change: held-out domain")
        other = [p for name, p in warm if name.startswith(trained)]
        own = [p for name, p in warm if name.startswith(held)]
        lo = np.stack([scalar_values(sfn, p, x, batch_size=fbs) for p in other], axis=1)
        ls = np.stack([scalar_values(sfn, p, x, batch_size=fbs) for p in own], axis=1)
        out[held] = {"held_out_change": float(loss_change(l0, lo, relative=bool(lcfg["relative"])).mean()),
                     "trained_on_change": float(loss_change(l0, ls, relative=bool(lcfg["relative"])).mean()),
                     "held_out_loss": float(lo[:, -1].mean()), "trained_on_loss": float(ls[:, -1].mean())}
    return out


def base_loss_store(job, lcfg: dict, kept: np.ndarray) -> ScoreStore:
    """The store of ``ℓ_j(θ_0)`` for the pool records ``kept``. θ_0 does not depend on the
    target (the domain, the warm-up): with ``lcfg["base_cache"]`` set, the store lives in
    ``base_cache/<fingerprint>/`` and every job on the same pool, model and encoding reuses it
    — a further target then costs one forward pass per candidate. Its fingerprint: the model
    and dtypes, the encoding (the select section's length settings, the context's
    ``max_len``, bucketing), the token reduction, the candidates' ids and contents, and the
    LoRA factors where they are not zero at θ_0 (``b_init_std > 0``; with B = 0, θ_0 is the
    base model whatever the LoRA)."""
    cfg, ctx = job.cfg, job.context
    if lcfg.get("reference", "base") != "base":  # θ_s depends on the domain: a store of the job's own
        return job.store("loss_reference", [job.pool_ids[int(i)] for i in kept], "loss_reference")
    lora = dict(cfg["lora"])
    recs = [job.pool[int(i)] for i in kept]
    key = {"stage": "loss_base", "model_dir": os.path.abspath(ctx.model_dir), "dtype": ctx.dtype,
           "param_dtype": ctx.param_dtype, "context_max_len": int(ctx.max_len),
           "encoding": {k: cfg.get(k) for k in ("max_len", "truncation", "assistant_turns", "bucket_multiple",
                                                "feature_batch_size")},
           "reduce": lcfg["reduce"],
           "lora": {**lora, "seed": int(job.seed)} if float(lora.get("b_init_std") or 0.0) > 0 else None,
           "candidates": fingerprint_of([str(r["id"]) for r in recs]), "contents": fingerprint_of(recs)}
    fp = fingerprint_of(key)
    directory = os.path.join(lcfg["base_cache"], fp[:16]) if lcfg.get("base_cache") else \
        os.path.join(job.out_dir, "loss_base")
    return ScoreStore(directory, [str(r["id"]) for r in recs], int(cfg["shard_size"]), fp)


def loss_change_stage(job, lcfg: dict, points: LossPoints, kept: np.ndarray | None = None,
                      store_name: str = "loss_change") -> tuple[np.ndarray, np.ndarray]:
    """Δ_j for the pool records ``kept`` (pool indices; default all): ``ℓ_j(θ_0)`` in the store
    of :func:`base_loss_store` (reused when it is already complete), then the warmed-up losses
    and Δ_j in the store ``store_name``; resumable shards, every process its own. Returns
    ``(Δ (m,), losses (m, 1+K))`` in ``kept`` order, ``losses[:, 0]`` at θ_0."""
    kept = np.arange(len(job.pool)) if kept is None else np.asarray(kept)
    sfn = selection_scalar_fn(param_subset(points.model, lora_filter()), "loss", lcfg["reduce"])
    fbs = job.feature_batch_size
    relative = bool(lcfg["relative"])

    def losses_at(params_list):
        def rows(batch):
            x = lm_batch(batch)
            return np.stack([scalar_values(sfn, p, x, batch_size=fbs) for p in params_list], axis=1)
        return rows

    with job.timed("loss_change"):
        base_store = base_loss_store(job, lcfg, kept)
        job.score_shards(base_store, lambda lo, hi: job.map_records(losses_at([points.base]), lo, hi, kept)[:, 0],
                         desc="loss change: forward passes at the reference point")
        _, base = base_store.merge()

        def score(lo, hi):
            warm = job.map_records(losses_at([p for _, p in points.warm]), lo, hi, kept)
            return loss_change(base[lo:hi], warm, relative=relative), warm

        store = job.store(store_name, [job.pool_ids[int(i)] for i in kept], "loss_change_warm")
        job.score_shards(store, score, desc="loss change: forward passes after the warm-up", with_features=True)
        _, delta, warm = store.merge(with_features=True)
    job.extra.setdefault("loss_change", {})["base_losses"] = base_store.directory
    return delta, np.concatenate([base[:, None], warm], axis=1)
