"""Tests of ntk_jax.training.losses and ntk_jax.training.trainer."""
from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from ntk_jax.models.lora import LoRAConfig, apply_lora, lora_filter
from ntk_jax.models.transformer import DecoderConfig, DecoderLM
from ntk_jax.training.losses import masked_lm_loss, per_example_lm_loss, token_log_probs
from ntk_jax.training.trainer import (TrainConfig, batch_indices, evaluate, make_schedule, read_metrics,
                                      train)

V = 40
T = 12


def tiny_model(seed=0, lora_seed=1, lora=True, dropout=0.0) -> DecoderLM:
    cfg = DecoderConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=64)
    model = DecoderLM(cfg, rngs=nnx.Rngs(seed))
    if lora:
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=dropout, targets=("q_proj", "v_proj"),
                                     b_init_std=0.01), rngs=nnx.Rngs(lora_seed))
    return model


def succ_data(n, seed=0):
    """Learnable task: token t+1 = (3 * token t + 1) mod V; loss on the second half only
    (prompt/response masking) and a few left-padded rows."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, T), np.int32)
    ids[:, 0] = rng.integers(0, V, n)
    for t in range(1, T):
        ids[:, t] = (3 * ids[:, t - 1] + 1) % V
    attn = np.ones((n, T), np.int32)
    n_pad = rng.integers(0, 3, n)
    for i, p in enumerate(n_pad):  # left padding: shift right, pad id 0
        if p:
            ids[i] = np.concatenate([np.zeros(p, np.int32), ids[i, :T - p]])
            attn[i, :p] = 0
    targets = np.concatenate([ids[:, 1:], np.zeros((n, 1), np.int32)], 1)
    loss_mask = np.zeros((n, T), np.float32)
    loss_mask[:, T // 2:T - 1] = 1.0
    return dict(input_ids=ids, targets=targets, loss_mask=loss_mask, attention_mask=attn)


def pure(model, wrt=nnx.Param):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, wrt)))


# ------------------------------------------------------------------------------------ losses


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_losses_match_numpy():
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((3, 5, 7))).astype(np.float32)
    targets = rng.integers(0, 7, (3, 5))
    targets[0, 0] = -100  # ignored position (mask 0) may hold anything
    mask = (rng.random((3, 5)) > 0.4).astype(np.float32)
    mask[0, 0] = 0.0
    mask[2] = 0.0  # an example without response tokens
    lp = np_log_softmax(logits)
    ref_tok = np.take_along_axis(lp, np.clip(targets, 0, 6)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(token_log_probs(logits, targets))[mask > 0], ref_tok[mask > 0],
                               rtol=1e-6, atol=1e-6)
    nll = -ref_tok * mask
    np.testing.assert_allclose(float(masked_lm_loss(logits, targets, mask)), nll.sum() / mask.sum(),
                               rtol=1e-6)
    ref_ex = nll.sum(1) / np.maximum(mask.sum(1), 1)
    np.testing.assert_allclose(np.asarray(per_example_lm_loss(logits, targets, mask)), ref_ex,
                               rtol=1e-6, atol=1e-7)
    assert float(per_example_lm_loss(logits, targets, mask)[2]) == 0.0
    assert float(masked_lm_loss(logits, targets, np.zeros_like(mask))) == 0.0


# ------------------------------------------------------------------------------------ config / schedule


def test_train_config_from_dict():
    cfg = TrainConfig.from_dict({"learning_rate": 0.1, "total_steps": 5})
    assert cfg.learning_rate == 0.1 and cfg.total_steps == 5
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="lerning_rate"):
        TrainConfig.from_dict({"lerning_rate": 0.1})
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exp")


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_formula(kind):
    peak, W, Ttot = 2e-3, 4, 24
    sched = make_schedule(TrainConfig(learning_rate=peak, warmup_steps=W, total_steps=Ttot, schedule=kind))

    def ref(c):
        if c < W:
            return peak * c / W
        t = min(c - W, Ttot - W) / (Ttot - W)
        return {"cosine": peak * 0.5 * (1 + math.cos(math.pi * t)),
                "linear": peak * (1 - t), "constant": peak}[kind]

    for c in range(Ttot + 3):
        assert float(sched(c)) == pytest.approx(ref(c), rel=1e-5, abs=1e-9), c
    assert float(sched(0)) == 0.0 and float(sched(W)) == pytest.approx(peak)
    if kind != "constant":
        assert float(sched(Ttot)) == pytest.approx(0.0, abs=1e-9)
    # no warmup
    sched0 = make_schedule(TrainConfig(learning_rate=peak, warmup_steps=0, total_steps=10, schedule=kind))
    assert float(sched0(0)) == pytest.approx(peak)


def test_batch_indices_pure_and_cover_epoch():
    a = [batch_indices(10, 3, 7, s) for s in range(6)]
    b = [batch_indices(10, 3, 7, s) for s in reversed(range(6))][::-1]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    first_epoch = np.concatenate(a[:3])
    assert len(set(first_epoch.tolist())) == 9  # 3 steps per epoch, no repeats within an epoch
    assert not np.array_equal(np.concatenate(a[3:]), first_epoch)  # reshuffled next epoch
    with pytest.raises(ValueError, match="fewer than batch_size"):
        batch_indices(2, 3, 0, 0)


# ------------------------------------------------------------------------------------ training


def test_loss_decreases_and_eval():
    model = tiny_model(lora=False)
    data, eval_data = succ_data(64, 0), succ_data(20, 1)
    before = evaluate(model, eval_data, 8)
    # evaluate == numpy masked loss of the whole set at once (20 is not a multiple of 8)
    logits = np.asarray(nnx.jit(lambda m, i, a: m(i, attention_mask=a))(
        model, eval_data["input_ids"], eval_data["attention_mask"]))
    lp = np_log_softmax(logits)
    tok = np.take_along_axis(lp, eval_data["targets"][..., None], -1)[..., 0]
    m = eval_data["loss_mask"]
    assert before == pytest.approx(-(tok * m).sum() / m.sum(), rel=1e-5)

    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=5, total_steps=60, batch_size=16,
                      schedule="cosine", eval_every=30, log_every=10)
    res = train(model, data, cfg, wrt=nnx.Param, eval_data=eval_data)
    after = evaluate(model, eval_data, 8)
    assert res.final_step == 60
    assert after < 0.5 * before, (before, after)
    assert [r["step"] for r in res.history] == [10, 20, 30, 40, 50, 60]
    assert [("eval_loss" in r) for r in res.history] == [False, False, True, False, False, True]
    assert res.history[-1]["eval_loss"] == pytest.approx(after, rel=1e-5)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.history[0]["lr"] == pytest.approx(float(make_schedule(cfg)(9)))
    # trained params are written back into the model
    np.testing.assert_array_equal(pure(model)["norm"]["weight"], np.asarray(res.params["norm"]["weight"]))


def test_only_wrt_subset_changes():
    model = tiny_model(dropout=0.2)
    before_all = pure(model)
    wrt = lora_filter(layers=[0], targets=["q_proj"])
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=5, batch_size=8, seed=3)
    res = train(model, succ_data(16), cfg, wrt=wrt)
    after_all = pure(model)
    changed = []
    from ntk_jax.models.layers import flatten_state
    fb, fa = flatten_state(before_all), flatten_state(after_all)
    for k in fb:
        if not np.array_equal(fb[k], fa[k]):
            changed.append(k)
    assert sorted(changed) == ["layers.0.self_attn.q_proj.lora.lora_a", "layers.0.self_attn.q_proj.lora.lora_b"]
    assert set(flatten_state(res.params)) == set(changed)
    # left in eval mode (dropout off)
    assert model.layers[0].self_attn.q_proj.lora.dropout.deterministic is True


class Stop(Exception):
    pass


def _resume_cfg():
    return TrainConfig(learning_rate=5e-3, warmup_steps=3, total_steps=20, batch_size=8, seed=11,
                       checkpoint_every=10, log_every=1, schedule="linear")


def test_stop_and_resume_exact(tmp_path):
    data = succ_data(24, 2)  # 3 steps per epoch: the resumed part crosses epochs
    cfg = _resume_cfg()

    # uninterrupted reference
    ref_model = tiny_model(dropout=0.2)
    ref = train(ref_model, data, cfg, workdir=tmp_path / "a")
    assert ref.final_step == 20

    # killed at step 13 (after the checkpoint at 10): metrics for 11..13 are written, then lost
    def killer(step, params):
        if step == 13:
            raise Stop()

    with pytest.raises(Stop):
        train(tiny_model(dropout=0.2), data, cfg, workdir=tmp_path / "b", callback=killer)
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == list(range(1, 14))

    # resume in a fresh process-like setting: a model whose LoRA factors were initialised
    # differently, so the result can only match if params and optimiser state are restored
    seen = []
    model_b = tiny_model(lora_seed=99, dropout=0.2)
    res = train(model_b, data, cfg, workdir=tmp_path / "b", callback=lambda s, p: seen.append(s))
    assert seen == list(range(11, 21))
    assert res.final_step == 20
    for x, y in zip(jax.tree.leaves(ref.params), jax.tree.leaves(res.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(pure(ref_model)), jax.tree.leaves(pure(model_b))):
        assert np.array_equal(x, y)

    rec_a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    rec_b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rec_b] == list(range(1, 21))  # no duplicates, no gaps
    assert rec_a == rec_b
    assert [r["step"] for r in res.history] == list(range(1, 21))

    # a finished run resumed again does nothing
    again = train(tiny_model(lora_seed=5, dropout=0.2), data, cfg, workdir=tmp_path / "b")
    assert again.final_step == 20
    for x, y in zip(jax.tree.leaves(ref.params), jax.tree.leaves(again.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_stop_at_and_resume(tmp_path):
    data = succ_data(24, 2)
    cfg = _resume_cfg()
    ref = train(tiny_model(dropout=0.2), data, cfg)  # no workdir
    part = train(tiny_model(dropout=0.2), data, cfg, workdir=tmp_path, stop_at=7)
    assert part.final_step == 7
    res = train(tiny_model(lora_seed=42, dropout=0.2), data, cfg, workdir=tmp_path)
    for x, y in zip(jax.tree.leaves(ref.params), jax.tree.leaves(res.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 21))
    assert read_metrics(tmp_path / "metrics.jsonl") == ref.history
    # dropout is active in training: a different seed gives different params
    other = train(tiny_model(dropout=0.2), data, TrainConfig.from_dict({**cfg.to_dict(), "total_steps": 20,
                                                                      "seed": 12}))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(ref.params), jax.tree.leaves(other.params)))


def test_callback_step_zero_and_params():
    seen = []
    model = tiny_model(dropout=0.2)
    init = pure(model, nnx.LoRAParam)
    train(model, succ_data(16), _resume_cfg(), stop_at=3,
          callback=lambda s, p: seen.append((s, jax.tree.map(np.asarray, p))))
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    for x, y in zip(jax.tree.leaves(init), jax.tree.leaves(seen[0][1])):
        assert np.array_equal(x, y)
    # warmup: update 1 has learning rate schedule(0) = 0, so params move from step 2 on
    for x, y in zip(jax.tree.leaves(seen[0][1]), jax.tree.leaves(seen[1][1])):
        assert np.array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(seen[1][1]), jax.tree.leaves(seen[2][1])))


def test_dropout_streams_reseeded_per_step():
    from ntk_jax.training.trainer import _reseed_streams

    model = tiny_model(dropout=0.5)

    def keys(step):
        _reseed_streams(model, jax.random.fold_in(jax.random.key(0), step))
        return [np.asarray(jax.random.key_data(node.key[...])).tobytes()
                for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)]

    k0, k1, k0b = keys(0), keys(1), keys(0)
    assert len(k0) == 4  # q_proj and v_proj of two layers
    assert len(set(k0)) == 4 and not set(k0) & set(k1) and k0 == k0b
