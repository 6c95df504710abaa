"""How the loss-change selector's precision moves along a long warm-up, beside how well the
warm-up generalises to held-out records of the target (docs/selection.md, "Warm-up length").

For each target (contradicting variant) and seed, one selection job runs the whole-pool loss
change (``ntk@loss_change``) with a ``--steps``-step warm-up and ``--checkpoints`` evenly spaced
checkpoints; the target's test records are appended to the pool as probes (role ``probe``, never
counted as useful), so the same forward passes give, at every checkpoint k, the held-out
domain loss (the probes' mean response NLL) and the precision@N of ``ℓ_j(θ_0) − ℓ_j(θ_k)`` over
the real pool. Also printed: the warm-up's training loss at each checkpoint, the step where the
held-out loss is lowest (an early-stopping rule a job could use) and the precision there.

    python benchmarks/warmup_length.py --workdir runs/warmup_length \\
        --targets mirror last_letter successor swap_ends max_digit --seeds 0 > warmup_length.json
    # the same with 4x the domain records (does more domain data teach the rule?)
    python benchmarks/warmup_length.py --workdir runs/warmup_length_d128 --n-domain 128 --steps 80 --checkpoints 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import held_out_targets  # noqa: E402
from ntk_jax.data import controlled as ctl  # noqa: E402
from ntk_jax.launcher.config_lib import base_config  # noqa: E402
from ntk_jax.launcher.context import prepare_context  # noqa: E402
from ntk_jax.selection.jobs import plain, run_selection  # noqa: E402
from ntk_jax.selection.methods import apply_preset  # noqa: E402
from ntk_jax.utils import write_json  # noqa: E402


def _store(directory: str, column: str) -> tuple[list[str], np.ndarray]:
    with open(os.path.join(directory, "meta.json")) as fh:
        num_shards = int(json.load(fh)["num_shards"])
    ids, rows = [], []
    for k in range(num_shards):
        with np.load(os.path.join(directory, f"shard_{k:05d}.npz")) as z:
            ids += [str(i) for i in z["ids"]]
            rows.append(z[column])
    return ids, np.concatenate(rows)


def path_table(job_dir: str, pool: list[dict], n: int, steps: list[int]) -> dict:
    """Per checkpoint step: held-out (probe) loss and precision@N of ``ℓ(θ_0) − ℓ(θ_k)`` over
    the non-probe records, read from the job's ``loss_base`` / ``loss_change`` stores."""
    ids, warm = _store(os.path.join(job_dir, "loss_change"), "features")  # (n, K)
    base_ids, base = _store(os.path.join(job_dir, "loss_base"), "scores")
    base = dict(zip(base_ids, base))
    losses = np.concatenate([np.array([base[i] for i in ids])[:, None], warm], axis=1)
    role = {str(r["id"]): r["role"] for r in pool}
    probe = np.array([role[i] == "probe" for i in ids])
    useful = np.array([role[i] == "useful" for i in ids])[~probe]
    real = losses[~probe]
    rows = []
    for k, step in enumerate(steps, start=1):
        delta = real[:, 0] - real[:, k]
        top = np.lexsort((np.arange(len(delta)), -delta))[:n]
        rows.append({"step": step, "held_out_loss": float(losses[probe, k].mean()),
                     "precision_at_n": float(useful[top].mean())})
    best = min(rows, key=lambda r: r["held_out_loss"])
    return {"held_out_loss_at_theta0": float(losses[probe, 0].mean()), "path": rows,
            "early_stop": {"step": best["step"], "precision_at_n": best["precision_at_n"]}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--targets", nargs="+", default=["mirror", "last_letter", "successor", "swap_ends", "max_digit"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--n-domain", type=int, default=0, help="domain records (default: the job's, 32)")
    ap.add_argument("--arch", default="", help="the embedded model's architecture (held_out_targets.py --arch)")
    args = ap.parse_args(argv)
    held_out_targets.register()
    config = base_config()
    held_out_targets.apply_arch(config, args.arch)
    context = prepare_context(config, args.workdir)
    select = plain(config.select)
    b, n = select["benchmark"], int(select["n_select"])
    if args.n_domain:
        b["n_domain"] = args.n_domain
    arm = f"ntk@loss_change[warmup.total_steps={args.steps},ntk.loss_change.checkpoints={args.checkpoints}]"
    out = {"arm": arm, "cells": {}}
    for target in args.targets:
        for seed in args.seeds:
            bench = ctl.make_benchmark(target, seed, n_domain=int(b["n_domain"]), n_test=int(b["n_test"]),
                                       n_pool_per_family=int(b["n_pool_per_family"]), variant="contradicting")
            pool = bench.pool + [dict(r, id=f"probe-{r['id']}", role="probe") for r in bench.test]
            job_dir = os.path.join(args.workdir, target, f"seed{seed}")
            done = os.path.join(job_dir, "report.json")
            if not os.path.exists(done):
                rep = run_selection(context, apply_preset(select, arm), bench.domain, pool, job_dir, seed=seed,
                                    plot=False)
                write_json(done, rep)
            with open(done) as fh:
                steps = [int(s) for s in json.load(fh)["loss_change"]["checkpoint_steps"]]
            cell = path_table(job_dir, pool, n, steps)
            with open(os.path.join(job_dir, "warmup", "metrics.jsonl")) as fh:
                train = {m["step"]: m["loss"] for m in map(json.loads, fh)}
            for row in cell["path"]:
                row["train_loss"] = train.get(row["step"])
            out["cells"][f"{target}/seed{seed}"] = cell
            print(f"warmup_length: {target} seed {seed}: " + ", ".join(
                f"{r['step']}: {r['held_out_loss']:.2f} / {r['precision_at_n']:.2f}" for r in cell["path"]),
                file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
