"""NTK-Selector on Qwen3-8B at the paper's scale (docs/theory.md §6.1; ``experiments/select.py``):
N = 9000 selected from a ~1.8M-record pool for ~1000 domain records.

    python -m ntk_jax.main --config=configs/select_qwen3_8b.py:PLATFORM --workdir=WORKDIR \\
        --config.model.path=/ckpt/Qwen3-8B \\
        --config.select.domain_path=domain.jsonl --config.select.pool_path=pool.jsonl

PLATFORM (``ntk_jax.launcher.platforms``): ``gpu1``, ``gpu8`` (default), ``v4-8``, ``v4-32``,
``v5e-8``, ``v5e-16``. Single host (``gpu1``, ``gpu8``, ``v4-8``, ``v5e-8``): run the command
once; the process builds its mesh over all its local devices. Several hosts (TPU slices
``v4-32``, ``v5e-16``; or GPU nodes under SLURM / Open MPI): run the same command on every host
(``gcloud compute tpus tpu-vm ssh NAME --worker=all --command="..."``, ``srun
--ntasks-per-node=1 ...``) with one shared WORKDIR; ``jax.distributed`` finds the processes
by itself (``config.distributed.mode="auto"``), each process loads the model onto its own
host's devices and scores its share of the pool's shards. See ``docs/scale.md``.

``config.model.path`` is a placeholder: the job stops with a ``FileNotFoundError`` naming it
until it points at a local checkpoint directory (``config.json``, ``*.safetensors`` and the
tokenizer, e.g. from ``huggingface-cli download Qwen/Qwen3-8B
--local-dir DIR``); the domain and pool paths likewise.

Settings (LoRA r=128, α=512 on q/k/v/o: P = 122 683 392 LoRA parameters; p = 8192; length 1024;
bf16 compute; per-platform mesh, weight dtype and batch sizes) and why each was chosen: the
docstring of ``ntk_jax.launcher.platforms.scale_selection_config``; ``docs/scale.md``.

Memory per device, GiB, from ``ntk_jax.launcher.memory.estimate_memory`` (``python
benchmarks/memory_table.py --platforms``; the columns are explained in ``docs/scale.md``):

| platform | local mesh | weights | batch feat/train | weights/dev | hidden | projected | jvp | train | peak CPU | peak GPU/TPU | device |
|---|---|---|---|---|---|---|---|---|---|---|---|
| gpu1 | 1x1 | bfloat16 | 1/1 | 15.48 | 38.70 | 44.91 | 42.94 | 68.13 | 68.13 | 39.48 | 80 GB |
| gpu8 | 8x1 | float32 | 8/8 | 4.27 | 9.50 | 39.30 | 14.00 | 60.41 | 60.41 | 31.76 | 80 GB |
| v4-8 | 1x4 | float32 | 2/2 | 7.95 | 13.89 | 15.91 | 24.54 | 27.90 | 27.90 | 20.53 | 32 GiB |
| v4-32 | 1x4 | float32 | 2/2 | 7.95 | 13.89 | 15.91 | 24.54 | 27.90 | 27.90 | 20.53 | 32 GiB |
| v5e-8 | 2x4 | bfloat16 | 4/2 | 2.07 | 5.87 | 13.26 | 3.39 | 13.43 | 13.43 | 6.05 | 16 GiB |
| v5e-16 | 1x4 | bfloat16 | 1/1 | 3.98 | 10.08 | 11.74 | 15.10 | 17.73 | 17.73 | 10.35 | 16 GiB |
"""
from ntk_jax.launcher.platforms import scale_selection_config

MODEL_PATH = "/path/to/Qwen3-8B"  # placeholder: --config.model.path=DIR


def get_config(arg=None):
    """``arg``: the platform (see the module docstring); default ``gpu8``."""
    return scale_selection_config(arg or "gpu8", model_path=MODEL_PATH)
