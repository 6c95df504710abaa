"""Records for data selection: reading (JSONL, Hugging Face ``datasets`` directories),
validating, streaming, encoding (with chat templates) and length bucketing.

A *record* is a plain ``dict`` as read (kept unchanged, so a selection can write the chosen
records back as they were), with

* ``"id"``: a string. A record without one gets ``f"{index}"``, its 0-based position among
  the records of the file (blank JSONL lines do not count); an integer id is converted to
  its decimal string. Ids must be unique within a file.
* either ``"prompt"`` and ``"response"`` (strings; the loss is on the response) or
  ``"text"`` (a string; the loss is on every token);
* optionally ``"label"``, ``"task"``, ``"family"``, ``"role"`` (one of :data:`ROLES`) and
  ``"options"`` (a non-empty list of distinct strings, the candidate responses of a
  classification / multiple-choice record; its ``response``, if any, must be one of them).

Sources (``path``): a ``.jsonl`` file (one JSON object per line, blank lines skipped) or a
local directory written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` directory
must be narrowed to one split, ``path/<split>``). In ``datasets`` rows, columns that are
``None`` (absent in that row) are dropped from the record.

Every error names where it happened: ``file.jsonl: line 7: ...`` (1-based line) or
``dir: row 7: ...`` (0-based row).

Encoding (:func:`encode_records`) gives the arrays of :mod:`ntk_jax.data.encoding`
(``input_ids``, ``targets``, ``loss_mask``, ``attention_mask``). With a chat template
(``chat_template="auto"`` and a tokenizer that has one), a prompt/response record is
rendered as the conversation ``[user: prompt, assistant: response]`` and only the
assistant part (everything after the rendering of ``[user: prompt]`` with
``add_generation_prompt=True``, which must be a prefix of the full rendering) is scored; no
bos/eos is added around the rendering (the template places its own special tokens). Text
records are never templated.

Bucketing (:func:`bucket_by_length`) groups records of similar length into batches so that
scoring a large pool pads little; :func:`encode_buckets` yields each bucket's pool indices
with its arrays, so results map back to pool order.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ntk_jax.data.encoding import TRUNCATION_POLICIES, encode_record, pack_sequences

__all__ = [
    "ROLES",
    "validate_record",
    "iter_records",
    "iter_record_chunks",
    "read_records",
    "has_chat_template",
    "tokenize_record",
    "encode_records",
    "encoded_lengths",
    "bucket_by_length",
    "encode_buckets",
    "map_length_buckets",
    "encode_options",
]

ROLES = ("useful", "unrelated", "conflicting", "domain")


# ----------------------------------------------------------------------------- validation
def validate_record(record, index: int, where: str) -> dict:
    """``record`` checked and with its ``id`` ensured (``f"{index}"`` if absent).

    ``where`` (e.g. ``"pool.jsonl: line 7"``) prefixes every error message. Returns the same
    dict (mutated only to add/normalise ``id``). ValueError on: not a dict, a non-string
    ``id``, neither ``prompt``+``response`` nor ``text``, a field of the wrong type, bad
    ``options``, or an unknown ``role``.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "id" not in record or record["id"] is None:
        record["id"] = f"{index}"
    elif isinstance(record["id"], (int, np.integer)) and not isinstance(record["id"], bool):
        record["id"] = str(int(record["id"]))
    elif not isinstance(record["id"], str) or not record["id"]:
        raise ValueError(f"{where}: 'id' must be a non-empty string, got {record['id']!r}")
    has_prompt, has_response = "prompt" in record, "response" in record
    if has_prompt or has_response:
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
        raise ValueError(f"{where}: record {record['id']!r} needs 'prompt' and 'response', or 'text' "
                         f"(fields: {sorted(record)})")
    if "options" in record:
        opts = record["options"]
        if (not isinstance(opts, list) or not opts or not all(isinstance(o, str) for o in opts)
                or len(set(opts)) != len(opts)):
            raise ValueError(f"{where}: record {record['id']!r}: 'options' must be a non-empty list of "
                             f"distinct strings, got {opts!r}")
        if "text" in record:
            raise ValueError(f"{where}: record {record['id']!r}: 'options' needs a prompt/response record")
        if record["response"] not in opts:
            raise ValueError(f"{where}: record {record['id']!r}: response {record['response']!r} is not "
                             f"one of its options {opts}")
    if "role" in record and record["role"] not in ROLES:
        raise ValueError(f"{where}: record {record['id']!r}: unknown role {record['role']!r}; roles: {ROLES}")
    return record


# ----------------------------------------------------------------------------- reading
def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path)


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
        raise ValueError(f"{path}: not a JSONL file nor a Hugging Face datasets directory "
                         f"(save_to_disk): {e}") from e
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
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    raw = _iter_hf(path) if _is_hf_dir(path) else _iter_jsonl(path)
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


def _render(tokenizer, messages, template, add_generation_prompt: bool) -> str:
    kwargs = {} if template is None else {"chat_template": template}
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                        **kwargs)
    if not isinstance(out, str):  # pragma: no cover - transformers returns str with tokenize=False
        raise ValueError(f"apply_chat_template returned {type(out).__name__}, expected a string")
    return out


def tokenize_record(tokenizer, record: Mapping, *, chat_template="auto", add_bos: bool | None = None,
                    add_eos: bool = True) -> tuple[list[int], int, int]:
    """Token ids of one record, where its scored part starts, and how many leading tokens
    left-truncation must keep.

    Returns ``(ids, start, keep_head)``: ``ids[start:]`` are the scored tokens. Without a
    chat template this is :func:`ntk_jax.data.encoding.encode_record` (``add_bos`` default:
    whether the tokenizer has a bos token; ``keep_head`` = 1 with a bos). With one (see the
    module docstring): the rendering of ``[user, assistant]``, split at the end of the
    rendering of ``[user]`` + generation prompt, each part tokenized without added special
    tokens; ``keep_head = 0``. ValueError (naming the record id) if the prompt rendering is
    not a prefix of the full one, or nothing would be scored.
    """
    rid = str(record.get("id", "?"))
    template = _use_template(tokenizer, chat_template)
    if add_bos is None:
        add_bos = getattr(tokenizer, "bos_token_id", None) is not None
    if template is False or "text" in record and "prompt" not in record:
        ids, start = encode_record(tokenizer, record, add_bos=add_bos, add_eos=add_eos)
        if start >= len(ids):
            raise ValueError(f"record {rid}: zero loss tokens")
        return ids, start, 1 if add_bos else 0
    for key in ("prompt", "response"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"record {rid}: missing or non-string {key!r}")
    user = [{"role": "user", "content": record["prompt"]}]
    full = _render(tokenizer, user + [{"role": "assistant", "content": record["response"]}], template, False)
    head = _render(tokenizer, user, template, True)
    if not full.startswith(head):
        raise ValueError(f"record {rid}: the chat template's rendering of the prompt with "
                         f"add_generation_prompt=True is not a prefix of the rendering with the response, so "
                         f"the response boundary is ambiguous (prompt part {head!r}, full {full!r})")
    prompt_ids = list(tokenizer.encode(head, add_special_tokens=False))
    response_ids = list(tokenizer.encode(full[len(head):], add_special_tokens=False))
    if not response_ids:
        raise ValueError(f"record {rid}: zero loss tokens (the assistant part renders to nothing)")
    if not prompt_ids:
        raise ValueError(f"record {rid}: the chat template renders the prompt to zero tokens, so the first "
                         "response token cannot be scored")
    return prompt_ids + response_ids, len(prompt_ids), 0


def encode_records(tokenizer, records: Sequence[Mapping], max_len: int, *, chat_template="auto",
                   add_bos: bool | None = None, add_eos: bool = True,
                   truncation: str = "error") -> dict[str, np.ndarray]:
    """Encode ``n`` records into ``(n, max_len)`` arrays ``input_ids``, ``targets``,
    ``loss_mask``, ``attention_mask`` (as :func:`ntk_jax.data.encoding.encode_examples`).

    Prompt/response records: loss on the response (+ eos; with a chat template: on the
    assistant part of the rendering). Text records: loss on every token. ``chat_template``:
    ``"auto"`` (the tokenizer's, if it has one), ``True`` (required), ``False``/``None``
    (never), or a Jinja template string. ``add_bos`` default: whether the tokenizer has a
    bos token (ignored with a chat template). ``truncation``: see
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
    tokenized = [tokenize_record(tokenizer, r, chat_template=chat_template, add_bos=add_bos, add_eos=add_eos)
                 for r in records]
    return pack_sequences([(ids, start) for ids, start, _ in tokenized], max_len, int(pad),
                          record_ids=[str(r.get("id", f"#{i}")) for i, r in enumerate(records)],
                          truncation=truncation, keep_head=[k for _, _, k in tokenized])


def encoded_lengths(tokenizer, records: Sequence[Mapping], *, chat_template="auto", add_bos: bool | None = None,
                    add_eos: bool = True) -> np.ndarray:
    """Encoded (untruncated) length of each record, int64 ``(n,)``, as :func:`encode_records`
    would build it."""
    return np.array([len(tokenize_record(tokenizer, r, chat_template=chat_template, add_bos=add_bos,
                                         add_eos=add_eos)[0]) for r in records], dtype=np.int64)


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
        raise ValueError(f"index {i} has length {int(lengths[i])} > max_len={max_len}")
    order = np.lexsort((np.arange(lengths.size), lengths)).astype(np.int64)
    return [order[lo:lo + batch_size] for lo in range(0, lengths.size, batch_size)]


def bucket_width(lengths_in_bucket: Sequence[int] | np.ndarray, *, multiple: int = 8, max_len: int | None = None) -> int:
    """Padded width of one bucket: its longest length rounded up to ``multiple``, capped at
    ``max_len``."""
    width = _round_up(int(np.max(lengths_in_bucket)), multiple)
    return min(width, int(max_len)) if max_len is not None else width


def encode_buckets(tokenizer, records: Sequence[Mapping], batch_size: int, *, multiple: int = 8,
                   max_len: int | None = None, chat_template="auto", add_bos: bool | None = None,
                   add_eos: bool = True) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yields ``(indices, arrays)`` per length bucket of ``records`` (:func:`bucket_by_length`):
    ``indices`` int64 ``(b,)`` positions in ``records``; ``arrays`` as :func:`encode_records`
    for ``[records[i] for i in indices]`` with width :func:`bucket_width` of the bucket.
    Every record is encoded exactly once (no truncation: ValueError beyond ``max_len``).
    Pad the last, smaller bucket with :func:`ntk_jax.data.encoding.pad_to_batches` if fixed
    batch shapes are needed."""
    lengths = encoded_lengths(tokenizer, records, chat_template=chat_template, add_bos=add_bos, add_eos=add_eos)
    for idx in bucket_by_length(lengths, batch_size, multiple=multiple, max_len=max_len):
        width = max(bucket_width(lengths[idx], multiple=multiple, max_len=max_len), 2)
        yield idx, encode_records(tokenizer, [records[int(i)] for i in idx], width, chat_template=chat_template,
                                  add_bos=add_bos, add_eos=add_eos)


def map_length_buckets(fn: Callable[[dict[str, np.ndarray]], Any], tokenizer, records: Sequence[Mapping],
                       batch_size: int, *, multiple: int, max_len: int, chat_template="auto",
                       add_bos: bool | None = None, add_eos: bool = True) -> np.ndarray:
    """``fn`` applied to ``records`` in length buckets, results in record order.

    ``fn(arrays) -> (batch_size, ...)`` gets :func:`encode_records` arrays of exactly
    ``batch_size`` rows (a smaller last bucket is padded by repeating its first row; those
    results are dropped) and width :func:`bucket_width` (the bucket's longest record rounded up
    to ``multiple``, at least 2), so a compiled ``fn`` sees at most ``max_len / multiple``
    shapes. ``multiple=0`` turns bucketing off: one call per ``batch_size`` records, all padded
    to ``max_len``. Returns ``(n, ...)`` numpy; per-row results do not depend on the padding
    width up to float rounding (padding is masked).
    """
    records = list(records)
    if not records:
        raise ValueError("map_length_buckets: no records")
    if multiple:
        buckets = encode_buckets(tokenizer, records, batch_size, multiple=multiple, max_len=max_len,
                                 chat_template=chat_template, add_bos=add_bos, add_eos=add_eos)
    else:
        buckets = ((np.arange(lo, min(lo + batch_size, len(records))),
                    encode_records(tokenizer, records[lo:lo + batch_size], max_len, chat_template=chat_template,
                                   add_bos=add_bos, add_eos=add_eos))
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
                   add_bos: bool | None = None, add_eos: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
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
    arrays = encode_records(tokenizer, rows, max_len, chat_template=chat_template, add_bos=add_bos, add_eos=add_eos)
    return arrays, np.asarray(owner, dtype=np.int64), np.asarray(correct, dtype=bool)
