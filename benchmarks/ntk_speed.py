"""Speed, agreement and memory of the eNTK methods on the default tiny transformer + LoRA.

    python benchmarks/ntk_speed.py [--n 32] [--repeats 5] [--big-n 2048] [--block-size 128] [--quick]

Everything runs in ONE process on the SAME model, parameters and inputs:

* model: the embedded default architecture (``ntk_jax.launcher.config_lib.model_config``:
  hidden 64, 3 layers, 4 heads / 2 kv heads, MLP 128, vocab 50 of ``CharTokenizer``), random
  init (seed 0), LoRA r=8 on ``q_proj``/``v_proj`` of every layer with ``b_init_std=0.02``;
  the kernel is taken over the LoRA factors only (P = 5376) with
  ``f = lm_output_fn(subset)`` (mean logits over the response positions, O = 50);
* inputs: n random token sequences of length 32, ``attention_mask`` all ones and a
  ``loss_mask`` over 8 consecutive "response" positions.

Timings are of the jitted, traced ``(n, n)`` block function ``jax.jit(ntk_fn(...))(params, x, x)``
(no host assembly), after one compiling call, median of ``--repeats`` calls; methods are
timed round-robin (one call of each per round) so that load from other processes affects
all of them alike. The Jacobian-free kernels are timed as feature extraction
(``make_feature_fn(sum_of_outputs(f))``) plus the ``F Fᵀ`` Gram matrix in jnp.

``--prototypes`` (default on) also times variants of the block function that are *not*
library code (defined in this file) and that the report recommends for
``ntk_jax/kernels/ntk.py``; they are checked against ``jacobian`` like the rest.

The blocked run computes the traced kernel of ``--big-n`` examples with
``empirical_ntk(..., block_size=--block-size, method=<fastest exact library method>)`` and
compares the process' resident-memory growth with the bound
``compiled block (temp + arguments + output) + host kernel n²·4 B + input arrays``.

Prints one JSON object on stdout (progress and notes go to stderr).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import resource
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ntk_jax.data.tokenizer import CharTokenizer
from ntk_jax.kernels.features import make_feature_fn, sum_of_outputs
from ntk_jax.kernels.ntk import contract_jacobians, empirical_ntk, ntk_fn, per_example_jacobians
from ntk_jax.kernels.outputs import lm_output_fn
from ntk_jax.kernels.projection import RandomProjection
from ntk_jax.launcher.config_lib import model_config
from ntk_jax.models.lora import LoRAConfig, apply_lora, lora_filter
from ntk_jax.models.subset import param_subset
from ntk_jax.models.transformer import DecoderConfig, DecoderLM

EXACT_LIBRARY_METHODS = ("jacobian", "ntk_vp")
NT_METHODS = ("neural_tangents_jacobian_contraction", "neural_tangents_ntk_vector_products")
MB = 1024.0 ** 2


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# --- problem -------------------------------------------------------------------------------


def build_problem(seed: int = 0, lora_rank: int = 8):
    """The default-arch DecoderLM with LoRA on q/v of all layers; returns (f, params, info)."""
    tokenizer = CharTokenizer()
    arch = dict(model_config().arch)
    cfg = DecoderConfig.from_dict({**arch, "vocab_size": tokenizer.vocab_size})
    model = DecoderLM(cfg, rngs=nnx.Rngs(seed))
    lora = LoRAConfig(rank=lora_rank, targets=("q_proj", "v_proj"), b_init_std=0.02)
    apply_lora(model, lora, rngs=nnx.Rngs(seed + 1))
    subset = param_subset(model, lora_filter())
    f = lm_output_fn(subset)
    info = dict(arch={k: arch[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                           "intermediate_size")},
                vocab_size=tokenizer.vocab_size, lora=dict(rank=lora.rank, targets=list(lora.targets),
                                                           layers="all", b_init_std=lora.b_init_std),
                P=subset.num_params)
    return f, subset.params, info


def make_batch(n: int, seq_len: int, response_len: int, seed: int, vocab: int) -> dict:
    """n random sequences: <bos> + random characters; loss_mask on ``response_len`` positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, (n, seq_len))
    ids[:, 0] = 1  # <bos>
    lo = max(1, seq_len - 2 * response_len)
    starts = rng.integers(lo, seq_len - response_len + 1, n)
    loss_mask = np.zeros((n, seq_len), np.float32)
    for i, s in enumerate(starts):
        loss_mask[i, s:s + response_len] = 1.0
    return {"input_ids": jnp.asarray(ids, jnp.int32),
            "attention_mask": jnp.ones((n, seq_len), jnp.int32),
            "loss_mask": jnp.asarray(loss_mask)}


def nbytes(tree) -> int:
    return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)))


# --- prototypes (NOT library code; candidates for ntk_jax/kernels/ntk.py) -------------------


def _per_example_vjp(f, params, x):
    """``v ↦ (J(x_i)ᵀ v_i)_i`` for cotangents ``v (n, O)``: one linearised forward pass over the
    batch, per-example gradients via the broadcast-parameter stack."""
    n = x["input_ids"].shape[0] if isinstance(x, dict) else jax.tree.leaves(x)[0].shape[0]
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), params)
    per_ex = jax.vmap(lambda p, xj: f(p, jax.tree.map(lambda a: a[None], xj)).reshape(-1))
    _, vjp = jax.vjp(lambda ps: per_ex(ps, x), stacked)
    return vjp, n


def proto_vjp_trace_block(f, O: int, basis_batch: int, symmetric: bool = False):
    """Traced kernel ``Σ_b ⟨J(x1)ᵀe_b, J(x2)ᵀe_b⟩`` with ``basis_batch`` output basis vectors
    per step (a ``lax.map``): only (n, basis_batch, P) Jacobian rows live at a time, which is
    faster than forming the whole (n, O, P) Jacobian on CPU (cache) and bounds memory.
    ``symmetric``: ``block(params, x1)`` computes ``Θ(x1, x1)`` reusing the one VJP."""

    def contract(c1, c2, n1, n2):
        return sum(a.reshape(n1, -1) @ b.reshape(n2, -1).T
                   for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)))

    def block(params, x1, x2=None):
        v1, n1 = _per_example_vjp(f, params, x1)
        v2, n2 = (v1, n1) if x2 is None else _per_example_vjp(f, params, x2)
        dtype = jax.tree.leaves(params)[0].dtype

        def column(b):
            e = jax.nn.one_hot(b, O, dtype=dtype)
            (c1,) = v1(jnp.broadcast_to(e, (n1, O)))
            if x2 is None:
                return contract(c1, c1, n1, n1)
            (c2,) = v2(jnp.broadcast_to(e, (n2, O)))
            return contract(c1, c2, n1, n2)

        return jax.lax.map(column, jnp.arange(O), batch_size=basis_batch).sum(axis=0)

    if symmetric:
        return lambda params, x1: block(params, x1, None)
    return block


# --- timing --------------------------------------------------------------------------------


def time_round_robin(fns: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Compiles (first call) every ``fns[name] = (callable, args)``, then ``repeats`` rounds of
    one call each. Returns (median seconds, compile+first-call seconds, outputs)."""
    outputs, first = {}, {}
    for name, (fn, args) in fns.items():
        t = time.perf_counter()
        outputs[name] = np.asarray(jax.block_until_ready(fn(*args)))
        first[name] = time.perf_counter() - t
        log(f"[compile] {name}: {first[name]:.2f} s")
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name, (fn, args) in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t)
        log(f"[round {r + 1}/{repeats}] " + ", ".join(f"{k}={v[-1]:.3f}s" for k, v in times.items()))
    return {k: float(np.median(v)) for k, v in times.items()}, first, outputs


def max_rel_diff(K: np.ndarray, ref: np.ndarray) -> float:
    """``max |K − ref| / max |ref|`` (entry-wise errors relative to the kernel's scale)."""
    return float(np.max(np.abs(np.asarray(K, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


# --- memory --------------------------------------------------------------------------------


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _rss_bytes() -> int:
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:  # /proc fallback (Linux)
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # Linux: KiB


class PeakRSS:
    """Samples the resident set size every ``interval`` s in a thread; ``peak`` is the max."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def compiled_memory(fn, *args) -> dict | None:
    """temp/argument/output bytes of ``jax.jit(fn)`` compiled for ``args`` (None if unknown)."""
    try:
        stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001 - backend-dependent
        log(f"memory_analysis unavailable: {e!r}")
        return None
    if stats is None:
        return None
    d = {k: int(getattr(stats, k, 0) or 0) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                      "output_size_in_bytes", "alias_size_in_bytes",
                                                      "generated_code_size_in_bytes")}
    d["total_bytes"] = d["temp_size_in_bytes"] + d["argument_size_in_bytes"] + d["output_size_in_bytes"]
    return d


def blocked_run(f, params, X, O: int, method: str, block_size: int, basis_batch: int) -> dict:
    n = X["input_ids"].shape[0]
    bs = min(block_size, n)
    xb = jax.tree.map(lambda a: a[:bs], X)
    mem = compiled_memory(ntk_fn(f, trace=True, method=method, output_dim=O, basis_batch=basis_batch),
                          params, xb, xb)
    host_kernel = n * n * 4
    inputs = nbytes(X)
    compiled = mem["total_bytes"] if mem else 0
    bound = compiled + host_kernel + inputs

    gc.collect()
    _malloc_trim()
    base, maxrss0 = _rss_bytes(), _maxrss_bytes()
    with PeakRSS() as sampler:
        t = time.perf_counter()
        K = empirical_ntk(f, params, X, trace=True, method=method, block_size=bs, basis_batch=basis_batch)
        wall = time.perf_counter() - t
    maxrss1 = _maxrss_bytes()
    sampled_growth = sampler.peak - base
    # ru_maxrss only moves if this run set a new process-wide peak; then it is the exact peak.
    growth = maxrss1 - base if maxrss1 > maxrss0 else sampled_growth
    growth = max(growth, sampled_growth)
    n_blocks = sum(1 for i in range(0, n, bs) for j in range(0, n, bs) if j >= i)
    return {"n": n, "block_size": bs, "method": method, "n_blocks_computed": n_blocks,
            "wall_s": wall, "peak_rss_growth_mb": growth / MB,
            "peak_rss_growth_sampled_mb": sampled_growth / MB,
            "ru_maxrss_growth_mb": (maxrss1 - maxrss0) / MB,
            "rss_before_mb": base / MB,
            "compiled_block_mb": compiled / MB if mem else None,
            "compiled_block_bytes": mem,
            "host_kernel_mb": host_kernel / MB, "inputs_mb": inputs / MB,
            "bound_mb": bound / MB, "within_bound": bool(growth <= bound),
            "kernel_finite": bool(np.isfinite(K).all()), "kernel_shape": list(K.shape),
            "note": ("growth = peak RSS during empirical_ntk minus RSS before (sampled every 2 ms, or "
                     "ru_maxrss when the run set a new process peak); it includes the one-off XLA "
                     "compilation of the block, which the bound does not")}


# --- main ----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32, help="examples in the timed (n, n) kernel")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method (median)")
    p.add_argument("--big-n", type=int, default=2048, help="examples in the blocked-kernel run")
    p.add_argument("--block-size", type=int, default=128, help="block size of the blocked run")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=8, help="loss_mask positions per example")
    p.add_argument("--basis-batch", type=int, default=16, help="ntk_vp basis_batch (library default 16)")
    p.add_argument("--projection-dim", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proto-basis-batch", type=int, default=8,
                   help="basis_batch of the prototype basis-chunked VJP kernel")
    p.add_argument("--no-prototypes", dest="prototypes", action="store_false",
                   help="skip timing the (non-library) prototype block functions")
    p.add_argument("--quick", action="store_true", help="n=8, repeats=2, big-n=64, block 32 (for tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.big_n, args.block_size = 8, 2, 64, 32
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    f, params, info = build_problem(args.seed)
    x = make_batch(args.n, args.seq_len, args.response_len, args.seed, info["vocab_size"])
    O = int(jax.eval_shape(f, params, jax.tree.map(lambda a: a[:1], x)).shape[-1])
    P = info["P"]
    log(f"P={P} O={O} n={args.n} T={args.seq_len} device={jax.devices()[0]}")

    def block(**kw):
        return jax.jit(ntk_fn(f, trace=True, output_dim=O, basis_batch=args.basis_batch, **kw))

    feat_exact = make_feature_fn(sum_of_outputs(f))
    feat_proj = make_feature_fn(sum_of_outputs(f), RandomProjection(args.projection_dim, seed=args.seed))
    gram = jax.jit(lambda F: F @ F.T)
    fns = {
        "jacobian": (block(method="jacobian"), (params, x, x)),
        "ntk_vp": (block(method="ntk_vp"), (params, x, x)),
        NT_METHODS[0]: (block(method="neural_tangents", nt_implementation="jacobian_contraction"), (params, x, x)),
        NT_METHODS[1]: (block(method="neural_tangents", nt_implementation="ntk_vector_products"), (params, x, x)),
        "jacobian_free": (lambda p, xx: gram(feat_exact(p, xx)), (params, x)),
        f"jacobian_free_proj{args.projection_dim}": (lambda p, xx: gram(feat_proj(p, xx)), (params, x)),
    }
    proto_names = []
    if args.prototypes:
        bb = min(args.proto_basis_batch, O)
        fns.update({
            f"proto_vjp_trace_bb{bb}": (jax.jit(proto_vjp_trace_block(f, O, bb)), (params, x, x)),
            f"proto_vjp_trace_bb{bb}_symmetric": (jax.jit(proto_vjp_trace_block(f, O, bb, symmetric=True)),
                                                  (params, x)),
            # neural-tangents given x2=None reuses J(x1): the fair baseline for a symmetric block.
            "proto_neural_tangents_jacobian_contraction_x2_none": (jax.jit(_nt_x2_none(f, O)), (params, x)),
        })
        proto_names = [k for k in fns if k.startswith("proto_")]

    medians, first_call, outputs = time_round_robin(fns, args.repeats)

    # Agreement. Exact traced kernels against `jacobian`; the exact Jacobian-free kernel against
    # its definition Σ_ab Θ_ab = (Σ_a J_a)(Σ_b J_b)ᵀ from the same per-example Jacobians.
    ref = outputs["jacobian"].astype(np.float64)
    agreement = {k: max_rel_diff(outputs[k], ref) for k in ("ntk_vp",) + NT_METHODS}
    J = per_example_jacobians(f, params, x)
    Jsum = jax.tree.map(lambda a: a.sum(axis=1), J)
    jf_ref = np.asarray(jax.jit(lambda a: contract_jacobians(
        jax.tree.map(lambda l: l[:, None], a), jax.tree.map(lambda l: l[:, None], a), True))(Jsum), np.float64)
    agreement["jacobian_free_vs_sum_of_full_kernel"] = max_rel_diff(outputs["jacobian_free"], jf_ref)
    jf = outputs["jacobian_free"].astype(np.float64)
    jf_proj = outputs[f"jacobian_free_proj{args.projection_dim}"].astype(np.float64)
    proj_err = float(np.linalg.norm(jf_proj - jf) / np.linalg.norm(jf))

    nt_best_method = min(NT_METHODS, key=medians.get)
    nt_best = medians[nt_best_method]
    best_exact = min(EXACT_LIBRARY_METHODS, key=medians.get)
    library_methods = [k for k in fns if not k.startswith("proto_")]
    ratios = {k: nt_best / medians[k] for k in library_methods}
    speedup = nt_best / medians[best_exact]

    prototypes = None
    if proto_names:
        prototypes = {
            "note": ("block functions defined in benchmarks/ntk_speed.py, not library code; "
                     "'_symmetric' and '_x2_none' compute Θ(x, x) from ONE batch (J reused), "
                     "the others get (x, x) as two arguments like the library blocks"),
            "timings_s": {k: medians[k] for k in proto_names},
            "ratios_vs_best_neural_tangents": {k: nt_best / medians[k] for k in proto_names},
            "agreement_max_rel_diff": {k: max_rel_diff(outputs[k], ref) for k in proto_names},
        }
        sym = [k for k in proto_names if k.endswith("_symmetric")][0]
        prototypes["symmetric_speedup_vs_neural_tangents_x2_none"] = (
            medians["proto_neural_tangents_jacobian_contraction_x2_none"] / medians[sym])

    # Free what the timing phase holds before the memory measurement.
    del outputs, J, Jsum, fns
    jax.clear_caches()
    gc.collect()

    X_big = make_batch(args.big_n, args.seq_len, args.response_len, args.seed + 1, info["vocab_size"])
    blocked = blocked_run(f, params, X_big, O, best_exact, args.block_size, args.basis_batch)

    dev = jax.devices()[0]
    result = {
        "device": f"{dev.platform}:{dev.device_kind} ({os.cpu_count()} host cores, {platform.machine()})",
        "jax_version": jax.__version__,
        "model": {**info, "O": O, "n": args.n, "seq_len": args.seq_len, "response_len": args.response_len,
                  "dtype": "float32"},
        "settings": {"repeats": args.repeats, "ntk_vp_basis_batch": args.basis_batch,
                     "projection_dim": args.projection_dim, "quick": args.quick,
                     "timing": "jitted traced (n, n) block, median of repeats after a compiling call, "
                               "methods interleaved round-robin"},
        "timings_s": {k: medians[k] for k in library_methods},
        "compile_and_first_call_s": {k: first_call[k] for k in library_methods + proto_names},
        "ratios_vs_best_neural_tangents": ratios,
        "best_neural_tangents_mode": nt_best_method,
        "best_exact_method": best_exact,
        "speedup_best_exact_vs_best_nt": speedup,
        "target_at_least_as_fast": bool(speedup >= 1.0),
        "target_aim_1_5x": bool(speedup >= 1.5),
        "agreement_max_rel_diff": agreement,
        "agreement_definition": "max|K - K_ref| / max|K_ref|; K_ref = jacobian (traced) or "
                                "(sum_a J_a)(sum_b J_b)^T (jacobian_free)",
        "jacobian_free_projected_rel_error_fro": proj_err,
        "jacobian_free_projected_expected_rel_error": math.sqrt(2.0 / args.projection_dim),
        "prototypes": prototypes,
        "blocked_kernel": blocked,
        "total_wall_s": time.perf_counter() - t_start,
    }
    print(json.dumps(result, indent=2))
    return result


def _nt_x2_none(f, O):
    """neural-tangents' jacobian_contraction kernel of ONE batch (``x2=None``: J reused)."""
    from ntk_jax.kernels import nt_compat

    flat = lambda p, xx: f(p, xx).reshape(jax.tree.leaves(xx)[0].shape[0], -1)  # noqa: E731
    kernel_fn = nt_compat.empirical_ntk_fn(flat, trace_axes=(-1,), vmap_axes=0,
                                           implementation="jacobian_contraction")
    return lambda p, xx: kernel_fn(xx, None, p) * O  # neural-tangents averages the trace


if __name__ == "__main__":
    main()
