"""What the validation experiments (docs/theory.md §5) run on: the model, the kernel's output function,
the data and the loss, chosen by ``config.model.task``. The experiments themselves are the
same code for both.

* ``"lm"`` (:class:`LMTask`): the causal LM of the job's context (the embedded toy model,
  or any decoder checkpoint), the synthetic prompt/response tasks
  (:mod:`ntk_jax.data.synthetic`), the kernel over the response-position-mean logits
  (O = V, :func:`ntk_jax.kernels.outputs.lm_output_fn`), the masked LM loss; LoRA factors
  trained and in the kernel.
* ``"classification"`` (:class:`ClassificationTask`): a BERT/RoBERTa sequence classifier
  loaded from ``config.model.path`` with a new ``config.model.num_labels``-way head
  (:func:`ntk_jax.models.bert.from_pretrained`), the lexicon task with human valence labels
  (:mod:`ntk_jax.data.lexicon`; splits disjoint by word), the kernel over the class logits
  (O = C, :func:`ntk_jax.kernels.outputs.classification_output_fn`) and the cross-entropy
  loss. ``config.model.train_head``: the head is trained (and in the kernel) together with
  the LoRA factors, else it stays at its random init and only the LoRA factors are.

Every model task describes itself for the reports (report key ``setup.backend``) (:meth:`describe`: checkpoint, output, what
the kernel is over, and the data split sizes).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ntk_jax.data.lexicon import lexicon_splits
from ntk_jax.data.synthetic import generate_task, make_corpus
from ntk_jax.kernels.outputs import classification_output_fn, default_classifier_call, lm_output_fn
from ntk_jax.models import bert
from ntk_jax.mesh import resolve_mesh
from ntk_jax.models.hf_loading import load_tokenizer, read_hf_config
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.training.trainer import evaluate

TASKS = ("lm", "classification")


def binary_targets(records) -> np.ndarray:
    """±1 targets from a two-label task (the lexicographically first label is +1)."""
    labels = sorted({r["response"] for r in records})
    if len(labels) != 2:
        raise ValueError(f"the spectrum experiment needs a two-label task; got labels {labels}")
    return np.array([1.0 if r["response"] == labels[0] else -1.0 for r in records])


@dataclasses.dataclass
class Split:
    """One data split: ``arrays`` (numpy, leading axis n) and, for the LM tasks, the
    ``records`` they were encoded from."""

    arrays: dict
    records: list | None = None

    @property
    def n(self) -> int:
        return int(self.arrays["input_ids"].shape[0])


def classification_loss(model, batch: dict) -> jax.Array:
    """Mean cross-entropy of the classifier's logits against ``batch["label"]``."""
    logits = default_classifier_call(model, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"]).mean()


class LMTask:
    """The synthetic-task causal-LM setting (see the module docstring). Split ``role`` →
    seed ``ctx.seed + SEED_OFFSETS[role]`` (the seeds the experiments have always used)."""

    task = "lm"
    SEED_OFFSETS = {"train": 0, "probe": 1, "kernel": 2, "eval": 3, "corpus": 4}
    KERNEL_KEYS = ("input_ids", "attention_mask", "loss_mask")
    wrt = nnx.LoRAParam
    loss_fn = None  # the trainer's masked LM loss
    output = "response-position-mean logits, O = V"
    kernel_params = "LoRA factors"

    def __init__(self, config, ctx):
        self.ctx = ctx
        self.split_sizes: dict[str, int] = {}

    def load_model(self, lora: LoRAConfig):
        return self.ctx.load_model(lora)

    def output_fn(self, subset):
        return lm_output_fn(subset)

    def splits(self, sizes: dict, task) -> dict[str, Split]:
        """``{role: Split}``: ``task`` examples per role (``"corpus"``: ``task`` is a tuple of
        tasks, mixed as by :func:`ntk_jax.data.synthetic.make_corpus`)."""
        out = {}
        for role, n in sizes.items():
            seed = self.ctx.seed + self.SEED_OFFSETS[role]
            if role == "corpus":
                records = make_corpus(list(task), -(-int(n) // len(task)), seed=seed)[: int(n)]
            else:
                records = generate_task(task, int(n), seed=seed)
            out[role] = Split(self.ctx.encode(records), records)
            self.split_sizes[role] = len(records)
        return out

    def kernel_inputs(self, split: Split) -> dict:
        """The arrays a kernel's ``f(params, batch)`` reads."""
        return {k: jnp.asarray(split.arrays[k]) for k in self.KERNEL_KEYS}

    def binary_targets(self, split: Split) -> np.ndarray:
        return binary_targets(split.records)

    def regression_targets(self, split: Split) -> np.ndarray | None:
        return None

    def evaluate(self, model, split: Split) -> dict:
        return {"loss": evaluate(model, split.arrays, batch_size=128)}

    def describe(self) -> dict:
        return {"task": self.task, "model": self.ctx.info, "output": self.output,
                "kernel_params": self.kernel_params, "split_sizes": dict(self.split_sizes)}


class ClassificationTask:
    """A BERT/RoBERTa classifier on the lexicon task (see the module docstring)."""

    task = "classification"
    KERNEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")
    loss_fn = staticmethod(classification_loss)

    def __init__(self, config, ctx):
        self.ctx = ctx
        self.model_cfg = config.model
        self.lexicon = config.lexicon
        self.num_labels = int(config.model.num_labels)
        self.train_head = bool(config.model.train_head)
        self.tokenizer = load_tokenizer(ctx.model_dir)
        self.split_sizes: dict[str, int] = {}
        self.data_info: dict = {}
        head = nnx.All(nnx.Param, nnx.PathContains("classifier"))
        self.wrt = nnx.Any(nnx.LoRAParam, head) if self.train_head else nnx.LoRAParam
        self.output = f"class logits, O = {self.num_labels} (new {self.num_labels}-way head)"
        self.kernel_params = ("LoRA factors + classification head (trained)" if self.train_head
                              else "LoRA factors only (head frozen at its random init)")

    def load_model(self, lora: LoRAConfig):
        model = bert.from_pretrained(self.ctx.model_dir, task="sequence_classification",
                                     num_labels=self.num_labels, new_head=True, lora=lora,
                                     rngs=nnx.Rngs(self.ctx.seed), dtype=self.ctx.dtype,
                                     param_dtype=self.ctx.param_dtype, mesh=resolve_mesh(self.ctx.mesh))
        model.eval()
        return model

    def output_fn(self, subset):
        return classification_output_fn(subset)

    def splits(self, sizes: dict, task=None) -> dict[str, Split]:
        """``{role: Split}`` of the lexicon task, disjoint by word across the roles asked for
        together (``task`` is ignored: the lexicon is the task)."""
        data, info = lexicon_splits(self.tokenizer, {r: int(n) for r, n in sizes.items()},
                                    max_len=int(self.lexicon.max_len), seed=self.ctx.seed,
                                    min_abs_valence=float(self.lexicon.min_abs_valence),
                                    max_pieces=int(self.lexicon.max_pieces))
        self.split_sizes.update(info["sizes"])
        self.data_info = {k: v for k, v in info.items() if k != "words"}
        self.data_info["words_first_5"] = {k: v[:5] for k, v in info["words"].items()}
        return {role: Split(arrays) for role, arrays in data.items()}

    def kernel_inputs(self, split: Split) -> dict:
        return {k: jnp.asarray(split.arrays[k]) for k in self.KERNEL_KEYS}

    def binary_targets(self, split: Split) -> np.ndarray:
        return np.asarray(split.arrays["y"], np.float64)

    def regression_targets(self, split: Split) -> np.ndarray | None:
        return np.asarray(split.arrays["valence"], np.float64)

    def evaluate(self, model, split: Split, batch_size: int = 128) -> dict:
        """Mean cross-entropy and accuracy over the split."""
        f = _logits_fn(nnx.graphdef(model))
        state = nnx.state(model)
        logits = np.concatenate([
            np.asarray(f(state, self.kernel_inputs(Split({k: v[i:i + batch_size] for k, v in split.arrays.items()}))))
            for i in range(0, split.n, batch_size)])
        labels = split.arrays["label"]
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        return {"loss": float(-logp[np.arange(len(labels)), labels].mean()),
                "accuracy": float((logits.argmax(1) == labels).mean())}

    def describe(self) -> dict:
        hf = read_hf_config(self.ctx.model_dir)
        return {"task": self.task,
                "checkpoint": {"path": self.ctx.model_dir, "config.model.path": str(self.model_cfg.path),
                               "name_or_path": hf.get("_name_or_path"), "model_type": hf.get("model_type"),
                               "num_hidden_layers": hf.get("num_hidden_layers"),
                               "hidden_size": hf.get("hidden_size")},
                "output": self.output, "kernel_params": self.kernel_params, "train_head": self.train_head,
                "split_sizes": dict(self.split_sizes), "data": self.data_info}


_LOGITS_FNS: dict = {}


def _logits_fn(graphdef):
    if graphdef not in _LOGITS_FNS:
        @jax.jit
        def f(state, batch):
            return default_classifier_call(nnx.merge(graphdef, state), batch)
        _LOGITS_FNS[graphdef] = f
    return _LOGITS_FNS[graphdef]


def make_model_task(config, ctx) -> Any:
    """The model task of ``config.model.task`` (``"lm"`` or ``"classification"``)."""
    task = str(config.model.get("task", "lm"))
    if task == "lm":
        return LMTask(config, ctx)
    if task == "classification":
        return ClassificationTask(config, ctx)
    raise ValueError(f"config.model.task must be one of {TASKS}, got {task!r}")
