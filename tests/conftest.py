"""Fixtures shared across test files, and the test run's JAX compilation cache."""
import os

# Persistent compilation cache: the tests (and the job processes they start, which inherit the
# environment) compile the same small programs many times; XLA compiles each once per run (once
# ever while the cache under .pytest_cache/ lives). Set before JAX is imported; a caller's
# JAX_COMPILATION_CACHE_DIR wins.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Compile flags for speed (tests/procs.py FAST_COMPILE: same results up to float rounding); a
# caller's own setting of either flag wins.
from procs import with_fast_compile  # noqa: E402

os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))

import pytest  # noqa: E402

from ntk_jax.launcher.config_lib import base_config  # noqa: E402
from ntk_jax.training.pretrain import pretrain_default_model


def tiny_pretrain_config():
    """A shrunken version of the default job's pre-training (a few seconds on 2 cores)."""
    c = base_config()
    c.model.arch.hidden_size = 32
    c.model.arch.intermediate_size = 64
    c.pretrain.n_per_task = 200
    c.pretrain.train.total_steps = 150
    c.pretrain.train.batch_size = 32
    c.pretrain.train.checkpoint_every = 0
    return c


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory of a small pre-trained embedded-default model (``config.json``, weights,
    char tokenizer), made once per test session. Treat it as read-only."""
    c = tiny_pretrain_config()
    directory = os.path.join(str(tmp_path_factory.mktemp("tiny_model")), "base_model")
    pretrain_default_model(c.pretrain, c.model.arch, directory, seed=0)
    return directory


def pytest_collection_modifyitems(config, items):
    """Files with a ``slow`` test run first (a stable sort; each file's own order is kept).
    pytest-xdist's ``--dist loadfile`` hands files to the workers in this order (pytest.ini:
    ``--no-loadscope-reorder``; its default order is by number of tests, which puts one-test
    slow files last): the long files start early and the workers finish close together."""
    slow_files = {item.path for item in items
                  if item.get_closest_marker("slow") and not item.get_closest_marker("benchmark")}
    items.sort(key=lambda item: item.path not in slow_files)
