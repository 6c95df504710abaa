"""The held-out targets of benchmarks/held_out_targets.py (the recommended selector's check on
targets defined after it was chosen): they register and build in both variants, every answer
recomputed from its prompt by an independent rule, the conflicting rule really disagrees with
the target's, and the summary statistics."""
import importlib.util
import os
import re

import numpy as np
import pytest

from ntk_jax.data.controlled import TARGETS, make_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("held_out_targets", os.path.join(ROOT, "benchmarks",
                                                                                  "held_out_targets.py"))
ho = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ho)
NAMES = ho.register()

# prompt regex -> (target rule, conflicting rule) on the parsed field, written independently
_NUMBER = re.compile(r"^(?:one more than )?(\d+)(?: plus one ?=|=)$")
_WORD = re.compile(r"^(?:swap|ends swapped) ([a-z]+) ?:$")
_DIGITS = re.compile(r"^(?:largest of )?([0-9]+)(?: largest ?\?|\?)$")
RULES = {
    "successor": (_NUMBER, lambda a: str(int(a) + 1), lambda a: str(int(a) - 1)),
    "swap_ends": (_WORD, lambda s: s[-1] + s[1:-1] + s[0], lambda s: s[1:] + s[:1]),
    "max_digit": (_DIGITS, lambda d: str(max(int(c) for c in d)), lambda d: str(min(int(c) for c in d))),
}


def test_registered_once_and_kept_out_of_the_suite_until_imported():
    assert NAMES == ["successor", "swap_ends", "max_digit"] and all(n in TARGETS for n in NAMES)
    assert ho.register() == NAMES  # idempotent
    assert not set(NAMES) & {"flipped_sentiment", "double", "mirror", "sort_words", "last_letter"}


@pytest.mark.parametrize("target", ["successor", "swap_ends", "max_digit"])
@pytest.mark.parametrize("variant", ["no_conflict", "contradicting"])
def test_answers_recomputed_from_prompts(target, variant):
    b = make_benchmark(target, 0, n_domain=32, n_test=64, n_pool_per_family=64, variant=variant)
    regex, rule, other = RULES[target]
    for r in b.domain + b.test:
        m = regex.match(r["prompt"])
        assert m and r["response"] == rule(m.group(1)), r
    roles = {r["role"] for r in b.pool}
    assert roles == ({"useful", "unrelated", "conflicting"} if variant == "contradicting" else {"useful", "unrelated"})
    disagree = []
    for r in b.pool:
        if r["role"] == "unrelated":
            continue
        m = regex.match(r["prompt"])
        assert m, r
        want = rule(m.group(1)) if r["role"] == "useful" else other(m.group(1))
        assert r["response"] == want, r
        if r["role"] == "conflicting":
            disagree.append(rule(m.group(1)) != r["response"])
    if variant == "contradicting":
        assert np.mean(disagree) > 0.85, np.mean(disagree)  # max == min only on repeated-digit draws
    useful_share = np.mean([r["role"] == "useful" for r in b.pool])
    assert 0.1 < useful_share < 0.3
    train_prompts = {r["prompt"] for r in b.domain}
    assert not train_prompts & {r["prompt"] for r in b.test}


def test_summary_means_intervals_and_base_multiples():
    cells = {"successor/contradicting/seed0": {"ntk": 0.5, "random": 0.2, "base_rate": 0.2},
             "successor/contradicting/seed1": {"ntk": 0.7, "random": 0.1, "base_rate": 0.2},
             "max_digit/contradicting/seed0": {"ntk": 0.9, "random": 0.3, "base_rate": 0.15},
             "max_digit/no_conflict/seed0": {"ntk": 1.0, "random": 0.2, "base_rate": 0.2}}
    s = ho.summarise(cells, ["ntk", "random"], ["contradicting", "no_conflict"])
    c = s["ntk / contradicting"]
    assert c["cells"] == 3 and c["mean"] == pytest.approx(0.7) and c["min_multiple_of_base"] == pytest.approx(2.5)
    assert c["per_target"] == pytest.approx({"max_digit": 0.9, "successor": 0.6})
    assert 0.5 <= c["ci95"][0] <= 0.7 <= c["ci95"][1] <= 0.9
    assert s["random / no_conflict"]["cells"] == 1 and s["random / no_conflict"]["mean"] == pytest.approx(0.2)


def test_warmup_length_path_table_from_stores(tmp_path):
    """benchmarks/warmup_length.py: per checkpoint, the probes' mean loss and the precision of
    ℓ(θ_0) − ℓ(θ_k) over the non-probe records, read from the job's two stores."""
    spec = importlib.util.spec_from_file_location("warmup_length", os.path.join(ROOT, "benchmarks",
                                                                                "warmup_length.py"))
    wl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wl)
    pool = ([{"id": f"u{i}", "role": "useful"} for i in range(3)] + [{"id": f"c{i}", "role": "conflicting"}
                                                                      for i in range(3)]
            + [{"id": f"p{i}", "role": "probe"} for i in range(2)])
    ids = [r["id"] for r in pool]
    base = np.full(len(ids), 5.0)
    # checkpoint 1: the conflicting records' loss falls most (Δ ranks them first);
    # checkpoint 2: the useful ones' does; probes 3.0 then 1.0
    warm = np.array([[3.0, 2.0], [3.0, 2.0], [3.0, 2.0], [1.0, 4.0], [1.0, 4.0], [1.0, 4.0], [3.0, 1.0],
                     [3.0, 1.0]])
    for name, column, values in (("loss_base", "scores", base), ("loss_change", "features", warm)):
        d = tmp_path / name
        d.mkdir()
        (d / "meta.json").write_text('{"num_shards": 2}')
        np.savez(d / "shard_00000.npz", ids=np.array(ids[:5]), **{column: values[:5]})
        np.savez(d / "shard_00001.npz", ids=np.array(ids[5:]), **{column: values[5:]})
    t = wl.path_table(str(tmp_path), pool, 3, [10, 20])
    assert t["held_out_loss_at_theta0"] == 5.0
    assert [(r["step"], r["held_out_loss"], r["precision_at_n"]) for r in t["path"]] == [(10, 3.0, 0.0),
                                                                                      (20, 1.0, 1.0)]
    assert t["early_stop"] == {"step": 20, "precision_at_n": 1.0}


def test_arch_overrides_and_unknown_setting():
    from ntk_jax.launcher.config_lib import base_config

    config = base_config()
    ho.apply_arch(config, "hidden_size=256,num_layers=4")
    assert (config.model.arch.hidden_size, config.model.arch.num_layers) == (256, 4)
    ho.apply_arch(config, "")
    assert config.model.arch.hidden_size == 256
    with pytest.raises(ValueError, match="no setting 'width'"):
        ho.apply_arch(config, "width=3")


def test_pool_counts_by_role_and_filter_sweep(tmp_path):
    spec = TARGETS["max_digit"]
    counts = ho.pool_counts(spec, "contradicting", "useful=3,unrelated=5", 7)
    assert {f: counts[f] for f in ("largest_spaced", "largest_min", "count")} == {"largest_spaced": 3,
                                                                                 "largest_min": 7, "count": 5}
    assert set(counts) == set(spec.variant_families("contradicting"))
    assert ho.pool_counts(spec, "no_conflict", "", 7) == 7
    with pytest.raises(ValueError, match="unknown role 'helpful'"):
        ho.pool_counts(spec, "contradicting", "helpful=3", 7)
    # 8 records, N = 2: the votes keep u0 first, then the unrelated ones; Δ prefers u1, then x0
    pool = [{"id": "u0", "role": "useful"}, {"id": "u1", "role": "useful"}] + [
        {"id": f"x{i}", "role": "unrelated"} for i in range(6)]
    ids = np.array([r["id"] for r in pool])
    (tmp_path / "ntk").mkdir()
    (tmp_path / "ntk@loss_change").mkdir()
    np.savez(tmp_path / "ntk" / "all_scores.npz", ids=ids, votes=np.array([9, 0, 8, 7, 6, 5, 4, 3.0]))
    np.savez(tmp_path / "ntk@loss_change" / "all_scores.npz", ids=ids[::-1],
             scores=np.array([0, 0, 0, 0, 0, 1, 3, 2.0]),  # reversed order: x5..x0, u1, u0
             loss_base=np.array([1, 1, 1, 1, 1, 0.1, 30, 4.0]))  # relative Δ: x0 10, u0 0.5, u1 0.1
    sweep = ho.filter_sweep(str(tmp_path), pool, 2, factors=(1, 2))
    assert sweep["1N"] == {"recall": 0.5, "precision_at_n": 0.5, "precision_at_n_relative": 0.5}  # u0, x0 kept
    assert sweep["2N"] == {"recall": 0.5, "precision_at_n": 0.5,    # kept u0, x0, x1, x2 -> u0 (2), x0 (1)
                           "precision_at_n_relative": 0.5}          # x0 (10), u0 (0.5)
    assert sweep["whole"] == {"recall": 1.0, "precision_at_n": 1.0,  # u1 (3), u0 (2)
                              "precision_at_n_relative": 0.5}       # x0 (10), u0 (0.5)
