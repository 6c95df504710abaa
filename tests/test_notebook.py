"""The walkthrough notebook executes top to bottom as a real notebook (jupytext → nbclient)."""
import os

import jupytext
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_walkthrough_notebook_runs(tmp_path):
    nb = jupytext.read(os.path.join(ROOT, "notebooks", "ntk_walkthrough.py"))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "blocked (5×5 blocks) equal: True" in outputs
    assert "max rel diff vs jacobian" in outputs
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.slow
def test_selection_notebook_runs(tmp_path):
    """The selection walkthrough runs as a notebook; its selectors beat the pool's base rate
    (random does not need to) and the chosen records come back in the pool's own layout."""
    import re

    nb = jupytext.read(os.path.join(ROOT, "notebooks", "selection_walkthrough.py"))
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    found = dict(re.findall(r"^(\w+(?:@\w+)?)\s+precision@N ([0-9.]+)", outputs, flags=re.M))
    assert set(found) == {"random", "embedding", "ntk", "ntk@paper"}, outputs
    base = float(re.search(r"useful share ([0-9.]+)", outputs).group(1))
    assert all(float(found[m]) >= 2.5 * base for m in ("embedding", "ntk", "ntk@paper")), found
    assert "layouts read: {'domain': {'sharegpt': 32}, 'pool': {'sharegpt': 640}}" in outputs
    assert "best record: {'id': 'pool-" in outputs and "'conversations'" in outputs
