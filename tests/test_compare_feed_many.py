"""``Comparator.feed_many`` gives exactly the events of ``feed`` called once per frame."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coloproxy.compare import Comparator, CompareConfig, Drop, Event, Release, Side
from coloproxy.errors import UsageError
from craft import ACK, SYN, stream, tcp, udp
from test_compare_lane import ISNS, STREAM, tcp_segment, udp_datagram

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[Side, list[bytes]]]:
    out = []
    for _ in range(draw(st.integers(0, 12))):
        side = draw(st.sampled_from(Side))
        frames = draw(st.lists(st.one_of(tcp_segment(side), udp_datagram()), max_size=8))
        out.append((side, frames))
    return out


@SETTINGS
@given(
    batches(),
    st.sampled_from([CompareConfig(), CompareConfig(max_held_packets=3, compare_timeout=0.05)]),
)
def test_feed_many_is_feed_in_a_loop(
    steps: list[tuple[Side, list[bytes]]], config: CompareConfig
) -> None:
    batched, single = Comparator(config), Comparator(config)
    handshake = [(side, tcp(ISNS[side], flags=SYN | ACK)) for side in Side]
    for comparator in (batched, single):
        for side, packet in handshake:
            comparator.feed(side, packet, 0.0, ("syn", side.value))
    now = 0.0
    for number, (side, frames) in enumerate(steps):
        now += 0.03
        tokens = [(number, index) for index in range(len(frames))]
        expected: list[Event] = []
        for frame, token in zip(frames, tokens, strict=True):
            expected += single.feed(side, frame, now, token)
        assert batched.feed_many(side, frames, now, tokens) == expected
        assert batched.handle_timer(now) == single.handle_timer(now)
        assert batched.stats() == single.stats()


def test_a_batch_of_a_stream_releases_in_order() -> None:
    comparator = Comparator()
    comparator.feed(Side.PRIMARY, tcp(ISNS[Side.PRIMARY], flags=SYN | ACK), 0.0, "p-syn")
    comparator.feed(Side.SECONDARY, tcp(ISNS[Side.SECONDARY], flags=SYN | ACK), 0.0, "s-syn")
    primary = stream(ISNS[Side.PRIMARY], STREAM[:300], [100, 200])
    secondary = stream(ISNS[Side.SECONDARY], STREAM[:300], [150])
    assert comparator.feed_many(Side.PRIMARY, primary, 1.0, ["p0", "p1", "p2"]) == []
    assert comparator.feed_many(Side.SECONDARY, secondary, 1.0, ["s0", "s1"]) == [
        Drop("s0"),
        Release("p0"),
        Drop("s1"),
        Release("p1"),
        Release("p2"),
    ]
    assert comparator.feed_many(Side.PRIMARY, [], 1.0, []) == []


def test_frames_and_tokens_must_pair_up() -> None:
    comparator = Comparator()
    with pytest.raises(UsageError, match="2 frames but 1 tokens"):
        comparator.feed_many(Side.PRIMARY, [udp(b"a"), udp(b"b")], 0.0, ["only one"])
    with pytest.raises(UsageError):
        comparator.feed_many(Side.SECONDARY, [], 0.0, [tcp(1, b"x", ACK)])
