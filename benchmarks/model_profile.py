"""Where the Flax port's forward / forward + LoRA backward spends its time, op by op.

    python benchmarks/model_profile.py [--size larger] [--seq-len 128] [--batch 8]
                                       [--what forward_backward] [--calls 5] [--top 20]
                                       [--hlo-out FILE] [--threads 1] [--torch] [--quick]

Builds the ``--size`` model of ``benchmarks/model_speed.py`` (Llama architecture, GQA, SwiGLU;
LoRA r = 8 on q/v, the same programs: :func:`model_speed.flax_programs`; random weights, no
checkpoint), compiles ``--what`` and runs ``--calls`` calls under ``jax.profiler`` (a Perfetto
trace). Every trace event named after an instruction of the compiled module's entry
computation is one executed op (XLA:CPU names its thunks so); the script joins those events
with the optimised HLO and prints one JSON object:

* ``wall_ms``: median wall time per call, untraced and traced (the profiler's own overhead);
* ``op_ms_per_call``: op time per call by kind — ``gemm`` (fusions around a ``dot``, e.g.
  YNNPACK's), ``dot`` (plain ``dot`` thunks: Eigen), ``elementwise`` (loop / input fusions),
  ``other``; op time counts each thread separately, so on several cores it can exceed the wall
  time;
* ``dots``: the dots' GFLOP per call (``2 · |output| · |contracted|``), their op time and rate,
  by size of product (a rate far below the machine's GEMM peak marks a badly shaped product);
* ``occupancy_ms``: wall time per call during which 0, 1, 2, ... ops ran at once (an op that
  parallelises inside itself, as a YNNPACK GEMM may, counts once);
* ``duplicated_fusions``: loop fusions computed more than once from the same operands (XLA
  duplicates a cheap producer into each consumer), with the op time beyond the first copy;
* ``top_ops``: the slowest ops with their shapes, operand shapes and GFLOP/s.

``--torch`` also profiles the same program in ``transformers`` + PEFT, on ONE checkpoint loaded by
both sides (``model_speed.build_models``), with ``torch.profiler`` (:func:`torch_profile`):
its wall time, each op's own (self) time by kind, the matrix products' GFLOP and rate, the
slowest ops. PyTorch runs its ops one after the other, each on every core, so its op times
add up to about the wall time.

``--threads 1`` pins the process to one CPU before XLA starts its CPU client (as ``model_speed.py``).
On GPU the kernels' events are joined through the instruction named in their ``hlo_op``
argument (:func:`op_events`); that path has not been run on a GPU here, and ``ops_traced``
says how many ops it found. Progress goes to stderr; stdout is exactly one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import model_speed  # noqa: E402  (imports JAX; XLA starts its CPU client at first use)

if __name__ == "__main__" and model_speed._early_threads(sys.argv[1:]) == 1 and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import jax  # noqa: E402
import numpy as np  # noqa: E402

# --- the optimised HLO ----------------------------------------------------------------------

_INSTR = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>\([^=]*?\)|[\w]+\[[\d,]*\](?:\{[^}]*\})?) "
    r"(?P<op>[\w\-]+)\((?P<operands>[^)]*)\)(?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.\-]+) .*\{\s*$")


def array_dims(shape: str) -> tuple[int, ...]:
    """``"f32[8,128]{1,0}"`` → ``(8, 128)``; a scalar ``"f32[]"`` → ``()``."""
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    if not m:
        raise ValueError(f"not an array shape: {shape!r}")
    return tuple(int(v) for v in m.group(1).split(",") if v)


def parse_hlo(text: str) -> tuple[str, dict[str, dict[str, dict]]]:
    """The computations of an optimised HLO module (``compiled.as_text()``).

    Returns ``(entry_name, {computation: {instruction: {"shape", "op", "operands", "rest"}}})``
    with ``operands`` the operand names (no ``%``)."""
    comps: dict[str, dict[str, dict]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = comps.setdefault(m.group("name"), {})
                if line.startswith("ENTRY"):
                    entry = m.group("name")
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            ops = [o.strip().lstrip("%") for o in m.group("operands").split(",") if o.strip()]
            current[m.group("name")] = {"shape": m.group("shape"), "op": m.group("op"),
                                        "operands": ops, "rest": m.group("rest")}
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, comps


def dot_flops(instr: dict, scope: dict[str, dict]) -> int:
    """Multiply-adds × 2 of one ``dot`` instruction: ``2 · |output| · Π lhs contracting dims``
    (operand shapes looked up in ``scope``, its computation)."""
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr["rest"])
    lhs = scope.get(instr["operands"][0])
    if m is None or lhs is None:
        return 0
    lhs_dims = array_dims(lhs["shape"])
    k = math.prod(lhs_dims[int(c)] for c in m.group(1).split(",") if c)
    return 2 * math.prod(array_dims(instr["shape"])) * k


def instruction_flops(comps: dict[str, dict[str, dict]], computation: str, _seen=None) -> int:
    """The dot FLOPs of one computation, through the computations its fusions and calls run."""
    _seen = set() if _seen is None else _seen
    total = 0
    scope = comps.get(computation, {})
    for ins in scope.values():
        if ins["op"] == "dot":
            total += dot_flops(ins, scope)
        for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", ins["rest"]):
            if callee not in _seen:
                _seen.add(callee)
                total += instruction_flops(comps, callee, _seen)
    return total


def entry_ops(text: str) -> dict[str, dict]:
    """Every instruction of the entry computation that can run as an op (not parameters,
    constants, tuples, bitcasts), with ``kind`` (see the module docstring), ``flops`` and the
    operands' shapes."""
    entry, comps = parse_hlo(text)
    scope = comps[entry]
    out = {}
    for name, ins in scope.items():
        if ins["op"] in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
            continue
        if ins["op"] == "dot":
            flops, kind = dot_flops(ins, scope), "dot"
        elif ins["op"] == "fusion":
            callee = re.search(r"calls=%([\w.\-]+)", ins["rest"])
            flops = instruction_flops(comps, callee.group(1)) if callee else 0
            kind = "gemm" if flops else "elementwise"
        else:  # copies, transposes, custom calls, control flow: no dot counted
            flops, kind = 0, "other"
        out[name] = {**ins, "kind": kind, "flops": flops,
                     "operand_shapes": [scope[o]["shape"] if o in scope else "?" for o in ins["operands"]]}
    return out


# --- the trace --------------------------------------------------------------------------------


def trace_events(trace_dir: str) -> list[dict]:
    """The complete (``"ph": "X"``) events of the Perfetto trace ``jax.profiler`` wrote under
    ``trace_dir`` (``create_perfetto_trace=True``)."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[0]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def op_events(events: list[dict], ops: dict[str, dict]) -> list[dict]:
    """The events of executed ops, each with ``"op"``: its instruction in ``ops``. An event is
    an op's when its name is the instruction's (XLA:CPU's thunks) or when it carries the
    instruction in ``args["hlo_op"]`` (the profiler's device events on GPU; not checked on a
    GPU here)."""
    out = []
    for e in events:
        op = e["name"] if e["name"] in ops else (e.get("args") or {}).get("hlo_op")
        if op in ops:
            out.append({**e, "op": op})
    return out


def occupancy(events: list[dict]) -> dict[int, float]:
    """``{n: µs}``: time during which exactly ``n`` of ``events`` (``ts``/``dur`` in µs)
    overlapped, from the first event's start to the last one's end."""
    edges = sorted([(e["ts"], 1) for e in events] + [(e["ts"] + e["dur"], -1) for e in events])
    out: dict[int, float] = collections.Counter()
    active, last = 0, None
    for t, step in edges:
        if last is not None and t > last:
            out[active] += t - last
        active += step
        last = t
    return dict(out)


def duplicated_fusions(ops: dict[str, dict], op_us: dict[str, float]) -> list[dict]:
    """Loop fusions of the same operand list, largest waste first: each group's op time beyond
    its slowest member (an upper bound of what computing it once would save)."""
    groups = collections.defaultdict(list)
    for name, ins in ops.items():
        if ins["kind"] == "elementwise" and ins["operands"]:
            groups[tuple(ins["operands"])].append(name)
    out = []
    for names in groups.values():
        if len(names) > 1:
            t = [op_us.get(n, 0.0) for n in names]
            out.append({"fusions": names, "shapes": [ops[n]["shape"] for n in names],
                        "op_us": sum(t), "extra_us": sum(t) - max(t)})
    return sorted(out, key=lambda g: -g["extra_us"])


def profile_program(fn, args, calls: int, hlo_out: str | None = None) -> dict:
    """Runs ``fn(*args)`` (jitted) ``calls`` times untraced and ``calls`` times under the
    profiler; returns the summary dict described in the module docstring (less settings)."""
    compiled = fn.lower(*args).compile()
    text = compiled.as_text()
    if hlo_out:
        with open(hlo_out, "w") as f:
            f.write(text)
    ops = entry_ops(text)
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    untraced = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        untraced.append(time.perf_counter() - t)
    traced = []
    with tempfile.TemporaryDirectory() as tdir:
        with jax.profiler.trace(tdir, create_perfetto_trace=True):
            for _ in range(calls):
                t = time.perf_counter()
                jax.block_until_ready(fn(*args))
                traced.append(time.perf_counter() - t)
        events = op_events(trace_events(tdir), ops)
    op_us = collections.defaultdict(float)
    for e in events:
        op_us[e["op"]] += e["dur"] / calls
    kinds = collections.defaultdict(float)
    for name, us in op_us.items():
        kinds[ops[name]["kind"]] += us
    dot_names = [n for n in op_us if ops[n]["flops"]]
    flops = sum(ops[n]["flops"] for n in ops)
    dot_us = sum(op_us[n] for n in dot_names)
    buckets = collections.defaultdict(lambda: [0, 0, 0.0])
    for n in dot_names:
        b = buckets[ops[n]["flops"]]
        b[0] += 1
        b[1] += ops[n]["flops"]
        b[2] += op_us[n]
    dups = duplicated_fusions(ops, op_us)
    top = sorted(op_us.items(), key=lambda kv: -kv[1])
    return {
        "wall_ms": {"untraced_median": 1e3 * statistics.median(untraced),
                    "traced_median": 1e3 * statistics.median(traced)},
        "ops_traced": len(op_us), "ops_in_program": len(ops),
        "op_ms_per_call": {**{k: v / 1e3 for k, v in sorted(kinds.items())},
                           "total": sum(kinds.values()) / 1e3},
        "dots": {"gflop_per_call": flops / 1e9, "ms_per_call": dot_us / 1e3,
                 "gflop_per_s": flops / 1e3 / dot_us if dot_us else None,
                 "by_size": [{"flops_each": f, "count": c, "ms": us / 1e3,
                              "gflop_per_s": tot / 1e3 / us if us else None}
                             for f, (c, tot, us) in sorted(buckets.items(), key=lambda kv: -kv[1][2])]},
        "occupancy_ms": {str(k): v / calls / 1e3 for k, v in sorted(occupancy(events).items())},
        "duplicated_fusions": {"extra_ms_upper_bound": sum(g["extra_us"] for g in dups) / 1e3,
                               "groups": [{**g, "op_us": round(g["op_us"], 1), "extra_us": round(g["extra_us"], 1)}
                                          for g in dups[:10]]},
        "top_ops": [{"name": n, "kind": ops[n]["kind"], "shape": ops[n]["shape"],
                     "operand_shapes": ops[n]["operand_shapes"], "ms": us / 1e3,
                     "gflop_per_s": ops[n]["flops"] / 1e3 / us if ops[n]["flops"] and us else None}
                    for n, us in top],
    }


# --- the PyTorch side -------------------------------------------------------------------------

TORCH_MATMULS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def torch_op_kind(name: str) -> str:
    """``"matmul"`` (the GEMM kernels), ``"attention"`` (SDPA kernels), ``"aten"`` (every other
    ATen op: elementwise, reductions, copies) or ``"other"`` (autograd and Python frames)."""
    if name in TORCH_MATMULS:
        return "matmul"
    if "attention" in name:
        return "attention"
    return "aten" if name.startswith("aten::") else "other"


def _self_us(event, clock: str) -> float:
    """An averaged ``torch.profiler`` event's own time in µs on ``clock`` ("cpu" or "device")."""
    if clock == "cpu":
        return float(event.self_cpu_time_total)
    return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))


def torch_profile(fn, calls: int, device: str = "cpu") -> dict:
    """Runs the zero-argument PyTorch call ``fn`` ``calls`` times untraced and ``calls`` times
    under ``torch.profiler`` (FLOP counting); per call: wall time, self time by
    :func:`torch_op_kind`, the matrix products' GFLOP and rate, the slowest ops. On
    ``device="cuda"`` the kernels' device time is read (``clock: "device"``; not run on a GPU
    here), else each op's CPU time (``clock: "cpu"``)."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    clock = "cpu"
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        clock = "device"
    for _ in range(2):
        fn()
    untraced, traced = [], []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        untraced.append(time.perf_counter() - t)
    with torch.profiler.profile(activities=activities, with_flops=True) as prof:
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            traced.append(time.perf_counter() - t)
    events = prof.key_averages()
    kinds = collections.defaultdict(float)
    for e in events:
        kinds[torch_op_kind(e.key)] += _self_us(e, clock) / calls
    mm = [e for e in events if e.key in TORCH_MATMULS]
    mm_us = sum(_self_us(e, clock) for e in mm) / calls
    mm_flops = sum(e.flops for e in mm) / calls
    top = sorted(events, key=lambda e: -_self_us(e, clock))
    return {
        "clock": clock,
        "wall_ms": {"untraced_median": 1e3 * statistics.median(untraced),
                    "traced_median": 1e3 * statistics.median(traced)},
        "self_ms_per_call": {**{k: v / 1e3 for k, v in sorted(kinds.items())}, "total": sum(kinds.values()) / 1e3},
        "matmul": {"gflop_per_call": mm_flops / 1e9, "ms_per_call": mm_us / 1e3,
                   "gflop_per_s": mm_flops / 1e3 / mm_us if mm_us else None},
        "top_ops": [{"name": e.key, "kind": torch_op_kind(e.key), "calls_per_call": e.count / calls,
                     "ms": _self_us(e, clock) / calls / 1e3,
                     "gflop_per_s": e.flops / _self_us(e, clock) / 1e3 if e.flops and _self_us(e, clock) else None}
                    for e in top],
    }


# --- the model ------------------------------------------------------------------------------


def build_model(arch: dict, seed: int):
    """The ``model_speed`` architecture ``arch`` (HF ``LlamaConfig`` names) as a Flax
    :class:`~ntk_jax.models.transformer.DecoderLM` with random weights and ``model_speed``'s
    LoRA adapters."""
    from flax import nnx

    from ntk_jax.models.lora import apply_lora
    from ntk_jax.models.transformer import DecoderConfig, DecoderLM

    cfg = DecoderConfig(vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
                        intermediate_size=arch["intermediate_size"], num_layers=arch["num_hidden_layers"],
                        num_heads=arch["num_attention_heads"], num_kv_heads=arch["num_key_value_heads"])
    rngs = nnx.Rngs(seed)
    model = DecoderLM(cfg, rngs=rngs)
    apply_lora(model, model_speed.LORA, rngs=rngs)
    model.eval()
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="larger", choices=list(model_speed.SIZES))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--what", default="forward_backward", choices=["forward", "forward_backward"])
    p.add_argument("--calls", type=int, default=5, help="calls timed (untraced) and traced")
    p.add_argument("--top", type=int, default=20, help="slowest ops listed")
    p.add_argument("--hlo-out", default=None, help="write the optimised HLO text here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="1 pins the process to one CPU (before XLA starts); default: all")
    p.add_argument("--torch", action="store_true",
                   help="also profile the same program in transformers + PEFT (one checkpoint for both)")
    p.add_argument("--quick", action="store_true", help="tiny model, batch 2, seq-len 16, 2 calls (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.seq_len, args.calls = "tiny", 2, 16, 2
    for k in ("seq_len", "batch", "calls", "top"):
        if getattr(args, k) < (2 if k == "seq_len" else 1):
            p.error(f"--{k.replace('_', '-')} must be at least {2 if k == 'seq_len' else 1}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    arch = model_speed.SIZES[args.size]
    ids = np.random.default_rng(args.seed).integers(0, arch["vocab_size"], (args.batch, args.seq_len)).astype(np.int32)
    with tempfile.TemporaryDirectory() as workdir:
        if args.torch:
            import torch

            model, tmodel = model_speed.build_models(arch, args.seed, args.seq_len, workdir)
        else:
            model, tmodel = build_model(arch, args.seed), None
        fn, fn_args = model_speed.flax_programs(model, ids)[args.what]
        print(f"[model_profile] {args.size} T={args.seq_len} B={args.batch} {args.what}: compiling, "
              f"{args.calls} calls untraced and {args.calls} traced", file=sys.stderr, flush=True)
        summary = profile_program(fn, fn_args, args.calls, args.hlo_out)
        summary["top_ops"] = summary["top_ops"][:args.top]
        result = {"device": f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()})",
                  "jax_version": jax.__version__,
                  "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                  "settings": {"size": args.size, "model": arch, "seq_len": args.seq_len, "batch": args.batch,
                               "what": args.what, "calls": args.calls, "dtype": "float32",
                               "weights": "one transformers checkpoint" if args.torch else "random (Flax init)"},
                  **summary}
        if tmodel is not None:
            print("[model_profile] the same program in PyTorch", file=sys.stderr, flush=True)
            t_fwd, t_vg = model_speed.torch_functions(tmodel, ids)
            torch_summary = torch_profile(t_fwd if args.what == "forward" else t_vg, args.calls,
                                          next(tmodel.parameters()).device.type)
            torch_summary["top_ops"] = torch_summary["top_ops"][:args.top]
            result["torch_version"] = torch.__version__
            result["torch"] = torch_summary
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
