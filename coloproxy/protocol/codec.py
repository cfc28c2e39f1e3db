"""The control protocol's wire codec (pure, sans-IO): messages to JSON lines and back.

:func:`encode` turns a message (:mod:`coloproxy.protocol.messages`) into a line;
:class:`Decoder` is fed bytes as they come and returns the messages found, or a
:class:`ProtocolError` item for a line that is not JSON, not an object, longer than
``MAX_MESSAGE_BYTES``, of an unknown kind or with a field of the wrong type. It never raises
on bad input: a bad line becomes one error item and decoding goes on after the next newline
(what the connection does with the item is the shell's business: the server answers it with
an ``error`` reply).

The schema of each kind is taken from its dataclass (field names are the JSON names, the
annotations say the JSON types), so the codec and the dataclasses cannot drift apart; a
message's own range check (``__post_init__``, :class:`~coloproxy.errors.UsageError`) becomes
an ``invalid`` error item.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Union

from coloproxy.errors import UsageError
from coloproxy.protocol.messages import (
    KINDS,
    MAX_INTEGER,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    CheckpointEvidence,
    ErrorCode,
    Message,
    StreamOffset,
)

_HEX: Final = re.compile(r"(?:[0-9a-f]{2})*")


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
