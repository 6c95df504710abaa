"""Accelerator platforms the 8B selection configs (``configs/select_llama3_8b.py``,
``configs/select_qwen3_8b.py``) are laid out for, and the per-platform settings they use.

A platform is a name given after the config path (big_vision style,
``--config=configs/select_llama3_8b.py:gpu8``): how many hosts, how many accelerators each
host has, and each accelerator's memory. Every process (one per host) builds its mesh from
its own local devices (``config.mesh``, see :func:`ntk_jax.models.sharding.mesh_from_config`)
and loads the whole model onto it; hosts split the pool's shards between them. So the memory
a device needs depends only on the local mesh and the batch sizes, which
:data:`LAYOUTS` fixes per platform from :func:`ntk_jax.launcher.memory.estimate_memory`
(``benchmarks/memory_table.py --platforms``; the numbers are in ``docs/scale.md``).
"""
from __future__ import annotations

import dataclasses

__all__ = ["Platform", "Layout", "PLATFORMS", "LAYOUTS", "platform", "layout"]

GB = 10 ** 9
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Platform:
    """``hosts`` × ``devices_per_host`` accelerators of ``device_memory`` bytes each."""

    name: str
    kind: str  # "gpu" | "tpu"
    hosts: int
    devices_per_host: int
    device_memory: int
    memory_label: str
    description: str

    @property
    def num_devices(self) -> int:
        return self.hosts * self.devices_per_host


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a selection job runs on a platform.

    ``mesh``: the local ``(data, model)`` mesh of each process (``data * model`` =
    ``devices_per_host``); ``param_dtype``: how the weights (and so the LoRA factors and the
    optimiser moments) are stored — compute is bfloat16 either way; ``feature_batch_size``:
    examples per call of the hidden-state, feature and JVP programs (all local devices
    together); ``train_batch_size``: examples per warm-up step.
    """

    mesh: tuple[int, int]
    param_dtype: str
    feature_batch_size: int
    train_batch_size: int


PLATFORMS: dict[str, Platform] = {p.name: p for p in (
    Platform("gpu1", "gpu", 1, 1, 80 * GB, "80 GB", "one A100/H100 80 GB GPU"),
    Platform("gpu8", "gpu", 1, 8, 80 * GB, "80 GB", "one host with 8 A100/H100 80 GB GPUs"),
    Platform("v4-8", "tpu", 1, 4, 32 * GiB, "32 GiB", "Cloud TPU v4-8: one host, 4 chips"),
    Platform("v4-32", "tpu", 4, 4, 32 * GiB, "32 GiB", "Cloud TPU v4-32: 4 hosts × 4 chips"),
    Platform("v5e-8", "tpu", 1, 8, 16 * GiB, "16 GiB", "Cloud TPU v5e-8 (v5litepod-8): one host, 8 chips"),
    Platform("v5e-16", "tpu", 4, 4, 16 * GiB, "16 GiB", "Cloud TPU v5e-16 (v5litepod-16): 4 hosts × 4 chips"),
)}

# Chosen with estimate_memory (docs/scale.md): the largest batches and the float32 weights
# where the GPU/TPU estimate of every program of the job stays well under the device memory.
LAYOUTS: dict[str, Layout] = {
    "gpu1": Layout(mesh=(1, 1), param_dtype="bfloat16", feature_batch_size=1, train_batch_size=1),
    "gpu8": Layout(mesh=(8, 1), param_dtype="float32", feature_batch_size=8, train_batch_size=8),
    "v4-8": Layout(mesh=(1, 4), param_dtype="float32", feature_batch_size=2, train_batch_size=2),
    "v4-32": Layout(mesh=(1, 4), param_dtype="float32", feature_batch_size=2, train_batch_size=2),
    "v5e-8": Layout(mesh=(2, 4), param_dtype="bfloat16", feature_batch_size=4, train_batch_size=2),
    "v5e-16": Layout(mesh=(1, 4), param_dtype="bfloat16", feature_batch_size=1, train_batch_size=1),
}


def platform(name: str | None) -> Platform:
    """The :class:`Platform` called ``name``; ``ValueError`` listing the known ones."""
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}; choose one of {sorted(PLATFORMS)} "
                         "(e.g. --config=configs/select_llama3_8b.py:gpu8)")
    return PLATFORMS[name]


def layout(name: str | None) -> Layout:
    """The :class:`Layout` of platform ``name`` (checked against its device count)."""
    p = platform(name)
    lay = LAYOUTS[p.name]
    if lay.mesh[0] * lay.mesh[1] != p.devices_per_host:
        raise AssertionError(f"layout of {p.name}: mesh {lay.mesh} does not use its {p.devices_per_host} devices")
    return lay
