"""The pure core imports no I/O (STYLE rule 1), directly or through other coloproxy modules.

Walks the source of every pure module with ``ast`` (nothing is imported or executed) and
fails, naming the module and the import, if one reaches an I/O or shell library. Imports of
other coloproxy modules are followed, so ``compare`` importing a module that imports ``yaml``
fails too. Every listed path must exist (test_every_listed_pure_path_exists): a module that
moves takes its entry with it, so the list cannot name what is gone. docs/architecture.md's
module table marks the same modules pure.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "coloproxy"

# Directories, single modules and globs (relative to the repository) that must stay pure.
PURE_PATHS = [
    "coloproxy/packet",
    "coloproxy/compare",
    "coloproxy/rewrite",
    "coloproxy/protocol",
    "coloproxy/seq.py",
    "coloproxy/role.py",
    "coloproxy/report.py",
    "coloproxy/errors.py",
    "coloproxy/engine/scheduler.py",
    "coloproxy/engine/heartbeat.py",
    "coloproxy/engine/decider.py",
    "coloproxy/engine/leader.py",
    "coloproxy/net/rules.py",
    "coloproxy/capture/netlink_codec.py",
    "coloproxy/daemon/primary.py",
    "coloproxy/daemon/secondary.py",
]

# The package root runs first, before any pure module: it reads the variant switch
# (COLOPROXY_PURE, coloproxy/variant.py) and nothing else. The walk does not follow it;
# test_the_package_root_only_reads_the_variant_switch holds it to that.
PACKAGE_ROOT = Path("coloproxy/__init__.py")
PACKAGE_ROOT_IMPORTS = {"os", "coloproxy", "coloproxy.variant"}

FORBIDDEN = frozenset(
    {
        "asyncio",
        "socket",
        "selectors",
        "ssl",
        "subprocess",
        "threading",
        "time",
        "os",
        "netfilterqueue",
        "qemu",
        "prometheus_client",
        "yaml",
        "scapy",
        "uvloop",
        "pyroute2",
    }
)


def pure_modules(root: Path = ROOT) -> list[Path]:
    found: set[Path] = set()
    for entry in PURE_PATHS:
        for path in root.glob(entry):
            if path.is_dir():
                found.update(path.rglob("*.py"))
            elif path.suffix == ".py":
                found.add(path)
    return sorted(found)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import statement, however deeply nested, and
    for ``__import__("x")`` / ``importlib.import_module("x")`` with a constant name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            # "from coloproxy import seq" names a submodule: follow it as well.
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else None
            if isinstance(function, ast.Name):
                name = function.id
            argument = node.args[0]
            if name in ("__import__", "import_module") and isinstance(argument, ast.Constant):
                found.append((node.lineno, str(argument.value)))
    return found


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """Forbidden imports reachable from ``path``, each with the chain that reaches it.

    Imports under ``if TYPE_CHECKING:`` count too: a pure module has no business naming shell
    types either."""
    problems: list[str] = []
    seen: set[Path] = set()
    pending: list[tuple[Path, str]] = [(path, module_name(path, root))]
    while pending:
        current, chain = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for line, name in imports_of(current, root):
            top = name.split(".")[0]
            where = f"{current.relative_to(root)}:{line}"
            if top in FORBIDDEN:
                problems.append(f"{chain} imports {name} ({where})")
            elif top == "coloproxy":
                target = module_path(name, root)
                if target == root / PACKAGE_ROOT:
                    continue  # start-up, not the pure core: checked on its own below
                if target is not None and target not in seen:
                    pending.append((target, f"{chain} -> {module_name(target, root)}"))
    return sorted(set(problems))


def test_the_package_root_only_reads_the_variant_switch() -> None:
    names = {name for _, name in imports_of(ROOT / PACKAGE_ROOT, ROOT)}
    assert names <= PACKAGE_ROOT_IMPORTS, names - PACKAGE_ROOT_IMPORTS


@pytest.mark.parametrize("entry", PURE_PATHS)
def test_every_listed_pure_path_exists(entry: str) -> None:
    assert list(ROOT.glob(entry)), f"{entry} is listed as pure but does not exist"


def test_the_pure_list_finds_the_packet_layer() -> None:
    """If the walk found nothing, the test below would pass vacuously."""
    names = {module_name(path) for path in pure_modules()}
    assert {"coloproxy.packet.parse", "coloproxy.packet.checksum", "coloproxy.seq"} <= names


@pytest.mark.parametrize("path", pure_modules(), ids=module_name)
def test_pure_module_imports_no_io(path: Path) -> None:
    problems = violations(path)
    for problem in problems:
        print(problem)
    assert not problems, "pure module reaches I/O:\n" + "\n".join(problems)


def test_the_checker_catches_direct_relative_and_transitive_imports(tmp_path: Path) -> None:
    """The checker itself must be able to fail."""
    tree = tmp_path / "coloproxy"
    (tree / "core").mkdir(parents=True)
    (tree / "__init__.py").write_text("")
    (tree / "core" / "__init__.py").write_text("")
    (tree / "core" / "direct.py").write_text("import os.path\n")
    (tree / "core" / "nested.py").write_text("def f():\n    from asyncio import sleep\n")
    (tree / "core" / "dynamic.py").write_text("import importlib\nimportlib.import_module('yaml')\n")
    (tree / "core" / "relative.py").write_text("from . import shell\n")
    (tree / "core" / "shell.py").write_text("import socket\n")
    (tree / "core" / "clean.py").write_text("import struct\nfrom coloproxy.core import clean\n")
    found = {
        name: violations(tree / "core" / f"{name}.py", tmp_path)
        for name in ("direct", "nested", "dynamic", "relative", "clean")
    }
    assert found["direct"] == ["coloproxy.core.direct imports os.path (coloproxy/core/direct.py:1)"]
    assert found["nested"][0].startswith("coloproxy.core.nested imports asyncio")
    assert found["dynamic"][0].startswith("coloproxy.core.dynamic imports yaml")
    assert found["relative"] == [
        "coloproxy.core.relative -> coloproxy.core.shell imports socket (coloproxy/core/shell.py:1)"
    ]
    assert found["clean"] == []
