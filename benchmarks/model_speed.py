"""Tokens/s of the Flax Llama port vs ``transformers`` PyTorch, forward and forward+backward.

    python benchmarks/model_speed.py [--batch 8] [--seq-len 64 128 256] [--rounds 7] [--quick]

For each model size (``tiny``: hidden 64, 2 layers; ``larger``: hidden 256, 4 layers; both
Llama with GQA, SwiGLU, untied head) ONE checkpoint is written by ``transformers``
(``LlamaForCausalLM``, random init, float32) and loaded by both sides in the same process:

* Flax: ``ntk_jax.models.hf_loading.from_pretrained(dir, lora=LoRAConfig(r=8, alpha=16, q_proj/v_proj,
  b_init_std=0.02))``, functions ``jax.jit``-ed over the model state;
* PyTorch: ``LlamaForCausalLM.from_pretrained(dir)`` with the Flax adapters exported by
  ``ntk_jax.models.peft_export.save_peft_adapter`` and opened with ``peft.PeftModel`` (so
  both run the same function: the logit and gradient differences are reported). On a GPU
  run PyTorch uses CUDA when its build has it (each call then waits for its kernels); a CPU-only
  PyTorch build beside a GPU JAX is reported as ``"like_for_like": false`` (the ratio compares
  across devices).

Timed, on the same random ``(batch, seq_len)`` token batch:

* ``forward``: logits (``torch.inference_mode`` on the torch side);
* ``forward_backward``: mean next-token cross-entropy and its gradient w.r.t. the LoRA
  factors only (PEFT freezes the base weights on the torch side; ``jax.value_and_grad``
  over the ``nnx.LoRAParam`` subset on the Flax side).

Each function is called ``--warmup`` times (compilation for JAX), then timed in ``--rounds``
interleaved rounds: in each round every function runs one untimed call and ``--per-round``
timed calls, one function after the other (see :func:`interleaved_times`), so a change of the
host's speed during the run (other tenants of a shared machine) hits both frameworks alike.
Reported: the median time per function, tokens/s = batch * seq_len / median, the ratio
Flax / PyTorch of the medians and the median and range of the per-round ratios. Threads:
PyTorch uses ``torch.set_num_threads(cores)`` with ``cores`` the CPUs this process may run on,
the number of threads XLA's CPU backend uses by default; ``--threads 1`` pins the whole
process to one CPU (``sched_setaffinity`` before JAX starts: XLA's CPU runtime ignores the
intra-op thread flags for its YNNPACK fusions, so only the affinity makes it single-threaded).

``--processes K`` runs all of it K times, each in a fresh process, and adds every Flax / PyTorch
ratio's median, min and max over the processes (``across_processes``): on a shared host the
same cell's ratio moves between processes by more than within one.

Prints one JSON object on stdout (progress and notes go to stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time


def _early_threads(argv) -> int | None:
    """``--threads N`` from the command line, read before JAX is imported (XLA reads its
    thread settings from ``XLA_FLAGS`` at start-up)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return None


if __name__ == "__main__" and _early_threads(sys.argv[1:]) == 1 and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from ntk_jax.launcher.devices import cores, use_cpu_devices  # noqa: E402
from ntk_jax.mesh import onto_mesh, shard_batch  # noqa: E402
from ntk_jax.models.hf_loading import from_pretrained  # noqa: E402
from ntk_jax.models.sharding import make_mesh  # noqa: E402
from ntk_jax.models.lora import LoRAConfig, iter_linears  # noqa: E402
from ntk_jax.models.peft_export import peft_module_names, save_peft_adapter  # noqa: E402
from ntk_jax.models.subset import param_subset  # noqa: E402
from peers import like_for_like, torch_device  # noqa: E402

SIZES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "larger": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4),
}
LORA = LoRAConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"), b_init_std=0.02)
KINDS = ("forward", "forward_backward")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def interleaved_times(fns: dict, warmup: int, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds per call of every zero-argument ``fn``, measured in interleaved rounds.

    Every function first gets ``warmup`` untimed calls. Then, ``rounds`` times, each function
    in turn runs one untimed call (XLA's and PyTorch's CPU thread pools spin-wait after a
    call, so the first call after the other framework's is slower) and ``per_round`` timed
    ones. Returns ``{name: [rounds lists of per_round times]}``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            ts = []
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            out[k].append(ts)
    return out


def flax_programs(model, ids: np.ndarray) -> dict:
    """``{"forward": (jitted fn, args), "forward_backward": (jitted fn, args)}`` for the Flax
    model: logits, and the mean next-token cross-entropy with its gradient w.r.t. the LoRA
    factors (``jax.value_and_grad`` over the ``nnx.LoRAParam`` subset; the rest of the model
    is closed over). ``benchmarks/model_profile.py`` profiles the same programs."""
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    sub = param_subset(model, nnx.LoRAParam)

    def loss(params, x):
        logits = sub.merge(params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()

    x = jnp.asarray(ids)
    return {"forward": (fwd, (state, x)),
            "forward_backward": (jax.jit(jax.value_and_grad(loss)), (sub.params, x))}


def flax_functions(model, ids: np.ndarray, cpu_devices: int = 1):
    """(forward, forward_backward, forward_backward without blocking) for the Flax model, as
    zero-argument calls of :func:`flax_programs`' jitted functions; results blocked on.

    ``cpu_devices > 1``: the same programs data-parallel over that many CPU devices (a
    ``data`` mesh, :mod:`ntk_jax.launcher.devices`): the batch split over them, the model
    state replicated, as a job with ``config.cpu_devices`` runs them."""
    (fwd, fa), (vg, va) = flax_programs(model, ids).values()
    if cpu_devices > 1:
        mesh = make_mesh(cpu_devices, 1, devices=jax.devices("cpu")[:cpu_devices])
        fa = (onto_mesh(fa[0], mesh), shard_batch(fa[1], mesh))
        va = (onto_mesh(va[0], mesh), shard_batch(va[1], mesh))
    return (lambda: jax.block_until_ready(fwd(*fa)),
            lambda: jax.block_until_ready(vg(*va)),
            lambda: vg(*va))


def torch_functions(model, ids: np.ndarray):
    """(forward, forward_backward) for the PyTorch model, on the model's device; a CUDA call
    waits for its kernels, as the Flax calls block on their results."""
    import torch

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.tensor(ids, dtype=torch.long, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def fwd():
        with torch.inference_mode():
            logits = model(x).logits
        sync()
        return logits

    def fwd_bwd():
        for p in trainable:
            p.grad = None
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1))
        loss.backward()
        sync()
        return loss

    return fwd, fwd_bwd


def max_grad_rel_diff(model, flax_grads, torch_model) -> float:
    """max over LoRA factors of ``‖g_flax - g_torch‖ / ‖g_torch‖`` (PEFT layout transposed)."""
    names = peft_module_names(model)
    tmods = dict(torch_model.base_model.model.named_modules())
    worst = 0.0
    by_path = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(flax_grads):
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        by_path[keys] = np.asarray(leaf)
    for path, lin in iter_linears(model):
        if lin.lora is None:
            continue
        tm = tmods[names[path].name]
        for ours, theirs in (("lora_a", tm.lora_A["default"].weight), ("lora_b", tm.lora_B["default"].weight)):
            g = next(v for k, v in by_path.items() if k[: len(path)] == path and ours in k)
            t = theirs.grad.detach().cpu().numpy().T
            worst = max(worst, float(np.linalg.norm(g - t) / max(np.linalg.norm(t), 1e-30)))
    return worst


def build_models(arch: dict, seed: int, seq_len: int, workdir: str):
    """``(flax model, torch model)``: ONE random ``transformers`` Llama checkpoint of ``arch``
    (HF ``LlamaConfig`` names) written to ``workdir``, loaded by the Flax port with
    :data:`LORA` adapters, and by ``transformers`` with those adapters exported and opened by
    PEFT (trainable) on :func:`torch_device`, both in eval mode."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(max_position_embeddings=max(128, seq_len), **arch)
    ckpt = os.path.join(workdir, "ckpt")
    transformers.LlamaForCausalLM(cfg).save_pretrained(ckpt)
    model = from_pretrained(ckpt, lora=LORA, rngs=nnx.Rngs(seed))
    model.eval()
    adapter = os.path.join(workdir, "adapter")
    save_peft_adapter(model, adapter, base_model_name_or_path=ckpt)
    tmodel = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(ckpt), adapter,
                                            is_trainable=True).eval().to(torch_device())
    return model, tmodel


def bench_size(name: str, arch: dict, args, workdir: str) -> dict:
    log(f"[{name}] writing checkpoint {arch}")
    model, tmodel = build_models(arch, args.seed, args.seq_len, os.path.join(workdir, name))
    ids = np.random.default_rng(args.seed).integers(0, arch["vocab_size"], (args.batch, args.seq_len)).astype(np.int32)
    f_fwd, f_vg, f_vg_raw = flax_functions(model, ids)
    t_fwd, t_vg = torch_functions(tmodel, ids)

    # Same function on both sides: logits, loss and LoRA gradients.
    logit_diff = float(np.max(np.abs(np.asarray(f_fwd()) - t_fwd().cpu().numpy())))
    f_loss, f_grads = f_vg_raw()
    t_loss = float(t_vg())
    grad_diff = max_grad_rel_diff(model, f_grads, tmodel)
    fns = {"flax_forward": f_fwd, "flax_forward_backward": f_vg,
           "torch_forward": t_fwd, "torch_forward_backward": t_vg}
    sides = ["flax", "torch"]
    dp = {}
    if args.cpu_devices > 1:  # the same Flax programs over a data mesh of CPU devices, timed beside
        d_fwd, d_vg, d_vg_raw = flax_functions(model, ids, args.cpu_devices)
        d_loss, d_grads = d_vg_raw()
        dp = {"cpu_devices": args.cpu_devices,
              "max_abs_logit_diff_vs_one_device": float(np.max(np.abs(np.asarray(d_fwd()) - np.asarray(f_fwd())))),
              "loss_diff_vs_one_device": abs(float(d_loss) - float(f_loss)),
              "max_lora_grad_rel_diff": max_grad_rel_diff(model, d_grads, tmodel)}
        fns.update({"flax_dp_forward": d_fwd, "flax_dp_forward_backward": d_vg})
        sides.append("flax_dp")

    log(f"[{name}] T={args.seq_len} timing: warm-up {args.warmup}, {args.rounds} rounds x {args.per_round}")
    times = interleaved_times(fns, args.warmup, args.rounds, args.per_round)
    med = {k: statistics.median([t for r in v for t in r]) for k, v in times.items()}
    tokens = args.batch * args.seq_len
    tps = {side: {kind: tokens / med[f"{side}_{kind}"] for kind in KINDS} for side in sides}

    def per_round(side):
        return {kind: [statistics.median(t) / statistics.median(f) for f, t in
                       zip(times[f"{side}_{kind}"], times[f"torch_{kind}"])] for kind in KINDS}

    def summary(rounds):
        return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in rounds.items()}

    n_params = sum(int(np.prod(p.shape)) for p in tmodel.base_model.model.parameters())
    n_lora = sum(int(np.prod(p.shape)) for p in tmodel.parameters() if p.requires_grad)
    out = {
        "model": {**arch, "n_params": n_params, "n_lora_params": n_lora},
        "median_s": med,
        "tokens_per_s": tps,
        "ratio_flax_over_torch": {k: tps["flax"][k] / tps["torch"][k] for k in KINDS},
        "ratio_per_round": summary(per_round("flax")),
        "max_abs_logit_diff": logit_diff,
        "loss": {"flax": float(f_loss), "torch": t_loss},
        "max_lora_grad_rel_diff": grad_diff,
    }
    if dp:
        out["flax_dp"] = {**dp, "ratio_over_torch": {k: tps["flax_dp"][k] / tps["torch"][k] for k in KINDS},
                          "ratio_per_round": summary(per_round("flax_dp")),
                          "speedup_over_one_device": {k: tps["flax_dp"][k] / tps["flax"][k] for k in KINDS}}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, nargs="+", default=None,
                   help="sequence lengths, each timed in its own interleaved block (default 64; "
                        "16 with --quick)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    p.add_argument("--per-round", type=int, default=3, help="timed calls per function per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per function first")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both frameworks: PyTorch set_num_threads; 1 also pins the "
                        "process to one CPU, the only way to make XLA single-threaded (default: the "
                        "available cores, XLA's default)")
    p.add_argument("--processes", type=int, default=1,
                   help="run the whole benchmark this many times, each in a fresh process, one after "
                        "the other, and report every ratio's median and range over the processes "
                        "(the host's speed and the processes' thread placement differ between runs)")
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="also time the Flax programs data-parallel over this many CPU devices (the batch "
                        "split over a data mesh, as config.cpu_devices runs a job), beside the one-device "
                        "Flax and PyTorch in the same rounds; CPU backend only; the batch must divide")
    p.add_argument("--quick", action="store_true",
                   help="batch 2, seq-len 16, 2 rounds of 1 call, warm-up 1 (for tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.per_round, args.warmup = 2, 2, 1, 1
    if args.seq_len is None:
        args.seq_len = [16] if args.quick else [64]
    for k in ("batch", "rounds", "per_round", "warmup", "processes"):
        if getattr(args, k) < (0 if k == "warmup" else 1):
            p.error(f"--{k.replace('_', '-')} must be positive")
    if min(args.seq_len) < 2:
        p.error("--seq-len must be at least 2 (next-token loss)")
    if args.cpu_devices < 1 or args.batch % args.cpu_devices:
        p.error(f"--cpu-devices must be positive and divide --batch ({args.batch}), got {args.cpu_devices}")
    return args


def ratio_cells(result: dict) -> dict[str, dict]:
    """``{"<size> T<len>": one length's result}`` of a benchmark result, whatever the number
    of ``--seq-len`` values (one length: the size's entry is the result itself)."""
    cells = {}
    for name, entry in result["sizes"].items():
        if "ratio_flax_over_torch" in entry:
            cells[f"{name} T{result['settings']['seq_len'][0]}"] = entry
        else:
            cells.update({f"{name} T{T}": r for T, r in entry.items()})
    return cells


def across_processes(results: list[dict]) -> dict:
    """Per cell and kind, the Flax / PyTorch ratio of every process (ratio of its medians)
    with their median, min and max."""
    out = {}
    for cell in ratio_cells(results[0]):
        out[cell] = {}
        for kind in KINDS:
            vals = [ratio_cells(r)[cell]["ratio_flax_over_torch"][kind] for r in results]
            out[cell][kind] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
            if "flax_dp" in ratio_cells(results[0])[cell]:
                vals = [ratio_cells(r)[cell]["flax_dp"]["ratio_over_torch"][kind] for r in results]
                out[cell][f"{kind}_dp"] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                                           "values": vals}
    return out


def run_processes(argv: list[str], k: int) -> dict:
    """The benchmark run ``k`` times in fresh processes (``argv`` without ``--processes``);
    the first run's result plus ``processes`` (every run's result) and ``across_processes``."""
    import subprocess

    results = []
    for i in range(k):
        log(f"[process {i + 1}/{k}]")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"model_speed process {i + 1}/{k} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout))
    return {**results[0], "processes": results, "across_processes": across_processes(results)}


def _without_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            out.append(a)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.processes > 1:
        result = run_processes(_without_processes(sys.argv[1:] if argv is None else list(argv)), args.processes)
        print(json.dumps(result, indent=2))
        return result
    import peft
    import torch
    import transformers

    if args.cpu_devices > 1:
        use_cpu_devices(args.cpu_devices)  # before anything starts JAX's backends
        if jax.default_backend() != "cpu":
            raise SystemExit(f"--cpu-devices is for the CPU backend; JAX runs on {jax.default_backend()}")
    n = cores() if args.threads is None else args.threads
    if n < 1:
        raise SystemExit("--threads must be positive")
    if n not in (1, cores()):
        log(f"note: --threads {n} sets PyTorch only; XLA uses every CPU the process may run on "
            f"({cores()}) unless n == 1")
    torch.set_num_threads(n)
    if not like_for_like():
        log(f"note: JAX runs on {jax.default_backend()} but this PyTorch build on {torch_device()}: the ratios "
            f"compare across devices (\"like_for_like\": false in the JSON)")
    result = {
        "device": f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()})",
        "jax_version": jax.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "jax_backend": jax.default_backend(),
        "torch_device": torch_device(),
        "like_for_like": like_for_like(),
        "threads": {"cores": cores(), "requested": n, "torch": torch.get_num_threads(),
                    "xla_cpu": f"the CPUs of the process ({cores()})"},
        "settings": {"batch": args.batch, "seq_len": args.seq_len, "rounds": args.rounds,
                     "cpu_devices": args.cpu_devices,
                     "per_round": args.per_round, "warmup": args.warmup, "dtype": "float32",
                     "lora": {"rank": LORA.rank, "alpha": LORA.alpha, "targets": list(LORA.targets)}},
        "sizes": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.sizes:
            by_len = {}
            for T in args.seq_len:
                by_len[str(T)] = bench_size(name, SIZES[name], argparse.Namespace(**{**vars(args), "seq_len": T}),
                                            os.path.join(workdir, f"T{T}"))
            # one sequence length: the size's entry is that result (the layout of earlier runs)
            result["sizes"][name] = by_len[str(args.seq_len[0])] if len(by_len) == 1 else by_len
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
