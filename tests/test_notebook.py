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
