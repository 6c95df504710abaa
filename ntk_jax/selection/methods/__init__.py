"""Selection methods as plug-ins: one module per method (big_vision's ``import_module``
pattern). A new method is one new file here plus, if it has settings, its config.

A method module ``ntk_jax/selection/methods/<name>.py`` defines:

* ``select(job: SelectionJob) -> Selection`` (required): runs the method's own stages
  through the :class:`~ntk_jax.selection.jobs.SelectionJob` it is handed (warm-up, resumable
  score stores, barriers, timings) and returns the chosen pool indices, best first;
* ``config() -> ml_collections.ConfigDict`` (optional): its settings, which become the
  ``config.select.<name>`` section (``experiments/select.py:config``);
* ``PRESETS: dict[str, dict]`` (optional): named settings, as overrides of the ``select``
  section with dotted keys (``{"ntk.output": "loss", "ntk.filter_factor": 0}``); a comparison arm
  ``"<name>@<preset>"`` runs the method with them (:func:`apply_preset`);
* ``check_config(cfg: dict)`` (optional): raises ``ValueError`` naming a bad setting before
  anything runs.

The runner (:func:`ntk_jax.selection.jobs.run_selection`) does the validation, the
atomic writing of ``selected.jsonl`` / ``all_scores.npz`` and the diagnostics.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import importlib
import pkgutil
from types import ModuleType
from typing import Any, Callable

import numpy as np

__all__ = ["Selection", "Method", "method_names", "get_method", "apply_preset", "apply_overrides", "set_dotted",
           "split_arm", "arm_settings"]


@dataclasses.dataclass
class Selection:
    """What a method returns.

    Attributes:
      chosen: ``(N,)`` pool indices, best first.
      scored: ``(m,)`` pool indices of the candidates that got a score (``None``: none).
      scores: ``(m,)`` their scores (higher = better).
      feature_norms: ``(m,)`` the norm of each scored candidate's feature / gradient, where the
        method has one (diagnostics: does the score follow the norm?).
      arrays: further per-scored-candidate arrays for ``all_scores.npz`` (e.g. kNN votes).
    """

    chosen: np.ndarray
    scored: np.ndarray | None = None
    scores: np.ndarray | None = None
    feature_norms: np.ndarray | None = None
    arrays: dict = dataclasses.field(default_factory=dict)

    def report_arrays(self, pool: list[dict]) -> dict[str, np.ndarray]:
        """``all_scores.npz`` contents: ``ids`` of the scored candidates, ``scores``,
        ``feature_norms`` (if any) and :attr:`arrays`."""
        out = {"ids": np.asarray([str(pool[int(i)]["id"]) for i in self.scored])}
        if self.scores is not None:
            out["scores"] = np.asarray(self.scores)
        if self.feature_norms is not None:
            out["feature_norms"] = np.asarray(self.feature_norms)
        out.update({k: np.asarray(v) for k, v in self.arrays.items()})
        return out


@dataclasses.dataclass(frozen=True)
class Method:
    """A loaded method module: ``select``, ``check_config``, ``config``, ``presets``."""

    name: str
    module: ModuleType
    select: Callable
    check_config: Callable[[dict], None]
    config: Callable | None
    presets: dict


def method_names() -> tuple[str, ...]:
    """The methods present: every module of this package (sorted)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def get_method(name: str) -> Method:
    """The method ``name`` (``ValueError`` naming the known ones if there is no such module)."""
    names = method_names()
    if name not in names:
        raise ValueError(f"unknown selection method {name!r}; choose one of {names}")
    module = importlib.import_module(f"{__name__}.{name}")
    if not callable(getattr(module, "select", None)):
        raise TypeError(f"selection method module {module.__name__} defines no select(job)")
    return Method(name=name, module=module, select=module.select,
                  check_config=getattr(module, "check_config", lambda cfg: None),
                  config=getattr(module, "config", None), presets=dict(getattr(module, "PRESETS", {})))


def split_arm(arm: str) -> tuple[str, str | None]:
    """``"ntk@paper"`` → ``("ntk", "paper")``; ``"less"`` → ``("less", None)``; settings in
    brackets stay out (``"ntk@paper[warmup.total_steps=80]"`` → ``("ntk", "paper")``)."""
    name, _, preset = str(arm).partition("[")[0].partition("@")
    return name, (preset or None)


def arm_settings(arm: str) -> dict:
    """The settings an arm names in brackets after its method (and preset), applied on top of
    the preset: ``"ntk[warmup.total_steps=120,ntk.filter_factor=8]"`` →
    ``{"warmup.total_steps": 120, "ntk.filter_factor": 8}`` (values are Python literals; a bare
    word is a string). ``ValueError`` naming a malformed setting."""
    arm = str(arm)
    if "[" not in arm:
        return {}
    body = arm.partition("[")[2]
    if not body.endswith("]") or not body[:-1].strip():
        raise ValueError(f"arm {arm!r}: settings go in one bracket at the end, e.g. 'ntk[warmup.total_steps=120]'")
    out = {}
    for item in body[:-1].split(","):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"arm {arm!r}: setting {item!r} is not key=value")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out[key.strip()] = value
    return out


def set_dotted(cfg, key: str, value: Any) -> None:
    """``cfg[a][b]...[leaf] = value`` for ``key = "a.b....leaf"`` in a nested dict or
    ``ConfigDict``; ``KeyError`` if a section or the field does not exist (nothing is created)."""
    *parents, leaf = key.split(".")
    d = cfg
    for p in parents:
        if p not in d or not hasattr(d[p], "keys"):
            raise KeyError(key)
        d = d[p]
    if leaf not in d:
        raise KeyError(key)
    d[leaf] = value


def apply_overrides(cfg, overrides: dict) -> None:
    """Sets every ``{dotted key: value}`` of ``overrides`` (e.g. a preset) in ``cfg`` in place
    (:func:`set_dotted`); ``ValueError`` naming a key the config does not have."""
    for key, value in overrides.items():
        try:
            set_dotted(cfg, key, copy.deepcopy(value))
        except KeyError:
            raise ValueError(f"setting {key!r}: the select config has no such field") from None


def apply_preset(select_cfg: dict, arm: str) -> dict:
    """A copy of the plain ``select`` section set up for ``arm`` (``"<method>"``,
    ``"<method>@<preset>"``, either followed by ``[key=value,...]``, :func:`arm_settings`):
    ``method`` set, the preset's overrides applied, then the arm's settings. ``ValueError`` for
    an unknown method or preset, or a key the section does not have."""
    name, preset = split_arm(arm)
    method = get_method(name)
    cfg = copy.deepcopy(select_cfg)
    cfg["method"] = name
    if preset is not None:
        if preset not in method.presets:
            raise ValueError(f"method {name!r} has no preset {preset!r}; presets: {sorted(method.presets)}")
        try:
            apply_overrides(cfg, method.presets[preset])
        except ValueError as e:
            raise ValueError(f"preset {arm!r}: {e}") from None
    try:
        apply_overrides(cfg, arm_settings(arm))
    except ValueError as e:
        raise ValueError(f"arm {arm!r}: {e}") from None
    return cfg
