"""The flow of the package, held: data goes inputs -> model -> drivers -> outputs -> CLI, and no module imports
from a later layer than its own (nor is there an import circle inside a layer). A new module must be given a
layer here; the README's Layout section shows the same table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qsim"

LAYERS = [
    ("vocabulary", {"codes", "errors", "units", "bitops", "safeio", "progress"}),
    ("rules", {"geometry", "cachecfg", "imageopts", "sizing", "scenario"}),
    ("inputs", {"trace", "synth", "traceio", "qcow2", "qcow2scan", "backing", "inspect", "libvirt"}),
    ("model", {"hostalloc", "imagestate", "stage1", "engine", "lru", "refcache", "image"}),
    ("drivers", {"replay", "sweep", "fleet", "qemu", "qemusystem", "validate", "knapsack", "plan", "capture", "qmp"}),
    ("outputs", {"tables", "plot"}),
    ("cli", {"cli", "__main__", "__init__"}),
]
LAYER_OF = {name: k for k, (_, names) in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    """Dotted names below qsim (``stage1.lookup``) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The qsim modules ``name`` imports (relative or absolute), anywhere in the file, as dotted names."""
    tree = ast.parse(path.read_text())
    package = name.split(".")[:-1] if not path.name == "__init__.py" else name.split(".")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("qsim"):
                target = node.module[5:]
            else:
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}".strip(".") if target else alias.name)
                found.add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qsim."):
                    found.add(alias.name[5:])
    return {f for f in found if f}


def _top(dotted: str) -> str:
    return dotted.split(".")[0]


def test_every_module_has_a_layer():
    missing = sorted({_top(m) for m in _modules()} - set(LAYER_OF) - {""})
    assert not missing, f"give these modules a layer in tests/test_layers.py (and the README's Layout): {missing}"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_reaches_back_up_the_flow(name):
    modules = _modules()
    own = LAYER_OF.get(_top(name))
    if own is None:
        pytest.skip("no layer (test_every_module_has_a_layer says so)")
    later = []
    for target in _imports(name, modules[name]):
        top = _top(target)
        if top in LAYER_OF and LAYER_OF[top] > own:
            later.append(f"{target} ({LAYERS[LAYER_OF[top]][0]})")
    assert not later, f"qsim.{name} ({LAYERS[own][0]}) imports from a later layer: {sorted(later)}"


def test_no_import_circle_between_top_level_modules():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        top = _top(name)
        graph.setdefault(top, set()).update(_top(t) for t in _imports(name, path) if _top(t) != top
                                            and _top(t) in LAYER_OF)
    graph.pop("__init__", None)
    for edges in graph.values():
        edges.discard("__init__")
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
