"""Encoding prompt/response records into fixed-length arrays with a response loss mask.

For a record with prompt ids ``p`` (length P) and response ids ``r`` (length R), the
sequence is ``[bos] + p + r + [eos]`` (length ``L = 1 + P + R + 1`` with both
specials), right-padded to ``max_len``:

=================  =======  ================  ============================================
key                dtype    shape             content
=================  =======  ================  ============================================
``input_ids``      int32    ``(n, max_len)``  the sequence, then ``pad_token_id``
``targets``        int32    ``(n, max_len)``  ``input_ids`` shifted left by one
                                              (``targets[:, t] = input_ids[:, t + 1]``),
                                              ``pad_token_id`` in the last column
``loss_mask``      float32  ``(n, max_len)``  1.0 where ``targets[:, t]`` is a response
                                              token or the final eos, else 0.0
``attention_mask`` int32    ``(n, max_len)``  1 on the L real tokens, 0 on padding
=================  =======  ================  ============================================

So ``loss_mask`` has ``R + 1`` ones per row (``R`` without eos), at positions
``1 + P - 1 .. L - 2``: the positions whose next-token prediction is scored.

Prompt and response are tokenized separately (``add_special_tokens=False``) and
concatenated, so the prompt/response boundary is exact for any tokenizer (for a
subword tokenizer this can differ from tokenizing the joined string).

A *text* record ``{"text": t}`` (no ``prompt``/``response``) is encoded as
``[bos] + t + [eos]`` with every token after the bos scored (as a record with an empty
prompt and response ``t``).

Truncation (``truncation=`` of :func:`encode_examples` / :func:`pack_sequences`), for a
sequence of length ``L > max_len``:

* ``"error"`` (default): ValueError naming the record id and its length.
* ``"left"``: drop prompt tokens from the left (after the bos, if any) until it fits;
  ValueError if the bos + response (+ eos) alone exceed ``max_len``.
* ``"right"``: keep the first ``max_len`` tokens (the response tail and the eos are
  lost); ValueError if no scored token is left.

:func:`pack_sequences` builds the arrays from already-tokenized sequences (used by
:mod:`ntk_jax.data.records` for chat-template encodings).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

__all__ = ["encode_record", "encode_examples", "pack_sequences", "truncate_sequence", "max_length",
           "iterate_batches", "pad_to_batches", "TRUNCATION_POLICIES", "LM_INPUTS", "LM_TRAIN_INPUTS",
           "lm_batch"]

TRUNCATION_POLICIES = ("error", "left", "right")

# The arrays of an encoded batch that the LM output functions read (each (B, T)), and with the
# next-token ``targets`` the LM loss needs too.
LM_INPUTS = ("input_ids", "attention_mask", "loss_mask")
LM_TRAIN_INPUTS = LM_INPUTS + ("targets",)


def lm_batch(arrays: Mapping, keys: Sequence[str] = LM_TRAIN_INPUTS, *,
             asarray: Callable | None = None) -> dict:
    """The model inputs ``{k: arrays[k]}`` of an encoded batch for ``keys`` (default
    :data:`LM_TRAIN_INPUTS`), each passed through ``asarray`` if given (e.g. ``jnp.asarray``);
    ``KeyError`` naming the missing keys."""
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise KeyError(f"batch lacks {missing} (keys: {sorted(arrays)})")
    return {k: arrays[k] if asarray is None else asarray(arrays[k]) for k in keys}


def _record_id(record: Mapping, index: int) -> str:
    """The record's ``id`` if it has one, else ``#index``."""
    return str(record.get("id", f"#{index}"))


def _special_id(tokenizer, attr: str, needed_for: str) -> int:
    """``tokenizer.<attr>`` as an int; ValueError if the tokenizer has none."""
    value = getattr(tokenizer, attr, None)
    if value is None:
        raise ValueError(f"tokenizer has no {attr} (needed for {needed_for})")
    return int(value)


def encode_record(tokenizer, record: Mapping, *, add_bos: bool = True, add_eos: bool = True,
                  index: int = 0) -> tuple[list[int], int]:
    """Ids of one record and where its response starts.

    Returns ``(ids, response_start)`` with ``ids = [bos] + prompt + response + [eos]``
    (bos/eos per the flags) and ``ids[response_start:]`` the response (+ eos). A text
    record (``"text"``, no ``prompt``/``response``) is ``[bos] + text + [eos]`` with
    ``response_start`` right after the bos.
    ValueError if ``record`` lacks a string ``prompt``/``response`` (or ``text``), or if no
    position would be scored (empty response and ``add_eos=False``).
    """
    rid = _record_id(record, index)
    if "prompt" not in record and "response" not in record and "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError(f"record {rid}: non-string 'text'")
        prompt, response = [], list(tokenizer.encode(record["text"], add_special_tokens=False))
        if not response and not add_eos:
            raise ValueError(f"record {rid}: text encodes to zero tokens and add_eos=False (zero loss tokens)")
    else:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"record {rid}: missing or non-string {key!r}")
        prompt = list(tokenizer.encode(record["prompt"], add_special_tokens=False))
        response = list(tokenizer.encode(record["response"], add_special_tokens=False))
    if not response and not add_eos:
        raise ValueError(f"record {rid}: response encodes to zero tokens and add_eos=False (zero loss tokens)")
    head = [_special_id(tokenizer, "bos_token_id", "add_bos=True")] if add_bos else []
    tail = [_special_id(tokenizer, "eos_token_id", "add_eos=True")] if add_eos else []
    ids = head + prompt + response + tail
    start = len(head) + len(prompt)
    if start == 0:
        # The first token is never a target: a sequence with no bos and no prompt
        # cannot score its first response token.
        if "prompt" not in record:
            start = 1  # a text record without bos: every token but the first is scored
            if len(ids) < 2:
                raise ValueError(f"record {rid}: text without bos needs at least two tokens (zero loss tokens)")
        else:
            raise ValueError(f"record {rid}: empty prompt with add_bos=False leaves the first response token unscored")
    return ids, start


def max_length(tokenizer, records: Sequence[Mapping], *, add_bos: bool = True, add_eos: bool = True) -> int:
    """The longest encoded sequence (``[bos] + prompt + response + [eos]``) over ``records``; 0 if empty."""
    return max((len(encode_record(tokenizer, r, add_bos=add_bos, add_eos=add_eos, index=i)[0])
                for i, r in enumerate(records)), default=0)


def truncate_sequence(ids: Sequence[int], start: int, max_len: int, *, truncation: str = "error",
                      keep_head: int = 0, record_id: str = "?") -> tuple[list[int], int]:
    """Fit one sequence ``ids`` (scored from ``start`` on) into ``max_len`` tokens.

    ``keep_head``: leading tokens that ``"left"`` truncation never drops (the bos).
    Returns ``(ids, start)`` unchanged when it fits, else per ``truncation`` (see the
    module docstring). ValueError naming ``record_id`` when it cannot fit or nothing
    scored would be left.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation {truncation!r}; choose one of {TRUNCATION_POLICIES}")
    ids = list(ids)
    length = len(ids)
    if length <= max_len:
        return ids, start
    if truncation == "error":
        raise ValueError(f"record {record_id}: encoded length {length} exceeds max_len={max_len} "
                         "(pass truncation='left' or 'right' to truncate)")
    if truncation == "left":
        drop = length - max_len
        removable = start - keep_head  # prompt tokens after the kept head
        if drop > removable:
            raise ValueError(f"record {record_id}: the response alone ({length - start} tokens + "
                             f"{keep_head} kept) does not fit max_len={max_len}")
        return ids[:keep_head] + ids[keep_head + drop:], start - drop
    if start >= max_len:
        raise ValueError(f"record {record_id}: right truncation to max_len={max_len} leaves no scored "
                         f"token (the response starts at position {start})")
    return ids[:max_len], start


def pack_sequences(sequences: Sequence[tuple[Sequence[int], int]], max_len: int, pad_token_id: int, *,
                   record_ids: Sequence[str] | None = None, truncation: str = "error",
                   keep_head: int | Sequence[int] = 0) -> dict[str, np.ndarray]:
    """Arrays of ``n = len(sequences)`` tokenized sequences ``(ids, start)``.

    ``ids[start:]`` are the scored tokens (``start >= 1``: the first token is never a
    target). Returns ``{"input_ids", "targets", "loss_mask", "attention_mask"}`` of shape
    ``(n, max_len)`` as described in the module docstring (``loss_mask`` 1.0 at positions
    ``start - 1 .. len(ids) - 2``). Over-long sequences follow ``truncation``;
    ``keep_head`` (per sequence or one int) is the number of leading tokens ``"left"``
    truncation keeps. ValueError (naming the record id) for a sequence with no scored token.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
        raise ValueError(f"max_len must be an integer >= 2, got {max_len!r}")
    n = len(sequences)
    if record_ids is not None and len(record_ids) != n:
        raise ValueError(f"{len(record_ids)} record_ids for {n} sequences")
    heads = [int(keep_head)] * n if isinstance(keep_head, (int, np.integer)) else list(keep_head)
    input_ids = np.full((n, max_len), pad_token_id, dtype=np.int32)
    targets = np.full((n, max_len), pad_token_id, dtype=np.int32)
    loss_mask = np.zeros((n, max_len), dtype=np.float32)
    attention_mask = np.zeros((n, max_len), dtype=np.int32)
    for i, (ids, start) in enumerate(sequences):
        rid = str(record_ids[i]) if record_ids is not None else f"#{i}"
        if not 1 <= start < len(ids):
            raise ValueError(f"record {rid}: zero loss tokens (scored part starts at {start} of "
                             f"{len(ids)} tokens)")
        ids, start = truncate_sequence(ids, start, max_len, truncation=truncation, keep_head=heads[i],
                                       record_id=rid)
        length = len(ids)
        input_ids[i, :length] = ids
        targets[i, : length - 1] = ids[1:]
        attention_mask[i, :length] = 1
        loss_mask[i, start - 1 : length - 1] = 1.0
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "attention_mask": attention_mask}


def encode_examples(tokenizer, records: Sequence[Mapping], max_len: int, *, add_bos: bool = True,
                    add_eos: bool = True, truncation: str = "error") -> dict[str, np.ndarray]:
    """Encode ``n = len(records)`` records into right-padded arrays of width ``max_len``.

    Returns ``{"input_ids", "targets", "loss_mask", "attention_mask"}``, each of
    shape ``(n, max_len)`` (see the module docstring for their content and dtypes).

    Raises ValueError for a sequence longer than ``max_len`` with ``truncation="error"``
    (naming the record id and its length; see the module docstring for ``"left"`` /
    ``"right"``), a record with zero scored tokens, or a tokenizer without ``pad_token_id``.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
        raise ValueError(f"max_len must be an integer >= 2, got {max_len!r}")
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation {truncation!r}; choose one of {TRUNCATION_POLICIES}")
    pad = _special_id(tokenizer, "pad_token_id", "padding")
    sequences = [encode_record(tokenizer, record, add_bos=add_bos, add_eos=add_eos, index=i)
                 for i, record in enumerate(records)]
    return pack_sequences(sequences, max_len, pad, record_ids=[_record_id(r, i) for i, r in enumerate(records)],
                          truncation=truncation, keep_head=1 if add_bos else 0)


def _num_rows(arrays: Mapping[str, np.ndarray]) -> int:
    """The common leading dimension of ``arrays``; ValueError if empty or inconsistent."""
    if not arrays:
        raise ValueError("arrays is empty")
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in arrays.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"arrays must share a leading dimension, got {sizes}")
    return next(iter(sizes.values()))


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def iterate_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int | None = None,
                    drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Yield dicts of ``batch_size``-row slices of ``arrays`` (all of leading dim n).

    Rows are in order when ``seed`` is None, else in the order of
    ``default_rng(seed).permutation(n)``. The last batch has ``n % batch_size`` rows
    unless ``drop_last`` (then it is skipped). Each batch maps every key to an array
    of shape ``(b,) + arrays[key].shape[1:]``.
    """
    batch_size = _check_batch_size(batch_size)
    n = _num_rows(arrays)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for lo in range(0, stop, batch_size):
        idx = order[lo: lo + batch_size]
        if seed is None:
            yield {k: np.asarray(v)[lo: lo + len(idx)] for k, v in arrays.items()}
        else:
            yield {k: np.asarray(v)[idx] for k, v in arrays.items()}


def pad_to_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *,
                   pad_values: Mapping[str, int | float] | None = None) -> dict[str, np.ndarray]:
    """Append rows so that n becomes a multiple of ``batch_size`` (fixed-shape batches).

    Returns a new dict with every array of shape ``(m,) + shape[1:]``,
    ``m = ceil(n / batch_size) * batch_size``, the added rows filled with
    ``pad_values.get(key, 0)``, plus ``"example_mask"`` float32 ``(m,)``: 1.0 for the
    n real rows, 0.0 for the added ones. Pass ``pad_values={"input_ids": pad_id,
    "targets": pad_id}`` when the pad id is not 0; the added rows have zero
    ``loss_mask``/``attention_mask`` either way.
    """
    batch_size = _check_batch_size(batch_size)
    n = _num_rows(arrays)
    if "example_mask" in arrays:
        raise ValueError("arrays already has an 'example_mask' key")
    pad_values = dict(pad_values or {})
    m = -(-n // batch_size) * batch_size
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        extra = np.full((m - n,) + v.shape[1:], pad_values.get(k, 0), dtype=v.dtype)
        out[k] = np.concatenate([v, extra], axis=0)
    example_mask = np.zeros((m,), dtype=np.float32)
    example_mask[:n] = 1.0
    out["example_mask"] = example_mask
    return out
