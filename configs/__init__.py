"""Job configs: ``get_config()`` files for ``python -m ntk_jax.main --config=configs/FILE[:ARG]``,
and the settings modules they share (``common_8b``)."""
