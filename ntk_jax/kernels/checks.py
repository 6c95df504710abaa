"""Input checks shared by the kernel, spectrum and stability code."""
from __future__ import annotations

import numpy as np


class NonFiniteKernelError(ValueError):
    """A kernel (or its features) contains NaN or inf."""


def check_finite(K, what: str = "kernel") -> np.ndarray:
    """Returns ``K`` as a numpy array; raises :class:`NonFiniteKernelError` naming how many
    entries are NaN/inf and where the first one is."""
    K = np.asarray(K)
    bad = ~np.isfinite(K)
    if bad.any():
        raise NonFiniteKernelError(
            f"{what} has {int(bad.sum())} non-finite entries (nan/inf) out of {K.size}; "
            f"first at index {tuple(int(i) for i in np.argwhere(bad)[0])}. Check the model outputs "
            f"and parameters for overflow (try float32/float64 instead of bfloat16).")
    return K
