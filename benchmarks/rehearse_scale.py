"""Rehearsal of the 8B selection configs end to end: every platform, on tiny checkpoints.

    python benchmarks/rehearse_scale.py [--platforms gpu1,gpu8,v4-8,v4-32,v5e-8,v5e-16]
        [--models llama3,qwen3] [--mem-limit-gb 6] [--total-mem-limit-gb 12] [--out rows.json]
        [--workdir DIR] [--real-devices] [--doc docs/scale.md] [--common-batch 8] [--no-estimate]
    python benchmarks/rehearse_scale.py --render rows.json --doc docs/scale.md   # the table only

For every (model, platform) the real job runs — ``python -m ntk_jax.main
--config=configs/select_{llama3,qwen3}_8b.py:PLATFORM`` — with the platform's settings
unchanged (mesh, weight dtype, batch sizes, LoRA r = 128 on q/k/v/o, the configs' scoring
pipeline — the recommended loss change since 2026-12-07 — warm-up schedule) except the sizes a tiny model and a
small pool need (:func:`overrides`: the checkpoint and data paths, N, the number of warm-up
steps, the store shard size, the encoding length). The checkpoints are built here with
``transformers`` (random init, nothing downloaded), of the same families as the 8B models:

* ``llama3``: ``LlamaForCausalLM``, GQA (4 heads, 2 KV heads), ``llama3`` RoPE scaling;
* ``qwen3``: ``Qwen3ForCausalLM``, q/k RMSNorm, explicit ``head_dim`` (32 ≠ 64 / 4);

hidden 64, 2 layers, a byte-level BPE tokenizer of 300 tokens (trained here with
``tokenizers`` on the pool) with a chat template. The data: a 704-record prompt/response pool
over the synthetic tasks and 32 domain records of one task.

Devices: each process simulates its host's devices on the CPU
(``XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_HOST``); a platform with
several hosts (``v4-32``, ``v5e-16``) runs as that many local processes joined by
``jax.distributed`` (``--coordinator_address/--num_processes/--process_id``; no cross-process
collectives: they meet at coordination-service barriers), one WORKDIR shared, as on a TPU slice. ``--real-devices``: no simulation flags
and one process (platforms whose mesh does not fit the local devices fail with the job's own
error): run one platform on the accelerator first, e.g. ``--platforms gpu1 --models llama3``.

Memory: a watchdog samples every process's resident set (with its children) every 0.2 s and
kills the run's processes when one exceeds ``--mem-limit-gb`` or all together exceed
``--total-mem-limit-gb`` (status ``killed: memory > ...``); the exact peak of each process is
its ``ru_maxrss``. Runs go one at a time. Per run: the exit status, wall time, the job's stage
timings (``report.json`` ``timings_s``), peak RSS per process, and
:func:`ntk_jax.launcher.memory.estimate_memory` for that tiny model and layout (the job's
programs, compiled for the same simulated devices: per-device peak, and that times the
process's local devices — the part of a process's RSS the devices account for).

Consistency: the selected ids of each run, compared across the platforms of a model (overlap
with every other platform; platforms whose arithmetic is the same — same weight dtype and
batch sizes — should agree exactly).

``--common-batch B`` (a consistency check, not a rehearsal of the configs as they are): every
platform's feature and warm-up batch set to B, so that only the mesh, the weight dtype and the
process count differ.

Prints one JSON object (``rows`` and ``summary``); ``--out`` also writes it to a file,
``--doc`` writes the table into a Markdown file between ``<!-- rehearsal table -->`` and
``<!-- /rehearsal table -->`` (``docs/scale.md``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ntk_jax.launcher import platforms as plat  # noqa: E402  (no JAX import)

MODELS = {"llama3": "configs/select_llama3_8b.py", "qwen3": "configs/select_qwen3_8b.py"}
HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 2, 4, 2, 300
SPECIALS = ("<|bos|>", "<|end|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = ("<|bos|>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GB = 10 ** 9


def job_program_names() -> tuple[str, ...]:
    """The programs the 8B configs' selection job runs (``ntk_jax.launcher.memory.job_programs``
    of their ``select`` section; every platform shares the pipeline)."""
    from configs import common_8b
    from ntk_jax.launcher.memory import job_programs
    from ntk_jax.selection.jobs import plain

    return job_programs(plain(common_8b.selection_config("gpu8", model_path="").select))


# ----------------------------------------------------------------------------- checkpoints, data
def write_data(directory: str, n_pool: int, n_domain: int) -> tuple[str, str, list[dict]]:
    """``domain.jsonl`` (``n_domain`` records of the ``sort`` task) and ``pool.jsonl``
    (``n_pool`` records over every synthetic task) under ``directory``."""
    from ntk_jax.data.synthetic import TASKS, generate_task, make_corpus, write_jsonl

    pool = make_corpus(list(TASKS), -(-n_pool // len(TASKS)), seed=0)[:n_pool]
    domain = [dict(r, id=f"domain-{r['id']}") for r in generate_task("sort", n_domain, seed=1)]
    paths = os.path.join(directory, "domain.jsonl"), os.path.join(directory, "pool.jsonl")
    write_jsonl(domain, paths[0])
    write_jsonl(pool, paths[1])
    return paths[0], paths[1], pool


def bpe_tokenizer(texts: list[str]):
    """A byte-level BPE ``PreTrainedTokenizerFast`` of :data:`VOCAB` tokens trained on ``texts``,
    with the chat template :data:`CHAT_TEMPLATE`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIALS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def hf_config(family: str, vocab_size: int):
    """The ``transformers`` config of the tiny ``family`` checkpoint (see the module docstring)."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                  tie_word_embeddings=False)
    if family == "llama3":
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=32)
        return transformers.LlamaConfig(**common, rms_norm_eps=1e-5, rope_parameters=rope)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, rms_norm_eps=1e-6,
                                        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
    raise ValueError(f"unknown model family {family!r}; choose from {sorted(MODELS)}")


def build_checkpoint(family: str, directory: str, texts: list[str], seed: int = 0) -> str:
    """A tiny random ``family`` checkpoint with its tokenizer saved under ``directory``."""
    import torch
    import transformers

    tokenizer = bpe_tokenizer(texts)
    cfg = hf_config(family, len(tokenizer))
    torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if family == "llama3" else transformers.Qwen3ForCausalLM
    cls(cfg).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------- the job's command
def overrides(model_dir: str, domain: str, pool: str, *, n_select: int, warmup_steps: int, max_len: int,
              shard_size: int) -> list[str]:
    """The ``--config.`` flags every rehearsal adds: paths, and the sizes a tiny model and a
    small pool need. Nothing else of the platform's config changes. The encoding length is
    ``select.max_len`` where the config has one, else ``pretrain.max_len``."""
    from configs import common_8b

    cfg = common_8b.selection_config("gpu1", model_path=model_dir)  # what both 8B configs build
    length_key = "select.max_len" if "max_len" in cfg.select else "pretrain.max_len"
    return [f"--config.model.path={model_dir}", f"--config.select.domain_path={domain}",
            f"--config.select.pool_path={pool}", f"--config.select.n_select={n_select}",
            f"--config.select.warmup.total_steps={warmup_steps}", "--config.select.warmup.warmup_steps=1",
            f"--config.select.warmup.checkpoint_every={warmup_steps}",
            f"--config.select.shard_size={shard_size}", f"--config.{length_key}={max_len}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(devices: int | None) -> dict:
    """The environment of a job process: this checkout first on the path, no progress bars, no
    inherited ``jax.distributed`` settings; ``devices``: simulated CPU devices (``None``: the
    machine's real devices)."""
    env = dict(os.environ, NTK_JAX_NO_PROGRESS="1", PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"):
        env.pop(k, None)
    if devices is not None:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def job_commands(model: str, platform: str, workdir: str, flags: list[str], real_devices: bool) -> list[list[str]]:
    """One command per process of the platform (one per host; one in all with real devices)."""
    p = plat.platform(platform)
    base = [sys.executable, "-m", "ntk_jax.main", f"--config={MODELS[model]}:{platform}", f"--workdir={workdir}",
            *flags]
    if real_devices or p.hosts == 1:
        return [base]
    port = free_port()
    return [base + [f"--coordinator_address=localhost:{port}", f"--num_processes={p.hosts}", f"--process_id={i}"]
            for i in range(p.hosts)]


# ----------------------------------------------------------------------------- watched processes
def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(q.memory_info().rss for q in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


def run_watched(cmds: list[list[str]], env: dict, *, log_dir: str, mem_limit: float, total_limit: float,
                timeout: float, interval: float = 0.2) -> dict:
    """Runs ``cmds`` concurrently (each in its own process group, output to
    ``log_dir/proc_I.log``), sampling their RSS every ``interval`` s; kills them all when one
    exceeds ``mem_limit`` bytes, all together ``total_limit``, or the run ``timeout`` s.

    Returns ``returncodes``, ``status`` (``ok`` | ``failed`` | ``killed: ...``), ``wall_s``,
    ``peak_rss_gb`` (sampled) and ``maxrss_gb`` (``ru_maxrss``) per process, ``log_tail``."""
    os.makedirs(log_dir, exist_ok=True)
    logs = [open(os.path.join(log_dir, f"proc_{i}.log"), "w") for i in range(len(cmds))]
    t0 = time.time()
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
             for c, fh in zip(cmds, logs)]
    pids = [p.pid for p in procs]
    rc: list[int | None] = [None] * len(pids)
    maxrss = [0.0] * len(pids)
    peak = [0] * len(pids)
    killed = None

    def kill_all():
        for pid, code in zip(pids, rc):
            if code is None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    while any(code is None for code in rc):
        rss = [_tree_rss(pid) if code is None else 0 for pid, code in zip(pids, rc)]
        peak = [max(a, b) for a, b in zip(peak, rss)]
        if killed is None:
            if max(rss) > mem_limit:
                killed = f"killed: memory > {mem_limit / GB:.1f} GB (process {rss.index(max(rss))})"
            elif sum(rss) > total_limit:
                killed = f"killed: memory > {total_limit / GB:.1f} GB (all processes)"
            elif time.time() - t0 > timeout:
                killed = f"killed: timeout {timeout:.0f} s"
            if killed:
                kill_all()
        for i, pid in enumerate(pids):
            if rc[i] is None:
                done, status, usage = os.wait4(pid, os.WNOHANG)
                if done:
                    rc[i] = os.waitstatus_to_exitcode(status)
                    maxrss[i] = usage.ru_maxrss * 1024 / GB
        if any(code not in (None, 0) for code in rc) and killed is None:
            killed = "failed"  # one process died: the others would wait at a barrier
            kill_all()
        time.sleep(interval)
    for p in procs:  # reaped by os.wait4 above
        p.returncode = rc[pids.index(p.pid)]
    for fh in logs:
        fh.close()
    with open(os.path.join(log_dir, "proc_0.log")) as fh:
        tail = fh.read()[-3000:]
    status = "ok" if all(code == 0 for code in rc) else (killed or "failed")
    return {"status": status, "returncodes": rc, "wall_s": round(time.time() - t0, 1),
            "peak_rss_gb": [round(b / GB, 2) for b in peak], "maxrss_gb": [round(m, 2) for m in maxrss],
            "log_tail": None if status == "ok" else tail}


# ----------------------------------------------------------------------------- baseline
BASELINE = ("import jax, jax.numpy as jnp; import ntk_jax.launcher.run, experiments.select; "
            "from ntk_jax.models.sharding import make_mesh; n = len(jax.local_devices()); "
            "x = jax.device_put(jnp.ones((n, 8)), jax.sharding.NamedSharding(make_mesh(n, 1, jax.local_devices()), "
            "jax.sharding.PartitionSpec('data'))); jax.block_until_ready(jax.jit(lambda a: a * 2)(x))")


def baseline_rss(devices: int | None, *, log_dir: str, mem_limit: float, timeout: float) -> float | None:
    """Peak RSS (GB) of a process that imports the job's modules and runs one program over
    ``devices`` simulated devices (``None``: the real ones): the runtime's share of a job's RSS."""
    res = run_watched([[sys.executable, "-c", BASELINE]], process_env(devices), log_dir=log_dir,
                      mem_limit=mem_limit, total_limit=mem_limit, timeout=timeout)
    return res["maxrss_gb"][0] if res["status"] == "ok" else None


# ----------------------------------------------------------------------------- estimates
def lora_config():
    from configs import common_8b
    from ntk_jax.models.lora import LoRAConfig

    return LoRAConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in common_8b.LORA.items()})


def estimates(model_dir: str, platforms: list[str], max_len: int) -> dict:
    """``estimate_memory`` of the job's programs for the checkpoint in ``model_dir`` under each
    platform's layout (runs in a process with enough simulated / real devices)."""
    from configs import common_8b
    from ntk_jax.launcher.memory import estimate_memory
    from ntk_jax.utils import read_json

    hf = read_json(os.path.join(model_dir, "config.json"))
    out, by_layout = {}, {}
    for name in platforms:
        lay = plat.layout(name)
        if lay in by_layout:  # v4-8 and v4-32: one layout
            out[name] = out[by_layout[lay]]
            continue
        by_layout[lay] = name
        try:
            e = estimate_memory(hf, lora_config(), mesh_shape=lay.mesh, batch_size=lay.feature_batch_size,
                                seq_len=max_len, dtype="bfloat16", param_dtype=lay.param_dtype,
                                programs=job_program_names(), projection_dim=common_8b.PROJECTION_DIM,
                                train_batch_size=lay.train_batch_size)
        except Exception as exc:  # e.g. a mesh larger than the real devices
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out[name] = {"lora_params": e["params"]["lora_params"], "totals": e["totals"],
                     "peak_per_device": e["peak_per_device"], "peak_program": e["peak_program"],
                     "device_peak_per_device": e["device_peak_per_device"]}
    return out


def run_estimates(model_dir: str, platforms: list[str], max_len: int, *, log_dir: str, real_devices: bool,
                  mem_limit: float, timeout: float) -> dict:
    """:func:`estimates` in a watched subprocess with 8 simulated devices (or the real ones)."""
    out = os.path.join(log_dir, "estimates.json")
    if os.path.exists(out):  # an earlier rehearsal in this workdir
        with open(out) as fh:
            done = json.load(fh)
        if set(platforms) <= set(done) and not any("error" in done[p] for p in platforms):
            return done
    cmd = [sys.executable, os.path.abspath(__file__), "--estimate-only", model_dir, "--platforms",
           ",".join(platforms), "--max-len", str(max_len), "--out", out]
    res = run_watched([cmd], process_env(None if real_devices else 8), log_dir=log_dir, mem_limit=mem_limit,
                      total_limit=mem_limit, timeout=timeout)
    if res["status"] != "ok":
        return {name: {"error": res["status"], "log_tail": res["log_tail"]} for name in platforms}
    with open(out) as fh:
        return json.load(fh)


def compare(e: dict, local_devices: int, row: dict) -> dict:
    """The estimate next to the measurement: per-device totals of each program the job runs
    (GB; :func:`job_program_names`); the job's peak, the largest of them, and the bound (the
    estimate's own peak, the same programs); each times the process's local devices; and the
    measured peak RSS above the runtime baseline."""
    if "totals" not in e:
        return {"estimate": e}
    job = max(e["totals"].values())
    out = {"estimate": {"lora_params": e["lora_params"],
                        "per_device_gb": {k: round(v / GB, 4) for k, v in e["totals"].items()},
                        "job_per_device_gb": round(job / GB, 4), "job_process_gb": round(local_devices * job / GB, 3),
                        "bound_process_gb": round(local_devices * e["peak_per_device"] / GB, 3)}}
    if row.get("baseline_rss_gb") is not None and row["status"] == "ok":
        out["measured_above_baseline_gb"] = round(max(row["maxrss_gb"]) - row["baseline_rss_gb"], 2)
    return out


# ----------------------------------------------------------------------------- consistency
def scores_digest(path: str) -> str | None:
    """SHA-256 over every array of a job's ``all_scores.npz`` (names, dtypes, shapes, bytes);
    ``None`` when the file is missing."""
    if not os.path.exists(path):
        return None
    h = hashlib.sha256()
    with np.load(path) as z:
        for name in sorted(z.files):
            a = np.ascontiguousarray(z[name])
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    return h.hexdigest()


def consistency(rows: list[dict]) -> dict:
    """Per model: the overlap (|A ∩ B| / N) of every pair of platforms' selections, and the
    groups of platforms with the same arithmetic (weight dtype, batch sizes) with whether
    they selected the same set of ids."""
    out = {}
    for model in sorted({r["model"] for r in rows}):
        done = {r["platform"]: r for r in rows if r["model"] == model and r.get("selected_ids")}
        names = sorted(done)
        overlap = {a: {b: round(len(set(done[a]["selected_ids"]) & set(done[b]["selected_ids"]))
                                / max(len(done[a]["selected_ids"]), 1), 3) for b in names} for a in names}
        groups: dict = {}
        for name in names:
            batch = done[name]["batch_feature_train"]
            groups.setdefault(f"{done[name]['param_dtype']} {batch[0]}/{batch[1]}", []).append(name)
        same = {key: {"platforms": g, "identical": len({frozenset(done[n]["selected_ids"]) for n in g}) == 1,
                      "scores_bitwise_equal": len({done[n].get("scores_sha256") for n in g}) == 1}
                for key, g in groups.items() if len(g) > 1}
        out[model] = {"overlap": overlap, "same_arithmetic": same}
    return out


# ----------------------------------------------------------------------------- the docs table
DOC_BEGIN, DOC_END = "<!-- rehearsal table -->", "<!-- /rehearsal table -->"


def render(result: dict) -> str:
    """The Markdown table of ``result`` (rows of :func:`rehearse`) between the markers."""
    s = result["summary"]
    lines = [DOC_BEGIN, "", f"Generated by `python benchmarks/rehearse_scale.py --doc docs/scale.md`; do not edit by "
             f"hand. {s['ok']}/{s['runs']} rehearsals ran, {s['total_wall_s']:.0f} s in all, one at a time; "
             f"runtime baseline RSS (JAX, the job's modules, one program) "
             + ", ".join(f"{v} GB with {k} device(s)" for k, v in s["baseline_rss_gb"].items()) + ".", "",
             "| model | platform | processes × devices | mesh | weights | status | time s | stages, s "
             "| peak RSS per process GB | above baseline GB | estimate: job programs × devices GB "
             "| bound: peak program × devices GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = r.get("timings_s", {})
        stages = ", ".join(f"{k} {v:.0f}" for k, v in t.items() if k not in ("validate", "select") and v >= 0.5) or "—"
        e = r.get("estimate", {})
        lines.append(f"| {r['model']} | {r['platform']} | {r['processes']} × {r['devices_per_host']} "
                     f"| {r['mesh'][0]}x{r['mesh'][1]} | {r['param_dtype']} | {r['status']} | {r['wall_s']:.0f} "
                     f"| {stages} | {', '.join(f'{m:.2f}' for m in r['maxrss_gb'])} "
                     f"| {r.get('measured_above_baseline_gb', '—')} | {e.get('job_process_gb', '—')} "
                     f"| {e.get('bound_process_gb', '—')} |")
    lines += ["", f"Selections (N = {s.get('n_select', 64)} of the pool), overlap with the other platforms "
              "(|A ∩ B| / N):", ""]
    for model, c in s["consistency"].items():
        names = list(c["overlap"])
        lines += [f"| {model} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {a} | " + " | ".join(f"{c['overlap'][a][b]:.2f}" for b in names) + " |" for a in names]
        lines.append("")
    return "\n".join(lines + [DOC_END])


def write_doc(path: str, result: dict) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from memory_table import splice  # (sets XLA_FLAGS for this process only: every job has finished)

    with open(path) as fh:
        text = fh.read()
    with open(path, "w") as fh:
        fh.write(splice(text, render(result), DOC_BEGIN, DOC_END))


# ----------------------------------------------------------------------------- main
def rehearse(a) -> dict:
    work = os.path.abspath(a.workdir)
    os.makedirs(work, exist_ok=True)
    mem_limit, total_limit = a.mem_limit_gb * GB, a.total_mem_limit_gb * GB
    domain, pool, records = write_data(work, a.pool, a.domain)
    texts = [r["prompt"] + r["response"] for r in records]
    rows = []
    counts = sorted({None if a.real_devices else plat.platform(n).devices_per_host for n in a.platforms},
                    key=lambda c: c or 0)
    baselines = {c: baseline_rss(c, log_dir=os.path.join(work, f"baseline_{c or 'real'}"), mem_limit=mem_limit,
                                 timeout=a.timeout) for c in counts}
    for model in a.models:
        model_dir = os.path.join(work, f"tiny_{model}")
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            build_checkpoint(model, model_dir, texts)
        est = {} if a.no_estimate else run_estimates(
            model_dir, a.platforms, a.max_len, log_dir=os.path.join(work, f"estimate_{model}"),
            real_devices=a.real_devices, mem_limit=mem_limit, timeout=a.timeout)
        flags = overrides(model_dir, domain, pool, n_select=a.n_select, warmup_steps=a.warmup_steps,
                          max_len=a.max_len, shard_size=a.shard_size)
        if a.common_batch:  # consistency check only: every platform's batches the same
            flags += [f"--config.select.feature_batch_size={a.common_batch}",
                      f"--config.select.warmup.batch_size={a.common_batch}"]
        for name in a.platforms:
            p, lay = plat.platform(name), plat.layout(name)
            run_dir = os.path.join(work, f"{model}_{name}")
            cmds = job_commands(model, name, os.path.join(run_dir, "job"), flags, a.real_devices)
            print(f"rehearse: {model} {name}: {len(cmds)} process(es)", file=sys.stderr, flush=True)
            res = run_watched(cmds, process_env(None if a.real_devices else p.devices_per_host), log_dir=run_dir,
                              mem_limit=mem_limit, total_limit=total_limit, timeout=a.timeout)
            row = {"model": model, "platform": name, "hosts": p.hosts, "devices_per_host": p.devices_per_host,
                   "processes": len(cmds), "mesh": list(lay.mesh), "param_dtype": lay.param_dtype,
                   "batch_feature_train": [a.common_batch] * 2 if a.common_batch else [lay.feature_batch_size, lay.train_batch_size],
                   **res}
            report = os.path.join(run_dir, "job", "select", "report.json")
            if res["status"] == "ok" and os.path.exists(report):
                with open(report) as fh:
                    rep = json.load(fh)
                row["timings_s"] = {k: round(v, 2) for k, v in rep["timings_s"].items()}
                row["selected_ids"] = rep["selected_ids"]
                row["scores_sha256"] = scores_digest(os.path.join(run_dir, "job", "select", "all_scores.npz"))
                cfg = rep["config"]
                row["projection"] = [cfg["projection_type"], cfg["projection_dim"]]
            row["baseline_rss_gb"] = baselines[None if a.real_devices else p.devices_per_host]
            row.update(compare(est.get(name, {}), 1 if a.real_devices else p.devices_per_host, row))
            rows.append(row)
            print(f"rehearse: {model} {name}: {res['status']} {res['wall_s']} s, peak RSS {res['maxrss_gb']} GB",
                  file=sys.stderr, flush=True)
    ok = [r for r in rows if r["status"] == "ok"]
    summary = {"runs": len(rows), "ok": len(ok), "all_ok": len(ok) == len(rows),
               "total_wall_s": round(sum(r["wall_s"] for r in rows), 1),
               "max_peak_rss_gb_per_process": max((max(r["maxrss_gb"]) for r in rows), default=0.0),
               "mem_limit_gb": a.mem_limit_gb, "real_devices": bool(a.real_devices),
               "baseline_rss_gb": {str(c or "real"): v for c, v in baselines.items()},
               "consistency": consistency(rows), "n_select": a.n_select}
    return {"settings": {k: v for k, v in vars(a).items() if k != "estimate_only"}, "rows": rows, "summary": summary}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--platforms", default=",".join(plat.PLATFORMS), help="comma-separated platform names")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--mem-limit-gb", type=float, default=6.0, help="per process (sampled RSS)")
    ap.add_argument("--total-mem-limit-gb", type=float, default=12.0, help="all processes of a run together")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument("--workdir", default="", help="default: a fresh temporary directory")
    ap.add_argument("--real-devices", action="store_true", help="no device simulation; one process per run")
    ap.add_argument("--no-estimate", action="store_true", help="skip estimate_memory")
    ap.add_argument("--doc", default="", help="write the table into this Markdown file (docs/scale.md)")
    ap.add_argument("--render", default="", help="no runs: the table of this earlier --out JSON (with --doc)")
    ap.add_argument("--pool", type=int, default=704)
    ap.add_argument("--domain", type=int, default=32)
    ap.add_argument("--n-select", type=int, default=64)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=64, help="store shards (several per process)")
    ap.add_argument("--common-batch", type=int, default=0,
                    help="consistency check: this feature and warm-up batch on every platform (a multiple of 8), "
                         "so that only the mesh, the weight dtype and the processes differ")
    ap.add_argument("--estimate-only", default="", help=argparse.SUPPRESS)  # internal: a checkpoint dir
    a = ap.parse_args(argv)
    a.platforms = [p for p in a.platforms.split(",") if p]
    a.models = [m for m in a.models.split(",") if m]
    for name in a.platforms:
        plat.platform(name)  # ValueError naming the known ones
    unknown = sorted(set(a.models) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.estimate_only:
        est = estimates(a.estimate_only, a.platforms, a.max_len)
        with open(a.out, "w") as fh:
            json.dump(est, fh)
        return
    if a.render:
        with open(a.render) as fh:
            result = json.load(fh)
        result["summary"]["consistency"] = consistency(result["rows"])  # as this version compares
        result["summary"].setdefault("n_select", result.get("settings", {}).get("n_select", 64))
        if a.doc:
            write_doc(a.doc, result)
        print(render(result))
        return
    if not a.workdir:
        import tempfile

        a.workdir = tempfile.mkdtemp(prefix="rehearse_scale_")
    result = rehearse(a)
    text = json.dumps(result, indent=1)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text)
    if a.doc:
        write_doc(a.doc, result)
    print(text)


if __name__ == "__main__":
    main()
