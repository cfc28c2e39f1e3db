"""The control-protocol codec: round trips, a decoder that never raises, limits, exact errors,
and the examples in docs/control-protocol.md."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coloproxy.errors import UsageError
from coloproxy.protocol import (
    CLIENT_MAY_SEND,
    KINDS,
    MAX_MESSAGE_BYTES,
    NEEDS_ENGINE_CREDENTIALS,
    Ack,
    AttachLan,
    CheckpointCompleted,
    CheckpointEvidence,
    CheckpointNow,
    CheckpointRequest,
    CheckpointStarted,
    ClientRole,
    Decoder,
    ErrorCode,
    ErrorReply,
    Failover,
    Hello,
    Message,
    Mode,
    ProtocolError,
    Reprotect,
    SetPeriod,
    Status,
    StatusRequest,
    Welcome,
    choose_version,
    decode_line,
    encode,
)
from coloproxy.protocol.messages import MAX_INTEGER, Request
from coloproxy.role import Role

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DOC = Path(__file__).resolve().parent.parent / "docs" / "control-protocol.md"

ids = st.integers(0, MAX_INTEGER)
optional_ids = st.none() | ids
counts = st.integers(0, 2**40)
seconds = st.floats(0, 1e12, allow_nan=False, allow_infinity=False)
optional_seconds = st.none() | seconds
text = st.text(max_size=60)
reasons = st.from_regex(r"[a-z0-9][a-z0-9-]{0,31}", fullmatch=True)

evidence = st.builds(
    CheckpointEvidence,
    offset=st.none() | counts,
    before=st.integers(0, 48),
    primary=st.binary(max_size=48),
    secondary=st.binary(max_size=48),
    primary_length=counts,
    secondary_length=counts,
    detail=text,
)

# One strategy per message class, keyed by the class so that coverage can be checked.
STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    Hello: st.builds(
        Hello,
        role=st.sampled_from(ClientRole),
        versions=st.lists(st.integers(1, 1000), min_size=1, max_size=16).map(tuple),
        client=text,
        id=ids,
    ),
    Welcome: st.builds(
        Welcome,
        version=st.integers(1, 1000),
        pair=text,
        role=st.sampled_from(Role),
        mode=st.sampled_from(Mode),
        software=text,
        idle_timeout=seconds,
        re=optional_ids,
    ),
    CheckpointRequest: st.builds(
        CheckpointRequest,
        id=ids,
        reason=reasons,
        protocol=text,
        flow=st.none() | text,
        evidence=st.none() | evidence,
        coalesced=counts,
        time=seconds,
    ),
    CheckpointStarted: st.builds(CheckpointStarted, request=optional_ids, time=seconds, id=ids),
    CheckpointCompleted: st.builds(
        CheckpointCompleted, request=optional_ids, started=seconds, completed=seconds, id=ids
    ),
    StatusRequest: st.builds(StatusRequest, id=ids),
    Status: st.builds(
        Status,
        pair=text,
        role=st.sampled_from(Role),
        mode=st.sampled_from(Mode),
        epoch=counts,
        held_packets=counts,
        oldest_held_age=optional_seconds,
        stored_bytes=counts,
        oldest_secondary_age=optional_seconds,
        flows=counts,
        checkpoint_requested=st.booleans(),
        checkpointing=st.booleans(),
        saturated=st.booleans(),
        period_ms=st.none() | st.integers(1, 2**32 - 1),
        last_checkpoint_age=optional_seconds,
        engines=counts,
        clients=counts,
        uptime=seconds,
        counters=st.dictionaries(st.text(min_size=1, max_size=64), counts, max_size=20),
        re=optional_ids,
    ),
    SetPeriod: st.builds(SetPeriod, period_ms=st.integers(1, 2**32 - 1), id=ids),
    CheckpointNow: st.builds(CheckpointNow, reason=reasons, id=ids),
    Failover: st.builds(
        Failover, role=st.sampled_from(Role), mode=st.sampled_from(Mode), detail=text, id=ids
    ),
    AttachLan: st.builds(AttachLan, id=ids),
    Reprotect: st.builds(Reprotect, migrate_uri=st.text(min_size=1, max_size=256), id=ids),
    Ack: st.builds(Ack, request=optional_ids, detail=text, re=optional_ids),
    ErrorReply: st.builds(
        ErrorReply, code=st.sampled_from(ErrorCode), message=text, re=optional_ids
    ),
}
messages = st.one_of(*STRATEGIES.values())


def test_the_strategy_covers_every_kind() -> None:
    """If a kind were added without a strategy, the round trip would not test it."""
    assert set(STRATEGIES) == set(KINDS.values())


# -- round trips -----------------------------------------------------------------------------


@SETTINGS
@given(message=messages)
def test_encode_then_decode_is_the_identity(message: Message) -> None:
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line.isascii()
    assert decode_line(line[:-1]) == message
    assert Decoder().feed(line) == [message]


@SETTINGS
@given(batch=st.lists(messages, max_size=8), cuts=st.lists(st.integers(0, 4000), max_size=10))
def test_a_stream_cut_anywhere_decodes_the_same(batch: list[Message], cuts: list[int]) -> None:
    stream = b"".join(encode(message) for message in batch)
    decoder = Decoder()
    found: list[Message | ProtocolError] = []
    start = 0
    for cut in [*sorted({min(cut, len(stream)) for cut in cuts}), len(stream)]:
        found += decoder.feed(stream[start:cut])
        start = cut
    assert found == batch
    assert decoder.buffered == 0
    assert decoder.close() == []


# -- bad input never raises ------------------------------------------------------------------


@SETTINGS
@given(chunks=st.lists(st.binary(max_size=300), max_size=20))
def test_arbitrary_bytes_never_raise(chunks: list[bytes]) -> None:
    decoder = Decoder(max_message_bytes=200)
    for chunk in chunks:
        for item in decoder.feed(chunk):
            assert isinstance(item, (ProtocolError, *KINDS.values()))
        assert decoder.buffered <= 200
    for item in decoder.close():
        assert item.code is ErrorCode.TRUNCATED


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@SETTINGS
@given(
    kind=st.sampled_from([*KINDS, "nonsense"]),
    fields=st.dictionaries(
        st.sampled_from(
            [
                "id",
                "re",
                "v",
                "role",
                "versions",
                "reason",
                "evidence",
                "counters",
                "period_ms",
                "time",
                "request",
                "mode",
                "code",
                "message",
                "pair",
                "version",
                "protocol",
            ]
        ),
        json_values,
    ),
    keep_version=st.booleans(),
)
def test_wrong_fields_never_raise(kind: str, fields: dict[str, object], keep_version: bool) -> None:
    """Near-miss objects (right kind, random field values) exercise every converter."""
    wire = {"kind": kind, **fields}
    if keep_version:
        wire["v"] = 1
    line = json.dumps(wire).encode()
    item = decode_line(line)
    if isinstance(item, ProtocolError):
        assert item.code in set(ErrorCode) - {ErrorCode.TRUNCATED, ErrorCode.OVERSIZED}
    else:
        assert item.kind == kind


# -- limits ----------------------------------------------------------------------------------


def test_an_oversized_line_is_an_error_and_the_next_line_decodes() -> None:
    hello = Hello(ClientRole.CLI, id=4)
    stream = b"x" * (MAX_MESSAGE_BYTES + 1) + b"\n" + encode(hello)
    assert Decoder().feed(stream) == [
        ProtocolError(
            ErrorCode.OVERSIZED,
            f"line longer than {MAX_MESSAGE_BYTES} bytes; skipped to the next newline",
        ),
        hello,
    ]


def test_an_oversized_line_is_reported_before_its_end_and_not_stored() -> None:
    decoder = Decoder(max_message_bytes=100)
    assert decoder.feed(b"{" * 100) == []
    assert decoder.buffered == 100
    (error,) = decoder.feed(b"{")
    assert isinstance(error, ProtocolError) and error.code is ErrorCode.OVERSIZED
    for _ in range(50):  # the rest of the line is skipped without being kept
        assert decoder.feed(b"y" * 1000) == []
        assert decoder.buffered == 0
    assert decoder.feed(b"\n" + encode(StatusRequest(id=2))) == [StatusRequest(id=2)]


def test_a_line_of_exactly_the_limit_is_accepted() -> None:
    base = encode(Ack(detail="", re=1))
    padding = MAX_MESSAGE_BYTES - (len(base) - 1)
    line = encode(Ack(detail="p" * padding, re=1))
    assert len(line) == MAX_MESSAGE_BYTES + 1  # newline included
    assert Decoder().feed(line) == [Ack(detail="p" * padding, re=1)]
    with pytest.raises(UsageError, match="exceeds 65536 bytes"):
        encode(Ack(detail="p" * (padding + 1), re=1))


def test_end_of_stream_inside_a_line_is_truncated() -> None:
    decoder = Decoder()
    assert decoder.feed(b'{"v":1') == []
    assert decoder.close() == [
        ProtocolError(ErrorCode.TRUNCATED, "stream ended inside a line (6 bytes)")
    ]
    assert decoder.close() == []


def test_empty_lines_are_keepalives() -> None:
    assert Decoder().feed(b"\n\r\n  \n" + encode(StatusRequest(id=1))) == [StatusRequest(id=1)]


# -- exact errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code", "detail", "re"),
    [
        (b"\xff{}", ErrorCode.MALFORMED, "not UTF-8: invalid start byte at byte 0", None),
        (
            b"{nope",
            ErrorCode.MALFORMED,
            "not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
            None,
        ),
        (b"[1, 2]", ErrorCode.MALFORMED, "expected a JSON object, got an array", None),
        (b"[" * 50000, ErrorCode.MALFORMED, "not JSON: nested too deeply", None),
        (
            b'{"v": 1, "kind": "set-period", "period_ms": NaN, "id": 3}',
            ErrorCode.MALFORMED,
            "not JSON: NaN is not JSON",
            None,
        ),
        (b'{"kind": "status-request", "id": 5}', ErrorCode.INVALID, "field 'v' is missing", 5),
        (b'{"v": "1", "kind": "hello"}', ErrorCode.INVALID, "field 'v' is not an integer", None),
        (
            b'{"v": 2, "kind": "hello", "id": 9}',
            ErrorCode.UNSUPPORTED_VERSION,
            "version 2 (this side speaks 1)",
            9,
        ),
        (
            b'{"v": 1, "kind": "reboot", "id": 1}',
            ErrorCode.UNKNOWN_KIND,
            'unknown kind the string "reboot"',
            1,
        ),
        (b'{"v": 1, "id": 1}', ErrorCode.INVALID, "field 'kind' is missing or not a string", 1),
        (
            b'{"v": 1, "kind": "hello", "id": 2}',
            ErrorCode.INVALID,
            "hello: field 'role' is missing",
            2,
        ),
        (
            b'{"v": 1, "kind": "hello", "role": "admin", "id": 2}',
            ErrorCode.INVALID,
            "hello: field 'role': expected one of engine, cli, monitor, got the string \"admin\"",
            2,
        ),
        (
            b'{"v": 1, "kind": "hello", "role": "cli", "versions": [], "id": 2}',
            ErrorCode.INVALID,
            "hello: a hello lists 1 to 16 versions",
            2,
        ),
        (
            b'{"v": 1, "kind": "status-request", "id": true}',
            ErrorCode.INVALID,
            "status-request: field 'id': expected an integer, got true",
            None,
        ),
        (
            b'{"v": 1, "kind": "status-request", "id": -1}',
            ErrorCode.INVALID,
            "status-request: field 'id': expected an integer from 0 to 2**53-1, got -1",
            None,
        ),
        (
            b'{"v": 1, "kind": "set-period", "period_ms": 0, "id": 3}',
            ErrorCode.INVALID,
            "set-period: period 0 ms is not 1 to 4294967295",
            3,
        ),
        (
            b'{"v": 1, "kind": "checkpoint-started", "time": 1e400, "id": 4}',
            ErrorCode.INVALID,
            "checkpoint-started: field 'time': expected a non-negative number, got inf",
            4,
        ),
        (
            b'{"v": 1, "kind": "checkpoint", "reason": "Manual Override", "id": 6}',
            ErrorCode.INVALID,
            "checkpoint: reason 'Manual Override' is not a token ([a-z0-9-], 1-32 characters)",
            6,
        ),
        (
            b'{"v": 1, "kind": "checkpoint-request", "id": 1, "reason": "payload",'
            b' "protocol": "tcp", "evidence": {"offset": 0, "before": 0, "primary": "ABC",'
            b' "secondary": "", "primary_length": 1, "secondary_length": 0}}',
            ErrorCode.INVALID,
            "checkpoint-request: field 'evidence': field 'primary': expected lower-case hex"
            ' digits in pairs, got the string "ABC"',
            1,
        ),
        (
            b'{"v": 1, "kind": "status", "pair": "x", "role": "primary", "mode": "protected",'
            b' "counters": {"a": 1.5}}',
            ErrorCode.INVALID,
            "status: field 'counters': expected an integer, got 1.5",
            None,
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_lines_give_exact_errors(
    line: bytes, code: ErrorCode, detail: str, re: int | None
) -> None:
    assert decode_line(line) == ProtocolError(code, detail, re)
    # The same through the decoder, followed by a good line that must survive.
    assert Decoder().feed(line + b"\n" + encode(StatusRequest(id=8))) == [
        ProtocolError(code, detail, re),
        StatusRequest(id=8),
    ]


def test_unknown_fields_are_ignored_and_defaults_fill_in() -> None:
    """A later revision may add optional fields; an old reader must still understand."""
    line = b'{"v": 1, "kind": "checkpoint", "id": 3, "urgency": "high"}'
    assert decode_line(line) == CheckpointNow(reason="manual", id=3)


def test_integers_are_accepted_where_numbers_are_expected() -> None:
    line = b'{"v": 1, "kind": "checkpoint-started", "request": null, "time": 17, "id": 1}'
    assert decode_line(line) == CheckpointStarted(request=None, time=17.0, id=1)


def test_a_completion_stamped_before_its_start_is_accepted() -> None:
    """Wall clocks step; refusing the completion would keep the output held."""
    message = CheckpointCompleted(request=1, started=10.0, completed=9.5, id=2)
    assert decode_line(encode(message)[:-1]) == message


# -- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: Hello(ClientRole.CLI, versions=(0,)), "protocol versions start at 1"),
        (lambda: StatusRequest(id=-1), "id -1 is not an id"),
        (lambda: SetPeriod(period_ms=2**32), "is not 1 to 4294967295"),
        (lambda: CheckpointNow(reason=""), "is not a token"),
        (lambda: CheckpointRequest(id=1, reason="Bad reason", protocol="tcp"), "is not a token"),
        (
            lambda: Status(pair="p", role=Role.PRIMARY, mode=Mode.PROTECTED, counters={"": 1}),
            "is not a count",
        ),
        (
            lambda: CheckpointEvidence(0, 0, b"x" * 257, b"", 0, 0),
            "evidence window longer than 256 bytes",
        ),
    ],
)
def test_our_own_bad_messages_raise_usage_error(build: object, problem: str) -> None:
    with pytest.raises(UsageError, match=re.escape(problem)):
        build()  # type: ignore[operator]


def test_version_choice() -> None:
    assert choose_version([1]) == 1
    assert choose_version([1, 2, 3]) == 1
    assert choose_version([2]) is None


def test_clients_may_send_only_requests() -> None:
    request_kinds = {cls.kind for cls in Request.__args__}  # type: ignore[attr-defined]
    for role, kinds in CLIENT_MAY_SEND.items():
        assert kinds <= request_kinds, role
    assert CLIENT_MAY_SEND[ClientRole.MONITOR] == {"status-request"}


def test_what_lifts_protection_or_steers_the_engine_needs_engine_credentials() -> None:
    """The per-kind table of docs/control-protocol.md: a CLI without engine credentials (a
    member of control.group) may read the status and ask for a checkpoint, nothing else."""
    request_kinds = {cls.kind for cls in Request.__args__}  # type: ignore[attr-defined]
    assert request_kinds >= NEEDS_ENGINE_CREDENTIALS
    assert CLIENT_MAY_SEND[ClientRole.CLI] - NEEDS_ENGINE_CREDENTIALS == {
        "status-request",
        "checkpoint",
    }
    assert CLIENT_MAY_SEND[ClientRole.ENGINE] <= NEEDS_ENGINE_CREDENTIALS | {"status-request"}
    assert not CLIENT_MAY_SEND[ClientRole.MONITOR] & NEEDS_ENGINE_CREDENTIALS


def test_status_protected_follows_the_mode() -> None:
    status = Status(pair="p", role=Role.PRIMARY, mode=Mode.UNPROTECTED)
    assert not status.protected
    assert dataclasses.replace(status, mode=Mode.PROTECTED).protected


# -- the document ----------------------------------------------------------------------------


def doc_examples() -> list[str]:
    """Every line of a ```json block in docs/control-protocol.md that starts with {"v":."""
    examples: list[str] = []
    inside = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```json"
            continue
        if inside and line.startswith('{"v":'):
            examples.append(line)
    return examples


def test_every_kind_has_an_example_in_the_document() -> None:
    kinds = {json.loads(line)["kind"] for line in doc_examples()}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("line", doc_examples())
def test_the_document_examples_decode_and_are_canonical(line: str) -> None:
    """Each example is exactly what ``encode`` writes for the message it shows."""
    message = decode_line(line.encode())
    assert not isinstance(message, ProtocolError), message
    assert encode(message) == line.encode() + b"\n"
