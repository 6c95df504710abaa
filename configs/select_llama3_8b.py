"""NTK-Selector on Llama-3-8B-Instruct at the paper's scale (docs/theory.md §6.1; ``experiments/select.py``):
N = 9000 selected from a ~1.8M-record pool for ~1000 domain records.

    python -m ntk_jax.main --config=configs/select_llama3_8b.py:PLATFORM --workdir=WORKDIR \\
        --config.model.path=/ckpt/Meta-Llama-3-8B-Instruct \\
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
tokenizer, e.g. from ``huggingface-cli download meta-llama/Meta-Llama-3-8B-Instruct
--local-dir DIR``); the domain and pool paths likewise.

Settings (LoRA r=128, α=512 on q/k/v/o: P = 109 051 904 LoRA parameters; p = 8192; length 1024;
bf16 compute; per-platform mesh, weight dtype and batch sizes) and why each was chosen: the
docstring of ``ntk_jax.launcher.platforms.scale_selection_config``; ``docs/scale.md``.

Memory per device, GiB, from ``ntk_jax.launcher.memory.estimate_memory`` (``python
benchmarks/memory_table.py --platforms``; the columns are explained in ``docs/scale.md``):

| platform | local mesh | weights | batch feat/train | weights/dev | hidden | projected | jvp | train | peak CPU | peak GPU/TPU | device |
|---|---|---|---|---|---|---|---|---|---|---|---|
| gpu1 | 1x1 | bfloat16 | 1/1 | 15.16 | 40.89 | 44.19 | 42.60 | 64.62 | 64.62 | 36.25 | 80 GB |
| gpu8 | 8x1 | float32 | 8/8 | 4.15 | 9.04 | 42.30 | 12.38 | 56.36 | 56.36 | 28.00 | 80 GB |
| v4-8 | 1x4 | float32 | 2/2 | 7.77 | 14.28 | 16.62 | 23.27 | 26.41 | 26.41 | 19.13 | 32 GiB |
| v4-32 | 1x4 | float32 | 2/2 | 7.77 | 14.28 | 16.62 | 23.27 | 26.41 | 26.41 | 19.13 | 32 GiB |
| v5e-8 | 2x4 | bfloat16 | 4/2 | 2.01 | 5.65 | 13.41 | 3.79 | 12.52 | 13.41 | 6.13 | 16 GiB |
| v5e-16 | 1x4 | bfloat16 | 1/1 | 3.88 | 10.52 | 11.52 | 14.61 | 16.81 | 16.81 | 9.53 | 16 GiB |
"""
from ntk_jax.launcher.platforms import scale_selection_config

MODEL_PATH = "/path/to/Meta-Llama-3-8B-Instruct"  # placeholder: --config.model.path=DIR


def get_config(arg=None):
    """``arg``: the platform (see the module docstring); default ``gpu8``."""
    return scale_selection_config(arg or "gpu8", model_path=MODEL_PATH)
