"""Small shared utilities: progress bars, JSON I/O."""
from __future__ import annotations

import json
import os
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


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (temp file + rename), so a killed job never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(to_jsonable(obj), fh, indent=2, allow_nan=True)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)
