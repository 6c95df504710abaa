"""The placement advisor job (experiments/advise_placement.py) end to end on a tiny toy config:
the ranking and the validation are written, a killed run resumes to the same report, bad
placements are refused before any work."""
import json
import os

import numpy as np
import pytest

import experiments.advise_placement as ap
from ntk_jax.kernels.placement import PREDICTORS
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.launcher.context import prepare_context
from ntk_jax.launcher.run import run
from ntk_jax.stats import spearman

PLACEMENTS = (dict(targets=("q_proj", "v_proj"), layers=(0,)), dict(targets=("k_proj",), layers=(0, 1, 2)),
              dict(targets=("o_proj",), layers=(2,), rank=2))


def tiny_config():
    c = base_config()
    c.model.arch.hidden_size = 32
    c.model.arch.intermediate_size = 64
    c.pretrain.n_per_task = 64
    c.pretrain.train.total_steps = 30
    c.pretrain.train.batch_size = 32
    c.pretrain.train.checkpoint_every = 0
    c.experiments = ("advise_placement",)
    a = c.advise_placement
    a.placements = PLACEMENTS
    a.n_kernel, a.n_kernel_test, a.n_train, a.n_eval = 6, 4, 16, 16
    a.train.total_steps, a.train.batch_size = 3, 8
    a.validate, a.seeds, a.n_boot = True, (0, 1), 50
    return c


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("advise"))
    return workdir, run(tiny_config(), workdir)["advise_placement"]


def test_ranking_and_validation_written(job):
    workdir, r = job
    saved = json.load(open(os.path.join(workdir, "advise_placement", "report.json")))
    assert saved["ranking"] == r["ranking"]
    assert len(r["ranking"]) == 3 and sorted(x["mean_rank"] for x in r["ranking"]) == [x["mean_rank"] for x in r["ranking"]]
    assert os.path.getsize(r["plots"][0]) > 10_000
    v = r["validation"]
    assert set(PREDICTORS) | {"num_params"} == set(v["predictors"])
    # the reported Spearman is recomputed from the per-placement values in the report
    loss = np.mean([p["eval_loss"] for p in r["placements"]], axis=1)
    np.testing.assert_allclose(loss, v["eval_loss_mean"])
    for name, sign in PREDICTORS.items():
        if sign == 0:
            continue
        vals = np.array([p[name] for p in r["placements"]])  # (placements, seeds)
        ranks = np.mean([np.argsort(np.argsort(sign * vals[:, s], kind="stable"), kind="stable")
                         for s in range(vals.shape[1])], axis=0)
        got = v["predictors"][name]["spearman_rank_vs_eval_loss"]["value"]
        assert got == pytest.approx(spearman(ranks, loss)), name
        top = [int(np.argmin(sign * vals[:, s])) for s in range(vals.shape[1])]
        assert v["predictors"][name]["regret_eval_loss"] == pytest.approx(np.mean([loss[t] - loss.min() for t in top]))
    # the ranking is the chosen predictor's (best first)
    order = np.argsort(np.mean([np.argsort(np.argsort(np.array([p["lin_eval_loss_ce"][s] for p in r["placements"]])))
                                for s in range(2)], axis=0), kind="stable")
    assert [x["placement"] for x in r["ranking"]] == [json.loads(json.dumps(ap.check_placements(PLACEMENTS)[i]))
                                                       for i in order]
    t = r["timing"]
    assert t["advisor_s"] > 0 and t["finetune_all_s"] > 0
    assert t["advisor_over_finetune_all"] == pytest.approx(t["advisor_s"] / t["finetune_all_s"])
    assert "fine-tuned all 3 placements" in r["how_validated"]
    assert os.path.isfile(os.path.join(workdir, "advise_placement", "table.md"))
    assert all(e["meets_target"] == (bool(e["theory_sign_vs_loss"]) and e["spearman_rank_vs_eval_loss"]["value"] is not None
                                     and e["spearman_rank_vs_eval_loss"]["value"] >= 0.8) for e in v["predictors"].values())


def test_killed_run_resumes_exactly(job, tmp_path):
    """Delete the report and some shards (as if killed mid-way): the rerun recomputes those and
    gives the same report (timings of kept shards included)."""
    workdir, r = job
    out = os.path.join(workdir, "advise_placement")
    os.remove(os.path.join(out, "report.json"))
    os.remove(os.path.join(out, "shards", "seed1", "finetune_002.json"))
    again = run(tiny_config(), workdir)["advise_placement"]
    for key in ("ranking", "how_validated"):
        assert again[key] == r[key]
    a, b = again["validation"], r["validation"]
    np.testing.assert_allclose(a["eval_loss_mean"], b["eval_loss_mean"], rtol=1e-6)
    for p, q in zip(again["placements"], r["placements"]):
        for k in PREDICTORS:
            np.testing.assert_allclose(p[k], q[k], rtol=1e-9)
    assert again["timing"]["advisor_s_per_seed"] == r["timing"]["advisor_s_per_seed"]


def test_shard_with_other_settings_is_refused(job):
    workdir, _ = job
    c = tiny_config()
    c.advise_placement.n_kernel = 5
    os.remove(os.path.join(workdir, "advise_placement", "report.json"))
    with pytest.raises(ValueError, match="other settings"):
        run(c, workdir)


def test_bad_placements_are_refused(job):
    workdir, _ = job
    with pytest.raises(ValueError, match="empty"):
        ap.check_placements(())
    with pytest.raises(ValueError, match="non-empty 'targets'"):
        ap.check_placements((dict(targets=(), layers=(0,)),))
    with pytest.raises(ValueError, match="unknown keys"):
        ap.check_placements((dict(targets=("q_proj",), layers=(0,), alpha=3),))
    c = tiny_config()
    c.advise_placement.placements = PLACEMENTS + (dict(targets=("nope_proj",), layers=(0,)),)
    ctx = prepare_context(c, workdir)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        ap.run(c, os.path.join(workdir, "bad"), ctx)
    assert not os.path.exists(os.path.join(workdir, "bad", "shards"))  # refused before any work
    c.advise_placement.placements = PLACEMENTS
    c.advise_placement.predictor = "effective_rank"  # no predicted sign: cannot rank
    with pytest.raises(ValueError, match="no predicted sign"):
        ap.run(c, os.path.join(workdir, "bad2"), ctx)


def test_union_kernel_of_a_placement_is_its_own_kernel(job):
    """A placement's kernel summed from the per-leaf kernels of a model adapted at a superset of
    its sites equals the exact eNTK over the placement's factors alone (B = 0: the other
    adapters do not change the outputs); a trained head's leaves are always included."""
    from ntk_jax.kernels.contract import output_size
    from ntk_jax.kernels.ntk import empirical_ntk
    from ntk_jax.kernels.outputs import lm_output_fn
    from ntk_jax.kernels.placement import leaf_kernels
    from ntk_jax.models.lora import LoRAConfig, lora_filter
    from ntk_jax.models.subset import param_subset

    workdir, _ = job
    c = tiny_config()
    ctx = prepare_context(c, workdir)
    loras = [LoRAConfig(targets=("q_proj", "v_proj"), layers=(0,)), LoRAConfig(targets=("k_proj",), layers=(1, 2))]
    union = ap.union_lora(loras)
    assert union.targets == ("k_proj", "q_proj", "v_proj") and union.layers == (0, 1, 2)
    model = ctx.load_model(union)
    from ntk_jax.data.synthetic import generate_task
    import jax.numpy as jnp
    arr = ctx.encode(generate_task("sentiment_flipped", 5, seed=0))
    x = {k: jnp.asarray(arr[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
    full = param_subset(model)
    f = lm_output_fn(full)
    O = output_size(f, full.params, x)
    leaf_K = leaf_kernels(f, full.params, x, O)
    np.testing.assert_allclose(ap.placement_kernel(leaf_K, union), empirical_ntk(f, full.params, x), rtol=1e-4, atol=1e-6)
    for lora in loras:
        sub = param_subset(model, lora_filter(lora.layers, lora.targets))
        want = empirical_ntk(lm_output_fn(sub), sub.params, x)
        np.testing.assert_allclose(ap.placement_kernel(leaf_K, lora), want, rtol=1e-4, atol=1e-6)
    assert not np.allclose(ap.placement_kernel(leaf_K, loras[0]), ap.placement_kernel(leaf_K, loras[1]))


def test_advice_alone_ranks_without_fine_tuning(job, tmp_path):
    """validate=False: the job's seed only, no fine-tune shards, the ranking by the chosen
    predictor, and a report that says where the ranking was validated."""
    workdir, _ = job
    c = tiny_config()
    c.advise_placement.validate = False
    c.advise_placement.predictor = "trace"
    ctx = prepare_context(c, workdir)
    out = str(tmp_path / "advice")
    os.makedirs(out)
    r = ap.run(c, out, ctx)
    assert "validation" not in r and r["setup"]["seeds"] == [c.seed]
    assert sorted(os.listdir(os.path.join(out, "shards", f"seed{c.seed}"))) == ["advisor.json"]
    traces = {json.dumps(p["placement"]): p["trace"][0] for p in r["placements"]}
    ranked = [traces[json.dumps(x["placement"])] for x in r["ranking"]]
    assert ranked == sorted(ranked, reverse=True)  # tr K: larger is predicted better
    assert "docs/validation.md" in r["how_validated"] and os.path.getsize(r["plots"][0]) > 5_000
    assert ap.summary(r)["best"] == r["ranking"][0]["label"]
