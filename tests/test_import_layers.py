"""The package's modules import each other without a cycle (every import counts: top-level and inside functions,
except `if TYPE_CHECKING:` blocks), and the reference loop does not import the engine."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import sglang_ams

PACKAGE = "sglang_ams"


def _package_files() -> dict[str, Path]:
    """module name -> file, for sglang_ams and the subpackages it maps in (kernels, patches) wherever they live."""
    root = Path(sglang_ams.__file__).parent
    roots = {PACKAGE: root}
    for sub in ("kernels", "patches"):
        spec = importlib.util.find_spec(f"{PACKAGE}.{sub}")
        if spec and spec.submodule_search_locations:     # (a link to the top-level folder in a checkout)
            roots[f"{PACKAGE}.{sub}"] = Path(list(spec.submodule_search_locations)[0]).resolve()
    files = {}
    for prefix, base in roots.items():
        for path in base.rglob("*.py"):
            parts = [p for p in path.relative_to(base).with_suffix("").parts if p != "__init__"]
            if prefix == PACKAGE and parts and parts[0] in ("kernels", "patches"):
                continue        # walked from their own root above
            files[".".join([prefix, *parts])] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
    """Every module name an import statement names (relative ones resolved), TYPE_CHECKING blocks skipped."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    files = _package_files()
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        named = _imports(tree, module, path.name == "__init__.py")
        graph[module] = {m for m in named if m in files and m != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


# patches/scheduler.py's init hook verifies every hook of its process, and the hook lists live in
# patches/__init__.py, which imports the scheduler's: left to the scheduler-state rework (issue 17 item 5).
ALLOWED = [{"sglang_ams.patches", "sglang_ams.patches.scheduler"}]


def test_graph_sees_the_package():
    graph = import_graph()
    assert {"sglang_ams.config", "sglang_ams.scorers.base", "sglang_ams.engine.compactor",
            "sglang_ams.kernels.scoring", "sglang_ams.patches.mem_cache"} <= set(graph)
    assert "sglang_ams.scorers.base" in graph["sglang_ams.scorers.snapkv"]


def test_cycles_finds_them():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert sorted(map(sorted, cycles(graph))) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    found = [c for c in cycles(import_graph()) if c not in ALLOWED]
    assert not found, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_reference_loop_does_not_import_the_engine():
    graph = import_graph()
    assert not {m for m in graph["sglang_ams.reference"] if m.startswith("sglang_ams.engine")}
