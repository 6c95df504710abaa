"""docs/theory.md §6.3 — lpNTK data pruning with farthest-point clustering, against random
pruning, the sum-of-logits kernel, EL2N and GraNd, on a text or an image classifier.

Two problems (``dataset``):

* ``"text"``: the base language model (embedded tiny decoder or any checkpoint the launcher
  loads) with LoRA adapters, read as a K-class classifier on a labelled synthetic task
  (:mod:`ntk_jax.data.synthetic`, e.g. ``sentiment_flipped``). The classes are the task's
  distinct responses (sorted); class ``a``'s logit is the LM logit of the FIRST token of
  response ``a`` at the answer position (the last prompt token). The first response tokens of
  different classes must differ (checked). Trained: the LoRA factors.
* ``"digits"``: scikit-learn's 8×8 handwritten digits (:mod:`ntk_jax.data.digits`, fixed
  seeded stratified splits) and a LeNet-like CNN (:mod:`ntk_jax.models.cnn`). Trained: all
  parameters, so the lpNTK is taken over all of them, as in the lpNTK paper.

Training minimises the cross-entropy of the softmax over the K logits; optional label noise
(``label_noise``) flips a fraction of training labels. The job, in stages:

1. the reference classifier, trained once; its checkpoint with the best VALIDATION accuracy
   (earliest on ties) is kept (``reference/best.npz``);
2. at that checkpoint, per kernel of ``kernels`` (:data:`ntk_jax.selection.lpntk.KERNELS`:
   ``lpntk`` with the label signs, ``sum_logits`` the paper's ablation; ``<kernel>_cosine``:
   its cosine-normalised Gram matrix, a diagnostic), the features
   ``φ_i = ∇θ Σ_a s_a(y_i) z_a(x_i)`` (optionally JL-projected) in the resumable shards of a
   :class:`~ntk_jax.selection.store.ScoreStore` (``features/``, ``features_sum_logits/``), and
   the kernel ``ΦΦᵀ/K``;
3. EL2N and GraNd (:mod:`ntk_jax.selection.pruning_scores`, when in ``baselines``): ``score_runs``
   fresh models trained for ``score_steps`` steps of the retrain schedule, scores averaged over
   the runs (``scores/run_<r>.npz``);
4. per keep ratio: farthest-point clustering per class (``k = ⌊ratio · class size⌋``) on each
   kernel, the pruned sets of every mode in ``modes`` (sum-of-logits sets are named
   ``sum_logits-<mode>``), random pruning with the per-class counts of ``centres`` (``random``)
   and of ``drop_largest_half`` (``random_drop_half_count``), and the ``k`` highest EL2N / GraNd
   scores of every class (``el2n``, ``grand``);
5. retrain a fresh classifier on every pruned set (and on the full set) for each seed, for a
   fixed number of steps; validation accuracy every ``eval_every`` steps; the TEST accuracy at
   the best-VALIDATION checkpoint is reported (the paper's code selects on the test set; this
   job does not). Every finished retrain is one shard ``retrains/<method>_<ratio>_<seed>.json``
   (atomic), skipped on restart;
6. the table: per (method, ratio) test accuracy mean ± std over seeds with a 95 % bootstrap
   interval of the mean, and the paired (same retrain seed) difference to its random baseline
   with its interval (``table.md``, ``prune_lpntk.png``).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
import optax
from flax import nnx

from experiments.plotting import save, subplots
from ntk_jax.data.digits import IMAGE_SHAPE, NUM_CLASSES, digits_splits
from ntk_jax.data.synthetic import generate_task
from ntk_jax.kernels.factored_projection import make_projection
from ntk_jax.kernels.jit import jit_constants_as_args
from ntk_jax.models.cnn import LeNet, LeNetConfig, num_params
from ntk_jax.models.lora import LoRAConfig, lora_config
from ntk_jax.models.subset import param_subset
from ntk_jax.selection.lpntk import (class_clusters, cluster_counts, cosine_kernel, lpntk_features,
                                     lpntk_kernel, prune_clusters, random_prune)
from ntk_jax.selection.pruning_scores import average_runs, el2n_scores, grand_scores, keep_highest
from ntk_jax.selection.store import ScoreStore, check_workdir_fingerprint, fill_store
from ntk_jax.stats import bootstrap_interval
from ntk_jax.training.trainer import TrainConfig, finetune_train_config, train
from ntk_jax.utils import progress, read_json, write_json, write_npz


def config() -> ml_collections.ConfigDict:
    """docs/theory.md §6.3: lpNTK farthest-point-clustering pruning vs random pruning
    (experiments/prune_lpntk.py)."""
    return ml_collections.ConfigDict(dict(
        # "text": LoRA classifier on `task`; "digits": a LeNet-like CNN on scikit-learn's 8x8
        # digits (configs/prune_lpntk_digits.py), every parameter trained
        dataset="text",
        # Labelled synthetic task; classes = its distinct responses. sentiment_flipped: the
        # pre-trained model predicts the opposite label, so LoRA must learn the task.
        # (add_mod10, 10 classes, stays near chance with this model and budget.)
        task="sentiment_flipped",
        n_train=400,                # digits: 0 = every image not in val / test
        n_val=200,                  # checkpoint selection (never the test split)
        n_test=400,
        label_noise=0.2,            # fraction of training labels flipped to another class
        lora=lora_config(),
        reference_train=finetune_train_config(total_steps=150, learning_rate=3e-3, warmup_steps=10,
                                              schedule="cosine", batch_size=32, checkpoint_every=50,
                                              log_every=10),
        retrain=finetune_train_config(total_steps=100, learning_rate=3e-3, warmup_steps=10,
                                      schedule="cosine", batch_size=32, log_every=50),
        eval_every=10,              # validation accuracy every this many retrain steps
        keep_ratios=(0.1, 0.3),
        modes=("centres", "random_member", "drop_largest_half"),
        seeds=(0, 1, 2),
        kernels=("lpntk",),         # ntk_jax.selection.lpntk.KERNELS: + "sum_logits" (the paper's ablation)
        baselines=("random",),      # + "el2n", "grand" (ntk_jax.selection.pruning_scores)
        score_runs=3,               # EL2N / GraNd: averaged over this many short runs ...
        score_steps=20,             # ... of this many steps of the retrain schedule
        digits=dict(split_seed=0, cnn=dict(channels=(16, 32), hidden=64)),  # dataset="digits" only
        projection_dim=0,           # 0: exact features (LoRA P is small); else JL dimension
        projection_seed=0,
        projection_type="dense",    # or "factored" (per-layer Kronecker map; docs/kernels.md)
        feature_batch_size=64,
        shard_size=256,             # features in resumable shards of this many examples (features/)
    ))

DATASETS = ("text", "digits")
RETRAINS_DIR = "retrains"  # one JSON shard per (method, ratio, seed)
FEATURES_DIR = "features"  # the ScoreStore of the lpNTK features (scores: their norms)
REFERENCE_DIR = "reference"
SCORES_DIR = "scores"      # EL2N / GraNd, one npz per short run
BASELINES = ("random", "el2n", "grand")
COSINE = "_cosine"         # a kernel name + this: its cosine-normalised Gram matrix (a diagnostic)
SCORE_SEED = 10_000        # EL2N / GraNd runs use seeds SCORE_SEED + r, apart from the retrain seeds


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


def image_logits(model, batch: dict) -> jax.Array:
    """``(n, K)`` logits of an image classifier (:class:`ntk_jax.models.cnn.LeNet`) on ``batch["image"]``."""
    return model(batch["image"])


def image_loss(model, batch: dict) -> jax.Array:
    """Mean cross-entropy of an image classifier."""
    return optax.softmax_cross_entropy_with_integer_labels(image_logits(model, batch), batch["label"]).mean()


def make_accuracy_fn(subset, logits=class_logits):
    """``acc(params, batch) -> (accuracy, mean loss)`` (jitted once per batch shape) of the
    classifier ``logits(model, batch) -> (n, K)``."""
    logits_fn = subset.apply_fn(logits)

    @jit_constants_as_args
    def acc(params, batch):
        z = logits_fn(params, batch)
        loss = optax.softmax_cross_entropy_with_integer_labels(z, batch["label"]).mean()
        return jnp.mean(jnp.argmax(z, axis=1) == batch["label"]), loss

    return lambda params, batch: tuple(float(v) for v in acc(params, batch))


def _take(data: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in data.items()}


# ------------------------------------------------------------------------ the problems
@dataclasses.dataclass
class Problem:
    """A K-class problem to prune.

    ``train`` / ``val`` / ``test``: dicts of numpy arrays with a leading example axis, holding
    what ``logits`` reads and ``label (n,)`` int32. ``new_model(seed)``: a fresh classifier
    whose ``wrt`` parameters are trained with ``loss_fn(model, batch)`` (a module-level function:
    it is a static jit argument); ``logits(model, batch) -> (n, K)``. ``flipped``: the training
    rows whose label was flipped. ``setup``: facts for the report.
    """

    train: dict
    val: dict
    test: dict
    classes: list
    flipped: np.ndarray
    new_model: Callable[[int], nnx.Module]
    wrt: Any
    loss_fn: Callable
    logits: Callable
    setup: dict

    @property
    def labels(self) -> np.ndarray:
        return self.train["label"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def text_problem(c, ctx) -> Problem:
    """The LoRA classifier on the synthetic task ``c.task`` (``n_train`` / ``n_val`` / ``n_test``)."""
    recs = {split: generate_task(c.task, int(getattr(c, f"n_{split}")), seed=ctx.seed + off)
            for split, off in (("train", 0), ("val", 101), ("test", 202))}
    classes = sorted({r["response"] for split in recs.values() for r in split})
    if len(classes) < 2:
        raise ValueError(f"task {c.task!r} has {len(classes)} distinct response(s); lpNTK pruning needs >= 2 classes")
    data = {s: classification_data(ctx.encode(r), r, classes) for s, r in recs.items()}
    train_data, flipped = flip_labels(data["train"], float(c.label_noise), len(classes), ctx.seed)
    lora = LoRAConfig.from_dict(dict(c.lora))
    return Problem(train_data, data["val"], data["test"], classes, flipped,
                   lambda seed: ctx.load_model(lora, seed=int(seed)), nnx.LoRAParam, classifier_loss, class_logits,
                   {"dataset": "text", "task": c.task, "lora": dict(c.lora), "model": ctx.info})


def digits_problem(c, ctx) -> Problem:
    """The LeNet-like CNN on scikit-learn's digits (``n_val`` / ``n_test``; ``n_train=0``: the rest)."""
    d = c.digits
    splits = digits_splits(int(c.n_val), int(c.n_test), int(d.split_seed), n_train=int(c.n_train))
    data = {s: {"image": splits[s]["image"], "label": splits[s]["label"]} for s in ("train", "val", "test")}
    classes = [str(i) for i in range(NUM_CLASSES)]
    train_data, flipped = flip_labels(data["train"], float(c.label_noise), len(classes), ctx.seed)
    cnn = LeNetConfig.from_dict({**dict(d.cnn), "num_classes": len(classes), "image_shape": IMAGE_SHAPE})

    def new_model(seed: int) -> nnx.Module:
        return LeNet(cnn, rngs=nnx.Rngs(int(seed)))

    return Problem(train_data, data["val"], data["test"], classes, flipped, new_model, nnx.Param, image_loss,
                   image_logits, {"dataset": "digits (sklearn load_digits, 8x8)", "split_seed": int(d.split_seed),
                                  "cnn": cnn.to_dict(), "n_params": num_params(new_model(0))})


# ------------------------------------------------------------------------ the stages
def fit(problem: Problem, data: dict, train_section, acc_fn, seed: int, eval_every: int) -> dict:
    """A fresh classifier trained on ``data`` for a fixed number of steps; validation accuracy
    every ``eval_every`` steps (and at steps 0 and the last). Returns the best-validation
    checkpoint (earliest on ties): ``{"step", "val_acc", "val_loss", "params", "curve",
    "n_train", "train_s"}``."""
    n = len(data["label"])
    cfg = TrainConfig.from_dict({**dict(train_section), "seed": int(seed),
                                 "batch_size": min(int(train_section.batch_size), n)})
    model = problem.new_model(int(seed))
    best = {"val_acc": -1.0}
    curve = []

    def callback(step, params):
        if step % int(eval_every) and step != cfg.total_steps:
            return
        val_acc, val_loss = acc_fn(params, problem.val)
        curve.append({"step": step, "val_acc": val_acc, "val_loss": val_loss})
        if val_acc > best["val_acc"]:
            best.update(step=step, val_acc=val_acc, val_loss=val_loss, params=params)

    t = time.time()
    train(model, data, cfg, wrt=problem.wrt, loss_fn=problem.loss_fn, callback=callback)
    return {**best, "curve": curve, "n_train": n, "train_s": time.time() - t}


def reference(c, problem: Problem, out_dir: str, seed: int):
    """Stage 1: the reference classifier at its best-validation checkpoint, kept in
    ``reference/best.npz`` (+ ``best.json``) and reused on restart (training it again from
    scratch is deterministic). Returns ``(params, template subset, acc_fn, info)``."""
    template = param_subset(problem.new_model(int(seed)), problem.wrt)
    acc_fn = make_accuracy_fn(template, problem.logits)
    npz, info_path = (os.path.join(out_dir, REFERENCE_DIR, f"best.{x}") for x in ("npz", "json"))
    treedef = jax.tree.structure(template.params)
    if os.path.exists(info_path):
        with np.load(npz) as z:
            params = jax.tree.unflatten(treedef, [jnp.asarray(z[f"leaf_{i}"]) for i in range(treedef.num_leaves)])
        info = read_json(info_path)
    else:
        res = fit(problem, problem.train, c.reference_train, acc_fn, seed, int(c.eval_every))
        params = res.pop("params")
        write_npz(npz, **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
        info = {**res, "seconds": res.pop("train_s")}
        write_json(info_path, info)
    info = {**info, "train_acc": acc_fn(params, problem.train)[0], "test_acc": acc_fn(params, problem.test)[0]}
    return params, template, acc_fn, info


def kernel_features(c, out_dir: str, fingerprint: str, template, params, problem: Problem,
                    kernel: str) -> tuple[np.ndarray, float]:
    """Stage 2: the ``kernel`` features of the training set at ``params``, in the resumable
    shards of a :class:`~ntk_jax.selection.store.ScoreStore` (``features/`` for lpNTK,
    ``features_<kernel>/`` else; scores: the feature norms). Returns ``(features (n, P or p),
    compute seconds)``."""
    projection = make_projection(int(c.projection_dim), int(c.projection_seed), str(c.projection_type))
    batch = problem.train
    logits_fn = template.apply_fn(problem.logits)
    name = FEATURES_DIR if kernel == "lpntk" else f"{FEATURES_DIR}_{kernel}"
    store = ScoreStore(os.path.join(out_dir, name), [str(i) for i in range(len(batch["label"]))],
                       int(c.shard_size), fingerprint)

    def features(lo, hi):
        phi = lpntk_features(logits_fn, params, {k: v[lo:hi] for k, v in batch.items()},
                             num_classes=problem.num_classes, projection=projection,
                             batch_size=int(c.feature_batch_size), progress_desc=None, kernel=kernel)
        return np.linalg.norm(phi, axis=1), phi

    fill_store(store, features, desc=f"{kernel} features", with_features=True)
    _, _, feats = store.merge(with_features=True)
    return feats, store.compute_seconds()


def describe_kernel(kernel: np.ndarray, labels: np.ndarray, flipped: np.ndarray) -> dict:
    """Same- / other-class means, the share of negative entries, and the redundancy structure:
    quantiles over examples of the cosine (normalised kernel) to the most similar other example
    of the same class."""
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(labels), dtype=bool)
    d = np.sqrt(np.clip(np.diag(kernel), 1e-30, None))
    cos = kernel / d[:, None] / d[None, :]
    nearest = np.where(same & off_diag, cos, -np.inf).max(axis=1)
    out = {"mean_same_class": float(kernel[same & off_diag].mean()), "mean_other_class": float(kernel[~same].mean()),
           "frac_negative": float(np.mean(kernel[off_diag] < 0)),
           "nearest_same_class_cosine_quantiles": {str(q): float(np.quantile(nearest[np.isfinite(nearest)], q))
                                                   for q in (0.1, 0.5, 0.9)}}
    if flipped.size:
        clean = np.setdiff1d(np.arange(len(labels)), flipped)
        out["mean_flipped_vs_clean_same_label"] = float(np.mean(
            [kernel[i, clean[labels[clean] == labels[i]]].mean() for i in flipped]))
    return out


def pruning_scores(c, problem: Problem, template, out_dir: str) -> dict:
    """Stage 3: EL2N and GraNd (those in ``c.baselines``), each averaged over ``c.score_runs``
    fresh models trained for ``c.score_steps`` steps of the retrain schedule (seeds
    ``SCORE_SEED + r``, apart from the retrain seeds); one ``scores/run_<r>.npz`` per run,
    reused on restart. Returns ``{name: (n,) scores}``."""
    wanted = [b for b in ("el2n", "grand") if b in c.baselines]
    if not wanted:
        return {}
    logits_fn = template.apply_fn(problem.logits)
    runs = {b: [] for b in wanted}
    for r in progress(range(int(c.score_runs)), desc="EL2N/GraNd runs"):
        path = os.path.join(out_dir, SCORES_DIR, f"run_{r}.npz")
        if not os.path.exists(path):
            n = len(problem.labels)
            cfg = TrainConfig.from_dict({**dict(c.retrain), "seed": SCORE_SEED + r,
                                         "batch_size": min(int(c.retrain.batch_size), n)})
            res = train(problem.new_model(SCORE_SEED + r), problem.train, cfg, wrt=problem.wrt,
                        loss_fn=problem.loss_fn, stop_at=int(c.score_steps))
            write_npz(path, el2n=el2n_scores(logits_fn, res.params, problem.train),
                      grand=grand_scores(logits_fn, res.params, problem.train,
                                         batch_size=int(c.feature_batch_size)))
        with np.load(path) as z:
            for b in wanted:
                runs[b].append(z[b])
    return {b: average_runs(v) for b, v in runs.items()}


def _kernel_sets(c, name: str, kernel: np.ndarray, labels: np.ndarray, ratio: float, subsets: dict) -> dict:
    """Clusters of one kernel at one ratio; adds the sets of every mode (and the count-matched
    random sets of ``drop_largest_half``) to ``subsets``; returns facts about the clusters."""
    prefix = "" if name == "lpntk" else f"{name}-"
    cl = class_clusters(kernel, labels, ratio)
    sizes = {int(k): np.bincount(v["assignment"]) for k, v in cl.items()}
    for mode in c.modes:
        for seed in c.seeds:
            subsets[f"{prefix}{mode}/{ratio}/{seed}"] = kept = prune_clusters(cl, mode, seed)
            if mode == "drop_largest_half" and "random" in c.baselines:
                counts = {cls: int(np.sum(labels[kept] == cls)) for cls in cl}
                subsets[f"{prefix}random_drop_half_count/{ratio}/{seed}"] = random_prune(labels, counts, seed)
    # within-class rank of the diagonal K_ii (0 smallest, 1 largest): which examples become centres
    rank = np.zeros(len(labels))
    for v in cl.values():
        rank[v["members"]] = np.argsort(np.argsort(np.diag(kernel)[v["members"]])) / max(len(v["members"]) - 1, 1)
    centres = np.concatenate([v["centres"] for v in cl.values()])
    dropped = np.setdiff1d(np.arange(len(labels)), centres)
    return {"largest": {k: int(s.max()) for k, s in sizes.items()},
            "n_clusters": {k: int(s.size) for k, s in sizes.items()},
            "frac_in_singletons": float(sum(int(np.sum(s == 1)) for s in sizes.values()) / len(labels)),
            "diag_rank_centres": float(rank[centres].mean()),
            "diag_rank_not_centres": float(rank[dropped].mean()) if dropped.size else None}


def pruned_sets(c, kernels: dict, labels: np.ndarray, scores: dict) -> tuple[dict, dict]:
    """Stage 4: ``{"<method>/<ratio>/<seed>": sorted kept indices}`` for every kernel mode and
    baseline, and facts about the clusters per ``<kernel>/<ratio>``."""
    subsets, clusters_info = {}, {}
    classes = sorted(int(k) for k in np.unique(labels))
    for ratio in (float(r) for r in c.keep_ratios):
        counts = cluster_counts({k: int(np.sum(labels == k)) for k in classes}, ratio)
        for name, kernel in kernels.items():
            clusters_info[f"{name}/{ratio}"] = _kernel_sets(c, name, kernel, labels, ratio, subsets)
        for seed in c.seeds:
            if "random" in c.baselines:
                subsets[f"random/{ratio}/{seed}"] = random_prune(labels, counts, seed)
            for b, s in scores.items():
                subsets[f"{b}/{ratio}/{seed}"] = keep_highest(s, labels, counts)
    return subsets, clusters_info


def retrain_all(c, problem: Problem, subsets: dict, acc_fn, out_dir: str) -> dict:
    """Stage 5: a fresh classifier per pruned set and seed (and on the full set), test accuracy
    at its best-validation checkpoint; one shard ``retrains/<method>_<ratio>_<seed>.json``
    each, skipped when present. Returns ``{key: result}``."""
    keys = [f"full/1.0/{s}" for s in c.seeds] + list(subsets)
    done = {}
    for key in progress(keys, desc="retrain"):
        path = os.path.join(out_dir, RETRAINS_DIR, key.replace("/", "_") + ".json")
        if os.path.exists(path):
            done[key] = read_json(path)
            continue
        mode, _, seed = key.split("/")
        idx = np.arange(len(problem.labels)) if mode == "full" else subsets[key]
        res = fit(problem, _take(problem.train, idx), c.retrain, acc_fn, int(seed), int(c.eval_every))
        res["test_acc"], res["test_loss"] = acc_fn(res.pop("params"), problem.test)
        res["n_flipped_kept"] = int(np.isin(idx, problem.flipped).sum())
        write_json(path, res)
        done[key] = res
    return done


def baseline_of(mode: str) -> str | None:
    """The random baseline a method is paired with (same per-class counts), or None."""
    if mode == "full" or mode == "random" or mode.endswith("random_drop_half_count"):
        return None
    if mode.endswith("drop_largest_half"):
        return mode[:-len("drop_largest_half")] + "random_drop_half_count"
    return "random"


def _interval(values) -> dict:
    return bootstrap_interval(lambda v: float(np.mean(v)), np.asarray(values, np.float64))


def summarise(done: dict, n_train: int) -> list[dict]:
    """Stage 6: per (method, ratio): test accuracy over seeds (mean, std, 95 % bootstrap
    interval of the mean) and the paired per-seed difference to its random baseline
    (:func:`baseline_of`) with its interval and a verdict (``beats`` / ``worse``: the interval
    excludes 0; ``matches``: it contains 0)."""
    rows = {}
    for key in sorted(done, key=lambda k: int(k.split("/")[2])):
        mode, ratio, seed = key.split("/")
        fresh = {"mode": mode, "keep_ratio": float(ratio), "seeds": [], "test_acc": [], "val_acc": [],
                 "n_train": [], "n_flipped_kept": []}
        row = rows.setdefault((mode, float(ratio)), fresh)
        row["seeds"].append(int(seed))
        for f in ("test_acc", "val_acc", "n_train", "n_flipped_kept"):
            row[f].append(done[key][f])
    for (mode, ratio), row in rows.items():
        acc = np.asarray(row["test_acc"])
        row.update(test_acc_mean=float(acc.mean()), test_acc_std=float(acc.std()), test_acc_ci95=_interval(acc),
                   kept_fraction=float(np.mean(row["n_train"])) / n_train)
        base = rows.get((baseline_of(mode), ratio))
        if base is not None:
            theirs = dict(zip(base["seeds"], base["test_acc"]))
            diff = [a - theirs[s] for s, a in zip(row["seeds"], row["test_acc"]) if s in theirs]
            ci = _interval(diff)
            verdict = ("beats" if ci["low"] is not None and ci["low"] > 0 else
                       "worse" if ci["high"] is not None and ci["high"] < 0 else "matches")
            row["vs_random"] = {"baseline": base["mode"], **ci, "verdict": verdict}
    return sorted(rows.values(), key=lambda r: (-r["keep_ratio"], r["mode"]))


def run(config, out_dir: str, ctx) -> dict:
    c = config.prune_lpntk
    t0 = time.time()
    if c.dataset not in DATASETS:
        raise ValueError(f"prune_lpntk.dataset must be one of {DATASETS}, got {c.dataset!r}")
    payload = {"section": c.to_dict(), "seed": int(ctx.seed)}
    if c.dataset == "text":
        payload["model_dir"] = os.path.abspath(ctx.model_dir)
    fingerprint = check_workdir_fingerprint(out_dir, payload, "prune_lpntk")
    problem = (text_problem if c.dataset == "text" else digits_problem)(c, ctx)
    params, template, acc_fn, ref = reference(c, problem, out_dir, int(ctx.seed))
    kernels, kernel_stats, feature_s = {}, {}, 0.0
    for name in c.kernels:
        base = name[:-len(COSINE)] if name.endswith(COSINE) else name
        feats, seconds = kernel_features(c, out_dir, fingerprint, template, params, problem, base)
        kernels[name] = lpntk_kernel(feats, problem.num_classes)
        if name != base:
            kernels[name] = cosine_kernel(kernels[name])
        kernel_stats[name] = describe_kernel(kernels[name], problem.labels, problem.flipped)
        feature_s += seconds
    t = time.time()
    scores = pruning_scores(c, problem, template, out_dir)
    score_s = time.time() - t
    subsets, clusters_info = pruned_sets(c, kernels, problem.labels, scores)
    done = retrain_all(c, problem, subsets, acc_fn, out_dir)
    report = {
        "experiment": "prune_lpntk",
        "setup": {**problem.setup, "classes": problem.classes, "n_train": len(problem.labels),
                  "n_val": len(problem.val["label"]), "n_test": len(problem.test["label"]),
                  "label_noise": float(c.label_noise), "n_flipped": int(problem.flipped.size),
                  "reference_train": dict(c.reference_train), "retrain": dict(c.retrain),
                  "seeds": list(c.seeds), "keep_ratios": list(c.keep_ratios), "modes": list(c.modes),
                  "kernels": list(c.kernels), "baselines": list(c.baselines), "score_runs": int(c.score_runs),
                  "score_steps": int(c.score_steps), "projection_dim": int(c.projection_dim),
                  "selection": "checkpoint with the best validation accuracy (earliest on ties); "
                               "test accuracy reported at that checkpoint"},
        "reference": ref, "kernel": kernel_stats, "clusters": clusters_info,
        "kept_scores": kept_score_means(subsets, scores), "overlap": set_overlaps(subsets, c.keep_ratios),
        "table": summarise(done, len(problem.labels)),
        "timings": {"features_s": feature_s, "reference_s": ref["seconds"], "scores_s": score_s,
                    "retrain_s": float(sum(r["train_s"] for r in done.values())), "total_s": time.time() - t0},
    }
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(table_markdown(report))
    report["plots"] = [plot(report, os.path.join(out_dir, "prune_lpntk.png"))]
    return report


def set_overlaps(subsets: dict, ratios, reference_set: str = "centres") -> dict:
    """Jaccard overlap of the first seed's ``reference_set`` with every other method's first-seed
    set at each ratio: ``{"<ratio>": {method: |A∩B| / |A∪B|}}`` (which methods keep the same
    examples)."""
    out = {}
    for ratio in (float(r) for r in ratios):
        first = {}
        for key, idx in subsets.items():
            method, q, _ = key.split("/")
            if float(q) == ratio:
                first.setdefault(method, set(idx.tolist()))
        if reference_set in first:
            a = first[reference_set]
            out[str(ratio)] = {m: len(a & b) / len(a | b) for m, b in first.items() if m != reference_set}
    return out


def kept_score_means(subsets: dict, scores: dict) -> dict:
    """Mean EL2N / GraNd of every pruned set of seed 0's kind (first seed): which examples a
    method keeps — hard (high score) or easy ones. ``{score: {"<method>/<ratio>": mean}}``."""
    out = {}
    for b, s in scores.items():
        out[b] = {"all": float(np.mean(s))}
        for key, idx in subsets.items():
            method, ratio, _ = key.split("/")
            out[b].setdefault(f"{method}/{ratio}", float(np.mean(s[idx])))
    return out


def summary(report: dict) -> dict:
    return {f"{r['mode']}@{r['keep_ratio']}": round(r["test_acc_mean"], 3) for r in report["table"]}


def _cell(r: dict) -> str:
    ci = r["test_acc_ci95"]
    band = f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci["low"] is not None else ""
    return f"{r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f}{band}"


def _diff_cell(r: dict) -> str:
    v = r.get("vs_random")
    if not v:
        return "—"
    band = f" [{v['low']:+.3f}, {v['high']:+.3f}]" if v["low"] is not None else ""
    return f"{v['value']:+.3f}{band} {v['verdict']}"


def table_markdown(report: dict) -> str:
    """Two markdown tables, methods × keep ratios: test accuracy (mean ± std over seeds, 95 %
    bootstrap interval of the mean), and the paired difference to the random baseline."""
    rows = report["table"]
    ratios = sorted({r["keep_ratio"] for r in rows if r["mode"] != "full"}, reverse=True)
    methods = sorted({r["mode"] for r in rows if r["mode"] != "full"})
    at = {(r["mode"], r["keep_ratio"]): r for r in rows}
    head = "| method | " + " | ".join(f"keep {q:g}" for q in ratios) + " |\n|---|" + "---|" * len(ratios) + "\n"
    out = [f"Test accuracy at the best-validation checkpoint, mean ± std over {len(report['setup']['seeds'])} "
           "seeds [95 % bootstrap interval of the mean]:\n\n", head]
    full = [r for r in rows if r["mode"] == "full"]
    if full:
        out.append(f"| full data | {_cell(full[0])} |" + " |" * (len(ratios) - 1) + "\n")
    for m in methods:
        out.append(f"| {m} | " + " | ".join(_cell(at[m, q]) if (m, q) in at else "—" for q in ratios) + " |\n")
    odd = [m for m in methods if any(abs(at[m, q]["kept_fraction"] - q) > 0.02 for q in ratios if (m, q) in at)]
    if odd:
        out += ["\nKept fraction of the training set where it is not the nominal ratio "
                "(`⌊ratio · class size⌋` per class):\n\n", head]
        for m in odd:
            out.append(f"| {m} | " + " | ".join(f"{at[m, q]['kept_fraction']:.3f}" if (m, q) in at else "—"
                                                for q in ratios) + " |\n")
    out += ["\nPaired (same retrain seed) difference to the random baseline with the same per-class "
            "counts [95 % bootstrap interval]:\n\n", head]
    for m in methods:
        if baseline_of(m):
            out.append(f"| {m} − {baseline_of(m)} | " + " | ".join(
                _diff_cell(at[m, q]) if (m, q) in at else "—" for q in ratios) + " |\n")
    return "".join(out)


def plot(report: dict, path: str) -> str:
    """Test accuracy (mean, 95 % interval) against the kept ratio, one line per method, and the
    paired difference to the random baseline."""
    rows = [r for r in report["table"] if r["mode"] != "full"]
    full = [r for r in report["table"] if r["mode"] == "full"]
    fig, axes = subplots(2, width=6.0, height=4.6)
    methods = sorted({r["mode"] for r in rows})
    colours = matplotlib.colormaps["tab20"](np.linspace(0.0, 1.0, max(len(methods), 2)))
    for j, m in enumerate(methods):
        mine = sorted((r for r in rows if r["mode"] == m), key=lambda r: r["keep_ratio"])
        q = np.array([r["keep_ratio"] for r in mine]) + (j - (len(methods) - 1) / 2) * 0.004  # dodge
        y = np.array([r["test_acc_mean"] for r in mine])
        ci = [r["test_acc_ci95"] for r in mine]
        lo = np.array([c["low"] if c["low"] is not None else v for c, v in zip(ci, y)])
        hi = np.array([c["high"] if c["high"] is not None else v for c, v in zip(ci, y)])
        style = "--" if baseline_of(m) is None else "-"
        axes[0].errorbar(q, y, yerr=[y - lo, hi - y], marker="o", ms=3, capsize=2, ls=style, label=m,
                         color=colours[j])
        d = [r for r in mine if r.get("vs_random") and r["vs_random"]["low"] is not None]
        if d:
            v = np.array([r["vs_random"]["value"] for r in d])
            axes[1].errorbar(q[[mine.index(r) for r in d]], v, yerr=[v - [r["vs_random"]["low"] for r in d],
                                                                     [r["vs_random"]["high"] for r in d] - v],
                             marker="o", ms=3, capsize=2, label=m, color=colours[j])
    if full:
        axes[0].axhline(full[0]["test_acc_mean"], color="k", ls=":", label="full data")
    axes[1].axhline(0.0, color="k", lw=0.8)
    title = report["setup"].get("task", "digits") if report["setup"]["dataset"] == "text" else "digits"
    axes[0].set(xlabel="kept ratio", ylabel="test accuracy (val-selected)", title=f"pruning: {title}")
    axes[1].set(xlabel="kept ratio", ylabel="test acc − random (paired)", title="difference to random (95 % CI)")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].legend(fontsize=6, ncol=2)
    return save(fig, path)
