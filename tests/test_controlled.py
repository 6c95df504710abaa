"""The controlled selection benchmark (ntk_jax.data.controlled): determinism, ids, roles,
labels recomputed from the prompts, no domain/test leakage, files, and that the families
really are useful / conflicting for LoRA fine-tuning of the pre-trained tiny model."""
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_jax.data.controlled import (FAMILIES, FINETUNE, NOUNS, TARGET, TEMPLATES, load_controlled_benchmark,
                                     make_controlled_benchmark, write_controlled_benchmark)
from ntk_jax.data.records import encode_options, encode_records, read_records
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
def _option_accuracy(model, tok, records):
    """Fraction of records whose response has the highest summed log-likelihood among its options."""
    from ntk_jax.training.losses import token_log_probs

    arrays, owner, correct = encode_options(tok, records, 32)
    logits = model(jnp.asarray(arrays["input_ids"]), attention_mask=jnp.asarray(arrays["attention_mask"]))
    ll = np.asarray(jnp.sum(token_log_probs(logits, jnp.asarray(arrays["targets"])) * arrays["loss_mask"], axis=-1))
    hits = []
    for i in range(len(records)):
        rows = np.flatnonzero(owner == i)
        hits.append(bool(correct[rows[np.argmax(ll[rows])]]))
    return float(np.mean(hits))


@pytest.mark.slow
def test_useful_family_helps_and_conflicting_hurts(tiny_model_dir):
    from ntk_jax.data.tokenizer import CharTokenizer
    from ntk_jax.models.hf_loading import from_pretrained
    from ntk_jax.models.lora import LoRAConfig, apply_lora
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
        results[name] = (evaluate(model, test, 128), _option_accuracy(model, tok, b.test))
    (l_dom, a_dom), (l_use, a_use), (l_con, a_con) = results["domain"], results["useful"], results["conflicting"]
    print("controlled benchmark, tiny model (test loss, accuracy):", results)
    assert l_use < l_dom < l_con, results
    assert a_use > a_dom > a_con, results
