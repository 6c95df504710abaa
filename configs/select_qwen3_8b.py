"""NTK-Selector on Qwen3-8B at the paper's scale (docs/theory.md §6.1; ``experiments/select.py``).
The settings both 8B configs share, the platforms and how to run on several hosts:
``configs/common_8b.py``; docs/scale.md.

    python -m ntk_jax.main --config=configs/select_qwen3_8b.py:PLATFORM --workdir=WORKDIR \\
        --config.model.path=/ckpt/Qwen3-8B \\
        --config.select.domain_path=domain.jsonl --config.select.pool_path=pool.jsonl

The checkpoint, e.g. from ``huggingface-cli download Qwen/Qwen3-8B --local-dir DIR``.
LoRA r=128, α=512 on q/k/v/o: P = 122 683 392 LoRA parameters.

Memory per device, GiB, from ``ntk_jax.launcher.memory.estimate_memory`` (``python
benchmarks/memory_table.py --platforms``; the columns are explained in ``docs/scale.md``; the
default pipeline runs ``train``, ``hidden`` and ``loss``):

| platform | local mesh | weights | batch feat/train | weights/dev | hidden | loss | projected | jvp | train | peak CPU | peak GPU/TPU | device |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| gpu1 | 1x1 | bfloat16 | 1/1 | 15.48 | 38.49 | 39.65 | 44.91 | 42.77 | 61.77 | 61.77 | 33.12 | 80 GB |
| gpu8 | 8x1 | float32 | 8/8 | 4.27 | 9.50 | 13.55 | 39.29 | 14.00 | 58.77 | 58.77 | 30.12 | 80 GB |
| v4-8 | 1x4 | float32 | 2/2 | 7.95 | 13.77 | 12.85 | 15.88 | 24.49 | 26.92 | 26.92 | 19.54 | 32 GiB |
| v4-32 | 1x4 | float32 | 2/2 | 7.95 | 13.77 | 12.85 | 15.88 | 24.49 | 26.92 | 26.92 | 19.54 | 32 GiB |
| v5e-8 | 2x4 | bfloat16 | 4/2 | 2.07 | 6.09 | 3.23 | 13.24 | 3.39 | 12.97 | 13.24 | 5.87 | 16 GiB |
| v5e-16 | 1x4 | bfloat16 | 1/1 | 3.98 | 10.01 | 7.58 | 11.72 | 15.48 | 17.20 | 17.20 | 9.83 | 16 GiB |
"""
from configs.common_8b import selection_config

MODEL_PATH = "/path/to/Qwen3-8B"  # placeholder: --config.model.path=DIR


def get_config(arg=None):
    """``arg``: the platform (``configs/common_8b.py``); default ``gpu8``."""
    return selection_config(arg or "gpu8", model_path=MODEL_PATH)
