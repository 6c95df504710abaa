"""Pre-training of the embedded default model on the synthetic task corpus, so that the
validation experiments run on a *trained* model, as with real LLMs (about a minute on CPU)."""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from ntk_jax.data.encoding import encode_examples
from ntk_jax.data.synthetic import make_corpus
from ntk_jax.data.tokenizer import CharTokenizer
from ntk_jax.models.transformer import DecoderConfig, DecoderLM, save_pretrained
from ntk_jax.training.trainer import TrainConfig, evaluate, train
from ntk_jax.utils import read_json, write_json

REPORT_NAME = "pretrain_report.json"


def pretrain_default_model(pretrain_cfg, arch: dict, directory: str, *, seed: int = 0) -> dict:
    """Trains a :class:`DecoderLM` from scratch on ``pretrain_cfg.tasks`` and saves it (with
    its tokenizer) to ``directory``. Resumable: an interrupted run continues from its
    checkpoint in ``directory/pretrain``; a finished one is not redone.

    Returns the report (final train loss, held-out loss per task).
    """
    report_path = os.path.join(directory, REPORT_NAME)
    if os.path.exists(report_path):
        return read_json(report_path)
    tokenizer = CharTokenizer()
    tasks = list(pretrain_cfg.tasks)
    train_records = make_corpus(tasks, pretrain_cfg.n_per_task, seed=seed)
    held_out = {t: make_corpus([t], 128, seed=seed + 10_000) for t in tasks}
    max_len = int(pretrain_cfg.max_len)
    data = encode_examples(tokenizer, train_records, max_len)
    config = DecoderConfig.from_dict({**dict(arch), "vocab_size": tokenizer.vocab_size})
    model = DecoderLM(config, rngs=nnx.Rngs(seed))
    train_cfg = TrainConfig.from_dict({**dict(pretrain_cfg.train), "seed": seed})
    result = train(model, data, train_cfg, wrt=nnx.Param, workdir=os.path.join(directory, "pretrain"))
    eval_loss = {t: evaluate(model, encode_examples(tokenizer, recs, max_len), batch_size=128)
                 for t, recs in held_out.items()}
    save_pretrained(model, directory)
    tokenizer.save_pretrained(directory)
    losses = [h["loss"] for h in result.history if "loss" in h]
    report = {"tasks": tasks, "n_train": len(train_records), "steps": result.final_step,
              "first_loss": losses[0] if losses else None, "final_loss": float(np.mean(losses[-3:])),
              "heldout_loss": eval_loss, "num_params": int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))}
    write_json(report_path, report)
    return report

