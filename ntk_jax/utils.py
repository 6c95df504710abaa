"""Small shared utilities: progress bars, atomic writes (every file the library writes whole goes
through :func:`atomic_write`), JSON / npz I/O."""
from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any, Iterable

import numpy as np
from tqdm.auto import tqdm


def progress(iterable: Iterable, desc: str, total: int | None = None, **kwargs):
    """A tqdm bar that only appears if the loop runs longer than 2 s (``delay``), and is
    silenced with ``NTK_JAX_NO_PROGRESS=1``."""
    disable = os.environ.get("NTK_JAX_NO_PROGRESS", "") not in ("", "0")
    return tqdm(iterable, desc=desc, total=total, delay=2.0, disable=disable, leave=False, **kwargs)


def to_jsonable(obj: Any) -> Any:
    """Converts numpy/jax scalars and arrays (recursively) to plain Python for ``json``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    return obj


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Opens a temp file next to ``path`` (private to this host and process) for writing and
    renames it onto ``path`` when the block exits without an error, so a killed job never
    leaves half a file and concurrent writers never share a temp file. Creates the parent
    directory; text modes write UTF-8."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (:func:`atomic_write`)."""
    with atomic_write(path) as fh:
        json.dump(to_jsonable(obj), fh, indent=2, allow_nan=True)


def write_npz(path: str, **arrays: Any) -> None:
    """Writes an ``.npz`` of ``arrays`` atomically (:func:`atomic_write`)."""
    with atomic_write(path, "wb") as fh:
        np.savez(fh, **arrays)


def read_json(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)


class DictConfig:
    """``to_dict`` / ``from_dict`` for the library's config dataclasses (``LoRAConfig``,
    ``TrainConfig``, model configs): ``from_dict`` takes a dict or ``ConfigDict`` and raises
    ``ValueError`` naming unknown keys."""

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any):
        import dataclasses

        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
        return cls(**d)
