"""Exact kernels over many examples, computed block-wise across devices and processes.

The kernel ``K (n1, n2[, O, O])`` is cut into *row stripes* of ``block_size`` examples.

* Across the devices of one process, every block's rows are sharded over the mesh axis
  ``axis`` (default ``"data"``): ``x1``'s block is laid out ``P(axis)``, the column block is
  replicated, and the jitted block function (e.g. :func:`ntk_jax.kernels.ntk.ntk_fn`) runs
  SPMD, each device computing its rows.
* Across processes (``jax.distributed``), stripe ``i`` belongs to process
  ``i % process_count``; each process writes its finished stripes to ``out_dir`` as
  ``stripe_{i:05d}.npy`` (atomically), so a restarted job recomputes only missing stripes,
  and :func:`assemble_kernel` gathers them into one array (or a ``.npy`` memmap).

For a symmetric kernel (``x2=None``) a stripe holds only the blocks on or right of the
diagonal; assembly mirrors them.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ntk_jax.kernels.checks import check_finite
from ntk_jax.kernels.jit import jit_constants_as_args
from ntk_jax.kernels.features import batch_size_of, pad_batch, slice_batch
from ntk_jax.mesh import process_barrier
from ntk_jax.utils import atomic_write, progress, read_json, write_json

PyTree = Any
META_NAME = "kernel_meta.json"


def _stripe_path(out_dir: str, i: int) -> str:
    return os.path.join(out_dir, f"stripe_{i:05d}.npy")


def stripes_for_process(num_stripes: int, process_index: int, process_count: int) -> list[int]:
    """Stripe indices a process computes: ``i ≡ process_index (mod process_count)``."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index/process_count: {process_index}/{process_count}")
    return list(range(process_index, num_stripes, process_count))


def _check_local_mesh(mesh) -> None:
    here = jax.process_index()
    remote = [d for d in mesh.devices.flat if d.process_index != here]
    if remote:
        raise ValueError(
            "sharded_kernel needs a mesh of this process's own devices (rows are split across "
            "processes by stripes, not by one global computation); build it from "
            "jax.local_devices()")


def _write_meta(out_dir: str, meta: dict) -> None:
    path = os.path.join(out_dir, META_NAME)
    if os.path.exists(path):
        old = read_json(path)
        if old != meta:
            raise ValueError(f"{out_dir} holds stripes of a different kernel: {old} != {meta}; "
                             "use another out_dir or delete it")
        return
    write_json(path, meta)


def _save_stripe(out_dir: str, i: int, stripe: np.ndarray) -> None:
    with atomic_write(_stripe_path(out_dir, i), "wb") as fh:
        np.save(fh, stripe)


def sharded_kernel(block_fn: Callable, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                   mesh: jax.sharding.Mesh, block_size: int, axis: str = "data", full: bool = False,
                   out_dir: str | None = None, process_index: int | None = None,
                   process_count: int | None = None, assemble: bool = True,
                   desc: str = "kernel stripes") -> np.ndarray | None:
    """Evaluates ``block_fn(params, xa, xb) -> (na, nb[, O, O])`` over row stripes, rows
    sharded over ``mesh``'s ``axis``.

    Args:
      block_fn: a pure block function; ``xb=None`` must mean ``xb = xa`` (as
        :func:`ntk_jax.kernels.ntk.ntk_fn` does).
      params: the parameters (replicated onto the mesh).
      x1, x2: batches (leading axis n1, n2); ``x2=None`` for the symmetric ``K(x1, x1)``.
      mesh: a mesh of this process's devices; ``block_size`` is rounded up to a multiple of
        ``mesh.shape[axis]``.
      full: the block returns ``(na, nb, O, O)`` (mirrored blocks transpose the output axes).
      out_dir: if given, each finished stripe is written there and existing stripes are not
        recomputed (resume; several processes share one ``out_dir``).
      process_index, process_count: this process's share of the stripes (default
        ``jax.process_index()``, ``jax.process_count()``).
      assemble: return the whole kernel (after a barrier across processes when there are
        several; needs ``out_dir`` then). ``False`` returns ``None`` after writing.

    Returns:
      numpy ``(n1, n2[, O, O])`` or ``None``.
    """
    _check_local_mesh(mesh)
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {tuple(mesh.shape)})")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if pc > 1 and out_dir is None:
        raise ValueError("several processes need a shared out_dir to exchange stripes")
    symmetric = x2 is None
    x2_ = x1 if symmetric else x2
    n1, n2 = batch_size_of(x1, "x1"), batch_size_of(x2_, "x2")
    ndev = mesh.shape[axis]
    b1 = -(-min(block_size, n1) // ndev) * ndev
    b2 = min(block_size, n2)
    num_stripes = -(-n1 // b1)
    rows = NamedSharding(mesh, PartitionSpec(axis))
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jit_constants_as_args(block_fn, out_shardings=rows)
    params = jax.device_put(params, replicated)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        _write_meta(out_dir, {"n1": n1, "n2": n2, "row_block": b1, "col_block": b2,
                              "symmetric": symmetric, "full": bool(full)})

    computed: dict[int, np.ndarray] = {}
    mine = stripes_for_process(num_stripes, pi, pc)
    todo = [i for i in mine if out_dir is None or not os.path.exists(_stripe_path(out_dir, i))]
    for s in progress(todo, desc=desc):
        i = s * b1
        i1 = min(i + b1, n1)
        xa = jax.device_put(pad_batch(slice_batch(x1, i, i1), b1), rows)
        parts = []
        if symmetric:
            # The diagonal block from x1's own rows (one set of Jacobians), then the columns
            # right of it.
            parts.append(np.asarray(fn(params, xa, None))[: i1 - i, : i1 - i])
            columns = range(i1, n2, b2)
        else:
            columns = range(0, n2, b2)
        for j in columns:
            j1 = min(j + b2, n2)
            xb = jax.device_put(pad_batch(slice_batch(x2_, j, j1), b2), replicated)
            parts.append(np.asarray(fn(params, xa, xb))[: i1 - i, : j1 - j])
        stripe = np.concatenate(parts, axis=1)
        if out_dir is not None:
            _save_stripe(out_dir, s, stripe)
        else:
            computed[s] = stripe
    if not assemble:
        return None
    if pc > 1:
        process_barrier(f"ntk_jax.sharded_kernel:{out_dir}")
    return assemble_kernel(out_dir, stripes=None if out_dir is not None else computed, n1=n1, n2=n2, row_block=b1,
                           symmetric=symmetric, full=full)


def assemble_kernel(out_dir: str | None, *, stripes: dict[int, np.ndarray] | None = None,
                    n1: int | None = None, n2: int | None = None, row_block: int | None = None,
                    symmetric: bool | None = None, full: bool | None = None,
                    out_path: str | None = None) -> np.ndarray:
    """Gathers stripes (from ``out_dir`` or the ``stripes`` dict) into ``(n1, n2[, O, O])``.

    With ``out_path`` the kernel is written to that ``.npy`` file through a memmap (for
    kernels larger than memory) and the memmap is returned. Missing stripes → ``FileNotFoundError``
    naming them.
    """
    if out_dir is not None:
        meta = read_json(os.path.join(out_dir, META_NAME))
        n1, n2, row_block = meta["n1"], meta["n2"], meta["row_block"]
        symmetric, full = meta["symmetric"], meta["full"]
    num = -(-n1 // row_block)
    if stripes is None:
        if out_dir is None:
            raise ValueError("assemble_kernel needs out_dir or stripes")
        missing = [i for i in range(num) if not os.path.exists(_stripe_path(out_dir, i))]
        if missing:
            raise FileNotFoundError(f"{out_dir}: stripes {missing} are missing (job unfinished)")

    def load(i):
        return stripes[i] if stripes is not None else np.load(_stripe_path(out_dir, i))

    K = None
    for s in range(num):
        st = load(s)
        i, i1 = s * row_block, min((s + 1) * row_block, n1)
        if K is None:
            shape = (n1, n2) + st.shape[2:]
            K = (np.lib.format.open_memmap(out_path, mode="w+", dtype=st.dtype, shape=shape)
                 if out_path else np.zeros(shape, st.dtype))
        j0 = i if symmetric else 0
        K[i:i1, j0:] = st
        if symmetric:
            K[i1:, i:i1] = np.swapaxes(np.swapaxes(st[:, i1 - i:], 0, 1), 2, 3) if full else st[:, i1 - i:].T
    return check_finite(K, "sharded kernel")


def sharded_empirical_ntk(f: Callable, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                          mesh: jax.sharding.Mesh, block_size: int, trace: bool = True,
                          method: str = "auto", axis: str = "data", out_dir: str | None = None,
                          basis_batch: int | None = None, **kwargs) -> np.ndarray | None:
    """:func:`ntk_jax.kernels.ntk.empirical_ntk` computed by :func:`sharded_kernel`
    (rows sharded over ``mesh``'s ``axis``; stripes across processes via ``out_dir``). ``method``
    as for ``empirical_ntk`` (default ``"auto"``, resolved for the whole kernel by
    :func:`~ntk_jax.kernels.structured.structured_plan`, as ``empirical_ntk`` resolves it; the
    traced kernel of an ``f`` with a narrower fixed head, ``f.linear_head``, goes through it as
    ``empirical_ntk`` does)."""
    from ntk_jax.kernels.contract import output_size
    from ntk_jax.kernels.ntk import ntk_fn, ntk_method, traced_head_output
    from ntk_jax.kernels.structured import structured_plan

    method = ntk_method(method).value
    head_of = getattr(f, "linear_head", None)  # f = u · W with W fixed (outputs.lm_output_fn)
    head = head_of() if method == "auto" and trace and callable(head_of) else None
    if head is not None and head[1].shape[0] < head[1].shape[1]:
        f = traced_head_output(*head) or f  # the traced kernel from min(d, O) passes (empirical_ntk's route)
    if method == "auto":
        method = structured_plan(f, params, x1, x2, trace=trace).auto
    O = output_size(f, params, x1)
    block = ntk_fn(f, trace=trace, method=method, output_dim=O, basis_batch=basis_batch)
    return sharded_kernel(block, params, x1, x2, mesh=mesh, block_size=block_size, axis=axis,
                          full=not trace, out_dir=out_dir, desc=f"eNTK stripes ({method})", **kwargs)
