"""The error tree drawn in coloproxy/errors.py's docstring is the code's: every exception
class defined anywhere in coloproxy/ is drawn, under its real base, in its real module; the
internal signals are plain Exceptions outside the tree. Walks the package by importing
every module, so a class added or moved without its line in the drawing fails here."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass

import coloproxy
from coloproxy import errors
from coloproxy.errors import ColoproxyError

# "<tree drawing><name>  <module under coloproxy.>  <what>"
LINE = re.compile(r"^(?P<drawing> {4}[ |+-]*)(?P<name>\w+) {2,}(?P<module>[\w.]+) {2,}\S")
INDENT = 4  # the root's column
STEP = 5  # columns per level: " +-- " and " |   "


@dataclass(frozen=True)
class Drawn:
    name: str
    module: str
    parent: str | None  # None: the root, or an internal signal (a plain Exception)


def drawn() -> tuple[dict[str, Drawn], dict[str, Drawn]]:
    """(the tree, the internal signals) as the docstring draws them."""
    doc = errors.__doc__ or ""
    tree_text, _, internal_text = doc.partition("Internal signals")
    tree: dict[str, Drawn] = {}
    path: list[str] = []  # the names from the root down to the line before
    for line in tree_text.splitlines():
        match = LINE.match(line)
        if match is None:
            continue
        depth, rest = divmod(len(match["drawing"]) - INDENT, STEP)
        assert rest == 0 and depth <= len(path), f"the drawing is off at: {line!r}"
        del path[depth:]
        name = match["name"]
        assert name not in tree, f"{name} is drawn twice"
        tree[name] = Drawn(name, f"coloproxy.{match['module']}", path[-1] if path else None)
        path.append(name)
    internal = {}
    for line in internal_text.splitlines():
        match = LINE.match(line)
        if match is not None:
            name = match["name"]
            internal[name] = Drawn(name, f"coloproxy.{match['module']}", None)
    return tree, internal


def defined() -> dict[str, type[BaseException]]:
    """Every exception class defined in a coloproxy module, by name."""
    found: dict[str, type[BaseException]] = {}
    modules = [coloproxy.__name__] + [
        info.name
        for info in pkgutil.walk_packages(coloproxy.__path__, "coloproxy.")
        if not info.name.endswith(".__main__")  # runs the command line when imported
    ]
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module_name
            ):
                other = found.setdefault(name, value)
                assert other is value, f"two exceptions named {name}: {other} and {value}"
    return found


def test_the_tree_is_parsed() -> None:
    """The parser reads the drawing (so the checks below check something)."""
    tree, internal = drawn()
    assert tree["ColoproxyError"] == Drawn("ColoproxyError", "coloproxy.errors", None)
    assert tree["ConfigError"].parent == "InputError"
    assert tree["QemuGoneError"].parent == "QmpError"
    assert tree["PeerError"].parent == "EngineError"
    assert "BadValueError" in internal
    assert len(tree) >= 20


def test_every_exception_class_is_drawn() -> None:
    tree, internal = drawn()
    classes = defined()
    assert sorted(set(classes) - set(tree) - set(internal)) == [], "not drawn in errors.py"
    assert sorted(set(tree) | set(internal)) == sorted(classes), "drawn but not in the code"
    assert not set(tree) & set(internal)


def test_the_tree_is_the_code() -> None:
    tree, _ = drawn()
    classes = defined()
    for name, place in tree.items():
        cls = classes[name]
        assert cls.__module__ == place.module, name
        parent = classes[place.parent] if place.parent is not None else Exception
        assert cls.__bases__ == (parent,), name
        assert issubclass(cls, ColoproxyError), name


def test_internal_signals_are_outside_the_tree() -> None:
    _, internal = drawn()
    classes = defined()
    for name, place in internal.items():
        cls = classes[name]
        assert cls.__module__ == place.module, name
        assert cls.__bases__ == (Exception,), name
        assert not issubclass(cls, ColoproxyError), name
