"""Evaluation of a selection: fine-tune a fresh LoRA on ``domain ∪ selected`` (or the domain
alone) and measure the held-out domain test set.

* ``test_loss``: token-mean masked LM loss on the test records
  (:func:`ntk_jax.training.trainer.evaluate`).
* ``accuracy``: when EVERY test record has ``"options"`` (classification / multiple
  choice): the fraction of records whose response is the option with the highest summed
  log-likelihood of its scored tokens (response + eos), ties to the first option. Otherwise
  ``None`` (no exact-match generation is done: the test set is scored by loss only).

Device meshes: the model comes from ``context.load_model`` (on ``context.mesh`` when the
launcher built one); fine-tuning, the loss and the option scores then run data-parallel over
the mesh's ``data`` axis (``mesh=`` to name another; see :mod:`ntk_jax.training.trainer`).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ntk_jax.data.encoding import lm_batch
from ntk_jax.data.records import encode_options, encode_records
from ntk_jax.mesh import place_rows, resolve_mesh, round_up_to_data
from ntk_jax.training.losses import token_log_probs
from ntk_jax.training.trainer import TrainConfig, evaluate, train

__all__ = ["option_accuracy", "finetune_and_evaluate"]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _row_loglik(state, input_ids, attention_mask, targets, loss_mask, *, graphdef):
    model = nnx.merge(graphdef, state)
    logits = model(input_ids, attention_mask=attention_mask)
    return jnp.sum(token_log_probs(logits, targets) * loss_mask, axis=-1)


def option_accuracy(model: nnx.Module, tokenizer, records: list[dict], max_len: int, *,
                    batch_size: int = 128, mesh=None, truncation: str = "error") -> float:
    """Accuracy by log-likelihood of the options (see the module docstring). Rows go in
    blocks of ``batch_size`` (rounded up to a multiple of the mesh's ``data`` size; default
    mesh: the one the model lives on); ``truncation``: of the rows longer than ``max_len``."""
    arrays, owner, correct = encode_options(tokenizer, records, max_len, truncation=truncation)
    graphdef, state = nnx.split(model)
    mesh = resolve_mesh(mesh, state)
    batch_size = round_up_to_data(batch_size, mesh)
    m = owner.shape[0]
    ll = np.empty(m)
    for lo in range(0, m, batch_size):
        hi = min(lo + batch_size, m)
        idx = np.arange(lo, hi)
        if hi - lo < batch_size:
            idx = np.concatenate([idx, np.full(batch_size - (hi - lo), lo)])
        b = place_rows({k: v[idx] for k, v in lm_batch(arrays).items()}, mesh)
        ll[lo:hi] = np.asarray(_row_loglik(state, b["input_ids"], b["attention_mask"], b["targets"],
                                           b["loss_mask"], graphdef=graphdef))[: hi - lo]
    hits = []
    for i in range(len(records)):
        rows = np.flatnonzero(owner == i)
        hits.append(bool(correct[rows[int(np.argmax(ll[rows]))]]))
    return float(np.mean(hits))


def finetune_and_evaluate(context, train_records: list[dict], test_records: list[dict], *, lora, train_cfg,
                          workdir: str | None = None, seed: int = 0, eval_batch_size: int = 128,
                          mesh=None, encoding: dict | None = None) -> dict:
    """Fine-tunes a fresh LoRA (``lora`` config, factors from ``seed``) of the context's base
    model on ``train_records`` with ``train_cfg`` (its ``seed`` replaced by ``seed``) and
    evaluates on ``test_records``. Returns ``{"n_train", "test_loss", "accuracy",
    "final_train_loss"}``. ``mesh``: default the mesh the loaded model lives on. ``encoding``:
    :func:`~ntk_jax.data.records.encode_records` options (``truncation``,
    ``assistant_turns``; :func:`ntk_jax.selection.jobs.encoding_options`)."""
    if not isinstance(train_cfg, TrainConfig):
        train_cfg = TrainConfig.from_dict(train_cfg)
    import dataclasses
    train_cfg = dataclasses.replace(train_cfg, seed=int(seed))
    encoding = dict(encoding or {})
    data = encode_records(context.tokenizer, train_records, context.max_len, **encoding)
    test = encode_records(context.tokenizer, test_records, context.max_len, **encoding)
    model = context.load_model(lora, seed=seed)
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
    result = train(model, data, train_cfg, workdir=workdir, mesh=mesh)
    acc = None
    if all(isinstance(r.get("options"), list) and r["options"] for r in test_records):
        acc = option_accuracy(model, context.tokenizer, test_records, context.max_len, batch_size=eval_batch_size,
                              mesh=mesh, truncation=encoding.get("truncation", "error"))
    return {"n_train": len(train_records), "test_loss": float(evaluate(model, test, eval_batch_size, mesh=mesh)),
            "accuracy": acc, "final_train_loss": result.history[-1]["loss"] if result.history else None}
