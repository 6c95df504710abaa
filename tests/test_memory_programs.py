"""The selection-job programs of ``estimate_memory`` (hidden / projected / jvp / train) and
the CPU bf16 upcast count, on a tiny decoder and one device (docs/theory.md §8.3; docs/scale.md)."""
from __future__ import annotations

import numpy as np
import pytest

from ntk_jax.models.lora import LoRAConfig
from ntk_jax.launcher.memory import abstract_model, cpu_upcast_bytes, decoder_config, estimate_memory
from ntk_jax.models.transformer import DecoderConfig

CFG = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=48)
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj"))


def test_cpu_upcast_bytes_closed_form():
    """4 bytes per element of every 2-D non-embedding parameter, split only by ``model``."""
    c = decoder_config(CFG)  # bf16
    m = abstract_model(c, LORA)
    H, I, V, L, r = 32, 48, 64, 4, 4
    q, kv = 4 * 8, 2 * 8
    per_layer = H * q + 2 * H * kv + q * H + 3 * H * I
    lora = r * ((H + q) + (H + kv) + (q + H))
    one = 4 * (L * (per_layer + lora) + H * V)  # + lm_head
    assert cpu_upcast_bytes(m, (1, 1)) == one
    assert cpu_upcast_bytes(m, (4, 1)) == one  # FSDP weights are all-gathered before the matmul
    # model=2: every kernel and lm_head split; LoRA: lora_b of q/v and lora_a of o split, the rest whole
    split_lora = r * ((H + q // 2) + (H + kv // 2) + (q // 2 + H))
    assert cpu_upcast_bytes(m, (1, 2)) == 4 * (L * (per_layer // 2 + split_lora) + H * V // 2)
    assert cpu_upcast_bytes(m, (1, 1), dtype="float32") == 0


def test_job_programs_outputs():
    n, T, p, b = 4, 8, 16, 2
    programs = ("hidden", "loss", "projected", "jvp", "train")  # forward / features: test_sharding's memory table
    r = estimate_memory(CFG, LORA, mesh_shape=(1, 1), batch_size=n, seq_len=T, dtype="float32",
                        param_dtype="float32", programs=programs, projection_dim=p, train_batch_size=b)
    assert r["programs"] == list(programs) and set(r["totals"]) == set(programs)
    P = r["params"]["lora_params"]
    weights = r["params"]["base_bytes"] + r["params"]["lora_bytes"]
    # outputs are exactly the documented results of each program (float32)
    assert r["hidden"]["output"] == n * 32 * 4          # (n, hidden) mean hidden states
    assert r["projected"]["output"] == n * p * 4        # (n, p) projected features
    assert r["jvp"]["output"] == n * 4                  # (n,) directional derivatives
    assert r["loss"]["output"] == n * 4                 # (n,) per-record losses
    assert r["loss"]["temp"] >= n * T * CFG.vocab_size * 4  # the logits over the vocabulary
    # the train step takes the weights, the LoRA factors twice more (AdamW moments) and the batch
    assert r["train"]["argument"] >= weights + 2 * 4 * P + 4 * b * T * 4
    assert r["train"]["output"] >= 3 * 4 * P            # new params and moments
    assert r["peak_per_device"] == max(r["totals"].values())
    assert r["cpu_upcast_bytes"] == 0 and r["device_totals"] == r["totals"]  # float32: nothing to subtract
    for prog in programs:  # compiled at 1 and 2 layers, extrapolated to the 4 of the model
        one, two = r["measured"]["1"][prog], r["measured"]["2"][prog]
        assert r[prog]["argument"] == pytest.approx(one["argument"] + 3 * (two["argument"] - one["argument"]))


def test_program_errors():
    with pytest.raises(ValueError, match="unknown program"):
        estimate_memory(CFG, LORA, programs=("forward", "backward"), batch_size=2, seq_len=4)
    with pytest.raises(ValueError, match="take gradients over LoRA factors"):
        estimate_memory(CFG, None, programs=("jvp",), batch_size=2, seq_len=4)
    with pytest.raises(ValueError, match="train_batch_size=3 is not a multiple"):
        estimate_memory(CFG, LORA, mesh_shape=(2, 1), programs=("train",), batch_size=2, train_batch_size=3,
                        seq_len=4, compile=False)
    assert np.isfinite(estimate_memory(CFG, None, programs=("hidden",), batch_size=2, seq_len=4)["peak_per_device"])
