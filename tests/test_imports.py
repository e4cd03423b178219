"""The package's imports: no cycle, and every import points down the layers of
docs/development.md (module-level and function-local imports alike, read with ``ast``)."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "sflam_jax")

# Top to bottom; a module imports its own layer or a lower one. A name ending in "." is a package
# prefix (every module under it).
LAYERS = (
    ("sflam_jax.main",),
    ("sflam_jax.train", "sflam_jax.sweep", "sflam_jax.plots"),
    ("sflam_jax.experiment",),
    ("sflam_jax.validation", "sflam_jax.checkpoint", "sflam_jax.config"),
    ("sflam_jax.algorithms.registry",),
    (
        "sflam_jax.algorithms.esfl",
        "sflam_jax.algorithms.fl",
        "sflam_jax.algorithms.ftte",
        "sflam_jax.algorithms.gsfl",
        "sflam_jax.algorithms.sfl",
        "sflam_jax.algorithms.sfl_v2",
        "sflam_jax.algorithms.sflam",
        "sflam_jax.algorithms.sfprompt",
        "sflam_jax.algorithms.sl",
    ),
    ("sflam_jax.engine", "sflam_jax.events", "sflam_jax.streaming"),
    ("sflam_jax.algorithms.base", "sflam_jax.algorithms.sparse", "sflam_jax.sharding"),
    ("sflam_jax.allocation", "sflam_jax.wireless", "sflam_jax.models", "sflam_jax.data"),
    ("sflam_jax.quant", "sflam_jax.metrics", "sflam_jax.fields", "sflam_jax.streams"),
    ("sflam_jax.errors",),
)


def _modules() -> dict[str, str]:
    root = os.path.abspath(os.path.join(PACKAGE, ".."))
    out = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[module.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file."""
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for a in node.names:
                    # ``from pkg import module`` imports the module; ``from module import name``
                    # the module.
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[module] = {m for m in found if m in modules and m != module}
    return graph


def _layer(module: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for name in layer:
            # The longest matching name decides (algorithms.base before algorithms).
            inside = module == name or module.startswith(name + ".")
            if inside and (best is None or len(name) > best[1]):
                best = (i, len(name))
    if best is None:
        pytest.fail(f"{module} is in no layer of tests/test_imports.py (add it)")
    return best[0]


def _cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return path[path.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_finds_a_cycle_and_an_upward_import():
    """The checks themselves, on a hand-made graph."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert _layer("sflam_jax.algorithms.base") > _layer("sflam_jax.algorithms.registry")
    assert _layer("sflam_jax.allocation.pgd") > _layer("sflam_jax.engine")


def test_no_import_cycle():
    cycle = _cycle(_imports(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    graph = _imports(_modules())
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m in sorted(graph)
        for d in sorted(graph[m])
        if _layer(d) < _layer(m)
    ]
    assert not upward, "\n".join(upward)
