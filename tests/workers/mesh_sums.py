"""Worker for tests/test_distributed.py: one process (of one or several started by the launcher's
``distributed.initialize``) multiplies matrices on a mesh of its own 4 devices with the
contracted axis split over ``"model"`` — the sums of partial products are all-reduces — and
saves the products. A one-process and a multi-process run must save the same bits.

    python mesh_sums.py RESULT_PREFIX [--process_id I --num_processes N --port P]
"""
import argparse
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("result_prefix")
ap.add_argument("--process_id", type=int, default=0)
ap.add_argument("--num_processes", type=int, default=1)
ap.add_argument("--port", type=int, default=0)
args = ap.parse_args()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from procs import start_worker_process  # noqa: E402

info = start_worker_process(4, args.num_processes, args.process_id, args.port)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from ntk_jax.launcher import distributed  # noqa: E402

mesh = jax.sharding.Mesh(np.array(jax.local_devices()).reshape(1, 4), ("data", "model"))
matmul = jax.jit(lambda a, b: a @ b, out_shardings=NamedSharding(mesh, P()))
products = {}
for n in (3, 64, 1024):
    a = jax.random.normal(jax.random.PRNGKey(n), (8, 64))
    b = jax.random.normal(jax.random.PRNGKey(n + 1), (64, n))
    a, b = jax.device_put(a, NamedSharding(mesh, P(None, "model"))), jax.device_put(b, NamedSharding(mesh, P("model")))
    products[str(n)] = np.asarray(matmul(a, b))
np.savez(f"{args.result_prefix}{info.process_index}.npz", **products)
distributed.barrier("mesh_sums.done")
