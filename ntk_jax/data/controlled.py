"""A controlled data-selection benchmark where the truth is known (ntk_jax issue 4, item 8).

The target skill is **flipped sentiment**: ``"the <noun> was <adj>?"`` is answered
``"neg"`` when the adjective is positive and ``"pos"`` when it is negative, the opposite
of what the embedded default model was pre-trained on (:func:`ntk_jax.data.synthetic.
task_sentiment`), so fine-tuning has something to learn. Adjectives are the pre-training
sentiment words (:data:`~ntk_jax.data.synthetic.POSITIVE_WORDS` /
:data:`~ntk_jax.data.synthetic.NEGATIVE_WORDS`), nouns come from :data:`NOUNS` (a superset
of the pre-training nouns, so the target template has ``len(NOUNS) * 16`` distinct
prompts).

* ``domain``: ``n_domain`` target records (the small set a selector starts from).
* ``test``: ``n_test`` held-out target records; their prompts are disjoint from the domain
  prompts and from every pool prompt in the target template.
* ``pool``: ``n_pool_per_family`` records from each family of :data:`FAMILIES`:

  ==========================  ============  ======================================  =========
  family                      role          example                                 response
  ==========================  ============  ======================================  =========
  ``flipped_is``              useful        ``the film is great?``                  ``neg``
  ``flipped_my``              useful        ``my song was dull?``                   ``pos``
  ``sentiment``               conflicting   ``the movie was great?`` (target tmpl)  ``pos``
  ``sentiment_is``            conflicting   ``the film is great?``                  ``pos``
  ``add`` ... ``parity``      unrelated     the pre-training tasks (not sentiment)
  ``add_spaced``, ``noise``   unrelated     :mod:`ntk_jax.data.synthetic` variants
  ==========================  ============  ======================================  =========

  *useful* families teach the target rule (flip the polarity) under other surface
  templates, never copies of domain or test records; *conflicting* families are the same
  inputs (in the target template and another one) with the original, opposite labels;
  *unrelated* families are the other tasks. With the default 13 families the useful share
  of the pool is 2/13 ≈ 15 %.

Every sentiment-style record carries ``"options": ["neg", "pos"]`` and ``"label"`` (its
response) so accuracy = argmax of the log-likelihood over the options can be computed;
every record has ``"task"`` (= its family), pool records also ``"family"`` and ``"role"``
(domain and test records have ``role="domain"``, ``family=TARGET``). Ids: ``dom-{i}``,
``test-{i}``, ``pool-{family}-{i}``; the pool is shuffled (deterministically). Everything is
deterministic in ``seed`` (each part has its own :class:`numpy.random.SeedSequence` stream).

The benchmark's claim, checked empirically by ``tests/test_controlled.py`` and reported in
the issue-4 hand-off: LoRA fine-tuning of the embedded pre-trained model on
``domain ∪ useful`` beats ``domain`` alone and ``domain ∪ random pool items`` on the test
set, while ``domain ∪ conflicting`` is worse than ``domain`` alone. Measured with the
default pre-trained model (``configs/default.py`` architecture), LoRA r=8 on q/v,
:data:`FINETUNE` (150 steps, lr 5e-3), 32 domain + K=256 added items, 256 test records,
mean over seeds 0-2 (test loss / option accuracy):

===============================  ==========  ========
training set                     test loss   accuracy
===============================  ==========  ========
(no fine-tuning)                 2.00        0.02
domain only                      0.275       0.76
domain ∪ 256 useful              0.027       0.97
domain ∪ 256 random pool items   0.227       0.53
domain ∪ 256 conflicting         0.756       0.10
===============================  ==========  ========

(The pre-training fixture of ``tests/conftest.py`` — hidden size 32 — gives the same
ordering: 0.296/0.64, 0.122/0.87, 0.231/0.47, 0.486/0.12.) Random items lower the
loss a little (they regularise the 32-example fit) but cut accuracy; the target rule is
learnt from flipped examples only.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from ntk_jax.data.synthetic import NEGATIVE_WORDS, POSITIVE_WORDS, SENTIMENT_NOUNS, generate_task, write_jsonl

__all__ = [
    "TARGET",
    "NOUNS",
    "TEMPLATES",
    "FAMILIES",
    "VARIANTS",
    "ROLES",
    "OPTIONS",
    "FINETUNE",
    "ControlledBenchmark",
    "make_controlled_benchmark",
    "write_controlled_benchmark",
    "load_controlled_benchmark",
]

TARGET = "flipped"
"""Family name of the target domain (domain and test records)."""

NOUNS: tuple[str, ...] = SENTIMENT_NOUNS + (
    "cake", "tea", "park", "trip", "hotel", "car", "phone", "shoe", "room", "class", "talk", "drink",
    "bike", "town", "beach", "view", "shirt", "album", "poem", "dish", "bread", "team", "story")
"""Nouns of the sentiment-style templates (the 9 pre-training nouns first)."""

TEMPLATES: dict[str, str] = {
    "was": "the {noun} was {adj}?",   # the target template (= the pre-training sentiment template)
    "is": "the {noun} is {adj}?",
    "my": "my {noun} was {adj}?",
}
"""Surface templates of the sentiment-style families."""

ROLES = ("useful", "unrelated", "conflicting", "domain")

# family -> (role, template, labels flipped?) for sentiment-style families, or
# (role, synthetic task name, None) for the unrelated ones.
FAMILIES: dict[str, tuple[str, str, bool | None]] = {
    "flipped_is": ("useful", "is", True),
    "flipped_my": ("useful", "my", True),
    "sentiment": ("conflicting", "was", False),
    "sentiment_is": ("conflicting", "is", False),
    "add": ("unrelated", "add", None),
    "sub": ("unrelated", "sub", None),
    "copy": ("unrelated", "copy", None),
    "reverse": ("unrelated", "reverse", None),
    "sort": ("unrelated", "sort", None),
    "count": ("unrelated", "count", None),
    "parity": ("unrelated", "parity", None),
    "add_spaced": ("unrelated", "add_spaced", None),
    "noise": ("unrelated", "noise", None),
}
"""Pool families: name -> (role, template or synthetic task, flipped labels?)."""

VARIANTS: dict[str, tuple[str, ...]] = {
    "contradicting": tuple(FAMILIES),
    "no_conflict": tuple(f for f, (role, _, _) in FAMILIES.items() if role != "conflicting"),
}
"""Named pool compositions (the ``variant`` argument of :func:`make_controlled_benchmark`):

* ``"contradicting"`` (default): all 13 families. The conflicting families are the target's
  own inputs with the opposite labels — the pool holds contradicting pairs (``the film is
  great? neg`` in ``flipped_is`` and ``the film is great? pos`` in ``sentiment_is``). A
  selector that does not look at the responses cannot tell them apart; this is the stress
  test of label-blind scores (the sum-of-logits kernel of NTK-Selector, embeddings).
* ``"no_conflict"``: the 11 useful and unrelated families only — the setting of the
  NTK-Selector paper (a general pool in which a small part is relevant, no contradicting
  copies); the useful share is 2/11 ≈ 18 %.
"""

OPTIONS = ["neg", "pos"]

FINETUNE: dict = dict(learning_rate=5e-3, warmup_steps=5, total_steps=150, schedule="linear", weight_decay=0.0,
                      grad_clip=1.0, batch_size=16)
"""LoRA fine-tuning settings (``TrainConfig`` fields) under which the benchmark's effect was
measured (see the module docstring); with fewer steps / a lower rate the domain-only fit is
weaker and the gaps differ."""
_TARGET_TEMPLATE = "was"


@dataclasses.dataclass
class ControlledBenchmark:
    """``domain``, ``test``, ``pool``: lists of records (see the module docstring);
    ``roles``: pool family -> role; ``target``: the target family name; ``meta``: how it
    was made (seed, sizes, templates)."""

    domain: list[dict]
    test: list[dict]
    pool: list[dict]
    roles: dict[str, str]
    target: str = TARGET
    meta: dict = dataclasses.field(default_factory=dict)

    def family_ids(self, role: str) -> list[str]:
        """Ids of the pool records with ``role`` (in pool order)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {ROLES}")
        return [r["id"] for r in self.pool if r["role"] == role]


def _stream(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(f"controlled/{name}".encode())]))


def _label(adj: str, flipped: bool) -> str:
    positive = adj in POSITIVE_WORDS
    return "neg" if positive == flipped else "pos"


def _sentiment_record(rid: str, family: str, template: str, noun: str, adj: str, flipped: bool) -> dict:
    response = _label(adj, flipped)
    return {"id": rid, "task": family, "prompt": TEMPLATES[template].format(noun=noun, adj=adj),
            "response": response, "label": response, "options": list(OPTIONS)}


def _all_pairs() -> list[tuple[str, str]]:
    """Every (noun, adjective) pair, positive and negative adjectives interleaved."""
    adjs = [a for pair in zip(POSITIVE_WORDS, NEGATIVE_WORDS) for a in pair]
    return [(n, a) for n in NOUNS for a in adjs]


def _check_count(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def make_controlled_benchmark(seed: int = 0, *, n_domain: int = 32, n_test: int = 256,
                              n_pool_per_family: int | Mapping[str, int] = 256,
                              families: Sequence[str] | None = None,
                              variant: str | None = None) -> ControlledBenchmark:
    """The benchmark for ``seed`` (see the module docstring).

    Args:
      seed: everything is a deterministic function of it.
      n_domain: target records in the domain set (distinct prompts).
      n_test: held-out target records (distinct prompts, disjoint from the domain's and
        from the target-template pool families').
      n_pool_per_family: records per pool family, or a mapping family -> count.
      families: pool families to include (default: all of :data:`FAMILIES`).
      variant: a name of :data:`VARIANTS` (the families it lists); not together with
        ``families``.

    Returns:
      a :class:`ControlledBenchmark`; ``pool`` is shuffled, ids are unique.

    Raises ValueError if ``n_domain + n_test`` exceeds the number of distinct target
    prompts (``len(NOUNS) * 16``) or a family is unknown.
    """
    n_domain = _check_count(n_domain, "n_domain", 1)
    n_test = _check_count(n_test, "n_test", 1)
    if variant is not None:
        if families is not None:
            raise ValueError("pass either families or variant, not both")
        if variant not in VARIANTS:
            raise ValueError(f"unknown benchmark variant {variant!r}; choose one of {sorted(VARIANTS)}")
        families = VARIANTS[variant]
    names = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"families must be distinct names from {sorted(FAMILIES)}; got {names}")
    if isinstance(n_pool_per_family, Mapping):
        extra = sorted(set(n_pool_per_family) - set(names))
        if extra:
            raise ValueError(f"n_pool_per_family names families not in the pool: {extra}")
        counts = {f: _check_count(n_pool_per_family.get(f, 0), f"n_pool_per_family[{f!r}]") for f in names}
    else:
        k = _check_count(n_pool_per_family, "n_pool_per_family")
        counts = {f: k for f in names}

    pairs = _all_pairs()
    if n_domain + n_test > len(pairs) - 1:
        raise ValueError(f"n_domain + n_test = {n_domain + n_test} leaves no target-template prompt for the "
                         f"pool: there are {len(pairs)} distinct target prompts")
    order = _stream(seed, "split").permutation(len(pairs))
    test_pairs = [pairs[i] for i in order[:n_test]]
    domain_pairs = [pairs[i] for i in order[n_test:n_test + n_domain]]
    rest_pairs = [pairs[i] for i in order[n_test + n_domain:]]  # target-template pool prompts

    def target_records(prefix: str, chosen):
        return [{**_sentiment_record(f"{prefix}-{i}", TARGET, _TARGET_TEMPLATE, n, a, True),
                 "family": TARGET, "role": "domain"} for i, (n, a) in enumerate(chosen)]

    domain = target_records("dom", domain_pairs)
    test = target_records("test", test_pairs)

    pool: list[dict] = []
    for family in names:
        role, source, flipped = FAMILIES[family]
        k = counts[family]
        if flipped is None:
            recs = generate_task(source, k, seed=int(seed) * 1000 + 17)
            recs = [{"id": f"pool-{family}-{i}", "task": family, "prompt": r["prompt"], "response": r["response"]}
                    for i, r in enumerate(recs)]
        else:
            rng = _stream(seed, f"family/{family}")
            # The target template draws only from prompts that are neither test nor domain.
            candidates = rest_pairs if source == _TARGET_TEMPLATE else pairs
            idx = rng.integers(len(candidates), size=k)
            recs = [_sentiment_record(f"pool-{family}-{i}", family, source, *candidates[j], flipped)
                    for i, j in enumerate(idx)]
        pool.extend({**r, "family": family, "role": role} for r in recs)
    perm = _stream(seed, "pool/shuffle").permutation(len(pool))
    pool = [pool[int(i)] for i in perm]
    roles = {f: FAMILIES[f][0] for f in names}
    meta = {"seed": int(seed), "variant": variant, "target": TARGET, "target_template": TEMPLATES[_TARGET_TEMPLATE],
            "n_domain": n_domain, "n_test": n_test, "n_pool": len(pool), "pool_counts": counts,
            "roles": roles, "templates": dict(TEMPLATES), "options": list(OPTIONS),
            "useful_share": (sum(c for f, c in counts.items() if roles[f] == "useful") / len(pool)) if pool else 0.0}
    return ControlledBenchmark(domain=domain, test=test, pool=pool, roles=roles, meta=meta)


def write_controlled_benchmark(directory: str | os.PathLike, bench: ControlledBenchmark) -> dict[str, str]:
    """Writes ``domain.jsonl``, ``test.jsonl``, ``pool.jsonl`` and ``meta.json`` into
    ``directory`` (created); returns name -> path."""
    from ntk_jax.utils import write_json

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f"{name}.jsonl") for name in ("domain", "test", "pool")}
    for name, path in paths.items():
        tmp = path + ".tmp"
        write_jsonl(getattr(bench, name), tmp)
        os.replace(tmp, path)
    paths["meta"] = os.path.join(directory, "meta.json")
    write_json(paths["meta"], {**bench.meta, "target": bench.target, "roles": bench.roles})
    return paths


def load_controlled_benchmark(directory: str | os.PathLike) -> ControlledBenchmark:
    """Reads what :func:`write_controlled_benchmark` wrote (validating every record)."""
    from ntk_jax.data.records import read_records
    from ntk_jax.utils import read_json

    directory = os.fspath(directory)
    meta = read_json(os.path.join(directory, "meta.json"))
    parts = {name: read_records(os.path.join(directory, f"{name}.jsonl")) for name in ("domain", "test", "pool")}
    return ControlledBenchmark(roles=dict(meta["roles"]), target=meta["target"], meta=meta, **parts)
