"""docs/theory.md §6.3 — lpNTK data pruning with farthest-point clustering, against random pruning.

The classifier: the base language model (embedded tiny decoder or any checkpoint the
launcher loads) with LoRA adapters, read as a K-class classifier on a labelled synthetic task
(:mod:`ntk_jax.data.synthetic`, e.g. ``add_mod10``: ``"12+7="`` → one of the 10 digits, or
``sentiment_flipped``). The classes are the task's distinct responses (sorted); class ``a``'s
logit is the LM logit of the FIRST token of response ``a`` at the answer position (the last
prompt token, whose next-token prediction is the first response token). The first response
tokens of different classes must differ (checked). Training minimises the cross-entropy of
the softmax over these K logits (:func:`classifier_loss`).

The job:

1. train the reference classifier (LoRA, resumable orbax checkpoints under ``reference/``);
2. lpNTK features ``φ_i = ∇_LoRA Σ_a s_a(y_i) z_a(x_i)`` at that checkpoint (optionally
   JL-projected) in the resumable shards of a :class:`~ntk_jax.selection.store.ScoreStore`
   (``features/``, ``shard_size`` examples each), and the kernel ``ΦΦᵀ/K``;
3. per keep ratio: farthest-point clustering per class (``k = ⌊ratio · class size⌋``), and the
   pruned sets of every mode in ``modes`` (:data:`ntk_jax.selection.lpntk.PRUNE_MODES`), the
   random baseline with the same per-class counts as ``centres`` (``random``), and one with
   the per-class counts of ``drop_largest_half`` (``random_drop_half_count``);
4. retrain a fresh LoRA on every pruned set (and on the full set) for each seed, for a fixed
   number of steps; validation accuracy every ``eval_every`` steps; the checkpoint with the
   best VALIDATION accuracy (earliest on ties) is the one whose TEST accuracy is reported
   (the paper's code selects on the test set; this job does not).

Every finished retrain is appended to ``retrains.json`` (atomic) and skipped on restart.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.plotting import save, subplots
from ntk_jax.data.synthetic import generate_task
from ntk_jax.kernels.factored_projection import make_projection
from ntk_jax.kernels.jit import jit_constants_as_args
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.models.subset import param_subset
from ntk_jax.selection.lpntk import (class_clusters, lpntk_features, lpntk_kernel, prune_clusters,
                                     random_prune)
from ntk_jax.selection.store import ScoreStore, check_workdir_fingerprint, fill_store
from ntk_jax.training.trainer import TrainConfig, train
from ntk_jax.utils import progress, read_json, write_json

RETRAINS_NAME = "retrains.json"
FEATURES_DIR = "features"  # the ScoreStore of the lpNTK features (scores: their norms)


# ------------------------------------------------------------------------ the classifier
def classification_data(encoded: dict, records: list[dict], classes: list[str]) -> dict:
    """Classifier batch from :func:`ntk_jax.data.encoding.encode_examples` output.

    Returns numpy arrays with leading axis n: ``input_ids (n, T)``, ``attention_mask (n, T)``,
    ``answer_pos (n,)`` (position predicting the first response token), ``class_ids (n, K)``
    (token id of every class, repeated per row so that the batch slices uniformly),
    ``label (n,)`` (index into ``classes``).
    """
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r["response"] for r in records} - set(index))
    if unknown:
        raise ValueError(f"responses {unknown} are not among the classes {classes}")
    labels = np.array([index[r["response"]] for r in records], np.int32)
    mask = np.asarray(encoded["loss_mask"])
    if np.any(mask.sum(axis=1) == 0):
        raise ValueError("an example has no scored token (empty response after truncation)")
    answer_pos = np.argmax(mask > 0, axis=1).astype(np.int32)
    first_token = np.asarray(encoded["targets"])[np.arange(len(records)), answer_pos]
    class_ids = np.zeros(len(classes), np.int32)
    for c in range(len(classes)):
        tokens = np.unique(first_token[labels == c])
        if tokens.size != 1:
            raise ValueError(f"class {classes[c]!r} does not start with one token (got {tokens.tolist()})")
        class_ids[c] = tokens[0]
    if len(np.unique(class_ids)) != len(classes):
        raise ValueError(f"classes {classes} share a first token ({class_ids.tolist()}): the "
                         "answer-position logits cannot tell them apart")
    return {"input_ids": np.asarray(encoded["input_ids"]),
            "attention_mask": np.asarray(encoded["attention_mask"]),
            "answer_pos": answer_pos, "class_ids": np.tile(class_ids, (len(records), 1)), "label": labels}


def class_logits(model, batch: dict) -> jax.Array:
    """``(n, K)`` logits of the class tokens at the answer position (float32)."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    at_answer = jnp.take_along_axis(logits, batch["answer_pos"][:, None, None], axis=1)[:, 0]
    return jnp.take_along_axis(at_answer, batch["class_ids"], axis=1).astype(jnp.float32)


def classifier_loss(model, batch: dict) -> jax.Array:
    """Mean cross-entropy of the softmax over the K class logits."""
    return optax.softmax_cross_entropy_with_integer_labels(class_logits(model, batch), batch["label"]).mean()


def flip_labels(data: dict, fraction: float, num_classes: int, seed: int) -> tuple[dict, np.ndarray]:
    """Label noise: a random ``fraction`` of rows get a uniformly random OTHER class.
    Returns the new data and the flipped row indices."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {fraction}")
    n = len(data["label"])
    rng = np.random.default_rng([int(seed), 7])
    rows = np.sort(rng.choice(n, size=int(round(fraction * n)), replace=False))
    labels = data["label"].copy()
    labels[rows] = (labels[rows] + rng.integers(1, num_classes, size=rows.size)) % num_classes
    return {**data, "label": labels}, rows


def make_accuracy_fn(subset):
    """``acc(params, batch) -> (accuracy, mean loss)`` (jitted once per batch shape)."""
    logits_fn = subset.apply_fn(class_logits)

    @jit_constants_as_args
    def acc(params, batch):
        z = logits_fn(params, batch)
        loss = optax.softmax_cross_entropy_with_integer_labels(z, batch["label"]).mean()
        return jnp.mean(jnp.argmax(z, axis=1) == batch["label"]), loss

    return lambda params, batch: tuple(float(v) for v in acc(params, batch))


def _take(data: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in data.items()}


# ------------------------------------------------------------------------ the job
def _retrain(ctx, c, train_data, val, test, acc_fn, seed: int) -> dict:
    """Fresh LoRA trained on ``train_data``; test accuracy at the best-validation checkpoint."""
    n = len(train_data["label"])
    cfg = TrainConfig.from_dict({**dict(c.retrain), "seed": int(seed),
                                 "batch_size": min(int(c.retrain.batch_size), n)})
    model = ctx.load_model(LoRAConfig.from_dict(dict(c.lora)), seed=int(seed))
    best = {"val_acc": -1.0}
    curve = []

    def callback(step, params):
        if step % int(c.eval_every) and step != cfg.total_steps:
            return
        val_acc, val_loss = acc_fn(params, val)
        curve.append({"step": step, "val_acc": val_acc, "val_loss": val_loss})
        if val_acc > best["val_acc"]:
            best.update(step=step, val_acc=val_acc, val_loss=val_loss, params=params)

    t = time.time()
    train(model, train_data, cfg, wrt=nnx.LoRAParam, loss_fn=classifier_loss, callback=callback)
    test_acc, test_loss = acc_fn(best.pop("params"), test)
    return {**best, "test_acc": test_acc, "test_loss": test_loss, "n_train": n, "curve": curve,
            "train_s": time.time() - t}


def _features(c, out_dir: str, fingerprint: str, model, data: dict, num_classes: int) -> tuple[np.ndarray, float]:
    """lpNTK features of the training set at the reference checkpoint, in the resumable
    shards of a :class:`~ntk_jax.selection.store.ScoreStore` under ``features/`` (scores:
    the feature norms); returns ``(features (n, P or p), compute seconds)``."""
    subset = param_subset(model, nnx.LoRAParam)
    projection = make_projection(int(c.projection_dim), int(c.projection_seed), str(c.projection_type))
    batch = {k: data[k] for k in ("input_ids", "attention_mask", "answer_pos", "class_ids", "label")}
    logits_fn = subset.apply_fn(class_logits)
    store = ScoreStore(os.path.join(out_dir, FEATURES_DIR), [str(i) for i in range(len(batch["label"]))],
                       int(c.shard_size), fingerprint)

    def features(lo, hi):
        phi = lpntk_features(logits_fn, subset.params, {k: v[lo:hi] for k, v in batch.items()},
                             num_classes=num_classes, projection=projection,
                             batch_size=int(c.feature_batch_size), progress_desc=None)
        return np.linalg.norm(phi, axis=1), phi

    fill_store(store, features, desc="lpNTK features", with_features=True)
    _, _, feats = store.merge(with_features=True)
    return feats, store.compute_seconds()


def run(config, out_dir: str, ctx) -> dict:
    c = config.prune_lpntk
    t0 = time.time()
    fingerprint = check_workdir_fingerprint(
        out_dir, {"section": c.to_dict(), "seed": int(ctx.seed), "model_dir": os.path.abspath(ctx.model_dir)},
        "prune_lpntk")
    recs = {split: generate_task(c.task, int(getattr(c, f"n_{split}")), seed=ctx.seed + off)
            for split, off in (("train", 0), ("val", 101), ("test", 202))}
    classes = sorted({r["response"] for split in recs.values() for r in split})
    K = len(classes)
    if K < 2:
        raise ValueError(f"task {c.task!r} has {K} distinct response(s); lpNTK pruning needs >= 2 classes")
    data = {s: classification_data(ctx.encode(r), r, classes) for s, r in recs.items()}
    train_data, flipped = flip_labels(data["train"], float(c.label_noise), K, ctx.seed)
    val, test = data["val"], data["test"]
    labels = train_data["label"]

    # 1. reference classifier
    t = time.time()
    lora = LoRAConfig.from_dict(dict(c.lora))
    model = ctx.load_model(lora)
    ref_cfg = TrainConfig.from_dict({**dict(c.reference_train), "seed": ctx.seed})
    train(model, train_data, ref_cfg, wrt=nnx.LoRAParam, loss_fn=classifier_loss,
          workdir=os.path.join(out_dir, "reference"))
    ref_subset = param_subset(model, nnx.LoRAParam)
    acc_fn = make_accuracy_fn(ref_subset)
    ref = {"train_acc": acc_fn(ref_subset.params, train_data)[0], "val_acc": acc_fn(ref_subset.params, val)[0],
           "test_acc": acc_fn(ref_subset.params, test)[0], "seconds": time.time() - t}

    # 2. lpNTK
    feats, feature_s = _features(c, out_dir, fingerprint, model, train_data, K)
    kernel = lpntk_kernel(feats, K)
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(labels), dtype=bool)
    kernel_stats = {"mean_same_class": float(kernel[same & off_diag].mean()),
                    "mean_other_class": float(kernel[~same].mean()),
                    "frac_negative": float(np.mean(kernel[off_diag] < 0))}
    if flipped.size:
        clean = np.setdiff1d(np.arange(len(labels)), flipped)
        kernel_stats["mean_flipped_vs_clean_same_label"] = float(np.mean(
            [kernel[i, clean[labels[clean] == labels[i]]].mean() for i in flipped]))

    # 3 + 4. prune and retrain
    retrains_path = os.path.join(out_dir, RETRAINS_NAME)
    done = read_json(retrains_path) if os.path.exists(retrains_path) else {}
    subsets = {"full": np.arange(len(labels))}
    clusters_info = {}
    for ratio in c.keep_ratios:
        cl = class_clusters(kernel, labels, float(ratio))
        sizes = {int(k): np.bincount(v["assignment"]).tolist() for k, v in cl.items()}
        clusters_info[str(ratio)] = {"largest": {k: max(s) for k, s in sizes.items()},
                                     "n_clusters": {k: len(s) for k, s in sizes.items()}}
        for mode in c.modes:
            for seed in c.seeds:
                subsets[f"{mode}/{ratio}/{seed}"] = prune_clusters(cl, mode, seed)
        k_per_class = {cls: len(v["centres"]) for cls, v in cl.items()}
        for seed in c.seeds:
            subsets[f"random/{ratio}/{seed}"] = random_prune(labels, k_per_class, seed)
            if "drop_largest_half" in c.modes:
                kept = subsets[f"drop_largest_half/{ratio}/{seed}"]
                counts = {cls: int(np.sum(labels[kept] == cls)) for cls in k_per_class}
                subsets[f"random_drop_half_count/{ratio}/{seed}"] = random_prune(labels, counts, seed)
    keys = [f"full/1.0/{s}" for s in c.seeds] + [k for k in subsets if k != "full"]
    for key in progress(keys, desc="retrain"):
        if key in done:
            continue
        mode, ratio, seed = key.split("/")
        idx = subsets["full"] if mode == "full" else subsets[key]
        res = _retrain(ctx, c, _take(train_data, idx), val, test, acc_fn, int(seed))
        res["n_flipped_kept"] = int(np.isin(idx, flipped).sum())
        done[key] = res
        write_json(retrains_path, done)

    table = {}
    for key, res in done.items():
        mode, ratio, seed = key.split("/")
        row = table.setdefault(f"{mode}/{ratio}", {"mode": mode, "keep_ratio": float(ratio), "test_acc": [],
                                                   "val_acc": [], "n_train": [], "n_flipped_kept": []})
        for f in ("test_acc", "val_acc", "n_train", "n_flipped_kept"):
            row[f].append(res[f])
    for row in table.values():
        row["test_acc_mean"] = float(np.mean(row["test_acc"]))
        row["test_acc_std"] = float(np.std(row["test_acc"]))
        row["kept_fraction"] = float(np.mean(row["n_train"])) / len(labels)
    report = {
        "experiment": "prune_lpntk",
        "setup": {"task": c.task, "classes": classes, "n_train": len(labels), "n_val": len(val["label"]),
                  "n_test": len(test["label"]), "label_noise": float(c.label_noise), "n_flipped": int(flipped.size),
                  "lora": dict(c.lora), "reference_train": ref_cfg.to_dict(), "retrain": dict(c.retrain),
                  "seeds": list(c.seeds), "keep_ratios": list(c.keep_ratios), "modes": list(c.modes),
                  "projection_dim": int(c.projection_dim), "model": ctx.info,
                  "selection": "checkpoint with the best validation accuracy (earliest on ties); "
                               "test accuracy reported at that checkpoint"},
        "reference": ref,
        "kernel": kernel_stats,
        "clusters": clusters_info,
        "table": sorted(table.values(), key=lambda r: (-r["keep_ratio"], r["mode"])),
        "timings": {"features_s": feature_s, "reference_s": ref["seconds"],
                    "retrain_s": float(sum(r["train_s"] for r in done.values())), "total_s": time.time() - t0},
    }
    report["plots"] = [plot(report, os.path.join(out_dir, "prune_lpntk.png"))]
    return report


def summary(report: dict) -> dict:
    return {f"{r['mode']}@{r['keep_ratio']}": round(r["test_acc_mean"], 3) for r in report["table"]}


def plot(report: dict, path: str) -> str:
    rows = [r for r in report["table"] if r["mode"] != "full"]
    full = [r for r in report["table"] if r["mode"] == "full"]
    modes = sorted({r["mode"] for r in rows})
    ratios = sorted({r["keep_ratio"] for r in rows})
    fig, ax = subplots(1, width=6.0)
    ax = ax[0]
    width = 0.8 / max(len(modes), 1)
    for j, m in enumerate(modes):
        xs, ys, es = [], [], []
        for i, q in enumerate(ratios):
            r = [r for r in rows if r["mode"] == m and r["keep_ratio"] == q]
            if r:
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                ys.append(r[0]["test_acc_mean"])
                es.append(r[0]["test_acc_std"])
        ax.bar(xs, ys, width, yerr=es, label=m)
    if full:
        ax.axhline(full[0]["test_acc_mean"], color="k", ls="--", label="full data")
    ax.set_xticks(range(len(ratios)), [f"keep {q:g}" for q in ratios])
    ax.set(ylabel="test accuracy (val-selected)", title=f"lpNTK pruning: {report['setup']['task']}")
    ax.legend(fontsize=7)
    return save(fig, path)
