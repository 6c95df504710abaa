"""docs/theory.md §5.3 — how well the Jacobian-free kernel tracks the exact eNTK (NTK-Selector Fig. 2b).

On ``n_examples`` inputs from several tasks, with the pre-trained base model + LoRA:

* exact full eNTK Θ (n, n, O, O) over the LoRA factors (O = V, response-position-mean
  logits); its trace ``tr Θ`` and the Jacobian-free ``Θ̃ = Σ_{a,b} Θ_ab``;
* Θ̃ computed independently by :func:`jacobian_free_ntk` (exact and JL-projected to each p),
  checked against Σ_{a,b} Θ_ab;
* Pearson and Spearman correlation between Θ̃ and tr Θ over all pairs i ≤ j (and over
  off-diagonal pairs), the relative size of the cross-output terms ‖Θ̃ − tr Θ‖_F / ‖Θ̃‖_F, and
  the mean cosine between different outputs' gradients, cos(∇f_a(x), ∇f_b(x)) for a ≠ b
  (from the diagonal blocks Θ(x, x));
* the same statistics for fresh random-init models of increasing width d (scaling of the
  cross terms, compared with d^(-1/2)); causal-LM model task only.

Model, data and output come from the model task of ``config.model.task``
(:mod:`experiments.model_tasks`): for a classifier O = C (the class logits) and the examples are
lexicon sentences.
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np
import scipy.stats
from flax import nnx

from experiments.model_tasks import make_model_task
from experiments.plotting import save, subplots
from ntk_jax.kernels.ntk import empirical_ntk, jacobian_free_ntk
from ntk_jax.kernels.outputs import lm_output_fn
from ntk_jax.launcher.config_lib import PRETRAIN_TASKS
from ntk_jax.models.lora import LoRAConfig, apply_lora, lora_config
from ntk_jax.models.subset import param_subset
from ntk_jax.models.transformer import DecoderConfig, DecoderLM, load_config
from ntk_jax.utils import progress


def config() -> ml_collections.ConfigDict:
    """docs/theory.md §5.3: Jacobian-free Θ̃ vs exact tr Θ, and cross-output terms vs width."""
    return ml_collections.ConfigDict(dict(
        tasks=PRETRAIN_TASKS,
        n_examples=48,              # all pairs of these examples are compared
        projection_dims=(1024, 8192),
        lora=lora_config(targets=("q_proj", "v_proj"), b_init_std=0.02),
        widths=(16, 32, 64, 128),   # hidden sizes of fresh (random-init) models for the scaling
        n_width_examples=8,
        block_size=16,              # examples per kernel block (bounds memory; each block shape compiles once)
    ))


def output_gradient_cosines(full: np.ndarray) -> np.ndarray:
    """cos(∇f_a(x_i), ∇f_b(x_i)) for a ≠ b, from the diagonal blocks of ``full (n, n, O, O)``:
    all off-diagonal (a, b) entries of every example, flattened."""
    n, _, O, _ = full.shape
    blocks = full[np.arange(n), np.arange(n)]  # (n, O, O): J(x_i) J(x_i)ᵀ
    d = np.sqrt(np.clip(np.einsum("iaa->ia", blocks), 1e-300, None))
    cos = blocks / (d[:, :, None] * d[:, None, :])
    off = ~np.eye(O, dtype=bool)
    return cos[:, off].ravel()


def pair_statistics(full: np.ndarray, jf: np.ndarray) -> dict:
    """Correlations of Θ̃ with tr Θ and the cross-term size, from ``full (n, n, O, O)``."""
    tr = np.einsum("ijaa->ij", full)
    n = tr.shape[0]
    iu = np.triu_indices(n)
    off = np.triu_indices(n, k=1)
    cos = output_gradient_cosines(full)
    return {
        "pearson": float(scipy.stats.pearsonr(jf[iu], tr[iu]).statistic),
        "spearman": float(scipy.stats.spearmanr(jf[iu], tr[iu]).statistic),
        "pearson_offdiag": float(scipy.stats.pearsonr(jf[off], tr[off]).statistic),
        "spearman_offdiag": float(scipy.stats.spearmanr(jf[off], tr[off]).statistic),
        "cross_term_rel_size": float(np.linalg.norm(jf - tr) / np.linalg.norm(jf)),
        "mean_output_grad_cosine": float(cos.mean()),
        "mean_abs_output_grad_cosine": float(np.abs(cos).mean()),
    }


def _kernels(model, x, wrt=nnx.LoRAParam, output_fn=lm_output_fn, block_size: int = 16
             ) -> tuple[np.ndarray, np.ndarray, object]:
    subset = param_subset(model, wrt)
    f = output_fn(subset)
    full = empirical_ntk(f, subset.params, x, trace=False, block_size=block_size)
    return full, jacobian_free_ntk(f, subset.params, x, block_size=block_size), (f, subset)


def run(config, out_dir: str, ctx) -> dict:
    c = config.approximation
    mtask = make_model_task(config, ctx)
    lora = LoRAConfig.from_dict(c.lora)
    x = mtask.kernel_inputs(mtask.splits({"corpus": c.n_examples}, tuple(c.tasks))["corpus"])
    n = int(x["input_ids"].shape[0])

    model = mtask.load_model(lora)
    block = int(c.block_size)
    full, jf, (f, subset) = _kernels(model, x, mtask.wrt, mtask.output_fn, block)
    jf_from_full = full.sum(axis=(2, 3))
    stats = pair_statistics(full, jf)
    projected = {}
    for p in c.projection_dims:
        jp = jacobian_free_ntk(f, subset.params, x, projection_dim=int(p), seed=ctx.seed, block_size=block)
        iu = np.triu_indices(jp.shape[0])
        projected[str(p)] = {
            "rel_frobenius_error_vs_exact_jf": float(np.linalg.norm(jp - jf) / np.linalg.norm(jf)),
            "spearman_vs_exact_jf": float(scipy.stats.spearmanr(jp[iu], jf[iu]).statistic),
            "spearman_vs_trace_ntk": float(scipy.stats.spearmanr(jp[iu], np.einsum("ijaa->ij", full)[iu]).statistic),
        }

    widths = []
    if c.widths and mtask.task != "lm":
        raise ValueError("approximation.widths (fresh decoders of width d) apply to config.model.task='lm' only; "
                         "set --config.approximation.widths='()'")
    xw = {k: v[: c.n_width_examples] for k, v in x.items()}
    for d in progress(list(c.widths), desc="widths"):
        base = load_config(ctx.model_dir)
        arch = {**base.to_dict(), "hidden_size": int(d), "intermediate_size": 2 * int(d), "head_dim": None}
        m = DecoderLM(DecoderConfig.from_dict(arch), rngs=nnx.Rngs(ctx.seed))
        apply_lora(m, lora, rngs=nnx.Rngs(ctx.seed + 1))
        m.eval()
        fw, jw, _ = _kernels(m, xw)
        widths.append({"width": int(d), **pair_statistics(fw, jw)})

    report = {
        "experiment": "approximation",
        "setup": {"n_examples": n, "tasks": list(c.tasks) if mtask.task == "lm" else ["lexicon"],
                  "lora": dict(c.lora), "num_lora_params": subset.num_params, "output": mtask.output,
                  "kernel_params": mtask.kernel_params,
                  "width_models": "fresh random init (not pre-trained), hidden = d, MLP = 2d", "model": ctx.info,
                  "backend": mtask.describe()},
        **stats,
        "jacobian_free_consistency_max_abs": float(np.abs(jf - jf_from_full).max()),
        "jacobian_free_consistency_rel": float(np.abs(jf - jf_from_full).max() / np.abs(jf).max()),
        "projected": projected,
        "widths": widths,
        "pairs": {"trace_ntk": np.einsum("ijaa->ij", full)[np.triu_indices(n)].tolist(),
                  "jacobian_free": jf[np.triu_indices(n)].tolist()},
    }
    # tr Θ, Θ̃ and the per-example output Grams Θ(x_i, x_i) (n, O, O), so that the statistics
    # can be recomputed from them (the full (n, n, O, O) kernel is not kept: it grows as n²O²)
    np.savez(os.path.join(out_dir, "kernels.npz"), trace_ntk=np.einsum("ijaa->ij", full), jacobian_free=jf,
             output_gram=full[np.arange(n), np.arange(n)])
    report["kernels_file"] = "kernels.npz"
    report["plots"] = [plot(report, os.path.join(out_dir, "approximation.png"))]
    return report


def summary(report: dict) -> dict:
    return {"pearson": round(report["pearson"], 4), "spearman": round(report["spearman"], 4),
            "cross_term_rel_size": round(report["cross_term_rel_size"], 4),
            "mean_abs_output_grad_cosine": round(report["mean_abs_output_grad_cosine"], 4),
            "projected_rel_error": {p: round(v["rel_frobenius_error_vs_exact_jf"], 4)
                                    for p, v in report["projected"].items()},
            "width_abs_cosine": {w["width"]: round(w["mean_abs_output_grad_cosine"], 4) for w in report["widths"]}}


def plot(report: dict, path: str) -> str:
    fig, ax = subplots(2, width=4.6)
    tr, jf = np.array(report["pairs"]["trace_ntk"]), np.array(report["pairs"]["jacobian_free"])
    ax[0].scatter(tr, jf, s=6, alpha=0.6)
    ax[0].set(title=f"Jacobian-free vs exact (Pearson {report['pearson']:.3f}, "
                    f"Spearman {report['spearman']:.3f})", xlabel="tr Θ(x, x')", ylabel="Θ̃(x, x')")
    ax[0].title.set_fontsize(8)
    if not report["widths"]:
        ax[1].set_axis_off()
        return save(fig, path)
    w = np.array([r["width"] for r in report["widths"]], float)
    cos = np.array([r["mean_abs_output_grad_cosine"] for r in report["widths"]])
    cross = np.array([r["cross_term_rel_size"] for r in report["widths"]])
    ax[1].loglog(w, cos, "o-", label="mean |cos(∇f_a, ∇f_b)|")
    ax[1].loglog(w, cross, "s-", label="‖Θ̃ − tr Θ‖/‖Θ̃‖")
    ax[1].loglog(w, cos[0] * np.sqrt(w[0] / w), "--", color="gray", label="∝ d^(-1/2)")
    ax[1].set(title="cross-output terms vs width", xlabel="hidden size d")
    ax[1].legend(fontsize=7)
    return save(fig, path)
