"""The code's shape, checked statically (nothing imported or run): no import cycles among the project's modules,
counting imports inside functions; dependencies point one way (cli -> server/clients -> engine); no module takes
another module's private (_underscore) names; no module over 500 lines except generated code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cloak", "server", "clients")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            if "gen" in rel.parts:  # generated protobuf code
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _project(name: str) -> str | None:
    """The project module an import names (the longest known prefix), or None for a third-party one."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in MODULES:
            return cand
    return None


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported project module, imported name or None) for every import statement, at any depth."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(m, None) for a in node.names if (m := _project(a.name))]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                sub = _project(f"{target}.{a.name}")
                if sub is not None and sub != target and sub.startswith(target + "."):
                    out.append((sub, None))  # `from pkg import submodule`
                elif (m := _project(target)) is not None:
                    out.append((m, a.name))
    return out


GRAPH = {m: sorted({t for t, _ in _imports(m) if t != m}) for m in MODULES}


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _package_of(module: str) -> str:
    return module.split(".")[0]


def test_the_checker_sees_a_cycle_and_imports_inside_functions():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []
    # an import inside a function counts (the evaluation loads the attacker's pipeline where it clones)
    assert "cloak.clone" in GRAPH["cloak.evaluate.run"]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_dependencies_point_one_way():
    """The engine imports neither the server nor the clients; the server does not import the clients."""
    allowed = {"cloak": {"cloak"}, "server": {"server", "cloak"}, "clients": {"clients", "server", "cloak"}}
    wrong = [(m, t) for m, targets in GRAPH.items() for t in targets
             if _package_of(t) not in allowed[_package_of(m)]]
    assert wrong == []


def test_no_module_takes_another_modules_private_names():
    taken = [(m, t, n) for m in MODULES for t, n in _imports(m)
             if n is not None and n.startswith("_") and not n.startswith("__") and t != m]
    assert taken == []


def test_no_module_is_over_500_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
