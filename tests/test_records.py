"""Record readers, validation, streaming, chat-template masking and length bucketing
(ntk_jax.data.records) and the truncation policies of ntk_jax.data.encoding."""
import json

import numpy as np
import pytest

from ntk_jax.data.encoding import encode_examples
from ntk_jax.data.records import (bucket_by_length, bucket_width, encode_buckets, encode_options, encode_records,
                                  map_length_buckets,
                                  encoded_lengths, iter_record_chunks, read_records)
from ntk_jax.data.synthetic import make_corpus, write_jsonl
from ntk_jax.data.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(["add", "copy", "sentiment", "sort"], 25, seed=5)


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- reading
def test_jsonl_prompt_response_and_text_with_assigned_ids(tmp_path):
    lines = [json.dumps({"prompt": "1+1=", "response": "2", "label": "x"}), "",
             json.dumps({"id": "b", "text": "hello"}),
             json.dumps({"text": "abc", "task": "t"})]
    recs = read_records(_write_lines(tmp_path / "a.jsonl", lines))
    # ids by position among records (the blank line does not count), given ids kept
    assert [r["id"] for r in recs] == ["0", "b", "2"]
    assert recs[0] == {"id": "0", "prompt": "1+1=", "response": "2", "label": "x"}
    assert recs[2] == {"id": "2", "text": "abc", "task": "t"}
    assert read_records(tmp_path / "a.jsonl", limit=2) == recs[:2]
    # integer ids become strings
    p = _write_lines(tmp_path / "int.jsonl", [json.dumps({"id": 7, "text": "a"})])
    assert read_records(p)[0]["id"] == "7"


def test_round_trip_of_written_corpus(tmp_path, corpus):
    write_jsonl(corpus, tmp_path / "c.jsonl")
    assert read_records(tmp_path / "c.jsonl") == corpus


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 1000])
def test_chunked_streaming_equals_full_read(tmp_path, corpus, chunk_size):
    path = tmp_path / "c.jsonl"
    write_jsonl([{k: v for k, v in r.items() if k != "id"} for r in corpus], path)
    full = read_records(path)
    chunks = list(iter_record_chunks(path, chunk_size))
    assert [s for s, _ in chunks] == list(range(0, len(full), chunk_size))
    assert all(len(c) <= chunk_size for _, c in chunks)
    assert [r for _, c in chunks for r in c] == full


def test_streaming_is_lazy(tmp_path, corpus):
    # a malformed line far down the file is only reached when the stream gets there
    path = tmp_path / "c.jsonl"
    write_jsonl(corpus, path)
    with open(path, "a") as f:
        f.write("{broken\n")
    it = iter_record_chunks(path, 10)
    start, first = next(it)
    assert start == 0 and first == corpus[:10]
    with pytest.raises(ValueError, match=rf"c\.jsonl: line {len(corpus) + 1}: malformed JSON"):
        list(it)


def test_hf_datasets_dir_round_trip(tmp_path, corpus):
    datasets = pytest.importorskip("datasets")
    rows = [dict(r, label=r["task"]) for r in corpus]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds") == rows
    chunks = list(iter_record_chunks(tmp_path / "ds", 9))
    assert [r for _, c in chunks for r in c] == rows and chunks[1][0] == 9
    # rows with absent (None) columns: the column is dropped; ids assigned by row
    mixed = datasets.Dataset.from_list([{"prompt": "a", "response": "b", "text": None},
                                        {"prompt": None, "response": None, "text": "xyz"}])
    mixed.save_to_disk(str(tmp_path / "mixed"))
    assert read_records(tmp_path / "mixed") == [{"id": "0", "prompt": "a", "response": "b"},
                                                {"id": "1", "text": "xyz"}]
    # a DatasetDict must be narrowed to a split
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict with splits .*train"):
        read_records(tmp_path / "dd")
    assert read_records(tmp_path / "dd" / "train") == rows
    bad = datasets.Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"bad: row 1: .*no 'response'"):
        read_records(tmp_path / "bad")


def test_malformed_json_names_file_and_line(tmp_path):
    good = json.dumps({"prompt": "1+1=", "response": "2"})
    p = _write_lines(tmp_path / "bad.jsonl", [good, "", good, "{not json", good])
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 4: malformed JSON"):
        read_records(p)
    p = _write_lines(tmp_path / "arr.jsonl", [good, "[1, 2]"])
    with pytest.raises(ValueError, match=r"arr\.jsonl: line 2: expected a JSON object"):
        read_records(p)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a"}, r"line 2: record '1' has prompt but no 'response'"),
    ({"response": "a"}, r"line 2: record '1' has response but no 'prompt'"),
    ({"label": "x"}, r"line 2: record '1' needs 'prompt' and 'response', or 'text'"),
    ({"prompt": 3, "response": "a"}, r"line 2: .*'prompt' must be a string"),
    ({"text": ["a"]}, r"line 2: .*'text' must be a string"),
    ({"text": "a", "prompt": "b", "response": "c"}, "both 'text' and"),
    ({"id": "", "text": "a"}, r"line 2: 'id' must be a non-empty string"),
    ({"id": ["x"], "text": "a"}, "'id' must be"),
    ({"prompt": "p", "response": "c", "options": ["a", "b"]}, r"response 'c' is not one of its options"),
    ({"prompt": "p", "response": "a", "options": ["a", "a"]}, "distinct strings"),
    ({"prompt": "p", "response": "a", "options": []}, "non-empty list"),
    ({"prompt": "p", "response": "a", "role": "helpful"}, "unknown role 'helpful'"),
])
def test_missing_or_bad_fields(tmp_path, record, message):
    p = _write_lines(tmp_path / "f.jsonl", [json.dumps({"text": "ok"}), json.dumps(record)])
    with pytest.raises(ValueError, match=r"f\.jsonl: " + message if message.startswith("line") else message):
        read_records(p)


def test_duplicate_ids_name_id_and_both_lines(tmp_path):
    p = _write_lines(tmp_path / "d.jsonl", [json.dumps({"id": "x", "text": "a"}), json.dumps({"text": "b"}),
                                            json.dumps({"id": "x", "text": "c"})])
    with pytest.raises(ValueError, match=r"duplicate id 'x': .*d\.jsonl: line 1 and .*d\.jsonl: line 3"):
        read_records(p)
    # an assigned id colliding with an explicit one is a duplicate too
    p = _write_lines(tmp_path / "e.jsonl", [json.dumps({"id": "1", "text": "a"}), json.dumps({"text": "b"})])
    with pytest.raises(ValueError, match=r"duplicate id '1'"):
        read_records(p)
    with pytest.raises(ValueError, match=r"duplicate id"):
        list(iter_record_chunks(p, 1))


def test_empty_or_missing_sources(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
        read_records(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "notds").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face datasets directory"):
        read_records(tmp_path / "notds")
    with pytest.raises(ValueError, match="chunk_size"):
        list(iter_record_chunks(tmp_path / "empty.jsonl", 0))


# ----------------------------------------------------------------------------- encoding
def test_encode_records_matches_encode_examples_and_text_path(tok, corpus):
    a = encode_records(tok, corpus, 32)
    b = encode_examples(tok, corpus, 32)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k])
    t = encode_records(tok, [{"id": "t", "text": "hello world"}], 16)
    n = len("hello world")
    assert t["input_ids"][0, : n + 2].tolist() == [tok.bos_token_id] + tok.encode("hello world") + [tok.eos_token_id]
    # every text token and the eos is scored
    pos = np.flatnonzero(t["loss_mask"][0])
    np.testing.assert_array_equal(pos, np.arange(n + 1))
    assert tok.decode(t["targets"][0, pos]) == "hello world"
    # without bos the first text token cannot be a target
    nb = encode_records(tok, [{"id": "t", "text": "hello"}], 16, add_bos=False)
    assert tok.decode(nb["targets"][0, nb["loss_mask"][0] > 0]) == "ello"


def test_zero_loss_tokens_name_the_record(tok):
    with pytest.raises(ValueError, match=r"record r9: .*zero"):
        encode_records(tok, [{"id": "r9", "prompt": "ab", "response": ""}], 16, add_eos=False)
    with pytest.raises(ValueError, match=r"record t1: .*zero"):
        encode_records(tok, [{"id": "t1", "text": ""}], 16, add_eos=False)
    # right truncation that cuts off the whole response
    with pytest.raises(ValueError, match=r"record long: right truncation .* leaves no scored token"):
        encode_records(tok, [{"id": "long", "prompt": "a" * 20, "response": "b"}], 10, truncation="right")


def test_truncation_policies(tok):
    rec = {"id": "x", "prompt": "abcdefgh", "response": "xyz"}  # bos + 8 + 3 + eos = 13 tokens
    with pytest.raises(ValueError, match=r"record x: encoded length 13 exceeds max_len=10"):
        encode_records(tok, [rec], 10)
    left = encode_records(tok, [rec], 10, truncation="left")
    # bos kept, the first 3 prompt characters dropped, the response intact and scored
    assert left["input_ids"][0].tolist() == [tok.bos_token_id] + tok.encode("defghxyz") + [tok.eos_token_id]
    assert tok.decode(left["targets"][0, left["loss_mask"][0] > 0]) == "xyz"
    right = encode_records(tok, [rec], 11, truncation="right")
    assert right["input_ids"][0].tolist() == [tok.bos_token_id] + tok.encode("abcdefghxy")
    assert tok.decode(right["targets"][0, right["loss_mask"][0] > 0]) == "xy"
    assert right["attention_mask"][0].sum() == 11
    with pytest.raises(ValueError, match="response alone"):
        encode_records(tok, [{"id": "y", "prompt": "a", "response": "b" * 12}], 10, truncation="left")
    with pytest.raises(ValueError, match="unknown truncation"):
        encode_records(tok, [rec], 10, truncation="middle")
    # encode_examples takes the same policies
    np.testing.assert_array_equal(encode_examples(tok, [rec], 10, truncation="left")["input_ids"], left["input_ids"])


CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<bos>u:{{ m['content'] }}|"
                 "{% else %}a:{{ m['content'] }}<eos>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("chat_tok")
    CharTokenizer().save_pretrained(d)
    t = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<bos>",
                                             eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    t.chat_template = CHAT_TEMPLATE
    return t


def test_chat_template_masks_exactly_the_response(chat_tok, tok, corpus):
    recs = corpus[:20]
    arrays = encode_records(chat_tok, recs, 40)
    for i, r in enumerate(recs):
        n = int(arrays["attention_mask"][i].sum())
        expected = "<bos>u:" + r["prompt"] + "|a:" + r["response"] + "<eos>"
        # the whole rendering, nothing added around it
        assert chat_tok.decode(arrays["input_ids"][i, :n].tolist(), skip_special_tokens=False) == expected
        scored = arrays["targets"][i, arrays["loss_mask"][i] > 0].tolist()
        # exactly the response then the template's eos
        assert scored == tok.encode(r["response"]) + [tok.eos_token_id]
        assert chat_tok.decode(scored, skip_special_tokens=True) == r["response"]
    # chat_template=False: the plain encoding, identical to encode_examples
    plain = encode_records(chat_tok, recs, 40, chat_template=False)
    np.testing.assert_array_equal(plain["input_ids"], encode_examples(tok, recs, 40)["input_ids"])
    # text records are not templated
    t = encode_records(chat_tok, [{"id": "t", "text": "ab"}], 8)
    assert t["input_ids"][0, :4].tolist() == [1, *tok.encode("ab"), 2]
    # a template string on a tokenizer without one; True on one without → error
    t2 = encode_records(chat_tok, recs[:3], 40, chat_template=CHAT_TEMPLATE)
    np.testing.assert_array_equal(t2["loss_mask"], arrays["loss_mask"][:3])
    with pytest.raises(ValueError, match="has no chat template"):
        encode_records(tok, recs[:1], 40, chat_template=True)


def test_chat_template_boundary_must_be_a_prefix(chat_tok, corpus):
    bad = CHAT_TEMPLATE.replace("{% if add_generation_prompt %}a:", "{% if add_generation_prompt %}b:")
    with pytest.raises(ValueError, match=r"record .*not a prefix"):
        encode_records(chat_tok, corpus[:1], 40, chat_template=bad)


def test_encode_options(tok):
    recs = [{"id": "q", "prompt": "the food was bad?", "response": "neg", "options": ["neg", "pos"]},
            {"id": "r", "prompt": "1+1=", "response": "2", "options": ["1", "2", "3"]}]
    arrays, owner, correct = encode_options(tok, recs, 32)
    assert owner.tolist() == [0, 0, 1, 1, 1] and correct.tolist() == [True, False, False, True, False]
    for row, (i, o) in enumerate([(0, "neg"), (0, "pos"), (1, "1"), (1, "2"), (1, "3")]):
        assert tok.decode(arrays["targets"][row, arrays["loss_mask"][row] > 0]) == o
        assert tok.decode(arrays["input_ids"][row]).startswith(recs[i]["prompt"])
    with pytest.raises(ValueError, match="record z: no 'options'"):
        encode_options(tok, [{"id": "z", "prompt": "a", "response": "b"}], 8)


# ----------------------------------------------------------------------------- bucketing
def test_bucket_by_length_partitions_and_groups():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=101)
    buckets = bucket_by_length(lengths, 16, multiple=8)
    flat = np.concatenate(buckets)
    assert sorted(flat.tolist()) == list(range(101))  # every index exactly once
    assert [len(b) for b in buckets] == [16] * 6 + [5]
    # buckets are consecutive runs of the sorted lengths: no length in a bucket is exceeded
    # by one in an earlier bucket, so the spread inside a bucket is that of a sorted run
    sorted_lengths = np.sort(lengths)
    for k, b in enumerate(buckets):
        np.testing.assert_array_equal(np.sort(lengths[b]), sorted_lengths[16 * k:16 * k + len(b)])
        w = bucket_width(lengths[b], multiple=8)
        assert w % 8 == 0 and lengths[b].max() <= w < lengths[b].max() + 8
    # padding is far below padding everything to the max
    padded = sum(len(b) * bucket_width(lengths[b], multiple=8) for b in buckets)
    assert padded < 0.75 * 101 * lengths.max()
    # deterministic, ties broken by index; mapping results back to pool order
    assert all(np.array_equal(a, b) for a, b in zip(buckets, bucket_by_length(lengths, 16, multiple=8)))
    assert [b.tolist() for b in bucket_by_length([2, 1, 2, 1], 2)] == [[1, 3], [0, 2]]
    out = np.empty(101)
    for b in buckets:
        out[b] = lengths[b] * 2.0
    np.testing.assert_array_equal(out, lengths * 2.0)
    assert bucket_width([30], multiple=8, max_len=31) == 31
    with pytest.raises(ValueError, match="max_len"):
        bucket_by_length([5, 40], 4, max_len=32)
    with pytest.raises(ValueError, match="batch_size"):
        bucket_by_length([5], 0)
    assert bucket_by_length(np.zeros(0, dtype=int), 4) == []


def test_encode_buckets_equals_full_encoding(tok, corpus):
    full = encode_records(tok, corpus, 32)
    lengths = encoded_lengths(tok, corpus)
    np.testing.assert_array_equal(lengths, full["attention_mask"].sum(1))
    seen = []
    for idx, arrays in encode_buckets(tok, corpus, 16, multiple=8):
        w = arrays["input_ids"].shape[1]
        assert w % 8 == 0 and w >= lengths[idx].max()
        for k in full:  # the same rows, only less padding
            np.testing.assert_array_equal(arrays[k], full[k][idx, :w])
        assert np.all(full["attention_mask"][idx, w:] == 0)
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(corpus)))


def test_map_length_buckets_order_shapes_and_off(tok, corpus):
    full = encode_records(tok, corpus, 32)
    shapes = []

    def fn(arrays):  # row results: the real length and the first target of each row
        shapes.append(arrays["input_ids"].shape)
        return np.stack([arrays["attention_mask"].sum(1), arrays["targets"][:, 0]], axis=1)

    want = np.stack([full["attention_mask"].sum(1), full["targets"][:, 0]], axis=1)
    got = map_length_buckets(fn, tok, corpus, 16, multiple=8, max_len=32)
    np.testing.assert_array_equal(got, want)  # results back in record order
    assert all(b == 16 and w % 8 == 0 and w <= 32 for b, w in shapes)  # fixed rows, bucket widths
    assert len({w for _, w in shapes}) > 1  # the corpus really has several widths
    shapes.clear()
    np.testing.assert_array_equal(map_length_buckets(fn, tok, corpus, 16, multiple=0, max_len=32), want)
    assert {s for s in shapes} == {(16, 32)}  # bucketing off: everything padded to max_len
    with pytest.raises(ValueError, match="no records"):
        map_length_buckets(fn, tok, [], 16, multiple=8, max_len=32)


# ----------------------------------------------------------------------------- length policy
def _chat(*contents):
    """A messages record alternating user / assistant turns."""
    return {"messages": [{"role": "user" if k % 2 == 0 else "assistant", "content": c} for k, c in enumerate(contents)]}


def test_plain_messages_and_multi_span_truncation(tok):
    rec = {"id": "m", **_chat("ab", "cd", "ef", "gh")}  # no template: the plain rendering
    full = encode_records(tok, [rec], 64)
    scored = full["targets"][0, full["loss_mask"][0] > 0]
    assert scored.tolist() == tok.encode("cd") + [tok.eos_token_id] + tok.encode("gh") + [tok.eos_token_id]
    last = encode_records(tok, [rec], 64, assistant_turns="last")
    assert last["targets"][0, last["loss_mask"][0] > 0].tolist() == tok.encode("gh") + [tok.eos_token_id]
    n = int(full["attention_mask"][0].sum())
    # left: leading tokens go (the first assistant turn too); the last turn stays whole, bos kept
    left = encode_records(tok, [rec], n - 25, truncation="left")  # "User: ab\n\nAssistant: cd<eos>" + 1 go
    assert left["input_ids"][0, 0] == tok.bos_token_id
    assert left["targets"][0, left["loss_mask"][0] > 0].tolist() == tok.encode("gh") + [tok.eos_token_id]
    # right: the tail goes, the first assistant turn stays scored
    right = encode_records(tok, [rec], 26, truncation="right")
    assert right["targets"][0, right["loss_mask"][0] > 0].tolist() == tok.encode("cd") + [tok.eos_token_id]
    with pytest.raises(ValueError, match="unknown assistant_turns"):
        encode_records(tok, [rec], 64, assistant_turns="first")


def test_check_lengths_policies_and_error_names_the_line(tmp_path, tok):
    from ntk_jax.data.records import check_lengths, fit_records, length_profile

    recs = [{"id": "a", "prompt": "ab", "response": "c"},            # 5 tokens: fits
            {"id": "long_prompt", "prompt": "x" * 30, "response": "y"},  # left truncates, right cannot
            {"id": "long_response", "prompt": "p", "response": "z" * 30}]  # right truncates, left cannot
    path = _write_lines(tmp_path / "pool.jsonl", ["", json.dumps(recs[0]), json.dumps(recs[1]), json.dumps(recs[2])])
    prof = length_profile(tok, read_records(path))
    assert prof.tolist() == [[5, 3, 3, 1], [33, 31, 31, 1], [33, 2, 2, 1]]
    with pytest.raises(ValueError, match=r"pool\.jsonl: line 3: record 'long_prompt' encodes to 33 tokens, more than "
                                         r"select\.max_len=16 \(2 of 3 pool records are longer.*left: 1 truncated, 1 "
                                         r"dropped; right: 1 truncated, 1 dropped; drop: 0 truncated, 2 dropped\) "
                                         r"or raise --config\.select\.max_len"):
        fit_records(tok, read_records(path), 16, "error", path=path)
    for policy, kept, truncated in (("left", ["a", "long_prompt"], 1), ("right", ["a", "long_response"], 1),
                                    ("drop", ["a"], 0)):
        got, check = fit_records(tok, read_records(path), 16, policy, path=path)
        assert [r["id"] for r in got] == kept and check.lengths.tolist() == [5] + [16] * (len(kept) - 1)
        assert (check.summary["n_over"], check.summary["truncated"], check.summary["dropped"]) == (2, truncated,
                                                                                                  3 - len(kept))
        if policy != "drop":  # the kept records encode under the policy, at the checked lengths
            arrays = encode_records(tok, got, 16, truncation=policy)
            assert arrays["attention_mask"].sum(axis=1).tolist() == check.lengths.tolist()
    assert check_lengths(prof, 64, "error", ids=["a", "b", "c"]).summary["n_over"] == 0
    with pytest.raises(ValueError, match=r"every one of the 3 pool records is dropped"):
        check_lengths(prof, 4, "drop", ids=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"unknown truncation policy 'middle'"):
        check_lengths(prof, 4, "middle", ids=["a", "b", "c"])


def test_buckets_truncate_with_known_lengths(tok, corpus):
    recs = corpus[:10] + [{"id": "long", "prompt": "q" * 50, "response": "r"}]
    got = {}
    for idx, arrays in encode_buckets(tok, recs, 4, multiple=8, max_len=24, truncation="left"):
        for j, i in enumerate(idx):
            got[int(i)] = arrays["loss_mask"][j].sum()
    assert sorted(got) == list(range(11)) and got[10] == 2  # the response and the eos, scored after truncation
    with pytest.raises(ValueError, match=r"index 10 has length 53 > max_len=24"):
        list(encode_buckets(tok, recs, 4, multiple=8, max_len=24))
