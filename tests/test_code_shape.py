"""The experiments stay plug-ins made of stages: no function in ``experiments/`` is longer than
80 lines (a job's ``run`` calls its stages; a hub that does everything fails here)."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 80


def long_functions(paths, limit=MAX_LINES):
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_in_experiments_is_longer_than_80_lines():
    paths = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))
    assert paths
    assert not long_functions(paths), long_functions(paths)


def test_the_check_sees_a_long_function(tmp_path):
    path = tmp_path / "hub.py"
    path.write_text("def run():\n" + "    x = 1\n" * 85)
    assert long_functions([str(path)]) == [f"{os.path.relpath(str(path), ROOT)}:1 run (86 lines)"]
