"""The controlled selection benchmarks (ntk_jax.data.controlled): the flipped-sentiment
benchmark (determinism, ids, roles, labels recomputed from the prompts, no domain/test leakage,
files, and — slow — that its families really are useful / conflicting for LoRA fine-tuning of
the pre-trained tiny model), then every target of the registry in both variants: structure,
shares, leakage, fit in max_len 32, determinism, options, answers recomputed from the prompts,
the conflicting family on the target template, errors, and registering a new target. (The
targets' learnability under fine-tuning is measured outside the tests: see the module
docstring of ntk_jax.data.controlled.)"""
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_jax.data.controlled import (FAMILIES, FINETUNE, NOUNS, TARGET, TEMPLATES, load_controlled_benchmark,
                                     make_controlled_benchmark, write_controlled_benchmark)
from ntk_jax.data.records import encode_records, read_records
from ntk_jax.data.synthetic import NEGATIVE_WORDS, POSITIVE_WORDS


@pytest.fixture(scope="module")
def bench():
    return make_controlled_benchmark(0, n_domain=32, n_test=128, n_pool_per_family=40)


def _template_regex(template):
    return re.compile(re.escape(template).replace(r"\{noun\}", "(?P<noun>[a-z]+)")
                      .replace(r"\{adj\}", "(?P<adj>[a-z]+)") + "$")


def _expected_label(prompt, flipped):
    """Independent recomputation: parse the adjective, look up its polarity."""
    for template in TEMPLATES.values():
        m = _template_regex(template).match(prompt)
        if m:
            adj = m.group("adj")
            assert m.group("noun") in NOUNS
            assert (adj in POSITIVE_WORDS) != (adj in NEGATIVE_WORDS)
            positive = adj in POSITIVE_WORDS
            return ("neg" if positive else "pos") if flipped else ("pos" if positive else "neg")
    raise AssertionError(f"prompt {prompt!r} matches no template")


def test_deterministic(bench):
    again = make_controlled_benchmark(0, n_domain=32, n_test=128, n_pool_per_family=40)
    assert (again.domain, again.test, again.pool) == (bench.domain, bench.test, bench.pool)
    other = make_controlled_benchmark(1, n_domain=32, n_test=128, n_pool_per_family=40)
    assert other.domain != bench.domain and other.test != bench.test
    assert [r["prompt"] for r in other.pool] != [r["prompt"] for r in bench.pool]


def test_ids_roles_and_counts(bench):
    all_ids = [r["id"] for r in bench.domain + bench.test + bench.pool]
    assert len(set(all_ids)) == len(all_ids)
    assert len(bench.domain) == 32 and len(bench.test) == 128 and len(bench.pool) == 40 * len(FAMILIES)
    assert bench.roles == {f: role for f, (role, _, _) in FAMILIES.items()}
    assert set(bench.roles.values()) == {"useful", "unrelated", "conflicting"}
    counts = {}
    for r in bench.pool:
        assert r["role"] == FAMILIES[r["family"]][0] and r["task"] == r["family"]
        counts[r["family"]] = counts.get(r["family"], 0) + 1
    assert counts == {f: 40 for f in FAMILIES}
    assert [r["family"] for r in bench.pool[:20]] != [bench.pool[0]["family"]] * 20  # shuffled
    for r in bench.domain + bench.test:
        assert r["role"] == "domain" and r["family"] == TARGET
    share = len(bench.family_ids("useful")) / len(bench.pool)
    assert share == pytest.approx(bench.meta["useful_share"]) and 0.1 <= share <= 0.2
    assert set(bench.family_ids("conflicting")) == {r["id"] for r in bench.pool if r["role"] == "conflicting"}


def test_labels_are_correct_and_options_present(bench):
    target = _template_regex(TEMPLATES["was"])
    for r in bench.domain + bench.test:
        assert target.match(r["prompt"])
        assert r["response"] == _expected_label(r["prompt"], flipped=True) == r["label"]
        assert r["options"] == ["neg", "pos"]
    for r in bench.pool:
        role, source, flipped = FAMILIES[r["family"]]
        if flipped is None:
            assert "options" not in r
            continue
        assert _template_regex(TEMPLATES[source]).match(r["prompt"])
        # useful families teach the flipped rule, conflicting ones the opposite
        assert flipped == (role == "useful")
        assert r["response"] == _expected_label(r["prompt"], flipped=flipped)
        assert r["response"] in r["options"]
    # both labels occur in the test set
    labels = [r["response"] for r in bench.test]
    assert 0.3 < labels.count("pos") / len(labels) < 0.7


def test_no_leakage(bench):
    test_prompts = {r["prompt"] for r in bench.test}
    domain_prompts = {r["prompt"] for r in bench.domain}
    assert len(test_prompts) == len(bench.test) and len(domain_prompts) == len(bench.domain)
    assert not test_prompts & domain_prompts
    pool_prompts = {r["prompt"] for r in bench.pool}
    assert not pool_prompts & test_prompts and not pool_prompts & domain_prompts
    # useful items are not copies of domain examples: another template
    for r in bench.pool:
        if r["role"] == "useful":
            assert not _template_regex(TEMPLATES["was"]).match(r["prompt"])


def test_fits_the_model_and_tokenizer(bench):
    from ntk_jax.data.tokenizer import ALPHABET, CharTokenizer

    tok = CharTokenizer()
    for r in bench.domain + bench.test + bench.pool:
        assert set(r["prompt"] + r["response"]) <= set(ALPHABET)
    encode_records(tok, bench.domain + bench.test + bench.pool, 32)  # fits max_len 32


def test_write_and_load(tmp_path, bench):
    paths = write_controlled_benchmark(tmp_path / "bench", bench)
    assert sorted(paths) == ["domain", "meta", "pool", "test"]
    assert read_records(paths["pool"]) == bench.pool
    back = load_controlled_benchmark(tmp_path / "bench")
    assert (back.domain, back.test, back.pool, back.roles, back.target) == (
        bench.domain, bench.test, bench.pool, bench.roles, bench.target)


def test_options_and_errors():
    b = make_controlled_benchmark(3, n_domain=4, n_test=8, n_pool_per_family={"flipped_is": 5, "add": 2},
                                  families=["flipped_is", "add"])
    assert sorted(r["family"] for r in b.pool) == ["add"] * 2 + ["flipped_is"] * 5
    assert b.roles == {"flipped_is": "useful", "add": "unrelated"}
    with pytest.raises(ValueError, match="families must be distinct names"):
        make_controlled_benchmark(0, families=["nope"])
    with pytest.raises(ValueError, match="not in the pool"):
        make_controlled_benchmark(0, families=["add"], n_pool_per_family={"copy": 3})
    with pytest.raises(ValueError, match="distinct target prompts"):
        make_controlled_benchmark(0, n_domain=10, n_test=len(NOUNS) * 16)
    with pytest.raises(ValueError, match="n_domain"):
        make_controlled_benchmark(0, n_domain=0)


def test_variants():
    from ntk_jax.data.controlled import VARIANTS

    full = make_controlled_benchmark(2, n_domain=4, n_test=8, n_pool_per_family=3, variant="contradicting")
    nc = make_controlled_benchmark(2, n_domain=4, n_test=8, n_pool_per_family=3, variant="no_conflict")
    assert set(full.roles.values()) == {"useful", "unrelated", "conflicting"}
    assert set(nc.roles.values()) == {"useful", "unrelated"} and len(nc.roles) == len(full.roles) - 2
    assert nc.meta["variant"] == "no_conflict" and nc.meta["useful_share"] == 2 / 11
    assert [r["id"] for r in nc.domain] == [r["id"] for r in full.domain] and nc.test == full.test
    # only the stress variant's pool holds contradicting pairs: same prompt, both responses
    def contradicting_prompts(bench):
        by_prompt = {}
        for r in bench.pool:
            by_prompt.setdefault(r["prompt"], set()).add(r["response"])
        return sum(len(v) > 1 for v in by_prompt.values())

    assert contradicting_prompts(make_controlled_benchmark(0, variant="contradicting")) > 0
    assert contradicting_prompts(make_controlled_benchmark(0, variant="no_conflict")) == 0
    assert set(VARIANTS) == {"contradicting", "no_conflict"}
    with pytest.raises(ValueError, match="unknown benchmark variant"):
        make_controlled_benchmark(0, variant="easy")
    with pytest.raises(ValueError, match="either families or variant"):
        make_controlled_benchmark(0, variant="no_conflict", families=["add"])


# ----------------------------------------------------------------------------- the effect is real
def test_option_accuracy_is_the_loglik_argmax(tiny_model_dir):
    """``option_accuracy`` against a hand computation on a fixed small case: each option's
    log-likelihood summed over its response tokens and eos, from the model's logits on the
    sequence ``<bos> prompt option <eos>`` built by hand (numpy log-softmax), the argmax per
    record.
    Responses are set so that the oracle's argmax is right on all records but the last (and on
    the last only, in a second call): a wrong sum, mask, argmin or owner would give another
    fraction. Rows go in blocks of 3 (padded last block)."""
    from ntk_jax.data.tokenizer import CharTokenizer
    from ntk_jax.models.hf_loading import from_pretrained
    from ntk_jax.selection.evaluation import option_accuracy

    tok = CharTokenizer.from_pretrained(tiny_model_dir)
    model = from_pretrained(tiny_model_dir)
    b = make_controlled_benchmark(0, n_domain=4, n_test=4, n_pool_per_family=1)
    records = [dict(r, options=["neg", "pos", "neutral"]) for r in b.test] + \
              [{"id": "x", "prompt": "copy: abc ->", "response": "abc", "options": ["abc", "cba", "ab", "abcc"]}]

    rows = [(i, [tok.bos_token_id] + tok.encode(r["prompt"]) + tok.encode(o) + [tok.eos_token_id],
             1 + len(tok.encode(r["prompt"]))) for i, r in enumerate(records) for o in r["options"]]
    ids = np.zeros((len(rows), 32), np.int32)  # right-padded: the causal model's real positions see no pad
    mask = np.zeros_like(ids)
    for k, (_, seq, _) in enumerate(rows):
        ids[k, :len(seq)], mask[k, :len(seq)] = seq, 1
    logits = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), np.float64)
    logp = logits - logits.max(axis=-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    # log p(response + eos | prompt) = Σ_{t ≥ start} log p(x_t | x_<t), read at position t − 1
    ll = np.array([sum(logp[k, t - 1, seq[t]] for t in range(start, len(seq)))
                   for k, (_, seq, start) in enumerate(rows)])
    owner = np.array([i for i, _, _ in rows])
    best = []
    for i in range(len(records)):
        lli = np.sort(ll[owner == i])
        assert lli[-1] - lli[-2] > 1e-4  # no near-tie: the argmax is well defined
        best.append(int(np.argmax(ll[owner == i])))
    n = len(records)
    for wrong in ([n - 1], list(range(n - 1))):  # the records whose response is not the argmax
        recs = [dict(r, response=r["options"][(best[i] + 1) % len(r["options"]) if i in wrong else best[i]])
                for i, r in enumerate(records)]
        got = option_accuracy(model, tok, recs, 32, batch_size=3)
        assert got == pytest.approx(1 - len(wrong) / n, abs=1e-12), (got, wrong, best)


@pytest.mark.slow
def test_useful_family_helps_and_conflicting_hurts(tiny_model_dir):
    from ntk_jax.data.tokenizer import CharTokenizer
    from ntk_jax.models.hf_loading import from_pretrained
    from ntk_jax.models.lora import LoRAConfig, apply_lora
    from ntk_jax.selection.evaluation import option_accuracy
    from ntk_jax.training.trainer import TrainConfig, evaluate, train

    tok = CharTokenizer.from_pretrained(tiny_model_dir)
    b = make_controlled_benchmark(0, n_domain=32, n_test=256, n_pool_per_family=128)
    useful = [r for r in b.pool if r["role"] == "useful"]  # 256 items
    conflicting = [r for r in b.pool if r["role"] == "conflicting"]  # 256 items
    test = encode_records(tok, b.test, 32)
    cfg = TrainConfig(**FINETUNE)  # the documented setting of the benchmark
    results = {}
    for name, extra in {"domain": [], "useful": useful, "conflicting": conflicting}.items():
        model = from_pretrained(tiny_model_dir)
        apply_lora(model, LoRAConfig(rank=8, alpha=16.0), rngs=nnx.Rngs(0))
        train(model, encode_records(tok, b.domain + extra, 32), cfg)
        results[name] = (evaluate(model, test, 128), option_accuracy(model, tok, b.test, 32))
    (l_dom, a_dom), (l_use, a_use), (l_con, a_con) = results["domain"], results["useful"], results["conflicting"]
    print("controlled benchmark, tiny model (test loss, accuracy):", results)
    assert l_use < l_dom < l_con, results
    assert a_use > a_dom > a_con, results


# ----------------------------------------------------------------------------- the target registry
from ntk_jax.data.controlled import (TARGETS, VARIANT_NAMES, FamilySpec, TargetSpec, conflicting,  # noqa: E402
                                     make_benchmark, register_target, unrelated, useful)

SIZES = dict(n_domain=32, n_test=256, n_pool_per_family=64)  # the selection jobs' sizes


def _mirror(s):
    return s + s[::-1]


# Independent answers per target: prompt regex of each template family -> expected response.
# (target rule, conflicting rule), each a function of the parsed fields.
_RULES = {
    "double": (lambda f: str(2 * int(f["a"])), lambda f: str(int(f["a"]) // 2)),
    "mirror": (lambda f: _mirror(f["s"]), lambda f: f["s"][::-1] + f["s"]),
    "sort_words": (lambda f: "".join(sorted(f["d"])), lambda f: "".join(sorted(f["d"]))[::-1]),
    "last_letter": (lambda f: f["s"][-1], lambda f: f["s"][0]),
}

_cache = {}


def _bench(target, variant="contradicting", seed=0):
    key = (target, variant, seed)
    if key not in _cache:
        _cache[key] = make_benchmark(target, seed, variant=variant, **SIZES)
    return _cache[key]


CASES = [(t, v) for t in TARGETS for v in VARIANT_NAMES]


def test_registry_has_varied_targets():
    assert len(TARGETS) >= 5 and "flipped_sentiment" in TARGETS
    kinds = {spec.kind for spec in TARGETS.values()}
    assert {"classification", "arithmetic", "string_transform", "known_rule_new_template"} <= kinds
    contrasts = {spec.length_contrast for spec in TARGETS.values()}
    assert {"useful_longer", "useful_shorter"} <= contrasts
    for name, spec in TARGETS.items():
        assert spec.name == name and isinstance(spec.description, str) and spec.description
        assert isinstance(spec.has_options, bool)
        roles = [fam[0] for fam in spec.families.values()]
        assert roles.count("useful") >= 2 and roles.count("conflicting") >= 1 and roles.count("unrelated") >= 3
        assert any(spec.shares_target_template(f) for f, fam in spec.families.items() if fam[0] == "conflicting")
        # useful families use other surface templates than the target's
        for f, fam in spec.families.items():
            if fam[0] == "useful":
                assert spec.family_template(f) != spec.template and not spec.shares_target_template(f)
    assert TARGETS["flipped_sentiment"].has_options


@pytest.mark.parametrize("target,variant", CASES)
def test_structure(target, variant):
    spec, b = TARGETS[target], _bench(target, variant)
    assert b.target == target and b.domain_family == spec.family_name
    assert len(b.domain) == 32 and len(b.test) == 256 and len(b.pool) == 64 * len(b.roles)
    expected = spec.variant_families(variant)
    assert b.roles == {f: spec.families[f][0] for f in expected}
    want_roles = {"useful", "unrelated", "conflicting"} if variant == "contradicting" else {"useful", "unrelated"}
    assert set(b.roles.values()) == want_roles
    counts = {}
    for r in b.pool:
        assert r["role"] == b.roles[r["family"]] and r["task"] == r["family"]
        assert r["id"].startswith(f"pool-{r['family']}-")
        counts[r["family"]] = counts.get(r["family"], 0) + 1
    assert counts == {f: 64 for f in expected}
    assert len({r["family"] for r in b.pool[:30]}) > 3  # shuffled
    for prefix, part in (("dom", b.domain), ("test", b.test)):
        assert [r["id"] for r in part] == [f"{prefix}-{i}" for i in range(len(part))]
        for r in part:
            assert r["role"] == "domain" and r["family"] == r["task"] == spec.family_name
            assert spec.parse(r["prompt"]) is not None
    ids = [r["id"] for r in b.domain + b.test + b.pool]
    assert len(set(ids)) == len(ids)
    share = len(b.family_ids("useful")) / len(b.pool)
    assert share == pytest.approx(b.meta["useful_share"]) and 0.15 <= share <= 0.21
    m = b.meta
    for key in ("target", "variant", "seed", "n_domain", "n_test", "n_pool", "pool_counts", "roles", "useful_share",
                "kind", "mean_response_length"):
        assert key in m, key
    assert (m["target"], m["variant"], m["seed"], m["kind"]) == (target, variant, 0, spec.kind)
    assert (m["n_domain"], m["n_test"], m["n_pool"], m["pool_counts"]) == (32, 256, len(b.pool), counts)
    lengths = m["mean_response_length"]
    assert set(lengths) == want_roles | {"domain"}
    for role in want_roles:
        recs = [r for r in b.pool if r["role"] == role]
        assert lengths[role] == pytest.approx(np.mean([len(r["response"]) for r in recs]))
    gap = lengths["useful"] - lengths["unrelated"]
    assert {"useful_longer": gap > 1.0, "useful_shorter": gap < -1.0, "similar": abs(gap) <= 1.0}[spec.length_contrast]


@pytest.mark.parametrize("target,variant", CASES)
def test_no_leakage_and_fits(target, variant):
    from ntk_jax.data.tokenizer import ALPHABET, CharTokenizer

    b = _bench(target, variant)
    test_prompts = {r["prompt"] for r in b.test}
    domain_prompts = {r["prompt"] for r in b.domain}
    assert len(test_prompts) == len(b.test) and len(domain_prompts) == len(b.domain)
    assert not test_prompts & domain_prompts
    pool_prompts = {r["prompt"] for r in b.pool}
    assert not pool_prompts & test_prompts and not pool_prompts & domain_prompts
    records = b.domain + b.test + b.pool
    assert all(set(r["prompt"] + r["response"]) <= set(ALPHABET) for r in records)
    encode_records(CharTokenizer(), records, 32)  # every record fits max_len 32


@pytest.mark.parametrize("target", list(TARGETS))
def test_deterministic_in_seed(target):
    b = _bench(target)
    again = make_benchmark(target, 0, **SIZES)
    assert (again.domain, again.test, again.pool, again.meta) == (b.domain, b.test, b.pool, b.meta)
    other = _bench(target, seed=1)
    assert other.test != b.test and [r["prompt"] for r in other.pool] != [r["prompt"] for r in b.pool]
    # no_conflict drops the conflicting families only: same domain and test
    nc = _bench(target, "no_conflict")
    assert (nc.domain, nc.test) == (b.domain, b.test)


@pytest.mark.parametrize("target", list(TARGETS))
def test_options_and_labels(target):
    spec, b = TARGETS[target], _bench(target)
    for r in b.domain + b.test:
        assert ("options" in r) == spec.has_options
        if spec.has_options:
            assert r["options"] == list(spec.options) and r["label"] == r["response"] in r["options"]
    for r in b.pool:
        if "options" in r:
            assert spec.has_options and r["label"] == r["response"] in r["options"] == list(spec.options)
        elif spec.has_options:
            assert r["role"] == "unrelated"
    if spec.has_options:
        labels = [r["response"] for r in b.test]
        assert all(0.3 < labels.count(o) / len(labels) < 0.7 for o in spec.options)


@pytest.mark.parametrize("target", [t for t in TARGETS if t in _RULES])
def test_answers_recomputed_from_prompts(target):
    """Every template family's responses follow its rule (independent re-implementation);
    conflicting families on the target template contradict the target rule."""
    spec, b = TARGETS[target], _bench(target)
    target_rule, conflict_rule = _RULES[target]
    for r in b.domain + b.test:
        assert r["response"] == target_rule(spec.parse(r["prompt"]))
    n_contradicting = 0
    for r in b.pool:
        fam = spec.families[r["family"]]
        if fam.task is not None or fam.draw is not None:
            continue  # synthetic tasks (tests/test_data.py) and other tasks' templates
        fields = spec.parse(r["prompt"], spec.family_template(r["family"]))
        assert fields is not None, r
        rule = target_rule if r["role"] == "useful" else conflict_rule
        assert r["response"] == rule(fields), r
        if r["role"] == "conflicting":
            n_contradicting += r["response"] != target_rule(fields)
    n_conf = len(b.family_ids("conflicting"))
    assert n_contradicting >= 0.8 * n_conf  # equal only when |s| = 2c (count) or all digits are equal (sort)


@pytest.mark.parametrize("target", list(TARGETS))
def test_conflicting_family_shares_the_target_template(target):
    spec, b = TARGETS[target], _bench(target)
    same = [f for f, fam in spec.families.items() if fam[0] == "conflicting" and spec.shares_target_template(f)]
    assert same
    regex = spec.template_regex()
    for f in same:
        prompts = [r["prompt"] for r in b.pool if r["family"] == f]
        assert prompts and all(regex.match(p) for p in prompts)
        # drawn like the domain prompts: the same distribution of prompt lengths
        dom = [len(r["prompt"]) for r in b.domain + b.test]
        assert abs(np.mean([len(p) for p in prompts]) - np.mean(dom)) < 1.0
    for f, fam in spec.families.items():
        if fam[0] == "useful":
            assert not any(regex.match(r["prompt"]) for r in b.pool if r["family"] == f)


def test_flipped_sentiment_target_is_the_original_benchmark():
    for seed, variant in ((0, "contradicting"), (1, "no_conflict")):
        a = make_benchmark("flipped_sentiment", seed, variant=variant, **SIZES)
        b = make_controlled_benchmark(seed, n_domain=32, n_test=256, n_pool_per_family=64, variant=variant)
        assert (a.domain, a.test, a.pool, a.roles, a.meta) == (b.domain, b.test, b.pool, b.roles, b.meta)
        assert a.target == "flipped_sentiment" and a.domain_family == TARGET
    assert TARGETS["flipped_sentiment"].families == FAMILIES
    assert TARGETS["flipped_sentiment"].variants == dict(__import__("ntk_jax.data.controlled",
                                                                       fromlist=["VARIANTS"]).VARIANTS)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown target 'nope'.*flipped_sentiment"):
        make_benchmark("nope")
    with pytest.raises(ValueError, match="unknown benchmark variant 'easy'.*no_conflict"):
        make_benchmark("mirror", variant="easy")
    with pytest.raises(ValueError, match="not in the pool.*mirror_gt"):
        make_benchmark("mirror", n_pool_per_family={"nope": 3})
    with pytest.raises(ValueError, match="not in the pool"):
        make_benchmark("mirror", variant="no_conflict", n_pool_per_family={"mirror_reversed": 3})
    with pytest.raises(ValueError, match="n_test"):
        make_benchmark("sort_words", n_test=0)
    with pytest.raises(ValueError, match="already registered"):
        register_target(TARGETS["mirror"])


def test_register_a_new_target_is_one_entry(tmp_path):
    spec = TargetSpec(
        name="test_upper_tail", kind="string_transform", description="last two letters, repeated",
        template="tail {s}:", draw=lambda rng: {"s": "".join(rng.choice(list("abcdef"), size=5))},
        rule=lambda f: f["s"][-2:] * 2, fields={"s": "[a-z]+"},
        families={"tail_gt": useful("tail {s}>"), "tail_of": useful("tail of {s}:"),
                  "tail_head": conflicting(lambda f: f["s"][:2] * 2), "copy": unrelated("copy"),
                  "add": unrelated("add"), "sort": unrelated("sort")})
    register_target(spec)
    try:
        b = make_benchmark("test_upper_tail", 3, n_domain=8, n_test=16, n_pool_per_family={"tail_gt": 5, "copy": 4})
        assert sorted(r["family"] for r in b.pool) == ["copy"] * 4 + ["tail_gt"] * 5
        assert all(isinstance(f, FamilySpec) for f in spec.families.values())
        paths = write_controlled_benchmark(tmp_path / "b", b)
        back = load_controlled_benchmark(tmp_path / "b")
        assert (back.domain, back.test, back.pool, back.roles, back.target, back.domain_family) == (
            b.domain, b.test, b.pool, b.roles, "test_upper_tail", "test_upper_tail")
        assert read_records(paths["test"]) == b.test
    finally:
        del TARGETS["test_upper_tail"]
    with pytest.raises(ValueError, match="conflicting family in the target template"):
        register_target(dataclasses_replace(spec, families={k: v for k, v in spec.families.items() if k != "tail_head"}
                                            | {"x": conflicting(lambda f: "x", "tail {s}>")}))
    assert "test_upper_tail" not in TARGETS


def dataclasses_replace(spec, **kw):
    import dataclasses

    return dataclasses.replace(spec, **kw)
