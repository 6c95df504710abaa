"""One public path per name: every function, class or constant of ``ntk_jax`` is imported from
the module that defines it (``from ntk_jax.kernels.ntk import empirical_ntk``). No module of
``ntk_jax`` (or ``experiments``) re-exports another's names, so no name is reachable at two
addresses. Parsed from the source (no imports of the library)."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("ntk_jax", "experiments")
USERS = ("ntk_jax", "experiments", "configs", "benchmarks", "tests", "notebooks")


def _files(dirs):
    for d in dirs:
        for root, dirnames, files in os.walk(os.path.join(ROOT, d)):
            dirnames[:] = [x for x in dirnames if x != "__pycache__"]
            for f in sorted(files):
                if f.endswith(".py"):
                    yield os.path.join(root, f)


def _module_name(path):
    mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return mod[:-len(".__init__")] if mod.endswith(".__init__") else mod


def _library():
    return {_module_name(p): p for p in _files(LIBRARY)}


def _typing_only(tree):
    return {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
            and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
            for stmt in block.body for n in ast.walk(stmt)}


def _top_level(tree):
    """Statements run at import time (module body, also inside top-level if / try blocks)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]


def _bindings(path, modules):
    """(names the module defines, names it imports from the library, names in ``__all__``)."""
    tree = ast.parse(open(path).read())
    typing = _typing_only(tree)
    defined, imported, exported = set(), {}, set()
    for node in _top_level(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names = {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
                if names == {"__all__"} and isinstance(node.value, (ast.List, ast.Tuple)):
                    exported |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
                defined |= names
        elif isinstance(node, ast.ImportFrom) and id(node) not in typing and node.module \
                and node.level == 0 and node.module.split(".")[0] in LIBRARY:
            for a in node.names:
                if a.name == "*" or f"{node.module}.{a.name}" not in modules:
                    imported[a.asname or a.name] = (node.module, a.name)
    return tree, defined, imported, exported


def test_no_module_reexports_names_of_another():
    """A name a module imports from the library is used there (not only passed on), no module
    star-imports the library, and ``__all__`` lists only names the module defines."""
    modules = _library()
    problems = []
    for mod, path in sorted(modules.items()):
        tree, defined, imported, exported = _bindings(path, modules)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        for local, (src, name) in sorted(imported.items()):
            if name == "*":
                problems.append(f"{mod}: `from {src} import *`")
            elif local not in used:
                problems.append(f"{mod}: re-exports {src}.{name} (imported, never used)")
        problems += [f"{mod}: __all__ lists {n}, defined elsewhere" for n in sorted(exported - defined)]
    assert not problems, "re-exports (import the name from the module that defines it):\n" + "\n".join(problems)


def test_every_import_names_the_defining_module():
    """Every ``from ntk_jax.x import name`` and ``x.name`` (``x`` an imported library module), in
    the library, experiments, configs, benchmarks, notebooks and tests, reaches ``name`` where it
    is defined, never through a module that imported it."""
    modules = _library()
    bindings = {m: _bindings(p, modules)[1:3] for m, p in modules.items()}
    problems = []
    for path in _files(USERS):
        tree = ast.parse(open(path).read())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in modules})
            elif isinstance(node, ast.ImportFrom) and node.module in modules and node.level == 0:
                defined, imported = bindings[node.module]
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if sub in modules:
                        aliases[a.asname or a.name] = sub
                    elif a.name != "*" and a.name not in defined:
                        problems.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {sub} is not defined there")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                mod = aliases[node.value.id]
                defined, imported = bindings[mod]
                if node.attr in imported and node.attr not in defined:
                    problems.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {mod}.{node.attr} is imported "
                                    f"there from {imported[node.attr][0]}")
    assert not problems, "names reached through a second path:\n" + "\n".join(problems)
