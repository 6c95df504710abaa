"""Synthetic multi-task text corpus: the library's embedded default data.

Every task is a generator ``fn(rng) -> (prompt, response)`` taking a
``numpy.random.Generator``; prompts are at most ~21 characters and responses at
most 8, so that ``1 + len(prompt) + len(response) + 1`` fits in a sequence length
of 32 with the character tokenizer (:mod:`ntk_jax.data.tokenizer`). Only characters
from :data:`ntk_jax.data.tokenizer.ALPHABET` are emitted (lowercase letters,
digits, space and ``+-=:?>``).

Task families (``TASKS``):

=====================  ========================  ========  =============================================================
name                   prompt example            response  notes
=====================  ========================  ========  =============================================================
``add``                ``12+7=``                 ``19``    a, b uniform in [0, 99]
``sub``                ``53-17=``                ``36``    a >= b, both in [0, 99] (never negative)
``copy``               ``copy:abc>``             ``abc``   3-6 lowercase letters
``reverse``            ``rev:abcd>``             ``dcba``  3-6 lowercase letters
``sort``               ``sort:3142>``            ``1234``  3-7 digits, sorted ascending
``count``              ``count a:abaca>``        ``3``     occurrences of a letter in 4-10 letters from {a, b, c, d}
``sentiment``          ``the movie was great?``  ``pos``   ``the <noun> was <adj>?``, label by the adjective's word list
``parity``             ``parity:10110>``         ``odd``   ``even``/``odd`` number of ones in 3-8 bits
``sentiment_flipped``  ``the movie was great?``  ``neg``   conflicting: sentiment's input distribution, labels flipped
``add_mod10``          ``12+7=``                 ``9``     conflicting near-duplicate of add: (a + b) mod 10
``add_spaced``         ``12 + 7 =``              ``19``    consistent near-duplicate of add: other surface form
``noise``              ``q3z hk1>``              ``x0d``   random characters -> random characters (unlearnable)
=====================  ========================  ========  =============================================================

The variants (``sentiment_flipped``, ``add_mod10``, ``add_spaced``, ``noise``) exist
for data-selection benchmarks: a selector targeting ``add`` should prefer
``add_spaced`` over ``add_mod10`` and ``noise``; one targeting ``sentiment`` should
avoid ``sentiment_flipped``.

Determinism: ``generate_task(name, n, seed)`` draws from
``default_rng(SeedSequence([seed, crc32(name)]))``, so each task has its own
stream (independent across task names, stable across processes and Python
versions) and ``make_corpus`` is the per-task records, shuffled by a seed derived
from ``seed``.
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "TASKS",
    "POSITIVE_WORDS",
    "NEGATIVE_WORDS",
    "SENTIMENT_NOUNS",
    "generate_task",
    "make_corpus",
    "write_jsonl",
    "read_jsonl",
]

TaskFn = Callable[[np.random.Generator], tuple[str, str]]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"

SENTIMENT_NOUNS: tuple[str, ...] = ("movie", "film", "food", "show", "book", "game", "song", "meal", "play")
POSITIVE_WORDS: tuple[str, ...] = ("great", "good", "fun", "nice", "cool", "superb", "lovely", "fine")
NEGATIVE_WORDS: tuple[str, ...] = ("bad", "awful", "dull", "poor", "boring", "sad", "weak", "lame")


# ----------------------------------------------------------------------------- helpers
def _choice(rng: np.random.Generator, seq) -> Any:
    """One element of ``seq`` drawn uniformly."""
    return seq[int(rng.integers(len(seq)))]


def _letters(rng: np.random.Generator, lo: int, hi: int, alphabet: str = _LETTERS) -> str:
    """A string of ``lo..hi`` (inclusive) characters drawn uniformly from ``alphabet``."""
    k = int(rng.integers(lo, hi + 1))
    return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=k))


def _two_operands(rng: np.random.Generator) -> tuple[int, int]:
    """Two integers uniform in [0, 99]."""
    a, b = rng.integers(0, 100, size=2)
    return int(a), int(b)


def _sentiment_input(rng: np.random.Generator) -> tuple[str, bool]:
    """A ``the <noun> was <adj>?`` prompt and whether the adjective is positive."""
    noun = _choice(rng, SENTIMENT_NOUNS)
    positive = bool(rng.integers(2))
    adj = _choice(rng, POSITIVE_WORDS if positive else NEGATIVE_WORDS)
    return f"the {noun} was {adj}?", positive


# ----------------------------------------------------------------------------- tasks
def task_add(rng: np.random.Generator) -> tuple[str, str]:
    """``"a+b="`` -> ``str(a + b)``, a, b in [0, 99]."""
    a, b = _two_operands(rng)
    return f"{a}+{b}=", str(a + b)


def task_sub(rng: np.random.Generator) -> tuple[str, str]:
    """``"a-b="`` -> ``str(a - b)`` with a >= b, both in [0, 99]."""
    a, b = _two_operands(rng)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", str(a - b)


def task_copy(rng: np.random.Generator) -> tuple[str, str]:
    """``"copy:s>"`` -> ``s`` for 3-6 random lowercase letters."""
    s = _letters(rng, 3, 6)
    return f"copy:{s}>", s


def task_reverse(rng: np.random.Generator) -> tuple[str, str]:
    """``"rev:s>"`` -> ``s[::-1]`` for 3-6 random lowercase letters."""
    s = _letters(rng, 3, 6)
    return f"rev:{s}>", s[::-1]


def task_sort(rng: np.random.Generator) -> tuple[str, str]:
    """``"sort:d>"`` -> the 3-7 digits of ``d`` in ascending order."""
    s = _letters(rng, 3, 7, _DIGITS)
    return f"sort:{s}>", "".join(sorted(s))


def task_count(rng: np.random.Generator) -> tuple[str, str]:
    """``"count c:s>"`` -> occurrences of letter c in s (4-10 letters from a-d)."""
    s = _letters(rng, 4, 10, "abcd")
    c = _choice(rng, "abcd")
    return f"count {c}:{s}>", str(s.count(c))


def task_sentiment(rng: np.random.Generator) -> tuple[str, str]:
    """``"the <noun> was <adj>?"`` -> ``"pos"`` / ``"neg"`` by the adjective's list."""
    prompt, positive = _sentiment_input(rng)
    return prompt, "pos" if positive else "neg"


def task_sentiment_flipped(rng: np.random.Generator) -> tuple[str, str]:
    """As :func:`task_sentiment` (same draws) with the label flipped."""
    prompt, positive = _sentiment_input(rng)
    return prompt, "neg" if positive else "pos"


def task_parity(rng: np.random.Generator) -> tuple[str, str]:
    """``"parity:b>"`` -> ``"even"`` / ``"odd"`` number of ones in 3-8 random bits."""
    s = _letters(rng, 3, 8, "01")
    return f"parity:{s}>", "odd" if s.count("1") % 2 else "even"


def task_add_mod10(rng: np.random.Generator) -> tuple[str, str]:
    """``"a+b="`` (as :func:`task_add`) -> ``str((a + b) % 10)``: conflicts with ``add``."""
    a, b = _two_operands(rng)
    return f"{a}+{b}=", str((a + b) % 10)


def task_add_spaced(rng: np.random.Generator) -> tuple[str, str]:
    """``"a + b ="`` -> ``str(a + b)``: ``add`` in another surface form."""
    a, b = _two_operands(rng)
    return f"{a} + {b} =", str(a + b)


def task_noise(rng: np.random.Generator) -> tuple[str, str]:
    """Random letters/digits/spaces ``+ ">"`` -> 1-6 random letters/digits (no structure)."""
    prompt = _letters(rng, 3, 10, _LETTERS + _DIGITS + " ")
    return f"{prompt}>", _letters(rng, 1, 6, _LETTERS + _DIGITS)


TASKS: dict[str, TaskFn] = {
    "add": task_add,
    "sub": task_sub,
    "copy": task_copy,
    "reverse": task_reverse,
    "sort": task_sort,
    "count": task_count,
    "sentiment": task_sentiment,
    "parity": task_parity,
    "sentiment_flipped": task_sentiment_flipped,
    "add_mod10": task_add_mod10,
    "add_spaced": task_add_spaced,
    "noise": task_noise,
}
"""Task name -> generator ``fn(rng) -> (prompt, response)``; see the module docstring."""


# ----------------------------------------------------------------------------- corpus
def _task_seed_sequence(name: str, seed: int) -> np.random.SeedSequence:
    """The seed sequence of task ``name`` under ``seed`` (crc32 keeps it process-stable)."""
    return np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))])


def _check_task(name: str) -> TaskFn:
    """The generator of task ``name``; ValueError listing the known tasks otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def _check_count(n, what: str) -> int:
    """``n`` as a non-negative int, ValueError otherwise."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {n!r}")
    return int(n)


def generate_task(name: str, n: int, seed: int) -> list[dict]:
    """``n`` records of task ``name``, deterministic in ``(name, seed)``.

    Returns a list of ``n`` dicts ``{"id": f"{name}-{seed}-{i}", "task": name,
    "prompt": str, "response": str}`` for ``i = 0..n-1``. Record ``i`` does not
    depend on ``n`` (a longer draw extends a shorter one).
    """
    fn = _check_task(name)
    n = _check_count(n, "n")
    rng = np.random.default_rng(_task_seed_sequence(name, seed))
    records = []
    for i in range(n):
        prompt, response = fn(rng)
        records.append({"id": f"{name}-{seed}-{i}", "task": name, "prompt": prompt, "response": response})
    return records


def make_corpus(tasks: Iterable[str] | Mapping[str, int], n_per_task: int | None = None, seed: int = 0) -> list[dict]:
    """A shuffled multi-task corpus.

    Args:
      tasks: task names (each with ``n_per_task`` records), or a mapping
        name -> count (then ``n_per_task`` must be None).
      n_per_task: records per task when ``tasks`` is a sequence of names.
      seed: base seed; task ``t`` contributes ``generate_task(t, n, seed)`` (each
        task has its own independent stream), and the concatenation is shuffled by
        a generator derived from ``seed``.

    Returns:
      a list of ``sum(counts)`` records (see :func:`generate_task`), deterministic in
      the arguments.
    """
    if isinstance(tasks, Mapping):
        if n_per_task is not None:
            raise ValueError("pass either a mapping of task -> count or n_per_task, not both")
        counts = {name: _check_count(k, f"count of task {name!r}") for name, k in tasks.items()}
    else:
        if isinstance(tasks, str):
            raise ValueError(f"tasks must be a collection of task names, got the string {tasks!r}")
        if n_per_task is None:
            raise ValueError("n_per_task is required when tasks is a sequence of names")
        names = list(tasks)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names in {names}")
        counts = {name: _check_count(n_per_task, "n_per_task") for name in names}
    records = []
    for name, k in counts.items():
        records.extend(generate_task(name, k, seed))
    order = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(b"make_corpus/shuffle")]))
    perm = order.permutation(len(records))
    return [records[int(i)] for i in perm]


def write_jsonl(records: Iterable[Mapping], path: str | os.PathLike) -> None:
    """Write ``records`` one JSON object a line (UTF-8), creating parent folders; atomically
    (:func:`ntk_jax.utils.atomic_write`: a killed writer never leaves half a file)."""
    from ntk_jax.utils import atomic_write

    with atomic_write(path, "w") as f:
        for rec in records:
            f.write(json.dumps(dict(rec), ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; blank lines are skipped.

    Raises ValueError naming the file and the 1-based line number for a line that
    is not valid JSON or not a JSON object.
    """
    path = os.fspath(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    return records
