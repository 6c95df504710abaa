"""Where the PyTorch peers of the speed benchmarks (``model_speed.py``, ``selection_speed.py``)
run beside JAX, so that a GPU run compares like with like or says that it does not."""
from __future__ import annotations

import jax


def torch_device() -> str:
    """``"cuda"`` when JAX runs on a GPU and this PyTorch build sees one, else ``"cpu"`` (then
    a GPU run compares across devices: :func:`like_for_like` is False)."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def like_for_like() -> bool:
    """Whether both frameworks run on the same kind of device (CPU / CPU or GPU / CUDA)."""
    return {"cpu": "cpu", "gpu": "cuda"}.get(jax.default_backend()) == torch_device()
