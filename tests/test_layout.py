"""The package layout: no import cycles, imports point down the layers, a small top level."""
from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import torchkeep

SRC = pathlib.Path(torchkeep.__file__).parent

# Lowest first. A module may import its own layer and the layers below it, never above.
LAYERS = [
    {"errors", "version", "limits"},
    {"store"},
    {"read"},
    {"carry", "shape"},
    {"keep"},
    {"look"},
    {"cli", "demo", "integrations", "__main__", ""},
]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """Every torchkeep module ``name`` imports, at any depth of the file (lazy imports count)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name}


# Pairs of subpackages with no arrow between them, on top of the layer order.
FORBIDDEN = {("look", "keep")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module}: its subpackage {top!r} is in no layer of this test")


def test_every_module_belongs_to_a_layer():
    for module in _graph():
        _layer(module)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []
    for root in graph:
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_point_down_the_layers():
    upward = [f"{a} -> {b}" for a, deps in _graph().items() for b in deps
              if a != "torchkeep" and _layer(b) > _layer(a)]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_forbidden_arrows():
    def top(m: str) -> str:
        return m.split(".")[1] if "." in m else ""
    bad = [f"{a} -> {b}" for a, deps in _graph().items() for b in deps
           if (top(a), top(b)) in FORBIDDEN]
    assert not bad, "\n".join(sorted(bad))


def test_top_level_is_small_and_every_name_resolves():
    assert len(torchkeep.__all__) <= 30
    for name in torchkeep.__all__:
        assert getattr(torchkeep, name) is not None, name
    # the verbs stay functions even after their defining modules are imported
    importlib.import_module("torchkeep.carry.planner")
    importlib.import_module("torchkeep.look.conversion")
    assert callable(torchkeep.transfer) and callable(torchkeep.convert)
    assert not isinstance(torchkeep.transfer, type(torchkeep))


@pytest.mark.parametrize("name", ["nope", "Migration"])
def test_unknown_top_level_names_raise_attribute_error(name):
    with pytest.raises(AttributeError):
        getattr(torchkeep, name)
