"""Dispatches a config to its experiments (``experiments/<name>.py``, each with
``run(config, workdir, context) -> report``; found by :mod:`ntk_jax.launcher.discovery`)."""
from __future__ import annotations

import glob
import json
import os
import time

import jax

from ntk_jax.launcher import devices, discovery, distributed, logs, preflight
from ntk_jax.launcher.config_lib import sections
from ntk_jax.launcher.context import prepare_context
from ntk_jax.utils import read_json, write_json


def check_config(config) -> None:
    known = sections()
    unknown = [e for e in config.experiments if e not in known]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; known: {sorted(known)} (an experiment is a module "
                         f"experiments/<name>.py with config() and run(); see ntk_jax.launcher.discovery)")
    missing = [e for e in config.experiments if e not in config]
    if missing:
        raise ValueError(f"config has no section for experiment(s) {missing}: start the config from base_config()")
    if not config.experiments:
        raise ValueError("config.experiments is empty: nothing to run")


def _say(line: str) -> None:
    """One line of the job's console output (stdout; log records go to the log file)."""
    print(f"[ntk_jax] {line}", flush=True)


def _outputs(out_dir: str) -> str:
    """Where an experiment's results are: its report and its top-level plots."""
    plots = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "*.png")))
    return f"{os.path.join(out_dir, 'report.json')}" + (f" (plots: {', '.join(plots)})" if plots else "")


def _memory_preflight(config, context, names, process, timings) -> None:
    """The memory preflight (:mod:`ntk_jax.launcher.preflight`) of the experiments ``names``
    that declare a ``memory_plan(config)``; every process checks its own devices (so all stop
    together). Silent when it does not run (on CPU without ``preflight.device_memory_gib``)."""
    t = time.time()
    plans = {}
    for name in names:
        plan_fn = getattr(discovery.experiment_module(name), "memory_plan", None)
        plan = plan_fn(config) if plan_fn is not None else None
        if plan is not None:
            plans[name] = plan
    result = preflight.check(config, context, plans)
    if result is None:
        return
    timings["preflight_s"] = time.time() - t
    if process.is_primary:
        if "skipped" in result:
            _say(f"memory preflight: skipped, {result['skipped']}")
        else:
            peaks = {n: max(v.values()) for n, v in result.items() if isinstance(v, dict)}
            _say("memory preflight: fits, peak per device "
                 + ", ".join(f"{n} {preflight.fmt_bytes(p)}" for n, p in peaks.items())
                 + f" of {preflight.fmt_bytes(result['device_memory'])}")


def run(config, workdir: str) -> dict:
    """Runs ``config.experiments`` in order; returns ``{name: report}``.

    A finished experiment (its ``report.json`` exists) is not run again, so a killed job
    restarted with the same workdir resumes where it stopped; delete the report to rerun.

    Run as one of several processes (``config.distributed``, see
    :mod:`ntk_jax.launcher.distributed`), every process calls this with the same config and a
    shared ``workdir``: jobs whose module sets ``DISTRIBUTED = True`` run on every process
    (each process's ``context.process`` says which share is its own, e.g.
    ``experiments/select.py``); any other job runs on process 0 while the others wait. Process
    0 writes the reports.
    """
    check_config(config)
    if config.enable_x64:
        jax.config.update("jax_enable_x64", True)
    devices.use_cpu_devices(config.get("cpu_devices", 0))
    process = distributed.initialize(config.distributed)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    logs.log_per_process(workdir, process.process_index)
    if process.is_primary and logs.log_path():
        _say(f"log: {logs.log_path()} (--alsologtostderr to show it here)")
    if process.is_primary and process.process_count > 1:  # on the console too: JAX may abort the job before we can
        _say(distributed.resume_notice(0, process.process_count, distributed.heartbeat_timeout_s()))
    if process.is_primary:
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            fh.write(config.to_json_best_effort(indent=2))
    t0 = time.time()
    # Which experiments are finished is decided before the first barrier, so that all
    # processes agree (process 0 may write a report before a slower process looks for it).
    finished = {name for name in config.experiments
                if os.path.exists(os.path.join(workdir, name, "report.json"))}
    if process.is_primary:
        context = prepare_context(config, workdir)
    distributed.barrier("ntk_jax.prepare_context")
    if not process.is_primary:
        context = prepare_context(config, workdir)  # reads what process 0 prepared
    context.process = process
    timings = {"prepare_model_s": time.time() - t0}
    _memory_preflight(config, context, [n for n in config.experiments if n not in finished], process, timings)
    reports = {}
    for name in config.experiments:
        out_dir = os.path.join(workdir, name)
        report_path = os.path.join(out_dir, "report.json")
        if name in finished:
            if process.is_primary:
                _say(f"{name}: finished before, not rerun: {_outputs(out_dir)}")
            reports[name] = read_json(report_path)
            continue
        os.makedirs(out_dir, exist_ok=True)
        t = time.time()
        module = discovery.experiment_module(name)
        if getattr(module, "DISTRIBUTED", False) or process.is_primary:
            report = module.run(config, out_dir, context)
        if process.is_primary:
            report["elapsed_s"] = time.time() - t
            write_json(report_path, report)
        distributed.barrier(f"ntk_jax.experiment.{name}")
        finished.add(name)
        if not process.is_primary:
            reports[name] = read_json(report_path)
            continue
        timings[f"{name}_s"] = report["elapsed_s"]
        reports[name] = report
        _say(f"{name}: {json.dumps(module.summary(report))}")
        _say(f"{name}: {_outputs(out_dir)}")
    timings["total_s"] = time.time() - t0
    if not process.is_primary:
        return reports
    write_json(os.path.join(workdir, "timings.json"), timings)
    _say(f"done in {timings['total_s']:.1f}s; reports under {workdir}")
    return reports
