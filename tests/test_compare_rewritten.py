"""``secondary_seq: rewritten``: the secondary's segments arrive in the primary's sequence
space, all but its SYN-ACK (QEMU's filter-rewriter in front of the chardev transport)."""

from __future__ import annotations

import itertools

import pytest

from coloproxy.compare import (
    CheckpointNeeded,
    Comparator,
    CompareConfig,
    Event,
    Reason,
    Release,
    SecondarySeq,
    Side,
)
from craft import ACK, SYN, stream, tcp

P_ISN = 1_000_000
S_ISN = 3_000_000_000
DATA = bytes(range(256)) * 8


def released(events: list[Event]) -> list[object]:
    return [event.token for event in events if type(event) is Release]


def checkpoints(events: list[Event]) -> list[CheckpointNeeded]:
    return [event for event in events if isinstance(event, CheckpointNeeded)]


def run(order: str, secondary_seq: SecondarySeq, secondary_data_isn: int) -> list[Event]:
    """Both SYN-ACKs (in ``order``), then the data: the primary in 1000-byte segments, the
    secondary cut elsewhere and numbered from ``secondary_data_isn``."""
    comparator = Comparator(CompareConfig(secondary_seq=secondary_seq))
    primary = [tcp(P_ISN, flags=SYN | ACK), *stream(P_ISN, DATA, list(range(1000, 2048, 1000)))]
    secondary = [
        tcp(S_ISN, flags=SYN | ACK),
        *stream(secondary_data_isn, DATA, [300, 1200, 1900]),
    ]
    events: list[Event] = []
    sides = [(Side.PRIMARY, primary[0], "p0"), (Side.SECONDARY, secondary[0], "s0")]
    if order == "secondary-first":
        sides.reverse()
    for side, frame, token in sides:
        events += comparator.feed(side, frame, 0.0, token)
    rest = itertools.zip_longest(
        [(Side.PRIMARY, f, f"p{n}") for n, f in enumerate(primary[1:], 1)],
        [(Side.SECONDARY, f, f"s{n}") for n, f in enumerate(secondary[1:], 1)],
    )
    for pair in rest:
        for item in pair:
            if item is not None:
                events += comparator.feed(item[0], item[1], 0.1, item[2])
    events += comparator.handle_timer(10.0)
    return events


@pytest.mark.parametrize("order", ["primary-first", "secondary-first"])
def test_rewritten_secondary_matches_whichever_syn_ack_comes_first(order: str) -> None:
    events = run(order, SecondarySeq.REWRITTEN, P_ISN)
    assert checkpoints(events) == []
    assert released(events) == ["p0", "p1", "p2", "p3"]


def test_without_the_setting_rewritten_numbers_look_like_a_divergence() -> None:
    events = run("primary-first", SecondarySeq.OWN, P_ISN)
    assert checkpoints(events)
    assert "p1" not in released(events)


def test_own_numbers_still_match_in_own_mode() -> None:
    events = run("primary-first", SecondarySeq.OWN, S_ISN)
    assert checkpoints(events) == []
    assert released(events) == ["p0", "p1", "p2", "p3"]


def test_a_rewritten_divergence_is_found_at_its_offset() -> None:
    comparator = Comparator(CompareConfig(secondary_seq=SecondarySeq.REWRITTEN))
    events = comparator.feed(Side.PRIMARY, tcp(P_ISN, flags=SYN | ACK), 0.0, "p0")
    events += comparator.feed(Side.SECONDARY, tcp(S_ISN, flags=SYN | ACK), 0.0, "s0")
    events += comparator.feed(Side.PRIMARY, tcp(P_ISN + 1, b"Date: 1"), 0.0, "p1")
    events += comparator.feed(Side.SECONDARY, tcp(P_ISN + 1, b"Date: 2"), 0.0, "s1")
    (need,) = checkpoints(events)
    assert need.reason is Reason.PAYLOAD
    assert need.evidence is not None and need.evidence.offset == 6
