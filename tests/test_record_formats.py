"""Pools in the layouts instruction-tuning sets ship in (Alpaca, Dolly, ShareGPT,
prompt/completion) read without preprocessing (ntk_jax.data.records.convert_record), and a
selection on them writing the chosen records back in their own format.

Oracles: the canonical record written by hand for each layout; a selection on the converted
pool scoring exactly as the same pool given in the native layout."""
import json
import os

import numpy as np
import pytest

from ntk_jax.data.records import (RECORD_FORMATS, convert_record, encode_records, read_records, record_format,
                                  renderings, source_record)
from ntk_jax.data.tokenizer import CharTokenizer
from ntk_jax.selection.jobs import SELECTED_NAME, run_selection
from test_selection import _select_cfg, small_bench, tiny_context  # noqa: F401 (fixtures)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


FOREIGN = [
    # (record as shipped, its canonical fields, format)
    ({"instruction": "Add.", "input": "2 3", "output": "5", "role": "useful"},
     {"prompt": "Add.\n2 3", "response": "5", "role": "useful"}, "alpaca"),
    ({"instruction": "Say hi.", "input": "", "output": "hi", "text": "### Instruction: Say hi. ### Response: hi"},
     {"prompt": "Say hi.", "response": "hi"}, "alpaca"),
    ({"instruction": "Go on.", "output": "c", "system": "Be brief.", "history": [["a", "b"]]},
     {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                   {"role": "assistant", "content": "b"}, {"role": "user", "content": "Go on."},
                   {"role": "assistant", "content": "c"}]}, "alpaca"),
    ({"instruction": "Who?", "context": "Ada wrote it.", "response": "Ada", "category": "closed_qa"},
     {"prompt": "Who?\nAda wrote it.", "response": "Ada", "task": "closed_qa", "category": "closed_qa"}, "dolly"),
    ({"id": 70, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "S"},
     {"id": "70", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}]}, "sharegpt"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": "x"},
     {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": "x"}, "sharegpt"),
    ({"prompt": "1+1=", "completion": "2"}, {"prompt": "1+1=", "response": "2"}, "prompt_completion"),
]


def test_each_format_reads_as_its_canonical_record_and_writes_back_as_read(tmp_path):
    shipped = [r for r, _, _ in FOREIGN] + [{"prompt": "p", "response": "r"}, {"text": "t"}]
    recs = read_records(_write(tmp_path / "pool.jsonl", shipped))
    assert sorted(RECORD_FORMATS) == sorted({f for _, _, f in FOREIGN})
    for i, (rec, (raw, canonical, fmt)) in enumerate(zip(recs, FOREIGN)):
        assert record_format(raw) == fmt
        assert dict(rec) == {"id": str(i), **canonical}, fmt  # ids by position, as for native records
        assert source_record(rec) == {**raw, "id": str(i) if "id" not in raw else str(raw["id"])}
    for native in recs[len(FOREIGN):]:  # native records are not copied
        assert record_format(native) is None and source_record(native) is native
    # a converted record encodes as the native record with the same fields
    tok = CharTokenizer()
    converted = recs[:len(FOREIGN)]
    native = [{k: v for k, v in r.items() if k in ("id", "prompt", "response", "messages")} for r in converted]
    for key, want in encode_records(tok, native, 128).items():
        np.testing.assert_array_equal(encode_records(tok, converted, 128)[key], want)


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "x"}]},
     r"line 2: sharegpt record '1': conversations\[1\] has speaker 'tool'"),
    ({"conversations": []}, r"line 2: sharegpt record '1': 'conversations' must be a non-empty list"),
    ({"conversations": [{"from": "gpt", "value": "a"}]}, r"line 2: record '1': messages\[0\] is an assistant turn"),
    ({"conversations": [{"from": "human", "value": 3}]}, r"conversations\[0\] needs a string 'value'"),
    ({"instruction": "i", "output": 5}, r"line 2: alpaca record '1': 'output' must be a string, got int"),
    ({"instruction": "i", "output": "o", "history": [["only one"]]}, r"history\[0\] must be a \[query, answer\] pair"),
    ({"instruction": "i", "context": ["c"], "response": "r"}, r"dolly record '1': 'context' must be a string or absent"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
     r"prompt_completion record '1': 'prompt' and 'completion' must be strings .*as 'messages'"),
    ({"question": "q", "answer": "a"}, r"needs 'prompt' and 'response', or 'text', or 'messages', or the fields of one "
                                       r"of \('alpaca', 'dolly', 'sharegpt', 'prompt_completion'\)"),
])
def test_bad_records_of_each_format_name_file_line_and_field(tmp_path, record, message):
    p = _write(tmp_path / "f.jsonl", [{"text": "ok"}, record])
    with pytest.raises(ValueError, match=r"f\.jsonl: " + message if message.startswith("line") else message):
        read_records(p)


def test_convert_record_leaves_native_records_alone():
    rec = {"prompt": "p", "response": "r", "instruction": "kept as a field"}  # has prompt: native
    assert convert_record(rec) is rec and record_format({"text": "t", "instruction": "i"}) is None


def test_selection_on_a_mixed_format_pool_scores_as_native_and_writes_the_formats_back(
        tmp_path, tiny_context, small_bench):
    """A pool written as Alpaca / Dolly / prompt-completion records (the same prompts and
    responses): the embedding job's scores equal those on the native pool, and
    ``selected.jsonl`` holds the chosen records as they were in the file."""
    def shipped(k, r):
        rest = {key: v for key, v in r.items() if key not in ("prompt", "response")}
        return [{**rest, "instruction": r["prompt"], "output": r["response"]},
                {**rest, "instruction": r["prompt"], "response": r["response"]},
                {**rest, "prompt": r["prompt"], "completion": r["response"]}][k % 3]

    pool = small_bench.pool
    lines = [shipped(k, r) for k, r in enumerate(pool)]
    read = read_records(_write(tmp_path / "pool.jsonl", lines))
    assert {r.format for r in read} == {"alpaca", "dolly", "prompt_completion"}
    cfg = _select_cfg("embedding")
    cfg.warmup.total_steps = 0
    ref = run_selection(tiny_context, cfg, small_bench.domain, pool, str(tmp_path / "native"), seed=0, plot=False)
    got = run_selection(tiny_context, cfg, small_bench.domain, read, str(tmp_path / "shipped"), seed=0, plot=False)
    a, b = (np.load(os.path.join(tmp_path, d, "all_scores.npz")) for d in ("shipped", "native"))
    np.testing.assert_array_equal(a["scores"], b["scores"])
    assert got["selected_ids"] == ref["selected_ids"]
    n = len(pool)
    assert got["data"]["layouts"] == {"domain": {"prompt_response": len(small_bench.domain)},
                                      "pool": {"alpaca": len(range(0, n, 3)), "dolly": len(range(1, n, 3)),
                                               "prompt_completion": len(range(2, n, 3))}}
    by_id = {str(r["id"]): r for r in lines}
    written = [json.loads(x) for x in open(tmp_path / "shipped" / SELECTED_NAME)]
    assert written == [by_id[i] for i in got["selected_ids"]]  # in their own format, as read
    assert "warning" not in got["data"]["layouts"]
    # a ShareGPT pool against a prompt/response domain, no chat template: the job says so
    chat_pool = read_records(_write(tmp_path / "chat.jsonl", [
        {"id": r["id"], "conversations": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["response"]}]}
        for r in pool]))
    cfg.max_len = 64
    mixed = run_selection(tiny_context, cfg, small_bench.domain, chat_pool, str(tmp_path / "mixed"), seed=0, plot=False)
    assert mixed["data"]["layouts"]["warning"].startswith("the domain is rendered plain and the pool chat")


def test_renderings_with_and_without_a_chat_template():
    from test_chat_pools import bpe_tokenizer

    recs = [{"prompt": "p", "response": "r"}, {"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]}, {"text": "t"}]
    char, bpe = CharTokenizer(), bpe_tokenizer()
    assert [renderings(char, [r]) for r in recs] == [{"plain"}, {"chat"}, {"plain"}]
    assert [renderings(bpe, [r]) for r in recs] == [{"chat"}, {"chat"}, {"plain"}]
    assert renderings(bpe, recs[:1], chat_template=False) == {"plain"}


# ----------------------------------------------------------------------------- file kinds
def test_json_array_parquet_and_json_lines_sources(tmp_path):
    """``alpaca_data.json`` (one JSON array), a ``.json`` file of JSON Lines and a Parquet file
    (nested ShareGPT turns, a column absent in some rows) read as the same records as JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ntk_jax.data.records import iter_record_chunks, record_locator

    raws = [r for r, _, _ in FOREIGN if "history" not in r and "id" not in r] + [{"prompt": "p", "response": "r"}]
    want = read_records(_write(tmp_path / "ref.jsonl", raws))
    (tmp_path / "arr.json").write_text("  \n" + json.dumps(raws, indent=1), encoding="utf-8")
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in raws), encoding="utf-8")
    for name in ("arr.json", "lines.json"):
        got = read_records(tmp_path / name)
        assert got == want and [source_record(r) for r in got] == [source_record(r) for r in want]
    assert [r for _, c in iter_record_chunks(tmp_path / "arr.json", 2) for r in c] == want
    assert record_locator(str(tmp_path / "arr.json"))(3) == f"{tmp_path / 'arr.json'}: item 3"
    assert record_locator(str(tmp_path / "lines.json"))(3) == f"{tmp_path / 'lines.json'}: line 4"
    # Parquet: ShareGPT rows with a list-of-struct column; 'system' missing (None) in one row
    rows = [{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}],
             "system": "S"},
            {"id": "b", "conversations": [{"from": "human", "value": "r"}, {"from": "gpt", "value": "y"}],
             "system": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pool.parquet", row_group_size=1)
    got = read_records(tmp_path / "pool.parquet")
    assert [r["messages"] for r in got] == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "r"}, {"role": "assistant", "content": "y"}]]
    assert source_record(got[1]) == {"id": "b", "conversations": rows[1]["conversations"]}  # None column dropped
    assert record_locator(str(tmp_path / "pool.parquet"))(1) == f"{tmp_path / 'pool.parquet'}: row 1"


def test_bad_sources_are_named(tmp_path):
    (tmp_path / "bad.json").write_text('[{"text": "a"}, {"text": ]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON .*line 1"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('[{"text": "a"}, ["not", "an", "object"]]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"obj\.json: item 1: expected a JSON object"):
        read_records(tmp_path / "obj.json")
    (tmp_path / "dup.json").write_text(json.dumps([{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]))
    with pytest.raises(ValueError, match=r"duplicate id 'x': .*dup\.json: item 0 and .*dup\.json: item 1"):
        read_records(tmp_path / "dup.json")
    (tmp_path / "not.parquet").write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not\.parquet: not a readable Parquet file"):
        read_records(tmp_path / "not.parquet")
    (tmp_path / "pool.csv").write_text("prompt,response\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pool\.csv: CSV/TSV sources are not read"):
        read_records(tmp_path / "pool.csv")
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="no records"):
        read_records(tmp_path / "empty.json")


def test_glob_of_parquet_shards_as_one_source(tmp_path):
    """A hub snapshot's split given by a glob (``data/train-*.parquet``): the shards in sorted
    order, ids by position across them, duplicates named with both files; the snapshot
    directory itself is refused with the glob to use."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "snap" / "data"
    data.mkdir(parents=True)
    rows = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(5)]
    pq.write_table(pa.Table.from_pylist(rows[3:]), data / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:3]), data / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([{"instruction": "t", "output": "t"}]), data / "test-00000-of-00001.parquet")
    got = read_records(str(tmp_path / "snap" / "**" / "train-*.parquet"))
    assert [(r["id"], r["prompt"]) for r in got] == [(str(k), f"i{k}") for k in range(5)]
    with pytest.raises(ValueError, match=r"snap: not a Hugging Face datasets directory .*holds data files "
                                         r"\(data/test-00000-of-00001\.parquet, .*name the split's files with a glob"):
        read_records(tmp_path / "snap")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        read_records(str(tmp_path / "snap" / "*.jsonl"))
    _write(tmp_path / "a1.jsonl", [{"id": "x", "text": "a"}])
    _write(tmp_path / "a2.jsonl", [{"id": "x", "text": "b"}])
    with pytest.raises(ValueError, match=r"duplicate id 'x': .*a1\.jsonl: line 1 and .*a2\.jsonl: line 1"):
        read_records(str(tmp_path / "a*.jsonl"))


def test_exact_duplicates_dropped_before_scoring(tmp_path, tiny_context, small_bench):
    """``select.dedup="exact"``: copies of earlier records (new ids, same content) leave the pool
    before scoring — the job then scores exactly as on the pool without them — and the report
    names them; ``"none"`` keeps them; an unknown policy is named."""
    from ntk_jax.data.records import first_of_duplicates

    pool = small_bench.pool
    copies = [{**pool[k], "id": f"copy-{k}-{j}"} for j, k in enumerate((3, 7, 7))]
    noisy = pool[:10] + copies + pool[10:]
    assert first_of_duplicates(noisy).tolist() == list(range(10)) + list(range(13, len(noisy)))
    cfg = _select_cfg("embedding")
    cfg.warmup.total_steps = 0
    ref = run_selection(tiny_context, cfg, small_bench.domain, pool, str(tmp_path / "ref"), seed=0, plot=False)
    cfg.dedup = "exact"
    got = run_selection(tiny_context, cfg, small_bench.domain, noisy, str(tmp_path / "dedup"), seed=0, plot=False)
    assert got["data"]["dedup"] == {"policy": "exact", "dropped": 3, "dropped_ids": ["copy-3-0", "copy-7-1", "copy-7-2"]}
    assert got["counts"]["pool"] == len(pool) and got["selected_ids"] == ref["selected_ids"]
    a, b = (np.load(os.path.join(tmp_path, d, "all_scores.npz")) for d in ("dedup", "ref"))
    np.testing.assert_array_equal(a["scores"], b["scores"])
    cfg.dedup = "none"
    kept = run_selection(tiny_context, cfg, small_bench.domain, noisy, str(tmp_path / "none"), seed=0, plot=False)
    assert kept["counts"]["pool"] == len(noisy) and kept["data"]["dedup"] == {"policy": "none"}
    cfg.dedup = "fuzzy"
    with pytest.raises(ValueError, match="unknown select.dedup 'fuzzy'"):
        run_selection(tiny_context, cfg, small_bench.domain, noisy, str(tmp_path / "bad"), seed=0, plot=False)
