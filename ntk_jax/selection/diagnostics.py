"""Why a selector chose what it chose: diagnostics in every selection report.

:func:`selection_diagnostics` returns (JSON-ready):

* ``share_by_task``: for every ``task`` (else ``family``) of the pool, its share of the pool
  and of the selection — a selector that only follows one family shows up here;
* ``share_by_role`` (pools whose records carry ``role``): the same per role;
* ``spearman_score_vs_feature_norm``: Spearman correlation, over the scored candidates,
  of the score with the norm of the candidate's feature / gradient (``None`` where the
  method has no norm): near 1 means the score mostly ranks gradient norms (docs/theory.md §6.5);
* ``spearman_score_vs_response_length``: the same against the number of scored (response)
  tokens;
* ``score_by_role``: mean / median / min / max score per role (where roles exist).

:func:`plot_diagnostics` draws one figure per job: shares per task (pool vs selected), score
vs feature norm, and the score histogram by role.
"""
from __future__ import annotations

import numpy as np

from ntk_jax.data.records import tokenize_record
from ntk_jax.stats import spearman

__all__ = ["response_lengths", "selection_diagnostics", "plot_diagnostics"]


def response_lengths(tokenizer, records: list[dict], **encode_kw) -> np.ndarray:
    """Number of scored tokens of each record (response + eos; every token of a text
    record; the assistant turns of a messages record), as
    :func:`ntk_jax.data.records.encode_records` scores them (``encode_kw``: its options):
    ``(n,)`` int64."""
    return np.asarray([int(tokenize_record(tokenizer, r, **encode_kw)[1].sum()) for r in records], np.int64)


def _group_of(r: dict) -> str:
    return str(r.get("task", r.get("family", "")))


def _shares(pool: list[dict], chosen: list[int], key) -> dict:
    pool_keys = [key(r) for r in pool]
    sel_keys = [pool_keys[i] for i in chosen]
    names = sorted(set(pool_keys))
    n_pool, n_sel = len(pool_keys), max(len(sel_keys), 1)
    return {k: {"pool": pool_keys.count(k) / n_pool, "selected": sel_keys.count(k) / n_sel} for k in names}


def selection_diagnostics(pool: list[dict], chosen, result, tokenizer, **encode_kw) -> dict:
    """The diagnostics of one selection (see the module docstring). ``result``: the
    method's :class:`~ntk_jax.selection.methods.Selection`; ``encode_kw``: the encoding
    options the scored tokens are counted with (e.g. ``assistant_turns``)."""
    chosen = [int(i) for i in chosen]
    out: dict = {"share_by_task": _shares(pool, chosen, _group_of)}
    has_roles = bool(pool) and all("role" in r for r in pool)
    if has_roles:
        out["share_by_role"] = _shares(pool, chosen, lambda r: str(r["role"]))
    out["spearman_score_vs_feature_norm"] = None
    out["spearman_score_vs_response_length"] = None
    if result.scores is None or result.scored is None:
        return out
    scored = [pool[int(i)] for i in result.scored]
    scores = np.asarray(result.scores, np.float64)
    if result.feature_norms is not None:
        out["spearman_score_vs_feature_norm"] = spearman(scores, result.feature_norms)
    out["spearman_score_vs_response_length"] = spearman(scores, response_lengths(tokenizer, scored, **encode_kw))
    if has_roles:
        by_role = {}
        for role in sorted({r["role"] for r in scored}):
            v = scores[[r["role"] == role for r in scored]]
            by_role[role] = {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
                             "min": float(v.min()), "max": float(v.max())}
        out["score_by_role"] = by_role
    return out


def plot_diagnostics(diag: dict, pool: list[dict], result, path: str, *, title: str = "") -> str:
    """One PNG: selected vs pool share per task; score vs feature norm (coloured by role);
    score histogram by role. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    shares = diag["share_by_task"]
    names = list(shares)
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [shares[k]["pool"] for k in names], 0.4, label="pool", color="0.6")
    axes[0].bar(x + 0.2, [shares[k]["selected"] for k in names], 0.4, label="selected", color="tab:blue")
    axes[0].set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    axes[0].set_title("share per task", fontsize=9)
    axes[0].legend(fontsize=7)
    if result.scores is not None and result.scored is not None:
        scored = [pool[int(i)] for i in result.scored]
        roles = [str(r.get("role", "candidate")) for r in scored]
        scores = np.asarray(result.scores, np.float64)
        colours = {"useful": "tab:green", "unrelated": "0.5", "conflicting": "tab:red"}
        for role in sorted(set(roles)):
            mask = np.asarray([r == role for r in roles])
            c = colours.get(role, "tab:blue")
            if result.feature_norms is not None:
                axes[1].scatter(np.asarray(result.feature_norms)[mask], scores[mask], s=6, alpha=0.6, color=c,
                                label=role)
            axes[2].hist(scores[mask], bins=30, alpha=0.5, color=c, label=role)
        rho = diag.get("spearman_score_vs_feature_norm")
        axes[1].set_title("score vs feature norm" + (f" (Spearman {rho:.2f})" if rho is not None else " (no norms)"),
                          fontsize=9)
        axes[1].set_xlabel("feature norm", fontsize=8)
        axes[2].set_title("score histogram by role", fontsize=9)
        for ax in axes[1:]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
