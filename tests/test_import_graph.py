"""Dependencies run one way (docs/README.md): ``utils``, ``stats``, ``mesh`` → ``data``, ``kernels`` →
``models`` → ``training`` → ``selection`` → ``launcher`` (→ ``experiments``, which the library
never imports). Parsed from the source (every ``import`` / ``from … import``, also inside
functions), so a lazy import cannot hide an upward dependency; and no import cycle between
modules."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"utils": 0, "stats": 0, "mesh": 0, "data": 1, "kernels": 1, "models": 2, "training": 3, "selection": 4,
          "launcher": 5}
# the package and the entry point sit on top
TOP = {"ntk_jax", "ntk_jax.main"}


def _modules():
    out = {}
    for root, _, files in os.walk(os.path.join(ROOT, "ntk_jax")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return out


def _imports(path, modules):
    """The ntk_jax modules ``path`` imports (``from pkg import name`` counts as ``pkg.name``
    when that is a module; imports under ``if TYPE_CHECKING:`` do not count)."""
    found = set()
    tree = ast.parse(open(path).read())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}  # annotations only, never run
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("ntk_jax", "experiments")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in ("ntk_jax", "experiments"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return found


def _layer(mod):
    parts = mod.split(".")
    return None if mod in TOP or len(parts) < 2 else LAYERS.get(parts[1])


def test_no_upward_imports():
    modules = _modules()
    bad = []
    for mod, path in sorted(modules.items()):
        src = _layer(mod)
        for dst in sorted(_imports(path, modules)):
            if dst.split(".")[0] == "experiments":
                bad.append(f"{mod} -> {dst} (the library never imports experiments)")
            elif src is not None and _layer(dst) is not None and _layer(dst) > src:
                bad.append(f"{mod} (layer {src}) -> {dst} (layer {_layer(dst)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)
    assert set(LAYERS) >= {m.split(".")[1] for m in modules if m.count(".") >= 1 and m not in TOP}, \
        "a new package of ntk_jax needs a layer in LAYERS"


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {d for d in _imports(p, modules) if d in modules and d != m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is not a cycle of concepts
    graph = {m: {d for d in ds if not d.startswith(m + ".")} for m, ds in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_selection_method_imports_another():
    """Selection methods are plug-ins (``ntk_jax/selection/methods/<name>.py``): what two methods
    share lives outside ``methods/`` (e.g. ``selection/embeddings.py``,
    ``selection/optimizer_state.py``); a method imports only the registry package itself."""
    modules = _modules()
    pkg = "ntk_jax.selection.methods"
    methods = {m for m in modules if m.startswith(pkg + ".")}
    bad = [f"{m} -> {d}" for m in sorted(methods) for d in sorted(_imports(modules[m], modules)) if d in methods and d != m]
    assert not bad, "a selection method imports another method:\n" + "\n".join(bad)
