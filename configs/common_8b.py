"""The settings both 8B selection configs share (``configs/select_llama3_8b.py``,
``configs/select_qwen3_8b.py``): NTK-Selector at the paper's scale (docs/theory.md §6.1) — N =
9000 selected from a ~1.8M-record pool for ~1000 domain records, sequences of 1024 tokens, LoRA
on the attention projections — laid out per platform (:mod:`ntk_jax.launcher.platforms`).
Each 8B config file holds only what differs: the model, its checkpoint placeholder and its
memory table. Why each setting was chosen: :func:`selection_config`; docs/scale.md.

Platforms (``ntk_jax.launcher.platforms``), given after the config path
(``--config=configs/select_llama3_8b.py:PLATFORM``): ``gpu1``, ``gpu8`` (default), ``v4-8``,
``v4-32``, ``v5e-8``, ``v5e-16``. Single host (``gpu1``, ``gpu8``, ``v4-8``, ``v5e-8``): run the
command once; the process builds its mesh over all its local devices. Several hosts (TPU slices
``v4-32``, ``v5e-16``; or GPU nodes under SLURM / Open MPI): run the same command on every host
(``gcloud compute tpus tpu-vm ssh NAME --worker=all --command="..."``, ``srun
--ntasks-per-node=1 ...``) with one shared WORKDIR; ``jax.distributed`` finds the processes by
itself (``config.distributed.mode="auto"``), each process loads the model onto its own host's
devices and scores its share of the pool's shards.

``config.model.path`` is a placeholder: the job stops with a ``FileNotFoundError`` naming it
until it points at a local checkpoint directory (``config.json``, ``*.safetensors`` and the
tokenizer); the domain and pool paths likewise.
"""
from __future__ import annotations

from ntk_jax.launcher.config_lib import base_config
from ntk_jax.launcher.platforms import layout
from ntk_jax.models.lora import lora_config
from ntk_jax.selection.methods import apply_overrides
from ntk_jax.selection.methods.ntk import RECOMMENDED
from ntk_jax.training.trainer import finetune_train_config

N_SELECT = 9000
PROJECTION_DIM = 8192
SEQ_LEN = 1024
LORA = dict(rank=128, alpha=512.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"), layers=None,
            b_init_std=0.0)
EXPECTED_DOMAIN = 1000


def selection_config(platform_name: str | None, *, model_path: str):
    """The ``select`` job config of an 8B NTK-Selector run on ``platform_name``
    (``configs/select_llama3_8b.py``, ``configs/select_qwen3_8b.py``).

    Settings, and why:

    * LoRA r = 128, α = 512 on q/k/v/o of every layer, dropout 0. The NTK-Selector paper's own
      LoRA hyper-parameters were not available here (only its abstract); these are LESS's (Xia
      et al. 2024; docs/theory.md §6.2), the baseline the paper compares against, so both methods select
      through the same adapters.
    * Scores: the recommended pipeline (the ``select.ntk`` defaults, docs/selection.md): the
      paper's kNN filter (100 votes per domain record over the warm-up model's mean hidden
      states) keeps M = 4N = 36000 candidates, ranked by the forward-only loss change
      ``Δ_j = ℓ_j(θ_0) − ℓ_j(θ_w)`` (:mod:`ntk_jax.selection.loss_change`) — one forward pass
      per pool candidate and two per kept one, no backward, no projection.
    * Sequence length 1024 (``select.max_len``, the encoding length of every record), longer
      records truncated on the left (``select.truncation="left"``: leading prompt tokens go,
      the response stays; a record whose response alone exceeds 1024 tokens is dropped and
      counted in ``report.json``): a 1.8M-record pool holds longer records, and stopping an
      8B job over them would waste it.
    * Warm-up: one epoch over ~1000 domain records at lr 2e-5 (LESS's), linear decay after 3 %
      warm-up, batch per platform (:data:`LAYOUTS`).
    * For the other presets (``--config.select.ntk.rescore=gradient ...``, see
      ``ntk_jax.selection.methods.ntk.PRESETS``): p = 8192 (Rademacher, seed 0), candidate
      scores by JVP where unnormalised (``ntk.feature_norms=False``).
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
    # the recommended pipeline (kNN filter, then the forward-only loss change; docs/theory.md §6.7)
    apply_overrides(s, RECOMMENDED)
    s.ntk.filter_factor = 4
    s.ntk.feature_norms = False
    s.projection_dim = PROJECTION_DIM
    s.projection_seed = 0
    s.shard_size = 2048
    s.feature_batch_size = lay.feature_batch_size
    s.less.lora = lora_config(**LORA)
    return config
