"""The control protocol between the proxy and its clients: messages and a sans-IO codec.

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

Each kind is one frozen dataclass. :func:`encode` turns one into a line; :class:`Decoder` is
fed bytes as they come and returns the messages found, or a :class:`ProtocolError` item for
a line that is not JSON, not an object, longer than ``MAX_MESSAGE_BYTES``, of an unknown
kind or with a field of the wrong type. It never raises on bad input: a bad line becomes one
error item and decoding goes on after the next newline (what the connection does with the
item is the shell's business: the server answers it with an ``error`` reply).

The schema of each kind is taken from its dataclass (field names are the JSON names, the
annotations say the JSON types), so the codec and the dataclasses cannot drift apart.
Range checks live in ``__post_init__`` and raise :class:`~coloproxy.errors.UsageError` when
our own code builds a bad message; the decoder turns that into an ``invalid`` error item.

Pure: no I/O, no clock. Times are plain numbers the caller supplies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Final, NewType, Union

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
_HEX: Final = re.compile(r"(?:[0-9a-f]{2})*")


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
# What answers a client message.
Reply = Welcome | Ack | Status | ErrorReply
# What the proxy sends unasked.
Push = CheckpointRequest | SetPeriod

MESSAGE_TYPES: Final[tuple[type[Message], ...]] = typing.get_args(Message)
KINDS: Final[Mapping[str, type[Message]]] = {cls.kind: cls for cls in MESSAGE_TYPES}
REPLY_KINDS: Final = frozenset({"welcome", "ack", "status", "error"})
PUSH_KINDS: Final = frozenset({"checkpoint-request", "set-period"})

# What each client role may send (besides hello). Everything else is refused with
# "forbidden"; kinds only the proxy sends are refused with "unexpected".
CLIENT_MAY_SEND: Final[Mapping[ClientRole, frozenset[str]]] = {
    ClientRole.ENGINE: frozenset(
        {"checkpoint-started", "checkpoint-completed", "status-request", "failover", "attach-lan"}
    ),
    ClientRole.CLI: frozenset(
        {"status-request", "checkpoint", "set-period", "failover", "attach-lan", "reprotect"}
    ),
    ClientRole.MONITOR: frozenset({"status-request"}),
}
# Kinds that lift protection or change what the engine does: besides a role that may send
# them, the peer needs engine credentials (root, the proxy's own user, control.engine_group),
# whatever role it claimed. A peer with engine credentials may claim any role; see
# docs/control-protocol.md, "Who may send what".
NEEDS_ENGINE_CREDENTIALS: Final = frozenset(
    {
        "checkpoint-started",
        "checkpoint-completed",
        "set-period",
        "failover",
        "attach-lan",
        "reprotect",
    }
)
# Who receives each kind of push.
PUSH_TO: Final[Mapping[str, frozenset[ClientRole]]] = {
    "checkpoint-request": frozenset({ClientRole.ENGINE}),
    "set-period": frozenset({ClientRole.ENGINE}),
}


def choose_version(offered: Iterable[int]) -> int | None:
    """The highest version both sides speak, or None."""
    common = SUPPORTED_VERSIONS.intersection(offered)
    return max(common) if common else None


# -- encoding --------------------------------------------------------------------------------


def _wire(value: object) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_wire(item) for item in value]
    if isinstance(value, CheckpointEvidence):
        return {item.name: _wire(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): _wire(item) for key, item in value.items()}
    raise UsageError(f"cannot encode {type(value).__name__} in a control message")


def to_json(message: Message, version: int = PROTOCOL_VERSION) -> dict[str, object]:
    """The JSON object of a message: ``v``, ``kind``, then every field by its name."""
    wire: dict[str, object] = {"v": version, "kind": message.kind}
    for item in dataclasses.fields(message):
        wire[item.name] = _wire(getattr(message, item.name))
    return wire


def encode(message: Message, version: int = PROTOCOL_VERSION) -> bytes:
    """One line of JSON, newline included. ASCII only (``ensure_ascii``), so every string
    survives, lone surrogates included. A message too long for the peer to accept is our
    bug: :class:`UsageError`."""
    line = json.dumps(to_json(message, version), separators=(",", ":"), allow_nan=False)
    if len(line) > MAX_MESSAGE_BYTES:
        raise UsageError(
            f"{message.kind} message of {len(line)} bytes exceeds {MAX_MESSAGE_BYTES} bytes"
        )
    return line.encode("ascii") + b"\n"


# -- decoding --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A line that is not a usable message (an item the decoder returns, not an exception).

    ``re`` is the line's ``id`` when one could be read, so that the error reply names it.
    """

    code: ErrorCode
    detail: str
    re: int | None = None


class _InvalidError(Exception):
    """Internal: a field does not fit its type (turned into a ProtocolError)."""


Converter = Callable[[object], object]


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        text = json.dumps(value if len(value) <= 40 else value[:37] + "...")
        return f"the string {text}"
    return repr(value)


def _integer(value: object) -> object:
    # bool is an int in Python but not in JSON: true is not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _InvalidError(f"expected an integer, got {_describe(value)}")
    if not 0 <= value <= MAX_INTEGER:
        raise _InvalidError(f"expected an integer from 0 to 2**53-1, got {value}")
    return value


def _signed_integer(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _InvalidError(f"expected an integer, got {_describe(value)}")
    if not -MAX_INTEGER <= value <= MAX_INTEGER:
        raise _InvalidError(f"expected an integer from -(2**53-1) to 2**53-1, got {value}")
    return value


def _number(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _InvalidError(f"expected a number, got {_describe(value)}")
    if not (math.isfinite(value) and value >= 0):
        raise _InvalidError(f"expected a non-negative number, got {value}")
    return float(value)


def _string(value: object) -> object:
    if not isinstance(value, str):
        raise _InvalidError(f"expected a string, got {_describe(value)}")
    return value


def _boolean(value: object) -> object:
    if not isinstance(value, bool):
        raise _InvalidError(f"expected true or false, got {_describe(value)}")
    return value


def _hex_bytes(value: object) -> object:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise _InvalidError(f"expected lower-case hex digits in pairs, got {_describe(value)}")
    return bytes.fromhex(value)


def _enumeration(kind: type[StrEnum]) -> Converter:
    values = frozenset(member.value for member in kind)
    allowed = ", ".join(member.value for member in kind)

    def convert(value: object) -> object:
        if isinstance(value, str) and value in values:
            return kind(value)
        raise _InvalidError(f"expected one of {allowed}, got {_describe(value)}")

    return convert


def _optional(inner: Converter) -> Converter:
    def convert(value: object) -> object:
        return None if value is None else inner(value)

    return convert


def _array(inner: Converter) -> Converter:
    def convert(value: object) -> object:
        if not isinstance(value, list):
            raise _InvalidError(f"expected an array, got {_describe(value)}")
        return tuple(inner(item) for item in value)

    return convert


def _counters(value: object) -> object:
    if not isinstance(value, dict):
        raise _InvalidError(f"expected an object of counts, got {_describe(value)}")
    return {name: _integer(count) for name, count in value.items()}


def _record(cls: type[Any]) -> Converter:
    fields = _schema(cls)

    def convert(value: object) -> object:
        if not isinstance(value, dict):
            raise _InvalidError(f"expected an object, got {_describe(value)}")
        return cls(**_arguments(fields, value, prefix=""))

    return convert


_SCALARS: Final[Mapping[object, Converter]] = {
    int: _integer,
    StreamOffset: _signed_integer,
    float: _number,
    str: _string,
    bool: _boolean,
    bytes: _hex_bytes,
}


def _converter(annotation: object) -> Converter:
    """The converter for one field, from its annotation (built once, at import)."""
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        return _enumeration(annotation)
    if annotation is CheckpointEvidence:
        return _record(CheckpointEvidence)
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (Union, types.UnionType) and len(arguments) == 2 and type(None) in arguments:
        inner = arguments[0] if arguments[1] is type(None) else arguments[1]
        return _optional(_converter(inner))
    if origin is tuple and len(arguments) == 2 and arguments[1] is Ellipsis:
        return _array(_converter(arguments[0]))
    if origin is Mapping and arguments == (str, int):
        return _counters
    raise TypeError(f"no JSON converter for {annotation!r}")  # a bug in this module


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    convert: Converter
    required: bool


def _schema(cls: type[Any]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        _Field(
            item.name,
            _converter(hints[item.name]),
            item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING,
        )
        for item in dataclasses.fields(cls)
    )


def _arguments(fields: tuple[_Field, ...], wire: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Constructor arguments from a JSON object. Unknown names are ignored: a later minor
    revision may add optional fields without a version change."""
    arguments: dict[str, Any] = {}
    for spec in fields:
        if spec.name not in wire:
            if spec.required:
                raise _InvalidError(f"field {prefix}{spec.name!r} is missing")
            continue
        try:
            arguments[spec.name] = spec.convert(wire[spec.name])
        except _InvalidError as exc:
            raise _InvalidError(f"field {prefix}{spec.name!r}: {exc}") from None
        except UsageError as exc:  # a nested record's own range check
            raise _InvalidError(f"field {prefix}{spec.name!r}: {exc}") from None
    return arguments


_SCHEMAS: Final[Mapping[str, tuple[_Field, ...]]] = {
    kind: _schema(cls) for kind, cls in KINDS.items()
}


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity and -Infinity


def decode_line(line: bytes | bytearray) -> Message | ProtocolError:
    """One line (without its newline) to a message or an error item; never raises."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ProtocolError(ErrorCode.MALFORMED, f"not UTF-8: {exc.reason} at byte {exc.start}")
    try:
        wire = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        return ProtocolError(ErrorCode.MALFORMED, f"not JSON: {exc}")
    except RecursionError:
        return ProtocolError(ErrorCode.MALFORMED, "not JSON: nested too deeply")
    if not isinstance(wire, dict):
        return ProtocolError(ErrorCode.MALFORMED, f"expected a JSON object, got {_describe(wire)}")
    message_id = wire.get("id")
    re_id = (
        message_id
        if isinstance(message_id, int)
        and not isinstance(message_id, bool)
        and 0 <= message_id <= MAX_INTEGER
        else None
    )
    version = wire.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        detail = "field 'v' is missing" if version is None else "field 'v' is not an integer"
        return ProtocolError(ErrorCode.INVALID, detail, re_id)
    if version not in SUPPORTED_VERSIONS:
        spoken = ", ".join(str(known) for known in sorted(SUPPORTED_VERSIONS))
        return ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION, f"version {version} (this side speaks {spoken})", re_id
        )
    kind = wire.get("kind")
    if not isinstance(kind, str):
        return ProtocolError(ErrorCode.INVALID, "field 'kind' is missing or not a string", re_id)
    cls = KINDS.get(kind)
    if cls is None:
        return ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown kind {_describe(kind)}", re_id)
    try:
        return cls(**_arguments(_SCHEMAS[kind], wire, prefix=""))
    except (_InvalidError, UsageError) as exc:
        return ProtocolError(ErrorCode.INVALID, f"{kind}: {exc}", re_id)


class Decoder:
    """Bytes in, messages and error items out; one per connection direction.

    Memory is bounded by ``max_message_bytes`` plus the chunk being fed: a line that grows
    past the limit is reported at once (``oversized``) and its remaining bytes are skipped up
    to the next newline without being stored. Empty lines are ignored (a keep-alive).
    """

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 1:
            raise UsageError("max_message_bytes must be positive")
        self._limit = max_message_bytes
        self._buffer = bytearray()  # the unfinished line, never longer than the limit
        self._skipping = False  # inside an oversized line: drop bytes up to its newline

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line held."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> list[Message | ProtocolError]:
        out: list[Message | ProtocolError] = []
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            if self._skipping:
                if newline < 0:
                    break
                self._skipping = False
                start = newline + 1
                continue
            end = len(data) if newline < 0 else newline
            if len(self._buffer) + end - start > self._limit:
                out.append(
                    ProtocolError(
                        ErrorCode.OVERSIZED,
                        f"line longer than {self._limit} bytes; skipped to the next newline",
                    )
                )
                self._buffer.clear()
                self._skipping = newline < 0
                start = end + 1
                continue
            self._buffer += data[start:end]
            if newline < 0:
                break
            start = newline + 1
            line = bytes(self._buffer)
            self._buffer.clear()
            if line.strip(b" \t\r"):
                out.append(decode_line(line))
        return out

    def close(self) -> list[ProtocolError]:
        """End of stream: an unfinished line is reported as ``truncated``."""
        unfinished = bool(self._buffer.strip(b" \t\r"))
        length = len(self._buffer)
        self._buffer.clear()
        self._skipping = False
        if unfinished:
            return [
                ProtocolError(ErrorCode.TRUNCATED, f"stream ended inside a line ({length} bytes)")
            ]
        return []
