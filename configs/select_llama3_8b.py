"""NTK-Selector on Llama-3-8B-Instruct at the paper's scale (docs/theory.md §6.1; ``experiments/select.py``).
The settings both 8B configs share, the platforms and how to run on several hosts:
``configs/common_8b.py``; docs/scale.md.

    python -m ntk_jax.main --config=configs/select_llama3_8b.py:PLATFORM --workdir=WORKDIR \\
        --config.model.path=/ckpt/Meta-Llama-3-8B-Instruct \\
        --config.select.domain_path=domain.jsonl --config.select.pool_path=pool.jsonl

The checkpoint, e.g. from ``huggingface-cli download meta-llama/Meta-Llama-3-8B-Instruct --local-dir DIR``.
LoRA r=128, α=512 on q/k/v/o: P = 109 051 904 LoRA parameters.

Memory per device, GiB, from ``ntk_jax.launcher.memory.estimate_memory`` (``python
benchmarks/memory_table.py --platforms``; the columns are explained in ``docs/scale.md``; the
default pipeline runs ``train``, ``hidden`` and ``loss``):

| platform | local mesh | weights | batch feat/train | weights/dev | hidden | loss | projected | jvp | train | peak CPU | peak GPU/TPU | device |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| gpu1 | 1x1 | bfloat16 | 1/1 | 15.16 | 40.64 | 41.59 | 44.19 | 42.41 | 58.95 | 58.95 | 30.59 | 80 GB |
| gpu8 | 8x1 | float32 | 8/8 | 4.15 | 9.04 | 11.97 | 38.55 | 12.38 | 54.91 | 54.91 | 26.54 | 80 GB |
| v4-8 | 1x4 | float32 | 2/2 | 7.77 | 14.15 | 14.88 | 15.54 | 22.99 | 25.23 | 25.23 | 17.96 | 32 GiB |
| v4-32 | 1x4 | float32 | 2/2 | 7.77 | 14.15 | 14.88 | 15.54 | 22.99 | 25.23 | 25.23 | 17.96 | 32 GiB |
| v5e-8 | 2x4 | bfloat16 | 4/2 | 2.01 | 5.72 | 2.99 | 13.05 | 3.14 | 12.10 | 13.05 | 5.77 | 16 GiB |
| v5e-16 | 1x4 | bfloat16 | 1/1 | 3.88 | 10.47 | 10.71 | 11.50 | 14.74 | 16.30 | 16.30 | 9.02 | 16 GiB |
"""
from configs.common_8b import selection_config

MODEL_PATH = "/path/to/Meta-Llama-3-8B-Instruct"  # placeholder: --config.model.path=DIR


def get_config(arg=None):
    """``arg``: the platform (``configs/common_8b.py``); default ``gpu8``."""
    return selection_config(arg or "gpu8", model_path=MODEL_PATH)
