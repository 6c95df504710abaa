"""Worker for tests/test_distributed.py: one process of a multi-process (or one-process)
exact-kernel job computed in row stripes (ntk_jax.kernels.sharded).

    python kernel_stripes.py OUT_DIR RESULT.npy [--process_id I --num_processes N --port P]
        [--devices D] [--die_after K]

Writes stripes to OUT_DIR, the assembled kernel to RESULT.npy (process 0), and
OUT_DIR/computed_<pid>.json listing the stripes this run computed.
"""
import argparse
import json
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("out_dir")
ap.add_argument("result")
ap.add_argument("--process_id", type=int, default=0)
ap.add_argument("--num_processes", type=int, default=1)
ap.add_argument("--port", type=int, default=0)
ap.add_argument("--devices", type=int, default=1)
ap.add_argument("--die_after", type=int, default=-1, help="os._exit after writing this many stripes")
args = ap.parse_args()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from procs import start_worker_process  # noqa: E402

info = start_worker_process(args.devices, args.num_processes, args.process_id, args.port)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ntk_jax.kernels import sharded  # noqa: E402

k = jax.random.split(jax.random.PRNGKey(0), 3)
params = {"w1": jax.random.normal(k[0], (6, 16)), "w2": jax.random.normal(k[1], (16, 3)) / 4}
f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
x = jax.random.normal(k[2], (37, 6))
mesh = jax.sharding.Mesh(np.array(jax.local_devices()).reshape(-1, 1), ("data", "model"))

computed = []
real_save = sharded._save_stripe


def save(out_dir, i, stripe):
    real_save(out_dir, i, stripe)
    computed.append(i)
    path = os.path.join(out_dir, f"computed_{info.process_index}.json")
    with open(path + ".tmp", "w") as fh:  # atomic: the process may be killed at any time
        json.dump(computed, fh)
    os.replace(path + ".tmp", path)
    if len(computed) == args.die_after:
        os._exit(3)  # killed midway


sharded._save_stripe = save
K = sharded.sharded_empirical_ntk(f, params, x, None, mesh=mesh, block_size=4, trace=False,
                                  out_dir=args.out_dir)
if info.process_index == 0:
    np.save(args.result, K)
sys.stdout.flush()
