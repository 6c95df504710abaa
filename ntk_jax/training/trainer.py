"""A minimal, exactly resumable fine-tuning loop (docs/theory.md §8.2).

    result = train(model, data, TrainConfig(total_steps=200), wrt=nnx.LoRAParam, workdir="run")

* Only the parameters selected by the NNX filter ``wrt`` are trained (``nnx.LoRAParam``: the
  LoRA factors; ``nnx.Param``: everything, for pre-training). The step is a ``jax.jit`` over
  the pure-dict parameters (:func:`ntk_jax.models.subset.param_subset`) and the optax state.
* Steps are numbered from 1: "step s" is the state after s updates; step 0 is the initial one.
  Update s (producing step s) uses learning rate ``schedule(s - 1)`` (optax's count), the
  batch ``batch_indices(n, batch_size, seed, s - 1)`` — a pure function of (seed, s) — and the
  dropout key ``fold_in(key(seed), s - 1)`` (RNG stream i of the model, in graph order, is
  reset to ``fold_in(that key, i)`` before the step). A run killed and resumed from a checkpoint
  therefore replays exactly the same updates as an uninterrupted one.
* With ``workdir``: orbax checkpoints of ``{params, opt_state, step}`` in
  ``workdir/checkpoints`` every ``checkpoint_every`` steps and at the end, resumed from the
  latest on entry; metrics appended to ``workdir/metrics.jsonl`` (lines after the restored
  step are dropped first, so the file never holds a step twice).
* Device meshes: a model laid out on a ``("data", "model")`` mesh (``from_pretrained(mesh=)``,
  :func:`ntk_jax.models.sharding.shard_model`, ``Context.load_model`` under ``config.mesh``)
  is trained data-parallel: every batch is split over the mesh's ``data`` axis
  (``mesh=`` overrides the mesh read from the model). With the default loss a batch whose size
  is not a multiple of the ``data`` size is padded with rows of zero ``loss_mask`` (the
  token-mean loss and its gradient are unchanged); :func:`evaluate` pads the same way.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ntk_jax.mesh import data_size, onto_mesh, place_rows, resolve_mesh, round_up_to_data
from ntk_jax.models.subset import merge_params, param_subset
from ntk_jax.utils import DictConfig, atomic_write
from ntk_jax.training.losses import lm_loss, token_log_probs

PyTree = Any

__all__ = [
    "TrainConfig",
    "TrainResult",
    "make_schedule",
    "make_optimizer",
    "batch_indices",
    "train",
    "evaluate",
    "read_metrics",
]

SCHEDULES = ("cosine", "linear", "constant")
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class TrainConfig(DictConfig):
    """Optimisation hyper-parameters.

    ``eval_every=0``: evaluate only at the end (when ``eval_data`` is given).
    ``checkpoint_every=0``: checkpoint only at the end (when ``workdir`` is given).
    ``log_every``: write a metrics record every this many steps (and at the last step).
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 10
    total_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 16
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 1
    max_to_keep: int = 2

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.total_steps < 0 or self.warmup_steps < 0:
            raise ValueError(f"total_steps ({self.total_steps}) and warmup_steps ({self.warmup_steps}) "
                             "must be non-negative")
        if not 0 <= int(self.seed) < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        for name in ("eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_to_keep is not None and self.max_to_keep <= 0:
            raise ValueError(f"max_to_keep must be positive, got {self.max_to_keep}")
        if self.learning_rate < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("learning_rate, weight_decay and grad_clip must be non-negative")



@dataclasses.dataclass
class TrainResult:
    """``params``: trained subset (pure dict); ``history``: metrics records (including those
    of earlier runs in the same workdir); ``final_step``: the last completed step."""

    params: PyTree
    history: list[dict]
    final_step: int


# ---------------------------------------------------------------------------------------
# Schedule and optimiser


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate as a function of optax's update count ``c`` (0 for the first update).

    ``W = warmup_steps``, ``D = max(total_steps - W, 1)``, ``η = learning_rate``:
    ``c < W``: ``η c / W``; then with ``t = min(c - W, D) / D``: cosine ``η (1 + cos πt) / 2``,
    linear ``η (1 - t)``, constant ``η``.
    """
    peak = float(cfg.learning_rate)
    W = int(cfg.warmup_steps)
    D = max(int(cfg.total_steps) - W, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, D, alpha=0.0)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, 0.0, D)
    else:
        decay = optax.constant_schedule(peak)
    if W == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, W), decay], [W])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip)`` (skipped when 0) → AdamW with :func:`make_schedule`."""
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(make_schedule(cfg), weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------
# Data


def _as_numpy_data(data: Mapping[str, Any], name: str) -> tuple[dict[str, np.ndarray], int]:
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{name} must be a non-empty dict of arrays with a leading example axis")
    out = {}
    for k, v in data.items():
        a = np.asarray(v)
        if a.dtype.kind not in "biuf":  # ids, strings, objects: not fed to the model
            continue
        out[k] = a
    if not out:
        raise ValueError(f"{name} holds no numeric arrays (keys {sorted(data)})")
    sizes = {k: a.shape[0] if a.ndim else None for k, a in out.items()}
    n_set = set(sizes.values())
    if len(n_set) != 1 or None in n_set:
        raise ValueError(f"{name}: arrays disagree on the leading (example) axis: {sizes}")
    return out, n_set.pop()


def batch_indices(n: int, batch_size: int, seed: int, update: int) -> np.ndarray:
    """Example indices of update ``update`` (0-based): a pure function of (seed, update).

    Epoch ``e = update // (n // batch_size)`` shuffles with ``default_rng([seed, e])``; the
    last ``n % batch_size`` examples of each permutation are dropped.
    """
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{n} examples are fewer than batch_size={batch_size}")
    epoch, i = divmod(int(update), steps_per_epoch)
    perm = np.random.default_rng([int(seed), epoch]).permutation(n)
    return perm[i * batch_size:(i + 1) * batch_size]


def _take(data: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in data.items()}


def _padded_batch(data: dict[str, np.ndarray], idx: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Rows ``idx`` of ``data``, padded to ``size`` rows with copies of the first row whose
    ``loss_mask`` is zero (they carry no weight in the masked token-mean loss)."""
    batch = _take(data, idx)
    if len(idx) < size:
        if "loss_mask" not in batch:
            raise ValueError("padding a batch to a multiple of the mesh's data axis needs a 'loss_mask' array")
        fill = np.zeros(size - len(idx), dtype=np.int64)
        batch = {k: np.concatenate([v, v[fill]]) for k, v in batch.items()}
        batch["loss_mask"][len(idx):] = 0
    return batch


# ---------------------------------------------------------------------------------------
# Jitted step and evaluation (module-level so compilations are shared between calls)


def _reseed_streams(model: nnx.Module, key) -> None:
    """Sets every RNG stream of ``model`` (whatever its tag) to ``fold_in(key, i)``, i its
    position in graph order, with count 0. Dropout streams of modules built with a plain
    ``nnx.Rngs(seed)`` carry the tag ``'default'``, so reseeding only ``'dropout'`` would miss
    them; and since the frozen state is not threaded through the step, a stream left alone
    would give the same mask at every step."""
    i = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.RngStream):
            k = jax.random.fold_in(key, i)
            shape = tuple(node.key.shape)
            if shape:
                k = jax.random.split(k, int(np.prod(shape))).reshape(shape)
            node.key.set_value(k)
            node.count.set_value(jnp.zeros(shape, jnp.uint32))
            i += 1


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "loss_fn", "layout"))
def train_step_program(params, opt_state, template, frozen, batch, seed, update, *, graphdef, cfg, loss_fn, layout=None):
    # ``cfg`` is static (it builds the optimiser); fields that do not affect the step are
    # normalised by ``step_config`` so that changing them does not recompile.
    # ``layout``: on a mesh, the shardings of the (params, opt_state) leaves, pinned on the
    # outputs (else XLA may lay a replicated factor out differently, and the next step would
    # compile again for the new input layout).
    key = jax.random.fold_in(jax.random.key(seed), update)

    def loss_of(p):
        model = merge_params(graphdef, template, p, frozen)
        _reseed_streams(model, key)
        return loss_fn(model, batch)

    loss, grads = jax.value_and_grad(loss_of)(params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = make_optimizer(cfg).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if layout is not None:
        leaves, treedef = jax.tree.flatten((params, opt_state))
        params, opt_state = jax.tree.unflatten(
            treedef, [jax.lax.with_sharding_constraint(x, s) for x, s in zip(leaves, layout)])
    return params, opt_state, loss, grad_norm


def step_config(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, batch_size=1, seed=0, eval_every=0, checkpoint_every=0,
                               log_every=1, max_to_keep=1)


def _call_model(model, batch):
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"))


def _lm_sums(logits, batch):
    nll = -token_log_probs(logits, batch["targets"])
    m = jnp.asarray(batch["loss_mask"], jnp.float32)
    return jnp.sum(m * nll), jnp.sum(m)


def _eval_sums(model, batch, loss_fn):
    """``(loss sum, weight)`` of one batch: the masked LM sums (``loss_fn=None``), or
    ``loss_fn``'s mean weighted by the batch size."""
    if loss_fn is None:
        return _lm_sums(_call_model(model, batch), batch)
    return loss_fn(model, batch), jnp.asarray(batch["input_ids"].shape[0], jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_fn"))
def _eval_state_step(state, batch, *, graphdef, loss_fn):
    model = nnx.merge(graphdef, state)
    model.eval()
    return _eval_sums(model, batch, loss_fn)


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_fn"))
def _eval_subset_step(params, template, frozen, batch, *, graphdef, loss_fn):
    return _eval_sums(merge_params(graphdef, template, params, frozen), batch, loss_fn)


def _run_eval(step_fn: Callable[[dict], tuple[Any, Any]], data: Mapping[str, Any], batch_size: int,
              pad: bool, mesh=None) -> float:
    """Sums ``step_fn`` over batches of ``data``. ``pad``: the masked LM loss (partial batches
    padded with zero-weight rows, to ``batch_size`` rounded up to a multiple of the mesh's
    data axis); otherwise per-batch losses weighted by batch size (batches split over the
    mesh only when their size is a multiple of its data axis)."""
    arrays, n = _as_numpy_data(data, "eval data")
    if pad and "loss_mask" not in arrays:
        raise ValueError("eval data needs a 'loss_mask' array for the masked LM loss")
    if pad:
        batch_size = round_up_to_data(batch_size, mesh)
    total, weight = 0.0, 0.0
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        if pad:  # zero-weight rows fill a partial batch: one compiled shape
            batch = place_rows(_padded_batch(arrays, idx, batch_size), mesh)
        else:
            batch = _take(arrays, idx)
            if len(idx) % data_size(mesh) == 0:
                batch = place_rows(batch, mesh)
        s, w = step_fn(batch)
        total += float(s) if pad else float(s) * float(w)
        weight += float(w)
    if pad:
        return total / max(weight, 1.0)
    return total / weight


def evaluate(model_or_fn: nnx.Module | Callable[[dict], jax.Array], data: Mapping[str, Any],
             batch_size: int, *, loss_fn: Callable | None = None, mesh=None) -> float:
    """Mean masked LM loss of a model (or of ``fn(batch) -> logits``) on ``data``.

    Default: token-weighted mean ``Σ m·nll / max(Σ m, 1)`` over the whole data set (the last
    partial batch is padded with zero-weight rows). A module is evaluated in eval mode
    (dropout off) without changing the module itself. With ``loss_fn(model, batch) -> scalar``
    (modules only) the per-batch losses are averaged weighted by batch size.
    ``mesh``: batches are split over its ``data`` axis (default: the mesh the module lives
    on; see the module docstring).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(model_or_fn, nnx.Module):
        graphdef, state = nnx.split(model_or_fn)
        mesh = resolve_mesh(mesh, state)

        def step_fn(batch):
            return _eval_state_step(state, batch, graphdef=graphdef, loss_fn=loss_fn)
    elif callable(model_or_fn):
        if loss_fn is not None:
            raise ValueError("loss_fn is only supported when evaluating an nnx.Module")

        def step_fn(batch):
            return _lm_sums(model_or_fn(batch), batch)
        mesh = resolve_mesh(mesh)
    else:
        raise TypeError(f"evaluate needs an nnx.Module or a callable, got {type(model_or_fn)}")
    return _run_eval(step_fn, data, batch_size, pad=loss_fn is None, mesh=mesh)


# ---------------------------------------------------------------------------------------
# Metrics file


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl`` file (empty list if it does not exist)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
    return out


def _truncate_metrics(path: str, step: int) -> list[dict]:
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    with atomic_write(path) as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    return kept


# ---------------------------------------------------------------------------------------
# Training


def checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int | None = None, read_only: bool = False):
    """An orbax ``CheckpointManager`` for ``directory`` (created unless ``read_only``) that
    involves only the calling process.

    Under ``jax.distributed`` orbax's default manager is collective (every save, restore and
    even its construction synchronise all processes), so a process training alone — a job
    that runs on process 0 while the others wait at a barrier — would block or fail. Training
    state here is process-local (replicated params, no cross-process sharding), so every
    process gets a manager of its own (``active_processes={this process}``); processes must
    therefore not write the same directory at the same time (``read_only=True``: a manager
    that only lists and restores, which any number of processes may open at once).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    if not read_only:
        os.makedirs(directory, exist_ok=True)
    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, create=False, read_only=read_only,
        save_interval_steps=0 if read_only else 1, multiprocessing_options=mp))


def _savable(tree: PyTree) -> PyTree:
    """``tree`` as orbax can save it from one process: under ``jax.distributed`` orbax refuses
    process-local ``jax.Array`` s, so they are saved as numpy copies (the same bytes)."""
    return jax.device_get(tree) if jax.process_count() > 1 else tree


def restore_checkpoint(mngr, step: int, target: PyTree) -> PyTree:
    """The state saved at ``step`` by :func:`train` (``{"params", "opt_state", "step"}``),
    restored into ``target``'s structure, shapes, dtypes and placements (jax arrays)."""
    import orbax.checkpoint as ocp

    if jax.process_count() > 1:  # see _savable: restored as numpy, then placed like target
        restored = mngr.restore(step, args=ocp.args.StandardRestore(jax.device_get(target)))
        return jax.tree.map(lambda r, t: jax.device_put(r, t.sharding) if isinstance(t, jax.Array)
                            else jnp.asarray(r), restored, target)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def train(model: nnx.Module, data: Mapping[str, Any], cfg: TrainConfig, *, wrt: Any = nnx.LoRAParam,
          workdir: str | os.PathLike | None = None, eval_data: Mapping[str, Any] | None = None,
          loss_fn: Callable[[nnx.Module, dict], jax.Array] | None = None,
          callback: Callable[[int, PyTree], None] | None = None,
          stop_at: int | None = None, mesh=None) -> TrainResult:
    """Trains the ``wrt`` subset of ``model`` on ``data`` for ``cfg.total_steps`` steps.

    Args:
      model: an NNX model; ``loss_fn(model, batch)`` must work on it.
      data: dict of arrays with a leading example axis (non-numeric arrays are ignored);
        the default loss needs ``input_ids``, ``targets``, ``loss_mask`` and optionally
        ``attention_mask``.
      cfg: :class:`TrainConfig`.
      wrt: NNX filter of the trained parameters (default: the LoRA factors).
      workdir: checkpoints and metrics; an existing checkpoint is resumed.
      eval_data: evaluated every ``cfg.eval_every`` steps and at the end (``eval_loss``).
      loss_fn: ``loss_fn(model, batch) -> scalar``; default :func:`ntk_jax.training.losses.lm_loss`.
        Must be hashable (a module-level function is) since it is a static jit argument.
      callback: ``callback(step, params)`` after every step, and with step 0 before the first
        step of a fresh (not resumed) run.
      stop_at: stop after this step as if the job were killed there, except that the step is
        checkpointed (when ``workdir`` is given); the schedule, the final evaluation and the
        final log record still follow ``cfg.total_steps``.
      mesh: split every batch over this mesh's ``data`` axis (default: the mesh the model's
        parameters live on; none: batches unplaced, as on one device). See the module
        docstring for the padding of batches.

    Returns:
      :class:`TrainResult`. ``model`` holds the trained parameters and is left in eval mode,
      also when an exception (e.g. from ``callback``) interrupts training.
    """
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_dict(cfg)
    loss_fn = lm_loss if loss_fn is None else loss_fn
    arrays, n = _as_numpy_data(data, "data")
    batch_indices(n, cfg.batch_size, cfg.seed, 0)  # validates n >= batch_size
    last = cfg.total_steps if stop_at is None else min(int(stop_at), cfg.total_steps)
    mesh = resolve_mesh(mesh, nnx.state(model))
    step_rows = round_up_to_data(cfg.batch_size, mesh)
    if step_rows != cfg.batch_size and loss_fn is not lm_loss:
        raise ValueError(f"batch_size={cfg.batch_size} is not a multiple of the mesh's data axis "
                         f"({data_size(mesh)}); with a custom loss_fn batches cannot be padded")

    model.train()
    train_sub = param_subset(model, wrt)
    model.eval()
    eval_sub = param_subset(model, wrt)
    frozen, template = train_sub.frozen, train_sub._template
    schedule = make_schedule(cfg)
    step_cfg = step_config(cfg)

    params = train_sub.params
    # On a mesh every leaf of the optimiser state (counters too) lives on it: jit needs all
    # arguments on one set of devices, and a restored checkpoint takes these placements.
    opt_state = onto_mesh(make_optimizer(cfg).init(params), mesh)
    step = 0
    history: list[dict] = []
    mngr = None
    metrics_path = None
    if workdir is not None:
        workdir = os.path.abspath(os.fspath(workdir))
        os.makedirs(workdir, exist_ok=True)
        metrics_path = os.path.join(workdir, METRICS_NAME)
        mngr = checkpoint_manager(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=cfg.max_to_keep)
        latest = mngr.latest_step()
        if latest is not None:
            target = {"params": params, "opt_state": opt_state, "step": jnp.asarray(0, jnp.int32)}
            restored = restore_checkpoint(mngr, latest, target)
            params, opt_state = restored["params"], restored["opt_state"]
            step = int(restored["step"])
        history = _truncate_metrics(metrics_path, step)

    def save(s):
        if mngr is not None and mngr.latest_step() != s:
            import orbax.checkpoint as ocp

            mngr.save(s, args=ocp.args.StandardSave(_savable(
                {"params": params, "opt_state": opt_state, "step": jnp.asarray(s, jnp.int32)})))

    def eval_loss():
        def step_fn(batch):
            return _eval_subset_step(params, eval_sub._template, eval_sub.frozen, batch,
                                     graphdef=eval_sub.graphdef,
                                     loss_fn=None if loss_fn is lm_loss else loss_fn)
        return _run_eval(step_fn, eval_data, cfg.batch_size, pad=loss_fn is lm_loss, mesh=mesh)

    from tqdm.auto import tqdm

    layout = None if mesh is None else tuple(x.sharding for x in jax.tree.leaves((params, opt_state)))
    pbar = tqdm(total=cfg.total_steps, initial=step, disable=None, desc="train", leave=False)
    try:
        if callback is not None and step == 0:
            callback(0, params)
        while step < last:
            update = step  # optax count of this update
            batch = place_rows(_padded_batch(arrays, batch_indices(n, cfg.batch_size, cfg.seed, update),
                                                step_rows), mesh)
            params, opt_state, loss, gnorm = train_step_program(
                params, opt_state, template, frozen, batch, jnp.asarray(cfg.seed, jnp.uint32),
                jnp.asarray(update, jnp.int32), graphdef=train_sub.graphdef, cfg=step_cfg,
                loss_fn=loss_fn, layout=layout)
            step += 1
            is_end = step == cfg.total_steps  # (not stop_at: a stop behaves like a kill)
            do_eval = eval_data is not None and (
                is_end or (cfg.eval_every > 0 and step % cfg.eval_every == 0))
            do_log = do_eval or is_end or (cfg.log_every > 0 and step % cfg.log_every == 0)
            if do_log:
                rec = {"step": step, "loss": float(loss), "lr": float(schedule(update)),
                       "grad_norm": float(gnorm)}
                if do_eval:
                    rec["eval_loss"] = eval_loss()
                history.append(rec)
                if metrics_path is not None:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                pbar.set_postfix(loss=f"{rec['loss']:.4f}")
            if step == last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0):
                save(step)
            pbar.update(1)
            if callback is not None:
                callback(step, params)
    finally:
        pbar.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()
        eval_sub.update_model(model, params)
        model.eval()
    return TrainResult(params=params, history=history, final_step=step)


def finetune_train_config(**overrides):
    """A LoRA fine-tuning section of a job config (an ``ml_collections.ConfigDict`` of
    :class:`TrainConfig` fields): lr 2e-3, 5 warm-up steps, 60 steps linear decay, batch 16,
    no weight decay, clip 1; ``overrides`` on top."""
    import ml_collections

    d = dict(learning_rate=2e-3, warmup_steps=5, total_steps=60, schedule="linear", weight_decay=0.0,
             grad_clip=1.0, batch_size=16, seed=0, eval_every=0, checkpoint_every=0, log_every=5,
             max_to_keep=1)
    d.update(overrides)
    return ml_collections.ConfigDict(d)
