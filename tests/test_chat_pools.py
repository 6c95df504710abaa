"""Pools as users have them: ``messages`` records (multi-turn, system turns) rendered through a
chat template, records far longer than the encoding length, and the selection jobs' length
policy (``select.max_len`` / ``select.truncation``), end to end through ``configs/select_ntk.py``
on a Hugging Face Llama directory.

The checkpoint is a tiny random ``LlamaForCausalLM`` (``save_llama`` of test_launcher_hf) with
a byte-level BPE ``tokenizer.json`` trained here with ``tokenizers`` and a Llama-3-style chat
template; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from ntk_jax.data.records import encode_records, read_records, tokenize_record  # noqa: E402
from ntk_jax.launcher.run import run  # noqa: E402
from test_launcher_hf import save_llama  # noqa: E402
from test_scale_configs import load  # noqa: E402

BOS, EOT, SH, EH = "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}" + SH + "{{ m['role'] }}" + EH + "\n\n"
                   "{{ m['content'] | trim }}" + EOT + "{% endfor %}"
                   "{% if add_generation_prompt %}" + SH + "assistant" + EH + "\n\n{% endif %}")
# renders the last assistant turn with an (empty) reasoning block, earlier ones without (as
# Qwen3's does): a turn's rendering depends on what follows it
THINK_TEMPLATE = LLAMA3_TEMPLATE.replace("{{ m['content'] | trim }}",
                                         "{% if loop.last and m['role'] == 'assistant' %}<think></think>{% endif %}"
                                         "{{ m['content'] | trim }}")
WORDS = ("the cat dog sat ran on mat big small red blue good bad what is why how answer question tell me "
         "about a story of one two three four five you are helpful assistant please thanks").split()
MAX_LEN = 48


def _text(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


def bpe_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` (Llama-3 specials, chat template)."""
    rng = np.random.default_rng(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=[BOS, EOT, SH, EH],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_text(rng, 12) for _ in range(400)] + ["system user assistant"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT)
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def chat_llama_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("chat_llama"))
    tok = bpe_tokenizer()
    tok.save_pretrained(d)
    save_llama(d, vocab_size=len(tok))
    return d


@pytest.fixture(scope="module")
def tok(chat_llama_dir):
    from ntk_jax.launcher.context import load_tokenizer

    return load_tokenizer(chat_llama_dir)


def conversation(rng, turns: int, system: bool, words: int = 3) -> list[dict]:
    msgs = [{"role": "system", "content": _text(rng, 3)}] if system else []
    for _ in range(turns):
        msgs += [{"role": "user", "content": _text(rng, words)}, {"role": "assistant", "content": _text(rng, words)}]
    return msgs


def expected_scored(tok, rendering: str, last_only: bool = False) -> list[bool]:
    """Independently of the library: tokens of ``rendering`` (offsets of one tokenization of the
    whole string) whose first character lies in an assistant turn's ``content<|eot_id|>``."""
    spans = [m.span(1) for m in re.finditer(re.escape(SH + "assistant" + EH + "\n\n") + "(.*?" + re.escape(EOT) + ")",
                                            rendering, flags=re.S)]
    spans = spans[-1:] if last_only else spans
    enc = tok(rendering, add_special_tokens=False, return_offsets_mapping=True)
    return [any(lo <= s < hi for lo, hi in spans) for s, _ in enc["offset_mapping"]]


def test_multi_turn_mask_is_exactly_the_assistant_tokens(tok):
    rng = np.random.default_rng(1)
    for turns, system in ((1, False), (2, True), (3, False), (3, True)):
        msgs = conversation(rng, turns, system)
        rendering = tok.apply_chat_template(msgs, tokenize=False)
        for last_only in (False, True):
            rec = {"id": "c", "messages": msgs}
            ids, flags, keep = tokenize_record(tok, rec, assistant_turns="last" if last_only else "all")
            # token by token: the tokens of the rendering, scored exactly on the assistant turns
            assert ids == tok.encode(rendering, add_special_tokens=False) and keep == 0
            assert flags.tolist() == expected_scored(tok, rendering, last_only)
            assert int(flags.sum()) > 0
            n = len(ids)
            arrays = encode_records(tok, [rec], n + 2, assistant_turns="last" if last_only else "all")
            np.testing.assert_array_equal(arrays["loss_mask"][0, :n - 1], flags[1:].astype(np.float32))
            assert arrays["loss_mask"][0, n - 1:].sum() == 0
        scored_text = tok.decode([t for t, f in zip(ids, flags) if f])  # last turn only (last_only=True above)
        assert scored_text == msgs[-1]["content"] + EOT
    # a prompt/response record is the conversation [user, assistant]
    pr = tokenize_record(tok, {"prompt": "tell me", "response": "a story"})
    mr = tokenize_record(tok, {"messages": [{"role": "user", "content": "tell me"},
                                            {"role": "assistant", "content": "a story"}]})
    assert pr[0] == mr[0] and pr[1].tolist() == mr[1].tolist()


def test_turn_rendered_differently_when_last_and_plain_rendering(tok):
    rng = np.random.default_rng(2)
    msgs = conversation(rng, 3, True)
    ids, flags, _ = tokenize_record(tok, {"messages": msgs}, chat_template=THINK_TEMPLATE)
    rendering = tok.apply_chat_template(msgs, tokenize=False, chat_template=THINK_TEMPLATE)
    assert tok.decode(ids) == rendering
    runs = tok.decode([t if f else tok.convert_tokens_to_ids(SH) for t, f in zip(ids, flags)]).split(SH)
    pieces = [p for p in runs if p]
    assert pieces[-3:] == [msgs[2]["content"] + EOT, msgs[4]["content"] + EOT,
                           "<think></think>" + msgs[6]["content"] + EOT]
    # no template: the documented plain rendering, loss on each assistant content + eos
    ids, flags, keep = tokenize_record(tok, {"messages": msgs[:5]}, chat_template=False)
    assert keep == 1 and tok.decode(ids) == (BOS + "System: " + msgs[0]["content"] + "\n\nUser: " + msgs[1]["content"]
                                             + "\n\nAssistant: " + msgs[2]["content"] + EOT + "\n\nUser: "
                                             + msgs[3]["content"] + "\n\nAssistant: " + msgs[4]["content"] + EOT)
    scored = tok.decode([t if f else tok.convert_tokens_to_ids(SH) for t, f in zip(ids, flags)]).split(SH)
    assert [p for p in scored if p] == [msgs[2]["content"] + EOT, msgs[4]["content"] + EOT]
    # a template that refuses a turn (as templates without system turns do) names the record
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(ValueError, match=r"record s: the chat template cannot render .*System role not supported"):
        tokenize_record(tok, {"id": "s", "messages": msgs[:3]}, chat_template=strict + LLAMA3_TEMPLATE)


def test_messages_records_read_validate_and_mix(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lines = [{"id": "m", "messages": msgs}, {"prompt": "p", "response": "r"}, {"text": "some text"}]
    p = tmp_path / "mixed.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in lines))
    recs = read_records(p)  # mixed formats within one pool are supported
    assert recs[0] == lines[0] and [r["id"] for r in recs] == ["m", "1", "2"]
    assert encode_records(tok, recs, 32)["loss_mask"].sum(axis=1).min() > 0
    datasets.Dataset.from_list([{"messages": msgs}, {"messages": msgs + msgs}]).save_to_disk(str(tmp_path / "hf"))
    assert read_records(tmp_path / "hf")[1]["messages"] == msgs + msgs
    for bad, message in [
        ([{"role": "user", "content": "q"}], "has no assistant turn"),
        ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], r"messages\[0\] is an assistant"),
        ([{"role": "bot", "content": "a"}], r"messages\[0\] must be"),
        ([{"role": "user", "content": 3}], r"messages\[0\] must be"),
        ([], "non-empty list"),
    ]:
        (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"messages": bad}) + "\n")
        with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: record '1'.*" + message):
            read_records(tmp_path / "bad.jsonl")
    (tmp_path / "both.jsonl").write_text(json.dumps({"messages": msgs, "prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(ValueError, match=r"both\.jsonl: line 1: .*both 'messages' and"):
        read_records(tmp_path / "both.jsonl")


def write_pool(directory, rng) -> dict:
    """domain.jsonl (6 records) and pool.jsonl (20 multi-turn records, two of them 20× MAX_LEN:
    line 5 with a long prompt, line 12 with a long response)."""
    domain = [{"id": f"d{i}", "messages": conversation(rng, 1, i % 3 == 0, words=2)} for i in range(6)]
    pool = [{"id": f"p{i}", "messages": conversation(rng, 1 + i % 2, i % 2 == 0, words=2)} for i in range(18)]
    long_prompt = {"id": "long_prompt", "messages": [{"role": "system", "content": "you are helpful"},
                                                     {"role": "user", "content": _text(rng, 20 * MAX_LEN)},
                                                     {"role": "assistant", "content": "good answer"}]}
    long_response = {"id": "long_response", "messages": [{"role": "user", "content": "tell me a story"},
                                                         {"role": "assistant", "content": _text(rng, 20 * MAX_LEN)}]}
    pool = pool[:4] + [long_prompt] + pool[4:10] + [long_response] + pool[10:]
    paths = {}
    for name, recs in (("domain", domain), ("pool", pool)):
        paths[name] = os.path.join(directory, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in recs))
    return paths


def select_config(model_dir, paths, policy, bucket_multiple=0):
    """configs/select_ntk.py as the command line sets it: the checkpoint, the files, the
    selection's own encoding length and policy (pretrain untouched), a small job."""
    return load("select_ntk.py", None, f"--config.model.path={model_dir}",
                f"--config.select.domain_path={paths['domain']}", f"--config.select.pool_path={paths['pool']}",
                f"--config.select.max_len={MAX_LEN}", f"--config.select.truncation={policy}",
                "--config.select.n_select=4", "--config.select.projection_dim=256",
                "--config.select.feature_batch_size=8", "--config.select.shard_size=8",
                "--config.select.warmup.total_steps=2", "--config.select.warmup.batch_size=4",
                f"--config.select.bucket_multiple={bucket_multiple}")  # 0: one width, one compiled shape


def test_length_policies_end_to_end(chat_llama_dir, tmp_path):
    paths = write_pool(str(tmp_path), np.random.default_rng(3))
    # error: stops before any model work, naming the file, the line, the record, the setting
    t = time.time()
    with pytest.raises(ValueError) as err:
        run(select_config(chat_llama_dir, paths, "error"), str(tmp_path / "error"))
    assert time.time() - t < 10
    msg = str(err.value)
    assert re.search(r"pool\.jsonl: line 5: record 'long_prompt' encodes to \d{3,} tokens, more than "
                     r"select\.max_len=48", msg), msg
    assert "--config.select.truncation=left|right|drop" in msg and "2 of 20 pool records" in msg
    assert not os.path.exists(tmp_path / "error" / "select" / "scores")
    expected = {"left": (1, 1, "long_response"), "right": (1, 1, "long_prompt"), "drop": (0, 2, None)}
    for policy, (truncated, dropped, dropped_id) in expected.items():
        c = select_config(chat_llama_dir, paths, policy, bucket_multiple=16 if policy == "left" else 0)
        rep = run(c, str(tmp_path / policy))["select"]
        assert c.pretrain.max_len == 32  # the selection never reads the pre-training section
        lengths = rep["data"]["lengths"]["pool"]
        assert (lengths["n_over"], lengths["truncated"], lengths["dropped"]) == (2, truncated, dropped), lengths
        assert lengths["by_policy"]["left"] == {"truncated": 1, "dropped": 1}
        assert lengths["longest"] > 20 * MAX_LEN and rep["data"]["lengths"]["domain"]["n_over"] == 0
        assert rep["timings_s"]["lengths"] < 5 and rep["counts"]["pool"] == 20 - dropped
        assert rep["data"]["pool_path"] == os.path.abspath(paths["pool"])
        if dropped_id:
            assert lengths["dropped_ids"] == [dropped_id]
        with open(tmp_path / policy / "select" / "report.json") as f:
            assert json.load(f)["data"]["lengths"]["pool"]["truncated"] == truncated
        selected = [json.loads(x) for x in open(tmp_path / policy / "select" / "selected.jsonl")]
        by_id = {r["id"]: r for r in read_records(paths["pool"])}
        assert len(selected) == 4 and all(r == by_id[r["id"]] for r in selected)  # written back unchanged


def test_select_compare_fine_tunes_on_messages(chat_llama_dir, tmp_path):
    """select_compare (configs/select_compare.py's job) on a messages pool with long records:
    the selection, the fine-tuning and the evaluation all follow select.max_len / truncation."""
    rng = np.random.default_rng(4)
    paths = write_pool(str(tmp_path), rng)
    paths["test"] = os.path.join(str(tmp_path), "test.jsonl")
    with open(paths["test"], "w") as f:
        f.writelines(json.dumps({"id": f"t{i}", "messages": conversation(rng, 1, False, words=2)}) + "\n"
                     for i in range(4))
    c = load("select_compare.py", None, f"--config.model.path={chat_llama_dir}",
             f"--config.select.domain_path={paths['domain']}", f"--config.select.pool_path={paths['pool']}",
             f"--config.select.test_path={paths['test']}", f"--config.select.max_len={MAX_LEN}",
             "--config.select.truncation=left", "--config.select.n_select=4", "--config.select_compare.seeds=(0,)",
             "--config.select_compare.methods=('random',)", "--config.select_compare.oracles=()",
             "--config.select_compare.finetune.total_steps=2", "--config.select_compare.finetune.batch_size=4")
    rep = run(c, str(tmp_path / "compare"))["select_compare"]
    results = rep["results"]
    assert set(results) == {"0/domain_only", "0/random"}
    assert results["0/random"]["n_train"] == 6 + 4 and np.isfinite(results["0/random"]["test_loss"])
    sel = json.load(open(tmp_path / "compare" / "select_compare" / "seed_0" / "random" / "report.json"))
    assert sel["data"]["lengths"]["pool"]["truncated"] == 1  # long_prompt, kept and truncated
