"""NTK-Selector (docs/theory.md §6.1): warm-up, coarse kNN filter, Jacobian-free kernel scores, top-N.

The pieces, each a small function (the job that strings them together, with resumable
sharded scoring, is :mod:`ntk_jax.selection.jobs`):

1. warm-up: a short LoRA fine-tune on the domain set (:func:`ntk_jax.training.trainer.train`
   with a workdir, so it resumes);
2. coarse filter: :func:`mean_hidden_states` (mean of the final-norm hidden states over the
   real tokens, ``attention_mask``), :func:`knn_votes` (each domain example votes for its K
   nearest candidates by cosine), :func:`top_by_votes` keeps the M most-voted;
3. the per-example scalar :func:`ntk_scalar_fn` (:func:`selection_scalar_fn` for the variants):
   the length-normalised sum of logits (mean over the response tokens of Σ_v z_v), whose
   gradient over the LoRA parameters, Rademacher-projected to p, is the feature φ(x);
4. score: ``s_j = (1/|D|) Σ_i Θ̃(x_i, x_j) = ⟨mean_i φ(x_i), φ(x_j)⟩``, computed by the job
   (:mod:`ntk_jax.selection.methods.ntk`: ``domain_direction`` and one JVP per candidate,
   :func:`ntk_jax.kernels.features.directional_derivatives`); top-N (:func:`top_n`).

Device meshes: :func:`mean_hidden_states` takes ``mesh=`` (default: the mesh the model's
parameters live on, e.g. a model from ``Context.load_model`` under ``config.mesh``): batches
are split over its ``data`` axis and padded to a multiple of it (the padding is dropped), see
:func:`ntk_jax.mesh.resolve_mesh`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ntk_jax.kernels.features import sum_of_outputs
from ntk_jax.kernels.ntk import normalize_rows
from ntk_jax.kernels.outputs import lm_output_fn
from ntk_jax.mesh import place_rows, resolve_mesh, round_up_to_data
from ntk_jax.models.subset import ParamSubset
from ntk_jax.training.losses import token_log_probs

__all__ = ["SCORE_OUTPUTS", "TOKEN_REDUCTIONS", "POOLINGS", "selection_scalar_fn", "ntk_scalar_fn", "mean_hidden_program",
           "mean_hidden_states", "cosine_similarity", "knn_votes", "top_by_votes", "top_n"]


SCORE_OUTPUTS = ("sum_of_logits", "loss")
"""What the per-example scalar ``s(θ, x)`` is (docs/theory.md §6.1, §6.5): the sum of the logits over
the vocabulary (NTK-Selector; label-blind) or the token NLL of the record's response
(label-aware: its gradient is ``Σ_t J_tᵀ r_t`` with ``r_t = softmax(z_t) − e_{y_t}``)."""

TOKEN_REDUCTIONS = ("mean", "sum")
"""How the response tokens (``loss_mask``) are combined: mean (length-normalised, the paper)
or sum."""


def selection_scalar_fn(subset: ParamSubset, output: str = "sum_of_logits", reduce: str = "mean"):
    """``s(params, batch) -> (n,)`` for selection scores over ``subset``'s parameters.

    ``output="sum_of_logits"``: ``Σ_{t∈M} Σ_v z_{t,v}`` (``reduce="mean"``: divided by ``|M|``;
    this is :func:`ntk_scalar_fn`); ``output="loss"``: ``Σ_{t∈M} −log p(y_t | x_{<t})`` (mean:
    divided by ``|M|``; :func:`ntk_jax.selection.less.loss_scalar_fn`). ``M`` = the
    ``loss_mask`` positions; the loss needs ``batch["targets"]``.
    """
    if output not in SCORE_OUTPUTS:
        raise ValueError(f"unknown score output {output!r}; choose one of {SCORE_OUTPUTS}")
    if reduce not in TOKEN_REDUCTIONS:
        raise ValueError(f"unknown token reduction {reduce!r}; choose one of {TOKEN_REDUCTIONS}")
    if output == "sum_of_logits" and reduce == "mean":
        return ntk_scalar_fn(subset)
    if output == "loss" and reduce == "mean":
        from ntk_jax.selection.less import loss_scalar_fn

        return loss_scalar_fn(subset)

    def s(params, batch):
        model = subset.merge(params)
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        mask = batch["loss_mask"].astype(logits.dtype)
        if output == "sum_of_logits":
            return jnp.einsum("ntv,nt->n", logits, mask)
        return -jnp.sum(token_log_probs(logits, batch["targets"]) * mask, axis=-1)

    return s


def ntk_scalar_fn(subset: ParamSubset):
    """``s(params, batch) -> (n,)``: the length-normalised sum of logits (mean over the
    ``loss_mask`` positions of ``Σ_v z_v``) of the model with ``params`` substituted."""
    return sum_of_outputs(lm_output_fn(subset, reduce="mean"))


# What the mean of the hidden states runs over (:func:`mean_hidden_states`): every real token
# ("all", the paper's and the embedding baseline's), or the scored positions ("response": the
# ``loss_mask`` positions, whose next token is a response token — where the record's loss is).
POOLINGS = ("all", "response")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def mean_hidden_program(state, input_ids, attention_mask, weights=None, *, graphdef):
    """``(n, hidden)`` float32: the final hidden states averaged over the positions where
    ``weights`` (``(n, T)``; default ``attention_mask``) is nonzero, weighted by it."""
    model = nnx.merge(graphdef, state)
    h = model.hidden_states(input_ids, attention_mask).astype(jnp.float32)
    m = (attention_mask if weights is None else weights).astype(jnp.float32)
    return jnp.einsum("nth,nt->nh", h, m) / jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)


def _pooling_weights(batch: dict, pooling: str) -> np.ndarray:
    """``(n, T)`` weights of :func:`mean_hidden_states`'s mean for ``pooling`` (:data:`POOLINGS`)."""
    if pooling == "all":
        return np.asarray(batch["attention_mask"])
    if pooling == "response":
        if "loss_mask" not in batch:
            raise ValueError("pooling='response' needs the batch's 'loss_mask' (encode the records with "
                             "ntk_jax.data.records.encode_records)")
        w = np.asarray(batch["loss_mask"], np.float32) * (np.asarray(batch["attention_mask"]) > 0)
        empty = np.flatnonzero(w.sum(axis=1) == 0)
        if empty.size:
            raise ValueError(f"pooling='response': row(s) {empty[:5].tolist()} have no scored position "
                             "(an empty response and no eos?)")
        return w
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


def mean_hidden_states(model: nnx.Module, batch: dict, *, batch_size: int = 64, mesh=None,
                       pooling: str = "all") -> np.ndarray:
    """Mean of the model's final-norm hidden states of every example: ``(n, hidden)`` float32.

    ``pooling`` (:data:`POOLINGS`): ``"all"`` averages over the real tokens
    (``attention_mask == 1``); ``"response"`` over the scored positions (``loss_mask == 1``:
    the last prompt token and the response, the states that predict the response), so that
    records with the same prompts but different answers get different embeddings.

    The model needs a ``hidden_states(input_ids, attention_mask)`` method (the embedded
    :class:`~ntk_jax.models.transformer.DecoderLM` and the Llama-family ports have one).
    Examples go in blocks of ``min(batch_size, n)`` (rounded up to a multiple of the mesh's
    ``data`` size; the last block padded: one compiled shape). ``mesh``: see the module
    docstring.
    """
    if not hasattr(model, "hidden_states"):
        raise TypeError(f"{type(model).__name__} has no hidden_states(input_ids, attention_mask) method")
    weights = _pooling_weights(batch, pooling)
    graphdef, state = nnx.split(model)
    mesh = resolve_mesh(mesh, state)
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch["attention_mask"])
    n = ids.shape[0]
    bs = round_up_to_data(min(int(batch_size), n), mesh)
    out = []
    for lo in range(0, n, bs):
        hi = min(lo + bs, n)
        idx = np.arange(lo, hi)
        if hi - lo < bs:  # pad by repeating the block's first example: one compiled shape
            idx = np.concatenate([idx, np.full(bs - (hi - lo), lo)])
        rows = (ids[idx], mask[idx]) if pooling == "all" else (ids[idx], mask[idx], weights[idx])
        out.append(np.asarray(mean_hidden_program(state, *place_rows(rows, mesh), graphdef=graphdef))[: hi - lo])
    return np.concatenate(out, axis=0)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n, d)``, ``(m, d)`` → ``(n, m)`` cosine similarities (float64; zero vectors → 0)."""
    return normalize_rows(np.asarray(a, np.float64)) @ normalize_rows(np.asarray(b, np.float64)).T


def knn_votes(domain_emb: np.ndarray, cand_emb: np.ndarray, k: int, *,
              block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Each domain example votes for its ``k`` nearest candidates by cosine similarity.

    Args:
      domain_emb: ``(n_dom, d)``; cand_emb: ``(n_cand, d)``; k: votes per domain example
        (capped at n_cand). Ties in similarity go to the lower candidate index.
      block: candidates per block (the pool is processed in blocks: memory O(n_dom·(k+block))).

    Returns:
      ``votes`` int64 ``(n_cand,)`` and ``mean_cos`` float64 ``(n_cand,)`` (mean cosine to the
      domain examples, the tie-breaker).
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    n_dom, n_cand = domain_emb.shape[0], cand_emb.shape[0]
    k = min(int(k), n_cand)
    best_sim = np.full((n_dom, 0), -np.inf)
    best_idx = np.zeros((n_dom, 0), np.int64)
    mean_cos = np.zeros(n_cand)
    for lo in range(0, n_cand, block):
        hi = min(lo + block, n_cand)
        sim = cosine_similarity(domain_emb, cand_emb[lo:hi])
        mean_cos[lo:hi] = sim.mean(axis=0)
        all_sim = np.concatenate([best_sim, sim], axis=1)
        all_idx = np.concatenate([best_idx, np.broadcast_to(np.arange(lo, hi), sim.shape)], axis=1)
        # sort each row by (-sim, index): stable lexsort, deterministic ties
        order = np.lexsort((all_idx, -all_sim), axis=1)[:, :k]
        best_sim = np.take_along_axis(all_sim, order, axis=1)
        best_idx = np.take_along_axis(all_idx, order, axis=1)
    votes = np.bincount(best_idx.ravel(), minlength=n_cand).astype(np.int64)
    return votes, mean_cos


def top_by_votes(votes: np.ndarray, mean_cos: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` candidates with most votes; ties by higher mean cosine, then by
    lower index (deterministic). Ordered best first."""
    order = np.lexsort((np.arange(len(votes)), -np.asarray(mean_cos), -np.asarray(votes)))
    return order[: int(m)]


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores (ties: lower index first), best first."""
    scores = np.asarray(scores)
    if n > scores.shape[0]:
        raise ValueError(f"N={n} is larger than the number of scored candidates ({scores.shape[0]})")
    return np.lexsort((np.arange(scores.shape[0]), -scores))[: int(n)]
