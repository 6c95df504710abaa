"""What every experiment needs: the (trained) base model, its tokenizer and encoding.

``config.model.path`` may name any checkpoint directory that
:func:`ntk_jax.models.hf_loading.from_pretrained` loads: this repo's embedded format
(``model_type="ntk_jax_decoder"``, with its character tokenizer) or a Hugging Face
checkpoint (Llama / Mistral / Qwen2 / Qwen3 / GPT-2 / BERT / RoBERTa) with a tokenizer that
``transformers.AutoTokenizer`` reads from the same directory. Empty: the embedded default
model, pre-trained by the job itself.

Special tokens: every encoded example is ``[bos] + prompt + response + [eos]``
(:mod:`ntk_jax.data.encoding`). A tokenizer without a bos token (e.g. Qwen's) encodes without
one; a tokenizer without a pad token (Llama, GPT-2) pads with its eos id (padding is masked
out of attention and loss, so its id does not matter); an encoder tokenizer without one (BERT)
ends sequences with its sep token ([SEP]), which then serves as eos; a tokenizer with neither
is an error, since the final eos is a scored target.

``config.model.path = "packaged:<name>"`` names a checkpoint shipped in an installed package
(:mod:`ntk_jax.models.packaged`), extracted once into a cache directory.

Device mesh: :func:`prepare_context` builds ``Context.mesh`` from ``config.mesh``
(``data`` × ``model`` over this process's ``jax.local_devices()``, -1 = all remaining
devices; :func:`ntk_jax.models.sharding.mesh_from_config`). On more than one device,
:meth:`Context.load_model` loads every tensor straight into its shards and lays the LoRA
factors out by the same rules, so the whole model lives on the mesh; the features, JVP
scores, hidden states, training and evaluation run on such a model are then data-parallel
over the mesh's ``data`` axis (they read the mesh from the parameters). On one device
nothing is placed: loading and results are those of a run without a mesh.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx

from ntk_jax.data.encoding import encode_examples
from ntk_jax.data.tokenizer import CharTokenizer
from ntk_jax.models.hf_loading import from_pretrained, read_hf_config
from ntk_jax.models.hf_loading import load_tokenizer as load_hf_tokenizer
from ntk_jax.mesh import AXES, resolve_mesh
from ntk_jax.models import sharding as sh
from ntk_jax.models.lora import LoRAConfig, apply_lora
from ntk_jax.models.packaged import resolve_model_path
from ntk_jax.models.transformer import MODEL_TYPE
from ntk_jax.training.pretrain import pretrain_default_model


@dataclasses.dataclass
class Context:
    """Attributes:
      model_dir: directory of the base model (config.json, weights, tokenizer).
      tokenizer: its tokenizer (``pad_token_id`` / ``eos_token_id`` always set, see the module
        docstring).
      max_len: sequence length experiments encode to (``pretrain.max_len``; the selection
        jobs replace it by ``select.max_len``, :func:`ntk_jax.selection.jobs.selection_context`).
      seed: the job's seed.
      info: facts about how the model was obtained (for reports).
      dtype, param_dtype: compute / parameter dtype names the model is loaded with
        (``None``: the checkpoint's config, float32 for HF checkpoints).
      process: this process's :class:`ntk_jax.launcher.distributed.ProcessInfo` (set by the
        launcher; ``None`` outside it).
      mesh: the ``("data", "model")`` :class:`jax.sharding.Mesh` of this process's devices
        that models are loaded onto (``None``: no mesh; a one-device mesh places nothing).
    """

    model_dir: str
    tokenizer: object
    max_len: int
    seed: int
    info: dict
    dtype: str | None = None
    param_dtype: str | None = None
    process: Any = None
    mesh: Any = None

    @property
    def add_bos(self) -> bool:
        """Whether encoded examples start with the tokenizer's bos token (it has one)."""
        return getattr(self.tokenizer, "bos_token_id", None) is not None

    def load_model(self, lora: LoRAConfig | dict | None = None, *, seed: int | None = None):
        """A fresh copy of the base model (eval mode), with LoRA adapters attached if ``lora``
        is given (factors drawn from ``nnx.Rngs(seed)``, default the job's seed: the same
        values with or without a mesh). On a multi-device :attr:`mesh` every array of the
        model (LoRA factors included) is placed by
        :data:`~ntk_jax.models.sharding.DEFAULT_RULES`."""
        mesh = resolve_mesh(self.mesh)
        model = from_pretrained(self.model_dir, dtype=self.dtype, param_dtype=self.param_dtype, mesh=mesh)
        if lora is not None:
            if not isinstance(lora, LoRAConfig):
                lora = LoRAConfig.from_dict(lora)
            apply_lora(model, lora, rngs=nnx.Rngs(self.seed if seed is None else seed))
            if mesh is not None:
                sh.shard_model(model, mesh)
        model.eval()
        return model

    def encode(self, records):
        return encode_examples(self.tokenizer, records, self.max_len, add_bos=self.add_bos)


def _with_special_ids(tokenizer, directory: str):
    """``tokenizer`` with a pad id (the eos id if it has none); ValueError without eos."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and getattr(tokenizer, "sep_token_id", None) is not None:
        tokenizer.eos_token = tokenizer.sep_token  # encoders (BERT) end every sequence with [SEP]
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer in {directory!r} has no eos token; the encoding ends every "
                         "response with eos (a scored target). Set eos_token in its tokenizer_config.json")
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked; any id would do
    return tokenizer


def load_tokenizer(directory: str):
    """The tokenizer of a model directory: the character tokenizer of the embedded format,
    else ``transformers.AutoTokenizer`` (local files only), with a pad id ensured."""
    directory = os.fspath(directory)
    if read_hf_config(directory).get("model_type") == MODEL_TYPE:
        try:
            return CharTokenizer.from_pretrained(directory)
        except ValueError:
            pass  # not a character vocabulary: read it as a Hugging Face tokenizer
    try:
        tok = load_hf_tokenizer(directory)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {directory!r} (config.model.path needs the "
                         f"checkpoint's tokenizer files in the same directory): {e}") from e
    return _with_special_ids(tok, directory)


def _check_vocab(tokenizer, directory: str) -> None:
    vocab = read_hf_config(directory).get("vocab_size")
    n = len(tokenizer)
    if vocab is not None and n > int(vocab):
        raise ValueError(f"the tokenizer in {directory!r} has {n} tokens but the model's vocab_size is "
                         f"{vocab}: ids >= {vocab} would index past the embedding")


def _dtype_or_none(value: Any) -> str | None:
    return str(value) if value else None


def prepare_context(config, workdir: str) -> Context:
    """Loads ``config.model.path`` (any checkpoint ``from_pretrained`` supports, with its
    tokenizer), or pre-trains the embedded default model into ``workdir/base_model`` (reused
    if already there). ``config.model.dtype`` / ``param_dtype`` set the dtypes models are
    loaded with; ``config.mesh`` the device mesh models are loaded onto (see the module
    docstring; ``ValueError`` when it does not fit this process's devices)."""
    model_dir = os.path.abspath(resolve_model_path(config.model.path)) if config.model.path else None
    if model_dir is not None and not os.path.isdir(model_dir):
        raise FileNotFoundError(
            f"config.model.path {model_dir!r} is not a directory: set --config.model.path=DIR to a local "
            "checkpoint directory (config.json, *.safetensors and the tokenizer files; nothing is downloaded)")
    mesh_cfg = config.get("mesh") or {}
    mesh = sh.mesh_from_config(mesh_cfg.get("data", -1), mesh_cfg.get("model", 1))
    if model_dir is not None:
        info = {"source": "path", "path": model_dir,
                "model_type": read_hf_config(model_dir).get("model_type")}
    else:
        model_dir = os.path.join(workdir, "base_model")
        report = pretrain_default_model(config.pretrain, config.model.arch, model_dir, seed=config.seed)
        info = {"source": "embedded default (pre-trained by this job)", "pretrain": report}
    tokenizer = load_tokenizer(model_dir)
    _check_vocab(tokenizer, model_dir)
    info["mesh"] = dict(zip(AXES, sh.mesh_shape(mesh)))
    return Context(model_dir=model_dir, tokenizer=tokenizer, max_len=int(config.pretrain.max_len),
                   seed=int(config.seed), info=info, dtype=_dtype_or_none(config.model.get("dtype")),
                   param_dtype=_dtype_or_none(config.model.get("param_dtype")), mesh=mesh)
