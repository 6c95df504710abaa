"""First-order subset estimation (GradEx; docs/theory.md §6.4; Li, Zhang, Wang, Zhang, "Scalable
fine-tuning from multiple data sources: a first-order approximation approach", EMNLP 2024).

Which subset ``S`` of ``n`` auxiliary tasks should a model be fine-tuned on for a target task?
Instead of fine-tuning on every candidate ``S``, GradEx fine-tunes once on all tasks (the
*meta-initialisation* θ*) and estimates each subset's fine-tuned model to first order around θ*:

1. θ*: one multitask LoRA run on the union of the auxiliary tasks (:func:`meta_initialise`,
   a thin wrapper of :func:`ntk_jax.training.trainer.train`, resumable through its workdir).
2. Per example ``x`` the scalar output
   ``f(θ, x) = (1/|M_x|) Σ_{t∈M_x} log(q_t / (1 − q_t))`` over its loss-mask (response)
   positions ``M_x``, with ``q_t = softmax(z_t)[y_t]`` the probability of the correct next
   token clipped to ``[ε, 1 − ε]`` (:func:`mean_token_logit`, :func:`gradex_output_fn`), and
   its LoRA gradient at θ* projected to d dims: ``g̃(x) = Πᵀ ∇_θ f(θ*, x)`` with ``Π`` the
   ``(P, d)`` Rademacher matrix of :class:`ntk_jax.kernels.projection.RandomProjection`
   (entries ±1/√d; or the per-layer Kronecker map of
   :class:`ntk_jax.kernels.factored_projection.FactoredProjection`,
   ``gradex.projection_type="factored"``) — computed by
   :func:`ntk_jax.kernels.features.gradient_features`.
3. For a subset S: the logistic model in d dims, with the offset ``b_i = f(θ*, x_i)`` kept,

   ``w_S = argmin_w Σ_{i∈S} log(1 + exp(−(b_i + ⟨g̃_i, w⟩))) + ‖w‖² / (2C)``

   (:func:`fit_logistic`, Newton's method; convex), mapped back to the LoRA parameters as
   ``Δ_S = Π w_S`` (:func:`project_back`, the transpose of the projection; no rescaling), so
   that ``⟨∇f(x), Δ_S⟩ = ⟨g̃(x), w_S⟩`` exactly. The estimated target loss is that of the
   linearised model ``f(θ*, x) + ⟨∇f(x), Δ_S⟩`` on the target examples,
   ``L̂(S) = mean_j log(1 + exp(−(f(θ*, x_j) + ⟨g̃_j, w_S⟩)))`` (:func:`linearised_logistic_loss`),
   or of the real model at θ* + Δ_S (:class:`TargetLosses`, one forward pass).
4. Selection from the estimates: a random ensemble of subsets (each task in with probability
   1/2), task score = mean estimated target performance (−L̂) of the subsets containing the
   task, keep the top fraction (:func:`sample_subsets`, :func:`ensemble_task_scores`,
   :func:`select_top`); greedy forward selection (:func:`greedy_forward_selection`); a ridge
   linear surrogate of L̂ on subset-indicator vectors (:func:`fit_ridge_surrogate`).
5. Checking against truth on really fine-tuned subsets. The honest figures
   (:func:`estimator_metrics`): the error of the change :func:`change_error`
   ``Σ(est − true)² / Σ(true − L(θ*))²`` (1 = no better than predicting no change), and
   Spearman / Kendall of estimated vs true losses within each seed, with bootstrap intervals
   (:mod:`ntk_jax.stats`), always beside the trivial estimators that use no gradients: θ*'s
   loss, the leave-one-out mean of the verified subsets (:func:`leave_one_out_mean`) and
   ridge regressions on the subset indicators or the subset size fitted on the other real
   fine-tunes (:func:`leave_one_out_ridge`), or on only a few of them (:func:`few_fit_ridge`). The paper's ratio ``Σ(est − true)² / Σ true²``
   (:func:`relative_squared_error`) is kept, labelled as the level ratio: it is dominated by
   the loss level every subset shares, so θ*'s loss alone scores about as well.
   Diagnostics of why an estimate fails: :func:`first_order_target_loss` (the linearised
   model at a *given* displacement, e.g. the real fine-tune's) and :func:`tree_cosine`.

Scale: nothing is rescaled. The only knob that sets the size of Δ is ``C`` (the loss is a
*sum* over the subset's examples, as in docs/theory.md §6.4, so larger subsets are regularised less).
The paper's code drops the offset ``b_i`` and rescales Δ by hand; here the offset is kept.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from ntk_jax.data.encoding import LM_TRAIN_INPUTS
from ntk_jax.kernels.features import batch_size_of, gradient_features, pad_batch, slice_batch
from ntk_jax.kernels.outputs import default_lm_call
from ntk_jax.kernels.factored_projection import bind_projection
from ntk_jax.kernels.jit import jit_constants_as_args
from ntk_jax.kernels.projection import RandomProjection
from ntk_jax.models.subset import ParamSubset
from ntk_jax.training.losses import token_log_probs
from ntk_jax.training.trainer import TrainConfig, TrainResult, train
from ntk_jax.utils import progress

PyTree = Any

__all__ = [
    "mean_token_logit",
    "gradex_output_fn",
    "per_example_target_losses",
    "TargetLosses",
    "output_values",
    "projected_gradients",
    "meta_initialise",
    "project_back",
    "add_delta",
    "logistic_objective",
    "fit_logistic",
    "linearised_logistic_loss",
    "SubsetEstimator",
    "sample_subsets",
    "subset_key",
    "ensemble_task_scores",
    "select_top",
    "greedy_forward_selection",
    "RidgeSurrogate",
    "fit_ridge_surrogate",
    "relative_squared_error",
    "change_error",
    "leave_one_out_mean",
    "leave_one_out_ridge",
    "few_fit_ridge",
    "estimator_metrics",
    "first_order_target_loss",
    "tree_flatten_vector",
    "tree_cosine",
]

MODEL_INPUTS = LM_TRAIN_INPUTS


# ---------------------------------------------------------------------------------------
# The per-example output f and the target losses


def mean_token_logit(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                     clip_eps: float) -> jax.Array:
    """``f = Σ_t m_t log(q_t/(1−q_t)) / max(Σ_t m_t, 1)``: ``(n, T, V), (n, T), (n, T) → (n,)``.

    ``q_t = softmax(logits_t)[targets_t]``, clipped to ``[clip_eps, 1 − clip_eps]`` (so
    ``|f| ≤ log((1−ε)/ε)``; a clipped token contributes no gradient). ``log(1 − q)`` is taken
    as ``log(−expm1(log q))``, accurate also for q close to 1.
    """
    if not 0.0 < clip_eps < 0.5:
        raise ValueError(f"clip_eps must be in (0, 0.5), got {clip_eps}")
    log_q = token_log_probs(logits, targets)
    log_q = jnp.clip(log_q, np.log(clip_eps), np.log1p(-clip_eps))
    token_logit = log_q - jnp.log(-jnp.expm1(log_q))
    m = jnp.asarray(loss_mask, jnp.float32)
    return jnp.sum(m * token_logit, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def gradex_output_fn(subset: ParamSubset, *, clip_eps: float = 1e-4,
                     call: Callable[[Any, dict], jax.Array] = default_lm_call) -> Callable:
    """``f(params, batch) -> (n,)``: :func:`mean_token_logit` of the model with ``params``
    substituted for ``subset``'s parameters. ``batch`` needs ``input_ids``, ``targets``,
    ``loss_mask`` (and optionally ``attention_mask``), each ``(n, T)``."""
    if not 0.0 < clip_eps < 0.5:
        raise ValueError(f"clip_eps must be in (0, 0.5), got {clip_eps}")

    def f(params, batch):
        for key in ("input_ids", "targets", "loss_mask"):
            if key not in batch:
                raise KeyError(f"batch has no {key!r} entry (keys: {sorted(batch)})")
        logits = call(subset.merge(params), batch)
        return mean_token_logit(logits, batch["targets"], batch["loss_mask"], clip_eps)

    return f


def per_example_target_losses(logits: jax.Array, batch: dict, clip_eps: float) -> dict[str, jax.Array]:
    """The two per-example target losses, each ``(n,)``, from logits ``(n, T, V)``:

    * ``"logistic"``: ``log(1 + exp(−f(x)))`` with ``f`` = :func:`mean_token_logit` — the
      quantity GradEx's linearised model estimates;
    * ``"ce"``: the token-mean cross-entropy ``Σ_t m_t (−log q_t) / Σ_t m_t`` (unclipped).
    """
    f = mean_token_logit(logits, batch["targets"], batch["loss_mask"], clip_eps)
    m = jnp.asarray(batch["loss_mask"], jnp.float32)
    nll = -token_log_probs(logits, batch["targets"])
    ce = jnp.sum(m * nll, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return {"logistic": jax.nn.softplus(-f), "ce": ce, "f": f}


def _model_batch(batch: dict) -> dict:
    missing = [k for k in ("input_ids", "targets", "loss_mask") if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing} (keys: {sorted(batch)})")
    return {k: jnp.asarray(batch[k]) for k in MODEL_INPUTS if k in batch}


def _batched_map(fn: Callable[[dict], dict], batch: dict, batch_size: int, desc: str) -> dict[str, np.ndarray]:
    """Applies a jitted ``fn(batch) -> {name: (b,)}`` block by block (padded to one shape)."""
    n = batch_size_of(batch, "batch")
    bs = min(int(batch_size), n)
    if bs <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    parts: dict[str, list] = {}
    for start in progress(range(0, n, bs), desc=desc, total=-(-n // bs)):
        stop = min(start + bs, n)
        out = fn(pad_batch(slice_batch(batch, start, stop), bs))
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v)[: stop - start])
    return {k: np.concatenate(v) for k, v in parts.items()}


class TargetLosses:
    """Mean target losses of the real model, for any LoRA parameters (one forward pass):
    ``losses(params) -> {"logistic": mean_j log(1+exp(−f(x_j))), "ce": mean_j CE_j}``
    (per-example means, then the mean over examples; see :func:`per_example_target_losses`).

    One instance measures θ*, θ* + Δ and really fine-tuned models alike, so the three are
    comparable; the forward pass is compiled once per instance (params are an argument).
    """

    def __init__(self, subset: ParamSubset, batch: dict, *, clip_eps: float = 1e-4, batch_size: int = 128,
                 call: Callable = default_lm_call):
        if not 0.0 < clip_eps < 0.5:
            raise ValueError(f"clip_eps must be in (0, 0.5), got {clip_eps}")
        self.batch = _model_batch(batch)
        self.batch_size = int(batch_size)
        self.n = batch_size_of(self.batch, "target batch")

        @jit_constants_as_args
        def fn(params, b):
            out = per_example_target_losses(call(subset.merge(params), b), b, clip_eps)
            return {"logistic": out["logistic"], "ce": out["ce"]}

        self._fn = fn

    def per_example(self, params: PyTree) -> dict[str, np.ndarray]:
        """``{"logistic": (n,), "ce": (n,)}``."""
        return _batched_map(lambda b: self._fn(params, b), self.batch, self.batch_size, "target loss")

    def __call__(self, params: PyTree) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.per_example(params).items()}


def output_values(scalar_fn: Callable, params: PyTree, batch: dict, *, batch_size: int = 128) -> np.ndarray:
    """``scalar_fn(params, batch)`` evaluated block by block: ``(n,)`` float64."""
    batch = _model_batch(batch)
    fn = _jitted_outputs(scalar_fn)  # compiled once per scalar_fn (params are an argument)
    return _batched_map(lambda b: fn(params, b), batch, batch_size, "outputs")["f"].astype(np.float64)


@functools.lru_cache(maxsize=8)
def _jitted_outputs(scalar_fn: Callable) -> Callable:
    return jit_constants_as_args(lambda params, b: {"f": scalar_fn(params, b)})


def projected_gradients(scalar_fn: Callable, params: PyTree, batch: dict, projection: RandomProjection, *,
                        batch_size: int = 64, desc: str = "gradex features") -> np.ndarray:
    """``g̃(x_i) = Πᵀ ∇_θ scalar_fn(θ, x_i)``: ``(n, d)`` float64, through
    :func:`ntk_jax.kernels.features.gradient_features`."""
    return gradient_features(scalar_fn, params, _model_batch(batch), projection=projection,
                             batch_size=batch_size, progress_desc=desc).astype(np.float64)


def meta_initialise(model, data: dict, cfg: TrainConfig | dict, *, workdir: str | None = None) -> TrainResult:
    """θ*: LoRA fine-tuning of ``model`` on the union of the auxiliary tasks (``data``: the
    encoded arrays of all their examples). Resumes from / is not redone in ``workdir``."""
    return train(model, data, cfg, workdir=workdir)


# ---------------------------------------------------------------------------------------
# From d dims back to the parameters


def parameter_projection(projection, scalar_fn: Callable, params: PyTree, batch: dict):
    """The projection of :func:`projected_gradients` as a linear map of gradient pytrees shaped
    like ``params`` (what :func:`project_back` transposes): a ``RandomProjection`` as it is, a
    ``FactoredProjection`` bound to ``scalar_fn``'s layer layout."""
    return bind_projection(projection, scalar_fn, params, _model_batch(batch))


def project_back(projection, params: PyTree, w: np.ndarray) -> PyTree:
    """``Δ = Π w``, a pytree shaped (and typed) like ``params``: the transpose of
    ``projection``, which maps a gradient pytree ``g`` to ``Πᵀ g`` — a
    :class:`~ntk_jax.kernels.projection.RandomProjection` or a factored projection bound to the
    output function (:func:`~ntk_jax.kernels.factored_projection.bind_projection`) — so
    ``⟨g, Π w⟩ = ⟨Πᵀ g, w⟩`` for every g."""
    delta = projection.adjoint(np.asarray(w), params)
    return jax.tree.map(lambda d, p: d.astype(jnp.asarray(p).dtype), delta, params)


def add_delta(params: PyTree, delta: PyTree, scale: float = 1.0) -> PyTree:
    """``params + scale · delta`` leaf by leaf."""
    return jax.tree.map(lambda p, d: p + jnp.asarray(scale, jnp.asarray(p).dtype) * d, params, delta)


# ---------------------------------------------------------------------------------------
# The logistic fit


def _check_problem(G: np.ndarray, b: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
    G = np.asarray(G, np.float64)
    b = np.asarray(b, np.float64)
    if G.ndim != 2 or b.shape != (G.shape[0],):
        raise ValueError(f"G must be (n, d) and b (n,); got G {G.shape}, b {b.shape}")
    if G.shape[0] == 0:
        raise ValueError("the logistic fit needs at least one example (the subset is empty)")
    if not C > 0:
        raise ValueError(f"C must be positive, got {C}")
    if not (np.isfinite(G).all() and np.isfinite(b).all()):
        raise ValueError("non-finite gradient features or offsets in the logistic fit")
    return G, b


def logistic_objective(w: np.ndarray, G: np.ndarray, b: np.ndarray, C: float) -> tuple[float, np.ndarray]:
    """``L(w) = Σ_i log(1 + exp(−(b_i + G_i·w))) + ‖w‖²/(2C)`` and ``∇L(w)``.

    Shapes: ``w (d,)``, ``G (n, d)``, ``b (n,)``. ``∇L = −Gᵀ σ(−z) + w/C`` with ``z = b + G w``.
    """
    G, b = _check_problem(G, b, C)
    return _objective(np.asarray(w, np.float64), G, b, C)


def _objective(w: np.ndarray, G: np.ndarray, b: np.ndarray, C: float) -> tuple[float, np.ndarray]:
    """:func:`logistic_objective` without the input checks (float64 inputs)."""
    z = b + G @ w
    value = float(np.sum(np.logaddexp(0.0, -z)) + w @ w / (2.0 * C))
    grad = -G.T @ scipy.special.expit(-z) + w / C
    return value, grad


def fit_logistic(G: np.ndarray, b: np.ndarray, C: float, *, w0: np.ndarray | None = None, tol: float = 1e-10,
                 max_iter: int = 100) -> np.ndarray:
    """The minimiser of :func:`logistic_objective` by Newton's method with backtracking.

    The objective is ``1/C``-strongly convex, so the minimiser is unique and Newton converges
    quadratically near it. Stops when ``‖∇L‖ ≤ tol · max(1, ‖Gᵀ·1‖)``; raises
    ``RuntimeError`` if that does not happen within ``max_iter`` steps.

    Returns ``w (d,)`` float64.
    """
    G, b = _check_problem(G, b, C)
    d = G.shape[1]
    w = np.zeros(d) if w0 is None else np.asarray(w0, np.float64).copy()
    scale = max(1.0, float(np.linalg.norm(G.sum(axis=0))))
    value, grad = _objective(w, G, b, C)
    for _ in range(max_iter):
        if np.linalg.norm(grad) <= tol * scale:
            return w
        z = b + G @ w
        s = scipy.special.expit(z)
        H = (G * (s * (1.0 - s))[:, None]).T @ G + np.eye(d) / C
        step = -np.linalg.solve(H, grad)
        decrement = float(-grad @ step)
        t = 1.0
        while True:
            w_new = w + t * step
            v_new, g_new = _objective(w_new, G, b, C)
            if v_new <= value - 0.25 * t * decrement or t < 1e-12:
                break
            t *= 0.5
        if v_new > value:  # no decrease possible at float precision: converged
            return w
        w, value, grad = w_new, v_new, g_new
    if np.linalg.norm(grad) <= tol * scale * 1e3:
        return w
    raise RuntimeError(f"logistic fit did not converge in {max_iter} Newton steps "
                       f"(|grad| = {np.linalg.norm(grad):.3g})")


def linearised_logistic_loss(G_target: np.ndarray, f_target: np.ndarray, w: np.ndarray) -> float:
    """``mean_j log(1 + exp(−(f_j + ⟨g̃_j, w⟩)))``: the target loss of the linearised model
    ``f(θ*) + ⟨∇f, Π w⟩`` (``G_target (n_t, d)``, ``f_target (n_t,)``, ``w (d,)``)."""
    z = np.asarray(f_target, np.float64) + np.asarray(G_target, np.float64) @ np.asarray(w, np.float64)
    return float(np.mean(np.logaddexp(0.0, -z)))


@dataclasses.dataclass
class SubsetEstimator:
    """Projected features of every example, ready to estimate any subset of tasks.

    Attributes:
      task_names: the n auxiliary tasks.
      G: ``(N, d)`` projected gradients ``g̃`` of the auxiliary examples at θ*.
      f: ``(N,)`` outputs ``f(θ*, x)`` (the offsets).
      task_index: ``(N,)`` int, the task of each auxiliary example (index into task_names).
      G_target, f_target: the same for the target evaluation examples.
      C: the inverse ridge strength of the logistic fit.
      G_always, f_always: optional examples added to every subset's fit (e.g. the target
        task's own training examples, "domain ∪ S"); ``None`` for none.
    """

    task_names: Sequence[str]
    G: np.ndarray
    f: np.ndarray
    task_index: np.ndarray
    G_target: np.ndarray
    f_target: np.ndarray
    C: float
    G_always: np.ndarray | None = None
    f_always: np.ndarray | None = None

    def __post_init__(self):
        self.task_names = list(self.task_names)
        n, d = np.shape(self.G)
        if np.shape(self.f) != (n,) or np.shape(self.task_index) != (n,):
            raise ValueError(f"G {np.shape(self.G)}, f {np.shape(self.f)} and task_index "
                             f"{np.shape(self.task_index)} disagree")
        if np.shape(self.G_target)[1:] != (d,) or np.shape(self.f_target) != (np.shape(self.G_target)[0],):
            raise ValueError(f"target features {np.shape(self.G_target)} / {np.shape(self.f_target)} do not "
                             f"match d={d}")
        idx = np.asarray(self.task_index)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.task_names)):
            raise ValueError("task_index out of range of task_names")
        empty = [t for k, t in enumerate(self.task_names) if not np.any(idx == k)]
        if empty:
            raise ValueError(f"tasks without any example: {empty}")
        if (self.G_always is None) != (self.f_always is None):
            raise ValueError("give both G_always and f_always, or neither")

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def mask(self, tasks: Sequence[str] | np.ndarray) -> np.ndarray:
        """A boolean ``(n_tasks,)`` indicator from task names or an indicator."""
        if isinstance(tasks, np.ndarray) and tasks.dtype == bool:
            if tasks.shape != (self.n_tasks,):
                raise ValueError(f"subset indicator must have shape ({self.n_tasks},), got {tasks.shape}")
            return tasks
        unknown = [t for t in tasks if t not in self.task_names]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; auxiliary tasks are {self.task_names}")
        return np.isin(np.array(self.task_names), list(tasks))

    def fit(self, subset) -> np.ndarray:
        """``w_S``: the logistic fit on the examples of the subset's tasks."""
        m = self.mask(subset)
        if not m.any() and self.G_always is None:
            raise ValueError("cannot estimate the empty subset (no examples to fit)")
        rows = m[np.asarray(self.task_index)]
        G, b = self.G[rows], self.f[rows]
        if self.G_always is not None:
            G = np.concatenate([G, self.G_always])
            b = np.concatenate([b, self.f_always])
        return fit_logistic(G, b, self.C)

    def estimate(self, subset) -> tuple[float, np.ndarray]:
        """``(L̂(S), w_S)``: the linearised target logistic loss and the fitted ``w``."""
        w = self.fit(subset)
        return linearised_logistic_loss(self.G_target, self.f_target, w), w

    def baseline(self) -> float:
        """The target logistic loss at θ* itself (``w = 0``)."""
        return linearised_logistic_loss(self.G_target, self.f_target, np.zeros(self.G.shape[1]))


# ---------------------------------------------------------------------------------------
# Selection from the estimates


def sample_subsets(n_tasks: int, m: int, *, prob: float = 0.5, seed: int = 0) -> np.ndarray:
    """``m`` random subsets as a boolean ``(m, n_tasks)`` array: every task in independently
    with probability ``prob``; an empty draw is redrawn (so every subset is non-empty).
    Deterministic given ``seed``."""
    if n_tasks <= 0 or m <= 0:
        raise ValueError(f"n_tasks and m must be positive, got {n_tasks}, {m}")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"prob must be in (0, 1], got {prob}")
    rng = np.random.default_rng(seed)
    out = np.zeros((m, n_tasks), bool)
    for i in range(m):
        row = rng.random(n_tasks) < prob
        while not row.any():
            row = rng.random(n_tasks) < prob
        out[i] = row
    return out


def subset_key(task_names: Sequence[str], mask: np.ndarray) -> str:
    """A file-name-safe key of a subset: its task names joined by ``+`` (sorted by index)."""
    names = [t for t, inside in zip(task_names, mask) if inside]
    return "+".join(names) if names else "none"


def ensemble_task_scores(masks: np.ndarray, performance: np.ndarray) -> np.ndarray:
    """Score of task k = mean of ``performance`` over the subsets that contain k.

    ``masks (m, n)`` bool, ``performance (m,)`` (higher is better, e.g. −L̂). A task in no
    subset scores NaN. Returns ``(n,)``.
    """
    masks = np.asarray(masks, bool)
    performance = np.asarray(performance, np.float64)
    if masks.ndim != 2 or performance.shape != (masks.shape[0],):
        raise ValueError(f"masks must be (m, n) and performance (m,); got {masks.shape}, {performance.shape}")
    counts = masks.sum(axis=0)
    sums = masks.T.astype(np.float64) @ performance
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def select_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the ``max(1, round(fraction · n))`` highest scores (NaN last; ties by
    index), best first."""
    scores = np.asarray(scores, np.float64)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * scores.size)))
    key = np.where(np.isnan(scores), -np.inf, scores)
    order = np.lexsort((np.arange(scores.size), -key))
    return order[:k]


def greedy_forward_selection(loss_of: Callable[[np.ndarray], float], n_tasks: int, *,
                             max_size: int | None = None) -> dict:
    """Forward stepwise selection on an estimated loss.

    Starting from the empty set, adds at each round the task whose addition gives the lowest
    ``loss_of(mask)``; stops when no addition lowers the loss of the current set (from the
    second round on: the first task is always added) or at ``max_size``.

    Returns ``{"order": [task indices in the order added], "losses": [loss after each
    addition], "selected": final boolean mask}``.
    """
    max_size = n_tasks if max_size is None else min(int(max_size), n_tasks)
    current = np.zeros(n_tasks, bool)
    order, losses = [], []
    best_loss = np.inf
    while current.sum() < max_size:
        candidates = np.flatnonzero(~current)
        trial = []
        for k in candidates:
            m = current.copy()
            m[k] = True
            trial.append(loss_of(m))
        j = int(np.argmin(trial))
        if order and not trial[j] < best_loss:
            break
        current[candidates[j]] = True
        order.append(int(candidates[j]))
        losses.append(float(trial[j]))
        best_loss = float(trial[j])
    return {"order": order, "losses": losses, "selected": current}


@dataclasses.dataclass(frozen=True)
class RidgeSurrogate:
    """``ŷ(S) = intercept + Σ_k coef_k 1[k ∈ S]`` (intercept not penalised)."""

    coef: np.ndarray
    intercept: float
    lam: float

    def predict(self, masks: np.ndarray) -> np.ndarray:
        return np.asarray(masks, np.float64) @ self.coef + self.intercept


def fit_ridge_surrogate(masks: np.ndarray, values: np.ndarray, lam: float) -> RidgeSurrogate:
    """Ridge regression of ``values (m,)`` on subset indicators ``masks (m, n)``:
    ``min_{c, β} ‖y − c − Xβ‖² + λ‖β‖²`` (closed form on centred X, y)."""
    X = np.asarray(masks, np.float64)
    y = np.asarray(values, np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"masks must be (m, n) and values (m,); got {X.shape}, {y.shape}")
    if lam < 0:
        raise ValueError(f"ridge lambda must be >= 0, got {lam}")
    x_mean, y_mean = X.mean(axis=0), y.mean()
    Xc, yc = X - x_mean, y - y_mean
    A = Xc.T @ Xc + lam * np.eye(X.shape[1])
    coef = np.linalg.lstsq(A, Xc.T @ yc, rcond=None)[0]
    return RidgeSurrogate(coef=coef, intercept=float(y_mean - x_mean @ coef), lam=float(lam))


def relative_squared_error(estimated: np.ndarray, true: np.ndarray) -> float:
    """``Σ(est − true)² / Σ true²`` (the paper's error measure)."""
    est = np.asarray(estimated, np.float64)
    tru = np.asarray(true, np.float64)
    if est.shape != tru.shape or est.size == 0:
        raise ValueError(f"estimated {est.shape} and true {tru.shape} must be equal, non-empty shapes")
    denom = float(np.sum(tru ** 2))
    if denom == 0:
        raise ValueError("all true values are zero: the relative error is undefined")
    return float(np.sum((est - tru) ** 2) / denom)


# ---------------------------------------------------------------------------------------
# Honest metrics: the error of the change, rank agreement, and the trivial estimators


def change_error(estimated, true, base) -> float | None:
    """``Σ_i (est_i − true_i)² / Σ_i (true_i − base_i)²``: the share of the fine-tuning effect
    (the change from θ*'s loss ``base``) the estimate misses; 0 is perfect, 1 is no better
    than predicting no change (``est = base``). ``estimated``, ``true``: ``(n,)``; ``base``:
    a scalar or ``(n,)`` (per-row θ* losses, e.g. one per seed). ``None`` where every
    ``true == base`` (no effect to explain)."""
    est = np.asarray(estimated, np.float64)
    tru = np.asarray(true, np.float64)
    if est.shape != tru.shape or est.ndim != 1 or est.size == 0:
        raise ValueError(f"estimated {est.shape} and true {tru.shape} must be equal, non-empty 1-D shapes")
    b = np.broadcast_to(np.asarray(base, np.float64), tru.shape)
    denom = float(np.sum((tru - b) ** 2))
    return float(np.sum((est - tru) ** 2) / denom) if denom > 0 else None


def leave_one_out_mean(values) -> np.ndarray:
    """``(n,)``: row i predicted by the mean of the other ``n − 1`` values (the trivial
    estimator "every subset ends where the other verified subsets ended", made a fair
    predictor by never seeing the row it predicts). Needs ``n ≥ 2``."""
    y = np.asarray(values, np.float64)
    if y.ndim != 1 or y.size < 2:
        raise ValueError(f"leave_one_out_mean needs a 1-D array of >= 2 values, got shape {y.shape}")
    return (y.sum() - y) / (y.size - 1)


def _ridge_loo_predictions(X: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Leave-one-out predictions of :func:`fit_ridge_surrogate` (refitted n times)."""
    out = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        out[i] = fit_ridge_surrogate(X[keep], y[keep], lam).predict(X[i:i + 1])[0]
    return out


def leave_one_out_ridge(features, values, lambdas: Sequence[float]) -> np.ndarray:
    """``(n,)``: row i predicted by :func:`fit_ridge_surrogate` of ``values`` on ``features``
    ``(n, k)`` (subset indicators ``(n, n_tasks)``, or the subset size ``(n, 1)``) fitted on
    the other ``n − 1`` rows, with λ chosen among ``lambdas`` by an inner leave-one-out on
    those ``n − 1`` rows only (least squared error; ties to the first). Nested, so no row
    ever informs its own prediction. Needs ``n ≥ 3``."""
    X = np.asarray(features, np.float64)
    y = np.asarray(values, np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],) or y.size < 3:
        raise ValueError(f"features must be (n, k) and values (n,) with n >= 3; got {X.shape}, {y.shape}")
    lambdas = [float(v) for v in lambdas]
    if not lambdas:
        raise ValueError("leave_one_out_ridge needs at least one lambda")
    out = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        Xk, yk = X[keep], y[keep]
        lam = (lambdas[0] if len(lambdas) == 1 else
               min(lambdas, key=lambda v: float(np.sum((_ridge_loo_predictions(Xk, yk, v) - yk) ** 2))))
        out[i] = fit_ridge_surrogate(Xk, yk, lam).predict(X[i:i + 1])[0]
    return out


def few_fit_ridge(features, values, n_fit: int, lambdas: Sequence[float]) -> np.ndarray:
    """``(n,)``: every row predicted by a ridge (:func:`fit_ridge_surrogate`) fitted on only
    ``n_fit`` *other* rows — "a few real fine-tunes". The rows are split into
    ``K = n // n_fit`` interleaved folds (row i in fold ``i mod K``, so each fold spans the
    rows' order); the rows of fold k are predicted by the fit on the first ``n_fit`` rows of
    fold ``(k + 1) mod K``, λ chosen among ``lambdas`` by leave-one-out inside that fold.
    Needs ``n_fit ≥ 3`` and ``n ≥ 2 n_fit``."""
    X = np.asarray(features, np.float64)
    y = np.asarray(values, np.float64)
    n_fit = int(n_fit)
    if X.ndim != 2 or y.shape != (X.shape[0],) or n_fit < 3 or y.size < 2 * n_fit:
        raise ValueError(f"few_fit_ridge needs (n, k) features, (n,) values, n_fit >= 3 and n >= 2 n_fit; "
                         f"got {X.shape}, {y.shape}, n_fit={n_fit}")
    K = y.size // n_fit
    folds = [np.flatnonzero(np.arange(y.size) % K == k) for k in range(K)]
    out = np.empty(y.size)
    for k in range(K):
        fit_rows = folds[(k + 1) % K][:n_fit]
        Xf, yf = X[fit_rows], y[fit_rows]
        lam = min([float(v) for v in lambdas],
                  key=lambda v: float(np.sum((_ridge_loo_predictions(Xf, yf, v) - yf) ** 2)))
        out[folds[k]] = fit_ridge_surrogate(Xf, yf, lam).predict(X[folds[k]])
    return out


def _grouped_rank(stat: Callable, est, true, group) -> float | None:
    """Mean over groups of ``stat(est, true)`` within each group (groups where it is
    undefined are skipped; ``None`` if it is undefined in all)."""
    vals = [stat(est[group == g], true[group == g]) for g in np.unique(group)]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def estimator_metrics(estimated, true, base, group=None, *, n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> dict:
    """The honest figures of one estimator over verified subsets.

    Args:
      estimated, true: ``(n,)`` estimated and really fine-tuned target losses.
      base: ``(n,)`` (or a scalar) θ*'s target loss of each row's seed.
      group: ``(n,)`` the seed of each row (default: one group). Rank statistics are taken
        within each group (subsets of one θ* against each other) and averaged over groups.

    Returns ``{"error_of_change", "spearman", "kendall"}``, each a
    :func:`ntk_jax.stats.bootstrap_interval` dict (value and percentile interval, rows
    resampled with replacement), plus ``"level_ratio"`` (:func:`relative_squared_error`, the
    paper's figure, no interval) and ``"per_group"`` (each group's three values).
    """
    from ntk_jax.stats import bootstrap_interval, kendall, spearman

    est = np.asarray(estimated, np.float64)
    tru = np.asarray(true, np.float64)
    b = np.broadcast_to(np.asarray(base, np.float64), tru.shape).copy()
    g = np.zeros(tru.shape, int) if group is None else np.asarray(group)
    if not est.shape == tru.shape == g.shape or est.ndim != 1:
        raise ValueError(f"estimated {est.shape}, true {tru.shape}, group {g.shape} must be equal 1-D shapes")
    kw = dict(n_boot=n_boot, level=level, seed=seed)
    out = {
        "error_of_change": bootstrap_interval(change_error, est, tru, b, **kw),
        "spearman": bootstrap_interval(functools.partial(_grouped_rank, spearman), est, tru, g, **kw),
        "kendall": bootstrap_interval(functools.partial(_grouped_rank, kendall), est, tru, g, **kw),
        "level_ratio": relative_squared_error(est, tru),
        "per_group": {},
    }
    for k in np.unique(g):
        m = g == k
        out["per_group"][str(k)] = {"error_of_change": change_error(est[m], tru[m], b[m]),
                                    "spearman": spearman(est[m], tru[m]), "kendall": kendall(est[m], tru[m])}
    return out


# ---------------------------------------------------------------------------------------
# Diagnostics: the linearised model at a given displacement, directions


def tree_flatten_vector(tree: PyTree) -> np.ndarray:
    """All leaves of ``tree`` raveled and concatenated: ``(P,)`` float64."""
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def tree_cosine(a: PyTree, b: PyTree) -> float | None:
    """Cosine of two pytrees of equal structure as flat vectors (``None`` if one is zero)."""
    va, vb = tree_flatten_vector(a), tree_flatten_vector(b)
    na, nb = float(np.linalg.norm(va)), float(np.linalg.norm(vb))
    return float(va @ vb / (na * nb)) if na > 0 and nb > 0 else None


def first_order_target_loss(scalar_fn: Callable, params: PyTree, delta: PyTree, batch: dict, *,
                            batch_size: int = 128) -> float:
    """``mean_j log(1 + exp(−(f(θ, x_j) + ⟨∇f(θ, x_j), Δ⟩)))``: the target logistic loss of the
    model linearised at ``params`` = θ, moved by ``delta`` (a pytree shaped like ``params``;
    one forward-mode JVP per block, so no projection is involved). With Δ = θ_S − θ* of a
    real fine-tune it separates the two ways an estimate can fail: the linearisation itself
    (this vs the real fine-tuned loss) and the fit finding another Δ (this vs L̂(S))."""
    fn = _jitted_jvp(scalar_fn)
    out = _batched_map(lambda b: fn(params, delta, b), _model_batch(batch), batch_size, "first-order loss")
    return float(np.mean(np.logaddexp(0.0, -(out["f"].astype(np.float64) + out["df"].astype(np.float64)))))


@functools.lru_cache(maxsize=8)
def _jitted_jvp(scalar_fn: Callable) -> Callable:
    def fn(params, delta, b):
        f, df = jax.jvp(lambda p: scalar_fn(p, b), (params,), (delta,))
        return {"f": f, "df": df}
    return jit_constants_as_args(fn)
