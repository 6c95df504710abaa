"""Records for data selection: reading (JSONL, Hugging Face ``datasets`` directories),
validating, streaming, encoding (with chat templates) and length bucketing.

A *record* is a plain ``dict`` as read (kept unchanged, so a selection can write the chosen
records back as they were), with

* ``"id"``: a string. A record without one gets ``f"{index}"``, its 0-based position among
  the records of the file (blank JSONL lines do not count); an integer id is converted to
  its decimal string. Ids must be unique within a file.
* one of: ``"messages"`` (a chat: a non-empty list of turns ``{"role": "system" | "user" |
  "assistant", "content": str}``, multi-turn; the loss is on the assistant turns; at least
  one assistant turn, and a system or user turn before the first); ``"prompt"`` and
  ``"response"`` (strings; the loss is on the response); or ``"text"`` (a string; the loss is
  on every token). Formats may be mixed within one file;
* optionally ``"label"``, ``"task"``, ``"family"``, ``"role"`` (one of :data:`ROLES`) and
  ``"options"`` (a non-empty list of distinct strings, the candidate responses of a
  classification / multiple-choice record; its ``response``, if any, must be one of them).

Records in the other layouts instruction-tuning sets ship in are recognised by their fields
and converted on reading (:data:`RECORD_FORMATS`, :func:`convert_record`), so a pool needs no
preprocessing; formats may be mixed within one file:

* ``alpaca`` — ``instruction``, optional ``input``, ``output`` (and LLaMA-Factory's optional
  ``system`` and ``history``, a list of ``[query, answer]`` pairs): the prompt is the
  instruction, then a newline and the input when there is one; with a system or history the
  record becomes a ``messages`` chat (history turns first); a ``text`` field next to them (the
  formatted copy ``tatsu-lab/alpaca`` ships) is dropped;
* ``dolly`` — ``instruction``, optional ``context``, ``response`` (and ``category``, which
  becomes the ``task`` when there is none): prompt = instruction, then a newline and the context;
* ``sharegpt`` — ``conversations``: a list of turns ``{"from": "human" | "gpt" | "system" | ...,
  "value"}`` (or ``{"role", "content"}``), with an optional top-level ``system``: a ``messages``
  chat (``human``/``user`` → user, ``gpt``/``assistant``/``chatgpt``/``bard``/``bing``/``model`` →
  assistant; any other speaker, e.g. a tool, is an error naming it);
* ``prompt_completion`` — ``prompt`` and ``completion`` strings (OpenAI's legacy fine-tuning
  files, TRL's prompt-completion type): prompt/response.

A converted record keeps every other field (``id``, ``label``, ``role``, ...), and
:func:`source_record` gives the record as it was read, which is what a selection writes back.

Sources (``path``): a ``.jsonl`` file (one JSON object per line, blank lines skipped); a
``.json`` file holding one JSON array of objects (loaded whole, e.g. ``alpaca_data.json``; a
``.json`` file of JSON Lines is read as ``.jsonl``); a ``.parquet`` file (read in row batches,
as the Hugging Face hub stores datasets); or a local directory written by
``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` directory must be narrowed to one split,
``path/<split>``); or a glob pattern naming several such files (``snapshot/data/train-*.parquet``,
``**`` recursive), read in sorted order as one source (ids by position across them). In Parquet
and ``datasets`` rows, columns that are ``None`` (absent in that row) are dropped from the record.

Every error names where it happened: ``file.jsonl: line 7: ...`` (1-based line),
``file.json: item 7: ...`` (0-based array index) or ``file.parquet: row 7`` / ``dir: row 7: ...``
(0-based row).

Encoding (:func:`encode_records`) gives the arrays of :mod:`ntk_jax.data.encoding`
(``input_ids``, ``targets``, ``loss_mask``, ``attention_mask``). With a chat template
(``chat_template="auto"`` and a tokenizer that has one), a messages record is rendered by the
template, and a prompt/response record as the conversation ``[user: prompt, assistant:
response]``. Assistant turn ``k`` (every one, or with ``assistant_turns="last"`` the last)
is scored: the text between the rendering of ``messages[:k]`` with
``add_generation_prompt=True`` (which must be a prefix of the next) and the rendering of
``messages[:k + 1]`` — its content and the template's end-of-turn marker; everything before
it is its prompt. A template that renders a turn differently once later turns follow (e.g.
a reasoning block only on the last turn) is handled by finding the turn's content in the
full rendering. No bos/eos is added around the rendering (the template places its own
special tokens). Without a template a messages record has the plain rendering ``[bos]
"System: ..." "\n\nUser: ..." "\n\nAssistant: " content [eos] ...`` (each turn ``"<Role>: " +
content``, turns separated by a blank line), the loss on each scored assistant content and
its eos. Text records are never templated.

Length policy (:func:`fit_records`, :func:`check_lengths`): a pass over the records that
tokenizes each once and keeps four numbers per record (:func:`length_profile`), then applies
one of :data:`LENGTH_POLICIES` to the records longer than ``max_len`` — ``"error"`` (a
ValueError naming ``file: line N``, the record id, its length, what each other policy would
do and the setting to change), ``"left"`` / ``"right"`` (truncated at encoding; those the
policy cannot fit are dropped) or ``"drop"`` — and counts what it did.

Bucketing (:func:`bucket_by_length`) groups records of similar length into batches so that
scoring a large pool pads little; :func:`encode_buckets` yields each bucket's pool indices
with its arrays, so results map back to pool order.
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ntk_jax.data.encoding import (TRUNCATION_POLICIES, _special_id, encode_record, fits_after_truncation,
                                   pack_sequences, scored_spans)

__all__ = [
    "ROLES",
    "RECORD_FORMATS",
    "convert_record",
    "source_record",
    "layout_counts",
    "renderings",
    "first_of_duplicates",
    "validate_record",
    "iter_records",
    "iter_record_chunks",
    "read_records",
    "has_chat_template",
    "tokenize_record",
    "tokenize_records",
    "encode_records",
    "shuffle_responses",
    "encoded_lengths",
    "length_profile",
    "LENGTH_POLICIES",
    "ASSISTANT_TURNS",
    "LengthCheck",
    "check_lengths",
    "fit_records",
    "record_locator",
    "bucket_by_length",
    "encode_buckets",
    "map_length_buckets",
    "encode_options",
]

ROLES = ("useful", "unrelated", "conflicting", "domain")
CHAT_ROLES = ("system", "user", "assistant")
ASSISTANT_TURNS = ("all", "last")


# ----------------------------------------------------------------------------- other formats
RECORD_FORMATS = ("alpaca", "dolly", "sharegpt", "prompt_completion")
# ShareGPT speakers -> chat roles (the names LLaMA-Factory, FastChat and Axolotl accept)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}


class _Converted(dict):
    """A record converted from another format (:func:`convert_record`): the canonical fields,
    with the record as read in :attr:`source` (:func:`source_record`)."""

    source: dict
    format: str


def record_format(record: Mapping) -> str | None:
    """The name in :data:`RECORD_FORMATS` of the layout ``record`` is in (by its fields), or
    ``None`` for the native layouts (``messages`` / ``prompt`` + ``response`` / ``text``) and
    for anything unrecognised (which :func:`validate_record` then reports)."""
    if "conversations" in record and "messages" not in record:
        return "sharegpt"
    if "instruction" in record and "output" in record and not {"messages", "prompt", "response"} & set(record):
        return "alpaca"
    if "instruction" in record and "response" in record and "prompt" not in record and "text" not in record:
        return "dolly"
    if "prompt" in record and "completion" in record and "response" not in record:
        return "prompt_completion"
    return None


def _string(record: Mapping, key: str, where: str, fmt: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        need = "a string" + (" or absent" if optional else "")
        raise ValueError(f"{where}: {fmt} record {record['id']!r}: {key!r} must be {need}, got {type(value).__name__}")
    return value


def _joined(first: str, second: str) -> str:
    return f"{first}\n{second}" if second else first


def _sharegpt_messages(record: Mapping, where: str) -> list[dict]:
    turns, rid = record["conversations"], record["id"]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: sharegpt record {rid!r}: 'conversations' must be a non-empty list of turns, "
                         f"got {turns!r:.80}")
    messages = []
    system = record.get("system")
    if system:
        messages.append({"role": "system", "content": _string(record, "system", where, "sharegpt")})
    for k, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ValueError(f"{where}: sharegpt record {rid!r}: conversations[{k}] must be an object, got {turn!r:.80}")
        speaker = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(f"{where}: sharegpt record {rid!r}: conversations[{k}] has speaker {speaker!r}; "
                             f"supported: {sorted(SHAREGPT_ROLES)} (tool and function turns are not)")
        if not isinstance(content, str):
            raise ValueError(f"{where}: sharegpt record {rid!r}: conversations[{k}] needs a string 'value' "
                             f"(or 'content'), got {type(content).__name__}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": content})
    return messages


def _alpaca_history(record: Mapping, where: str) -> list[dict]:
    history, rid = record.get("history") or [], record["id"]
    if not isinstance(history, list):
        raise ValueError(f"{where}: alpaca record {rid!r}: 'history' must be a list of [query, answer] pairs")
    out = []
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ValueError(f"{where}: alpaca record {rid!r}: history[{k}] must be a [query, answer] pair of "
                             f"strings, got {pair!r:.80}")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def convert_record(record: Mapping, where: str = "record", index: int | None = None) -> dict:
    """``record`` in the project's canonical layout: unchanged (the same object) when it is
    native or unrecognised, else a new dict converted from its format (:data:`RECORD_FORMATS`,
    the module docstring) that keeps every field the conversion does not consume and remembers
    the record as read (:func:`source_record`). ValueError prefixed ``where`` (naming the
    record by its ``id``, else ``index``) on a field of the wrong type or an unknown ShareGPT
    speaker."""
    fmt = record_format(record)
    if fmt is None:
        return record
    rid = record.get("id")
    named = {**record, "id": str(rid if rid is not None else ("?" if index is None else index))}  # for messages
    consumed = {"sharegpt": ("conversations", "system"),
                "alpaca": ("instruction", "input", "output", "system", "history", "text"),
                "dolly": ("instruction", "context", "response"), "prompt_completion": ("prompt", "completion")}[fmt]
    out = _Converted({k: v for k, v in record.items() if k not in consumed})
    if fmt == "sharegpt":
        out["messages"] = _sharegpt_messages(named, where)
    elif fmt == "alpaca":
        prompt = _joined(_string(named, "instruction", where, fmt), _string(named, "input", where, fmt, optional=True))
        response = _string(named, "output", where, fmt)
        system = _string(named, "system", where, fmt, optional=True)
        history = _alpaca_history(named, where)
        if system or history:
            out["messages"] = ([{"role": "system", "content": system}] if system else []) + history + [
                {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        else:
            out["prompt"], out["response"] = prompt, response
    elif fmt == "dolly":
        out["prompt"] = _joined(_string(named, "instruction", where, fmt),
                                _string(named, "context", where, fmt, optional=True))
        out["response"] = _string(named, "response", where, fmt)
        if "task" not in out and isinstance(record.get("category"), str):
            out["task"] = record["category"]
    else:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise ValueError(f"{where}: prompt_completion record {named['id']!r}: 'prompt' and 'completion' must be "
                             "strings (a conversational prompt/completion record can be given as 'messages')")
        out["prompt"], out["response"] = record["prompt"], record["completion"]
    out.source, out.format = dict(record), fmt
    return out


def source_record(record: Mapping) -> Mapping:
    """``record`` as it was read: the original of a converted record (:func:`convert_record`,
    with its ``id``), else ``record`` itself."""
    source = getattr(record, "source", None)
    if source is None:
        return record
    return {**source, "id": record["id"]} if "id" in record else source


def layout_counts(records: Iterable[Mapping]) -> dict[str, int]:
    """How many of ``records`` were read in each layout: the format a record was converted from
    (:data:`RECORD_FORMATS`), else ``"messages"``, ``"prompt_response"`` or ``"text"``."""
    out: dict[str, int] = {}
    for r in records:
        kind = getattr(r, "format", None) or ("messages" if "messages" in r else "text" if "text" in r
                                              else "prompt_response")
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


def first_of_duplicates(records: Sequence[Mapping]) -> np.ndarray:
    """int64 indices of the records kept when exact duplicates are dropped: the first record
    of each distinct content (its ``messages``, ``prompt``/``response`` or ``text``; ids and
    other fields do not count), in order."""
    seen: set[str] = set()
    kept = []
    for i, r in enumerate(records):
        key = json.dumps({k: r[k] for k in ("messages", "prompt", "response", "text") if k in r}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(i)
    return np.asarray(kept, dtype=np.int64)


def renderings(tokenizer, records: Iterable[Mapping], chat_template="auto") -> set[str]:
    """How ``records`` are rendered for the model: ``"chat"`` (a ``messages`` record, or with a
    chat template a prompt/response record, rendered as a conversation) or ``"plain"``
    (prompt/response without a template, text). Without a chat template the two differ (the
    plain chat rendering adds ``User:`` / ``Assistant:`` headers), so a domain and a pool that
    do not share one rendering look unlike each other to every score."""
    templated = _use_template(tokenizer, chat_template) is not False
    return {"chat" if "messages" in r or (templated and "prompt" in r) else "plain" for r in records}


# ----------------------------------------------------------------------------- validation
def validate_record(record, index: int, where: str) -> dict:
    """``record`` checked and with its ``id`` ensured (``f"{index}"`` if absent).

    ``where`` (e.g. ``"pool.jsonl: line 7"``) prefixes every error message. Returns the same
    dict (mutated only to add/normalise ``id``), or for a record in another format
    (:data:`RECORD_FORMATS`) its converted copy (:func:`convert_record`). ValueError on: not a dict, a non-string
    ``id``, neither ``prompt``+``response`` nor ``text``, a field of the wrong type, bad
    ``options``, or an unknown ``role``.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    record = convert_record(record, where, index)
    if "id" not in record or record["id"] is None:
        record["id"] = f"{index}"
    elif isinstance(record["id"], (int, np.integer)) and not isinstance(record["id"], bool):
        record["id"] = str(int(record["id"]))
    elif not isinstance(record["id"], str) or not record["id"]:
        raise ValueError(f"{where}: 'id' must be a non-empty string, got {record['id']!r}")
    has_prompt, has_response = "prompt" in record, "response" in record
    if "messages" in record:
        _validate_messages(record, where)
    elif has_prompt or has_response:
        for key in ("prompt", "response"):
            if key not in record:
                raise ValueError(f"{where}: record {record['id']!r} has "
                                 f"{'prompt' if has_prompt else 'response'} but no {key!r} field")
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: record {record['id']!r}: {key!r} must be a string, "
                                 f"got {type(record[key]).__name__}")
        if "text" in record:
            raise ValueError(f"{where}: record {record['id']!r} has both 'text' and 'prompt'/'response'")
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: record {record['id']!r}: 'text' must be a string, "
                             f"got {type(record['text']).__name__}")
    else:
        raise ValueError(f"{where}: record {record['id']!r} needs 'prompt' and 'response', or 'text', or 'messages', "
                         f"or the fields of one of {RECORD_FORMATS} (fields: {sorted(record)})")
    if "options" in record:
        opts = record["options"]
        if (not isinstance(opts, list) or not opts or not all(isinstance(o, str) for o in opts)
                or len(set(opts)) != len(opts)):
            raise ValueError(f"{where}: record {record['id']!r}: 'options' must be a non-empty list of "
                             f"distinct strings, got {opts!r}")
        if "response" not in record:
            raise ValueError(f"{where}: record {record['id']!r}: 'options' needs a prompt/response record")
        if record["response"] not in opts:
            raise ValueError(f"{where}: record {record['id']!r}: response {record['response']!r} is not "
                             f"one of its options {opts}")
    if "role" in record and record["role"] not in ROLES:
        raise ValueError(f"{where}: record {record['id']!r}: unknown role {record['role']!r}; roles: {ROLES}")
    return record


def _validate_messages(record: dict, where: str) -> None:
    """Checks a ``messages`` record (see the module docstring); ValueError prefixed ``where``."""
    rid, msgs = record["id"], record["messages"]
    clash = sorted({"prompt", "response", "text"} & set(record))
    if clash:
        raise ValueError(f"{where}: record {rid!r} has both 'messages' and {clash}")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: record {rid!r}: 'messages' must be a non-empty list of "
                         f"{{'role', 'content'}} turns, got {msgs!r:.80}")
    for k, turn in enumerate(msgs):
        if not isinstance(turn, dict) or turn.get("role") not in CHAT_ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: record {rid!r}: messages[{k}] must be {{'role': one of {CHAT_ROLES}, "
                             f"'content': a string}}, got {turn!r:.120}")
    roles = [t["role"] for t in msgs]
    if "assistant" not in roles:
        raise ValueError(f"{where}: record {rid!r} has no assistant turn: the loss is on the assistant turns, so "
                         "it would score nothing (remove the record, or give it as {'text': ...})")
    if roles[0] == "assistant":
        raise ValueError(f"{where}: record {rid!r}: messages[0] is an assistant turn; an assistant turn needs a "
                         "system or user turn before it")


# ----------------------------------------------------------------------------- reading
def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path)


def _first_char(path: str) -> str:
    """The first non-whitespace character of a text file ('' if none)."""
    with open(path, encoding="utf-8") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def _iter_json_array(path: str) -> Iterator[tuple[str, dict]]:
    """``(where, raw record)`` per element of a file holding one JSON array (loaded whole)."""
    with open(path, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(items, list):
        raise ValueError(f"{path}: a .json source must hold one JSON array of records (or JSON Lines), "
                         f"got a {type(items).__name__}")
    for k, rec in enumerate(items):
        yield f"{path}: item {k}", rec


def _iter_parquet(path: str, chunk_rows: int = 1024) -> Iterator[tuple[str, dict]]:
    """``(where, raw record)`` per row of a Parquet file, read in batches (``None`` columns dropped)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and others for a file that is not Parquet
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
    row = 0
    for batch in pf.iter_batches(batch_size=chunk_rows):
        for rec in batch.to_pylist():
            yield f"{path}: row {row}", {k: v for k, v in rec.items() if v is not None}
            row += 1


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _glob_files(path: str) -> list[str]:
    """The files a glob pattern names, sorted (``**`` recursive); FileNotFoundError if none."""
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"no file matches {path!r}")
    return files


def _iter_source(path: str) -> Iterator[tuple[str, dict]]:
    """``(where, raw record)`` of every record of ``path``, by its kind (module docstring)."""
    if _is_glob(path):
        return itertools.chain.from_iterable(_iter_source(f) for f in _glob_files(path))
    if _is_hf_dir(path):
        return _iter_hf(path)
    if path.endswith((".csv", ".tsv")):
        raise ValueError(f"{path}: CSV/TSV sources are not read; give the records as JSONL, a JSON array, Parquet "
                         "or a datasets directory (e.g. datasets.Dataset.from_csv(path).to_json(out.jsonl))")
    if path.endswith(".parquet"):
        return _iter_parquet(path)
    if path.endswith(".json") and _first_char(path) == "[":
        return _iter_json_array(path)
    return _iter_jsonl(path)


def _iter_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """``(where, raw record)`` for each non-blank line, streaming."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
            yield where, rec


def _load_hf(path: str):
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise ValueError(f"{path} is a directory; reading it needs the 'datasets' package") from e
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        found = sorted(os.path.relpath(f, path) for ext in ("parquet", "jsonl", "json")
                       for f in glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True))
        hint = (f"; it holds data files ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): name the "
                f"split's files with a glob, e.g. {os.path.join(path, '**', 'train-*.parquet')!r}") if found else ""
        raise ValueError(f"{path}: not a Hugging Face datasets directory (save_to_disk){hint}") from e
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{path} holds a DatasetDict with splits {sorted(ds)}; pass one split's "
                         f"directory, e.g. {os.path.join(path, sorted(ds)[0])}")
    return ds


def _iter_hf(path: str, chunk_rows: int = 1024) -> Iterator[tuple[str, dict]]:
    """``(where, raw record)`` per row of a ``save_to_disk`` directory, read in chunks of
    ``chunk_rows`` (the arrow files are memory-mapped, not loaded)."""
    ds = _load_hf(path)
    row = 0
    for batch in ds.iter(batch_size=chunk_rows):
        columns = list(batch)
        n = len(batch[columns[0]]) if columns else 0
        for i in range(n):
            rec = {c: batch[c][i] for c in columns if batch[c][i] is not None}
            yield f"{path}: row {row}", rec
            row += 1


def iter_records(path: str | os.PathLike, *, limit: int | None = None) -> Iterator[dict]:
    """Validated records of ``path`` one at a time (streaming; see the module docstring).

    Duplicate ids raise ValueError naming the id and both places. ``limit``: stop after
    this many records. ValueError if ``path`` holds no record.
    """
    path = os.fspath(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    if not _is_glob(path) and not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    raw = _iter_source(path)
    seen: dict[str, str] = {}
    count = 0
    for where, rec in raw:
        if limit is not None and count >= limit:
            return
        rec = validate_record(rec, count, where)
        first = seen.get(rec["id"])
        if first is not None:
            raise ValueError(f"duplicate id {rec['id']!r}: {first} and {where}")
        seen[rec["id"]] = where
        count += 1
        yield rec
    if count == 0 and limit != 0:
        raise ValueError(f"{path}: no records (empty file or dataset)")


def iter_record_chunks(path: str | os.PathLike, chunk_size: int) -> Iterator[tuple[int, list[dict]]]:
    """``(start, records)`` chunks of at most ``chunk_size`` validated records, in file order,
    ``start`` being the index of ``records[0]``. Streams: at most one chunk (plus the set of
    ids seen, for the duplicate check) is held in memory."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    start, chunk = 0, []
    for rec in iter_records(path):
        chunk.append(rec)
        if len(chunk) == chunk_size:
            yield start, chunk
            start, chunk = start + len(chunk), []
    if chunk:
        yield start, chunk


def read_records(path: str | os.PathLike, *, limit: int | None = None) -> list[dict]:
    """All validated records of a JSONL file or ``datasets`` directory (the first ``limit``
    if given). See the module docstring for the format and errors."""
    return list(iter_records(path, limit=limit))


# ----------------------------------------------------------------------------- encoding
def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template (``transformers`` tokenizers)."""
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def _use_template(tokenizer, chat_template) -> str | None | bool:
    """``False`` (no template), ``None`` (the tokenizer's own) or a template string."""
    if chat_template is False or chat_template is None:
        return False
    if chat_template == "auto":
        return None if has_chat_template(tokenizer) else False
    if chat_template is True:
        if not has_chat_template(tokenizer):
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        return None
    if isinstance(chat_template, str):
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError("a chat_template string needs a tokenizer with apply_chat_template")
        return chat_template
    raise ValueError(f"chat_template must be 'auto', True, False/None or a Jinja template string, "
                     f"got {chat_template!r}")


def _render(tokenizer, messages, template, add_generation_prompt: bool, rid: str = "?") -> str:
    """The chat template's rendering of ``messages``; ValueError naming the record ``rid`` when
    the template refuses them (e.g. a template without system turns raising on one)."""
    kwargs = {} if template is None else {"chat_template": template}
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            **kwargs)
    except Exception as e:  # jinja2's TemplateError (raise_exception in the template), or another template error
        roles = [m.get("role") for m in messages]
        raise ValueError(f"record {rid}: the chat template cannot render the turns {roles} "
                         f"(add_generation_prompt={add_generation_prompt}): {type(e).__name__}: {e}") from e
    if not isinstance(out, str):  # pragma: no cover - transformers returns str with tokenize=False
        raise ValueError(f"apply_chat_template returned {type(out).__name__}, expected a string")
    return out


def _turns_scored(messages: Sequence[Mapping], assistant_turns: str) -> list[int]:
    """Indices of the assistant turns that carry the loss (``"all"`` or the ``"last"``)."""
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(f"unknown assistant_turns {assistant_turns!r}; choose one of {ASSISTANT_TURNS}")
    turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
    return turns[-1:] if assistant_turns == "last" else turns


def _locate_turn(full: str, piece: str, content: str, cursor: int, rid: str, k: int) -> tuple[int, int]:
    """Where assistant turn ``k`` lies in the rendering ``full`` (from ``cursor`` on), for a
    template that renders a turn differently once later turns follow it: ``piece`` (the turn
    as rendered last) if ``full`` holds it, else its ``content`` plus the end-of-turn text
    that ``piece`` puts after it (when ``full`` has it there too)."""
    pos = full.find(piece, cursor) if piece else -1
    if pos >= 0:
        return pos, pos + len(piece)
    content = content.strip()  # templates commonly trim the content
    pos = full.find(content, cursor) if content else -1
    if pos < 0:
        raise ValueError(f"record {rid}: messages[{k}] (assistant) is not found in the chat template's rendering "
                         f"after position {cursor}, so its tokens cannot be located for the loss")
    hi = pos + len(content)
    tail = piece[piece.rfind(content) + len(content):] if content in piece else ""
    return pos, hi + len(tail) if tail and full.startswith(tail, hi) else hi


def _template_segments(tokenizer, messages: list[dict], template, scored: list[int],
                       rid: str) -> list[tuple[str, bool]]:
    """The chat template's rendering of ``messages`` cut into ``(text, scored)`` pieces.

    Assistant turn ``k`` in ``scored`` is the text between the rendering of ``messages[:k]``
    with ``add_generation_prompt=True`` and that of ``messages[:k + 1]`` (its content and
    end-of-turn marker); everything before it (system, user turns, the generation prompt) is
    its prompt. ValueError naming the record if the first is not a prefix of the second."""
    full = _render(tokenizer, messages, template, False, rid)
    pieces, cursor = [], 0
    for k in scored:
        head = _render(tokenizer, messages[:k], template, True, rid)
        end = full if k + 1 == len(messages) else _render(tokenizer, messages[:k + 1], template, False, rid)
        if not end.startswith(head):
            raise ValueError(f"record {rid}: the chat template's rendering of the prompt with "
                             f"add_generation_prompt=True is not a prefix of the rendering with the response, so "
                             f"the response boundary is ambiguous (prompt part {head!r:.300}, full {end!r:.300})")
        if full.startswith(end) and len(head) >= cursor:
            lo, hi = len(head), len(end)
        else:
            lo, hi = _locate_turn(full, end[len(head):], messages[k]["content"], cursor, rid, k)
        pieces += [(full[cursor:lo], False), (full[lo:hi], True)]
        cursor = hi
    return pieces + [(full[cursor:], False)]


PLAIN_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


def _plain_chat_pieces(tokenizer, messages: list[dict], scored: list[int], add_eos: bool) -> list[tuple[Any, bool]]:
    """The plain rendering of ``messages`` (no chat template) as ``(text or ids, scored)``
    pieces: turns separated by a blank line, each ``"<Role>: " + content``, every assistant
    content followed by the eos token; the loss is on the scored turns' content and eos."""
    eos = [int(tokenizer.eos_token_id)] if add_eos else []
    pieces: list[tuple[Any, bool]] = []
    for k, turn in enumerate(messages):
        header = ("\n\n" if k else "") + PLAIN_HEADERS[turn["role"]]
        if turn["role"] != "assistant":
            pieces.append((header + turn["content"], False))
            continue
        ids = list(tokenizer.encode(turn["content"], add_special_tokens=False)) + eos
        pieces += [(header, False), (ids, k in scored)]
    return pieces


def _join_pieces(tokenizer, pieces: Sequence[tuple[Any, bool]]) -> tuple[list[int], np.ndarray]:
    """Token ids and scored flags of ``(text or ids, scored)`` pieces, each text tokenized on
    its own without added special tokens (so every boundary is exact)."""
    ids: list[int] = []
    flags: list[bool] = []
    for piece, scored in pieces:
        if isinstance(piece, str):
            piece = list(tokenizer.encode(piece, add_special_tokens=False)) if piece else []
        ids += [int(t) for t in piece]
        flags += [scored] * len(piece)
    return ids, np.asarray(flags, dtype=bool)


def _tokenize_renderings(tokenizer, renderings: Sequence[Sequence[tuple[str, bool]]]) -> list[tuple[list[int], np.ndarray]]:
    """Token ids and scored flags of renderings, each given as ``(text, scored)`` pieces: with
    a fast tokenizer, the tokenization of each whole rendering (as a chat model sees it; one
    batched call, which the tokenizer spreads over the cores), a token scored when its first
    character lies in a scored piece; otherwise :func:`_join_pieces` per rendering."""
    if not renderings:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [_join_pieces(tokenizer, pieces) for pieces in renderings]
    enc = tokenizer(["".join(p for p, _ in pieces) for pieces in renderings], add_special_tokens=False,
                    return_offsets_mapping=True)
    out = []
    for pieces, ids, offsets in zip(renderings, enc["input_ids"], enc["offset_mapping"]):
        bounds = np.cumsum([len(p) for p, _ in pieces])
        starts = np.asarray([st for st, _ in offsets], dtype=np.int64)
        scored = np.asarray([f for _, f in pieces], dtype=bool)
        out.append(([int(t) for t in ids], scored[np.searchsorted(bounds, starts, side="right")]))
    return out


def _checked(ids: list[int], flags: np.ndarray, keep_head: int, rid: str) -> tuple[list[int], np.ndarray, int]:
    """``(ids, flags, keep_head)``; ValueError naming the record if nothing, or the first token, is scored."""
    if not flags.any():
        raise ValueError(f"record {rid}: zero loss tokens (the assistant part renders to nothing)")
    if flags[0]:
        raise ValueError(f"record {rid}: the chat template renders the prompt to zero tokens, so the first "
                         "response token cannot be scored")
    return ids, flags, keep_head


def _tokenize_or_render(tokenizer, record: Mapping, template, add_bos: bool, add_eos: bool, assistant_turns: str):
    """One record's ``(ids, flags, keep_head)``, or, on the chat-template path, its rendering
    as ``(text, scored)`` pieces (tokenized in batches by :func:`_tokenize_renderings`)."""
    rid = str(record.get("id", "?"))
    if "messages" in record:
        messages = [dict(m) for m in record["messages"]]
    elif template is False or "text" in record and "prompt" not in record:
        ids, start = encode_record(tokenizer, record, add_bos=add_bos, add_eos=add_eos)
        if start >= len(ids):
            raise ValueError(f"record {rid}: zero loss tokens")
        return ids, np.arange(len(ids)) >= start, 1 if add_bos else 0
    else:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"record {rid}: missing or non-string {key!r}")
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
    scored = _turns_scored(messages, assistant_turns)
    if template is not False:
        return _template_segments(tokenizer, messages, template, scored, rid)
    head = [_special_id(tokenizer, "bos_token_id", "add_bos=True")] if add_bos else []
    ids, flags = _join_pieces(tokenizer, [(head, False)] + _plain_chat_pieces(tokenizer, messages, scored, add_eos))
    return _checked(ids, flags, len(head), rid)


def tokenize_records(tokenizer, records: Sequence[Mapping], *, chat_template="auto", add_bos: bool | None = None,
                     add_eos: bool = True, assistant_turns: str = "all",
                     locate: Callable[[int], str] | None = None) -> list[tuple[list[int], np.ndarray, int]]:
    """Token ids of each record, which of them are scored, and how many leading tokens
    left-truncation must keep.

    Returns one ``(ids, scored, keep_head)`` per record: ``scored`` bool ``(len(ids),)``, True
    where the token is a loss target. Without a chat template, prompt/response and text
    records are :func:`ntk_jax.data.encoding.encode_record` (``add_bos`` default: whether the
    tokenizer has a bos token; ``keep_head`` = 1 with a bos) and ``messages`` records the plain
    rendering (module docstring). With one: the template's rendering of the conversation
    (``[user: prompt, assistant: response]`` for a prompt/response record), the scored
    assistant turns (``assistant_turns``: ``"all"`` or ``"last"``) cut out by rendering
    prefixes; the whole rendering tokenized without added special tokens (a fast tokenizer's
    offsets place each token in its turn, all records in one batched call; a slow one
    tokenizes turn by turn); ``keep_head = 0``. ValueError naming the record id (prefixed with
    ``locate(i)``, e.g. ``pool.jsonl: line 7``, if given) if the template refuses the turns, a
    prefix rendering is not a prefix, or nothing would be scored.
    """
    template = _use_template(tokenizer, chat_template)
    if add_bos is None:
        add_bos = getattr(tokenizer, "bos_token_id", None) is not None
    out: list = [None] * len(records)
    pending: list[int] = []

    def located(i: int, e: ValueError) -> ValueError:
        return ValueError(f"{locate(i)}: {e}") if locate is not None else e

    for i, r in enumerate(records):
        try:
            out[i] = _tokenize_or_render(tokenizer, r, template, add_bos, add_eos, assistant_turns)
        except ValueError as e:
            raise located(i, e) from e
        if isinstance(out[i], list):
            pending.append(i)
    for i, (ids, flags) in zip(pending, _tokenize_renderings(tokenizer, [out[i] for i in pending])):
        try:
            out[i] = _checked(ids, flags, 0, str(records[i].get("id", "?")))
        except ValueError as e:
            raise located(i, e) from e
    return out


def tokenize_record(tokenizer, record: Mapping, **encode_kw) -> tuple[list[int], np.ndarray, int]:
    """:func:`tokenize_records` of one record (``encode_kw``: its options)."""
    return tokenize_records(tokenizer, [record], **encode_kw)[0]


def encode_records(tokenizer, records: Sequence[Mapping], max_len: int, *, chat_template="auto",
                   add_bos: bool | None = None, add_eos: bool = True,
                   truncation: str = "error", assistant_turns: str = "all") -> dict[str, np.ndarray]:
    """Encode ``n`` records into ``(n, max_len)`` arrays ``input_ids``, ``targets``,
    ``loss_mask``, ``attention_mask`` (as :func:`ntk_jax.data.encoding.encode_examples`).

    Prompt/response records: loss on the response (+ eos; with a chat template: on the
    assistant part of the rendering). Text records: loss on every token. Messages records:
    loss on the assistant turns (``assistant_turns``: ``"all"`` or ``"last"``).
    ``chat_template``: ``"auto"`` (the tokenizer's, if it has one), ``True`` (required),
    ``False``/``None`` (never), or a Jinja template string. ``add_bos`` default: whether the
    tokenizer has a bos token (ignored with a chat template). ``truncation``: see
    :mod:`ntk_jax.data.encoding`. ValueError naming the record id for a record with zero
    loss tokens (also after truncation) or one that does not fit.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation {truncation!r}; choose one of {TRUNCATION_POLICIES}")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id (needed for padding)")
    tokenized = tokenize_records(tokenizer, records, chat_template=chat_template, add_bos=add_bos, add_eos=add_eos,
                                 assistant_turns=assistant_turns)
    return pack_sequences([(ids, flags) for ids, flags, _ in tokenized], max_len, int(pad),
                          record_ids=[str(r.get("id", f"#{i}")) for i, r in enumerate(records)],
                          truncation=truncation, keep_head=[k for _, _, k in tokenized])


def shuffle_responses(records: Sequence[Mapping], seed: int) -> list[dict]:
    """A control set: the records with their responses permuted among them, so that no record
    keeps its own (a seeded cyclic derangement). A prompt/response record's ``"response"`` or a
    messages record's last assistant turn is what moves; formats may be mixed. The set keeps
    the responses' form (their tokens, lengths, template) and breaks the mapping from a prompt
    to its answer — what a model learns from it is the form alone.

    Args:
      records: ``n >= 2`` prompt/response or messages records.
      seed: the permutation's seed.
    Returns ``n`` new dicts (ids kept; every other field but the moved response as it was).
    ValueError for fewer than 2 records or a text record (it has no response to move).
    """
    if len(records) < 2:
        raise ValueError(f"shuffle_responses needs at least 2 records to permute their responses, got {len(records)}")

    def response(r: Mapping) -> str:
        if "response" in r:
            return r["response"]
        if "messages" in r:
            return [t for t in r["messages"] if t["role"] == "assistant"][-1]["content"]
        raise ValueError(f"record {r.get('id', '?')!r} is a text record: it has no response to permute "
                         "(shuffle_responses needs prompt/response or messages records)")

    answers = [response(r) for r in records]
    order = np.random.default_rng([int(seed), 7919]).permutation(len(records))
    out = [dict(r) for r in records]
    for pos, i in enumerate(order):  # record order[pos] takes the answer of order[pos + 1]
        moved = answers[int(order[(pos + 1) % len(order)])]
        r = out[int(i)]
        if "response" in r:
            r["response"] = moved
        else:
            msgs = [dict(t) for t in r["messages"]]
            last = max(k for k, t in enumerate(msgs) if t["role"] == "assistant")
            msgs[last]["content"] = moved
            r["messages"] = msgs
    return out


def length_profile(tokenizer, records: Iterable[Mapping], *, locate: Callable[[int], str] | None = None,
                   block: int = 256, **encode_kw) -> np.ndarray:
    """What a length policy needs of each record, as :func:`encode_records` would encode it
    (``encode_kw``: its ``chat_template``, ``add_bos``, ``add_eos``, ``assistant_turns``):
    int64 ``(n, 4)`` columns :data:`PROFILE_COLUMNS` (the untruncated length, the first
    scored position, where the last scored span starts, the tokens left truncation keeps).
    Streams ``block`` records at a time: only these four numbers per record are kept.
    ``locate(i)`` (:func:`record_locator`) prefixes a record's encoding error with where it is."""
    rows, it, lo = [], iter(records), 0
    while chunk := list(itertools.islice(it, block)):
        where = None if locate is None else (lambda i, lo=lo: locate(lo + i))
        for ids, flags, keep_head in tokenize_records(tokenizer, chunk, locate=where, **encode_kw):
            rows.append((len(ids), *scored_spans(flags), keep_head))
        lo += len(chunk)
    return np.asarray(rows, dtype=np.int64).reshape(-1, len(PROFILE_COLUMNS))


PROFILE_COLUMNS = ("length", "first_scored", "last_span_start", "keep_head")


def encoded_lengths(tokenizer, records: Sequence[Mapping], **encode_kw) -> np.ndarray:
    """Encoded (untruncated) length of each record, int64 ``(n,)``, as :func:`encode_records`
    would build it (``encode_kw``: its encoding options)."""
    return length_profile(tokenizer, records, **encode_kw)[:, 0]


# ----------------------------------------------------------------------------- length policy
LENGTH_POLICIES = TRUNCATION_POLICIES + ("drop",)


def record_locator(path: str | os.PathLike | None, what: str = "pool") -> Callable[[int], str]:
    """``locate(i)``: where the ``i``-th record of ``path`` (as :func:`read_records` orders
    them) is, ``"file.jsonl: line N"`` or ``"dir: row i"`` (``f"{what} record i"`` without a
    path). The file is scanned only when ``locate`` is called (an error path)."""
    if not path:
        return lambda i: f"{what} record {i}"
    path = os.fspath(path)
    if not _is_glob(path) and (_is_hf_dir(path) or path.endswith(".parquet")):
        return lambda i: f"{path}: row {i}"

    def locate(i: int) -> str:
        for where, _ in itertools.islice(_iter_source(path), int(i), int(i) + 1):
            return where
        return f"{path}: record {i}"
    return locate


@dataclasses.dataclass(frozen=True)
class LengthCheck:
    """The outcome of a length policy over ``n`` records: ``kept`` int64 ``(m,)`` the indices
    of the records kept, in order; ``lengths`` int64 ``(m,)`` their encoded lengths after
    truncation (at most ``max_len``); ``summary`` the counts for reports (see
    :func:`check_lengths`)."""

    kept: np.ndarray
    lengths: np.ndarray
    summary: dict


def _policy_counts(profile: np.ndarray, max_len: int) -> dict:
    """``{policy: {"truncated", "dropped"}}``: what each policy would do to these records."""
    over = profile[:, 0] > max_len
    out = {}
    for policy in ("left", "right"):
        fits = fits_after_truncation(*profile.T, max_len, policy)
        out[policy] = {"truncated": int((over & fits).sum()), "dropped": int((~fits).sum())}
    out["drop"] = {"truncated": 0, "dropped": int(over.sum())}
    return out


def check_lengths(profile: np.ndarray, max_len: int, policy: str, *, ids: Sequence[str],
                  locate: Callable[[int], str] | None = None, what: str = "pool",
                  setting: str = "select") -> LengthCheck:
    """Apply the length policy ``policy`` (:data:`LENGTH_POLICIES`) to records whose
    :func:`length_profile` is ``profile`` ``(n, 4)``, before any of them is encoded.

    ``"error"``: ValueError if any record is longer than ``max_len``, naming the first one
    (``locate(i)``, e.g. ``pool.jsonl: line 7``, and its id), its length, how many records
    each other policy would truncate or drop, and the settings to change
    (``--config.<setting>.truncation`` / ``max_len``). ``"left"`` / ``"right"``: longer
    records are truncated at encoding; those the policy cannot fit
    (:func:`ntk_jax.data.encoding.fits_after_truncation`: the response alone is too long, or
    the prompt fills ``max_len``) are dropped. ``"drop"``: longer records are dropped.
    ``summary``: ``{"records", "max_len", "truncation", "longest", "n_over", "truncated",
    "dropped", "dropped_ids" (the first 20), "by_policy"}``. ValueError if nothing is kept.
    """
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"unknown truncation policy {policy!r}; set --config.{setting}.truncation to one of "
                         f"{LENGTH_POLICIES}")
    profile = np.asarray(profile, dtype=np.int64).reshape(-1, len(PROFILE_COLUMNS))
    n, lengths = len(profile), profile[:, 0]
    over = lengths > max_len
    by_policy = _policy_counts(profile, max_len)
    if policy == "error" and over.any():
        i = int(np.argmax(over))
        where = (locate or record_locator(None, what))(i)
        effects = "; ".join(f"{p}: {c['truncated']} truncated, {c['dropped']} dropped" for p, c in by_policy.items())
        raise ValueError(f"{where}: record {ids[i]!r} encodes to {int(lengths[i])} tokens, more than "
                         f"{setting}.max_len={max_len} ({int(over.sum())} of {n} {what} records are longer, the "
                         f"longest {int(lengths.max())} tokens). Set --config.{setting}.truncation=left|right|drop "
                         f"({effects}) or raise --config.{setting}.max_len")
    keep = ~over if policy in ("drop", "error") else fits_after_truncation(*profile.T, max_len, policy)
    kept = np.flatnonzero(keep).astype(np.int64)
    if not kept.size:
        raise ValueError(f"every one of the {n} {what} records is dropped by truncation={policy!r} at "
                         f"{setting}.max_len={max_len} (the longest has {int(lengths.max())} tokens): raise "
                         f"--config.{setting}.max_len or choose another --config.{setting}.truncation")
    summary = {"records": n, "max_len": int(max_len), "truncation": policy, "longest": int(lengths.max()),
               "n_over": int(over.sum()), "truncated": int((over & keep).sum()), "dropped": int((~keep).sum()),
               "dropped_ids": [str(ids[int(i)]) for i in np.flatnonzero(~keep)[:20]], "by_policy": by_policy}
    return LengthCheck(kept=kept, lengths=np.minimum(lengths[kept], max_len), summary=summary)


def fit_records(tokenizer, records: Sequence[Mapping], max_len: int, policy: str, *,
                path: str | os.PathLike | None = None, what: str = "pool", setting: str = "select",
                **encode_kw) -> tuple[list, LengthCheck]:
    """``(kept records, LengthCheck)``: :func:`check_lengths` over :func:`length_profile` of
    ``records`` (``encode_kw``: the encoding options), errors located in ``path`` (the file
    the records were read from, in order; none: by index)."""
    records = list(records)
    locate = record_locator(path, what)
    profile = length_profile(tokenizer, records, locate=locate, **encode_kw)
    check = check_lengths(profile, max_len, policy, ids=[str(r.get("id", i)) for i, r in enumerate(records)],
                          locate=locate, what=what, setting=setting)
    return [records[int(i)] for i in check.kept], check


def _round_up(x: int, multiple: int) -> int:
    return -(-int(x) // multiple) * multiple


def bucket_by_length(lengths: Sequence[int] | np.ndarray, batch_size: int, *, multiple: int = 8,
                     max_len: int | None = None) -> list[np.ndarray]:
    """Batches of indices of records of similar length, for padding-efficient scoring.

    Indices are sorted by ``(length, index)`` (stable, so deterministic) and cut into
    consecutive batches of ``batch_size`` (the last may be smaller). Returns a list of int64
    index arrays, shortest batches first; every index ``0..n-1`` appears exactly once, and a
    batch's padded width is ``width_of(lengths[batch])`` = its longest length rounded up to
    ``multiple`` (capped at ``max_len``; ValueError if a length exceeds ``max_len``). To map
    per-batch results back to pool order: ``out[batch] = result``.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or (lengths.size and lengths.dtype.kind not in "iu"):
        raise ValueError(f"lengths must be a 1-d array of integers, got shape {lengths.shape} dtype {lengths.dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    if lengths.size and lengths.min() < 1:
        raise ValueError(f"lengths must be positive, got min {lengths.min()}")
    if max_len is not None and lengths.size and lengths.max() > max_len:
        i = int(np.argmax(lengths))
        raise ValueError(f"index {i} has length {int(lengths[i])} > max_len={max_len} (truncate longer records: "
                         f"truncation='left' or 'right' of encode_buckets / map_length_buckets; in a selection job "
                         f"--config.select.truncation, checked before any model work)")
    order = np.lexsort((np.arange(lengths.size), lengths)).astype(np.int64)
    return [order[lo:lo + batch_size] for lo in range(0, lengths.size, batch_size)]


def bucket_width(lengths_in_bucket: Sequence[int] | np.ndarray, *, multiple: int = 8, max_len: int | None = None) -> int:
    """Padded width of one bucket: its longest length rounded up to ``multiple``, capped at
    ``max_len``."""
    width = _round_up(int(np.max(lengths_in_bucket)), multiple)
    return min(width, int(max_len)) if max_len is not None else width


def encode_buckets(tokenizer, records: Sequence[Mapping], batch_size: int, *, multiple: int = 8,
                   max_len: int | None = None, truncation: str = "error", lengths: np.ndarray | None = None,
                   **encode_kw) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yields ``(indices, arrays)`` per length bucket of ``records`` (:func:`bucket_by_length`):
    ``indices`` int64 ``(b,)`` positions in ``records``; ``arrays`` as :func:`encode_records`
    (``encode_kw``: its encoding options) for ``[records[i] for i in indices]`` with width
    :func:`bucket_width` of the bucket. Every record is encoded exactly once. ``truncation``
    ``"error"``: ValueError beyond ``max_len``; ``"left"`` / ``"right"``: longer records are
    truncated to ``max_len``. ``lengths``: the records' encoded lengths if already known
    (:func:`encoded_lengths`), saving a tokenization pass. Pad the last, smaller bucket with
    :func:`ntk_jax.data.encoding.pad_to_batches` if fixed batch shapes are needed."""
    if lengths is None:
        lengths = encoded_lengths(tokenizer, records, **encode_kw)
    lengths = np.asarray(lengths, dtype=np.int64)
    if truncation != "error" and max_len is not None:
        lengths = np.minimum(lengths, int(max_len))
    for idx in bucket_by_length(lengths, batch_size, multiple=multiple, max_len=max_len):
        width = max(bucket_width(lengths[idx], multiple=multiple, max_len=max_len), 2)
        yield idx, encode_records(tokenizer, [records[int(i)] for i in idx], width, truncation=truncation, **encode_kw)


def map_length_buckets(fn: Callable[[dict[str, np.ndarray]], Any], tokenizer, records: Sequence[Mapping],
                       batch_size: int, *, multiple: int, max_len: int, truncation: str = "error",
                       lengths: np.ndarray | None = None, **encode_kw) -> np.ndarray:
    """``fn`` applied to ``records`` in length buckets, results in record order.

    ``fn(arrays) -> (batch_size, ...)`` gets :func:`encode_records` arrays (``encode_kw``:
    its encoding options, ``truncation`` its policy) of exactly ``batch_size`` rows (a
    smaller last bucket is padded by repeating its first row; those results are dropped) and
    width :func:`bucket_width` (the bucket's longest record rounded up to ``multiple``, at
    least 2), so a compiled ``fn`` sees at most ``max_len / multiple`` shapes. ``multiple=0``
    turns bucketing off: one call per ``batch_size`` records, all padded to ``max_len``.
    ``lengths``: as :func:`encode_buckets`. Returns ``(n, ...)`` numpy; per-row results do not
    depend on the padding width up to float rounding (padding is masked).
    """
    records = list(records)
    if not records:
        raise ValueError("map_length_buckets: no records")
    if multiple:
        buckets = encode_buckets(tokenizer, records, batch_size, multiple=multiple, max_len=max_len,
                                 truncation=truncation, lengths=lengths, **encode_kw)
    else:
        buckets = ((np.arange(lo, min(lo + batch_size, len(records))),
                    encode_records(tokenizer, records[lo:lo + batch_size], max_len, truncation=truncation, **encode_kw))
                   for lo in range(0, len(records), batch_size))
    out = None
    for idx, arrays in buckets:
        b = len(idx)
        if b < batch_size:
            arrays = {k: np.concatenate([v, np.repeat(v[:1], batch_size - b, axis=0)]) for k, v in arrays.items()}
        res = np.asarray(fn(arrays))[:b]
        if out is None:
            out = np.empty((len(records),) + res.shape[1:], res.dtype)
        out[idx] = res
    return out


def encode_options(tokenizer, records: Sequence[Mapping], max_len: int, *, chat_template="auto",
                   add_bos: bool | None = None, add_eos: bool = True,
                   truncation: str = "error") -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One row per (record, option) for option-likelihood accuracy.

    Each record with ``options`` ``[o_1..o_k]`` contributes rows ``{prompt, response=o_j}``.
    Returns ``(arrays, record_index, correct)``: ``arrays`` as :func:`encode_records` with
    ``m = Σ k_i`` rows; ``record_index`` int64 ``(m,)`` the record each row belongs to;
    ``correct`` bool ``(m,)`` whether the option is the record's response. The predicted
    option of record i is the row with the highest summed log-likelihood of its scored
    tokens among ``record_index == i``. ValueError for a record without ``options``.
    """
    rows, owner, correct = [], [], []
    for i, r in enumerate(records):
        opts = r.get("options")
        if not isinstance(opts, list) or not opts:
            raise ValueError(f"record {r.get('id', f'#{i}')}: no 'options' to score")
        for o in opts:
            rows.append({"id": f"{r.get('id', f'#{i}')}/{o}", "prompt": r["prompt"], "response": o})
            owner.append(i)
            correct.append(o == r["response"])
    arrays = encode_records(tokenizer, rows, max_len, chat_template=chat_template, add_bos=add_bos, add_eos=add_eos,
                            truncation=truncation)
    return arrays, np.asarray(owner, dtype=np.int64), np.asarray(correct, dtype=bool)
