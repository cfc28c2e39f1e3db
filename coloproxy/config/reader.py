"""Reading a configuration file: bounded, into YAML's node tree, then walked against the
schema's key tables with every problem collected (shell).

Theory of operation
-------------------
The file is composed into YAML's node tree (``yaml.compose`` with the safe loader), not
loaded into plain dicts, so that every key keeps the line it is on. The tree is then
walked against a schema (coloproxy.config.schema): each section is a table of keys, each
key a rule that turns the YAML value into a typed value or says what is allowed, plus a
default or "required". Every problem is collected, as ``FILE:LINE: key 'dotted.key': what
is wrong``, and all of them are raised together in one :class:`ConfigError`, so an operator
fixes a file in one round. Only when there is no problem are the frozen dataclasses built
(coloproxy.config.build).

Reading is bounded before the schema sees anything, so that no file can make the reader
hang, trace back or take the host's memory: only a regular file is opened (never waiting on
a FIFO or reading a device for ever), at most ``MAX_CONFIG_BYTES``; the composer refuses
nesting deeper than ``MAX_DEPTH`` (it recurses once per level), lists or mappings of more
than ``MAX_ENTRIES`` and more than ``MAX_VALUES`` values in all, an alias counting as every
value of its anchor (so a few anchors cannot stand for millions); a value longer than
``MAX_SCALAR`` characters is not converted, and a value YAML cannot convert (``!!int abc``)
is a problem of its key like any other. Each of these is one line naming the file and,
where known, the line and the key.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from coloproxy.config.problems import ConfigError, cut, one_line, shown
from coloproxy.config.rules import BadValueError
from coloproxy.config.schema import REQUIRED_SECTIONS, SECTIONS, Key

# Bounds of the reader (module docstring). A real configuration is a few KiB, nests five
# levels and has a few hundred values.
MAX_CONFIG_BYTES: Final = 1 << 20
MAX_DEPTH: Final = 32  # lists and mappings inside one another
MAX_ENTRIES: Final = 4096  # entries of one list or mapping
MAX_VALUES: Final = 16384  # values of the whole file, an alias counted as its anchor's
MAX_SCALAR: Final = 4096  # characters of one value: PATH_MAX; also below Python's int limit


_FILE_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(filename: str, mode: int) -> ConfigError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
    return ConfigError([f"{filename}: not a regular file ({kind})"])


def read_text(filename: str) -> str:
    """The text of a regular file of at most ``MAX_CONFIG_BYTES``. Opened without waiting
    (O_NONBLOCK: a FIFO nobody writes to would block open() for ever) and refused unless
    fstat says it is a regular file (a FIFO or /dev/zero would be read for ever)."""
    try:
        fd = os.open(filename, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        # A socket cannot be opened at all (ENXIO): say what it is rather than why.
        with contextlib.suppress(OSError):
            mode = os.stat(filename).st_mode
            if not stat.S_ISREG(mode):
                raise _not_regular(filename, mode) from exc
        raise ConfigError([f"{filename}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(filename, info.st_mode)
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                [f"{filename}: {info.st_size} bytes; a configuration file is at most"
                 f" {MAX_CONFIG_BYTES}"]
            )  # fmt: skip
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:  # the file may grow while it is read
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                [f"{filename}: more than {MAX_CONFIG_BYTES} bytes; a configuration file is at"
                 f" most {MAX_CONFIG_BYTES}"]
            )  # fmt: skip
    except OSError as exc:
        raise ConfigError([f"{filename}: cannot read: {exc.strerror or exc}"]) from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [f"{filename}:{line}: not UTF-8: byte 0x{data[exc.start]:02x} at byte {exc.start}:"
             f" {exc.reason}"]
        ) from exc  # fmt: skip


class _LimitError(Exception):
    """The file passes a bound of the reader (module docstring) at ``line``."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Loader(yaml.SafeLoader):
    """The safe loader whose composer counts what it builds (module docstring). PyYAML's
    scanner and parser keep their state in lists; only the composer recurses, once per
    level, so bounding it here bounds the stack."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._values = 0
        self._weights: dict[int, int] = {}  # id(anchored node) -> values it stands for

    def _count(self, values: int, line: int) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            raise _LimitError(line, f"more than {MAX_VALUES} values, aliases counted at each use")

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        line = int(event.start_mark.line) + 1 if event.start_mark is not None else 1
        if parent is not None and len(parent.value) >= MAX_ENTRIES:
            raise _LimitError(line, f"a list or mapping of more than {MAX_ENTRIES} entries")
        if isinstance(event, yaml.AliasEvent):
            anchored = self.anchors.get(event.anchor)  # None: PyYAML reports it below
            self._count(self._weights.get(id(anchored), 1), line)
            return super().compose_node(parent, index)
        collection = isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent)
        if collection and self._depth >= MAX_DEPTH:
            raise _LimitError(line, f"nested deeper than {MAX_DEPTH} levels")
        before = self._values
        self._count(1, line)
        self._depth += collection
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= collection
        if node is not None and getattr(event, "anchor", None) is not None:
            self._weights[id(node)] = self._values - before
        return node


def _compose(text: str) -> Node | None:
    loader = _Loader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def compose(text: str, filename: str) -> Node | None:
    """The node tree of ``text`` (None: an empty document); :class:`ConfigError` if it
    passes a bound or is no valid YAML; ``filename`` is what messages call it."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [f"{filename}: {len(text)} characters; a configuration is at most {MAX_CONFIG_BYTES}"]
        )
    try:
        return _compose(text)
    except _LimitError as exc:
        raise ConfigError([f"{filename}:{exc.line}: {exc.message}"]) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "unreadable"
        if exc.problem and exc.context and not exc.context.startswith("while"):
            problem = f"{exc.context}, {exc.problem}"  # "expected a single document, but..."
        raise ConfigError([f"{filename}:{line}: not valid YAML: {one_line(problem)}"]) from exc
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, ...)
        line = text.count("\n", 0, exc.position) + 1
        problem = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        raise ConfigError([f"{filename}:{line}: not valid YAML: {one_line(problem)}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{filename}:1: not valid YAML: {one_line(str(exc))}"]) from exc


def node_line(node: Node) -> int:
    """The line (from 1) a node starts on."""
    return int(node.start_mark.line) + 1


@dataclass(slots=True)
class Read:
    """One mapping, read: checked values (defaults filled in), the nodes of nested keys, and
    the line of every key present."""

    values: dict[str, object]
    nested: dict[str, Node]
    lines: dict[str, int]
    line: int  # the line to blame for the mapping as a whole (its key's)

    def line_of(self, name: str) -> int:
        return self.lines.get(name, self.line)


class Reader:
    """Walks the node tree of one file against the schema's key tables and collects every
    problem, worded ``FILE:LINE: key 'dotted.key': ...``; :meth:`raise_if_any` raises them
    together, in line order."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[tuple[int, int, str]] = []  # (line, order, text)
        self._constructor = yaml.SafeLoader("")

    def problem(self, line: int, key: str, message: str) -> None:
        where = f"key '{key}': " if key else ""
        self.problems.append(
            (line, len(self.problems), f"{self.filename}:{line}: {where}{message}")
        )

    def shown(self, node: Node) -> str:
        """A node for "got ...": its value if it is a readable scalar."""
        if isinstance(node, ScalarNode):
            if len(node.value) > MAX_SCALAR:
                return f"a value of {len(node.value)} characters"
            try:
                return shown(self._constructor.construct_object(node, deep=True))
            except (yaml.YAMLError, ValueError, ArithmeticError):
                return shown(str(node.value))
        return "a list" if isinstance(node, SequenceNode) else "a mapping"

    def scalar(self, node: Node, key: str) -> tuple[bool, object]:
        """The plain value of a node; lists and mappings become [] / {} stand-ins so that
        rules can say "got a list"."""
        if isinstance(node, SequenceNode):
            return True, []
        if isinstance(node, MappingNode):
            return True, {}
        if isinstance(node, ScalarNode) and len(node.value) > MAX_SCALAR:
            self.problem(
                node_line(node),
                key,
                f"a value of {len(node.value)} characters; at most {MAX_SCALAR}",
            )
            return False, None
        try:
            return True, self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            problem = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else None
            self.problem(node_line(node), key, f"unreadable value: {one_line(problem or str(exc))}")
            return False, None
        except (ValueError, ArithmeticError) as exc:
            # PyYAML's constructors raise these for an explicit tag on a value that does not
            # fit it (!!int abc, !!timestamp 2020-99-99).
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            self.problem(
                node_line(node),
                key,
                f"unreadable value: {shown(str(node.value))} is not a valid {tag}"
                f" ({one_line(str(exc))})",
            )
            return False, None

    def mapping(
        self, node: Node | None, key: str, keys: Mapping[str, Key], line: int
    ) -> Read | None:
        """Read a mapping against ``keys``; None (and a problem) if it is no mapping. A
        missing or null node is an empty mapping."""
        if node is None or (isinstance(node, ScalarNode) and node.tag.endswith(":null")):
            node = MappingNode("tag:yaml.org,2002:map", [])
        if not isinstance(node, MappingNode):
            self.problem(
                line, key, f"expected a mapping ({', '.join(keys)}), got {self.shown(node)}"
            )
            return None
        read = Read({}, {}, {}, line)
        for key_node, value_node in node.value:
            key_line = node_line(key_node)
            if not isinstance(key_node, ScalarNode):
                self.problem(key_line, key, "keys must be plain names")
                continue
            name = str(key_node.value)
            dotted = f"{key}.{cut(name)}" if key else cut(name)
            if name in read.lines:
                self.problem(key_line, dotted, f"duplicate key (first at line {read.lines[name]})")
                continue
            read.lines[name] = key_line
            spec = keys.get(name)
            if spec is None:
                close = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ";"
                self.problem(key_line, dotted, f"unknown key{hint} allowed keys: {', '.join(keys)}")
                continue
            if spec.rule is None:
                read.nested[name] = value_node
                continue
            readable, value = self.scalar(value_node, dotted)
            if not readable:
                continue
            try:
                read.values[name] = spec.rule(value)
            except BadValueError as exc:
                self.problem(key_line, dotted, str(exc))
        for name, spec in keys.items():
            if name in read.lines:
                continue
            if spec.required:
                dotted = f"{key}.{name}" if key else name
                self.problem(line, dotted, f"missing; expected {spec.allowed or 'a value'}")
            elif spec.rule is not None:
                read.values[name] = spec.default
        return read

    def sequence(
        self, node: Node, key: str, line: int, most: int = MAX_ENTRIES, items: str = "items"
    ) -> list[Node] | None:
        """A list of at most ``most`` ``items``; None (and a problem) otherwise."""
        if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
            return []
        if not isinstance(node, SequenceNode):
            self.problem(line, key, f"expected a list, got {self.shown(node)}")
            return None
        if len(node.value) > most:
            self.problem(line, key, f"{len(node.value)} {items}; at most {most}")
            return None
        return list(node.value)

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError([text for _, _, text in sorted(self.problems)])


class Sections:
    """The file's top-level mapping: each section read on demand against its key table
    (coloproxy.config.schema.SECTIONS), a missing required section a problem."""

    def __init__(self, reader: Reader, top: Read) -> None:
        self.reader = reader
        self.top = top

    def section(self, name: str) -> Read | None:
        keys = SECTIONS[name]
        if name not in self.top.nested and name in REQUIRED_SECTIONS:
            needed = ", ".join(key for key, spec in keys.items() if spec.required)
            self.reader.problem(1, name, f"missing; expected a mapping with {needed}")
            return None
        return self.reader.mapping(self.top.nested.get(name), name, keys, self.top.line_of(name))
