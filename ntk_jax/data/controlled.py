"""Controlled data-selection benchmarks where the truth is known: a registry of targets.

Selection quality has to be shown on tasks the selection method was not built around, so the
benchmark is a suite: :data:`TARGETS` maps a target name to a :class:`TargetSpec`, and
:func:`make_benchmark` builds any of them (docs/theory.md §7; how the selection jobs use it:
``docs/selection.md``). Every target has

* its own surface form (``template``) and rule; ``domain`` (``n_domain`` records) and
  ``test`` (``n_test`` held-out records) are distinct prompts of that template; test prompts
  are disjoint from the domain's and from every pool prompt;
* ``pool``: ``n_pool_per_family`` records per family, three roles:

  - *useful* (≥ 2 families): the target's rule under other surface templates (never a
    domain or test prompt, never the target template);
  - *unrelated*: other tasks (the synthetic tasks of :mod:`ntk_jax.data.synthetic`, or another
    target's task), chosen so that response lengths differ from the useful ones;
  - *conflicting* (≥ 1): the target's exact template and input distribution (drawn by the
    same generator as the domain prompts) answered by another, contradicting rule; a second
    conflicting family puts that rule on a useful family's template, so the pool holds
    contradicting pairs (same prompt, two responses).

* two variants (:data:`VARIANT_NAMES`): ``"contradicting"`` (all families; the stress test of
  label-blind scores such as the sum-of-logits kernel of NTK-Selector or embeddings, which
  cannot tell a useful from a conflicting record) and ``"no_conflict"`` (no conflicting family:
  the NTK-Selector paper's setting, a general pool in which a small part is relevant). Useful
  share of the pool: 2/13 and 2/11 for ``flipped_sentiment``, 2/12 and 2/10 for the others.

The targets (mean response length over the pool families of each role, seed 0, 64 records a
family; ``meta["mean_response_length"]`` has the numbers of every built benchmark):

=====================  ========================  ==========================  ========  =====================
target                 kind                      template -> response        useful /  useful families;
                                                                             unrelat.  conflicting rule
=====================  ========================  ==========================  ========  =====================
``flipped_sentiment``  classification            ``the film was great?`` ->  3.0 /     ``is``, ``my``
                       (options ``neg``/``pos``) ``neg`` (flipped labels)    3.3       templates; original
                                                                                       labels
``double``             arithmetic                ``860 doubled=`` ->         3.5 /     ``860 doubled =``,
                                                 ``1720``                    4.3       ``double 860=``; a // 2
``mirror``             string_transform          ``mirror abc:`` ->          9.1 /     ``mirror abc>``,
                                                 ``abccba``                  2.3       ``mirror of abc:``;
                                                                                       ``cbaabc``
``sort_words``         known_rule_new_template   ``3142 in order?`` ->       5.1 /     ``3142 ordered?``,
                                                 ``1234``                    3.1       ``3142 in order=``;
                                                                                       descending
``last_letter``        character_lookup          ``last of gtoffy?`` ->      1.0 /     ``last of gtoffy ?``,
                                                 ``y``                       4.3       ``final of gtoffy?``;
                                                                                       first letter
=====================  ========================  ==========================  ========  =====================

So ``mirror`` and ``sort_words`` have useful responses longer than the unrelated ones,
``last_letter`` shorter, ``double`` a little shorter (by under one token: ``"similar"``) (``TargetSpec.length_contrast``). ``flipped_sentiment``
keeps exactly the records of the original benchmark (:func:`make_controlled_benchmark`,
:data:`FAMILIES`, :data:`VARIANTS`, :data:`TEMPLATES`, :data:`NOUNS`; its domain/test family is
``"flipped"``); the others are built by one generic builder from their spec.

Records: ``id`` (``dom-{i}``, ``test-{i}``, ``pool-{family}-{i}``), ``task`` (= family),
``prompt``, ``response``, ``family``, ``role`` (``useful``/``unrelated``/``conflicting``;
domain and test records ``role="domain"``, ``family`` = the target's domain family) and, for a
target with options, ``"options"`` and ``"label"`` on every record of the target's inputs.
Everything fits ``max_len`` 32 with the character tokenizer and is deterministic in ``seed``
(each part its own :class:`numpy.random.SeedSequence` stream); the pool is shuffled.
``ControlledBenchmark.meta`` holds ``target``, ``kind``, ``variant``, ``seed``, sizes,
``pool_counts``, ``roles``, ``useful_share``, ``family_templates``, ``options`` and
``mean_response_length`` (per role, and ``"domain"`` for domain ∪ test).

Adding a target is one :func:`register_target` call with a :class:`TargetSpec` (input
generator, template, rule, families built with :func:`useful`, :func:`conflicting`,
:func:`unrelated`); nothing else changes.

Learnability at the benchmark's budget — the default pre-trained model (``configs/default.py``
architecture), a fresh LoRA r=8 on q/v, :data:`FINETUNE` (150 steps, lr 5e-3), 32 domain
records plus N=64 pool records (``oracle_*``: of one role, from the contradicting pool;
"random": the ``random`` arm on the no_conflict pool), 256 test records; mean test loss (± std)
over seeds 0-2 from the suite run of ``docs/selection.md``, option accuracy where the target has
options; "base" is the pre-trained model without fine-tuning (seed 0's test records):

=====================  =====  =============  =============  ==============  =============
target                 base   domain only    ∪ 64 useful    ∪ 64 conflict.  ∪ 64 random
=====================  =====  =============  =============  ==============  =============
``flipped_sentiment``  2.00   0.275 ± 0.076  0.104 ± 0.038  0.644 ± 0.054   0.283 ± 0.021
  (accuracy)           0.03   0.757          0.878          0.371           0.67
``double``             4.87   2.126 ± 0.182  1.509 ± 0.025  2.054 ± 0.044   1.791 ± 0.106
``mirror``             8.05   3.470 ± 0.072  2.421 ± 0.018  2.897 ± 0.053   3.081 ± 0.139
``sort_words``         4.52   0.987 ± 0.030  0.625 ± 0.017  1.945 ± 0.082   0.943 ± 0.041
``last_letter``        5.33   1.582 ± 0.339  0.557 ± 0.105  2.400 ± 0.102   1.616 ± 0.247
=====================  =====  =============  =============  ==============  =============

Useful items lower the test loss by 29-65 % against the domain alone on every target, clearly
more than 64 random pool records do (so downstream loss can tell a good selector from a bad
one), and conflicting items are always worse than useful ones. On ``double`` and ``mirror``
conflicting items still beat the domain alone: 32 records overfit in 150 steps, and records in
the target template regularise the format even with wrong answers.

Screened out while building the suite (measured the same way, seed 0 or seeds 0-2):

* ``add_words`` (``12 plus 7=`` -> ``19``, useful ``12 plus 7 =`` / ``12 and 7=``) and
  ``count_words`` (``how many a in abca?`` -> ``2``, the pre-trained count under a new
  template) were in the first version of the suite: ``oracle_useful`` beat domain-only by 29 /
  41 %, but 64 *random* pool records did as well or better (test loss 1.79 vs 1.91 and 0.88 vs
  0.92; at 60 steps or lr 1.5e-3: 1.50 vs 1.46-1.48, 0.82 vs 0.79-0.81). The tiny model
  cannot learn two-digit addition from a few hundred records (its loss on the pre-training
  ``a+b=`` task is 1.13), and it already counts, so the useful records only teach the format,
  which any extra records regularise as well — no selector could win there. ``double`` and
  ``last_letter`` replaced them (useful vs random: 1.45 vs 1.75, 0.62 vs 1.98 in the screen).
  Also screened: the successor ``a next=`` and ``a plus b=`` with b < 10 (useful vs random
  1.48 vs 1.57, 1.63 vs 1.67: too close), and the length ``how long is s?`` (learnt from the
  domain alone).
* useful templates far from the target's (e.g. ``pal:abc>`` for ``mirror``, ``sorted 3142:``
  for ``sort_words``) gave only 8-12 % less loss — this tiny model transfers a rule across near
  templates only; a pre-training-style template (``back:abc>`` for reverse) is learnt from the
  domain alone (-5 % from useful items); yes/no targets ("is c in s?", "is the number of ones
  odd?") lowered the loss but stayed at chance accuracy, so classification beyond flipped
  sentiment is not in the suite.
"""
from __future__ import annotations

import dataclasses
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from ntk_jax.data.synthetic import NEGATIVE_WORDS, POSITIVE_WORDS, SENTIMENT_NOUNS, TASKS, generate_task, write_jsonl

__all__ = [
    "TARGETS",
    "TargetSpec",
    "FamilySpec",
    "useful",
    "conflicting",
    "unrelated",
    "register_target",
    "get_target",
    "make_benchmark",
    "VARIANT_NAMES",
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

ROLES = ("useful", "unrelated", "conflicting", "domain")
POOL_ROLES = ("useful", "unrelated", "conflicting")

VARIANT_NAMES: tuple[str, ...] = ("contradicting", "no_conflict")
"""The pool compositions every target has (see the module docstring)."""

FINETUNE: dict = dict(learning_rate=5e-3, warmup_steps=5, total_steps=150, schedule="linear", weight_decay=0.0,
                      grad_clip=1.0, batch_size=16)
"""LoRA fine-tuning settings (``TrainConfig`` fields) under which the benchmark's effects were
measured (see the module docstring); with fewer steps / a lower rate the domain-only fit is
weaker and the gaps differ."""


# ============================================================================ flipped sentiment
TARGET = "flipped"
"""Family name of the ``flipped_sentiment`` target's domain and test records."""

NOUNS: tuple[str, ...] = SENTIMENT_NOUNS + (
    "cake", "tea", "park", "trip", "hotel", "car", "phone", "shoe", "room", "class", "talk", "drink",
    "bike", "town", "beach", "view", "shirt", "album", "poem", "dish", "bread", "team", "story")
"""Nouns of the sentiment-style templates (the 9 pre-training nouns first)."""

TEMPLATES: dict[str, str] = {
    "was": "the {noun} was {adj}?",   # the target template (= the pre-training sentiment template)
    "is": "the {noun} is {adj}?",
    "my": "my {noun} was {adj}?",
}
"""Surface templates of the ``flipped_sentiment`` families."""

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
"""Pool families of ``flipped_sentiment``: name -> (role, template or synthetic task, flipped labels?)."""

VARIANTS: dict[str, tuple[str, ...]] = {
    "contradicting": tuple(FAMILIES),
    "no_conflict": tuple(f for f, (role, _, _) in FAMILIES.items() if role != "conflicting"),
}
"""``flipped_sentiment``'s pool families per variant (every target: ``TargetSpec.variants``):

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
_TARGET_TEMPLATE = "was"


@dataclasses.dataclass
class ControlledBenchmark:
    """``domain``, ``test``, ``pool``: lists of records (see the module docstring);
    ``roles``: pool family -> role; ``target``: the target's name in :data:`TARGETS`;
    ``meta``: how it was made (target, variant, seed, sizes, templates, response lengths);
    ``domain_family``: the ``family`` / ``task`` of the domain and test records (the target's
    name, except ``"flipped"`` for ``flipped_sentiment``)."""

    domain: list[dict]
    test: list[dict]
    pool: list[dict]
    roles: dict[str, str]
    target: str = "flipped_sentiment"
    meta: dict = dataclasses.field(default_factory=dict)
    domain_family: str = TARGET

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


def _build_flipped(spec: "TargetSpec", seed: int, n_domain: int, n_test: int, counts: dict[str, int],
                   variant: str | None) -> ControlledBenchmark:
    """The ``flipped_sentiment`` benchmark (the records of the original benchmark, unchanged)."""
    names = list(counts)
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
    meta = _meta(spec, seed, variant, domain, test, pool, counts, roles,
                 templates={f: (TEMPLATES[s] if fl is not None else f"task:{s}")
                            for f, (_, s, fl) in FAMILIES.items() if f in counts})
    meta["templates"] = dict(TEMPLATES)  # as before the registry
    return ControlledBenchmark(domain=domain, test=test, pool=pool, roles=roles, target=spec.name, meta=meta,
                               domain_family=TARGET)


# ============================================================================ the registry
class FamilySpec(NamedTuple):
    """One pool family of a :class:`TargetSpec` (a tuple whose first item is the role).

    * ``template``: format string of the prompt over the input fields (``None``: the
      target's template — the family then shares the target's exact input distribution);
    * ``rule``: ``fields -> response`` (``None``: the target's rule);
    * ``task``: instead of template/rule, a task of :data:`ntk_jax.data.synthetic.TASKS`
      whose generator gives prompt and response;
    * ``draw``: ``rng -> fields``, the inputs (``None``: the target's input generator).
    """

    role: str
    template: str | None = None
    rule: Callable[[dict], str] | None = None
    task: str | None = None
    draw: Callable[[np.random.Generator], dict] | None = None


def useful(template: str, rule: Callable[[dict], str] | None = None) -> FamilySpec:
    """A useful family: the target's rule (or ``rule``) on the target's inputs under another
    ``template``."""
    return FamilySpec("useful", template, rule)


def conflicting(rule: Callable[[dict], str], template: str | None = None) -> FamilySpec:
    """A conflicting family: the target's inputs (in its exact template unless ``template``)
    answered by another ``rule``."""
    return FamilySpec("conflicting", template, rule)


def unrelated(task: str | None = None, *, template: str | None = None, rule=None, draw=None) -> FamilySpec:
    """An unrelated family: a synthetic ``task``, or ``template``/``rule`` over its own ``draw``."""
    if task is None and (template is None or rule is None or draw is None):
        raise ValueError("an unrelated family needs a synthetic task or template, rule and draw")
    return FamilySpec("unrelated", template, rule, task, draw)


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A selection target of :data:`TARGETS` (see the module docstring).

    Attributes:
      name: registry key.
      kind: what sort of skill (``classification``, ``arithmetic``, ``string_transform``,
        ``known_rule_new_template``, ...).
      description: one line.
      template: the target's surface form (format string over the input fields); domain, test
        and the conflicting family of the same template are drawn from it with :attr:`draw`.
      draw: ``rng -> fields`` (the target's input distribution).
      rule: ``fields -> response`` (the target's rule).
      families: pool family -> :class:`FamilySpec` (``flipped_sentiment``: the legacy tuples of
        :data:`FAMILIES`); every value is a tuple ``(role, ...)``.
      options: the candidate responses of a classification target (records of families on
        the target's inputs then carry ``"options"`` and ``"label"``), else ``None``.
      fields: regex of each input field, to parse prompts (:meth:`parse`).
      length_contrast: ``"useful_longer"``, ``"useful_shorter"`` or ``"similar"``: mean
        response length of the useful families vs the unrelated ones (``meta`` has the numbers).
      domain_family: ``family``/``task`` of domain and test records (default: ``name``).
      build: a custom builder (only ``flipped_sentiment``, whose records predate the registry).
    """

    name: str
    kind: str
    description: str
    template: str
    families: Mapping[str, tuple]
    draw: Callable[[np.random.Generator], dict] | None = None
    rule: Callable[[dict], str] | None = None
    options: tuple[str, ...] | None = None
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    length_contrast: str = "similar"
    domain_family: str | None = None
    build: Callable | None = None

    @property
    def has_options(self) -> bool:
        return self.options is not None

    @property
    def family_name(self) -> str:
        """``family`` / ``task`` of the domain and test records."""
        return self.domain_family or self.name

    @property
    def roles(self) -> dict[str, str]:
        return {f: spec[0] for f, spec in self.families.items()}

    @property
    def variants(self) -> dict[str, tuple[str, ...]]:
        """variant -> pool families (:data:`VARIANT_NAMES`)."""
        return {"contradicting": tuple(self.families),
                "no_conflict": tuple(f for f, spec in self.families.items() if spec[0] != "conflicting")}

    def variant_families(self, variant: str) -> tuple[str, ...]:
        try:
            return self.variants[variant]
        except (KeyError, TypeError):
            raise ValueError(f"unknown benchmark variant {variant!r}; choose one of {list(VARIANT_NAMES)}") from None

    def family_template(self, family: str) -> str:
        """The prompt template of a pool family (``"task:<name>"`` for a synthetic task)."""
        spec = self.families[family]
        if isinstance(spec, FamilySpec):
            return f"task:{spec.task}" if spec.task else (spec.template or self.template)
        _, source, flipped = spec
        return TEMPLATES[source] if flipped is not None else f"task:{source}"

    def shares_target_template(self, family: str) -> bool:
        """Whether ``family``'s prompts are drawn like the domain's (same template and inputs)."""
        spec = self.families[family]
        if isinstance(spec, FamilySpec):
            return spec.task is None and spec.draw is None and spec.template in (None, self.template)
        return spec[2] is not None and spec[1] == _TARGET_TEMPLATE

    def template_regex(self, template: str | None = None) -> re.Pattern:
        """A regex matching exactly the prompts of ``template`` (default: the target's), one
        named group per field."""
        template = self.template if template is None else template
        out, pos = [], 0
        for m in re.finditer(r"\{(\w+)\}", template):
            out.append(re.escape(template[pos:m.start()]))
            out.append(f"(?P<{m.group(1)}>{self.fields.get(m.group(1), '.+?')})")
            pos = m.end()
        out.append(re.escape(template[pos:]))
        return re.compile("".join(out) + r"\Z")

    def parse(self, prompt: str, template: str | None = None) -> dict | None:
        """The fields of ``prompt`` under ``template`` (default: the target's), or ``None``."""
        m = self.template_regex(template).match(prompt)
        return m.groupdict() if m else None


TARGETS: dict[str, TargetSpec] = {}
"""Target name -> :class:`TargetSpec`; :func:`register_target` adds one."""


def register_target(spec: TargetSpec) -> TargetSpec:
    """Adds ``spec`` to :data:`TARGETS` (ValueError on a duplicate name or an ill-formed spec);
    returns it. Registering a target is this one call: :func:`make_benchmark` needs nothing else."""
    if not isinstance(spec, TargetSpec):
        raise ValueError(f"register_target needs a TargetSpec, got {type(spec).__name__}")
    if spec.name in TARGETS:
        raise ValueError(f"target {spec.name!r} is already registered")
    roles = [f[0] for f in spec.families.values()]
    bad = sorted({r for r in roles if r not in POOL_ROLES})
    if bad:
        raise ValueError(f"target {spec.name!r}: unknown family roles {bad}; roles: {list(POOL_ROLES)}")
    if "useful" not in roles or "unrelated" not in roles or "conflicting" not in roles:
        raise ValueError(f"target {spec.name!r} needs useful, unrelated and conflicting families")
    if spec.build is None:
        if spec.draw is None or spec.rule is None:
            raise ValueError(f"target {spec.name!r} needs draw and rule (or a custom build)")
        for f, fam in spec.families.items():
            if not isinstance(fam, FamilySpec):
                raise ValueError(f"target {spec.name!r}: family {f!r} must be a FamilySpec")
            if fam.task is not None and fam.task not in TASKS:
                raise ValueError(f"target {spec.name!r}: family {f!r} names unknown task {fam.task!r}")
        if not any(spec.shares_target_template(f) and fam[0] == "conflicting" for f, fam in spec.families.items()):
            raise ValueError(f"target {spec.name!r} needs a conflicting family in the target template")
    if spec.length_contrast not in ("useful_longer", "useful_shorter", "similar"):
        raise ValueError(f"target {spec.name!r}: length_contrast must be useful_longer, useful_shorter or similar")
    TARGETS[spec.name] = spec
    return spec


def get_target(name: str) -> TargetSpec:
    """The registered target ``name``; ValueError naming the choices otherwise."""
    try:
        return TARGETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}") from None


# ----------------------------------------------------------------------------- building
_MAX_TRIES = 1000  # draws per record before a template is declared exhausted


def _mean_len(records: list[dict]) -> float | None:
    return float(np.mean([len(r["response"]) for r in records])) if records else None


def _meta(spec: TargetSpec, seed, variant, domain, test, pool, counts, roles, templates) -> dict:
    by_role = {role: [r for r in pool if r["role"] == role] for role in POOL_ROLES}
    lengths = {"domain": _mean_len(domain + test)}
    lengths.update({role: _mean_len(recs) for role, recs in by_role.items() if recs})
    return {"target": spec.name, "kind": spec.kind, "variant": variant, "seed": int(seed),
            "domain_family": spec.family_name, "target_template": spec.template,
            "n_domain": len(domain), "n_test": len(test), "n_pool": len(pool), "pool_counts": dict(counts),
            "roles": dict(roles), "family_templates": templates,
            "options": list(spec.options) if spec.options is not None else None,
            "useful_share": (len(by_role["useful"]) / len(pool)) if pool else 0.0,
            "mean_response_length": lengths, "length_contrast": spec.length_contrast}


def _record(spec: TargetSpec, rid: str, family: str, prompt: str, response: str, with_options: bool) -> dict:
    rec = {"id": rid, "task": family, "prompt": prompt, "response": response}
    if with_options:
        if response not in spec.options:
            raise ValueError(f"target {spec.name!r}: family {family!r} answered {response!r}, not one of "
                             f"the options {spec.options}")
        rec.update(label=response, options=list(spec.options))
    return rec


def _build_registered(spec: TargetSpec, seed: int, n_domain: int, n_test: int, counts: dict[str, int],
                      variant: str | None) -> ControlledBenchmark:
    """Domain/test: distinct target-template prompts (test first); pool: each family drawn
    from its own stream, rejecting any prompt of the domain or test set."""
    rng = _stream(seed, f"{spec.name}/split")
    need = n_domain + n_test
    chosen: dict[str, dict] = {}
    tries = 0
    while len(chosen) < need:
        fields = spec.draw(rng)
        prompt = spec.template.format(**fields)
        if prompt in chosen:
            tries += 1
            if tries > _MAX_TRIES + 20 * need:
                raise ValueError(f"target {spec.name!r}: could not draw n_domain + n_test = {need} distinct "
                                 f"target prompts (found {len(chosen)})")
            continue
        chosen[prompt] = fields
    items = list(chosen.items())
    reserved = set(chosen)
    fam_name = spec.family_name

    def target_records(prefix, part):
        return [{**_record(spec, f"{prefix}-{i}", fam_name, p, spec.rule(f), spec.has_options),
                 "family": fam_name, "role": "domain"} for i, (p, f) in enumerate(part)]

    test = target_records("test", items[:n_test])
    domain = target_records("dom", items[n_test:])

    pool: list[dict] = []
    for family, k in counts.items():
        fam: FamilySpec = spec.families[family]
        frng = _stream(seed, f"{spec.name}/family/{family}")
        with_options = spec.has_options and fam.task is None and fam.draw is None
        template = fam.template or spec.template
        rule = fam.rule or spec.rule
        draw = fam.draw or spec.draw
        for i in range(k):
            for _ in range(_MAX_TRIES):
                if fam.task is not None:
                    prompt, response = TASKS[fam.task](frng)
                else:
                    fields = draw(frng)
                    prompt, response = template.format(**fields), rule(fields)
                if prompt not in reserved:
                    break
            else:
                raise ValueError(f"target {spec.name!r}: family {family!r} found no prompt outside the domain and "
                                 f"test sets in {_MAX_TRIES} draws (lower n_domain + n_test)")
            pool.append({**_record(spec, f"pool-{family}-{i}", family, prompt, response, with_options),
                         "family": family, "role": fam.role})
    perm = _stream(seed, f"{spec.name}/pool/shuffle").permutation(len(pool))
    pool = [pool[int(i)] for i in perm]
    roles = {f: spec.families[f][0] for f in counts}
    meta = _meta(spec, seed, variant, domain, test, pool, counts, roles,
                 templates={f: spec.family_template(f) for f in counts})
    return ControlledBenchmark(domain=domain, test=test, pool=pool, roles=roles, target=spec.name, meta=meta,
                               domain_family=fam_name)


def _resolve_counts(spec: TargetSpec, names: Sequence[str], n_pool_per_family) -> dict[str, int]:
    names = list(names)
    unknown = [f for f in names if f not in spec.families]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"families must be distinct names from {sorted(spec.families)}; got {names}")
    if isinstance(n_pool_per_family, Mapping):
        extra = sorted(set(n_pool_per_family) - set(names))
        if extra:
            raise ValueError(f"n_pool_per_family names families not in the pool: {extra}; "
                             f"the pool's families: {names}")
        return {f: _check_count(n_pool_per_family.get(f, 0), f"n_pool_per_family[{f!r}]") for f in names}
    k = _check_count(n_pool_per_family, "n_pool_per_family")
    return {f: k for f in names}


def _make(spec: TargetSpec, seed, n_domain, n_test, n_pool_per_family, names, variant) -> ControlledBenchmark:
    n_domain = _check_count(n_domain, "n_domain", 1)
    n_test = _check_count(n_test, "n_test", 1)
    counts = _resolve_counts(spec, names, n_pool_per_family)
    build = spec.build or _build_registered
    return build(spec, int(seed), n_domain, n_test, counts, variant)


def make_benchmark(target: str = "flipped_sentiment", seed: int = 0, *, n_domain: int = 32, n_test: int = 256,
                   n_pool_per_family: int | Mapping[str, int] = 64,
                   variant: str = "contradicting") -> ControlledBenchmark:
    """The benchmark of ``target`` (a name of :data:`TARGETS`) for ``seed``.

    Args:
      target: registry name.
      seed: everything is a deterministic function of it.
      n_domain, n_test: target records in the domain and held-out test sets (distinct
        prompts; test prompts are disjoint from the domain's and from every pool prompt).
      n_pool_per_family: records per pool family, or a mapping family -> count (families
        not named get none).
      variant: ``"contradicting"`` (all families) or ``"no_conflict"`` (no conflicting family).

    Returns a :class:`ControlledBenchmark` (pool shuffled, ids unique). ValueError for an
    unknown target, variant or family, or sizes the target's inputs cannot supply.
    """
    spec = get_target(target)
    return _make(spec, seed, n_domain, n_test, n_pool_per_family, spec.variant_families(variant), variant)


def make_controlled_benchmark(seed: int = 0, *, n_domain: int = 32, n_test: int = 256,
                              n_pool_per_family: int | Mapping[str, int] = 256,
                              families: Sequence[str] | None = None,
                              variant: str | None = None) -> ControlledBenchmark:
    """The ``flipped_sentiment`` benchmark for ``seed`` (what ``make_benchmark("flipped_sentiment",
    ...)`` gives), with an explicit family list allowed.

    Args:
      seed: everything is a deterministic function of it.
      n_domain: target records in the domain set (distinct prompts).
      n_test: held-out target records (distinct prompts, disjoint from the domain's and
        from the target-template pool families').
      n_pool_per_family: records per pool family, or a mapping family -> count.
      families: pool families to include (default: all of :data:`FAMILIES`).
      variant: a name of :data:`VARIANTS` (the families it lists); not together with
        ``families``.

    Raises ValueError if ``n_domain + n_test`` exceeds the number of distinct target
    prompts (``len(NOUNS) * 16``) or a family is unknown.
    """
    spec = TARGETS["flipped_sentiment"]
    if variant is not None:
        if families is not None:
            raise ValueError("pass either families or variant, not both")
        families = spec.variant_families(variant)
    names = list(FAMILIES) if families is None else list(families)
    return _make(spec, seed, n_domain, n_test, n_pool_per_family, names, variant)


# ----------------------------------------------------------------------------- inputs and rules
_LOWER = "abcdefghijklmnopqrstuvwxyz"


def _letters(rng: np.random.Generator, lo: int, hi: int, alphabet: str = _LOWER) -> str:
    k = int(rng.integers(lo, hi + 1))
    return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=k))


def _draw_number(rng):
    return {"a": int(rng.integers(0, 1000))}


def _draw_word(rng):
    return {"s": _letters(rng, 3, 6)}


def _draw_digits(rng):
    return {"d": _letters(rng, 3, 7, "0123456789")}


def _double(x):
    return str(2 * int(x["a"]))


def _half(x):
    return str(int(x["a"]) // 2)


def _mirror(x):
    return x["s"] + x["s"][::-1]


def _reverse_mirror(x):
    return x["s"][::-1] + x["s"]


def _ascending(x):
    return "".join(sorted(x["d"]))


def _descending(x):
    return "".join(sorted(x["d"], reverse=True))


def _last_letter(x):
    return x["s"][-1]


def _first_letter(x):
    return x["s"][0]


# Unrelated families: the other tasks, with long (copy, reverse, sort, mirror) or short
# (arithmetic, count) responses so that targets differ in the length contrast.
_LONG_UNRELATED = {
    **{f: unrelated(f) for f in ("copy", "reverse", "sort", "count", "parity", "sentiment", "noise")},
    "mirror": unrelated(template="mirror {s}:", rule=_mirror, draw=_draw_word),
}
_SHORT_UNRELATED = {f: unrelated(f) for f in ("add", "sub", "count", "parity", "sentiment", "add_spaced",
                                              "add_mod10", "noise")}


# ----------------------------------------------------------------------------- the targets
register_target(TargetSpec(
    name="flipped_sentiment", kind="classification",
    description="sentiment with the labels flipped: 'the <noun> was <adj>?' -> neg for a positive adjective",
    template=TEMPLATES["was"], families=FAMILIES, options=tuple(OPTIONS),
    fields={"noun": "[a-z]+", "adj": "[a-z]+"}, length_contrast="similar", domain_family=TARGET,
    build=_build_flipped))

register_target(TargetSpec(
    name="double", kind="arithmetic",
    description="2a (a in 0..999) under the new template 'A doubled='; short answers",
    template="{a} doubled=", draw=_draw_number, rule=_double, fields={"a": r"\d+"},
    families={
        "doubled_spaced": useful("{a} doubled ="),
        "double_of": useful("double {a}="),
        "doubled_half": conflicting(_half),
        "doubled_spaced_half": conflicting(_half, "{a} doubled ="),
        **_LONG_UNRELATED,
    },
    length_contrast="similar"))

register_target(TargetSpec(
    name="mirror", kind="string_transform",
    description="s -> s + reverse(s) (3-6 letters: 6-12 character responses) under 'mirror S:'",
    template="mirror {s}:", draw=_draw_word, rule=_mirror, fields={"s": "[a-z]+"},
    families={
        "mirror_gt": useful("mirror {s}>"),
        "mirror_of": useful("mirror of {s}:"),
        "mirror_reversed": conflicting(_reverse_mirror),
        "mirror_gt_reversed": conflicting(_reverse_mirror, "mirror {s}>"),
        **_SHORT_UNRELATED,
    },
    length_contrast="useful_longer"))

register_target(TargetSpec(
    name="sort_words", kind="known_rule_new_template",
    description="the pre-trained digit sort (3-7 digits) under the new template 'D in order?'",
    template="{d} in order?", draw=_draw_digits, rule=_ascending, fields={"d": "[0-9]+"},
    families={
        "ordered": useful("{d} ordered?"),
        "in_order_eq": useful("{d} in order="),
        "in_order_desc": conflicting(_descending),
        "ordered_desc": conflicting(_descending, "{d} ordered?"),
        **{f: unrelated(f) for f in ("add", "sub", "copy", "reverse", "count", "parity", "sentiment", "noise")},
    },
    length_contrast="useful_longer"))

register_target(TargetSpec(
    name="last_letter", kind="character_lookup",
    description="the last letter of a 3-6 letter word under 'last of S?'; one-letter answers",
    template="last of {s}?", draw=_draw_word, rule=_last_letter, fields={"s": "[a-z]+"},
    families={
        "last_of_spaced": useful("last of {s} ?"),
        "final_of": useful("final of {s}?"),
        "last_of_first": conflicting(_first_letter),
        "last_of_spaced_first": conflicting(_first_letter, "last of {s} ?"),
        **_LONG_UNRELATED,
    },
    length_contrast="useful_shorter"))


# ----------------------------------------------------------------------------- files
def write_controlled_benchmark(directory: str | os.PathLike, bench: ControlledBenchmark) -> dict[str, str]:
    """Writes ``domain.jsonl``, ``test.jsonl``, ``pool.jsonl`` and ``meta.json`` into
    ``directory`` (created); returns name -> path."""
    from ntk_jax.utils import write_json

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f"{name}.jsonl") for name in ("domain", "test", "pool")}
    for name, path in paths.items():
        write_jsonl(getattr(bench, name), path)
    paths["meta"] = os.path.join(directory, "meta.json")
    write_json(paths["meta"], {**bench.meta, "target": bench.target, "roles": bench.roles,
                               "domain_family": bench.domain_family})
    return paths


def load_controlled_benchmark(directory: str | os.PathLike) -> ControlledBenchmark:
    """Reads what :func:`write_controlled_benchmark` wrote (validating every record). A
    directory written before the registry (``meta["target"] == "flipped"``) loads as the
    ``flipped_sentiment`` target."""
    from ntk_jax.data.records import read_records
    from ntk_jax.utils import read_json

    directory = os.fspath(directory)
    meta = read_json(os.path.join(directory, "meta.json"))
    parts = {name: read_records(os.path.join(directory, f"{name}.jsonl")) for name in ("domain", "test", "pool")}
    target = meta["target"]
    family = meta.get("domain_family")
    if family is None:  # written before the registry: the flipped-sentiment benchmark
        family, target = target, ("flipped_sentiment" if target == TARGET else target)
        meta = {**meta, "target": target, "domain_family": family}
    return ControlledBenchmark(roles=dict(meta["roles"]), target=target, meta=meta, domain_family=family, **parts)
