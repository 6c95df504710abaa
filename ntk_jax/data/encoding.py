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
  ValueError if the bos + response (+ eos) alone exceed ``max_len`` (with several scored
  spans, e.g. the assistant turns of a chat, earlier spans may be dropped; the last is
  kept whole).
* ``"right"``: keep the first ``max_len`` tokens (the response tail and the eos are
  lost); ValueError if no scored token is left.

:func:`pack_sequences` builds the arrays from already-tokenized sequences (used by
:mod:`ntk_jax.data.records` for chat-template encodings).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["encode_record", "encode_examples", "pack_sequences", "truncate_sequence", "scored_spans",
           "fits_after_truncation", "max_length",
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


def _as_scored(ids: Sequence[int], scored) -> np.ndarray:
    """The per-token scored flags of a sequence given as ``start`` (an int: tokens
    ``start..`` are scored) or as a mask of ``len(ids)`` flags; bool ``(len(ids),)``."""
    if isinstance(scored, (int, np.integer)) and not isinstance(scored, bool):
        mask = np.zeros(len(ids), dtype=bool)
        mask[max(int(scored), 0):] = True
        mask[0:1] |= int(scored) <= 0  # a start < 1 would score the first token: rejected by the caller
        return mask
    mask = np.asarray(scored, dtype=bool)
    if mask.shape != (len(ids),):
        raise ValueError(f"a scored mask of shape {mask.shape} for {len(ids)} tokens")
    return mask


def scored_spans(scored) -> tuple[int, int]:
    """``(first, last_span_start)`` of a scored mask ``(L,)``: the first scored position and
    where its last contiguous run of scored tokens starts (``(L, L)`` if nothing is scored)."""
    mask = np.asarray(scored, dtype=bool)
    hits = np.flatnonzero(mask)
    if not hits.size:
        return mask.size, mask.size
    breaks = np.flatnonzero(np.diff(hits) > 1)
    return int(hits[0]), int(hits[breaks[-1] + 1] if breaks.size else hits[0])


def fits_after_truncation(length, first_scored, last_span_start, keep_head, max_len: int, truncation: str):
    """Whether a sequence can be fitted into ``max_len`` tokens by ``truncation`` (scalars or
    numpy arrays, elementwise): it already fits; or ``"left"`` keeps its last scored span
    whole with at least one token before it (``length - max_len <= last_span_start -
    max(keep_head, 1)``); or ``"right"`` keeps a scored token (``first_scored < max_len``).
    The single rule :func:`truncate_sequence` and the selection jobs' length check share."""
    length = np.asarray(length)
    fits = length <= max_len
    if truncation == "left":
        return fits | (length - max_len <= np.asarray(last_span_start) - np.maximum(keep_head, 1))
    if truncation == "right":
        return fits | (np.asarray(first_scored) < max_len)
    return fits


def truncate_sequence(ids: Sequence[int], start, max_len: int, *, truncation: str = "error",
                      keep_head: int = 0, record_id: str = "?"):
    """Fit one sequence ``ids`` into ``max_len`` tokens.

    ``start``: where the scored tokens begin (an int; they run to the end), or a per-token
    scored mask ``(len(ids),)`` (several scored spans, e.g. every assistant turn of a chat).
    ``keep_head``: leading tokens that ``"left"`` truncation never drops (the bos).
    Returns ``(ids, start)`` in the form ``start`` was given, unchanged when it fits, else
    per ``truncation`` (see the module docstring; ``"left"`` drops leading tokens, earlier
    scored spans included, but never the last scored span). ValueError naming
    ``record_id`` when it cannot fit or nothing scored would be left.
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
    mask = _as_scored(ids, start)
    first, last_start = scored_spans(mask)
    if not fits_after_truncation(length, first, last_start, keep_head, max_len, truncation):
        if truncation == "left":
            raise ValueError(f"record {record_id}: the response alone ({length - last_start} tokens + "
                             f"{max(keep_head, 1)} kept before it) does not fit max_len={max_len}")
        raise ValueError(f"record {record_id}: right truncation to max_len={max_len} leaves no scored "
                         f"token (the response starts at position {first})")
    if truncation == "left":
        drop = length - max_len
        keep = np.r_[0:keep_head, keep_head + drop:length]
    else:
        keep = np.arange(max_len)
    ids, mask = [ids[i] for i in keep], mask[keep]
    mask[0] = False  # the first token is never a target
    if isinstance(start, (int, np.integer)) and not isinstance(start, bool):
        return ids, int(np.argmax(mask))
    return ids, mask


def pack_sequences(sequences: Sequence[tuple[Sequence[int], Any]], max_len: int, pad_token_id: int, *,
                   record_ids: Sequence[str] | None = None, truncation: str = "error",
                   keep_head: int | Sequence[int] = 0) -> dict[str, np.ndarray]:
    """Arrays of ``n = len(sequences)`` tokenized sequences ``(ids, start)``.

    ``start``: where the scored tokens begin (``start >= 1``: the first token is never a
    target), or a per-token scored mask ``(len(ids),)`` (token ``t`` scored means
    ``loss_mask[:, t - 1] = 1``; its first entry must be False). Returns ``{"input_ids",
    "targets", "loss_mask", "attention_mask"}`` of shape ``(n, max_len)`` as described in the
    module docstring (``loss_mask`` 1.0 at positions ``start - 1 .. len(ids) - 2``).
    Over-long sequences follow ``truncation``; ``keep_head`` (per sequence or one int) is the
    number of leading tokens ``"left"`` truncation keeps. ValueError (naming the record id)
    for a sequence with no scored token.
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
        mask = _as_scored(ids, start)
        if not mask.any() or mask[0]:
            raise ValueError(f"record {rid}: zero loss tokens (scored part starts at "
                             f"{scored_spans(mask)[0]} of {len(ids)} tokens)")
        ids, mask = truncate_sequence(ids, mask, max_len, truncation=truncation, keep_head=heads[i],
                                      record_id=rid)
        length = len(ids)
        input_ids[i, :length] = ids
        targets[i, : length - 1] = ids[1:]
        attention_mask[i, :length] = 1
        loss_mask[i, : length - 1] = mask[1:]
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
