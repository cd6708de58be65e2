"""The package's layers: an import only ever points down (or sideways, within a layer), and no import circle.

Layers, bottom up (DESIGN.md): types and config files; algorithms, engines, oracles, data, logging (and the
process set-up); learner, exploration, eval; loops; recipes (and the quickstart); cli (and old import paths
kept for one release). Every `import` counts, at module level or inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "winnow"

LAYERS = [
    ["winnow.types", "winnow.config", "winnow"],
    ["winnow.algorithms", "winnow.engines", "winnow.oracles", "winnow.data", "winnow.logging", "winnow.setup",
     "winnow.envs"],
    ["winnow.learner", "winnow.exploration", "winnow.eval"],
    ["winnow.loops", "winnow.distributed"],
    ["winnow.recipes", "winnow.quickstart"],
    ["winnow.cli", "winnow.runtime"],
]


def layer_of(module: str) -> int:
    """The layer of a module: that of the longest listed prefix."""
    best, level = "", None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, level = name, i
    if level is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")
    return level


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The winnow modules `path` imports (absolute, resolved from relative imports; submodules when named), and
    those it imports on first use (`lazy_import("winnow....")`, `lazy_function("winnow....", name)`)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from winnow.x import y`: y may be a submodule
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _exists(candidate) else base)
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("lazy_import", "lazy_function")
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
    return {name for name in found if name == "winnow" or name.startswith("winnow.")}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return [f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
            for src, targets in sorted(edges.items()) for dst in sorted(targets) if layer_of(dst) > layer_of(src)]


def import_circles(edges: dict[str, set[str]]) -> list[str]:
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt == node or nxt not in edges:
                continue
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return circles


def test_no_import_points_up():
    upward = upward_imports(graph())
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_circle():
    circles = import_circles(graph())
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checker_finds_what_it_must():
    # relative and function-level imports are read: learner/batch.py imports winnow.types
    assert "winnow.types" in imports(PACKAGE / "learner" / "batch.py")
    assert layer_of("winnow.loops.rl") == 3 and layer_of("winnow.recipes.rl") == 4 and layer_of("winnow.types") == 0
    made_up = {"winnow.learner.a": {"winnow.loops.b"}, "winnow.loops.b": {"winnow.learner.a", "winnow.types"},
               "winnow.types": set()}
    assert upward_imports(made_up) == ["winnow.learner.a (layer 2) imports winnow.loops.b (layer 3)"]
    assert import_circles(made_up) == ["winnow.learner.a -> winnow.loops.b -> winnow.learner.a"]
