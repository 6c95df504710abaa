"""docs/theory.md §5.1 — NTK-like stability during LoRA fine-tuning (NTK-Selector Def. 1, Thm. 1).

On a fixed probe set, the exact traced eNTK Θ_t over the LoRA factors is computed every
``kernel_every`` steps of LoRA fine-tuning of the pre-trained base model on a task it was not
pre-trained on. Reported: S(t) = cos_F(Θ_t, Θ_0), a*(t), u(t), ‖Θ_t − Θ_0‖/‖Θ_0‖, the
residual ‖R‖/‖Θ_t‖, ε = 1 − min S, the Theorem-1 bound factor √(2ε)/(1−ε) (and η‖Θ_0‖ times it,
the bound per unit ‖γ‖), and how well the linearised model f_0 + J_0(θ_t − θ_0) tracks f_t.

Model, data, kernel output and loss come from the model task of ``config.model.task``
(:mod:`experiments.model_tasks`): the causal LM's response-position-mean logits (O = V) on a
synthetic task, or a BERT/RoBERTa classifier's class logits (O = C) on the lexicon task.
``sweep_learning_rates`` / ``sweep_ranks`` add a map of S_min = min_t S(t): one run per
learning rate (at the base rank) and per LoRA rank (at the base rate), the base run shared.
LoRA B is initialised N(0, b_init_std²) rather than 0, so that the gradient w.r.t. A — and
hence Θ_0 — is not degenerate at step 0; the report states the value used.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np

from experiments.model_tasks import LMTask, make_model_task
from experiments.plotting import save, subplots
from ntk_jax.kernels.checks import check_finite
from ntk_jax.kernels.contract import output_size
from ntk_jax.kernels.ntk import ntk_fn
from ntk_jax.kernels.stability import stability_summary, theorem1_bound
from ntk_jax.models.lora import LoRAConfig, lora_config
from ntk_jax.models.subset import ParamSubset, param_subset
from ntk_jax.training.trainer import TrainConfig, finetune_train_config, train
from ntk_jax.utils import progress


def config() -> ml_collections.ConfigDict:
    """docs/theory.md §5.1: Θ_t on a fixed probe set during LoRA fine-tuning."""
    return ml_collections.ConfigDict(dict(
        task="add_spaced",          # fine-tuning task (not in the pre-training mix)
        n_train=512,
        n_probe=16,
        kernel_every=10,            # compute Θ_t every this many steps
        # B ~ N(0, b_init_std²) instead of B = 0, so the gradient w.r.t. A (and Θ_0) is not
        # degenerate at step 0 (docs/theory.md §3.4).
        lora=lora_config(b_init_std=0.02),
        train=finetune_train_config(total_steps=100, learning_rate=2e-3),
        epsilon=0.01,               # the NTK-like threshold checked in the report (S ≥ 1-ε)
        # S_min map: one more run per learning rate (at lora.rank) and per LoRA rank (at
        # train.learning_rate); empty: only the base run
        sweep_learning_rates=(),
        sweep_ranks=(),
    ))


def kernel_inputs(arrays: dict) -> dict:
    """The arrays a causal-LM kernel's ``f(params, batch)`` reads."""
    return {k: jax.numpy.asarray(arrays[k]) for k in LMTask.KERNEL_KEYS}


_PROGRAMS: dict = {}


def probe_programs(mtask, subset, output_dim: int):
    """The jitted programs of a stability run on a probe batch, for ``subset``'s model:

    * ``kernel(params, template, frozen, x)`` → the exact traced eNTK ``(n, n)``;
    * ``outputs(params0, params, template, frozen, x)`` → ``(f_t, f_0, f_lin)``: the outputs at
      ``params`` and ``params0`` and the linearised model ``f_0 + J_0 (params − params0)``.

    The frozen weights and the parameter template are arguments rather than constants closed
    over, so the programs are compiled once per (mtask, model structure, O) and shared by
    every run of that structure (e.g. a learning-rate sweep)."""
    key = (type(mtask), subset.graphdef, int(output_dim))
    if key not in _PROGRAMS:
        graphdef, output_fn = subset.graphdef, mtask.output_fn

        def f_of(template, frozen):
            return output_fn(ParamSubset(graphdef, None, frozen, template))

        @jax.jit
        def kernel(params, template, frozen, x):
            return ntk_fn(f_of(template, frozen), trace=True, method="jacobian", output_dim=int(output_dim))(
                params, x, None)

        @jax.jit
        def outputs(params0, params, template, frozen, x):
            f = f_of(template, frozen)
            delta = jax.tree.map(lambda a, b: a - b, params, params0)
            f0, jvp = jax.jvp(lambda p: f(p, x), (params0,), (delta,))
            # f_0 as f(params0) through the same program as f_t (not the jvp's primal), so that
            # f_t - f_0 is exactly 0 at params = params0
            return f(params, x), f(params0, x), f0 + jvp

        _PROGRAMS[key] = (kernel, outputs)
    return _PROGRAMS[key]


def stability_run(mtask, lora: LoRAConfig, train_cfg: TrainConfig, train_split, probe: dict,
                  kernel_every: int) -> dict:
    """One LoRA fine-tuning run of ``mtask``'s model with Θ_t on ``probe`` every
    ``kernel_every`` steps (and at the end): :func:`stability_summary` of the kernels plus the
    linearisation errors, the train losses, the kernels and P (``num_params``)."""
    model = mtask.load_model(lora)
    subset = param_subset(model, mtask.wrt)
    kernel, outputs = probe_programs(mtask, subset, output_size(mtask.output_fn(subset), subset.params, probe))
    template, frozen = subset._template, subset.frozen
    steps, kernels, lin_rel_err, lin_rel_out = [], [], [], []
    start = {}

    def record(step, params):
        if step % kernel_every and step != train_cfg.total_steps:
            return
        if step == 0:
            start["params"] = params
        K = check_finite(np.asarray(kernel(params, template, frozen, probe)), f"Θ_{step}")
        f_t, f_0, f_lin = (np.asarray(a) for a in outputs(start["params"], params, template, frozen, probe))
        moved = np.linalg.norm(f_t - f_0)
        steps.append(step)
        kernels.append(K)
        lin_rel_err.append(float(np.linalg.norm(f_t - f_lin) / moved) if moved > 0 else 0.0)
        lin_rel_out.append(float(np.linalg.norm(f_t - f_lin) / np.linalg.norm(f_t)))

    result = train(model, train_split.arrays, train_cfg, wrt=mtask.wrt, loss_fn=mtask.loss_fn,
                   callback=record)
    return {"summary": stability_summary(steps, kernels), "steps": steps, "kernels": kernels,
            "linearization_rel_error": lin_rel_err, "linearization_rel_to_output": lin_rel_out,
            "train_loss": [(h["step"], h["loss"]) for h in result.history if "loss" in h],
            "num_params": subset.num_params}


def _sweep_row(run: dict, learning_rate: float, rank: int) -> dict:
    s = run["summary"]
    return {"learning_rate": float(learning_rate), "rank": int(rank), "min_cosine": float(min(s["cosine"])),
            "epsilon": s["epsilon"], "final_a_star": s["a_star"][-1],
            "final_relative_change": s["relative_change"][-1],
            "final_linearization_rel_error": run["linearization_rel_error"][-1],
            "final_train_loss": run["train_loss"][-1][1] if run["train_loss"] else None,
            "num_params": run["num_params"]}


def run(config, out_dir: str, ctx) -> dict:
    c = config.stability
    mtask = make_model_task(config, ctx)
    lora = LoRAConfig.from_dict(c.lora)
    splits = mtask.splits({"train": c.n_train, "probe": c.n_probe}, c.task)
    probe = mtask.kernel_inputs(splits["probe"])
    train_cfg = TrainConfig.from_dict({**dict(c.train), "seed": ctx.seed})

    base = stability_run(mtask, lora, train_cfg, splits["train"], probe, c.kernel_every)
    summary = base["summary"]
    eps = summary["epsilon"]
    # S_min over learning rate (at the base rank) and LoRA rank (at the base rate); the base
    # run is the point they share.
    sweep = []
    points = [(float(lr), lora.rank) for lr in c.sweep_learning_rates] + \
             [(train_cfg.learning_rate, int(r)) for r in c.sweep_ranks]
    seen = {(train_cfg.learning_rate, lora.rank): _sweep_row(base, train_cfg.learning_rate, lora.rank)}
    for lr, rank in progress(points, desc="stability sweep"):
        if (lr, rank) not in seen:
            cfg = dataclasses.replace(train_cfg, learning_rate=lr)
            one = stability_run(mtask, dataclasses.replace(lora, rank=rank), cfg, splits["train"], probe,
                                c.kernel_every)
            seen[(lr, rank)] = _sweep_row(one, lr, rank)
        sweep.append(seen[(lr, rank)])
    report = {
        "experiment": "stability",
        "setup": {"task": c.task if mtask.task == "lm" else "lexicon", "n_probe": c.n_probe, "n_train": c.n_train,
                  "lora": dict(c.lora), "num_lora_params": base["num_params"], "train": train_cfg.to_dict(),
                  "kernel": f"exact traced eNTK (method='jacobian') of the {mtask.output}",
                  "kernel_params": mtask.kernel_params,
                  "lora_b_init": f"B ~ N(0, {c.lora.b_init_std}^2) (not 0), so that grad wrt A != 0 at step 0",
                  "model": ctx.info, "backend": mtask.describe()},
        **summary,
        "linearization_rel_error": base["linearization_rel_error"],  # ‖f_t − f_lin‖ / ‖f_t − f_0‖
        "linearization_rel_to_output": base["linearization_rel_to_output"],  # ‖f_t − f_lin‖ / ‖f_t‖
        "bound_per_unit_gamma": (theorem1_bound(eps, train_cfg.learning_rate, summary["k0_norm"], 1.0)
                                 if eps < 1 else None),
        "train_loss": base["train_loss"],
        "min_cosine": float(min(summary["cosine"])),
        "ntk_like_at_epsilon": {"epsilon": c.epsilon, "holds": bool(eps <= c.epsilon)},
        "sweep": sweep,
    }
    np.savez(os.path.join(out_dir, "kernels.npz"), steps=np.array(base["steps"]), kernels=np.stack(base["kernels"]))
    report["kernels_file"] = "kernels.npz"
    report["plots"] = [plot(report, os.path.join(out_dir, "stability.png"))]
    return report


def summary(report: dict) -> dict:
    return {"min_cosine": round(report["min_cosine"], 5), "epsilon": round(report["epsilon"], 5),
            "final_a_star": round(report["a_star"][-1], 4),
            "final_rel_change": round(report["relative_change"][-1], 4),
            "final_linearization_rel_error": round(report["linearization_rel_error"][-1], 4),
            **({"sweep_min_cosine": {f"lr={r['learning_rate']:g},r={r['rank']}": round(r["min_cosine"], 4)
                                     for r in report["sweep"]}} if report.get("sweep") else {})}


def plot(report: dict, path: str) -> str:
    sweep = report.get("sweep") or []
    fig, ax = subplots(5 if sweep else 4)
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
    if sweep:
        base = report["setup"]
        lr0, r0 = base["train"]["learning_rate"], base["lora"]["rank"]
        by_lr = sorted((r["learning_rate"], r["min_cosine"]) for r in sweep if r["rank"] == r0)
        by_rank = sorted((r["rank"], r["min_cosine"]) for r in sweep if r["learning_rate"] == lr0)
        ax[4].semilogx(*zip(*by_lr), "o-", label=f"vs learning rate (rank {r0})")
        twin = ax[4].twiny()
        twin.semilogx(*zip(*by_rank), "s--", color="C1", label=f"vs LoRA rank (lr {lr0:g})")
        twin.set_xlabel("LoRA rank", color="C1")
        ax[4].set(title="S_min map", xlabel="learning rate", ylabel="min_t S(t)")
        ax[4].legend(handles=ax[4].get_lines() + twin.get_lines(), fontsize=6)
    return save(fig, path)
