"""A character-level tokenizer built offline, interchangeable with a Hugging Face one.

``CharTokenizer`` implements the subset of the ``transformers`` tokenizer interface
the library uses (``vocab_size``, ``pad_token_id``, ``bos_token_id``,
``eos_token_id``, ``encode``, ``decode``, ``save_pretrained``, ``from_pretrained``),
so a real checkpoint's tokenizer can be swapped in.

Vocabulary (default, 50 ids)::

    0 <pad>   1 <bos>   2 <eos>   3 <unk>   4.. the characters of ALPHABET, in order

``save_pretrained(d)`` writes ``d/tokenizer.json`` (a ``tokenizers`` WordLevel model
over single characters, a pre-tokenizer isolating every character, a ``Fuse``
decoder, the special tokens registered and a ``<bos> $A`` post-processor) and
``d/tokenizer_config.json``; ``transformers.AutoTokenizer.from_pretrained(d)`` and
``transformers.PreTrainedTokenizerFast(tokenizer_file=d/"tokenizer.json")`` load it
and give the same ids for ``encode(text, add_special_tokens=False)`` and
``encode(text, add_special_tokens=True)`` (the latter only with AutoTokenizer or
when ``bos_token`` is passed to PreTrainedTokenizerFast, as there the config file is
not read).

Like Hugging Face tokenizers, the literal strings ``<pad>``, ``<bos>``, ``<eos>``,
``<unk>`` inside a text encode to their special ids.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

__all__ = ["ALPHABET", "SPECIAL_TOKENS", "CharTokenizer"]

ALPHABET: str = "0123456789abcdefghijklmnopqrstuvwxyz +-=:,.?>|"
"""The default characters (ids 4..49): digits, lowercase letters, space and the
punctuation of the synthetic tasks (``+-=:?>``) plus ``,.|`` for headroom. Every
character :mod:`ntk_jax.data.synthetic` emits is in it."""

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
"""Special tokens, with ids 0, 1, 2, 3 in this order."""

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def _check_alphabet(alphabet: str) -> str:
    """``alphabet`` if it is a non-empty string of distinct characters, ValueError otherwise."""
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError(f"alphabet must be a non-empty string, got {alphabet!r}")
    dup = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if dup:
        raise ValueError(f"alphabet has duplicate characters: {dup}")
    return alphabet


class CharTokenizer:
    """Character-level tokenizer: one id per character of ``alphabet``.

    Attributes:
      alphabet: the characters, ids ``4 .. 4 + len(alphabet) - 1`` in order.
      vocab_size: ``4 + len(alphabet)`` (50 for the default alphabet).
      pad_token_id, bos_token_id, eos_token_id, unk_token_id: 0, 1, 2, 3.
    """

    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    unk_token_id: int = 3
    pad_token, bos_token, eos_token, unk_token = SPECIAL_TOKENS

    def __init__(self, alphabet: str = ALPHABET):
        self.alphabet = _check_alphabet(alphabet)
        self._tokens: tuple[str, ...] = SPECIAL_TOKENS + tuple(alphabet)
        self._ids: dict[str, int] = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(alphabet)}
        self._special_ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    # ------------------------------------------------------------------ interface
    @property
    def vocab_size(self) -> int:
        """Number of ids: 4 special tokens + one per character."""
        return len(self._tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, alphabet={self.alphabet!r})"

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``."""
        return list(range(len(SPECIAL_TOKENS)))

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id for the whole vocabulary."""
        return {t: i for i, t in enumerate(self._tokens)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``: one per character, ``<unk>`` (3) for characters outside
        the alphabet, special-token strings (``"<eos>"``) to their ids; with
        ``add_special_tokens`` the ``<bos>`` id is prepended. Length
        ``len(text)`` (+1) when ``text`` holds no special-token strings.
        """
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_special_tokens else []
        for piece in self._special_re.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            else:
                ids.extend(self._ids.get(c, self.unk_token_id) for c in piece)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a sequence or 1-D array of ints); special tokens (``<unk>``
        included, as in Hugging Face tokenizers) are dropped with
        ``skip_special_tokens`` and written as ``"<pad>"`` etc. otherwise.
        """
        out = []
        n_special = len(SPECIAL_TOKENS)
        for i in ids:
            try:
                i = int(i)
            except (TypeError, ValueError):
                raise ValueError(f"decode expects integer ids, got {i!r}") from None
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            if i < n_special and skip_special_tokens:
                continue
            out.append(self._tokens[i])
        return "".join(out)

    # ------------------------------------------------------------------ Hugging Face files
    def to_hf_tokenizer(self):
        """The equivalent ``tokenizers.Tokenizer`` (same ids, see the module docstring)."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

        tok = Tokenizer(models.WordLevel(self.get_vocab(), unk_token=self.unk_token))
        # Every character (newlines included) is its own pre-token; WordLevel maps it.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{self.bos_token} $A",
            pair=f"{self.bos_token} $A $B",
            special_tokens=[(self.bos_token, self.bos_token_id)],
        )
        return tok

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``
        (created if needed); returns the two paths.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tok_path = os.path.join(directory, TOKENIZER_FILE)
        cfg_path = os.path.join(directory, CONFIG_FILE)
        self.to_hf_tokenizer().save(tok_path)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "pad_token": self.pad_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "padding_side": "right",
            "ntk_jax_tokenizer": "CharTokenizer",
        }
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        return [tok_path, cfg_path]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "CharTokenizer":
        """Load a tokenizer written by :meth:`save_pretrained` (reads ``tokenizer.json``).

        Raises ValueError if the file is not a character-level WordLevel vocabulary
        with ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` at ids 0-3 and contiguous ids.
        """
        path = os.path.join(os.fspath(directory), TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"no {TOKENIZER_FILE} in {os.fspath(directory)!r}")
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec.get("model") or {}
        if model.get("type") != "WordLevel" or not isinstance(model.get("vocab"), dict):
            raise ValueError(f"{path}: expected a WordLevel model, got {model.get('type')!r}")
        by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
        ids = [i for _, i in by_id]
        if ids != list(range(len(ids))):
            raise ValueError(f"{path}: vocabulary ids are not contiguous from 0")
        tokens = [t for t, _ in by_id]
        n = len(SPECIAL_TOKENS)
        if tuple(tokens[:n]) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: expected special tokens {list(SPECIAL_TOKENS)} at ids 0-{n - 1}, got {tokens[:n]}")
        bad = [t for t in tokens[n:] if len(t) != 1]
        if bad:
            raise ValueError(f"{path}: not a character vocabulary (multi-character tokens {bad[:5]})")
        return cls("".join(tokens[n:]))
