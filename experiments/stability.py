"""SPEC §3.1 — NTK-like stability during LoRA fine-tuning (NTK-Selector Def. 1, Thm. 1).

On a fixed probe set, the exact traced eNTK Θ_t over the LoRA factors is computed every
``kernel_every`` steps of LoRA fine-tuning of the pre-trained base model on a task it was not
pre-trained on. Reported: S(t) = cos_F(Θ_t, Θ_0), a*(t), u(t), ‖Θ_t − Θ_0‖/‖Θ_0‖, the
residual ‖R‖/‖Θ_t‖, ε = 1 − min S, the Theorem-1 bound factor √(2ε)/(1−ε) (and η‖Θ_0‖ times it,
the bound per unit ‖γ‖), and how well the linearised model f_0 + J_0(θ_t − θ_0) tracks f_t.

Kernel output: the logits averaged over response positions (``lm_output_fn``, O = V).
LoRA B is initialised N(0, b_init_std²) rather than 0, so that the gradient w.r.t. A — and
hence Θ_0 — is not degenerate at step 0; the report states the value used.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from experiments.plotting import save, subplots
from ntk_jax.data.synthetic import generate_task
from ntk_jax.kernels.ntk import check_finite, ntk_fn, output_size
from ntk_jax.kernels.outputs import lm_output_fn
from ntk_jax.kernels.stability import stability_summary, theorem1_bound
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.models.subset import param_subset
from ntk_jax.training.trainer import TrainConfig, train


def kernel_inputs(arrays: dict) -> dict:
    """The arrays a kernel's ``f(params, batch)`` reads."""
    return {k: jax.numpy.asarray(arrays[k]) for k in ("input_ids", "attention_mask", "loss_mask")}


def run(config, out_dir: str, ctx) -> dict:
    c = config.stability
    lora = LoRAConfig.from_dict(c.lora)
    model = ctx.load_model(lora)
    train_data = ctx.encode(generate_task(c.task, c.n_train, seed=ctx.seed))
    probe = kernel_inputs(ctx.encode(generate_task(c.task, c.n_probe, seed=ctx.seed + 1)))
    train_cfg = TrainConfig.from_dict({**dict(c.train), "seed": ctx.seed})

    subset = param_subset(model, nnx.LoRAParam)
    f = lm_output_fn(subset)
    kernel = jax.jit(ntk_fn(f, trace=True, method="jacobian", output_dim=output_size(f, subset.params, probe)))
    outputs = jax.jit(f)

    @jax.jit
    def linearised(params0, params):
        delta = jax.tree.map(lambda a, b: a - b, params, params0)
        f0, jvp = jax.jvp(lambda p: f(p, probe), (params0,), (delta,))
        return f0 + jvp

    steps, kernels, lin_rel_err, lin_rel_out = [], [], [], []
    start = {}

    def record(step, params):
        if step % c.kernel_every and step != train_cfg.total_steps:
            return
        if step == 0:
            start["params"] = params
        K = check_finite(np.asarray(kernel(params, probe, None)), f"Θ_{step}")
        f_t = np.asarray(outputs(params, probe))
        f_lin = np.asarray(linearised(start["params"], params))
        f_0 = np.asarray(outputs(start["params"], probe))
        moved = np.linalg.norm(f_t - f_0)
        steps.append(step)
        kernels.append(K)
        lin_rel_err.append(float(np.linalg.norm(f_t - f_lin) / moved) if moved > 0 else 0.0)
        lin_rel_out.append(float(np.linalg.norm(f_t - f_lin) / np.linalg.norm(f_t)))

    result = train(model, train_data, train_cfg, wrt=nnx.LoRAParam, callback=record)
    summary = stability_summary(steps, kernels)
    eps = summary["epsilon"]
    report = {
        "experiment": "stability",
        "setup": {"task": c.task, "n_probe": c.n_probe, "n_train": c.n_train, "lora": dict(c.lora),
                  "num_lora_params": subset.num_params, "train": train_cfg.to_dict(),
                  "kernel": "exact traced eNTK (method='jacobian') of response-position-mean logits, O = V",
                  "lora_b_init": f"B ~ N(0, {c.lora.b_init_std}^2) (not 0), so that grad wrt A != 0 at step 0",
                  "model": ctx.info},
        **summary,
        "linearization_rel_error": lin_rel_err,  # ‖f_t − f_lin‖ / ‖f_t − f_0‖
        "linearization_rel_to_output": lin_rel_out,  # ‖f_t − f_lin‖ / ‖f_t‖
        "bound_per_unit_gamma": (theorem1_bound(eps, train_cfg.learning_rate, summary["k0_norm"], 1.0)
                                 if eps < 1 else None),
        "train_loss": [(h["step"], h["loss"]) for h in result.history if "loss" in h],
        "min_cosine": float(min(summary["cosine"])),
        "ntk_like_at_epsilon": {"epsilon": c.epsilon, "holds": bool(eps <= c.epsilon)},
    }
    np.savez(os.path.join(out_dir, "kernels.npz"), steps=np.array(steps), kernels=np.stack(kernels))
    report["kernels_file"] = "kernels.npz"
    report["plots"] = [plot(report, os.path.join(out_dir, "stability.png"))]
    return report


def summary(report: dict) -> dict:
    return {"min_cosine": round(report["min_cosine"], 5), "epsilon": round(report["epsilon"], 5),
            "final_a_star": round(report["a_star"][-1], 4),
            "final_rel_change": round(report["relative_change"][-1], 4),
            "final_linearization_rel_error": round(report["linearization_rel_error"][-1], 4)}


def plot(report: dict, path: str) -> str:
    fig, ax = subplots(4)
    s = report["steps"]
    ax[0].plot(s, report["cosine"], "o-")
    ax[0].set(title="S(t) = cos_F(Θ_t, Θ_0)", xlabel="step")
    ax[1].plot(s, report["a_star"], "o-")
    ax[1].set(title="a*(t) (kernel scale)", xlabel="step")
    ax[2].plot(s, report["u"], "o-", label="u(t)")
    ax[2].plot(s, s, "--", color="gray", label="t")
    ax[2].set(title="reparameterised time u(t)", xlabel="step")
    ax[2].legend()
    ax[3].plot(s, report["relative_change"], "o-", label="‖Θ_t−Θ_0‖/‖Θ_0‖")
    ax[3].plot(s, report["linearization_rel_error"], "s-", label="‖f_t−f_lin‖/‖f_t−f_0‖")
    ax[3].set(title="kernel change / linearisation error", xlabel="step")
    ax[3].legend(fontsize=7)
    return save(fig, path)
