"""One NTK-Selector job (docs/theory.md §6.1, §6.5, §6.7; experiments/select.py) with the recommended
pipeline (docs/selection.md): the paper's kNN filter to 4N over the warm-up model's mean hidden
states, then the loss change Δ_j = ℓ_j(θ_0) − ℓ_j(θ_w) of the kept (forward passes only).
``:PRESET`` gives another pipeline of ``ntk_jax.selection.methods.ntk.PRESETS``: ``paper`` (the
paper's reading: sum-of-logits gradients after the warm-up, unnormalised, kNN filter to 4N),
``loss_change`` (Δ of every pool record), ``gradient`` (label-aware gradient scores at θ_0 and
θ_w), ``staged``.

    python -m ntk_jax.main --config=configs/select_ntk.py --workdir=runs/select_ntk
    python -m ntk_jax.main --config=configs/select_ntk.py:paper --workdir=runs/select_ntk_paper
    # your data (JSONL / JSON / Parquet records with "messages", "prompt"/"response" or "text",
    # or in the Alpaca, Dolly, ShareGPT or prompt/completion layouts) on your checkpoint,
    # records encoded to 1024 tokens, longer ones truncated on the left:
    python -m ntk_jax.main --config=configs/select_ntk.py --workdir=runs/mine \\
        --config.model.path=CKPT --config.select.max_len=1024 --config.select.truncation=left \\
        --config.select.domain_path=domain.jsonl --config.select.pool_path=pool.jsonl

Without JSONL paths the job runs on the controlled benchmark (ntk_jax.data.controlled,
target ``select.benchmark.target``) and reports precision@N against the pool's base rate.
"""
from ntk_jax.launcher.config_lib import base_config
from ntk_jax.selection.methods import apply_overrides
from ntk_jax.selection.methods.ntk import PRESETS


def get_config(arg=None):
    preset = arg or "recommended"
    if preset not in PRESETS:
        raise ValueError(f"unknown NTK preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = base_config()
    config.experiments = ("select",)
    config.select.method = "ntk"
    # The score variant (select.ntk; the defaults are the recommended preset):
    apply_overrides(config.select, PRESETS[preset])
    return config
