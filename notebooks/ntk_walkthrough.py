# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ntk_jax walkthrough: an eNTK, its spectrum, and the Jacobian-free approximation
#
# This notebook builds the tiny decoder transformer of ntk_jax, attaches LoRA adapters,
# and computes the empirical NTK over the LoRA factors with each exact method, then looks
# at its spectrum and compares it with the Jacobian-free (sum-of-logits) kernel.
# It runs top to bottom on a CPU in well under a minute (a test executes it).
# Open it with `jupytext --to notebook notebooks/ntk_walkthrough.py` or run it as a script.

# %%
import numpy as np
from flax import nnx

from ntk_jax.data.encoding import encode_examples
from ntk_jax.data.synthetic import make_corpus
from ntk_jax.data.tokenizer import CharTokenizer
from ntk_jax.models.lora import LoRAConfig, apply_lora, lora_filter
from ntk_jax.models.subset import param_subset
from ntk_jax.models.transformer import DecoderConfig, DecoderLM
from ntk_jax.kernels.ntk import empirical_ntk, jacobian_free_ntk
from ntk_jax.kernels.outputs import lm_output_fn
from ntk_jax.kernels.spectrum import condition_number, eigenvalues, paper_printed_bounds, risk_bounds

# %% [markdown]
# ## Data and model
# A few examples of the synthetic tasks, encoded with the character tokenizer. The batch is a
# dict of arrays with leading axis n; `loss_mask` marks the response positions.

# %%
tokenizer = CharTokenizer()
records = make_corpus(["add", "sentiment", "reverse"], 4, seed=0)
batch = {k: v for k, v in encode_examples(tokenizer, records, max_len=32).items() if k != "targets"}
print([(r["prompt"], r["response"]) for r in records[:3]])

model = DecoderLM(DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2,
                                num_heads=4, intermediate_size=64), rngs=nnx.Rngs(0))
apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj"), b_init_std=0.02), rngs=nnx.Rngs(1))
model.eval()

# %% [markdown]
# ## The parameter subset and `f(params, x)`
# The kernel is taken over the LoRA factors of layer 0 only; everything else is frozen.
# `lm_output_fn` averages the logits over the response positions: `f(params, x)` is `(n, V)`.

# %%
subset = param_subset(model, lora_filter(layers=[0]))
f = lm_output_fn(subset)
print("P =", subset.num_params, "  f(params, x):", f(subset.params, batch).shape)

# %% [markdown]
# ## Exact eNTK, three ways
# Per-example Jacobians contracted (`jacobian`), NTK-vector products (`ntk_vp`), and the
# neural-tangents library through ntk_jax's compat layer. `trace=True` gives `(n, n)`.

# %%
K = {m: empirical_ntk(f, subset.params, batch, method=m) for m in ("jacobian", "ntk_vp", "neural_tangents")}
for m, k in K.items():
    print(f"{m:16s} max rel diff vs jacobian: {np.abs(k - K['jacobian']).max() / np.abs(K['jacobian']).max():.2e}")
K_blocked = empirical_ntk(f, subset.params, batch, block_size=5)
# float32: entries agree to ~1e-7 of the kernel's scale (blocks are padded, so XLA may order sums differently)
print("blocked (5×5 blocks) equal:", np.allclose(K_blocked, K["jacobian"], rtol=1e-5, atol=1e-6 * np.abs(K["jacobian"]).max()))

# %% [markdown]
# ## Spectrum, condition number and the kernel-regression risk bounds
# Targets y = ±1 by task; σ = 1e-4 as in the NTK-spectrum paper. The correct (squared) bounds
# bracket the risk; the paper's printed lower bound need not.

# %%
y = np.array([1.0 if r["task"] == "sentiment" else -1.0 for r in records])
lam = eigenvalues(K["jacobian"])
sigma = 1e-4
lower, risk, upper = risk_bounds(K["jacobian"], y, sigma)
p_lower, p_upper = paper_printed_bounds(K["jacobian"], y, sigma)
print(f"λ_max={lam[-1]:.3g}  λ_min={lam[0]:.3g}  κ={condition_number(K['jacobian'], sigma):.3g}")
print(f"correct: {lower:.3g} ≤ R={risk:.3g} ≤ {upper:.3g};   printed lower {p_lower:.3g} "
      f"({'violated' if p_lower > risk else 'holds'})")

# %% [markdown]
# ## Jacobian-free approximation
# `Θ̃(x, x') = ⟨∇Σ_k f_k(x), ∇Σ_k f_k(x')⟩` needs one backward pass per example. It equals the
# trace plus the cross-output terms; with a random projection to p dims it is approximated
# within the JL error.

# %%
jf = jacobian_free_ntk(f, subset.params, batch)
jf_proj = jacobian_free_ntk(f, subset.params, batch, projection_dim=4096, seed=0)
iu = np.triu_indices(len(records))
print("corr(Θ̃, tr Θ) =", np.corrcoef(jf[iu], K["jacobian"][iu])[0, 1].round(3))
print("projection rel. error =", (np.linalg.norm(jf_proj - jf) / np.linalg.norm(jf)).round(4))
