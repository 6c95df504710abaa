"""LESS (docs/theory.md §6.2; math in :mod:`ntk_jax.selection.less`): a LoRA warm-up on a
``sample_fraction`` sample of the pool with a checkpoint per epoch; per checkpoint,
Adam-preconditioned projected loss gradients of the candidates against the plain loss
gradients of the domain records (cosine), summed over checkpoints weighted by their learning
rate; mean over the domain records of a subtask (``"task"``), max over subtasks; top N.

Settings: ``select.less`` (its own LoRA and training section), ``select.projection_dim`` /
``projection_seed``.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from ntk_jax.kernels.factored_projection import make_projection
from ntk_jax.models.lora import lora_config, lora_filter
from ntk_jax.models.subset import param_subset
from ntk_jax.selection.less import (adam_preconditioner, less_features, less_scores,
                                    loss_scalar_fn, subtask_groups)
from ntk_jax.selection.methods import Selection
from ntk_jax.selection.ntk_selector import top_n
from ntk_jax.selection.optimizer_state import find_adam_state
from ntk_jax.training.trainer import finetune_train_config, make_schedule


def config() -> ml_collections.ConfigDict:
    """``select.less``: LESS's own LoRA and warm-up (docs/theory.md §6.2: 5 % of the pool, 4 epochs, a
    checkpoint per epoch)."""
    return ml_collections.ConfigDict(dict(
        sample_fraction=0.05,       # share of the pool the warm-up trains on
        min_sample=32,              # ... but at least this many records
        epochs=4,                   # checkpoints (one per epoch) the scores are summed over
        lora=lora_config(),
        train=finetune_train_config(total_steps=1, learning_rate=5e-3, warmup_steps=2, schedule="linear",
                                    batch_size=8),  # total_steps is set from epochs × steps per epoch
    ))


def check_config(cfg: dict) -> None:
    lcfg = cfg["less"]
    if not 0 < float(lcfg["sample_fraction"]) <= 1:
        raise ValueError(f"select.less.sample_fraction must be in (0, 1], got {lcfg['sample_fraction']}")
    if int(lcfg["epochs"]) < 1:
        raise ValueError(f"select.less.epochs must be >= 1, got {lcfg['epochs']}")
    if int(cfg["projection_dim"]) < 0:
        raise ValueError(f"select.projection_dim must be >= 0, got {cfg['projection_dim']}")
    if cfg["projection_type"] != "dense":
        raise ValueError(f"LESS needs select.projection_type='dense' (got {cfg['projection_type']!r}): its Adam "
                         "preconditioner acts on each entry of the per-example gradient, which a factored "
                         "projection never forms")


def select(job) -> Selection:
    cfg, lcfg, pool = job.cfg, job.cfg["less"], job.pool
    fbs = job.feature_batch_size
    with job.timed("warmup"):
        rng = np.random.default_rng([int(job.seed), 5])
        n_sample = min(len(pool), max(int(round(float(lcfg["sample_fraction"]) * len(pool))), int(lcfg["min_sample"])))
        sample_idx = np.sort(rng.choice(len(pool), size=n_sample, replace=False))
        bs = min(int(lcfg["train"]["batch_size"]), n_sample)
        steps_per_epoch = n_sample // bs
        epochs = int(lcfg["epochs"])
        sample = job.encode([pool[int(i)] for i in sample_idx])
        model, wcfg = job.warm_up(lcfg["lora"], lcfg["train"], data=sample, batch_size=bs,
                                  total_steps=epochs * steps_per_epoch, checkpoint_every=steps_per_epoch,
                                  max_to_keep=epochs)
    with job.timed("score"):
        subset = param_subset(model, lora_filter())
        schedule = make_schedule(wcfg)
        ckpts = []
        for step, state in job.checkpoints(model, wcfg).items():
            adam = find_adam_state(state["opt_state"])
            ckpts.append((step, state["params"], adam, float(schedule(step - 1))))
        projection = make_projection(int(cfg["projection_dim"]), int(cfg["projection_seed"]))
        groups = subtask_groups(job.domain)
        lfn = loss_scalar_fn(subset)
        targets = [less_features(subset, params, job.domain_arrays, projection=projection, batch_size=fbs,
                                 scalar_fn=lfn) for _, params, _, _ in ckpts]
        transforms = [adam_preconditioner(adam.mu, adam.nu) for _, _, adam, _ in ckpts]
        lrs = [lr for *_, lr in ckpts]
        store = job.store("scores", job.pool_ids, "less_scores")

        def score_rows(batch):
            feats = [less_features(subset, params, batch, projection=projection, transform=tr, batch_size=fbs,
                                   scalar_fn=lfn, with_norms=True)
                     for (_, params, _, _), tr in zip(ckpts, transforms)]
            s = less_scores([f for f, _ in feats], targets, lrs, groups)
            return np.concatenate([s[:, None], feats[-1][1][:, None]], axis=1)  # score, last norm

        def score(lo, hi):
            out = job.map_records(score_rows, lo, hi)
            return out[:, 0], out[:, 1:]

        job.score_shards(store, score, desc="less: score pool", with_features=True)
        _, s, norms = store.merge(with_features=True)
    with job.timed("select"):
        chosen = top_n(s, int(cfg["n_select"]))
    job.extra.update(less_checkpoints=[int(c[0]) for c in ckpts], less_lrs=lrs, less_sample=int(n_sample),
                     less_subtasks=list(groups))
    return Selection(chosen=chosen, scored=np.arange(len(pool)), scores=s, feature_norms=norms[:, 0])
