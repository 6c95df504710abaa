"""Public kernel API (implementations live in :mod:`ntk_jax.kernels`).

    from ntk_jax.ntk import empirical_ntk, jacobian_free_ntk
"""
from ntk_jax.kernels.features import gradient_features, per_example_grads, sum_of_outputs  # noqa: F401
from ntk_jax.kernels.ntk import (METHODS, NonFiniteKernelError, check_finite, empirical_ntk,  # noqa: F401
                                 feature_kernel, gradient_kernel, jacobian_free_ntk,
                                 loss_gradient_kernel, ntk_fn, per_example_jacobians)
from ntk_jax.kernels.outputs import lm_output_fn, masked_mean_logits  # noqa: F401
from ntk_jax.kernels.projection import RandomProjection  # noqa: F401
