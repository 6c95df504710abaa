# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ntk_jax walkthrough: selecting fine-tuning data from your own pool
#
# A selection job picks the N pool records most useful for a target domain. Here the domain
# and the pool are files in the layouts instruction-tuning sets ship in (an Alpaca JSON array
# and a ShareGPT JSONL file), the model is the small embedded decoder (pre-trained here in a few
# seconds, so the notebook runs on a CPU), and the pool comes from the controlled benchmark, so
# we know which records are useful and can score each selector against the pool's base rate.
# On a real checkpoint the same job runs with `config.model.path` set (README, Data selection).
# Open it with `jupytext --to notebook notebooks/selection_walkthrough.py` or run it as a script.

# %%
import json
import os
import tempfile

from ntk_jax.data.controlled import make_benchmark
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.launcher.run import run
from ntk_jax.selection.methods import apply_overrides
from ntk_jax.selection.methods.ntk import PRESETS

workdir = tempfile.mkdtemp(prefix="selection_walkthrough_")

# %% [markdown]
# ## A domain and a pool, as users have them
# The target: doubling a number under the template `A doubled=`. The pool holds the same rule
# under other templates (useful), other tasks (unrelated), and 640 records in all; the domain
# is 32 examples of the target. We write both as ShareGPT conversations, the domain as a JSON
# array and the pool as JSONL; the `role` field is kept only to score the selection afterwards.
# (Alpaca, Dolly and prompt/completion records are read the same way. Give the domain and the
# pool in layouts that render alike: without a chat template a conversation gets `User:` /
# `Assistant:` headers that a prompt/response record does not, and the job warns when they
# differ.)

# %%
bench = make_benchmark("double", seed=3, n_domain=32, n_test=16, n_pool_per_family=64, variant="no_conflict")
domain_path, pool_path = os.path.join(workdir, "domain.json"), os.path.join(workdir, "pool.jsonl")


def sharegpt(r: dict) -> dict:
    turns = [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["response"]}]
    return {"id": r["id"], "conversations": turns, "role": r["role"]}


with open(domain_path, "w") as f:
    json.dump([sharegpt(r) for r in bench.domain], f)
with open(pool_path, "w") as f:
    f.writelines(json.dumps(sharegpt(r)) + "\n" for r in bench.pool)
base_rate = sum(r["role"] == "useful" for r in bench.pool) / len(bench.pool)
print(f"domain {len(bench.domain)} records, pool {len(bench.pool)} records, useful share {base_rate:.2f}")
print(open(pool_path).readline().strip())

# %% [markdown]
# ## The job's configuration
# `base_config()` is what `python -m ntk_jax.main --config=configs/select_ntk.py` starts from.
# The embedded model is pre-trained first (shrunk here to take seconds); `select.n_select` is a
# count or a fraction of the pool; chat records are rendered through the tokenizer's chat
# template when it has one (the embedded character tokenizer has none: a plain rendering).

# %%
def job_config(method: str):
    c = base_config()
    c.experiments = ("select",)
    c.model.arch.hidden_size, c.model.arch.intermediate_size = 32, 64
    c.pretrain.n_per_task, c.pretrain.train.total_steps, c.pretrain.train.batch_size = 200, 150, 32
    c.select.method = method
    c.select.domain_path, c.select.pool_path = domain_path, pool_path
    c.select.n_select = 0.05          # 5 % of the pool: 32 records
    c.select.max_len = 64             # tokens per encoded record (longer ones: select.truncation)
    return c


# %% [markdown]
# ## Three selectors
# `random`, `embedding` (domain records vote for their nearest pool records by the warm-up
# model's mean hidden states) and `ntk`, the recommended pipeline: the kNN filter keeps 4N,
# and the loss change Δ_j = ℓ_j(θ_0) − ℓ_j(θ_w) of a short LoRA warm-up on the domain ranks
# them (forward passes only). Each writes `report.json`, `selected.jsonl`, `all_scores.npz`
# and `diagnostics.png` under its workdir; a finished job is read back, not rerun.

# %%
reports = {}
for method in ("random", "embedding", "ntk"):
    reports[method] = run(job_config(method), os.path.join(workdir, method))["select"]
for method, rep in reports.items():
    print(f"{method:10s} precision@N {rep['precision_at_n']:.2f}   (base rate {rep['base_rate']:.2f}, "
          f"N = {rep['counts']['selected']}, {sum(rep['timings_s'].values()):.1f} s)")

# %% [markdown]
# ## What the job read, and what it wrote
# `report.json` counts the layouts it read and what the length policy did; `selected.jsonl`
# holds the chosen records best first, each in the layout it was read in (ShareGPT here), so it
# can go straight to the fine-tuning framework that produced the pool.

# %%
rep = reports["ntk"]
print("layouts read:", rep["data"]["layouts"])
print("records over select.max_len:", rep["data"]["lengths"]["pool"]["n_over"])
with open(os.path.join(workdir, "ntk", "select", "selected.jsonl")) as f:
    first = json.loads(f.readline())
print("best record:", first)

# %% [markdown]
# ## Another pipeline by name
# The presets of `select.ntk` are other pipelines (`paper`: NTK-Selector as published, `gradient`,
# `loss_change`, `staged`); `configs/select_ntk.py:paper` sets one on the command line, as
# `apply_overrides` does here.

# %%
c = job_config("ntk")
apply_overrides(c.select, PRESETS["paper"])
paper = run(c, os.path.join(workdir, "ntk_paper"))["select"]
print(f"ntk@paper  precision@N {paper['precision_at_n']:.2f}")
