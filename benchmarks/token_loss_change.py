"""Token reductions of the loss change: does one token decide a conflicting record?
(docs/selection.md, "Warm-up length", the last paragraph.)

The recommended score averages the per-token loss change ``Δ_jt = ℓ_jt(θ_0) − ℓ_jt(θ_w)`` over
a record's response tokens. When two rules share most of the answer (``a + 1`` vs ``a − 1``),
the tokens that differ might be drowned by the shared ones; a record whose *worst* token got
less likely would then be the conflicting one. For saved jobs' warm-ups (the default
40-step ``ntk`` warm-up of ``benchmarks/held_out_targets.py`` runs, else the screen's ``lc`` job),
this recomputes every pool record's per-token losses at θ_0 and θ_w and prints precision@N
over the whole contradicting pool for several reductions over tokens: mean (the default
score), min, max, mean − std, the first and the last scored token.

    python benchmarks/token_loss_change.py --held-out runs/held_out --screen runs/screen
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import held_out_targets  # noqa: E402
from ntk_jax.data import controlled as ctl  # noqa: E402
from ntk_jax.data.records import encode_records  # noqa: E402
from ntk_jax.launcher.config_lib import base_config  # noqa: E402
from ntk_jax.launcher.context import prepare_context  # noqa: E402
from ntk_jax.models.lora import lora_filter  # noqa: E402
from ntk_jax.models.subset import param_subset  # noqa: E402
from ntk_jax.selection.jobs import plain, restore_steps, selection_context, train_config  # noqa: E402
from ntk_jax.selection.methods import apply_preset  # noqa: E402
from ntk_jax.training.losses import token_log_probs  # noqa: E402


def reductions(delta: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per record ``(n,)`` scores from per-token changes ``delta (n, T)`` over ``mask (n, T)``."""
    d = np.where(mask, delta, np.nan)
    first = np.array([row[m][0] for row, m in zip(delta, mask)])
    last = np.array([row[m][-1] for row, m in zip(delta, mask)])
    return {"mean": np.nanmean(d, 1), "min": np.nanmin(d, 1), "max": np.nanmax(d, 1),
            "mean_minus_std": np.nanmean(d, 1) - np.nanstd(d, 1), "first_token": first, "last_token": last}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--held-out", default="runs/held_out", help="benchmarks/held_out_targets.py workdir")
    ap.add_argument("--screen", default="runs/screen", help="benchmarks/selection_screen.py workdir")
    ap.add_argument("--targets", nargs="+", default=["mirror", "last_letter", "successor", "swap_ends", "max_digit",
                                                     "sort_words", "double", "flipped_sentiment"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = ap.parse_args(argv)
    held_out_targets.register()
    config = base_config()
    context = prepare_context(config, args.held_out)
    cfg = apply_preset(plain(config.select), "ntk")
    ctx = selection_context(context, cfg)
    b, n = cfg["benchmark"], int(cfg["n_select"])
    out = {}
    for target in args.targets:
        for seed in args.seeds:
            run = os.path.join(args.held_out, target, "contradicting", f"seed{seed}", "ntk")
            if not os.path.isdir(os.path.join(run, "warmup")):
                run = os.path.join(args.screen, target, "contradicting", f"seed{seed}", "lc")
            if not os.path.isdir(os.path.join(run, "warmup")):
                continue
            bench = ctl.make_benchmark(target, seed, n_domain=int(b["n_domain"]), n_test=int(b["n_test"]),
                                       n_pool_per_family=int(b["n_pool_per_family"]), variant="contradicting")
            sub = param_subset(ctx.load_model(cfg["lora"], seed=seed), lora_filter())
            wcfg = train_config(cfg["warmup"], seed=seed)
            wcfg = train_config(wcfg.to_dict(), batch_size=min(wcfg.batch_size, len(bench.domain)))
            warm = restore_steps(os.path.join(run, "warmup", "checkpoints"), sub.params, wcfg,
                                 [wcfg.total_steps])[wcfg.total_steps]["params"]
            enc = encode_records(ctx.tokenizer, bench.pool, ctx.max_len)

            @jax.jit
            def token_nll(params, ids, attention_mask, targets):
                logits = sub.merge(params)(ids, attention_mask=attention_mask).astype(jnp.float32)
                return -token_log_probs(logits, targets)

            def losses(params):
                return np.concatenate([np.asarray(token_nll(params, enc["input_ids"][i:i + 64],
                                                            enc["attention_mask"][i:i + 64], enc["targets"][i:i + 64]))
                                       for i in range(0, len(bench.pool), 64)])

            useful = np.array([r["role"] == "useful" for r in bench.pool])
            scores = reductions(losses(sub.params) - losses(warm), enc["loss_mask"].astype(bool))
            out[f"{target}/seed{seed}"] = {k: float(useful[np.lexsort((np.arange(len(s)), -s))[:n]].mean())
                                           for k, s in scores.items()}
            print(f"token_loss_change: {target} seed {seed}: {out[f'{target}/seed{seed}']}", file=sys.stderr,
                  flush=True)
    summary = {k: float(np.mean([c[k] for c in out.values()])) for k in next(iter(out.values()))} if out else {}
    result = {"cells": out, "mean": summary}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
