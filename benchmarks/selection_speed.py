"""Speed of NTK-Selector feature extraction (per-example gradients + projection) on the tiny model.

    python benchmarks/selection_speed.py [--n 1024] [--batch-size 256] [--sizes 1024,4096,16384]
                                         [--projection-dim 8192] [--repeats 2] [--quick]
                                         [--hidden H] [--layers L] [--seq-len T]

Everything runs in ONE process on the SAME model, LoRA weights and pool:

* model: the embedded default architecture (``ntk_jax.launcher.config_lib.model_config``:
  Llama-style decoder, hidden 64, 3 layers, 4 heads / 2 kv heads, MLP 128, vocab 50 of
  ``CharTokenizer``), random init, built FIRST as a ``transformers`` ``LlamaForCausalLM``
  (seed ``--seed``), written with ``save_pretrained`` and loaded into JAX with
  ``ntk_jax.models.hf_loading.from_pretrained`` (so both sides hold the very same weights); LoRA r=8,
  alpha 16 on ``q_proj``/``v_proj`` of every layer (``b_init_std=0.02``, so the gradient wrt
  ``A`` is not zero), P = 5376 LoRA parameters; the same A/B values are copied to the
  PyTorch side, where LoRA is added by hand (``y = base(x) + (alpha/r)·(x A) B``).
  ``--hidden`` / ``--layers`` widen / deepen it (MLP 2× hidden) and ``--seq-len`` repeats each
  record's tokens to that length, to see how the shares move on a larger model
  (docs/selection.md, Cost).
* pool: ``ntk_jax.data.synthetic.make_corpus`` over every synthetic task, encoded with
  ``ntk_jax.data.encoding.encode_examples`` (right padding; ``loss_mask`` on the response).
* features (ours): exactly the NTK-Selector composition
  ``gradient_features(sum_of_outputs(lm_output_fn(subset, reduce="mean")), subset.params, batch,
  projection=RandomProjection(p, seed))`` — the length-normalised sum-of-logits gradient over
  the LoRA parameters, Rademacher-projected to p (default 8192).
* (a) the floor: a plain LoRA training step (optax AdamW, masked next-token cross-entropy,
  ``ntk_jax.training.losses.masked_lm_loss``) on the same tokens and the same batch size.
  Scoring needs one forward + backward per candidate, so this is the cost to beat.
* (b) the LESS-style PyTorch peer: per-example gradients of the same scalar with
  ``torch.func.vmap(torch.func.grad(...))`` over ``functional_call`` of the HF model, then the
  same Rademacher projection (the very same ``(P, p)`` matrix, rows in our parameter order,
  held in memory as ours is) with one GEMM per batch. ``torch.set_num_threads`` = the cores
  JAX's CPU backend uses. The attention mask is not passed on the torch side: with right
  padding and causal attention, padding never influences a real position, and pad positions
  carry no loss mask (the agreement check below verifies the features are the same).

* ours, scores only: the NTK-Selector score ``s_j = mean_i ⟨F_i, F_j⟩ = ⟨F_j, u⟩`` (u = mean
  projected feature of the domain set, here the first batch of the pool) needs no feature
  matrix: ``⟨Πᵀ g_j, u⟩ = ⟨g_j, Π u⟩`` is one forward-mode JVP of the scalar along ``Π u``
  (``RandomProjection.adjoint`` + ``ntk_jax.kernels.features.directional_derivatives``), with no
  per-example gradient and no projection per candidate. Reported as ``ours_scores_jvp``; its
  agreement with the features' ``F @ u`` is checked.
* ours, label-aware scores (docs/theory.md §6.5, ``select.ntk.output="loss"``): the same JVP of the
  per-example loss instead of the sum of logits (``ours_scores_label_aware_jvp``), and the
  normalised form that needs each candidate's gradient norm, one per-example gradient per
  candidate (``ours_scores_label_aware_normalised``); ratios to ``ours_scores_jvp``.

* ours, factored projection (``factored_projection``): the same scalar's gradient projected by
  ``FactoredProjection(p, seed)`` (per-layer Kronecker JL map applied to the layers' inputs
  and output gradients, and the sparse sign hash of the formed gradients of small sites such as
  the LoRA factors; ``ntk_jax.kernels.factored_projection``), timed round-robin with the same
  map with every site on its Kronecker factors (``sparse_sites=False``,
  ``ours_features_kronecker_only``), the train step, the torch.func peer and the dense
  features; and the Spearman correlation of the NTK-Selector scores of each projection with
  the unprojected (exact) scores and of the factored with the dense one's.

Agreement: on a few examples both sides' UNPROJECTED per-example gradients (same definition)
are compared (max relative difference), and the projected features too.

Timing: every method first runs one batch (compile / warm-up, reported separately), then the
pool of ``--n`` candidates in batches of ``--batch-size``, ``--repeats`` times round-robin
(median reported); candidates/s = n / time. Pool scaling: our feature extraction over pools of
``--sizes`` candidates (one timed pass each after warm-up), a least-squares line
time = a + b·n with its R², and the time per candidate at each size.

``--factored-only`` runs just the ``factored_projection`` section (after the same set-up).

Data pipeline (``data_pipeline``; ``--data-only`` runs just this): what the selection job does
to a pool before and besides the model, on ONE core (one record at a time, as the job does):
``--data-records`` chat records (``messages``: an optional system turn, 1-3 user/assistant
turns of 20-120 / 40-250 words of a 2000-word vocabulary; byte-level BPE tokenizer trained
here, 4000 tokens, Llama-3 specials and chat template) written to a JSONL file, then

* read: ``read_records`` (records/s; Python heap per record by ``tracemalloc``, reported as GB
  per million records);
* the length pre-pass: ``length_profile`` (records/s) with the chat template and with the
  plain rendering (``chat_template=False``);
* encode: ``encode_records`` at ``--data-max-len`` (default 1024) with ``truncation="left"``, in
  blocks of 64, with and without the template (records/s);

extrapolated to 1.8M records (read + pre-pass + encode, one core), next to the accelerator's
scoring rate *estimated* in docs/cost_model.md (1.8M records of 1024 tokens in 41 H100-hours at
40 % MFU: no accelerator has run it).

The ``torch.func`` peer runs on CUDA beside a GPU JAX when this PyTorch build has it
(``benchmarks/peers.py``); the report says where (``torch_device``) and whether the comparison is
like for like (``like_for_like``).

Prints one JSON object on stdout (progress and notes go to stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ntk_jax.data.encoding import encode_examples, max_length
from ntk_jax.data.synthetic import TASKS, make_corpus
from ntk_jax.data.tokenizer import CharTokenizer
from ntk_jax.kernels.features import (directional_derivatives, gradient_features, gradient_inner_products,
                                      scalar_values)
from ntk_jax.kernels.factored_projection import FactoredProjection
from ntk_jax.kernels.projection import RandomProjection
from ntk_jax.launcher.config_lib import model_config
from ntk_jax.models.hf_loading import from_pretrained
from ntk_jax.models.lora import LoRAConfig, lora_filter
from ntk_jax.models.subset import param_subset
from ntk_jax.selection.ntk_selector import mean_hidden_states, ntk_scalar_fn, selection_scalar_fn
from ntk_jax.training.losses import masked_lm_loss
from peers import like_for_like, torch_device

LORA = LoRAConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"), b_init_std=0.02)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def jax_cpu_threads() -> int:
    """Cores JAX's CPU backend runs on (its thread pool spans every core the process may use)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --- problem ---------------------------------------------------------------------------------


def hf_llama_config(vocab_size: int, arch: dict | None = None) -> dict:
    """``transformers.LlamaConfig`` kwargs of the embedded default architecture."""
    arch = dict(model_config().arch) if arch is None else arch
    return dict(vocab_size=vocab_size, hidden_size=arch["hidden_size"],
                intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_layers"],
                num_attention_heads=arch["num_heads"], num_key_value_heads=arch["num_kv_heads"],
                max_position_embeddings=arch["max_position_embeddings"], rms_norm_eps=1e-6,
                tie_word_embeddings=False)


def bench_arch(hidden: int | None = None, layers: int | None = None, seq_len: int = 0) -> dict:
    """The embedded default architecture, optionally wider (``hidden``; MLP 2× hidden, 4
    heads / 2 kv heads as the default), deeper (``layers``) and with positions for ``seq_len``."""
    arch = dict(model_config().arch)
    if hidden:
        arch.update(hidden_size=int(hidden), intermediate_size=2 * int(hidden))
    if layers:
        arch.update(num_layers=int(layers))
    arch["max_position_embeddings"] = max(int(arch["max_position_embeddings"]), int(seq_len))
    return arch


def build_models(seed: int, directory: str, arch: dict | None = None):
    """The HF Llama (torch, eval, float32) and our port of the same checkpoint with LoRA.

    Returns ``(hf_model, jax_model, subset, tokenizer)``.
    """
    import torch
    import transformers

    tokenizer = CharTokenizer()
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **hf_llama_config(tokenizer.vocab_size, arch), attn_implementation="eager")).eval()
    hf.save_pretrained(directory)
    model = from_pretrained(directory, lora=LORA, rngs=nnx.Rngs(seed + 1))
    subset = param_subset(model, lora_filter())
    return hf, model, subset, tokenizer


def make_pool(tokenizer, n: int, seed: int) -> dict:
    """``n`` synthetic records over every task, encoded (numpy arrays ``(n, T)``)."""
    per_task = -(-n // len(TASKS))
    records = make_corpus(list(TASKS), per_task, seed=seed)[:n]
    return encode_examples(tokenizer, records, max_length(tokenizer, records))


def ntk_selector_scalar_fn(subset):
    """The NTK-Selector scalar (length-normalised sum of logits over the response positions),
    as the selection code builds it (``ntk_jax.selection.ntk_selector.ntk_scalar_fn``)."""
    return ntk_scalar_fn(subset)


def model_batch(pool: dict) -> dict:
    return {k: jnp.asarray(pool[k]) for k in ("input_ids", "attention_mask", "loss_mask")}


def take(pool: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in pool.items()}


def lengthen(pool: dict, seq_len: int) -> dict:
    """Every row's real tokens (``attention_mask == 1``; right padding) repeated cyclically
    to ``seq_len`` positions, with every per-position array (``loss_mask``, ...) repeated the
    same way and ``attention_mask`` all ones: no padding inside a row, so the PyTorch peer
    (which is given no mask) computes the same function (timing at longer sequences than the
    synthetic records; ``seq_len <= T``: unchanged)."""
    T = pool["input_ids"].shape[1]
    if seq_len <= T:
        return pool
    lengths = np.asarray(pool["attention_mask"]).sum(axis=1).astype(int)
    if lengths.min() < 1:
        raise ValueError("lengthen: a row has no real token")
    idx = np.arange(seq_len)[None, :] % lengths[:, None]  # (n, seq_len): cyclic over the real part
    out = {k: (np.take_along_axis(np.asarray(v), idx, axis=1) if np.ndim(v) == 2 and v.shape[1] == T else v)
           for k, v in pool.items()}
    out["attention_mask"] = np.ones_like(out["attention_mask"])
    return out


def tile_pool(pool: dict, n: int) -> dict:
    """The first ``n`` rows of ``pool`` repeated cyclically (timing pools larger than the corpus)."""
    m = len(pool["input_ids"])
    idx = np.arange(n) % m
    return {k: v[idx] for k, v in pool.items()}


# --- (a) the floor: a plain LoRA training step -------------------------------------------------


def make_train_runner(subset, batch_size: int, learning_rate: float = 1e-3):
    """``run(pool) -> loss``: one AdamW step of the LoRA params per batch over the whole pool."""
    opt = optax.adamw(learning_rate)

    def loss_fn(params, batch):
        logits = subset.merge(params)(batch["input_ids"], attention_mask=batch["attention_mask"])
        return masked_lm_loss(logits.astype(jnp.float32), batch["targets"], batch["loss_mask"])

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def run(pool: dict):
        params, opt_state = subset.params, opt.init(subset.params)
        n = len(pool["input_ids"])
        loss = None
        for start in range(0, n, batch_size):
            batch = {k: jnp.asarray(v) for k, v in take(pool, start, start + batch_size).items()}
            if len(batch["input_ids"]) < batch_size:  # keep one compiled shape
                batch = {k: jnp.concatenate([v, v[: batch_size - len(v)]]) for k, v in batch.items()}
            params, opt_state, loss = step(params, opt_state, batch)
        return jax.block_until_ready(loss)

    return run


# --- ours ------------------------------------------------------------------------------------


def make_ours_runner(subset, projection, batch_size: int):
    scalar_fn = ntk_selector_scalar_fn(subset)  # one function: gradient_features reuses its compile

    def run(pool: dict) -> np.ndarray:
        return gradient_features(scalar_fn, subset.params, model_batch(pool), projection=projection,
                                 batch_size=batch_size, progress_desc="features (ours)")

    return run


def make_ours_score_runner(subset, tangent, batch_size: int, output: str = "sum_of_logits", normalized=False):
    """Scores only: ``s_j = ⟨Πᵀ g_j, u⟩ = ⟨g_j, Π u⟩`` as one JVP per batch along ``Π u``
    (``output="loss"``: the label-aware score of docs/theory.md §6.5, g the per-example loss gradient);
    ``normalized``: one per-example gradient per candidate instead, giving ⟨g_j, t⟩ and ‖g_j‖
    (the cosine / candidate-norm variants)."""
    scalar_fn = selection_scalar_fn(subset, output, "mean")
    keys = ("input_ids", "attention_mask", "loss_mask", "targets")

    def run(pool: dict) -> np.ndarray:
        x = {k: jnp.asarray(pool[k]) for k in keys}
        if normalized:
            dots, sq = gradient_inner_products(scalar_fn, subset.params, x, tangent, batch_size=batch_size,
                                               progress_desc=f"scores (ours, {output}, normalised)")
            return dots / np.sqrt(np.maximum(sq, 1e-30))
        return directional_derivatives(scalar_fn, subset.params, x, tangent,
                                       batch_size=batch_size, progress_desc=f"scores (ours, {output}, JVP)")

    return run


def make_loss_change_runner(subset, batch_size: int):
    """The recommended pipeline's pool-wide stage (docs/theory.md §6.7): each candidate's
    response loss at two parameter points (θ_0 = the LoRA factors as built, θ_w = the same
    shifted by a fixed random amount, standing in for the warm-up), forward passes only
    (:func:`ntk_jax.kernels.features.scalar_values`); returns Δ."""
    scalar_fn = selection_scalar_fn(subset, "loss", "mean")
    rng = np.random.default_rng(0)
    shifted = jax.tree.map(lambda a: a + jnp.asarray(0.01 * rng.standard_normal(a.shape), a.dtype), subset.params)
    keys = ("input_ids", "attention_mask", "loss_mask", "targets")

    def run(pool: dict) -> np.ndarray:
        x = {k: jnp.asarray(pool[k]) for k in keys}
        l0, lw = (scalar_values(scalar_fn, p, x, batch_size=batch_size, progress_desc="loss change (ours)")
                  for p in (subset.params, shifted))
        return l0 - lw

    return run


def make_embedding_runner(model, batch_size: int):
    """The kNN filter's pass: mean final hidden states of every candidate
    (:func:`ntk_jax.selection.ntk_selector.mean_hidden_states`), a forward pass without the LM
    head."""
    def run(pool: dict) -> np.ndarray:
        return mean_hidden_states(model, pool, batch_size=batch_size)

    return run


def pipeline_costs(seconds: dict, pool_over_n: int) -> dict:
    """Time per pool candidate of the selection pipelines on a pool of ``pool_over_n · N``,
    from the per-candidate times measured in the same rounds, against a train step on the same
    tokens: ``knn_loss_change`` (the recommended pipeline: the kNN forward of every candidate,
    then two forward passes of the 4N kept), ``loss_change`` (two forward passes of every
    candidate), ``staged`` (+ the normalised label-aware score at two points on the top 4N),
    ``gradient`` (the normalised score at two points on every candidate), ``paper`` (the kNN
    forward of every candidate + its JVP score on 4N)."""
    kept = 4.0 / pool_over_n
    lc = seconds["ours_loss_change"]
    knn = seconds["ours_knn_embeddings"]
    grad = 2.0 * seconds["ours_scores_label_aware_normalised"]
    out = {"knn_loss_change": knn + kept * lc, "loss_change": lc, "staged": lc + kept * grad, "gradient": grad,
           "paper": knn + kept * seconds["ours_scores_jvp"]}
    return {"pool_over_n": pool_over_n,
            "time_vs_train_step": {k: v / seconds["train_step_floor"] for k, v in out.items()}}


# --- (b) the torch.func peer -----------------------------------------------------------------


def lora_param_names(subset) -> list[tuple[str, tuple]]:
    """``(torch name, leaf shape)`` of every LoRA leaf, in JAX leaf order."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(subset.params):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        _, layer, _, proj, _, which = keys
        out.append((f"model.layers.{layer}.self_attn.{proj}.{which}", tuple(leaf.shape)))
    return out


def attach_torch_lora(hf, subset) -> dict:
    """Adds LoRA by hand to the HF model's q/v projections with our A, B values; returns the
    LoRA parameters as ``{torch name: tensor}`` in JAX leaf order."""
    import torch

    scale = LORA.alpha / LORA.rank

    class LoRALinear(torch.nn.Module):
        def __init__(self, base, a, b):
            super().__init__()
            self.base = base
            self.lora_a = torch.nn.Parameter(torch.tensor(np.asarray(a)))  # (in, r)
            self.lora_b = torch.nn.Parameter(torch.tensor(np.asarray(b)))  # (r, out)

        def forward(self, x):
            return self.base(x) + scale * (x @ self.lora_a) @ self.lora_b

    for i, layer in enumerate(hf.model.layers):
        for proj in LORA.targets:
            leaves = subset.params["layers"][i]["self_attn"][proj]["lora"]
            setattr(layer.self_attn, proj, LoRALinear(getattr(layer.self_attn, proj),
                                                       leaves["lora_a"], leaves["lora_b"]))
    hf.to(torch_device())  # after the adapters exist, so they move too
    named = dict(hf.named_parameters())
    names = [n for n, _ in lora_param_names(subset)]
    for p in hf.parameters():
        p.requires_grad_(False)
    return {n: named[n].detach() for n in names}


def make_torch_runner(hf, lora_params: dict, matrix: np.ndarray | None, batch_size: int):
    """``features(pool) -> (n, P)`` (``matrix`` None) or ``(n, p)``: torch.func per-example grads
    of the same scalar, flattened in JAX leaf order, times the same projection matrix."""
    import torch
    from torch.func import functional_call, grad, vmap

    names = list(lora_params)
    device = next(hf.parameters()).device
    M = None if matrix is None else torch.tensor(np.asarray(matrix, np.float32), device=device)

    def scalar(params, ids, loss_mask):
        logits = functional_call(hf, params, (ids[None],)).logits[0]  # (T, V)
        m = loss_mask.to(logits.dtype)
        return (logits.sum(-1) * m).sum() / m.sum().clamp(min=1.0)

    per_example = vmap(grad(scalar), in_dims=(None, 0, 0))

    @torch.no_grad()
    def block(ids, mask):
        with torch.enable_grad():
            g = per_example(lora_params, ids, mask)
        flat = torch.cat([g[n].reshape(ids.shape[0], -1) for n in names], dim=1)
        return flat if M is None else flat @ M

    def run(pool: dict) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(pool["input_ids"], np.int64)).to(device)
        mask = torch.from_numpy(np.asarray(pool["loss_mask"], np.float32)).to(device)
        out = []
        for start in range(0, len(ids), batch_size):
            stop = min(start + batch_size, len(ids))
            out.append(block(ids[start:stop], mask[start:stop]).cpu().numpy())  # waits for CUDA
        return np.concatenate(out, axis=0)

    return run


# --- timing ----------------------------------------------------------------------------------


def warm_up(runners: dict, warm_pool: dict) -> dict:
    """One batch through every runner (compilation, first-call overheads): seconds each."""
    warm = {}
    for name, run in runners.items():
        t = time.perf_counter()
        run(warm_pool)
        warm[name] = time.perf_counter() - t
        log(f"[warm-up] {name}: {warm[name]:.2f} s")
    return warm


def time_rounds(runners: dict, pool: dict, repeats: int) -> dict:
    """``repeats`` rounds over ``pool``, one pass per runner per round (round-robin, so load
    from other processes affects all alike). Returns the median seconds per runner."""
    times = {k: [] for k in runners}
    for r in range(repeats):
        for name, run in runners.items():
            t = time.perf_counter()
            run(pool)
            times[name].append(time.perf_counter() - t)
        log(f"[round {r + 1}/{repeats}] " + ", ".join(f"{k}={v[-1]:.2f}s" for k, v in times.items()))
    return {k: float(np.median(v)) for k, v in times.items()}


def linear_fit(sizes, seconds) -> dict:
    """Least-squares ``t = a + b·n``: intercept a (s), slope b (s/candidate), R²."""
    n, t = np.asarray(sizes, float), np.asarray(seconds, float)
    b, a = np.polyfit(n, t, 1)
    resid = t - (a + b * n)
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else 1.0
    return dict(intercept_s=float(a), slope_s_per_candidate=float(b), r2=r2)


def max_rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


# --- main ------------------------------------------------------------------------------------


# --- data pipeline ----------------------------------------------------------------------------
PAPER_POOL = 1_800_000
# docs/cost_model.md (estimate, not a measurement): one H100 SXM scores 1.8M records of 1024 tokens
# of an 8B model in 41 hours at 40 % MFU.
H100_HOURS_PER_PAPER_POOL = 41.0
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def pipeline_vocabulary(seed: int, n_words: int = 2000) -> list[str]:
    """``n_words`` pseudo-words of 2-9 lowercase letters (BPE splits the rarer ones)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(n_words)]


def chat_records(n: int, seed: int) -> list[dict]:
    """``n`` ``messages`` records (see the module docstring), Zipf-like word frequencies."""
    rng = np.random.default_rng(seed)
    words = np.array(pipeline_vocabulary(seed))
    weights = 1.0 / np.arange(1, words.size + 1)
    weights /= weights.sum()

    def text(lo, hi):
        return " ".join(rng.choice(words, size=int(rng.integers(lo, hi)), p=weights))

    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": text(5, 20)}] if rng.random() < 0.5 else []
        for _ in range(int(rng.integers(1, 4))):
            msgs += [{"role": "user", "content": text(20, 120)}, {"role": "assistant", "content": text(40, 250)}]
        out.append({"id": f"r{i}", "messages": msgs})
    return out


def pipeline_tokenizer(records: list[dict]):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (4000 tokens, Llama-3 specials and chat
    template) trained on the first records."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=list(LLAMA3_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((m["content"] for r in records[:2000] for m in r["messages"]), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA3_SPECIALS[0],
                                                eos_token=LLAMA3_SPECIALS[1], pad_token=LLAMA3_SPECIALS[1])
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def _rate(fn, n: int) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return n / (time.perf_counter() - t), out


def data_pipeline(n: int, seed: int, max_len: int = 1024, block: int = 64) -> dict:
    """Records/s of reading, the length pre-pass and encoding a ``messages`` pool, and host
    memory per million records (see the module docstring), extrapolated to 1.8M records."""
    import tracemalloc

    from ntk_jax.data.records import encode_records, length_profile, read_records

    records = chat_records(n, seed)
    tok = pipeline_tokenizer(records)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pool.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        file_bytes = os.path.getsize(path)
        read_rate, recs = _rate(lambda: read_records(path), n)
        tracemalloc.start()
        held = read_records(path)
        heap_bytes = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del held
    out = dict(records=n, file_mb=file_bytes / 1e6, max_len=max_len, read_per_s=read_rate,
               heap_bytes_per_record=heap_bytes / n, heap_gb_per_million=heap_bytes / n * 1e6 / 1e9,
               profile_gb_per_million=4 * 8 * 1e6 / 1e9)
    for name, template in (("chat_template", "auto"), ("plain", False)):
        pre_rate, profile = _rate(lambda: length_profile(tok, recs, chat_template=template), n)
        enc_rate, _ = _rate(lambda: [encode_records(tok, recs[lo:lo + block], max_len, chat_template=template,
                                                    truncation="left") for lo in range(0, n, block)], n)
        lengths = profile[:, 0]
        job_s = PAPER_POOL / read_rate + PAPER_POOL / pre_rate + PAPER_POOL / enc_rate
        out[name] = dict(length_prepass_per_s=pre_rate, encode_per_s=enc_rate,
                         tokens_per_record_mean=float(lengths.mean()),
                         tokens_per_record_p99=float(np.percentile(lengths, 99)),
                         over_max_len=float((lengths > max_len).mean()),
                         paper_pool_one_core_s=dict(read=PAPER_POOL / read_rate, length_prepass=PAPER_POOL / pre_rate,
                                                    encode=PAPER_POOL / enc_rate, total=job_s))
        log(f"[data] {name}: read {read_rate:.0f}/s, pre-pass {pre_rate:.0f}/s, encode {enc_rate:.0f}/s, "
            f"{lengths.mean():.0f} tokens/record")
    h100 = PAPER_POOL / (H100_HOURS_PER_PAPER_POOL * 3600)
    out["accelerator_estimate"] = dict(source="docs/cost_model.md (estimated, 40 % MFU; no accelerator has run it)",
                                       h100_records_per_s=h100, gpu8_records_per_s=8 * h100,
                                       paper_pool_h100_hours=H100_HOURS_PER_PAPER_POOL)
    slowest = min(out["chat_template"]["length_prepass_per_s"], out["chat_template"]["encode_per_s"])
    out["data_vs_one_h100"] = 1.0 / (1.0 / out["chat_template"]["length_prepass_per_s"]
                                     + 1.0 / out["chat_template"]["encode_per_s"]) / h100
    out["bottleneck"] = "accelerator" if slowest / 2 > 8 * h100 else "data pipeline"
    out["paper_pool_host_memory_gb"] = out["heap_gb_per_million"] * PAPER_POOL / 1e6
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024, help="candidates in the timed pool")
    p.add_argument("--batch-size", type=int, default=256, help="examples per step / feature block")
    p.add_argument("--sizes", type=str, default="1024,4096,16384", help="pool sizes of the scaling run")
    p.add_argument("--projection-dim", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n-check", type=int, default=4, help="examples of the cross-implementation check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=0, help="hidden size (0: the embedded default's)")
    p.add_argument("--layers", type=int, default=0, help="layers (0: the embedded default's)")
    p.add_argument("--seq-len", type=int, default=0,
                   help="tokens per candidate, the records repeated along the sequence (0: as generated)")
    p.add_argument("--pool-over-n", type=int, default=50,
                   help="pool size / N for the per-candidate cost of the selection pipelines (the 8B configs: 200)")
    p.add_argument("--data-records", type=int, default=20000, help="records of the data-pipeline pool")
    p.add_argument("--data-max-len", type=int, default=1024, help="encoding length of the data pipeline")
    p.add_argument("--data-only", action="store_true", help="run only the data-pipeline section")
    p.add_argument("--factored-only", action="store_true",
                   help="run only the factored_projection section (after the same set-up)")
    p.add_argument("--quick", action="store_true",
                   help="n=64, batch 32, sizes 64,128,256, repeats 1, 200 data records (for tests)")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.batch_size, a.sizes, a.repeats, a.data_records = 64, 32, "64,128,256", 1, 200
    a.sizes = [int(s) for s in a.sizes.split(",") if s]
    if a.n <= 0 or a.batch_size <= 0 or a.repeats <= 0 or not a.sizes or min(a.sizes) <= 0:
        p.error("--n, --batch-size, --repeats and every --sizes entry must be positive")
    if min(a.hidden, a.layers, a.seq_len) < 0 or a.hidden % 4:
        p.error("--hidden (a multiple of 4 heads), --layers and --seq-len must be >= 0")
    return a


def factored_section(subset, runners, dense_runner, pool, warm_pool, args) -> dict:
    """The factored (Kronecker) projection's features (``FactoredProjection(p, seed)``, the
    per-example gradients of the LoRA factors never formed), timed round-robin with the train
    step floor, the torch.func peer and the dense features; and the Spearman correlation of the
    NTK-Selector scores (domain = the first batch) with the dense projection's."""
    fact = FactoredProjection(args.projection_dim, seed=args.seed)
    fact_runner = make_ours_runner(subset, fact, args.batch_size)
    kron = FactoredProjection(args.projection_dim, seed=args.seed, sparse_sites=False)
    kron_runner = make_ours_runner(subset, kron, args.batch_size)
    warm = warm_up({"ours_features_factored": fact_runner, "ours_features_kronecker_only": kron_runner}, warm_pool)
    timed = {"ours_features_factored": fact_runner, "ours_features_kronecker_only": kron_runner,
             "ours_features": dense_runner,
             "train_step_floor": runners["train_step_floor"], "torch_func_features": runners["torch_func_features"]}
    sec = time_rounds(timed, pool, args.repeats)

    def score_ranks(run):  # NTK-Selector scores, domain = the warm-up batch
        s = run(pool).astype(np.float64) @ run(warm_pool).astype(np.float64).mean(axis=0)
        return np.argsort(np.argsort(s))

    exact = make_ours_runner(subset, None, args.batch_size)  # unprojected per-example gradients
    r_exact, rd, rf, rk = (score_ranks(r) for r in (exact, dense_runner, fact_runner, kron_runner))
    rho = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731 (Spearman: Pearson of ranks)
    return dict(projection=f"FactoredProjection({args.projection_dim}, seed={args.seed})",
                plan=fact.plan(ntk_selector_scalar_fn(subset), subset.params, model_batch(warm_pool))[:4],
                warmup_s=warm, seconds=sec,
                score_spearman_vs_exact={"factored": rho(rf, r_exact), "kronecker_only": rho(rk, r_exact),
                                         "dense": rho(rd, r_exact)},
                speedup_vs_kronecker_only=sec["ours_features_kronecker_only"] / sec["ours_features_factored"],
                candidates_per_s={k: args.n / v for k, v in sec.items()},
                speedup_vs_torch_func=sec["torch_func_features"] / sec["ours_features_factored"],
                speedup_vs_dense_features=sec["ours_features"] / sec["ours_features_factored"],
                ratio_time_vs_train_step=sec["ours_features_factored"] / sec["train_step_floor"],
                score_spearman_vs_dense=rho(rd, rf),
                targets=dict(at_least_1_5x_torch_func=sec["torch_func_features"] >= 1.5 * sec["ours_features_factored"],
                             within_1_2x_train_step=sec["ours_features_factored"] <= 1.2 * sec["train_step_floor"]))


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    if args.data_only:
        report = dict(data_pipeline=data_pipeline(args.data_records, args.seed, args.data_max_len))
        print(json.dumps(report, indent=2))
        return report
    threads = jax_cpu_threads()
    torch.set_num_threads(threads)
    arch = bench_arch(args.hidden, args.layers, args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        hf, model, subset, tokenizer = build_models(args.seed, tmp, arch)
    projection = RandomProjection(args.projection_dim, seed=args.seed)
    corpus = lengthen(make_pool(tokenizer, max(args.n, min(max(args.sizes), 4096)), args.seed), args.seq_len)
    pool = tile_pool(corpus, args.n)
    warm_pool = take(pool, 0, args.batch_size)
    T = int(pool["input_ids"].shape[1])
    log(f"model: P={subset.num_params} LoRA params, pool n={args.n}, T={T}, batch {args.batch_size}, "
        f"p={args.projection_dim}, {threads} threads")

    lora_params = attach_torch_lora(hf, subset)
    matrix = projection.cached_matrix(subset.params)
    matrix = np.asarray(matrix if matrix is not None else projection.matrix(subset.params))
    ours_runner = make_ours_runner(subset, projection, args.batch_size)
    unprojected_runner = make_ours_runner(subset, None, args.batch_size)
    runners = {
        "train_step_floor": make_train_runner(subset, args.batch_size),
        "ours_features": ours_runner,
        "torch_func_features": make_torch_runner(hf, lora_params, matrix, args.batch_size),
        # our per-example gradients without the projection (the model part alone)
        "ours_unprojected_grads": unprojected_runner,
    }
    if args.factored_only:
        warm_up({k: runners[k] for k in ("train_step_floor", "ours_features", "torch_func_features")}, warm_pool)
        report = dict(device=str(jax.devices()[0].platform), torch_device=torch_device(), like_for_like=like_for_like(),
                      model=dict(P=subset.num_params, T=T, **arch),
                      factored_projection=factored_section(subset, runners, ours_runner, pool, warm_pool, args))
        print(json.dumps(report, indent=2))
        return report
    # Scores without materialising features: NTK-Selector's s_j = mean_i <F_i, F_j> = <F_j, u>
    # with u the mean projected feature of a domain set (here: the first batch of the pool)
    # equals the JVP of s(x_j) along Π u (``RandomProjection.adjoint``).
    warm = warm_up(runners, warm_pool)
    u = ours_runner(warm_pool).mean(axis=0)
    tangent = projection.adjoint(u, subset.params)
    runners["ours_scores_jvp"] = make_ours_score_runner(subset, tangent, args.batch_size)
    # the label-aware score (docs/theory.md §6.5) along the same kind of direction: JVP of the loss, and
    # the normalised form (per-example gradient: inner product and norm)
    runners["ours_scores_label_aware_jvp"] = make_ours_score_runner(subset, tangent, args.batch_size, "loss")
    runners["ours_scores_label_aware_normalised"] = make_ours_score_runner(subset, tangent, args.batch_size, "loss",
                                                                           normalized=True)
    runners["ours_loss_change"] = make_loss_change_runner(subset, args.batch_size)
    runners["ours_knn_embeddings"] = make_embedding_runner(subset.merge(subset.params), args.batch_size)
    warm.update(warm_up({k: runners[k] for k in ("ours_scores_jvp", "ours_scores_label_aware_jvp",
                                                 "ours_scores_label_aware_normalised", "ours_loss_change",
                                                 "ours_knn_embeddings")},
                        warm_pool))

    # Cross-implementation agreement (same definition: unprojected, then projected), on the
    # first --n-check candidates (ours at the compiled batch shape).
    n_check = min(args.n_check, args.batch_size)
    ours_raw = unprojected_runner(warm_pool)[:n_check]
    ours_proj = ours_runner(warm_pool)[:n_check]
    check = take(pool, 0, n_check)
    torch_raw = make_torch_runner(hf, lora_params, None, n_check)(check)
    torch_proj = make_torch_runner(hf, lora_params, matrix, n_check)(check)
    feats_full = ours_runner(warm_pool)
    agreement = dict(scores_jvp_vs_features_max_rel_diff=max_rel_diff(runners["ours_scores_jvp"](warm_pool),
                                                                      feats_full.astype(np.float64) @ u),
                     unprojected_max_rel_diff=max_rel_diff(torch_raw, ours_raw),
                     projected_max_rel_diff=max_rel_diff(torch_proj, ours_proj),
                     n_examples=n_check, feature_norm_mean=float(np.linalg.norm(ours_raw, axis=1).mean()))
    log(f"agreement: {agreement}")
    if agreement["unprojected_max_rel_diff"] > 1e-3:
        raise SystemExit(f"the PyTorch peer's per-example gradients differ from ours (max relative difference "
                         f"{agreement['unprojected_max_rel_diff']:.3g}): the two sides do not compute the same "
                         "function, so their timings would not compare the same work")

    seconds = time_rounds(runners, pool, args.repeats)
    cps = {k: args.n / v for k, v in seconds.items()}
    factored = factored_section(subset, runners, ours_runner, pool, warm_pool, args)

    # Pool-size scaling of our feature extraction (warm: the compiled shape is reused).
    ours = runners["ours_features"]
    scaling = []
    for size in args.sizes:
        big = tile_pool(corpus, size)
        t = time.perf_counter()
        ours(big)
        dt = time.perf_counter() - t
        scaling.append(dict(n=size, seconds=dt, ms_per_candidate=1e3 * dt / size, candidates_per_s=size / dt))
        log(f"[scaling] n={size}: {dt:.2f} s ({1e3 * dt / size:.3f} ms/candidate)")
    fit = linear_fit([s["n"] for s in scaling], [s["seconds"] for s in scaling])

    dev = jax.devices()[0]
    report = dict(
        device=f"{dev.platform}:{dev.device_kind} ({threads} cores for JAX and torch, {platform.machine()})",
        jax_version=jax.__version__, torch_version=torch.__version__, torch_device=torch_device(),
        like_for_like=like_for_like(),
        model=dict(arch=arch, vocab_size=tokenizer.vocab_size,
                   lora=dict(rank=LORA.rank, alpha=LORA.alpha, targets=list(LORA.targets), layers="all",
                             b_init_std=LORA.b_init_std),
                   P=subset.num_params, source="transformers LlamaForCausalLM -> from_pretrained"),
        settings=dict(n=args.n, batch_size=args.batch_size, seq_len=T, projection_dim=args.projection_dim,
                      repeats=args.repeats, seed=args.seed, quick=args.quick,
                      projection_cached=projection.cached_matrix(subset.params) is not None),
        warmup_s=warm,
        seconds=seconds,
        candidates_per_s=cps,
        ratio_ours_time_vs_floor=seconds["ours_features"] / seconds["train_step_floor"],
        speedup_ours_vs_torch_func=seconds["torch_func_features"] / seconds["ours_features"],
        ratio_scores_jvp_time_vs_floor=seconds["ours_scores_jvp"] / seconds["train_step_floor"],
        ratio_label_aware_jvp_vs_scores_jvp=seconds["ours_scores_label_aware_jvp"] / seconds["ours_scores_jvp"],
        ratio_label_aware_normalised_vs_scores_jvp=(seconds["ours_scores_label_aware_normalised"]
                                                    / seconds["ours_scores_jvp"]),
        targets=dict(within_2x_of_floor=seconds["ours_features"] <= 2 * seconds["train_step_floor"],
                     scores_jvp_within_2x_of_floor=seconds["ours_scores_jvp"] <= 2 * seconds["train_step_floor"],
                     label_aware_jvp_within_1_5x_of_scores_jvp=(seconds["ours_scores_label_aware_jvp"]
                                                                <= 1.5 * seconds["ours_scores_jvp"]),
                     faster_than_torch_func=seconds["ours_features"] < seconds["torch_func_features"]),
        agreement=agreement,
        scaling=dict(points=scaling, linear_fit=fit),
        factored_projection=factored,
        pipelines=pipeline_costs(seconds, args.pool_over_n),
        data_pipeline=data_pipeline(args.data_records, args.seed, args.data_max_len),
    )
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
