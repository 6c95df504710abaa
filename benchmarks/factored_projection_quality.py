"""JL quality of the factored (Kronecker) projection vs the dense Rademacher projection at equal p.

    python benchmarks/factored_projection_quality.py [--dims 1024 8192] [--seeds 3] [--n-domain 32]
                                                     [--n-cand 256] [--quick]

Model and kernel as ``benchmarks/ntk_speed.py``: the embedded default decoder with LoRA r=8 on
q/v of every layer (P = 5376), NTK-Selector's scalar ``s(x) = Σ_k f_k(x)`` with ``f =
lm_output_fn(subset)``; random token sequences (length 32, 8 response positions) as domain
set and candidate pool. For each p and seed:

* ``spearman_vs_dense``: Spearman correlation of the NTK-Selector scores ``s_j = ⟨mean_i φ_i,
  φ_j⟩`` from factored features vs from dense features (same p, same seed);
* ``spearman_vs_exact``: the same for each projection vs the unprojected gradients;
* ``kernel_rel_error``: ``‖K̃ − K‖_F / ‖K‖_F`` of the candidates' Gram matrix vs the exact one;

for the dense map, the factored map as the jobs use it (the LoRA factors, small sites, by the
sparse sign hash of their formed gradients) and the factored map with every site on its
Kronecker factors (``kronecker``: ``FactoredProjection(p, sparse_sites=False)``).

Medians over seeds are reported. Prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ntk_speed import build_problem, log, make_batch  # noqa: E402

from ntk_jax.kernels.factored_projection import FactoredProjection  # noqa: E402
from ntk_jax.kernels.features import gradient_features, sum_of_outputs  # noqa: E402
from ntk_jax.kernels.projection import RandomProjection  # noqa: E402
from ntk_jax.stats import spearman  # noqa: E402


def scores(dom, cand):
    return np.asarray(cand, np.float64) @ np.asarray(dom, np.float64).mean(axis=0)


def rel_err(F, K):
    F = np.asarray(F, np.float64)
    return float(np.linalg.norm(F @ F.T - K) / np.linalg.norm(K))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-domain", type=int, default=32)
    p.add_argument("--n-cand", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="dims 1024, 1 seed, 8 domain, 32 candidates")
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.seeds, args.n_domain, args.n_cand, args.batch_size = [1024], 1, 8, 32, 32
    f, params, info = build_problem(0)
    s = sum_of_outputs(f)
    dom = make_batch(args.n_domain, 32, 8, 11, info["vocab_size"])
    cand = make_batch(args.n_cand, 32, 8, 12, info["vocab_size"])

    def feats(x, proj):
        return gradient_features(s, params, x, projection=proj, batch_size=args.batch_size)

    g_dom, g_cand = feats(dom, None), feats(cand, None)
    exact_scores = scores(g_dom, g_cand)
    K = np.asarray(g_cand, np.float64) @ np.asarray(g_cand, np.float64).T
    results = {}
    for dim in args.dims:
        rows = []
        for seed in range(args.seeds):
            dense, fact = RandomProjection(dim, seed=seed), FactoredProjection(dim, seed=seed)
            kron = FactoredProjection(dim, seed=seed, sparse_sites=False)
            sd, sf = scores(feats(dom, dense), feats(cand, dense)), scores(feats(dom, fact), feats(cand, fact))
            sk = scores(feats(dom, kron), feats(cand, kron))
            rows.append(dict(spearman_factored_vs_dense=spearman(sf, sd),
                             spearman_dense_vs_exact=spearman(sd, exact_scores),
                             spearman_factored_vs_exact=spearman(sf, exact_scores),
                             spearman_kronecker_vs_exact=spearman(sk, exact_scores),
                             kernel_rel_error_dense=rel_err(feats(cand, dense), K),
                             kernel_rel_error_factored=rel_err(feats(cand, fact), K),
                             kernel_rel_error_kronecker=rel_err(feats(cand, kron), K)))
            log(f"p={dim} seed={seed}: {rows[-1]}")
        results[str(dim)] = {"median": {k: float(np.median([r[k] for r in rows])) for k in rows[0]},
                             "per_seed": rows,
                             "factored_plan": FactoredProjection(dim).plan(s, params, cand)[:4]}
    out = {"model": {**info, "O_summed": True}, "n_domain": args.n_domain, "n_cand": args.n_cand,
           "seeds": args.seeds, "results": results,
           "target_spearman_factored_vs_dense_at_8192": results.get("8192", {}).get("median", {}).get(
               "spearman_factored_vs_dense")}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
