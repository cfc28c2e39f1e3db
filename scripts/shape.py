"""Print the shape of coloproxy/: the largest files and classes, and the import cycles.

    python3 scripts/shape.py [REPO_ROOT]

Reads the source with ``ast`` (imports nothing). Cycles are listed twice: among module-level
imports only (what Python would trip over), and counting imports inside functions too (what a
reader trips over: a cycle hidden by a late import is still a cycle). Imports under
``if TYPE_CHECKING:`` do not count. The closing note of issue #15 gives these figures before
and after the reshape; docs/architecture.md says what the modules are.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

TOP = 10


def modules(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted((root / "coloproxy").rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imported(module: str, path: Path, node: ast.AST, known: dict[str, Path]) -> list[str]:
    """The coloproxy modules one import statement names (``from a import b`` names a.b too,
    when b is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            if path.name != "__init__.py":
                parts = parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    else:
        return []
    return [name for name in names if name in known and name != module]


def _type_checking_only(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _top_level(tree: ast.Module) -> Iterable[ast.AST]:
    """Statements run at import time: the module body, into if/try blocks, not into defs."""
    pending: list[ast.stmt] = [n for n in tree.body if not _type_checking_only(n)]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.If | ast.Try):
            for block in (node.body, node.orelse, getattr(node, "finalbody", [])):
                pending.extend(n for n in block if not _type_checking_only(n))
            for handler in getattr(node, "handlers", []):
                pending.extend(handler.body)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def main(root: Path) -> None:
    known = modules(root)
    files: list[tuple[int, str]] = []
    classes: list[tuple[int, str]] = []
    top_graph: dict[str, set[str]] = {name: set() for name in known}
    all_graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        source = path.read_text()
        rel = str(path.relative_to(root))
        files.append((len(source.splitlines()), rel))
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                end = node.end_lineno or node.lineno
                classes.append((end - node.lineno + 1, f"{rel}:{node.name}"))
            all_graph[name].update(imported(name, path, node, known))
        for node in _top_level(tree):
            top_graph[name].update(imported(name, path, node, known))
    print(f"modules: {len(known)}, lines: {sum(n for n, _ in files)}")
    print("largest files:")
    for lines, rel in sorted(files, reverse=True)[:TOP]:
        print(f"  {lines:5d} {rel}")
    print("largest classes:")
    for lines, label in sorted(classes, reverse=True)[: TOP - 2]:
        print(f"  {lines:5d} {label}")
    for label, graph in (
        ("module-level", top_graph),
        ("including imports inside functions", all_graph),
    ):
        found = cycles(graph)
        print(f"import cycles ({label}): {len(found)}")
        for component in found:
            print("    " + " <-> ".join(component))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
