"""What every experiment needs: the (trained) base model, its tokenizer and encoding."""
from __future__ import annotations

import dataclasses
import os

from flax import nnx

from ntk_jax.data.encoding import encode_examples
from ntk_jax.data.tokenizer import CharTokenizer
from ntk_jax.models.lora import LoRAConfig, apply_lora
from ntk_jax.models.transformer import load_pretrained
from ntk_jax.training.pretrain import pretrain_default_model


@dataclasses.dataclass
class Context:
    """Attributes:
      model_dir: directory of the base model (config.json, weights, tokenizer).
      tokenizer: its tokenizer.
      max_len: sequence length experiments encode to.
      seed: the job's seed.
      info: facts about how the model was obtained (for reports).
    """

    model_dir: str
    tokenizer: object
    max_len: int
    seed: int
    info: dict

    def load_model(self, lora: LoRAConfig | dict | None = None, *, seed: int | None = None):
        """A fresh copy of the base model, with LoRA adapters attached if ``lora`` is given."""
        model = load_pretrained(self.model_dir)
        if lora is not None:
            if not isinstance(lora, LoRAConfig):
                lora = LoRAConfig.from_dict(lora)
            apply_lora(model, lora, rngs=nnx.Rngs(self.seed if seed is None else seed))
        model.eval()
        return model

    def encode(self, records):
        return encode_examples(self.tokenizer, records, self.max_len)


def load_tokenizer(directory: str):
    return CharTokenizer.from_pretrained(directory)


def prepare_context(config, workdir: str) -> Context:
    """Loads ``config.model.path``, or pre-trains the embedded default model into
    ``workdir/base_model`` (reused if already there)."""
    if config.model.path:
        model_dir = os.path.abspath(config.model.path)
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"config.model.path {model_dir!r} is not a directory")
        info = {"source": "path", "path": model_dir}
    else:
        model_dir = os.path.join(workdir, "base_model")
        report = pretrain_default_model(config.pretrain, config.model.arch, model_dir, seed=config.seed)
        info = {"source": "embedded default (pre-trained by this job)", "pretrain": report}
    return Context(model_dir=model_dir, tokenizer=load_tokenizer(model_dir), max_len=int(config.pretrain.max_len),
                   seed=int(config.seed), info=info)
