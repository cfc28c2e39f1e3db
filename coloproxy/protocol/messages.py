"""The control protocol between the proxy and its clients: the messages (pure).

Theory of operation
-------------------
One message is one line of JSON (a single object) ended by ``\\n``, over a Unix stream
socket: newline-delimited JSON. Every line carries ``"v"`` (the protocol version its shape
follows) and ``"kind"``. A client opens with ``hello`` (its role and every version it
speaks); the proxy answers ``welcome`` with the version chosen. Every client message has an
``id`` chosen by the client and gets exactly one reply (``welcome``, ``ack``, ``status`` or
``error``) whose ``re`` is that id. The proxy also *pushes* messages nobody asked for
(``checkpoint-request``, ``set-period``) to engines; those get no reply. The full
description, with an example line per message, is docs/control-protocol.md.

Each kind is one frozen dataclass; its fields are the JSON names and its annotations the
JSON types (:mod:`coloproxy.protocol.codec` reads its schema from them, so the codec and the
dataclasses cannot drift apart). Range checks live in ``__post_init__`` and raise
:class:`~coloproxy.errors.UsageError` when our own code builds a bad message; the decoder
turns that into an ``invalid`` error item. Who may send which kind is
:mod:`coloproxy.protocol.rules`.

Pure: no I/O, no clock. Times are plain numbers the caller supplies.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Final, NewType, Union

from coloproxy.errors import UsageError
from coloproxy.role import Role

PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})

# The longest line (without its newline) either side accepts. The largest real message is a
# status reply with its counters (a few KiB) or a checkpoint request with 2 x 48 evidence
# bytes (under 1 KiB); 64 KiB leaves room for growth and bounds what one client can make
# the proxy buffer.
MAX_MESSAGE_BYTES: Final = 64 * 1024

# JSON numbers beyond 2**53 lose precision in most JSON libraries (RFC 8259 section 6).
MAX_INTEGER: Final = 2**53 - 1
MAX_VERSIONS: Final = 16  # a hello lists at most this many versions
MAX_COUNTERS: Final = 256  # a status carries at most this many counters
MAX_NAME: Final = 64  # counter names
MAX_EVIDENCE_BYTES: Final = 256  # per side; the comparator sends 48 (EVIDENCE_BYTES)
# A request must always fit in a line: the packet path broadcasts it and must not fail.
MAX_DETAIL: Final = 1024
# Checkpoint reasons are metric labels: short tokens, never free text.
REASON_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


class ClientRole(StrEnum):
    """Who a client is; decides what it may send and what it is sent."""

    ENGINE = "engine"  # the checkpoint engine: gets checkpoint requests, reports checkpoints
    # An operator's command: status, manual checkpoint; with engine credentials also period,
    # failover, attach-lan, reprotect (NEEDS_ENGINE_CREDENTIALS).
    CLI = "cli"
    MONITOR = "monitor"  # read-only: status only


class Mode(StrEnum):
    PROTECTED = "protected"  # the pair runs COLO: output is compared and held
    UNPROTECTED = "unprotected"  # running alone (after failover): output passes uncompared


class ErrorCode(StrEnum):
    """Why a message was refused; the closed vocabulary of ``error`` replies."""

    MALFORMED = "malformed"  # not UTF-8, not JSON, or not a JSON object
    OVERSIZED = "oversized"  # the line is longer than MAX_MESSAGE_BYTES
    INVALID = "invalid"  # a field is missing, of the wrong type or out of range
    UNKNOWN_KIND = "unknown-kind"
    UNSUPPORTED_VERSION = "unsupported-version"  # "v" (or every version in a hello) unknown
    HELLO_REQUIRED = "hello-required"  # something other than hello before the welcome
    UNEXPECTED = "unexpected"  # valid, but not from this side or not now (a second hello)
    FORBIDDEN = "forbidden"  # the peer's credentials or role do not allow it
    UNAVAILABLE = "unavailable"  # the proxy cannot do it now (no engine, wrong role)
    BUSY = "busy"  # too many clients connected
    INTERNAL = "internal"  # the proxy failed handling it (logged there)
    TRUNCATED = "truncated"  # the stream ended inside a line (never sent: local only)


# -- messages --------------------------------------------------------------------------------


def _check_id(name: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= MAX_INTEGER:
        raise UsageError(f"{name} {value} is not an id (0 to 2**53-1)")


def _check_reason(reason: str) -> None:
    if not REASON_PATTERN.fullmatch(reason):
        raise UsageError(f"reason {reason!r} is not a token ([a-z0-9-], 1-32 characters)")


# A TCP stream offset: bytes after the SYN in the comparator's epoch, so the SYN is at -1 and a
# resend of bytes released before the last checkpoint is below 0 (the only signed integer on
# the wire).
StreamOffset = NewType("StreamOffset", int)


@dataclass(frozen=True, slots=True)
class CheckpointEvidence:
    """The wire form of :class:`coloproxy.compare.Evidence`: where the outputs differ.

    ``primary``/``secondary`` are windows of each side's bytes (hex on the wire) that start
    ``before`` bytes ahead of the first difference at ``offset``; the lengths are of the whole
    segments or datagrams compared.
    """

    offset: StreamOffset | None
    before: int
    primary: bytes
    secondary: bytes
    primary_length: int
    secondary_length: int
    detail: str = ""

    def __post_init__(self) -> None:
        for side in (self.primary, self.secondary):
            if len(side) > MAX_EVIDENCE_BYTES:
                raise UsageError(f"evidence window longer than {MAX_EVIDENCE_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class Hello:
    """client -> proxy, first: who the client is and which versions it speaks.

    The shape of ``hello`` is frozen for every future version, so that any proxy can read it.
    """

    kind: ClassVar[str] = "hello"
    role: ClientRole
    versions: tuple[int, ...] = (PROTOCOL_VERSION,)
    client: str = ""  # free text for logs, e.g. "coloproxy-cli 0.1.0"
    id: int = 0

    def __post_init__(self) -> None:
        _check_id("id", self.id)
        if not 1 <= len(self.versions) <= MAX_VERSIONS:
            raise UsageError(f"a hello lists 1 to {MAX_VERSIONS} versions")
        if any(version < 1 for version in self.versions):
            raise UsageError("protocol versions start at 1")


@dataclass(frozen=True, slots=True)
class Welcome:
    """proxy -> client, the reply to ``hello``: the version chosen and who the proxy is."""

    kind: ClassVar[str] = "welcome"
    version: int
    pair: str
    role: Role
    mode: Mode
    software: str = ""  # e.g. "coloproxy 0.1.0"
    # Seconds without a byte from the client after which the proxy closes the connection;
    # 0: never. A client that stays connected sends something (an empty line) more often.
    idle_timeout: float = 0.0
    re: int | None = None

    def __post_init__(self) -> None:
        _check_id("re", self.re)
        if self.version < 1:
            raise UsageError("protocol versions start at 1")


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    """proxy -> engines (pushed): a checkpoint is needed, and why.

    ``id`` is the proxy's request number (increasing over the proxy's life), not a message id:
    the engine names it in ``checkpoint-started``/``-completed`` and does not reply.
    ``coalesced`` counts further needs merged into this request before it was sent.
    ``time`` is the proxy's wall clock (Unix seconds) when the need arose.
    """

    kind: ClassVar[str] = "checkpoint-request"
    id: int
    reason: str  # payload, fate, timeout, secondary-only, overflow, malformed, manual, restart
    protocol: str  # "tcp", "udp", ..., or "any" for requests not tied to a packet
    flow: str | None = None  # "tcp 10.0.0.2:80 -> 10.0.0.9:40000"
    evidence: CheckpointEvidence | None = None
    coalesced: int = 0
    time: float = 0.0

    def __post_init__(self) -> None:
        _check_id("id", self.id)
        _check_reason(self.reason)


@dataclass(frozen=True, slots=True)
class CheckpointStarted:
    """engine -> proxy: the primary stopped for a checkpoint (its QMP ``STOP``).

    ``request`` is the checkpoint request it serves, or null for a periodic checkpoint.
    """

    kind: ClassVar[str] = "checkpoint-started"
    request: int | None = None
    time: float = 0.0  # engine's wall clock at the STOP event
    id: int = 0

    def __post_init__(self) -> None:
        _check_id("id", self.id)
        _check_id("request", self.request)


@dataclass(frozen=True, slots=True)
class CheckpointCompleted:
    """engine -> proxy: the secondary holds the new state (primary's ``RESUME``): release."""

    kind: ClassVar[str] = "checkpoint-completed"
    request: int | None = None
    started: float = 0.0  # engine's wall clock at STOP
    completed: float = 0.0  # engine's wall clock at RESUME
    # False from an engine that cannot copy state (the namespace tests' double): the proxy then
    # keeps the learned ISN offsets instead of taking the secondary's TCP state as the primary's.
    synced: bool = True
    id: int = 0

    def __post_init__(self) -> None:
        _check_id("id", self.id)
        _check_id("request", self.request)
        # completed < started is accepted: wall clocks step (NTP), and refusing a completion
        # would keep the primary's output held; the times are for logs and metrics only.


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """any client -> proxy: answered by ``status``."""

    kind: ClassVar[str] = "status-request"
    id: int = 0

    def __post_init__(self) -> None:
        _check_id("id", self.id)


@dataclass(frozen=True, slots=True)
class Status:
    """proxy -> client, the reply to ``status-request``: a snapshot of the proxy.

    Ages are seconds before the snapshot, null when there is nothing to age. ``counters`` are
    cumulative counts by name (the same numbers the metrics endpoint shows).
    """

    kind: ClassVar[str] = "status"
    pair: str
    role: Role
    mode: Mode
    epoch: int = 0  # checkpoints completed since the proxy started
    held_packets: int = 0  # primary packets held
    oldest_held_age: float | None = None
    stored_bytes: int = 0  # bytes kept for comparison, both sides
    oldest_secondary_age: float | None = None
    flows: int = 0
    checkpoint_requested: bool = False
    checkpointing: bool = False
    saturated: bool = False  # a bound was reached: holding everything until a checkpoint
    period_ms: int | None = None
    last_checkpoint_age: float | None = None
    engines: int = 0  # engine clients connected
    clients: int = 0  # all clients connected
    uptime: float = 0.0
    counters: Mapping[str, int] = field(default_factory=dict)
    # Who decides failover and where this host stands: "etcd: holding the leader key (0.61 s
    # left)", "two-host (labs only: ...)"; null when no engine runs in the daemon.
    quorum: str | None = None
    fenced: bool = False  # past the leader key's deadline: nothing is released
    re: int | None = None

    @property
    def protected(self) -> bool:
        return self.mode is Mode.PROTECTED

    def __post_init__(self) -> None:
        _check_id("re", self.re)
        if len(self.counters) > MAX_COUNTERS:
            raise UsageError(f"a status carries at most {MAX_COUNTERS} counters")
        for name, value in self.counters.items():
            if not 1 <= len(name) <= MAX_NAME or not 0 <= value <= MAX_INTEGER:
                raise UsageError(f"counter {name!r}: {value} is not a count")


@dataclass(frozen=True, slots=True)
class SetPeriod:
    """cli -> proxy, and proxy -> engines (pushed): the periodic checkpoint interval, live.

    QEMU's ``x-checkpoint-delay`` is a uint32 of milliseconds.
    """

    kind: ClassVar[str] = "set-period"
    period_ms: int
    id: int = 0

    def __post_init__(self) -> None:
        _check_id("id", self.id)
        if not 1 <= self.period_ms <= 2**32 - 1:
            raise UsageError(f"period {self.period_ms} ms is not 1 to 4294967295")


@dataclass(frozen=True, slots=True)
class CheckpointNow:
    """cli -> proxy: checkpoint now. The proxy sends engines a ``checkpoint-request`` with
    this reason (``manual`` unless told otherwise); the ``ack`` names that request."""

    kind: ClassVar[str] = "checkpoint"
    reason: str = "manual"
    id: int = 0

    def __post_init__(self) -> None:
        _check_id("id", self.id)
        _check_reason(self.reason)


@dataclass(frozen=True, slots=True)
class Failover:
    """cli or engine -> proxy: the proxy's role changes (after the peer host was lost)."""

    kind: ClassVar[str] = "failover"
    role: Role
    mode: Mode = Mode.UNPROTECTED
    detail: str = ""
    id: int = 0

    def __post_init__(self) -> None:
        _check_id("id", self.id)


@dataclass(frozen=True, slots=True)
class AttachLan:
    """cli or engine -> proxy of role secondary that took over (``failover`` first): move the
    guest port into the LAN bridge, then hand the SVM the client SYNs of connections still
    half-open on it once more, so that its SYN-ACKs reach the client at once. The engine in
    the daemon does the same through its ``attach_lan`` callable (docs/engine.md)."""

    kind: ClassVar[str] = "attach-lan"
    id: int = 0

    def __post_init__(self) -> None:
        _check_id("id", self.id)


@dataclass(frozen=True, slots=True)
class Reprotect:
    """cli -> proxy: protect again after a failover (the seed's "continuous FT"): this host
    becomes (or stays) the primary and its engine brings a new secondary, whose QEMU waits on
    ``migrate_uri``, into COLO."""

    kind: ClassVar[str] = "reprotect"
    migrate_uri: str
    id: int = 0

    def __post_init__(self) -> None:
        _check_id("id", self.id)
        if not self.migrate_uri or len(self.migrate_uri) > 256:
            raise UsageError(
                f"reprotect: migrate_uri must be 1-256 characters, got {self.migrate_uri!r}"
            )


@dataclass(frozen=True, slots=True)
class Ack:
    """proxy -> client: done. For ``checkpoint``, ``request`` is the checkpoint request it
    became or was merged into."""

    kind: ClassVar[str] = "ack"
    request: int | None = None
    detail: str = ""
    re: int | None = None

    def __post_init__(self) -> None:
        _check_id("re", self.re)
        _check_id("request", self.request)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """proxy -> client: refused. ``re`` is null when the line had no readable id."""

    kind: ClassVar[str] = "error"
    code: ErrorCode
    message: str
    re: int | None = None

    def __post_init__(self) -> None:
        _check_id("re", self.re)


Message = Union[  # noqa: UP007 (a runtime object: typing.get_args walks it below)
    Hello,
    Welcome,
    CheckpointRequest,
    CheckpointStarted,
    CheckpointCompleted,
    StatusRequest,
    Status,
    SetPeriod,
    CheckpointNow,
    Failover,
    AttachLan,
    Reprotect,
    Ack,
    ErrorReply,
]
# What a client sends after its hello (the server's handler sees these).
Request = (
    CheckpointStarted
    | CheckpointCompleted
    | StatusRequest
    | SetPeriod
    | CheckpointNow
    | Failover
    | AttachLan
    | Reprotect
)
# Every request but status-request: answered by an ack.
Command = CheckpointStarted | CheckpointCompleted | SetPeriod | CheckpointNow | Failover | Reprotect
# What answers a client message.
Reply = Welcome | Ack | Status | ErrorReply
# What the proxy sends unasked.
Push = CheckpointRequest | SetPeriod

MESSAGE_TYPES: Final[tuple[type[Message], ...]] = typing.get_args(Message)
KINDS: Final[Mapping[str, type[Message]]] = {cls.kind: cls for cls in MESSAGE_TYPES}
REPLY_KINDS: Final = frozenset({"welcome", "ack", "status", "error"})
PUSH_KINDS: Final = frozenset({"checkpoint-request", "set-period"})
