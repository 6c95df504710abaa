"""The accelerator extras of ``setup.py`` (``pip install -e ".[cuda12]"`` / ``".[tpu]"``) agree
with its jax pin.

``setup.py`` is parsed, not run. Offline: every ``jax*`` requirement of an extra is pinned to
the jax version of ``install_requires``, and the plugin / libtpu pins are the ones the installed
jax (when it is that version) declares for its own ``cuda12`` / ``tpu`` extras. Opt-in
(``NTK_JAX_NETWORK_TESTS=1``, needs the package index): the index serves each pinned accelerator
package for Linux x86_64 and Python 3.11 (``pip index versions``; ``pip install --dry-run``
would download the wheels, ~0.5 GB for these pins).
"""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATORS = ("cuda12", "tpu")


def setup_requirements() -> dict[str, list[Requirement]]:
    """``{"install": install_requires, <extra>: extras_require[extra], ...}`` of ``setup.py``."""
    with open(os.path.join(ROOT, "setup.py")) as fh:
        tree = ast.parse(fh.read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    reqs = {"install": kwargs["install_requires"], **kwargs["extras_require"]}
    return {name: [Requirement(r) for r in rs] for name, rs in reqs.items()}


def exact_version(req: Requirement) -> str:
    """The version of an ``==X`` requirement (AssertionError for anything else)."""
    (spec,) = req.specifier
    assert spec.operator == "==" and "*" not in spec.version, f"{req} is not pinned to one version"
    return spec.version


def jax_pin() -> str:
    (jax,) = [r for r in setup_requirements()["install"] if r.name == "jax"]
    return exact_version(jax)


def test_accelerator_extras_are_pinned_to_the_jax_pin():
    reqs, jax = setup_requirements(), jax_pin()
    for extra in ACCELERATORS:
        jax_reqs = [r for r in reqs[extra] if r.name.startswith("jax")]
        assert any(r.name == "jax" and extra in r.extras for r in jax_reqs), f"{extra}: jax[{extra}] missing"
        for r in jax_reqs:
            assert exact_version(r) == jax, f"{extra}: {r} differs from the jax pin {jax}"
    assert {r.name for r in reqs["cuda12"]} >= {"jax-cuda12-plugin", "jax-cuda12-pjrt"}
    assert "libtpu" in {r.name for r in reqs["tpu"]}


def declared_by_jax(extra: str) -> dict[str, Requirement]:
    """What the installed jax's own ``extra`` requires, by package name."""
    out = {}
    for line in importlib.metadata.requires("jax") or []:
        req = Requirement(line)
        if req.marker is not None and req.marker.evaluate({"extra": extra}):
            out[req.name] = req
    return out


@pytest.mark.parametrize("extra", ACCELERATORS)
def test_pins_match_what_jax_declares(extra):
    if importlib.metadata.version("jax") != jax_pin():
        pytest.skip(f"installed jax {importlib.metadata.version('jax')} is not the pinned {jax_pin()}")
    theirs = declared_by_jax(extra)
    for ours in setup_requirements()[extra]:
        if ours.name in theirs and ours.name != "jax":
            spec = theirs[ours.name].specifier
            assert ours.specifier == spec or spec.contains(exact_version(ours)), f"{ours} vs jax's {theirs[ours.name]}"


@pytest.mark.skipif(os.environ.get("NTK_JAX_NETWORK_TESTS", "") in ("", "0"),
                    reason="needs the package index; set NTK_JAX_NETWORK_TESTS=1")
@pytest.mark.parametrize("extra", ACCELERATORS)
def test_index_serves_the_pins(extra):
    for req in setup_requirements()[extra]:
        if req.name == "jax":
            continue
        proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", req.name, "--python-version", "3.11",
                               "--only-binary=:all:", "--platform", "manylinux_2_27_x86_64",
                               "--platform", "manylinux_2_31_x86_64"], capture_output=True, text=True, timeout=120)
        found = re.search(r"Available versions: (.*)", proc.stdout)
        assert found, f"{req.name}: {proc.stdout}{proc.stderr}"
        versions = [v.strip() for v in found.group(1).split(",")]
        assert any(req.specifier.contains(v) for v in versions), f"{req}: index has {versions[:10]}"
