"""How a configuration's problems are worded: the error that carries them, and a value as
the operator wrote it, for "got ..." (shell).

Every problem is one line, ``FILE:LINE: key 'dotted.key': what is wrong``; all of a file's
problems are raised together in one :class:`ConfigError` so that an operator fixes a file in
one round (coloproxy.config.reader collects them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from coloproxy.errors import InputError

MAX_SHOWN: Final = 60  # characters of a value or key shown in a message


class ConfigError(InputError):
    """A configuration file that cannot be used; ``problems`` holds one line per problem,
    in file order, each naming the file, the line and the key."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


def shown(value: object) -> str:
    """A value as the operator wrote it (near enough), for "got ..."."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(cut(value))
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, int | float):
        return cut(f"{value:g}" if isinstance(value, float) else str(value))
    return f"a {type(value).__name__}"


def cut(text: str) -> str:
    """At most ``MAX_SHOWN`` characters of ``text`` for a message."""
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def one_line(text: str) -> str:
    """A message from a library as one line (PyYAML's span several)."""
    return " ".join(text.split())
