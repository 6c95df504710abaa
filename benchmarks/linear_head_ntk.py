"""The exact traced eNTK of a language model's logits over its LoRA factors, two ways, side by
side in one process (interleaved repeats): over the V logits directly (``empirical_ntk`` of the
logits function, ``method="auto"``) and through the fixed output matrix (``lm_hidden_output_fn``
+ ``linear_head_ntk``: ``min(d, V)`` backward passes per example instead of V; docs/theory.md
§2.7); and the Jacobian-free (sum-of-logits) kernel with the logits formed and as ``u · (W 1)``.
Reports seconds, the ratios and the agreement.

    python benchmarks/linear_head_ntk.py --vocab 512 2048 8192 > linear_head.json

Prints one JSON object on stdout (progress on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ntk_jax.kernels.ntk import empirical_ntk, jacobian_free_ntk, linear_head_ntk  # noqa: E402
from ntk_jax.kernels.outputs import lm_hidden_output_fn, lm_output_fn, lm_output_head  # noqa: E402
from ntk_jax.models.lora import LoRAConfig, apply_lora  # noqa: E402
from ntk_jax.models.subset import param_subset  # noqa: E402
from ntk_jax.models.transformer import DecoderConfig, DecoderLM  # noqa: E402


def problem(vocab: int, hidden: int, seq_len: int, n: int, seed: int = 0):
    """A random decoder (2 layers) with LoRA r=8 on q/v, and a batch scored on its second half."""
    model = DecoderLM(DecoderConfig(vocab_size=vocab, hidden_size=hidden, num_layers=2, num_heads=4,
                                    intermediate_size=2 * hidden), rngs=nnx.Rngs(seed))
    apply_lora(model, LoRAConfig(rank=8, targets=("q_proj", "v_proj"), b_init_std=0.02), rngs=nnx.Rngs(seed + 1))
    rng = np.random.default_rng(seed)
    batch = {"input_ids": jnp.asarray(rng.integers(0, vocab, (n, seq_len)), jnp.int32),
             "attention_mask": jnp.ones((n, seq_len), jnp.int32),
             "loss_mask": jnp.asarray(np.repeat((np.arange(seq_len) >= seq_len // 2)[None], n, 0), jnp.float32)}
    return model, batch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="vocab 128, hidden 32, n 4, 1 repeat (for tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.seq_len, args.n, args.repeats = [128], 32, 16, 4, 1
    rows = []
    for vocab in args.vocab:
        model, batch = problem(vocab, args.hidden, args.seq_len, args.n)
        subset = param_subset(model)
        W = lm_output_head(model)
        u, f = lm_hidden_output_fn(subset), lm_output_fn(subset)
        plain = lambda p, b: f(p, b)  # noqa: E731  (no head attribute: the logits are formed)
        runs = {"logits": lambda: empirical_ntk(plain, subset.params, batch, trace=True),
                "linear_head": lambda: linear_head_ntk(u, W, subset.params, batch, trace=True),
                "sum_of_logits_kernel_logits": lambda: jacobian_free_ntk(plain, subset.params, batch),
                "sum_of_logits_kernel_head": lambda: jacobian_free_ntk(f, subset.params, batch)}
        first = {k: run() for k, run in runs.items()}  # compiles; also the agreement check
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, run in runs.items():
                t = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t)
        sec = {k: float(np.median(v)) for k, v in times.items()}
        def rel(a, b):
            return float(np.abs(first[a] - first[b]).max() / np.abs(first[b]).max())

        rows.append(dict(vocab=vocab, hidden=args.hidden, seq_len=args.seq_len, n=args.n, P=subset.num_params,
                         seconds=sec, per_repeat=times, speedup=sec["logits"] / sec["linear_head"],
                         max_rel_diff=rel("linear_head", "logits"),
                         sum_of_logits_speedup=sec["sum_of_logits_kernel_logits"] / sec["sum_of_logits_kernel_head"],
                         sum_of_logits_max_rel_diff=rel("sum_of_logits_kernel_head", "sum_of_logits_kernel_logits")))
        print(f"[linear_head_ntk] V={vocab}: logits {sec['logits']:.3f} s, linear head {sec['linear_head']:.3f} s "
              f"({rows[-1]['speedup']:.1f}x); sum-of-logits kernel {rows[-1]['sum_of_logits_speedup']:.1f}x",
              file=sys.stderr, flush=True)
    dev = jax.devices()[0]
    result = dict(device=f"{dev.platform}:{dev.device_kind} ({platform.machine()})", jax_version=jax.__version__,
                  protocol="one process, interleaved repeats, medians; traced kernel, method='auto' on both sides",
                  rows=rows)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
