"""Data selection for LLM fine-tuning (SPEC §6; ntk_jax issue 4).

Modules:

* :mod:`~ntk_jax.selection.store` — ``ScoreStore``: sharded, atomic, fingerprinted,
  resumable per-candidate scores (per-process shard assignment, merge).
* :mod:`~ntk_jax.selection.ntk_selector` — NTK-Selector (§6.1): mean-hidden-state kNN
  coarse filter, Jacobian-free kernel features (the one composition all code uses:
  ``ntk_features`` / ``ntk_scalar_fn``), scores ``s_j = ⟨mean_i φ(x_i), φ(x_j)⟩``, top-N.
* :mod:`~ntk_jax.selection.baselines` — random and embedding-similarity selection.
* :mod:`~ntk_jax.selection.less` — LESS (§6.2): Adam-preconditioned loss gradients over
  warm-up checkpoints.
* :mod:`~ntk_jax.selection.jobs` — the resumable selection job shared by every method
  (``scores/``, ``selected.jsonl``, report), and data loading (JSONL / controlled benchmark).
* :mod:`~ntk_jax.selection.evaluation` — fine-tune on domain ∪ selected, test loss and
  option-likelihood accuracy.
* :mod:`~ntk_jax.selection.lpntk` — lpNTK pruning (§6.3).
* :mod:`~ntk_jax.selection.gradex` — first-order subset estimation (§6.4).
"""
