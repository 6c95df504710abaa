"""ntk_jax: neural tangent kernels of transformers and NTK-based data selection in JAX."""
from setuptools import find_packages, setup

setup(
    name="ntk_jax",
    version="0.1.0",
    description="Exact and Jacobian-free empirical NTKs of Flax NNX transformers, "
    "theory validation, and NTK-based data selection for LLM fine-tuning.",
    python_requires=">=3.11",
    packages=find_packages(include=["ntk_jax", "ntk_jax.*", "experiments", "experiments.*", "configs"]),
    install_requires=[
        "jax==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "absl-py",
        "numpy",
        "scipy",
        "matplotlib",
        "tqdm",
        "transformers==5.23.0",
        "safetensors",
        "tokenizers",
        # Local Hugging Face `datasets` directories (save_to_disk) as selection pools.
        "datasets==5.2.0",
        # neural-tangents 0.6.5 is installed with --no-deps (its deps pull TensorFlow);
        # this is its one runtime dependency that jax does not bring.
        "frozendict",
        # Human valence ratings (vader_lexicon.txt, MIT) for the lexicon task of
        # configs/validate_pretrained.py (ntk_jax/data/lexicon.py).
        "vaderSentiment==3.3.2",
    ],
    extras_require={
        # Accelerators (pip install -e ".[cuda12]" / ".[tpu]"): jax's own extras, pinned to the
        # jax above, with the plugin / runtime versions they resolve to spelled out
        # (tests/test_install_pins.py checks that they agree).
        # NVIDIA GPUs, CUDA 12 (the CUDA and cuDNN libraries come as pip wheels):
        "cuda12": ["jax[cuda12]==0.10.2", "jax-cuda12-plugin[with-cuda]==0.10.2", "jax-cuda12-pjrt==0.10.2"],
        # Cloud TPU VMs (libtpu as jax 0.10.2 pins it):
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.*"],
        "test": ["pytest", "pytest-xdist", "hypothesis", "nbclient", "nbformat", "ipykernel", "jupytext",
                 # PyTorch transformers models are the reference in the port tests only.
                 "torch==2.13.0",
                 # Round-trip of exported LoRA adapters into the PyTorch stack.
                 "peft==0.21.2",
                 # The 8x8 digits of the lpNTK pruning job (ntk_jax/data/digits.py).
                 "scikit-learn==1.9.1"],
        # configs/prune_lpntk_digits.py: scikit-learn ships the digits inside its wheel.
        "digits": ["scikit-learn==1.9.1"],
    },
)
