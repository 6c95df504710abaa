"""Random selection (docs/theory.md §6.2): N distinct pool records drawn uniformly with the job's seed."""
from __future__ import annotations

from ntk_jax.selection.baselines import random_selection
from ntk_jax.selection.methods import Selection


def select(job) -> Selection:
    with job.timed("select"):
        return Selection(chosen=random_selection(len(job.pool), int(job.cfg["n_select"]), job.seed))
