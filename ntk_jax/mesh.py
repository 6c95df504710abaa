"""Device-mesh helpers every batch loop uses (a leaf module: JAX only, no ntk_jax imports),
so that kernels, models, training and selection split their batches over a
``("data", "model")`` mesh in one way. Partition rules for models and the mesh builders live
in :mod:`ntk_jax.models.sharding`.

* :func:`mesh_of` / :func:`resolve_mesh`: the mesh a computation runs data-parallel over
  (the one its parameters live on, or ``None`` on one device);
* :func:`data_size`, :func:`round_up_to_data`: block sizes that split evenly over ``data``;
* :func:`place_rows` / :func:`shard_batch`: a batch's leading (example) axis over ``data``;
* :func:`onto_mesh`: every leaf of a pytree on the mesh (kept if laid out there, else
  replicated);
* :func:`process_barrier`: every ``jax.distributed`` process waits for the others (the
  coordination service's barrier: no device program, so no cross-process collectives).
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXES", "mesh_of", "resolve_mesh", "data_size", "round_up_to_data", "place_rows", "shard_batch",
           "onto_mesh", "process_barrier"]

AXES = ("data", "model")


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of ``tree`` (params, an ``nnx.State``, a model) live on: the mesh
    of the first leaf with a ``NamedSharding`` over more than one device; ``None`` when
    every leaf is on one device (or is not a placed array)."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh) \
                and sharding.mesh.devices.size > 1:
            return sharding.mesh
    return None


def resolve_mesh(mesh: Mesh | None, tree=None) -> Mesh | None:
    """The mesh a computation on ``tree`` (its parameters) runs data-parallel over: ``mesh``
    if given, else :func:`mesh_of` ``(tree)``; ``None`` for a one-device mesh (nothing to
    split: batches are then passed on unplaced, exactly as without a mesh)."""
    m = mesh if mesh is not None else (None if tree is None else mesh_of(tree))
    if m is None:
        return None
    if not isinstance(m, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see make_mesh), got {type(m).__name__}")
    return None if m.devices.size == 1 else m


def data_size(mesh: Mesh | None, axis: str = "data") -> int:
    """Size of the batch axis ``axis`` of ``mesh`` (1 without a mesh or without that axis)."""
    return 1 if mesh is None else int(mesh.shape.get(axis, 1))


def round_up_to_data(n: int, mesh: Mesh | None, axis: str = "data") -> int:
    """``n`` rounded up to a multiple of :func:`data_size` (block sizes of padded batches)."""
    k = data_size(mesh, axis)
    return -(-int(n) // k) * k


def place_rows(batch, mesh: Mesh | None, axis: str = "data"):
    """``batch`` placed for a data-parallel step on ``mesh``: leading axes split over
    ``axis`` (:func:`shard_batch`; sizes must be multiples of :func:`data_size` — pad first),
    replicated when the mesh lacks ``axis``; unchanged (no copy) when ``mesh`` is ``None``."""
    if mesh is None:
        return batch
    if axis not in mesh.shape:
        return jax.device_put(batch, NamedSharding(mesh, P()))
    return shard_batch(batch, mesh, axis)


def shard_batch(batch, mesh: Mesh, axis: str = "data"):
    """Every leaf of ``batch`` placed with its leading (example) axis split over ``axis``
    (other axes replicated). ``ValueError`` naming the leaf when the leading size is not a
    multiple of the axis size (pad with :func:`ntk_jax.kernels.features.pad_batch`)."""
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {tuple(mesh.shape)})")
    k = int(mesh.shape[axis])

    def put(path, x):
        shape = np.shape(x)
        if not shape:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar; needs a leading batch axis")
        if shape[0] % k:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has leading size {shape[0]}, not a "
                             f"multiple of mesh axis {axis!r} (size {k}); pad the batch")
        return jax.device_put(x, NamedSharding(mesh, P(axis)))

    return jax.tree_util.tree_map_with_path(put, batch)


def onto_mesh(tree, mesh: Mesh | None):
    """Every array leaf of ``tree`` on ``mesh``: leaves already laid out on it (a
    ``NamedSharding`` of ``mesh``) are kept, the others (e.g. optimiser counters, tangents
    made on one device) replicated over it. ``mesh=None``: ``tree`` unchanged."""
    if mesh is None:
        return tree
    replicated = NamedSharding(mesh, P())

    def put(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(put, tree)


# Longest wait at a barrier (seconds). Long on purpose: the other processes wait at a barrier while
# process 0 trains a warm-up, which may take hours at scale. A process that dies is noticed much
# earlier, by jax.distributed's heartbeat. ntk_jax.launcher.distributed.initialize sets it from
# config.distributed.barrier_timeout_s.
BARRIER_TIMEOUT_S = 7 * 24 * 3600


def process_barrier(name: str, timeout_s: float | None = None) -> None:
    """Blocks until every ``jax.distributed`` process has called ``process_barrier(name)``
    (no-op with one process); ``timeout_s`` (default :data:`BARRIER_TIMEOUT_S`) bounds the wait.

    It uses the coordination service's barrier, not a device program: the job's programs run
    on each process's own devices only, so the CPU backend needs no cross-process collectives
    (``jax_cpu_collectives_implementation`` unset), and a mesh of a process's local devices then
    sums exactly as the same mesh in a one-process run. Raises the runtime's error when a process
    died (after its heartbeat timeout) or the wait exceeds ``timeout_s``."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as _distributed  # the client JAX's own checkpointing waits on

    client = _distributed.global_state.client
    if client is None:  # processes not started by jax.distributed.initialize: a device barrier
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    timeout = BARRIER_TIMEOUT_S if timeout_s is None else timeout_s
    client.wait_at_barrier(name, timeout_in_ms=int(min(timeout, 2**31 / 1000 - 1) * 1000))
