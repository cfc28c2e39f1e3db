"""The heartbeat between the two daemons (pure): what one tells the other, sealed.

Theory of operation
-------------------
Each daemon's failover decider (:mod:`coloproxy.engine.decider`) says, several times a
second, what it knows of its own side in a :class:`Heartbeat`; the shell
(:mod:`coloproxy.engine.peer`) sends it over UDP on every path and hands what it receives
back. Nothing here reads a clock or touches a socket.

Heartbeats are sealed (:func:`seal_heartbeat`: HMAC-SHA256 with a key both daemons read from
a file) and each path keeps a :class:`ReplayWindow` over ``boot`` and ``seq``: a forged or
replayed datagram is counted and never reaches the decider. A datagram that is not an
authentic heartbeat is a :class:`BadHeartbeat` with a reason from a closed vocabulary (the
metric label); nothing here raises on bad input.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from coloproxy.errors import UsageError
from coloproxy.role import Role

HEARTBEAT_VERSION: Final = 2  # 2: sealed with an HMAC (seal_heartbeat)
MAX_HEARTBEAT_BYTES: Final = 1024
# A sealed heartbeat: this magic, HMAC-SHA256 over magic and body, the JSON body.
HEARTBEAT_MAGIC: Final = b"CPH2"
HEARTBEAT_TAG_BYTES: Final = 32
# A shorter shared secret is guessable offline from one captured datagram.
MIN_HEARTBEAT_KEY_BYTES: Final = 16


class QemuState(StrEnum):
    """The local QEMU as its QMP connection shows it."""

    UNKNOWN = "unknown"  # not connected yet
    RUNNING = "running"  # connected (the guest may be paused; the process lives)
    SHUTDOWN = "shutdown"  # the guest powered off (QMP SHUTDOWN): a stop, not a crash
    EXITED = "exited"  # the QMP socket closed without a SHUTDOWN: the process is gone


class ColoMode(StrEnum):
    """``query-colo-status`` ``mode``."""

    NONE = "none"
    PRIMARY = "primary"
    SECONDARY = "secondary"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What one daemon tells the other, several times a second, over UDP."""

    pair: str
    role: Role
    boot: int  # the sender's start time (microseconds): a restart shows as a larger value
    sequence: int
    qemu: QemuState
    colo: ColoMode  # the sender's last query-colo-status mode
    ready: bool = False  # secondary: its QEMU waits for the migration, x-colo set where needed
    failed_over: bool = False  # primary: left COLO, runs alone; secondary: took over
    colo_exit: bool = False  # the sender's QEMU reported COLO_EXIT (its COLO stream broke)
    serving: bool = False  # the sender's guest serves the LAN
    leaving: bool = False  # the sender's engine stops on purpose (daemon restart): not a death
    fenced: bool = False  # quorum: the sender (a primary) is past its leader key's deadline

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": HEARTBEAT_VERSION,
                "pair": self.pair,
                "role": self.role.value,
                "boot": self.boot,
                "seq": self.sequence,
                "qemu": self.qemu.value,
                "colo": self.colo.value,
                "ready": self.ready,
                "failed_over": self.failed_over,
                "colo_exit": self.colo_exit,
                "serving": self.serving,
                "leaving": self.leaving,
                "fenced": self.fenced,
            },
            separators=(",", ":"),
        ).encode("ascii")


@dataclass(frozen=True, slots=True)
class BadHeartbeat:
    """A datagram that is not a heartbeat; ``reason`` is a metric label."""

    reason: str  # oversized, forged, replayed, not-json, not-object, version, field


def _tag(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def seal_heartbeat(heartbeat: Heartbeat, key: bytes) -> bytes:
    """The datagram: magic, HMAC-SHA256 (``key``) over magic and JSON body, the body."""
    if len(key) < MIN_HEARTBEAT_KEY_BYTES:
        raise UsageError(f"a heartbeat key has at least {MIN_HEARTBEAT_KEY_BYTES} bytes")
    body = heartbeat.encode()
    return HEARTBEAT_MAGIC + _tag(key, HEARTBEAT_MAGIC + body) + body


def open_heartbeat(data: bytes, key: bytes) -> Heartbeat | BadHeartbeat:
    """A sealed datagram's heartbeat, or why not (``forged``: no magic or a wrong tag, the
    body is not even read). Never raises."""
    if len(data) > MAX_HEARTBEAT_BYTES:
        return BadHeartbeat("oversized")
    head = len(HEARTBEAT_MAGIC) + HEARTBEAT_TAG_BYTES
    if len(data) < head or not data.startswith(HEARTBEAT_MAGIC):
        return BadHeartbeat("forged")
    body = data[head:]
    if not hmac.compare_digest(
        data[len(HEARTBEAT_MAGIC) : head], _tag(key, HEARTBEAT_MAGIC + body)
    ):
        return BadHeartbeat("forged")
    return decode_heartbeat(body)


class ReplayWindow:
    """Which authentic heartbeats are new, per path: a later ``boot`` (the sender restarted:
    boots grow, they are its start time) or, within the same boot, a higher ``seq``. Anything
    else was heard before (or is older than what was) and is a replay: a recorded datagram
    sent again keeps its tag, so the tag alone proves only who wrote it, not when.

    A receiver that starts afresh knows no boot yet and takes the first authentic one; a
    replay of an older boot is then refused as soon as the real sender is heard. The same
    heartbeat arrives once on each path, so each path has its own window."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}

    def fresh(self, path: str, boot: int, sequence: int) -> bool:
        """True (and remembered) when new; False for a replay."""
        last = self._last.get(path)
        if last is not None and (boot, sequence) <= last:
            return False
        self._last[path] = (boot, sequence)
        return True


def decode_heartbeat(data: bytes) -> Heartbeat | BadHeartbeat:
    """The JSON body of a heartbeat (``open_heartbeat`` checked its tag). Never raises: bad
    input is data."""
    if len(data) > MAX_HEARTBEAT_BYTES:
        return BadHeartbeat("oversized")
    try:
        wire = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return BadHeartbeat("not-json")
    if not isinstance(wire, dict):
        return BadHeartbeat("not-object")
    if wire.get("v") != HEARTBEAT_VERSION:
        return BadHeartbeat("version")
    try:
        pair, boot, sequence = wire["pair"], wire["boot"], wire["seq"]
        if not isinstance(pair, str) or not isinstance(boot, int) or not isinstance(sequence, int):
            return BadHeartbeat("field")
        names = ("ready", "failed_over", "colo_exit", "serving", "leaving", "fenced")
        flags = [wire.get(name, False) for name in names]
        if not all(isinstance(flag, bool) for flag in flags):
            return BadHeartbeat("field")
        return Heartbeat(
            pair=pair,
            role=Role(wire["role"]),
            boot=boot,
            sequence=sequence,
            qemu=QemuState(wire["qemu"]),
            colo=ColoMode(wire["colo"]),
            ready=flags[0],
            failed_over=flags[1],
            colo_exit=flags[2],
            serving=flags[3],
            leaving=flags[4],
            fenced=flags[5],
        )
    except (KeyError, ValueError, TypeError):
        return BadHeartbeat("field")


__all__ = [
    "HEARTBEAT_MAGIC",
    "HEARTBEAT_TAG_BYTES",
    "HEARTBEAT_VERSION",
    "MAX_HEARTBEAT_BYTES",
    "MIN_HEARTBEAT_KEY_BYTES",
    "BadHeartbeat",
    "ColoMode",
    "Heartbeat",
    "QemuState",
    "ReplayWindow",
    "decode_heartbeat",
    "open_heartbeat",
    "seal_heartbeat",
]
