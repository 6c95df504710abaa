"""A sharded, resumable store of per-candidate scores (and optionally features).

    store = ScoreStore(out_dir / "scores", ids, shard_size=256, fingerprint=fp)
    for k in store.missing_shards():          # or store.shards_for_process(i, n)
        lo, hi = store.shard_bounds(k)
        store.write_shard(k, scores_of(pool[lo:hi]))
    ids, scores = store.merge()

Layout of ``directory``:

* ``meta.json``: ``{"fingerprint", "n", "shard_size", "num_shards", "ids_hash"}``, written
  once on creation. Opening a directory whose ``meta.json`` disagrees (another config,
  other inputs, another shard size) raises ``ValueError``: results are never mixed.
* ``shard_{k:05d}.npz``: ``ids`` (str, the candidate ids of pool positions
  ``[k·shard_size, min((k+1)·shard_size, n))``), ``scores`` (float64 ``(b,)``) and
  optionally ``features`` (``(b, p)``), written atomically (:func:`ntk_jax.utils.atomic_write`),
  so a shard either exists completely or not at all; a killed job loses at most the shard
  it was computing.

Several processes (``jax.distributed``, see :mod:`ntk_jax.selection.jobs`): every process
opens the same store on a shared filesystem; shard ``k`` belongs to process
``k mod process_count`` (:meth:`shards_for_process`), a deterministic assignment by pool
position that every process computes identically, so each process computes and writes only
its own shards, and after a barrier any process can :meth:`merge` them all. Concurrent
openings are safe: ``meta.json`` and the shards are written through temp files named after
the writing process (host and pid) and renamed into place, and processes of one job write
identical ``meta.json`` contents. The assignment is not part of the fingerprint, so a job
killed with ``n`` processes may be resumed with any other number (the shard layout depends
only on the pool and ``shard_size``).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

from ntk_jax.kernels.sharded import stripes_for_process
from ntk_jax.utils import read_json, to_jsonable, write_json, write_npz

META_NAME = "meta.json"


def fingerprint_of(obj: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``obj`` (dicts with sorted keys; numpy values
    converted), for config + input fingerprints."""
    blob = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _ids_hash(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()


class ScoreStore:
    """Scores of ``len(ids)`` candidates in shards of ``shard_size`` (pool order).

    Args:
      directory: where the shards and ``meta.json`` live (created).
      ids: candidate ids in pool order (unique strings).
      shard_size: candidates per shard (> 0).
      fingerprint: a string identifying everything the scores depend on (config, inputs,
        model); see :func:`fingerprint_of`.

    Raises ``ValueError`` for an empty pool, duplicate ids, a non-positive shard size, or an
    existing ``meta.json`` that disagrees with these arguments.
    """

    def __init__(self, directory: str | os.PathLike, ids: Sequence[str], shard_size: int, fingerprint: str):
        ids = [str(i) for i in ids]
        if not ids:
            raise ValueError("ScoreStore: the candidate pool is empty")
        if len(set(ids)) != len(ids):
            seen, dup = set(), None
            for i in ids:
                if i in seen:
                    dup = i
                    break
                seen.add(i)
            raise ValueError(f"ScoreStore: duplicate candidate id {dup!r}")
        if isinstance(shard_size, bool) or int(shard_size) != shard_size or shard_size <= 0:
            raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
        self.directory = os.fspath(directory)
        self.ids = ids
        self.n = len(ids)
        self.shard_size = int(shard_size)
        self.num_shards = -(-self.n // self.shard_size)
        self.fingerprint = str(fingerprint)
        meta = {"fingerprint": self.fingerprint, "n": self.n, "shard_size": self.shard_size,
                "num_shards": self.num_shards, "ids_hash": _ids_hash(ids)}
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, META_NAME)
        if os.path.exists(path):
            old = read_json(path)
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            if diff:
                raise ValueError(
                    f"ScoreStore {self.directory!r} holds results of a different job (mismatch in {diff}; "
                    f"stored fingerprint {str(old.get('fingerprint'))[:12]}…, this job's {self.fingerprint[:12]}…). "
                    "Use another directory or delete it to recompute; results are never mixed.")
        else:  # processes of one job may race here: they write the same contents
            write_json(path, meta)

    # -------------------------------------------------------------------- shards
    def shard_path(self, k: int) -> str:
        return os.path.join(self.directory, f"shard_{k:05d}.npz")

    def shard_bounds(self, k: int) -> tuple[int, int]:
        """Pool positions ``[lo, hi)`` of shard ``k``."""
        if not 0 <= k < self.num_shards:
            raise IndexError(f"shard {k} out of range [0, {self.num_shards})")
        lo = k * self.shard_size
        return lo, min(lo + self.shard_size, self.n)

    def has_shard(self, k: int) -> bool:
        return os.path.exists(self.shard_path(k))

    def missing_shards(self) -> list[int]:
        """Indices of shards not yet written, ascending."""
        return [k for k in range(self.num_shards) if not self.has_shard(k)]

    def shards_for_process(self, process_index: int, process_count: int) -> list[int]:
        """Shards ``k`` with ``k mod process_count == process_index`` (all of them, done or
        not; filter with :meth:`has_shard`)."""
        return stripes_for_process(self.num_shards, process_index, process_count)

    def is_complete(self) -> bool:
        return not self.missing_shards()

    def write_shard(self, k: int, scores: np.ndarray, features: np.ndarray | None = None) -> str:
        """Writes shard ``k`` atomically: ``scores`` ``(hi-lo,)`` (stored float64), optional
        ``features`` ``(hi-lo, p)``. ValueError on a shape mismatch or non-finite scores."""
        lo, hi = self.shard_bounds(k)
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (hi - lo,):
            raise ValueError(f"shard {k}: scores shape {scores.shape}, expected {(hi - lo,)}")
        if not np.all(np.isfinite(scores)):
            bad = [self.ids[lo + i] for i in np.flatnonzero(~np.isfinite(scores))[:5]]
            raise ValueError(f"shard {k}: non-finite scores for candidates {bad}")
        arrays = {"ids": np.asarray(self.ids[lo:hi]), "scores": scores}
        if features is not None:
            features = np.asarray(features)
            if features.shape[0] != hi - lo:
                raise ValueError(f"shard {k}: features rows {features.shape[0]}, expected {hi - lo}")
            arrays["features"] = features
        path = self.shard_path(k)
        write_npz(path, **arrays)
        return path

    def read_shard(self, k: int) -> dict[str, np.ndarray]:
        lo, hi = self.shard_bounds(k)
        with np.load(self.shard_path(k)) as z:
            out = {name: z[name] for name in z.files}
        if list(out["ids"]) != self.ids[lo:hi]:
            raise ValueError(f"shard {k} of {self.directory!r} holds other ids than the pool positions "
                             f"[{lo}, {hi}); the store is corrupt")
        return out

    def merge(self, *, with_features: bool = False):
        """``(ids, scores)`` (list of str, float64 ``(n,)``) in pool order — plus
        ``features`` ``(n, p)`` with ``with_features=True``. ValueError naming the missing
        shards if the store is incomplete."""
        missing = self.missing_shards()
        if missing:
            raise ValueError(f"ScoreStore {self.directory!r} is incomplete: missing shards {missing[:10]}"
                             f"{'…' if len(missing) > 10 else ''} of {self.num_shards}")
        parts = [self.read_shard(k) for k in range(self.num_shards)]
        scores = np.concatenate([p["scores"] for p in parts])
        if with_features:
            return list(self.ids), scores, np.concatenate([p["features"] for p in parts])
        return list(self.ids), scores
