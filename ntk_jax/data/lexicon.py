"""A labelled real-word task from human valence ratings: the VADER sentiment lexicon in
natural sentence templates, for sequence classification with a real tokenizer.

Source: ``vader_lexicon.txt`` of the installed ``vaderSentiment`` package (MIT; read with
``importlib.resources``, nothing is downloaded). Each line is ``token<TAB>mean<TAB>std<TAB>
[10 ratings]``: the mean valence of ten human ratings on [-4, 4].

Which words are kept (:func:`select_words`):

1. the token is a lowercase alphabetic word, ``[a-z]+`` (drops emoticons, ``:)``, ``<3``,
   digits, hyphenated and apostrophe forms);
2. the model's WordPiece tokenizer holds it as at most ``max_pieces`` pieces, none of them the
   unknown token — default 1: the word is itself one vocabulary entry, so slang and acronyms
   the vocabulary only spells as meaningless sub-word fragments (``lmao`` → ``l ##ma ##o``)
   are dropped;
3. ``|mean valence| >= min_abs_valence`` (default 1.5: clearly positive or negative).

With all-MiniLM-L6-v2's uncased vocabulary this keeps 1364 of the 7520 entries (661 positive).

Examples (:func:`encode_words`): every word is put in one sentence template
(:data:`TEMPLATES`, drawn per word from a seeded generator, independently of its label) and
tokenized by the model's own tokenizer (``[CLS] sentence [SEP]``, right-padded to
``max_len``). Labels: ``label = 1`` if the mean valence is positive else 0 (binary task),
``y = ±1`` (the same, as kernel-regression targets) and ``valence`` (the mean rating, the
regression target). Splits (:func:`lexicon_splits`) are disjoint *by word* and balanced by
label (half positive, half negative words), so no split shares a word with another.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import re
from typing import Mapping, Sequence

import numpy as np

__all__ = ["LexiconEntry", "TEMPLATES", "load_vader_lexicon", "select_words", "split_words",
           "encode_words", "lexicon_splits", "SPLITS"]

PACKAGE = "vaderSentiment"
LEXICON_FILE = "vader_lexicon.txt"
SPLITS = ("train", "kernel", "eval")
_WORD = re.compile(r"[a-z]+")

# Natural contexts a sentiment word fits in; none of them carries a sentiment of its own.
TEMPLATES = (
    "I thought the ending was {w}.",
    "In one word, the evening was {w}.",
    "Her first reaction was simply: {w}.",
    "The review called the whole thing {w}.",
    "Honestly, my answer is {w}.",
    "He kept saying one word: {w}.",
    "The note on the door read \"{w}\".",
    "Everyone agreed it felt {w}.",
)


@dataclasses.dataclass(frozen=True)
class LexiconEntry:
    """One lexicon line: ``word``, ``valence`` (mean of the ratings), ``std`` and the raw
    ``ratings``."""

    word: str
    valence: float
    std: float
    ratings: tuple[int, ...]


def load_vader_lexicon() -> list[LexiconEntry]:
    """Every entry of the installed ``vaderSentiment`` package's ``vader_lexicon.txt``.

    Raises ``ModuleNotFoundError`` naming the package to install when it is missing.
    """
    try:
        text = importlib.resources.files(PACKAGE).joinpath(LEXICON_FILE).read_text(encoding="utf-8")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"the lexicon task needs the {PACKAGE!r} package (pip install vaderSentiment); "
                                  f"its {LEXICON_FILE} holds the human valence ratings") from e
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the installed {PACKAGE!r} package has no {LEXICON_FILE}") from e
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 4:
            raise ValueError(f"{LEXICON_FILE} line {n}: expected 4 tab-separated fields, got {line!r}")
        ratings = tuple(int(r) for r in re.findall(r"-?\d+", parts[3]))
        out.append(LexiconEntry(parts[0], float(parts[1]), float(parts[2]), ratings))
    return out


def _num_pieces(tokenizer, word: str) -> int | None:
    """WordPiece pieces of ``word``; ``None`` when one of them is the unknown token."""
    pieces = tokenizer.tokenize(word)
    unk = getattr(tokenizer, "unk_token", None)
    return None if unk is not None and unk in pieces else len(pieces)


def select_words(entries: Sequence[LexiconEntry], tokenizer, *, min_abs_valence: float = 1.5,
                 max_pieces: int = 1) -> list[LexiconEntry]:
    """The entries kept by the rule of the module docstring (alphabetic lowercase words the
    tokenizer holds as at most ``max_pieces`` pieces, ``|valence| >= min_abs_valence``), in
    lexicon order, each word once."""
    if max_pieces < 1:
        raise ValueError(f"max_pieces must be >= 1, got {max_pieces}")
    kept, seen = [], set()
    for e in entries:
        if e.word in seen or not _WORD.fullmatch(e.word) or abs(e.valence) < min_abs_valence or e.valence == 0:
            continue
        pieces = _num_pieces(tokenizer, e.word)
        if pieces is not None and pieces <= max_pieces:
            kept.append(e)
            seen.add(e.word)
    return kept


def split_words(entries: Sequence[LexiconEntry], sizes: Mapping[str, int], seed: int) -> dict[str, list[LexiconEntry]]:
    """Disjoint, label-balanced word splits: ``sizes`` maps split name → number of words
    (each even: half positive, half negative), filled in the given order from one seeded
    shuffle of the positive and of the negative words. ValueError if there are too few."""
    rng = np.random.default_rng(seed)
    pos = [entries[i] for i in rng.permutation(len(entries)) if entries[i].valence > 0]
    neg = [entries[i] for i in rng.permutation(len(entries)) if entries[i].valence < 0]
    need = {k: int(v) for k, v in sizes.items()}
    odd = [k for k, v in need.items() if v % 2 or v <= 0]
    if odd:
        raise ValueError(f"split sizes must be positive and even (half positive, half negative words): {need}")
    total = sum(need.values()) // 2
    if total > min(len(pos), len(neg)):
        raise ValueError(f"splits {need} need {total} positive and {total} negative words; the selected "
                         f"lexicon has {len(pos)} positive and {len(neg)} negative")
    out, at = {}, 0
    for name, n in need.items():
        half = n // 2
        chosen = pos[at:at + half] + neg[at:at + half]
        out[name] = [chosen[i] for i in rng.permutation(n)]
        at += half
    return out


def encode_words(tokenizer, entries: Sequence[LexiconEntry], max_len: int, *, seed: int,
                 templates: Sequence[str] = TEMPLATES) -> dict[str, np.ndarray]:
    """``n`` words → arrays of the classification task.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` ``(n, max_len)`` int32
    (``[CLS] sentence [SEP]`` right-padded), ``label`` ``(n,)`` int32 (1 = positive valence),
    ``y`` ``(n,)`` float32 (±1), ``valence`` ``(n,)`` float32 (mean human rating) and
    ``template`` ``(n,)`` int32 (which template). ValueError when a sentence needs more than
    ``max_len`` tokens (nothing is truncated).
    """
    if not entries:
        raise ValueError("no words to encode")
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(templates), len(entries))
    texts = [templates[t].format(w=e.word) for t, e in zip(which, entries)]
    enc = tokenizer(texts, padding="max_length", max_length=max_len, truncation=False)
    lengths = [int(sum(m)) for m in enc["attention_mask"]]
    too_long = [(t, n) for t, n in zip(texts, lengths) if n > max_len]
    if too_long or any(len(ids) != max_len for ids in enc["input_ids"]):
        raise ValueError(f"sentences longer than max_len={max_len} tokens: {too_long[:3]}; raise max_len")
    n = len(entries)
    out = {
        "input_ids": np.asarray(enc["input_ids"], np.int32),
        "attention_mask": np.asarray(enc["attention_mask"], np.int32),
        "token_type_ids": np.asarray(enc.get("token_type_ids", np.zeros((n, max_len))), np.int32),
        "label": np.array([int(e.valence > 0) for e in entries], np.int32),
        "y": np.array([1.0 if e.valence > 0 else -1.0 for e in entries], np.float32),
        "valence": np.array([e.valence for e in entries], np.float32),
        "template": which.astype(np.int32),
    }
    return out


def lexicon_splits(tokenizer, sizes: Mapping[str, int], *, max_len: int, seed: int,
                   min_abs_valence: float = 1.5, max_pieces: int = 1) -> tuple[dict[str, dict], dict]:
    """The encoded splits (``{name: arrays of encode_words}``) and a description of them
    (``{"n_words_selected", "n_positive", "sizes", "rule", "words": {name: [...]}}``) for
    reports. Splits are disjoint by word (:func:`split_words`); template draws are seeded per
    split."""
    selected = select_words(load_vader_lexicon(), tokenizer, min_abs_valence=min_abs_valence,
                            max_pieces=max_pieces)
    words = split_words(selected, sizes, seed)
    data = {name: encode_words(tokenizer, ws, max_len, seed=seed + 1 + i)
            for i, (name, ws) in enumerate(words.items())}
    info = {
        "source": f"{PACKAGE}/{LEXICON_FILE} (mean valence of 10 human ratings)",
        "rule": (f"[a-z]+ words the tokenizer holds as <= {max_pieces} WordPiece piece(s), "
                 f"|mean valence| >= {min_abs_valence}; label = sign of the mean valence"),
        "n_words_selected": len(selected),
        "n_positive_selected": sum(e.valence > 0 for e in selected),
        "sizes": {name: len(ws) for name, ws in words.items()},
        "disjoint_by_word": True,
        "max_len": int(max_len),
        "templates": list(TEMPLATES),
        "words": {name: [e.word for e in ws] for name, ws in words.items()},
    }
    return data, info
