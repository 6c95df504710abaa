"""The neural-tangents compatibility layer: imports on current JAX without TensorFlow."""
import subprocess
import sys

import pytest

from ntk_jax.kernels import nt_compat


def test_imports_without_tensorflow_in_a_fresh_process():
    code = ("import sys; from ntk_jax.kernels import nt_compat; import jax.numpy as jnp; "
            "k = nt_compat.empirical_ntk_fn(lambda p, x: x @ p, trace_axes=()); "
            "print(k(jnp.ones((2, 3)), None, jnp.ones((3, 4))).shape); "
            "print('tensorflow' in sys.modules, 'neural_tangents.experimental' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(2,", "2,", "4,", "4)", "False", "False"]


def test_structured_derivatives_is_refused():
    with pytest.raises(ValueError, match="STRUCTURED_DERIVATIVES"):
        nt_compat.empirical_ntk_fn(lambda p, x: x @ p, implementation="structured_derivatives")


def test_available():
    assert nt_compat.available()
