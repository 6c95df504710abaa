"""The launcher on Hugging Face checkpoints: ``config.model.path`` naming a ``transformers``
checkpoint directory (with its tokenizer) runs the three validation experiments unchanged.

The checkpoint is a tiny random ``LlamaForCausalLM`` saved by ``transformers`` at test time
plus a character-level ``PreTrainedTokenizerFast`` built offline with ``tokenizers``
(``<s>``/``</s>``/``<unk>``, and deliberately no pad token); nothing is downloaded.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from experiment_checks import check_approximation, check_spectrum, check_stability  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402

from ntk_jax.data.synthetic import generate_task  # noqa: E402
from ntk_jax.data.tokenizer import ALPHABET, CharTokenizer  # noqa: E402
from ntk_jax.launcher.config_lib import base_config  # noqa: E402
from ntk_jax.launcher.context import Context, load_tokenizer, prepare_context  # noqa: E402
from ntk_jax.launcher.run import run  # noqa: E402
from ntk_jax.models.transformer import DecoderLM  # noqa: E402

SPECIALS = ("<s>", "</s>", "<unk>")


def char_tokenizer(specials=SPECIALS, **tokens):
    """A ``PreTrainedTokenizerFast`` over single characters (specials first)."""
    vocab = {t: i for i, t in enumerate(list(specials) + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **tokens)


def save_llama(directory, vocab_size, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf_llama"))
    tok = char_tokenizer(bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(d)
    save_llama(d, vocab_size=len(tok) + 2)
    return d


def small_config(path):
    c = base_config()
    c.model.path = path
    c.stability.n_train = 32
    c.stability.n_probe = 4
    c.stability.kernel_every = 4
    c.stability.train.total_steps = 8
    c.stability.train.batch_size = 8
    c.spectrum.n_kernel = 6
    c.spectrum.n_train = 16
    c.spectrum.n_eval = 16
    c.spectrum.train.total_steps = 3
    c.spectrum.train.batch_size = 8
    c.spectrum.placements = c.spectrum.placements[:1] + c.spectrum.placements[4:5]
    c.spectrum.n_random_kernels = 50
    c.approximation.n_examples = 6
    c.approximation.projection_dims = [1024]
    c.approximation.widths = [16]
    c.approximation.n_width_examples = 3
    return c


@pytest.mark.slow
def test_three_experiments_run_on_hf_llama(llama_dir, tmp_path):
    reps = run(small_config(llama_dir), str(tmp_path))
    for name in ("stability", "spectrum", "approximation"):
        assert os.path.isfile(tmp_path / name / "report.json")
    model_info = reps["stability"]["setup"]["model"]
    assert model_info == {"source": "path", "path": llama_dir, "model_type": "llama", "mesh": {"data": 1, "model": 1}}
    assert not os.path.exists(tmp_path / "base_model")  # nothing was pre-trained
    r = reps["stability"]
    assert r["steps"] == [0, 4, 8] and r["linearization_rel_error"][0] == 0.0
    assert all(-1 <= c <= 1 + 1e-9 for c in r["cosine"]) and r["relative_change"][-1] > 0
    s = reps["spectrum"]
    assert s["all_risks_within_correct_bounds"] and len(s["placements"]) == 2
    for name, check in (("stability", check_stability), ("spectrum", check_spectrum),
                        ("approximation", check_approximation)):  # the numbers, from the saved kernels
        check(str(tmp_path / name), reps[name])
    a = reps["approximation"]
    assert a["jacobian_free_consistency_rel"] < 1e-4
    assert [w["width"] for w in a["widths"]] == [16]


def test_context_loads_hf_checkpoint_and_matches_torch(llama_dir, tmp_path):
    ctx = prepare_context(small_config(llama_dir), str(tmp_path))
    tok = ctx.tokenizer
    # No pad token in the files: padding uses eos; bos present, so it starts every example.
    assert tok.pad_token_id == tok.eos_token_id == 1 and tok.bos_token_id == 0 and ctx.add_bos
    records = generate_task("add", 4, seed=0)
    batch = ctx.encode(records)
    ids = batch["input_ids"]
    first = records[0]
    n_p, n_r = len(first["prompt"]), len(first["response"])
    assert ids[0, 0] == 0 and ids[0, 1 + n_p + n_r] == 1  # [<s>] prompt response [</s>]
    assert list(ids[0, 1:1 + n_p]) == [ALPHABET.index(ch) + 3 for ch in first["prompt"]]
    model = ctx.load_model({"rank": 2, "targets": ["q_proj"]})
    assert isinstance(model, DecoderLM) and model.layers[0].self_attn.q_proj.lora is not None
    assert ctx.load_model().layers[0].self_attn.q_proj.lora is None  # a fresh copy each time
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(batch["attention_mask"])).logits
    got = np.asarray(model(ids, attention_mask=batch["attention_mask"]))
    real = batch["attention_mask"] == 1  # right padding: positions agree with HF's arange
    assert np.max(np.abs(got[real] - ref.numpy()[real])) < 1e-4


def test_context_dtype_and_embedded_format(tiny_model_dir, tmp_path):
    c = small_config(tiny_model_dir)
    c.model.dtype = "bfloat16"
    ctx = prepare_context(c, str(tmp_path))
    assert isinstance(ctx.tokenizer, CharTokenizer)  # the embedded format keeps its char tokenizer
    m = ctx.load_model()
    assert m.config.dtype == "bfloat16" and m.config.param_dtype == "float32"
    ids = ctx.encode(generate_task("add", 2, seed=0))["input_ids"]
    out = m(ids)
    assert out.dtype == np.float32 and np.all(np.isfinite(np.asarray(out)))


def test_tokenizer_errors_and_fallbacks(tmp_path):
    # No bos (as for Qwen tokenizers): examples start with the prompt.
    d = tmp_path / "nobos"
    char_tokenizer(eos_token="</s>", pad_token="<unk>").save_pretrained(d)
    save_llama(d, vocab_size=60)
    ctx = Context(str(d), load_tokenizer(str(d)), 32, 0, {})
    assert not ctx.add_bos
    rec = generate_task("copy", 1, seed=0)[0]
    ids = ctx.encode([rec])["input_ids"][0]
    assert ids[0] == ALPHABET.index(rec["prompt"][0]) + 3 and ctx.tokenizer.pad_token_id == 2
    # No eos: a clear error.
    d = tmp_path / "noeos"
    char_tokenizer(bos_token="<s>").save_pretrained(d)
    save_llama(d, vocab_size=60)
    with pytest.raises(ValueError, match="no eos token"):
        load_tokenizer(str(d))
    # A tokenizer larger than the model's vocabulary.
    d = tmp_path / "small_vocab"
    char_tokenizer(bos_token="<s>", eos_token="</s>").save_pretrained(d)
    save_llama(d, vocab_size=20)
    c = small_config(str(d))
    with pytest.raises(ValueError, match="vocab_size is 20"):
        prepare_context(c, str(tmp_path / "w"))
    # A checkpoint directory without tokenizer files.
    d = tmp_path / "notok"
    save_llama(d, vocab_size=60)
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        load_tokenizer(str(d))
    with open(d / "config.json") as f:
        assert json.load(f)["model_type"] == "llama"
