"""Public spectrum API; see :mod:`ntk_jax.kernels.spectrum`."""
from ntk_jax.kernels.spectrum import *  # noqa: F401,F403
