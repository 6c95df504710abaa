"""Data selection for LLM fine-tuning (docs/theory.md §6; results in docs/selection.md).

Modules:

* :mod:`~ntk_jax.selection.methods` — the selection methods as plug-ins, one module each
  (``ntk``, ``less``, ``random``, ``embedding``): ``select(job) -> Selection``, optional
  ``config()`` section and named ``PRESETS`` (``ntk@paper``).
* :mod:`~ntk_jax.selection.jobs` — the resumable selection job shared by every method
  (validation, ``SelectionJob``: warm-up, score stores, barriers; ``selected.jsonl``,
  report), and data loading (JSONL / controlled benchmark).
* :mod:`~ntk_jax.selection.diagnostics` — why a selector chose what it chose (shares per
  task and role, Spearman of the score vs feature norm and response length, a figure).
* :mod:`~ntk_jax.selection.store` — ``ScoreStore``: sharded, atomic, fingerprinted,
  resumable per-candidate scores (per-process shard assignment, merge).
* :mod:`~ntk_jax.selection.ntk_selector` — NTK-Selector's pieces (§6.1, §6.5): the selection
  scalars (sum of logits or loss, mean or sum over response tokens), mean-hidden-state kNN
  coarse filter, top-N (the scores: ``methods/ntk.py``).
* :mod:`~ntk_jax.selection.embeddings` — the hidden-state embedding stage of the pool
  (resumable), shared by the ``ntk`` and ``embedding`` methods.
* :mod:`~ntk_jax.selection.optimizer_state` — Adam's moments in an optax state and the
  diagonal preconditioner they define, shared by ``ntk`` and ``less``.
* :mod:`~ntk_jax.selection.baselines` — random and embedding-similarity selection.
* :mod:`~ntk_jax.selection.less` — LESS (§6.2): Adam-preconditioned loss gradients over
  warm-up checkpoints.
* :mod:`~ntk_jax.selection.evaluation` — fine-tune on domain ∪ selected, test loss and
  option-likelihood accuracy.
* :mod:`~ntk_jax.selection.lpntk` — lpNTK pruning (§6.3).
* :mod:`~ntk_jax.selection.gradex` — first-order subset estimation (§6.4).
"""
