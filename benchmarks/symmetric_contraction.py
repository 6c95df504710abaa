"""Time per kernel entry of the symmetric (``x2=None``) vs cross (``x2=x``) exact eNTK.

    python benchmarks/symmetric_contraction.py [--n 64] [--repeats 5] [--quick]
    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python benchmarks/symmetric_contraction.py

For the ``jacobian`` and ``structured`` methods, traced ``(n, n)`` and full ``(n, n, O, O)``,
on (a) a 3-layer tanh MLP (128 → 512 → 512 → 10, kernel over all parameters) and (b) the
transformer + LoRA problem of ``benchmarks/ntk_speed.py`` (its ``build_problem`` /
``make_batch``, imported), the jitted block function ``ntk_fn(...)`` is timed as

* ``cross``: ``kernel(params, x, x)`` (both sides differentiated and contracted in full);
* ``symmetric``: ``kernel(params, x, None)`` (one set of Jacobian rows, one triangle of
  blocks: ``ntk_jax.kernels.contract.symmetric_blocks``);
* ``symmetric_untiled``: ``kernel(params, x, None)`` with the triangle switched off (one block:
  a plain GEMM over everything, then the exact mirror) — what the symmetric path costs
  without the blocked triangle.

Every function is compiled first, then ``--repeats`` rounds of one call each, interleaved
round-robin; medians. Time per entry = median / n² (all forms compute the n² entries). The
host's 1-minute load average before and after the timing is reported: on a shared host the
numbers are under load. Prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ntk_speed import build_mlp_problem, build_problem, make_batch  # noqa: E402

from ntk_jax.kernels import contract, structured  # noqa: E402
from ntk_jax.kernels.ntk import ntk_fn  # noqa: E402

FORMS = ("cross", "symmetric", "symmetric_untiled")
METHODS = ("jacobian", "structured")


@contextlib.contextmanager
def untiled():
    """The symmetric contractions as one block each (a plain GEMM, then the mirror)."""
    saved = contract.SYMMETRIC_BLOCK_ROWS, structured.STRUCTURED_BLOCK_EXAMPLES
    contract.SYMMETRIC_BLOCK_ROWS = structured.STRUCTURED_BLOCK_EXAMPLES = 2 ** 40
    try:
        yield
    finally:
        contract.SYMMETRIC_BLOCK_ROWS, structured.STRUCTURED_BLOCK_EXAMPLES = saved


def problems(args) -> dict:
    """``{name: (f, params, x, O, info)}``."""
    out = {}
    if "mlp" in args.problems:
        f, params, info = build_mlp_problem(args.seed, d_in=128, width=args.mlp_width)
        x = jax.random.normal(jax.random.key(args.seed + 7), (args.n, 128))
        out["mlp"] = (f, params, x, info["O"], info)
    if "transformer_lora" in args.problems:
        f, params, info = build_problem(args.seed)
        x = make_batch(args.n, args.seq_len, 8, args.seed, info["vocab_size"])
        O = int(jax.eval_shape(f, params, jax.tree.map(lambda a: a[:1], x)).shape[-1])
        out["transformer_lora"] = (f, params, x, O, {"P": info["P"], "O": O, "lora": info["lora"]})
    return out


def compile_all(probs: dict) -> tuple[dict, dict]:
    """Every (problem, method, kind, form) jitted and called once; returns (fns, outputs)."""
    fns, outs = {}, {}
    for pname, (f, params, x, O, _) in probs.items():
        for method in METHODS:
            for trace in (True, False):
                kind = "traced" if trace else "full"
                for form in FORMS:
                    fn = jax.jit(ntk_fn(f, trace=trace, method=method, output_dim=O))
                    args = (params, x, x if form == "cross" else None)
                    t = time.perf_counter()
                    with untiled() if form == "symmetric_untiled" else contextlib.nullcontext():
                        outs[pname, method, kind, form] = np.asarray(jax.block_until_ready(fn(*args)))
                    print(f"[compile] {pname}/{method}/{kind}/{form}: {time.perf_counter() - t:.2f} s",
                          file=sys.stderr, flush=True)
                    fns[pname, method, kind, form] = (fn, args)
    return fns, outs


def time_round_robin(fns: dict, repeats: int) -> dict:
    """Median seconds of ``repeats`` interleaved rounds of one call each."""
    times = {k: [] for k in fns}
    for r in range(repeats):
        for key, (fn, args) in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[key].append(time.perf_counter() - t)
        print(f"[round {r + 1}/{repeats}]", file=sys.stderr, flush=True)
    return {k: float(np.median(v)) for k, v in times.items()}


def summarise(probs: dict, med: dict, outs: dict) -> dict:
    """Per problem / method / kind: medians, µs per entry, speedups and agreement."""
    res = {}
    for pname, (_, _, x, O, _) in probs.items():
        n = jax.tree.leaves(x)[0].shape[0]
        for method in METHODS:
            for kind in ("traced", "full"):
                m = {form: med[pname, method, kind, form] for form in FORMS}
                ref = outs[pname, method, kind, "cross"].astype(np.float64)
                sym = outs[pname, method, kind, "symmetric"]
                mirror = sym.T if sym.ndim == 2 else np.transpose(sym, (1, 0, 3, 2))
                res.setdefault(pname, {}).setdefault(method, {})[kind] = {
                    "median_s": m,
                    "us_per_entry": {form: 1e6 * t / (n * n) for form, t in m.items()},
                    "symmetric_speedup_vs_cross": m["cross"] / m["symmetric"],
                    "tiling_speedup_vs_untiled": m["symmetric_untiled"] / m["symmetric"],
                    "symmetric_max_rel_diff_vs_cross": float(np.max(np.abs(sym - ref)) / np.max(np.abs(ref))),
                    "symmetric_exactly_symmetric": bool(np.array_equal(sym, mirror))}
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="examples (kernel n × n)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--mlp-width", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--problems", nargs="+", default=["mlp", "transformer_lora"], choices=["mlp", "transformer_lora"])
    p.add_argument("--quick", action="store_true", help="n=8, repeats=2, MLP width 64 (for tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.mlp_width = 8, 2, 64
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    probs = problems(args)
    fns, outs = compile_all(probs)
    load_before = os.getloadavg()[0]
    med = time_round_robin(fns, args.repeats)
    load_after = os.getloadavg()[0]
    dev = jax.devices()[0]
    result = {"device": f"{dev.platform}:{dev.device_kind} ({os.cpu_count()} host cores)",
              "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "n": args.n, "repeats": args.repeats,
              "problems": {p: v[4] for p, v in probs.items()},
              "thresholds": {"SYMMETRIC_BLOCK_ROWS": contract.SYMMETRIC_BLOCK_ROWS,
                             "STRUCTURED_BLOCK_EXAMPLES": structured.STRUCTURED_BLOCK_EXAMPLES},
              "host_load_avg_1m": {"before_timing": load_before, "after_timing": load_after},
              "results": summarise(probs, med, outs)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
