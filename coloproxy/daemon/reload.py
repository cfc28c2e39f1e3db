"""What a reload (SIGHUP) changes in a running daemon, and what it leaves (pure).

The daemon reads its file again and compares it with the one it runs on, key by key. Keys
in ``LIVE`` are changed in place; every other key that differs is named in the log as not
changed (it needs a restart: links, queues, sockets, the engine's QEMU and its timers are
built from them once), and the daemon goes on with the old value. A file that does not
load changes nothing. A reload never stops the daemon.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

from coloproxy.compare.comparator import LIVE_SETTINGS
from coloproxy.config import Config

LIVE: Final = frozenset(
    {
        "log.level",
        "engine.period_ms",
        "net.rules_check_ms",
        *(f"compare.{name}" for name in LIVE_SETTINGS),
    }
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Change:
    key: str  # dotted, as in the file: "compare.compare_timeout"
    old: object
    new: object


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    live: tuple[Change, ...]  # changed in place
    refused: tuple[Change, ...]  # differ, but need a restart


def plan(running: Config, new: Config) -> ReloadPlan:
    """The differences between the file the daemon runs on and the file as it is now."""
    changes = list(_differences(running, new, ""))
    return ReloadPlan(
        live=tuple(c for c in changes if c.key in LIVE),
        refused=tuple(c for c in changes if c.key not in LIVE),
    )


def apply(config: T, changes: tuple[Change, ...], *, prefix: int = 0) -> T:
    """``config`` with each change's new value at its dotted key, less the key's first
    ``prefix`` parts (1: apply ``compare.x`` to a CompareConfig)."""
    for change in changes:
        config = _replace(config, change.key.split(".")[prefix:], change.new)
    return config


def shown(value: object) -> str:
    """A value as a short text for the log."""
    if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
        return f"{len(value)} rule(s)"
    text = str(getattr(value, "value", value))
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: object, new: object, prefix: str) -> Iterator[Change]:
    if type(old) is type(new) and dataclasses.is_dataclass(old) and not isinstance(old, type):
        for field in dataclasses.fields(old):
            if field.name == "path" and not prefix:
                continue  # where the file was read from, not a setting
            key = f"{prefix}.{field.name}" if prefix else field.name
            yield from _differences(getattr(old, field.name), getattr(new, field.name), key)
    elif old != new:
        yield Change(prefix, old, new)


def _replace(config: T, path: list[str], value: object) -> T:
    head, *rest = path
    if rest:
        value = _replace(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: value})  # type: ignore[type-var]


__all__ = ["LIVE", "Change", "ReloadPlan", "apply", "plan", "shown"]
