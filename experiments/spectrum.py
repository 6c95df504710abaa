"""SPEC §3.2 — eNTK spectrum, condition number and the kernel-regression risk bounds
(NTK-spectrum paper, Thm. 1), over a sweep of LoRA placements.

For each placement (target projections × layers): the exact traced eNTK K over the LoRA
factors on n examples, its eigen-spectrum, κ(K + σI) = (λmax+σ)/(λmin+σ), effective rank,
the kernel-regression risk R = (1/n)‖(I − K(K+σI)⁻¹)y‖² with the *correct* bounds
(σ/(σ+λmax))²‖y‖²/n ≤ R ≤ (σ/(σ+λmin))²‖y‖²/n, and the paper's printed bounds
σ‖y‖²/(n(σ+λ)) whose lower half is false in general. Then the placement is fine-tuned and
the Spearman rank correlation between κ and the train/eval loss is reported (the paper's
claim: lower κ ↔ lower loss). Targets y: ±1 from the task's two labels.

Also: the printed lower bound's failure rate on random PSD kernels (the finding of SPEC §3.2).
"""
from __future__ import annotations

import os

import numpy as np
import scipy.stats
from flax import nnx

from experiments.plotting import save, subplots
from experiments.stability import kernel_inputs
from ntk_jax.data.synthetic import generate_task
from ntk_jax.kernels.ntk import empirical_ntk
from ntk_jax.kernels.outputs import lm_output_fn
from ntk_jax.kernels.spectrum import (condition_number, effective_rank, eigenvalues, paper_printed_bounds,
                                      risk_bounds)
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.models.subset import param_subset
from ntk_jax.training.trainer import TrainConfig, evaluate, train
from ntk_jax.utils import progress


def binary_targets(records) -> np.ndarray:
    """±1 targets from a two-label task (the lexicographically first label is +1)."""
    labels = sorted({r["response"] for r in records})
    if len(labels) != 2:
        raise ValueError(f"the spectrum experiment needs a two-label task; got labels {labels}")
    return np.array([1.0 if r["response"] == labels[0] else -1.0 for r in records])


def random_psd_violation_rate(n_kernels: int, seed: int) -> dict:
    """How often the printed lower bound exceeds the true risk on random PSD kernels
    (K = A Aᵀ, A Gaussian n×r with random n, r; σ log-uniform in [1e-4, 10])."""
    rng = np.random.default_rng(seed)
    printed_fail = correct_fail = 0
    for _ in range(n_kernels):
        n = int(rng.integers(2, 21))
        r = int(rng.integers(1, n + 1))
        A = rng.normal(size=(n, r))
        K, y = A @ A.T, rng.normal(size=n)
        sigma = float(10 ** rng.uniform(-4, 1))
        lo, risk, hi = risk_bounds(K, y, sigma)
        p_lo, _ = paper_printed_bounds(K, y, sigma)
        printed_fail += p_lo > risk * (1 + 1e-9)
        correct_fail += not (lo <= risk * (1 + 1e-9) and risk <= hi * (1 + 1e-9))
    return {"n_kernels": n_kernels, "printed_lower_violation_rate": printed_fail / n_kernels,
            "correct_bounds_violation_rate": correct_fail / n_kernels}


def placement_lora(lora, placement) -> LoRAConfig:
    """The LoRA config of one ``spectrum.placements`` entry: the ``lora`` section with the
    entry's ``targets`` and ``layers`` (sequences; e.g. ``{'targets': ('k_proj',), 'layers': (0,)}``,
    what ``--config.spectrum.placements="(...,)"`` gives)."""
    return LoRAConfig.from_dict({**dict(lora), "targets": tuple(placement["targets"]),
                                 "layers": tuple(placement["layers"])})


def run(config, out_dir: str, ctx) -> dict:
    c = config.spectrum
    kernel_records = generate_task(c.task, c.n_kernel, seed=ctx.seed + 2)
    y = binary_targets(kernel_records)
    x = kernel_inputs(ctx.encode(kernel_records))
    train_data = ctx.encode(generate_task(c.task, c.n_train, seed=ctx.seed))
    eval_data = ctx.encode(generate_task(c.task, c.n_eval, seed=ctx.seed + 3))
    train_cfg = TrainConfig.from_dict({**dict(c.train), "seed": ctx.seed})

    rows = []
    for placement in progress(list(c.placements), desc="placements"):
        lora = placement_lora(c.lora, placement)
        model = ctx.load_model(lora)
        subset = param_subset(model, nnx.LoRAParam)
        K = empirical_ntk(lm_output_fn(subset), subset.params, x)
        lam = eigenvalues(K)
        lower, risk, upper = risk_bounds(K, y, c.sigma)
        p_lower, p_upper = paper_printed_bounds(K, y, c.sigma)
        loss_before = evaluate(model, eval_data, batch_size=128)
        result = train(model, train_data, train_cfg, wrt=nnx.LoRAParam)
        train_losses = [h["loss"] for h in result.history if "loss" in h]
        rows.append({
            "targets": list(lora.targets), "layers": list(lora.layers),
            "num_lora_params": subset.num_params,
            "eigenvalues": lam.tolist(), "lambda_max": float(lam[-1]), "lambda_min": float(lam[0]),
            "kappa": condition_number(K, c.sigma), "effective_rank": effective_rank(K),
            "risk": risk, "correct_lower": lower, "correct_upper": upper,
            "printed_lower": p_lower, "printed_upper": p_upper,
            "risk_within_correct_bounds": bool(lower <= risk * (1 + 1e-9) and risk <= upper * (1 + 1e-9)),
            "printed_lower_violated": bool(p_lower > risk * (1 + 1e-9)),
            "eval_loss_before": loss_before,
            "train_loss_final": float(np.mean(train_losses[-3:])),
            "eval_loss_after": evaluate(model, eval_data, batch_size=128),
        })
    kappa = [r["kappa"] for r in rows]
    rho_train = scipy.stats.spearmanr(kappa, [r["train_loss_final"] for r in rows])
    rho_eval = scipy.stats.spearmanr(kappa, [r["eval_loss_after"] for r in rows])
    report = {
        "experiment": "spectrum",
        "setup": {"task": c.task, "n_kernel": c.n_kernel, "sigma": c.sigma, "lora": dict(c.lora),
                  "train": train_cfg.to_dict(), "targets_y": "±1 labels",
                  "risk_normalisation": "R = (1/n)‖(I − K(K+σI)⁻¹)y‖²",
                  "model": ctx.info},
        "placements": rows,
        "spearman_kappa_vs_train_loss": {"rho": float(rho_train.statistic), "p": float(rho_train.pvalue)},
        "spearman_kappa_vs_eval_loss": {"rho": float(rho_eval.statistic), "p": float(rho_eval.pvalue)},
        "all_risks_within_correct_bounds": all(r["risk_within_correct_bounds"] for r in rows),
        "printed_lower_violated_on_real_kernels": sum(r["printed_lower_violated"] for r in rows),
        "random_psd": random_psd_violation_rate(int(c.n_random_kernels), ctx.seed),
        "finding": ("The paper's printed lower bound σ‖y‖²/(σ+λmax) is not a lower bound of the "
                    "kernel-regression risk in general (K = λI: (σ/(σ+λ))²‖y‖² < σ‖y‖²/(σ+λ)); "
                    "the squared bounds hold. See random_psd and printed_lower_violated."),
    }
    report["plots"] = [plot(report, os.path.join(out_dir, "spectrum.png"))]
    return report


def summary(report: dict) -> dict:
    return {"kappa": [round(r["kappa"], 1) for r in report["placements"]],
            "spearman_kappa_vs_eval_loss": round(report["spearman_kappa_vs_eval_loss"]["rho"], 3),
            "all_risks_within_correct_bounds": report["all_risks_within_correct_bounds"],
            "printed_lower_violation_rate_random_psd": report["random_psd"]["printed_lower_violation_rate"]}


def _label(row) -> str:
    return f"{'+'.join(t.replace('_proj', '') for t in row['targets'])} L{row['layers']}"


def plot(report: dict, path: str) -> str:
    rows = report["placements"]
    fig, ax = subplots(3, width=4.6)
    for r in rows:
        lam = np.clip(np.array(r["eigenvalues"])[::-1], 1e-12, None)
        ax[0].semilogy(np.arange(1, lam.size + 1), lam, ".-", label=f"{_label(r)} κ={r['kappa']:.3g}")
    ax[0].set(title="eNTK eigen-spectrum", xlabel="index", ylabel="λ")
    ax[0].legend(fontsize=6)
    idx = np.arange(len(rows))
    ax[1].semilogy(idx, [r["risk"] for r in rows], "ko", label="risk R")
    ax[1].semilogy(idx, [r["correct_lower"] for r in rows], "g^", label="correct lower")
    ax[1].semilogy(idx, [r["correct_upper"] for r in rows], "gv", label="correct upper")
    ax[1].semilogy(idx, [r["printed_lower"] for r in rows], "rx", label="printed lower (false)")
    ax[1].set_xticks(idx, [_label(r) for r in rows], rotation=45, fontsize=6)
    ax[1].set(title="kernel-regression risk and bounds")
    ax[1].legend(fontsize=6)
    ax[2].loglog([r["kappa"] for r in rows], [r["eval_loss_after"] for r in rows], "o")
    for r in rows:
        ax[2].annotate(_label(r), (r["kappa"], r["eval_loss_after"]), fontsize=6)
    rho = report["spearman_kappa_vs_eval_loss"]["rho"]
    ax[2].set(title=f"κ vs eval loss (Spearman ρ={rho:.2f})", xlabel="κ(K+σI)", ylabel="eval loss")
    return save(fig, path)
