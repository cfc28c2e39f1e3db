"""Properties: bad input never raises (I5); output commit (I1); nothing lost (I2)."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coloproxy.compare import (
    CheckpointNeeded,
    Comparator,
    CompareConfig,
    Framing,
    Release,
    ReleaseReason,
    Side,
)
from craft import tcp, udp

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    framing=st.sampled_from(Framing),
    packets=st.lists(
        st.tuples(
            st.booleans(),
            st.binary(max_size=120),
            st.sampled_from(["feed", "timer", "started", "completed"]),
        ),
        max_size=40,
    ),
)
def test_arbitrary_bytes_never_raise(
    framing: Framing, packets: list[tuple[bool, bytes, str]]
) -> None:
    comparator = Comparator(CompareConfig(framing=framing))
    now = 0.0
    for primary, data, action in packets:
        now += 0.5
        if action == "timer":
            comparator.handle_timer(now)
        elif action == "started":
            comparator.checkpoint_started(now)
        elif action == "completed":
            comparator.checkpoint_completed(now)
        comparator.feed(Side.PRIMARY if primary else Side.SECONDARY, data, now, len(data))
        comparator.get_timer()
    comparator.handle_timer(float("inf"))
    comparator.stats()


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), max_size=4).map(
        lambda changes: bytes(_apply(valid, changes))
    )


def _apply(data: bytes, changes: list[tuple[int, int]]) -> bytearray:
    out = bytearray(data)
    for index, value in changes:
        out[index] = value
    return out


@SETTINGS
@given(st.data())
def test_mutated_valid_packets_never_raise(data: st.DataObject) -> None:
    comparator = Comparator()
    for template in (tcp(5, b"abcdef"), udp(b"xyz"), tcp(5, b"", flags=0x12)):
        for side in Side:
            comparator.feed(side, data.draw(_mutations(template)), 1.0, None)
    comparator.handle_timer(float("inf"))
    comparator.checkpoint_completed(2.0)


STREAM = bytes((i * 7 + 3) % 256 for i in range(600))
P_ISN, S_ISN = 4_294_960_000, 123


def _segments(
    draw: st.DrawFn, isn: int, data: bytes, ack_base: int
) -> list[tuple[int, int, int, bytes]]:
    """(start, end, ack, packet) with random cuts, retransmits and losses-then-retransmit."""
    cuts = draw(st.lists(st.integers(1, len(data) - 1), max_size=8))
    bounds = [0, *sorted(set(cuts)), len(data)]
    out = []
    ack = ack_base
    for low, high in itertools.pairwise(bounds):
        ack += draw(st.integers(0, 50))
        out.append((low, high, ack, tcp(isn + 1 + low, data[low:high], ack=ack)))
    extra = draw(st.lists(st.integers(0, len(out) - 1), max_size=3))
    out += [out[i] for i in extra]  # retransmissions
    return draw(st.permutations(out)) if draw(st.booleans()) else out


@SETTINGS
@given(st.data())
def test_output_commit_and_nothing_lost(data: st.DataObject) -> None:
    """A primary segment is released as matched only if the secondary already sent the same
    bytes at the same offsets and acknowledged at least as much; at the end a checkpoint
    releases every other one; no token is released twice or lost."""
    difference = data.draw(st.one_of(st.none(), st.integers(0, len(STREAM) - 1)))
    secondary_stream = bytearray(STREAM)
    if difference is not None:
        secondary_stream[difference] ^= 0x5A
    primary = _segments(data.draw, P_ISN, STREAM, 1000)
    secondary = _segments(data.draw, S_ISN, bytes(secondary_stream), 1000)
    order = data.draw(
        st.permutations(
            [("p", i) for i in range(len(primary))] + [("s", i) for i in range(len(secondary))]
        )
    )
    comparator = Comparator(CompareConfig(compare_timeout=1.0))
    comparator.feed(Side.PRIMARY, tcp(P_ISN, flags=0x12, ack=1000), 0.0, "p-syn")
    comparator.feed(Side.SECONDARY, tcp(S_ISN, flags=0x12, ack=1000), 0.0, "s-syn")
    covered = bytearray(len(STREAM))  # 1 where the secondary has sent the byte so far
    secondary_max_ack = 1000
    released: list[object] = ["p-syn"]
    now = 0.0
    for side, index in order:
        now += 0.01
        if side == "s":
            low, high, ack, packet = secondary[index]
            covered[low:high] = b"\x01" * (high - low)
            secondary_max_ack = max(secondary_max_ack, ack)
            events = comparator.feed(Side.SECONDARY, packet, now, None)
        else:
            events = comparator.feed(Side.PRIMARY, primary[index][3], now, index)
        for event in events:
            if isinstance(event, Release):
                assert event.reason is ReleaseReason.MATCHED
                low, high, ack, _ = primary[event.token]  # type: ignore[index]
                assert all(covered[low:high]), "released before the secondary sent those bytes"
                assert difference is None or not low <= difference < high, (
                    "released differing bytes"
                )
                assert ack <= secondary_max_ack, "released an ACK the secondary had not sent"
                released.append(event.token)
    needed = [e for e in comparator.handle_timer(now + 10) if isinstance(e, CheckpointNeeded)]
    final = comparator.checkpoint_completed(now + 10)
    released += [e.token for e in final if isinstance(e, Release)]
    assert sorted(map(str, released)) == sorted(["p-syn", *map(str, range(len(primary)))])
    if difference is None and max(ack for _, _, ack, _ in primary) <= secondary_max_ack:
        assert needed == [], "equal output, fully acknowledged: nothing may be pending"
        assert final == []
