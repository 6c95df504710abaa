"""Worker for tests/test_distributed_selection.py: one process of a one- or multi-process
selection job run through the launcher (``experiments/select.py`` on a tiny controlled
benchmark and a tiny pre-trained model).

    python selection_worker.py WORKDIR MODEL_DIR [--method ntk | ntk@paper | less ...] [--process_id I
        --num_processes N --port P] [--die_after K] [--log NAME] [--experiment select_compare] [--small]

``--method``: a method or ``<method>@<preset>``. ``--experiment select_compare``: the
comparison (random vs the method, one seed, a two-step fine-tune) instead of one job.

Writes the job to WORKDIR/select/ (WORKDIR/select_compare/) and WORKDIR/NAME_<pid>.json: the ScoreStore shards this
run of this process computed, as ``[store, shard]`` pairs (``store``: ``embeddings`` or
``scores``), in order. ``--die_after K``: ``os._exit(3)`` right after writing the K-th
``scores`` shard (a process killed midway).
"""
import argparse
import json
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("workdir")
ap.add_argument("model_dir")
ap.add_argument("--method", default="ntk")
ap.add_argument("--process_id", type=int, default=0)
ap.add_argument("--num_processes", type=int, default=1)
ap.add_argument("--port", type=int, default=0)
ap.add_argument("--die_after", type=int, default=-1, help="os._exit(3) after this many scores shards")
ap.add_argument("--log", default="computed")
ap.add_argument("--experiment", default="select", choices=("select", "select_compare"))
ap.add_argument("--heartbeat_timeout_s", type=int, default=100)
ap.add_argument("--small", action="store_true", help="a smaller job (26 candidates, 4 shards)")
ap.add_argument("--cpu_devices", type=int, default=0, help="config.cpu_devices")
args = ap.parse_args()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from procs import with_fast_compile  # noqa: E402

os.environ["XLA_FLAGS"] = with_fast_compile()  # one CPU device per process; the test run's compile flags

from ntk_jax.launcher.config_lib import base_config  # noqa: E402
from ntk_jax.launcher.run import run  # noqa: E402
from ntk_jax.selection import store as store_lib  # noqa: E402
from ntk_jax.selection.methods import apply_overrides, get_method, split_arm  # noqa: E402

c = base_config()
c.experiments = (args.experiment,)
c.model.path = args.model_dir
c.pretrain.max_len = 32
c.cpu_devices = args.cpu_devices
if args.num_processes > 1:
    c.distributed.coordinator_address = f"localhost:{args.port}"
    c.distributed.num_processes = args.num_processes
    c.distributed.process_id = args.process_id
    c.distributed.heartbeat_timeout_s = args.heartbeat_timeout_s
s = c.select
name, preset = split_arm(args.method)
s.method = name
apply_overrides(s, get_method(name).presets[preset] if preset else {})
s.benchmark.n_domain = 8
s.benchmark.n_test = 8
s.benchmark.n_pool_per_family = 4   # 52 candidates
s.n_select = 8
s.shard_size = 8                    # 7 embedding shards; ntk@paper: 32 filtered candidates, 4 score shards
s.projection_dim = 512
s.feature_batch_size = 8
s.warmup.total_steps = 4
s.warmup.batch_size = 8
s.knn_k = 8
s.less.epochs = 2
s.less.min_sample = 16
cc = c.select_compare
cc.methods = ("random", args.method)
cc.oracles = ("useful",)
cc.seeds = (0,)
cc.finetune.total_steps = 2
cc.finetune.batch_size = 8
if args.small:
    s.benchmark.n_test = 4
    s.benchmark.n_pool_per_family = 2   # 26 candidates: 4 shards of 8 (2 per process on two)
    s.n_select = 4
    s.warmup.total_steps = 2
    s.less.min_sample = 8
    s.bucket_multiple = 0               # one padded width: fewer programs to compile
    cc.finetune.total_steps = 1
    cc.finetune.warmup_steps = 0        # the one step has a learning rate > 0

os.makedirs(args.workdir, exist_ok=True)
log_path = os.path.join(args.workdir, f"{args.log}_{args.process_id}.json")
computed = []


def _log():
    with open(log_path + ".tmp", "w") as fh:  # atomic: the process may be killed at any time
        json.dump(computed, fh)
    os.replace(log_path + ".tmp", log_path)


_log()  # an empty list when this run computes nothing
real_write = store_lib.ScoreStore.write_shard


def write_shard(self, k, scores, features=None, **kwargs):
    path = real_write(self, k, scores, features, **kwargs)
    name = os.path.basename(self.directory)
    computed.append([name, int(k)])
    _log()
    if name == "scores" and sum(n == "scores" for n, _ in computed) == args.die_after:
        os._exit(3)  # killed midway
    return path


store_lib.ScoreStore.write_shard = write_shard
run(c, args.workdir)
sys.stdout.flush()
