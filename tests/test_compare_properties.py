"""Properties: bad input never raises (I5); output commit (I1); nothing lost (I2)."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coloproxy.compare import (
    CheckpointNeeded,
    Comparator,
    CompareConfig,
    Drop,
    Event,
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
URG = 0x20


class Segment:
    """One primary or secondary segment as the test sent it, with what it claims."""

    def __init__(
        self, low: int, high: int, ack: int, payload: bytes, fin: bool, urgent: int | None
    ) -> None:
        self.low, self.high, self.ack = low, high, ack
        self.payload = payload
        self.fin = fin
        self.urgent = urgent  # the stream offset its urgent pointer names

    def packet(self, isn: int) -> bytes:
        flags = 0x18 | (0x01 if self.fin else 0) | (URG if self.urgent is not None else 0)
        pointer = 0 if self.urgent is None else self.urgent - self.low
        return tcp(isn + 1 + self.low, self.payload, flags=flags, ack=self.ack, urgent=pointer)


def _segments(
    draw: st.DrawFn, data: bytes, ack_base: int, urgent: int | None, fin: bool
) -> list[Segment]:
    """Random cuts, some segments swapped, then retransmissions (half of them with other
    bytes: sendfile, zero copy) of one stream; segments that start before ``urgent`` carry URG
    (as Linux sends them); the last one carries the FIN when ``fin``."""
    cuts = draw(st.lists(st.integers(1, len(data) - 1), max_size=8))
    bounds = [0, *sorted(set(cuts)), len(data)]
    out: list[Segment] = []
    ack = ack_base
    for low, high in itertools.pairwise(bounds):
        ack += draw(st.integers(0, 50))
        mark = urgent if urgent is not None and low < urgent else None
        last = fin and high == len(data)
        out.append(Segment(low, high, ack, data[low:high], last, mark))
    for _ in range(draw(st.integers(0, 2))):  # reordering
        first, second = draw(st.integers(0, len(out) - 1)), draw(st.integers(0, len(out) - 1))
        out[first], out[second] = out[second], out[first]
    for index in draw(st.lists(st.integers(0, len(out) - 1), max_size=3)):
        old = out[index]
        payload = old.payload
        if draw(st.booleans()):
            changed = bytearray(payload)
            changed[draw(st.integers(0, len(payload) - 1))] ^= 0x5A
            payload = bytes(changed)
        out.append(Segment(old.low, old.high, old.ack, payload, old.fin, old.urgent))
    return out


def _interleave(
    draw: st.DrawFn, primary: int, secondary: int, engine: int
) -> list[tuple[str, int]]:
    """Both sides' segments in their own order, merged at random, with engine steps between."""
    queues = {"p": list(range(primary)), "s": list(range(secondary)), "engine": list(range(engine))}
    order: list[tuple[str, int]] = []
    while any(queues.values()):
        side = draw(st.sampled_from([name for name, queue in queues.items() if queue]))
        order.append((side, queues[side].pop(0)))
    return order


@SETTINGS
@given(st.data())
def test_output_commit_and_nothing_lost(data: st.DataObject) -> None:
    """Every primary packet fed is released exactly once and never dropped. A release is
    MATCHED only if, in the same epoch, the secondary had already sent the same bytes at the
    same offsets, its FIN at the same offset and an urgent pointer naming the same offset, and
    acknowledged at least as much; any other release is by a checkpoint, and only from a
    checkpoint that completed, which the test starts only when the comparator asked for one
    (and once at the end). Bounds are drawn small too, so overflows happen."""
    draw = data.draw
    config = CompareConfig(
        compare_timeout=1.0,
        secondary_timeout=draw(st.sampled_from([None, 0.5, 3.0])),
        # small bounds a third of the time or so: overflows happen, and so do matches
        max_held_packets=draw(st.sampled_from([2, 5, 8, 4096, 4096, 4096, 4096])),
        max_held_bytes=draw(st.sampled_from([40, 300, 64 << 20, 64 << 20, 64 << 20])),
        retransmit_window=draw(st.sampled_from([1, 50, 4 << 20, 4 << 20, 4 << 20])),
        max_retransmit_bytes=draw(st.sampled_from([1, 100, 64 << 20, 64 << 20, 64 << 20])),
    )
    difference = draw(st.one_of(st.none(), st.integers(0, len(STREAM) - 1)))
    secondary_stream = bytearray(STREAM)
    if difference is not None:
        secondary_stream[difference] ^= 0x5A
    urgent = draw(st.one_of(st.none(), st.integers(1, len(STREAM))))
    secondary_urgent = urgent if draw(st.integers(0, 4)) else draw(st.integers(1, len(STREAM)))
    fin = draw(st.booleans())
    primary = _segments(draw, STREAM, 1000, urgent, fin)
    secondary = _segments(draw, bytes(secondary_stream), 1000, secondary_urgent, fin)
    order = _interleave(draw, len(primary), len(secondary), draw(st.integers(0, 4)))
    comparator = Comparator(config)
    released: list[object] = []
    tokens: list[object] = []
    now = 0.0

    def fed(events: list[Event]) -> list[Event]:
        for event in events:
            assert not (isinstance(event, Drop) and event.token in tokens), "primary dropped"
        return events

    fed(comparator.feed(Side.PRIMARY, tcp(P_ISN, flags=0x12, ack=1000), 0.0, "p-syn"))
    comparator.feed(Side.SECONDARY, tcp(S_ISN, flags=0x12, ack=1000), 0.0, None)
    tokens.append("p-syn")
    released.append("p-syn")  # matched at once: both SYNs are in
    # What the secondary sent in the current epoch: byte values by offset, FIN offsets,
    # urgent offsets; its highest ACK over the whole run (synced=False keeps it).
    sent: dict[int, set[int]] = {}
    secondary_fins: set[int] = set()
    secondary_marks: set[int] = set()
    secondary_max_ack = 1000
    asked = checkpointing = False
    for side, index in order:
        now += 0.01
        if side == "engine":
            if checkpointing:
                events = comparator.checkpoint_completed(now, synced=False)
                checkpointing = asked = False
                sent, secondary_fins, secondary_marks = {}, set(), set()
                for event in events:
                    assert isinstance(event, Release) and event.token in tokens
                    assert event.reason is ReleaseReason.CHECKPOINT
                    released.append(event.token)
            elif asked:
                assert comparator.checkpoint_started(now) == []
                checkpointing = True
            continue
        if side == "s":
            segment = secondary[index]
            if not checkpointing:  # the old epoch's: dropped uncompared
                for offset, value in enumerate(segment.payload, segment.low):
                    sent.setdefault(offset, set()).add(value)
                if segment.fin:
                    secondary_fins.add(segment.high)
                if segment.urgent is not None:
                    secondary_marks.add(segment.urgent)
            secondary_max_ack = max(secondary_max_ack, segment.ack)
            events = comparator.feed(Side.SECONDARY, segment.packet(S_ISN), now, None)
        else:
            segment = primary[index]
            tokens.append(index)
            events = fed(comparator.feed(Side.PRIMARY, segment.packet(P_ISN), now, index))
        events += comparator.handle_timer(now)
        for event in events:
            if isinstance(event, CheckpointNeeded):
                asked = True
            if not isinstance(event, Release):
                continue
            assert event.reason is ReleaseReason.MATCHED, "released uncompared"
            got = primary[event.token]  # type: ignore[index]
            for offset, value in enumerate(got.payload, got.low):
                assert value in sent.get(offset, ()), "released bytes the secondary never sent"
            assert not got.fin or got.high in secondary_fins, "released an unmatched FIN"
            assert got.urgent is None or got.urgent in secondary_marks, "released unmatched URG"
            assert got.ack <= secondary_max_ack, "released an ACK the secondary had not sent"
            released.append(event.token)
    comparator.handle_timer(now + 10)
    if not checkpointing:
        comparator.checkpoint_started(now + 10)
    final = comparator.checkpoint_completed(now + 10, synced=False)
    for event in final:
        assert isinstance(event, Release) and event.reason is ReleaseReason.CHECKPOINT
    released += [e.token for e in final if isinstance(e, Release)]
    assert sorted(map(str, released)) == sorted(map(str, tokens)), "lost or released twice"


@SETTINGS
@given(st.data())
def test_equal_output_asks_for_nothing(data: st.DataObject) -> None:
    """The same stream cut, resent (with the same bytes) and reordered differently on the two
    sides, fully acknowledged, with default bounds: everything matched, nothing asked."""
    draw = data.draw
    urgent = draw(st.one_of(st.none(), st.integers(1, len(STREAM))))
    fin = draw(st.booleans())
    primary = [
        s for s in _segments(draw, STREAM, 1000, urgent, fin) if s.payload == STREAM[s.low : s.high]
    ]
    secondary = [
        s for s in _segments(draw, STREAM, 1000, urgent, fin) if s.payload == STREAM[s.low : s.high]
    ]
    comparator = Comparator(CompareConfig(compare_timeout=1.0))
    comparator.feed(Side.PRIMARY, tcp(P_ISN, flags=0x12, ack=1000), 0.0, "p-syn")
    comparator.feed(Side.SECONDARY, tcp(S_ISN, flags=0x12, ack=1000), 0.0, None)
    order = _interleave(draw, len(primary), len(secondary), 0)
    needed: list[Event] = []
    for side, index in order:
        if side == "p":
            events = comparator.feed(Side.PRIMARY, primary[index].packet(P_ISN), 0.5, index)
        else:
            events = comparator.feed(Side.SECONDARY, secondary[index].packet(S_ISN), 0.5, None)
        needed += [e for e in events if isinstance(e, CheckpointNeeded)]
    # the secondary acknowledges everything the primary did
    top = max(s.ack for s in primary) if primary else 1000
    comparator.feed(
        Side.SECONDARY, tcp(S_ISN + 1 + len(STREAM) + fin, flags=0x10, ack=top), 0.6, None
    )
    needed += [e for e in comparator.handle_timer(10.0) if isinstance(e, CheckpointNeeded)]
    assert needed == []
    assert comparator.checkpoint_completed(10.0) == []
