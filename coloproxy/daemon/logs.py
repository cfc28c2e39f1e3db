"""The daemon's log lines: for a terminal or a file, or for journald (shell).

Under systemd the daemon's stderr is a stream to journald (``$JOURNAL_STREAM`` names it by
device and inode, systemd.exec(5)). journald stamps every line with its own time and reads a
syslog priority from a ``<N>`` prefix (sd-daemon(3)), so there each line is ``<N>logger:
message``: no second timestamp, and ``journalctl -p warning`` finds the warnings. Every line
of a multi-line message (a traceback) carries the prefix, since journald takes each line as
an entry of its own. Elsewhere lines keep their time and level name.

The level is the config's ``log.level``, or ``--log-level`` on the command line, which wins
over the file, also at a reload.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Final, TextIO

# syslog(3) priorities of Python's levels.
PRIORITIES: Final = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
PLAIN_FORMAT: Final = "%(asctime)s %(name)s %(levelname)s %(message)s"


def priority(levelno: int) -> int:
    """The syslog priority of a log level (levels between two take the more severe)."""
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """``<N>logger: message`` on every line of the record."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd set up (not merely inherited by a
    process whose stderr was redirected since)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        info = os.fstat(stream.fileno())
        return (int(device), int(inode)) == (info.st_dev, info.st_ino)
    except (ValueError, OSError):
        return False


def configure(
    level: str, *, stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> None:
    """The root logger's one handler, on ``stream`` (stderr), at ``level``."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    journal = to_journal(stream, environ)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    global _handler
    if _handler is not None:  # configured before (a second daemon in one process: tests)
        root.removeHandler(_handler)
    _handler = handler
    root.addHandler(handler)
    set_level(level)


_handler: logging.Handler | None = None


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


__all__ = ["JournalFormatter", "configure", "priority", "set_level", "to_journal"]
