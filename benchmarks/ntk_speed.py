"""Speed, agreement and memory of the eNTK methods on the default tiny transformer + LoRA.

    python benchmarks/ntk_speed.py [--n 32] [--repeats 5] [--big-n 1024] [--block-size 128] [--quick]

Everything runs in ONE process on the SAME model, parameters and inputs, with library code
only (``ntk_jax.kernels``; no kernel logic lives in this file):

* model: the embedded default architecture (``ntk_jax.launcher.config_lib.model_config``:
  hidden 64, 3 layers, 4 heads / 2 kv heads, MLP 128, vocab 50 of ``CharTokenizer``), random
  init (seed 0), LoRA r=8 on ``q_proj``/``v_proj`` of every layer with ``b_init_std=0.02``;
  the kernel is taken over the LoRA factors only (P = 5376) with
  ``f = lm_output_fn(subset)`` (mean logits over the response positions, O = 50);
* inputs: n random token sequences of length 32, ``attention_mask`` all ones and a
  ``loss_mask`` over 8 consecutive "response" positions.

Every method is timed in two forms, as the jitted traced ``(n, n)`` block function
``jax.jit(ntk_fn(...))`` (no host assembly):

* ``cross``: ``(params, x, x)`` -- x passed as two arguments, as for an off-diagonal block;
* ``symmetric``: ``(params, x, None)`` -- ``x2 = x1`` known to the method (the library's
  ``jacobian`` differentiates once; neural-tangents gets ``x2=None``, its own symmetric path).

Each function is called once to compile, then ``--repeats`` rounds of one call each
(round-robin, so load from other processes affects all alike); the median is reported.
``--basis-batch`` (default: the library default per method, ``DEFAULT_BASIS_BATCH``) is
passed to ``ntk_fn``. The Jacobian-free kernels are timed as feature extraction
(``make_feature_fn(sum_of_outputs(f))``) plus the Gram matrix in jnp (cross: features of
both arguments; symmetric: of one).

The every-form comparison (``every_form_comparison``; skip with ``--no-compare``) times the
library's ``jacobian``, ``ntk_vp`` and ``structured`` methods and neural-tangents'
JACOBIAN_CONTRACTION / NTK_VECTOR_PRODUCTS on {a 3-layer tanh MLP ``--mlp-in`` → 512 → 512 →
10 with biases (kernel over all parameters); the same MLP with 100 outputs on a quarter of the
examples (``mlp_wide_out``); a LeNet-like CNN on 8×8 one-channel images (two 3×3 convolutions
16 / 32 channels, average pooling, dense to 10; ``cnn``); the transformer + LoRA above} ×
{traced, full} × {cross, symmetric} at ``--compare-n`` (64) examples, interleaved rounds,
medians; it prints a markdown table (stderr) of the best library method vs the best
neural-tangents mode per form, with the method ``method="auto"`` picks and its time over the
best library method's (``auto_within_10pct_of_best``). A method that runs out of memory
is reported as ``None``. Each problem also times its backward floor (:func:`backward_floor`:
the O backward passes every exact method makes, twice for a cross kernel), and the table
gives ``best neural-tangents / floor``, the largest speedup any exact method could reach.

The blocked run computes the traced symmetric kernel of ``--big-n`` examples with
``empirical_ntk(X, None, block_size=--block-size, method=<fastest exact library method,
cross form>)`` and compares the process' resident-memory growth with the bound in
``blocked_kernel.bound_definition``.

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
from ntk_jax.kernels.contract import contract_jacobians
from ntk_jax.kernels.ntk import DEFAULT_BASIS_BATCH, empirical_ntk, ntk_fn, per_example_jacobians
from ntk_jax.kernels.outputs import lm_output_fn
from ntk_jax.kernels.projection import RandomProjection
from ntk_jax.kernels.structured import site_cotangents, structured_plan
from ntk_jax.launcher.config_lib import model_config
from ntk_jax.models.lora import LoRAConfig, apply_lora, lora_filter
from ntk_jax.models.subset import param_subset
from ntk_jax.models.transformer import DecoderConfig, DecoderLM

EXACT_LIBRARY_METHODS = ("jacobian", "ntk_vp", "structured")
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


def build_mlp_problem(seed: int = 0, d_in: int = 128, width: int = 512, depth: int = 3, out: int = 10):
    """A ``depth``-layer tanh MLP ``d_in → width → … → out`` with biases (LeCun-normal
    weights, N(0, 0.01) biases); the kernel is over all its parameters. Returns (f, params, info)."""
    dims = [d_in] + [width] * (depth - 1) + [out]
    keys = jax.random.split(jax.random.key(seed), 2 * depth)
    params = {f"layer{i}": {"w": jax.random.normal(keys[2 * i], (dims[i], dims[i + 1])) / math.sqrt(dims[i]),
                            "b": 0.1 * jax.random.normal(keys[2 * i + 1], (dims[i + 1],))}
              for i in range(depth)}

    def f(p, x):
        h = x
        for i in range(depth):
            h = h @ p[f"layer{i}"]["w"] + p[f"layer{i}"]["b"]
            h = jnp.tanh(h) if i < depth - 1 else h
        return h

    P = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    return f, params, {"dims": dims, "activation": "tanh", "P": P, "O": out}


def build_cnn_problem(seed: int = 0, side: int = 8, channels: tuple[int, int] = (16, 32), out: int = 10):
    """A LeNet-like CNN for ``side × side`` one-channel images: two 3×3 SAME convolutions
    (``channels``) with tanh and 2×2 average pooling, then a dense layer to ``out``; the kernel
    is over all its parameters. Returns (f, params, info)."""
    c1, c2 = channels
    keys = jax.random.split(jax.random.key(seed), 6)
    params = {"conv1": {"w": jax.random.normal(keys[0], (3, 3, 1, c1)) / 3.0, "b": 0.1 * jax.random.normal(keys[1], (c1,))},
              "conv2": {"w": jax.random.normal(keys[2], (3, 3, c1, c2)) / math.sqrt(9 * c1),
                        "b": 0.1 * jax.random.normal(keys[3], (c2,))}}
    flat = (side // 4) ** 2 * c2
    params["dense"] = {"w": jax.random.normal(keys[4], (flat, out)) / math.sqrt(flat),
                       "b": 0.1 * jax.random.normal(keys[5], (out,))}

    def conv(h, layer):
        h = jax.lax.conv_general_dilated(h, layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jnp.tanh(h + layer["b"])
        n, hh, ww, c = h.shape
        return h.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))

    def f(p, x):
        h = conv(conv(x, p["conv1"]), p["conv2"])
        return h.reshape(h.shape[0], -1) @ p["dense"]["w"] + p["dense"]["b"]

    P = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    return f, params, {"side": side, "channels": list(channels), "activation": "tanh", "P": P, "O": out}


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


# --- timing --------------------------------------------------------------------------------


def time_round_robin(fns: dict, repeats: int) -> tuple[dict, dict, dict, dict]:
    """Compiles (first call) every ``fns[name] = (callable, args)``, then ``repeats`` rounds of
    one call each. Returns (median seconds, compile+first-call seconds, outputs, min seconds)."""
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
    return ({k: float(np.median(v)) for k, v in times.items()}, first, outputs,
            {k: float(np.min(v)) for k, v in times.items()})


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


def _measured_ntk(f, params, X, method, block_size, basis_batch):
    """Runs the symmetric ``empirical_ntk(X, None)`` from a trimmed heap; returns (K, wall s,
    peak RSS growth bytes, sampled growth, ru_maxrss growth)."""
    gc.collect()
    _malloc_trim()
    base, maxrss0 = _rss_bytes(), _maxrss_bytes()
    with PeakRSS() as sampler:
        t = time.perf_counter()
        K = empirical_ntk(f, params, X, None, trace=True, method=method, block_size=block_size,
                          basis_batch=basis_batch)
        wall = time.perf_counter() - t
    maxrss1 = _maxrss_bytes()
    sampled = sampler.peak - base
    # ru_maxrss only moves if this run set a new process-wide peak; then it is the exact peak.
    growth = max(sampled, maxrss1 - base if maxrss1 > maxrss0 else 0)
    return K, wall, growth, sampled, maxrss1 - maxrss0


BOUND_DEFINITION = (
    "bound = compiled_block + host_kernel + inputs + one_off + slack, where compiled_block = "
    "max over the two compiled block executables (off-diagonal (x1, x2) and diagonal (x1, None)) of "
    "XLA memory_analysis temp + argument + output bytes; host_kernel = n^2 * 4 B (float32 numpy "
    "result); inputs = bytes of the n-example input arrays; one_off = measured cost of the same "
    "empirical_ntk call on a small problem (2 * block_size examples: 2 diagonal + 1 off-diagonal "
    "block, so both executables are traced, compiled and loaded) minus its compiled_block, host "
    "kernel and inputs (tracing + XLA compilation + executables: O(1) in n); slack = 10% of "
    "(compiled_block + one_off) for allocator fragmentation / page granularity. growth = peak RSS "
    "during the n-example empirical_ntk call minus RSS before it (heap trimmed first; sampled every "
    "2 ms, or ru_maxrss when the run set a new process peak). Both runs are repeated (--blocked-repeats): "
    "growth is the least over the n-example runs and one_off the largest over the small runs, so that "
    "allocator noise in one run (which only ever adds memory) does not decide the result, while a "
    "kernel that holds more than one block's memory shows in every run. within_bound states: the "
    "n-example kernel needs no more memory than one block plus the host kernel and the inputs.")


def blocked_run(f, params, X, O: int, method: str, block_size: int, basis_batch: int | None,
                repeats: int = 3) -> dict:
    """Blocked traced symmetric kernel of all of ``X``; memory growth against the bound
    (:data:`BOUND_DEFINITION`), each side measured ``repeats`` times (runs interleaved)."""
    n = X["input_ids"].shape[0]
    bs = min(block_size, n)
    xb = jax.tree.map(lambda a: a[:bs], X)
    block_fn = ntk_fn(f, trace=True, method=method, output_dim=O, basis_batch=basis_batch)
    mem_cross = compiled_memory(block_fn, params, xb, xb)
    mem_diag = compiled_memory(block_fn, params, xb, None)
    mems = [m for m in (mem_cross, mem_diag) if m]
    compiled = max((m["total_bytes"] for m in mems), default=0)
    host_kernel = n * n * 4
    inputs = nbytes(X)

    # One-off cost, measured right after each big run on the first 2 blocks' worth of examples.
    n_small = min(2 * bs, n)
    xs = jax.tree.map(lambda a: a[:n_small], X)
    big, small = [], []
    for _ in range(max(int(repeats), 1)):
        K, wall, growth, sampled, ru_growth = _measured_ntk(f, params, X, method, bs, basis_batch)
        finite, shape = bool(np.isfinite(K).all()), list(K.shape)
        del K
        big.append((growth, wall, sampled, ru_growth))
        small.append(_measured_ntk(f, params, xs, method, bs, basis_batch)[1:3])
    growth, wall, sampled, ru_growth = min(big)  # noise only adds memory: the least run
    wall1, growth1 = max(small, key=lambda r: r[1])  # the most generous one-off
    one_off = max(0, growth1 - compiled - n_small * n_small * 4 - nbytes(xs))
    slack = int(0.1 * (compiled + one_off))
    bound = compiled + one_off + host_kernel + inputs + slack
    bound_strict = compiled + host_kernel + inputs
    n_blocks = sum(1 for i in range(0, n, bs) for j in range(0, n, bs) if j >= i)
    n_diag = len(range(0, n, bs))
    return {"n": n, "block_size": bs, "method": method, "symmetric": True,
            "n_blocks_computed": n_blocks, "n_diagonal_blocks": n_diag,
            "wall_s": wall, "peak_rss_growth_mb": growth / MB, "repeats": len(big),
            "peak_rss_growth_mb_per_run": [g / MB for g, *_ in big],
            "one_off_growth_mb_per_run": [g / MB for _, g in small],
            "peak_rss_growth_sampled_mb": sampled / MB, "ru_maxrss_growth_mb": ru_growth / MB,
            "compiled_block_mb": compiled / MB if mems else None,
            "compiled_block_bytes": {"off_diagonal": mem_cross, "diagonal": mem_diag},
            "one_off_run": {"n": n_small, "wall_s": wall1, "peak_rss_growth_mb": growth1 / MB},
            "one_off_mb": one_off / MB,
            "host_kernel_mb": host_kernel / MB, "inputs_mb": inputs / MB, "slack_mb": slack / MB,
            "bound_mb": bound / MB, "within_bound": bool(growth <= bound),
            "bound_without_one_off_mb": bound_strict / MB,
            "within_bound_without_one_off": bool(growth <= bound_strict),
            "kernel_finite": finite, "kernel_shape": shape,
            "bound_definition": BOUND_DEFINITION}


# --- main ----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32, help="examples in the timed (n, n) kernel")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method (median)")
    p.add_argument("--big-n", type=int, default=1024,
                   help="examples in the blocked-kernel run (1024 keeps the default run < 8 min on "
                        "2 CPU cores; 2048 = 136 blocks of 128)")
    p.add_argument("--block-size", type=int, default=128, help="block size of the blocked run")
    p.add_argument("--blocked-repeats", type=int, default=3,
                   help="repeats of the blocked run and of its one-off measurement (least growth, largest one-off)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=8, help="loss_mask positions per example")
    p.add_argument("--basis-batch", type=int, default=None,
                   help="basis_batch passed to ntk_fn / empirical_ntk (default: library default "
                        "per method, ntk_jax.kernels.ntk.DEFAULT_BASIS_BATCH)")
    p.add_argument("--projection-dim", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-n", type=int, default=64,
                   help="examples of the every-form comparison (MLP and transformer + LoRA)")
    p.add_argument("--mlp-in", type=int, default=128, help="input dim of the comparison's MLP")
    p.add_argument("--mlp-width", type=int, default=512, help="width of the comparison's 3-layer tanh MLP")
    p.add_argument("--no-compare", action="store_true", help="skip the every-form comparison")
    p.add_argument("--compare-skip", nargs="*", default=list(COMPARE_SKIP_DEFAULT),
                   help="problem:method pairs left out of the comparison (default: the NTK-vector-product "
                        "methods on the transformer: O=50 JVP passes per pair, 15-30x slower than "
                        "Jacobian contraction in the main table, and neural-tangents' needs ~27 GB at n=64)")
    p.add_argument("--compare-problems", nargs="+", default=["mlp", "mlp_wide_out", "cnn", "transformer_lora"],
                   choices=["mlp", "mlp_wide_out", "cnn", "transformer_lora"],
                   help="problems of the every-form comparison")
    p.add_argument("--quick", action="store_true",
                   help="n=8, repeats=2, big-n=96, block 32; comparison: the MLP (width 128) and the CNN, "
                        "compare-n=8 (for tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.big_n, args.block_size, args.compare_n = 8, 2, 96, 32, 8
        args.mlp_width, args.compare_problems = 128, ["mlp", "cnn"]
    return args


FORMS = ("cross", "symmetric")
COMPARE_LIBRARY = ("jacobian", "ntk_vp", "structured")
COMPARE_SKIP_DEFAULT = ("transformer_lora:ntk_vp", "transformer_lora:neural_tangents_ntk_vector_products")


def _safe_call(fn, args):
    """``fn(*args)`` to host (each leaf of a pytree result), or ``None`` if XLA runs out of
    memory (reported, not fatal)."""
    try:
        return jax.tree.map(np.asarray, jax.block_until_ready(fn(*args)))
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError RESOURCE_EXHAUSTED and the like
        log(f"[failed] {type(e).__name__}: {str(e)[:200]}")
        return None


def forms_comparison(args) -> dict:
    """Best library method vs best neural-tangents mode for every form: {MLP, transformer +
    LoRA} × {traced, full} × {cross, symmetric}, at ``args.compare_n`` examples; every
    function compiled first, then ``args.repeats`` interleaved rounds (medians). A method
    that runs out of memory is reported as ``None`` and excluded from "best"."""
    problems = {}
    if "mlp" in args.compare_problems:
        f, params, info = build_mlp_problem(args.seed, d_in=args.mlp_in, width=args.mlp_width)
        x = jax.random.normal(jax.random.key(args.seed + 7), (args.compare_n, args.mlp_in))
        problems["mlp"] = (f, params, x, info["O"], info)
    if "mlp_wide_out" in args.compare_problems:  # many outputs, fewer examples: the per-output methods' worst case
        f, params, info = build_mlp_problem(args.seed, d_in=args.mlp_in, width=args.mlp_width, out=100)
        x = jax.random.normal(jax.random.key(args.seed + 8), (max(args.compare_n // 4, 2), args.mlp_in))
        problems["mlp_wide_out"] = (f, params, x, info["O"], info)
    if "cnn" in args.compare_problems:
        f, params, info = build_cnn_problem(args.seed)
        x = jax.random.normal(jax.random.key(args.seed + 9), (args.compare_n, info["side"], info["side"], 1))
        problems["cnn"] = (f, params, x, info["O"], info)
    if "transformer_lora" in args.compare_problems:
        f, params, info = build_problem(args.seed)
        x = make_batch(args.compare_n, args.seq_len, args.response_len, args.seed, info["vocab_size"])
        O = int(jax.eval_shape(f, params, jax.tree.map(lambda a: a[:1], x)).shape[-1])
        problems["transformer_lora"] = (f, params, x, O, {"P": info["P"], "O": O, "lora": info["lora"]})
    methods = COMPARE_LIBRARY + NT_METHODS
    fns, autos, plans = {}, {}, {}
    for pname, (f, params, x, O, _) in problems.items():
        for trace in (True, False):
            kind = "traced" if trace else "full"
            for m in methods:
                if f"{pname}:{m}" in args.compare_skip:
                    continue
                kw = (dict(method="neural_tangents", nt_implementation=m[len("neural_tangents_"):])
                      if m.startswith("neural_tangents") else dict(method=m))
                fn = jax.jit(ntk_fn(f, trace=trace, output_dim=O, basis_batch=args.basis_batch, **kw))
                fns[(pname, kind, "cross", m)] = (fn, (params, x, x))
                fns[(pname, kind, "symmetric", m)] = (fn, (params, x, None))
            plan = structured_plan(f, params, x, None, trace=trace)
            autos[(pname, kind)] = plan.auto
            plans[(pname, kind)] = plan.summary()
        fns[(pname, "floor", "one_argument", "backward_passes")] = (backward_floor(f, O), (params, x))
    outputs, times = {}, {k: [] for k in fns}
    for key, (fn, a) in fns.items():
        t = time.perf_counter()
        outputs[key] = _safe_call(fn, a)
        log(f"[compile] {'/'.join(key)}: {time.perf_counter() - t:.2f} s")
    live = [k for k in fns if outputs[k] is not None]
    for r in range(args.repeats):
        for key in live:
            fn, a = fns[key]
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times[key].append(time.perf_counter() - t)
        log(f"[compare round {r + 1}/{args.repeats}]")
    table, rows = {}, []
    for pname, (_, _, _, O, info) in problems.items():
        for kind in ("traced", "full"):
            for form in FORMS:
                med = {m: (float(np.median(times[(pname, kind, form, m)])) if times.get((pname, kind, form, m))
                           else None) for m in methods}
                ok = {m: v for m, v in med.items() if v is not None}
                best_lib = min((m for m in COMPARE_LIBRARY if m in ok), key=ok.get)
                best_nt = min((m for m in NT_METHODS if m in ok), key=ok.get, default=None)
                ref = outputs[(pname, kind, "cross", "jacobian")].astype(np.float64)
                agree = {m: max_rel_diff(outputs[(pname, kind, form, m)], ref) for m in methods
                         if outputs.get((pname, kind, form, m)) is not None and (form, m) != ("cross", "jacobian")}
                ratio = ok[best_nt] / ok[best_lib] if best_nt else None
                floor_one = times.get((pname, "floor", "one_argument", "backward_passes"))
                floor = (float(np.median(floor_one)) * (2 if form == "cross" else 1)) if floor_one else None
                auto = autos[(pname, kind)]
                auto_over_best = ok[auto] / ok[best_lib] if auto in ok else None
                table.setdefault(pname, {}).setdefault(kind, {})[form] = {
                    "auto_time_over_best_library": auto_over_best,
                    "auto_within_10pct_of_best": bool(auto_over_best is not None and auto_over_best <= 1.10),
                    "median_s": med, "best_library_method": best_lib, "best_neural_tangents_mode": best_nt,
                    "speedup_best_library_vs_best_nt": ratio,
                    "auto_choice": auto, "auto_speedup_vs_best_nt": (ok[best_nt] / ok[auto]
                                                                     if best_nt and auto in ok else None),
                    "target_1_5x": bool(ratio is not None and ratio >= 1.5),
                    "backward_floor_s": floor,
                    "best_nt_over_floor": (ok[best_nt] / floor if best_nt and floor else None),
                    "agreement_max_rel_diff_vs_cross_jacobian": agree}
                rows.append((pname, kind, form, best_lib, ok[best_lib], best_nt, ok.get(best_nt), ratio, auto,
                             auto_over_best, floor))
    lines = ["| problem | kernel | form | best ours | s | best neural-tangents | s | speedup | auto "
             "| auto / best | backward floor s | NT / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for pname, kind, form, bl, tl, bn, tn, ratio, auto, aob, floor in rows:
        bound = f"{tn / floor:.2f}x" if tn is not None and floor else "n/a"
        lines.append(f"| {pname} | {kind} | {form} | {bl} | {tl:.4g} | {bn} | "
                     f"{'n/a' if tn is None else f'{tn:.4g}'} | {'n/a' if ratio is None else f'{ratio:.2f}x'} | {auto} "
                     f"| {'n/a' if aob is None else f'{aob:.2f}'} "
                     f"| {'n/a' if floor is None else f'{floor:.4g}'} | {bound} |")
    log("\n".join(lines))
    return {"n": args.compare_n, "repeats": args.repeats, "skipped": sorted(args.compare_skip),
            "problems": {p: v[4] for p, v in problems.items()},
            "structured_plan_summary": {f"{p}/{k}": v for (p, k), v in plans.items()},
            "results": table, "table_markdown": "\n".join(lines),
            "definition": "speedup = median(best neural-tangents mode) / median(best library method of "
                          "jacobian, ntk_vp, structured), same problem, kernel (traced (n, n) / full "
                          "(n, n, O, O)) and form (cross: kernel(params, x, x); symmetric: kernel(params, "
                          "x, None)); jitted block functions, interleaved rounds; None = failed (OOM); "
                          "backward_floor_s = the O backward passes every exact method makes (backward_floor; "
                          "twice for cross), best_nt_over_floor = the largest speedup any exact method could "
                          "reach"}


def backward_floor(f, O: int):
    """``(params, x) -> `` the O backward passes over the batch that every exact method makes
    (``ntk_jax.kernels.structured.site_cotangents``: one forward, then per output the
    cotangents at every linear site's output and the other leaves' gradients; no weight
    gradient formed, nothing contracted). Its time bounds any exact method's from below (a
    cross kernel pays it for both arguments), so ``best neural-tangents time / floor`` bounds
    the speedup any exact method can reach on the problem."""
    return jax.jit(lambda params, x: site_cotangents(f, params, x, O))


def _best(timings: dict, names) -> str:
    return min(names, key=timings.get)


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

    kernels = {
        "jacobian": block(method="jacobian"),
        "ntk_vp": block(method="ntk_vp"),
        "structured": block(method="structured"),
        NT_METHODS[0]: block(method="neural_tangents", nt_implementation="jacobian_contraction"),
        NT_METHODS[1]: block(method="neural_tangents", nt_implementation="ntk_vector_products"),
    }
    feat_exact = make_feature_fn(sum_of_outputs(f))
    feat_proj = make_feature_fn(sum_of_outputs(f), RandomProjection(args.projection_dim, seed=args.seed))
    proj_name = f"jacobian_free_proj{args.projection_dim}"
    gram = jax.jit(lambda F1, F2: F1 @ F2.T)
    gram_sym = jax.jit(lambda F: F @ F.T)
    fns = {}
    for name, fn in kernels.items():
        fns[("cross", name)] = (fn, (params, x, x))
        fns[("symmetric", name)] = (fn, (params, x, None))
    for name, feat in (("jacobian_free", feat_exact), (proj_name, feat_proj)):
        fns[("cross", name)] = ((lambda feat: lambda p, a, b: gram(feat(p, a), feat(p, b)))(feat),
                                (params, x, x))
        fns[("symmetric", name)] = ((lambda feat: lambda p, a: gram_sym(feat(p, a)))(feat), (params, x))
    methods = list(kernels) + ["jacobian_free", proj_name]

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    medians, first_call, outputs, minima = time_round_robin(
        {f"{form}/{name}": v for (form, name), v in fns.items()}, args.repeats)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def per_form(d):
        return {form: {m: d[f"{form}/{m}"] for m in methods} for form in FORMS}

    timings, timings_min, compile_s = per_form(medians), per_form(minima), per_form(first_call)
    outs = per_form(outputs)

    # Agreement. Exact traced kernels against the cross `jacobian` kernel; the exact
    # Jacobian-free kernel against its definition Σ_ab Θ_ab = (Σ_a J_a)(Σ_b J_b)ᵀ from the same
    # per-example Jacobians.
    ref = outs["cross"]["jacobian"].astype(np.float64)
    agreement = {form: {m: max_rel_diff(outs[form][m], ref) for m in kernels
                        if not (form == "cross" and m == "jacobian")} for form in FORMS}
    J = per_example_jacobians(f, params, x)
    Jsum = jax.tree.map(lambda a: a.sum(axis=1), J)
    jf_ref = np.asarray(jax.jit(lambda a: contract_jacobians(
        jax.tree.map(lambda l: l[:, None], a), jax.tree.map(lambda l: l[:, None], a), True))(Jsum), np.float64)
    for form in FORMS:
        agreement[form]["jacobian_free_vs_sum_of_full_kernel"] = max_rel_diff(outs[form]["jacobian_free"], jf_ref)
    jf = outs["symmetric"]["jacobian_free"].astype(np.float64)
    jf_proj = outs["symmetric"][proj_name].astype(np.float64)
    proj_err = float(np.linalg.norm(jf_proj - jf) / np.linalg.norm(jf))
    # JL: Var <Πg, Πh> ≈ (|g|²|h|² + <g,h>²)/p  →  E||K̃ − K||_F² ≈ ((tr K)² + ||K||_F²)/p.
    proj_expected = float(math.sqrt((np.trace(jf) ** 2 + np.sum(jf ** 2)) / args.projection_dim)
                          / np.linalg.norm(jf))

    best_nt = {form: _best(timings[form], NT_METHODS) for form in FORMS}
    best_exact = {form: _best(timings[form], EXACT_LIBRARY_METHODS) for form in FORMS}
    ratios = {form: {m: timings[form][best_nt[form]] / timings[form][m] for m in methods} for form in FORMS}
    speedup = {form: timings[form][best_nt[form]] / timings[form][best_exact[form]] for form in FORMS}
    # Symmetric vs cross of the same method (> 1: the symmetric path is faster).
    sym_gain = {m: timings["cross"][m] / timings["symmetric"][m] for m in methods}

    # Free what the timing phase holds before the next measurements.
    del outputs, outs, J, Jsum, fns, kernels
    jax.clear_caches()
    gc.collect()
    comparison = None if args.no_compare else forms_comparison(args)
    jax.clear_caches()
    gc.collect()

    X_big = make_batch(args.big_n, args.seq_len, args.response_len, args.seed + 1, info["vocab_size"])
    blocked = blocked_run(f, params, X_big, O, best_exact["cross"], args.block_size, args.basis_batch,
                          repeats=args.blocked_repeats)

    dev = jax.devices()[0]
    bb = {m: min(args.basis_batch or DEFAULT_BASIS_BATCH[m], O) for m in EXACT_LIBRARY_METHODS}
    result = {
        "device": f"{dev.platform}:{dev.device_kind} ({os.cpu_count()} host cores, {platform.machine()})",
        "jax_version": jax.__version__,
        "model": {**info, "O": O, "n": args.n, "seq_len": args.seq_len, "response_len": args.response_len,
                  "dtype": "float32"},
        "settings": {"repeats": args.repeats, "basis_batch_arg": args.basis_batch,
                     "basis_batch_effective": bb, "projection_dim": args.projection_dim,
                     "quick": args.quick, "big_n": args.big_n, "block_size": args.block_size,
                     "timing": "jitted traced (n, n) block, median of repeats after a compiling call, "
                               "all functions interleaved round-robin",
                     "forms": {"cross": "kernel(params, x, x)",
                               "symmetric": "kernel(params, x, None) (neural-tangents: x2=None; "
                                            "jacobian_free: features of x once)"}},
        "timings_s": timings,
        "timings_min_s": timings_min,
        "compile_and_first_call_s": compile_s,
        "host_load_avg_1m": {"before_timing": load_before, "after_timing": load_after,
                             "note": "other processes on the host inflate and scatter timings; "
                                     "compare methods within one run (interleaved)"},
        "ratios_vs_best_neural_tangents": ratios,
        "ratios_definition": "time(best neural-tangents mode, same form) / time(method); > 1 = faster",
        "best_neural_tangents_mode": best_nt,
        "best_exact_method": best_exact,
        "speedup_best_exact_vs_best_nt": speedup,
        "symmetric_speedup_vs_cross": sym_gain,
        "target_at_least_as_fast": {form: bool(s >= 1.0) for form, s in speedup.items()},
        "target_aim_1_5x": {form: bool(s >= 1.5) for form, s in speedup.items()},
        "agreement_max_rel_diff": agreement,
        "agreement_definition": "max|K - K_ref| / max|K_ref|; K_ref = cross jacobian (traced) or "
                                "(sum_a J_a)(sum_b J_b)^T (jacobian_free)",
        "jacobian_free_projected_rel_error_fro": proj_err,
        "jacobian_free_projected_expected_rel_error": proj_expected,
        "blocked_kernel": blocked,
        "every_form_comparison": comparison,
        "total_wall_s": time.perf_counter() - t_start,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
