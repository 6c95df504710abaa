"""Public NTK-stability API; see :mod:`ntk_jax.kernels.stability`."""
from ntk_jax.kernels.stability import *  # noqa: F401,F403
