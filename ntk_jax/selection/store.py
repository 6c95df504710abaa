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
  it was computing. A shard file damaged afterwards (truncated by a copy, a full disk) is
  named in a :class:`CorruptShardError` when read, and :func:`fill_store` moves it aside
  (``.corrupt``) and recomputes it on the next run.

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
import time
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from ntk_jax.kernels.sharded import stripes_for_process
from ntk_jax.utils import progress, read_json, to_jsonable, write_json, write_npz

META_NAME = "meta.json"
FINGERPRINT_NAME = "fingerprint.json"


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

    def write_shard(self, k: int, scores: np.ndarray, features: np.ndarray | None = None, *,
                    seconds: float | None = None) -> str:
        """Writes shard ``k`` atomically: ``scores`` ``(hi-lo,)`` (stored float64), optional
        ``features`` ``(hi-lo, p)`` and the ``seconds`` it took to compute (summed by
        :meth:`compute_seconds`). ValueError on a shape mismatch or non-finite scores."""
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
        if seconds is not None:
            arrays["seconds"] = np.float64(seconds)
        path = self.shard_path(k)
        write_npz(path, **arrays)
        return path

    def read_shard(self, k: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays of shard ``k`` (all, or ``names``). :class:`CorruptShardError` naming the
        file when it cannot be read (truncated, not an npz, arrays missing) or holds other ids."""
        lo, hi = self.shard_bounds(k)
        path = self.shard_path(k)
        try:
            with np.load(path) as z:
                out = {name: z[name] for name in (z.files if names is None else ("ids", *names))}
        except FileNotFoundError:
            raise
        except Exception as e:  # zipfile.BadZipFile, EOFError, KeyError, ValueError, zlib.error ...
            raise CorruptShardError(f"shard {k} of {self.directory!r} ({path}) is corrupt ({type(e).__name__}: "
                                    f"{e}); rerun the job: a rerun recomputes it (nothing else is lost)") from e
        if list(out["ids"]) != self.ids[lo:hi]:
            raise CorruptShardError(f"shard {k} of {self.directory!r} ({path}) holds other ids than the pool "
                                    f"positions [{lo}, {hi}); rerun the job: a rerun recomputes it")
        return out

    def discard_corrupt(self, shards: Sequence[int]) -> list[int]:
        """Checks the written shards among ``shards`` (their ids and scores are read, not their
        features) and moves every corrupt one aside (``shard_k.npz.corrupt``, kept for
        inspection) so that it counts as missing; returns their indices."""
        bad = []
        for k in shards:
            if not self.has_shard(k):
                continue
            try:
                self.read_shard(k, names=("scores",))
            except CorruptShardError as e:
                logging.warning("%s; recomputing it", e)
                os.replace(self.shard_path(k), self.shard_path(k) + ".corrupt")
                bad.append(k)
        return bad

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

    def compute_seconds(self) -> float:
        """Total compute time recorded in the written shards (``seconds``; 0 for shards
        written without it): what the stage cost, however many runs it took."""
        total = 0.0
        for k in range(self.num_shards):
            if self.has_shard(k):
                with np.load(self.shard_path(k)) as z:
                    total += float(z["seconds"]) if "seconds" in z.files else 0.0
        return total


class CorruptShardError(ValueError):
    """A shard file that exists but cannot be read back (see :meth:`ScoreStore.read_shard`)."""


class StopRequested(RuntimeError):
    """Raised by :func:`fill_store` after ``stop_after_shards`` new shards (tests simulate a
    killed job with it)."""


def fill_store(store: ScoreStore, score_fn: Callable[[int, int], Any], *, desc: str, with_features: bool = False,
               process_index: int = 0, process_count: int = 1, stop_after_shards: int | None = None,
               on_shard: Callable[[int], None] | None = None) -> int:
    """Computes and writes every missing shard of process ``process_index`` (of
    ``process_count``; see :meth:`ScoreStore.shards_for_process`), with a progress bar;
    returns how many shards it computed. Shards already written are never recomputed, so a
    killed job resumes where it stopped.

    Args:
      score_fn: ``score_fn(lo, hi)`` → scores ``(hi-lo,)``, or ``(scores, features (hi-lo, d))``
        with ``with_features``, for the candidates at store positions ``[lo, hi)``.
      stop_after_shards, on_shard: test hooks (raise :class:`StopRequested` after that many
        new shards; called with each written shard's index).
    """
    mine = store.shards_for_process(process_index, process_count)
    store.discard_corrupt(mine)  # a truncated file (a crash mid-copy, a full disk) is recomputed
    todo = [k for k in mine if not store.has_shard(k)]
    done = 0
    for k in progress(todo, desc=desc, total=len(todo)):
        if stop_after_shards is not None and done >= stop_after_shards:
            raise StopRequested(f"{desc}: stopped after {done} shards (stop_after_shards)")
        lo, hi = store.shard_bounds(k)
        t = time.perf_counter()
        out = score_fn(lo, hi)
        scores, features = out if with_features else (out, None)
        store.write_shard(k, scores, features, seconds=time.perf_counter() - t)
        done += 1
        if on_shard is not None:
            on_shard(k)
    return done


def check_workdir_fingerprint(out_dir: str, payload: Any, what: str) -> str:
    """Claims ``out_dir`` for the job described by ``payload`` (config section, seed, model…):
    writes ``fingerprint.json`` on the first run, and on a rerun raises ``ValueError`` if the
    stored fingerprint differs — a resumed job never mixes results of two configurations.
    ``what`` names the job in the error. Returns the fingerprint (hex)."""
    digest = fingerprint_of(payload)
    path = os.path.join(out_dir, FINGERPRINT_NAME)
    if os.path.exists(path):
        old = str(read_json(path).get("fingerprint"))
        if old != digest:
            raise ValueError(f"{out_dir} holds results of a different {what} configuration (fingerprint "
                             f"{old[:12]} vs {digest[:12]}); use a fresh workdir or delete it")
    else:
        os.makedirs(out_dir, exist_ok=True)
        write_json(path, {"fingerprint": digest, "payload": to_jsonable(payload)})
    return digest
