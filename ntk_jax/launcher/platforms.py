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


# NTK-Selector at the paper's scale (docs/theory.md §6.1): N = 9000 selected from a 1.8M pool for 1000
# domain examples, p = 8192, sequence length 1024, LoRA on the attention projections.
N_SELECT = 9000
PROJECTION_DIM = 8192
SEQ_LEN = 1024
LORA = dict(rank=128, alpha=512.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"), layers=None,
            b_init_std=0.0)
EXPECTED_DOMAIN = 1000


def scale_selection_config(platform_name: str | None, *, model_path: str):
    """The ``select`` job config of an 8B NTK-Selector run on ``platform_name``
    (``configs/select_llama3_8b.py``, ``configs/select_qwen3_8b.py``).

    Settings, and why:

    * LoRA r = 128, α = 512 on q/k/v/o of every layer, dropout 0. The NTK-Selector paper's own
      LoRA hyper-parameters were not available here (only its abstract); these are LESS's (Xia
      et al. 2024; docs/theory.md §6.2), the baseline the paper compares against, so both methods select
      through the same adapters.
    * Scores: the recommended pipeline (the ``select.ntk`` defaults, docs/selection.md): the
      forward-only loss change ``Δ_j = ℓ_j(θ_0) − ℓ_j(θ_w)`` of every pool record — two forward
      passes per candidate, no backward, no projection (:mod:`ntk_jax.selection.loss_change`).
    * Sequence length 1024 (``select.max_len``, the encoding length of every record), longer
      records truncated on the left (``select.truncation="left"``: leading prompt tokens go,
      the response stays; a record whose response alone exceeds 1024 tokens is dropped and
      counted in ``report.json``): a 1.8M-record pool holds longer records, and stopping an
      8B job over them would waste it.
    * Warm-up: one epoch over ~1000 domain records at lr 2e-5 (LESS's), linear decay after 3 %
      warm-up, batch per platform (:data:`LAYOUTS`).
    * For the other presets (``--config.select.ntk.filter=knn --config.select.ntk.gradient=True
      ...``, see ``ntk_jax.selection.methods.ntk.PRESETS``): p = 8192 (Rademacher, seed 0),
      candidate scores by JVP where unnormalised (``ntk.feature_norms=False``); kNN filter with
      100 votes per domain record (``knn_k``), M = 4N = 36000 candidates (``ntk.filter_factor``).
    * bf16 compute (norms, softmax and logits in float32). Weights stored in float32 where the
      memory estimate leaves room (``gpu8``, ``v4-*``: the LoRA factors and the Adam moments are
      then float32 too), else bfloat16 (``gpu1``, ``v5e-*``): bf16 LoRA factors lose Adam
      updates smaller than half a bf16 ulp (≈0.2 % of the factor) — set
      ``--config.model.param_dtype=float32`` on a device with room.
    * ``config.mesh``: ``data=-1`` (all local devices the ``model`` axis leaves) and the
      platform's ``model`` size; on the platform this is the layout's mesh (:data:`LAYOUTS`;
      memory per device in the configs' docstrings and ``docs/scale.md``).

    ``model_path``: the checkpoint directory placeholder (``prepare_context`` raises a clear
    ``FileNotFoundError`` while it does not exist; override with ``--config.model.path``)."""
    from ntk_jax.launcher.config_lib import base_config
    from ntk_jax.models.lora import lora_config
    from ntk_jax.selection.methods import apply_overrides
    from ntk_jax.selection.methods.ntk import RECOMMENDED
    from ntk_jax.training.trainer import finetune_train_config

    lay = layout(platform_name)
    config = base_config()
    config.experiments = ("select",)
    config.model.path = model_path
    config.model.dtype = "bfloat16"
    config.model.param_dtype = lay.param_dtype
    # data=-1: all local devices the model axis leaves (the layout's mesh on this platform).
    config.mesh.data = -1
    config.mesh.model = lay.mesh[1]
    s = config.select
    s.method = "ntk"
    s.n_select = N_SELECT
    s.max_len = SEQ_LEN  # the sequence length every record is encoded to
    s.truncation = "left"  # keep the response; counts of truncated / dropped records in report.json
    s.domain_path = "/path/to/domain.jsonl"
    s.pool_path = "/path/to/pool.jsonl"
    s.lora = lora_config(**LORA)
    steps = max(EXPECTED_DOMAIN // lay.train_batch_size, 1)  # one epoch over ~1000 domain examples
    s.warmup = finetune_train_config(learning_rate=2e-5, warmup_steps=max(steps * 3 // 100, 1), total_steps=steps,
                                     schedule="linear", batch_size=lay.train_batch_size,
                                     checkpoint_every=max(steps // 4, 1), log_every=10)
    s.knn_k = 100
    # the recommended pipeline (forward-only loss change, docs/theory.md §6.7)
    apply_overrides(s, RECOMMENDED)
    s.ntk.filter_factor = 4
    s.ntk.feature_norms = False
    s.projection_dim = PROJECTION_DIM
    s.projection_seed = 0
    s.shard_size = 2048
    s.feature_batch_size = lay.feature_batch_size
    s.less.lora = lora_config(**LORA)
    return config
