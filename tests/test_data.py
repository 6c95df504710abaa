"""Tests of ntk_jax.data: synthetic tasks, the character tokenizer, encoding, batching."""
import json
import re

import numpy as np
import pytest

from ntk_jax.data.encoding import encode_examples, encode_record, iterate_batches, max_length, pad_to_batches
from ntk_jax.data.synthetic import (
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    TASKS,
    generate_task,
    make_corpus,
    read_jsonl,
    write_jsonl,
)
from ntk_jax.data.tokenizer import ALPHABET, CharTokenizer

REQUIRED_TASKS = {"add", "sub", "copy", "reverse", "sort", "count", "sentiment", "parity",
                  "sentiment_flipped", "add_mod10"}
N = 200  # records per task in the tests


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(sorted(TASKS), 50, seed=3)


# ----------------------------------------------------------------------------- synthetic
def test_registry_has_required_tasks():
    assert REQUIRED_TASKS <= set(TASKS)
    assert all(callable(fn) for fn in TASKS.values())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generate_task_deterministic_and_seed_dependent(name):
    a = generate_task(name, N, seed=0)
    assert a == generate_task(name, N, seed=0)
    b = generate_task(name, N, seed=1)
    assert [(r["prompt"], r["response"]) for r in a] != [(r["prompt"], r["response"]) for r in b]
    assert [r["id"] for r in a] == [f"{name}-0-{i}" for i in range(N)]
    assert all(r["task"] == name for r in a)
    # prefix property: a shorter draw is a prefix of a longer one
    assert generate_task(name, 10, seed=0) == a[:10]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_records_are_short_and_in_alphabet(name):
    for r in generate_task(name, N, seed=5):
        assert 1 <= len(r["prompt"]) <= 21, r
        assert 1 <= len(r["response"]) <= 8, r
        assert set(r["prompt"] + r["response"]) <= set(ALPHABET), r


def test_tasks_use_independent_streams():
    # add and add_mod10 share a prompt format but not a random stream
    add = [r["prompt"] for r in generate_task("add", 50, 0)]
    mod = [r["prompt"] for r in generate_task("add_mod10", 50, 0)]
    assert add != mod


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match="unknown task 'nope'.*add"):
        generate_task("nope", 3, 0)
    with pytest.raises(ValueError, match="unknown task"):
        make_corpus(["add", "nope"], 3, 0)


def test_bad_counts():
    with pytest.raises(ValueError, match="non-negative"):
        generate_task("add", -1, 0)
    with pytest.raises(ValueError, match="n_per_task"):
        make_corpus(["add"], None, 0)
    with pytest.raises(ValueError, match="duplicate"):
        make_corpus(["add", "add"], 2, 0)
    assert generate_task("add", 0, 0) == []


# Independent recomputation of answers from the prompt text.
def _check_answer(task, prompt, response):
    if task == "add":
        a, b = re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()
        return response == str(int(a) + int(b))
    if task == "add_spaced":
        a, b = re.fullmatch(r"(\d+) \+ (\d+) =", prompt).groups()
        return response == str(int(a) + int(b))
    if task == "add_mod10":
        a, b = re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()
        return response == str((int(a) + int(b)) % 10)
    if task == "sub":
        a, b = re.fullmatch(r"(\d+)-(\d+)=", prompt).groups()
        return int(a) >= int(b) and response == str(int(a) - int(b))
    if task == "copy":
        (s,) = re.fullmatch(r"copy:([a-z]+)>", prompt).groups()
        return response == s
    if task == "reverse":
        (s,) = re.fullmatch(r"rev:([a-z]+)>", prompt).groups()
        return response == "".join(reversed(s))
    if task == "sort":
        (s,) = re.fullmatch(r"sort:(\d+)>", prompt).groups()
        digits = [int(c) for c in s]
        digits.sort()
        return response == "".join(map(str, digits))
    if task == "count":
        c, s = re.fullmatch(r"count ([a-z]):([a-z]+)>", prompt).groups()
        return response == str(sum(ch == c for ch in s))
    if task == "parity":
        (s,) = re.fullmatch(r"parity:([01]+)>", prompt).groups()
        return response == ("odd" if sum(map(int, s)) % 2 else "even")
    if task in ("sentiment", "sentiment_flipped"):
        (adj,) = re.fullmatch(r"the [a-z]+ was ([a-z]+)\?", prompt).groups()
        assert (adj in POSITIVE_WORDS) != (adj in NEGATIVE_WORDS)
        label = "pos" if adj in POSITIVE_WORDS else "neg"
        if task == "sentiment_flipped":
            label = {"pos": "neg", "neg": "pos"}[label]
        return response == label
    if task == "noise":
        return prompt.endswith(">") and re.fullmatch(r"[a-z0-9]+", response) is not None
    raise AssertionError(f"no checker for task {task}")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_answers_are_correct(name):
    records = generate_task(name, N, seed=11)
    bad = [r for r in records if not _check_answer(name, r["prompt"], r["response"])]
    assert not bad, bad[:3]
    # not degenerate: several distinct prompts and (except binary labels) responses
    assert len({r["prompt"] for r in records}) > 10
    assert len({r["response"] for r in records}) >= 2


def test_sentiment_labels_balanced_and_flipped_distribution_matches():
    for name in ("sentiment", "sentiment_flipped"):
        labels = [r["response"] for r in generate_task(name, 400, seed=0)]
        assert 0.35 < labels.count("pos") / len(labels) < 0.65


def test_make_corpus(corpus):
    assert corpus == make_corpus(sorted(TASKS), 50, seed=3)
    assert corpus != make_corpus(sorted(TASKS), 50, seed=4)
    assert len(corpus) == 50 * len(TASKS)
    assert len({r["id"] for r in corpus}) == len(corpus)
    # the corpus is the per-task records, shuffled
    expected = [r for name in sorted(TASKS) for r in generate_task(name, 50, 3)]
    assert sorted(corpus, key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])
    assert [r["task"] for r in corpus[:50]] != [corpus[0]["task"]] * 50  # actually shuffled
    # mapping form
    mixed = make_corpus({"add": 3, "copy": 5}, seed=0)
    assert sorted(r["task"] for r in mixed) == ["add"] * 3 + ["copy"] * 5


def test_jsonl_round_trip(tmp_path, corpus):
    path = tmp_path / "sub" / "corpus.jsonl"
    write_jsonl(corpus, path)
    assert read_jsonl(path) == corpus
    # blank lines are skipped
    text = path.read_text()
    path.write_text("\n" + text.replace("\n", "\n\n", 3) + "   \n")
    assert read_jsonl(path) == corpus


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "1+1=", "response": "2"})
    path.write_text(f"{good}\n\n{good}\n{{not json\n{good}\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 4"):
        read_jsonl(path)
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: expected a JSON object"):
        read_jsonl(path)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_vocab(tok):
    assert tok.vocab_size == 4 + len(ALPHABET) == len(tok)
    assert 40 <= tok.vocab_size <= 64
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(set(ALPHABET)) == len(ALPHABET)
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(tok.vocab_size))
    assert vocab["<pad>"] == 0 and vocab[ALPHABET[0]] == 4


def test_tokenizer_encode_decode(tok):
    text = "the movie was great? 12+7=19"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True) == [tok.bos_token_id] + ids
    assert tok.encode("aZ\nb") == [tok.encode("a")[0], 3, 3, tok.encode("b")[0]]
    assert tok.decode([1, *tok.encode("ab"), 2, 0, 0]) == "ab"
    assert tok.decode([1, *tok.encode("ab"), 3, 2, 0], skip_special_tokens=False) == "<bos>ab<unk><eos><pad>"
    assert tok.decode(np.array(tok.encode("xy"), dtype=np.int32)) == "xy"
    assert tok.encode("a<eos>") == [tok.encode("a")[0], 2]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer("abca")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_round_trips_through_tokenizer(tok, name):
    for r in generate_task(name, N, seed=2):
        for text in (r["prompt"], r["response"]):
            ids = tok.encode(text)
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text


def test_save_load_char_tokenizer(tmp_path, tok):
    tok.save_pretrained(tmp_path / "tok")
    back = CharTokenizer.from_pretrained(tmp_path / "tok")
    assert back.alphabet == tok.alphabet and back.get_vocab() == tok.get_vocab()
    custom = CharTokenizer("xyz ")
    custom.save_pretrained(tmp_path / "custom")
    assert CharTokenizer.from_pretrained(tmp_path / "custom").get_vocab() == custom.get_vocab()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        CharTokenizer.from_pretrained(tmp_path / "missing")


def _hf_texts(corpus):
    texts = [r["prompt"] for r in corpus[:100]] + [r["response"] for r in corpus[:100]]
    return texts + ["the movie was great? 12+7=19", "  double  spaces ", "UPPER\ttab\nnewline é", "", "a<eos>b"]


def test_hf_tokenizers_match(tmp_path, tok, corpus):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "hf"
    tok.save_pretrained(d)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(d))
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (0, 1, 2)
    assert auto.vocab_size == tok.vocab_size and auto.get_vocab() == tok.get_vocab()
    for text in _hf_texts(corpus):
        ids = tok.encode(text, add_special_tokens=False)
        assert list(fast.encode(text, add_special_tokens=False)) == ids, text
        assert list(auto.encode(text, add_special_tokens=False)) == ids, text
        assert list(auto.encode(text, add_special_tokens=True)) == tok.encode(text, add_special_tokens=True)
        with_specials = [1, *ids, 2, 0]
        assert auto.decode(with_specials, skip_special_tokens=True) == tok.decode(with_specials), text
        assert (auto.decode(with_specials, skip_special_tokens=False)
                == tok.decode(with_specials, skip_special_tokens=False)), text


def test_encode_examples_with_hf_tokenizer_matches(tmp_path, tok, corpus):
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained(tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    a = encode_examples(tok, corpus[:64], 32)
    b = encode_examples(auto, corpus[:64], 32)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# ----------------------------------------------------------------------------- encoding
def test_encode_examples_shapes_and_masks(tok, corpus):
    max_len = 32
    arrays = encode_examples(tok, corpus, max_len)
    n = len(corpus)
    assert set(arrays) == {"input_ids", "targets", "loss_mask", "attention_mask"}
    for k, dtype in [("input_ids", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                     ("attention_mask", np.int32)]:
        assert arrays[k].shape == (n, max_len) and arrays[k].dtype == dtype, k
    ids, tgt, lm, am = (arrays[k] for k in ("input_ids", "targets", "loss_mask", "attention_mask"))
    np.testing.assert_array_equal(tgt[:, :-1], ids[:, 1:])
    assert np.all(tgt[:, -1] == tok.pad_token_id)
    for i, r in enumerate(corpus):
        p, s = tok.encode(r["prompt"]), tok.encode(r["response"])
        length = 1 + len(p) + len(s) + 1
        expected = [tok.bos_token_id] + p + s + [tok.eos_token_id]
        assert ids[i, :length].tolist() == expected
        assert np.all(ids[i, length:] == tok.pad_token_id)
        # attention mask: exactly the real tokens, a prefix
        assert am[i].tolist() == [1] * length + [0] * (max_len - length)
        # loss mask: len(response) + 1 positions, whose targets are response + eos
        pos = np.flatnonzero(lm[i])
        assert len(pos) == len(r["response"]) + 1
        np.testing.assert_array_equal(pos, np.arange(len(p), len(p) + len(s) + 1))
        assert tok.decode(tgt[i, pos]) == r["response"]
        assert tgt[i, pos[-1]] == tok.eos_token_id
        assert set(np.unique(lm[i])) <= {0.0, 1.0}
        # decoding the real tokens gives back prompt + response
        assert tok.decode(ids[i, am[i] == 1]) == r["prompt"] + r["response"]
    # masked positions only where attention is on
    assert np.all(lm <= am)


def test_encode_examples_flags(tok):
    recs = [{"id": "r0", "prompt": "12+7=", "response": "19"}]
    a = encode_examples(tok, recs, 12, add_bos=False, add_eos=False)
    assert a["input_ids"][0, :7].tolist() == tok.encode("12+7=19")
    assert a["attention_mask"][0].sum() == 7
    np.testing.assert_array_equal(np.flatnonzero(a["loss_mask"][0]), [4, 5])
    b = encode_examples(tok, recs, 12, add_bos=True, add_eos=False)
    np.testing.assert_array_equal(np.flatnonzero(b["loss_mask"][0]), [5, 6])
    c = encode_examples(tok, [{"id": "e", "prompt": "x>", "response": ""}], 8)
    np.testing.assert_array_equal(np.flatnonzero(c["loss_mask"][0]), [2])  # only the eos
    assert c["targets"][0, 2] == tok.eos_token_id


def test_encode_examples_errors(tok):
    long = {"id": "long-1", "prompt": "copy:abcdefghij>", "response": "abcdefghij"}
    assert max_length(tok, [long]) == 28
    with pytest.raises(ValueError, match=r"record long-1: encoded length 28 exceeds max_len=20"):
        encode_examples(tok, [{"id": "ok", "prompt": "1+1=", "response": "2"}, long], 20)
    assert encode_examples(tok, [long], 28)["attention_mask"].sum() == 28  # exactly fits
    empty = {"id": "empty-3", "prompt": "1+1=", "response": ""}
    with pytest.raises(ValueError, match=r"record empty-3: .*zero tokens"):
        encode_examples(tok, [empty], 16, add_eos=False)
    with pytest.raises(ValueError, match=r"record #0: missing or non-string 'response'"):
        encode_examples(tok, [{"prompt": "1+1="}], 16)
    with pytest.raises(ValueError, match="empty prompt"):
        encode_record(tok, {"prompt": "", "response": "a"}, add_bos=False)


def test_max_length(tok, corpus):
    m = max_length(tok, corpus)
    assert m == max(len(r["prompt"]) + len(r["response"]) + 2 for r in corpus)
    assert m <= 32  # every task fits the tiny model's sequence length
    assert max_length(tok, []) == 0
    assert max_length(tok, corpus, add_bos=False, add_eos=False) == m - 2


def test_iterate_batches(tok, corpus):
    arrays = encode_examples(tok, corpus[:103], 32)
    batches = list(iterate_batches(arrays, 10))
    assert [len(b["input_ids"]) for b in batches] == [10] * 10 + [3]
    for k in arrays:
        np.testing.assert_array_equal(np.concatenate([b[k] for b in batches]), arrays[k])
    assert len(list(iterate_batches(arrays, 10, drop_last=True))) == 10
    s1 = list(iterate_batches(arrays, 10, seed=7))
    s2 = list(iterate_batches(arrays, 10, seed=7))
    s3 = list(iterate_batches(arrays, 10, seed=8))
    for b1, b2 in zip(s1, s2):
        for k in arrays:
            np.testing.assert_array_equal(b1[k], b2[k])
    shuffled = np.concatenate([b["input_ids"] for b in s1])
    assert not np.array_equal(shuffled, arrays["input_ids"])
    assert not np.array_equal(shuffled, np.concatenate([b["input_ids"] for b in s3]))
    # a permutation of the rows, rows kept intact across keys
    perm = np.random.default_rng(7).permutation(103)
    for k in arrays:
        np.testing.assert_array_equal(np.concatenate([b[k] for b in s1]), arrays[k][perm])
    with pytest.raises(ValueError, match="leading dimension"):
        list(iterate_batches({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, 2))
    with pytest.raises(ValueError, match="batch_size"):
        list(iterate_batches(arrays, 0))


def test_pad_to_batches(tok, corpus):
    arrays = encode_examples(tok, corpus[:13], 32)
    padded = pad_to_batches(arrays, 8)
    assert padded["input_ids"].shape == (16, 32) and padded["example_mask"].tolist() == [1.0] * 13 + [0.0] * 3
    for k in arrays:
        assert padded[k].dtype == arrays[k].dtype
        np.testing.assert_array_equal(padded[k][:13], arrays[k])
        assert np.all(padded[k][13:] == 0)
    assert pad_to_batches(arrays, 13)["input_ids"].shape == (13, 32)
    assert np.all(pad_to_batches(arrays, 8, pad_values={"input_ids": 5})["input_ids"][13:] == 5)
