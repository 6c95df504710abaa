"""ntk_jax: empirical NTKs of transformers in JAX / Flax NNX, and NTK-based data selection.

Every name has one public path, the module that defines it (``tests/test_public_names.py``):

    from ntk_jax.kernels.ntk import empirical_ntk, jacobian_free_ntk      # kernels (docs/theory.md §2)
    from ntk_jax.kernels.outputs import lm_output_fn                      # f(params, batch) of an LM
    from ntk_jax.kernels.spectrum import eigenvalues, risk_bounds         # spectrum, risk bounds (§4)
    from ntk_jax.kernels.stability import frobenius_cosine                # NTK stability (§3)
    from ntk_jax.models.hf_loading import from_pretrained                 # Hugging Face checkpoints

The layout and import layers are in docs/README.md.
"""
