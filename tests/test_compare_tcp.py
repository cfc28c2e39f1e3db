"""TCP alignment: feed packets, assert the exact events."""

from __future__ import annotations

import itertools
import random

import pytest

from coloproxy.compare import (
    CheckpointNeeded,
    Comparator,
    CompareConfig,
    Drop,
    DropReason,
    Event,
    Reason,
    Release,
    ReleaseReason,
    Side,
    Split,
)
from craft import ACK, FIN, PSH, RST, SYN, URG, stream, tcp
from craft import udp as udp_datagram

P_ISN = 1_000_000
S_ISN = 3_000_000_000
DATA = bytes(range(256)) * 4 + b"HTTP/1.1 200 OK\r\n\r\nthe end"


class Pair:
    """A comparator with a fake clock."""

    def __init__(self, **settings: object) -> None:
        self.comparator = Comparator(CompareConfig(**settings))  # type: ignore[arg-type]
        self.now = 0.0
        self.log: list[Event] = []

    def primary(self, data: bytes, token: object) -> list[Event]:
        events = self.comparator.feed(Side.PRIMARY, data, self.now, token)
        self.log += events
        return events

    def secondary(self, data: bytes, token: object) -> list[Event]:
        events = self.comparator.feed(Side.SECONDARY, data, self.now, token)
        self.log += events
        return events

    def advance(self, seconds: float) -> list[Event]:
        self.now += seconds
        events = self.comparator.handle_timer(self.now)
        self.log += events
        return events

    def released(self, reason: ReleaseReason = ReleaseReason.MATCHED) -> list[object]:
        return [e.token for e in self.log if isinstance(e, Release) and e.reason is reason]

    def checkpoints(self) -> list[CheckpointNeeded]:
        return [e for e in self.log if isinstance(e, CheckpointNeeded)]


def handshake(pair: Pair, p_isn: int = P_ISN, s_isn: int = S_ISN) -> None:
    assert pair.primary(tcp(p_isn, flags=SYN | ACK), "p-syn") == []
    assert pair.secondary(tcp(s_isn, flags=SYN | ACK), "s-syn") == [
        Drop("s-syn", DropReason.COMPARED),
        Release("p-syn", ReleaseReason.MATCHED),
    ]


def test_identical_stream_is_released_segment_by_segment() -> None:
    pair = Pair()
    handshake(pair)
    for index, (p, s) in enumerate(
        zip(stream(P_ISN, DATA, [500, 1000]), stream(S_ISN, DATA, [500, 1000]), strict=True)
    ):
        assert pair.primary(p, f"p{index}") == []
        assert pair.secondary(s, f"s{index}") == [
            Drop(f"s{index}", DropReason.COMPARED),
            Release(f"p{index}", ReleaseReason.MATCHED),
        ]
    assert pair.checkpoints() == []
    assert pair.comparator.stats().held_packets == 0
    assert pair.comparator.stats().stored_bytes == 0


def test_a_long_held_queue_releases_in_stream_order() -> None:
    """Hundreds of segments held at once, released one by one while new ones come, a few out
    of order, resends of released bytes among them: each is released when the secondary's
    matching segment comes, in stream order, a resend at once, and the oldest held one is the
    one the statistics name (the queues drop released entries from the front)."""
    pair = Pair(compare_timeout=60.0)
    handshake(pair)
    size, ahead, count = 10, 300, 1200
    data = bytes(index % 251 for index in range(size * count))
    # Primary segments in stream order, but every 50th pair swapped (later bytes first).
    order = list(range(count))
    for index in range(0, count - 1, 50):
        order[index], order[index + 1] = order[index + 1], order[index]
    arrival: dict[int, float] = {}

    def send_primary(position: int) -> None:
        segment = order[position]
        pair.now = position / 1000
        arrival[segment] = pair.now
        payload = data[segment * size : (segment + 1) * size]
        assert pair.primary(tcp(P_ISN + 1 + segment * size, payload), f"p{segment}") == []

    for position in range(ahead):
        send_primary(position)
    for segment in range(count):
        payload = data[segment * size : (segment + 1) * size]
        assert pair.secondary(tcp(S_ISN + 1 + segment * size, payload), f"s{segment}") == [
            Drop(f"s{segment}", DropReason.COMPARED),
            Release(f"p{segment}", ReleaseReason.MATCHED),
        ]
        del arrival[segment]
        if segment + ahead < count:
            send_primary(segment + ahead)
        if segment % 100 == 99:
            # A resend of bytes released before: it goes before everything held (stream
            # order), so nothing holds it back.
            again = segment - 50
            resend = tcp(P_ISN + 1 + again * size, data[again * size : (again + 1) * size])
            assert pair.primary(resend, f"again{again}") == [
                Release(f"again{again}", ReleaseReason.MATCHED)
            ]
        stats = pair.comparator.stats()
        assert stats.held_packets == len(arrival)
        assert stats.oldest_primary == (min(arrival.values()) if arrival else None)
    assert pair.checkpoints() == []


def test_secondary_first_releases_primary_at_once() -> None:
    pair = Pair()
    handshake(pair)
    assert pair.secondary(tcp(S_ISN + 1, b"abc"), "s") == [Drop("s", DropReason.COMPARED)]
    assert pair.primary(tcp(P_ISN + 1, b"abc"), "p") == [Release("p", ReleaseReason.MATCHED)]


def _cut_patterns(length: int) -> list[list[int]]:
    rng = random.Random(7)
    patterns = [[], [1], [length - 1], list(range(1, length))]
    patterns += [sorted(rng.sample(range(1, length), k)) for k in (2, 5, 17)]
    return patterns


@pytest.mark.parametrize("order", ["primary-first", "secondary-first", "interleaved", "reversed"])
def test_every_cut_and_resegmentation_matches(order: str) -> None:
    data = DATA[:40]
    for cut in range(1, len(data)):
        for secondary_cuts in _cut_patterns(len(data)):
            pair = Pair()
            handshake(pair)
            primary = stream(P_ISN, data, [cut])
            secondary = stream(S_ISN, data, secondary_cuts)
            feeds = [("p", i, d) for i, d in enumerate(primary)] + [
                ("s", i, d) for i, d in enumerate(secondary)
            ]
            if order == "secondary-first":
                feeds.sort(key=lambda f: f[0] != "s")
            elif order == "interleaved":
                primaries = [f for f in feeds if f[0] == "p"]
                secondaries = [f for f in feeds if f[0] == "s"]
                zipped = itertools.zip_longest(primaries, secondaries)
                feeds = [f for both in zipped for f in both if f]
            elif order == "reversed":
                feeds = feeds[::-1]
            for side, index, packet in feeds:
                if side == "p":
                    pair.primary(packet, index)
                else:
                    pair.secondary(packet, f"s{index}")
            assert pair.checkpoints() == [], (cut, secondary_cuts, order)
            assert sorted(pair.released(), key=str) == sorted(
                ["p-syn", *range(len(primary))], key=str
            )
            if order != "reversed":  # per connection, release keeps the primary's order
                assert pair.released() == ["p-syn", *range(len(primary))]


def test_retransmissions_overlaps_keepalives_window_and_options_are_not_divergences() -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, DATA[:100], window=100), "p1")
    pair.primary(tcp(P_ISN + 1 + 50, DATA[50:150], options=b"\x01\x01\x08\x0a" + b"\x00" * 8), "p2")
    pair.secondary(tcp(S_ISN + 1, DATA[:150], window=9999), "s1")
    pair.secondary(tcp(S_ISN + 1, DATA[:150]), "s1-retransmit")
    pair.primary(tcp(P_ISN + 1 + 20, DATA[20:60]), "p-retransmit")
    pair.primary(tcp(P_ISN + 150, b""), "p-keepalive")  # seq = snd_nxt - 1, no data
    pair.primary(tcp(P_ISN + 150, DATA[149:150]), "p-keepalive-byte")  # with one old byte
    assert pair.checkpoints() == []
    assert pair.released() == [
        "p-syn",
        "p1",
        "p2",
        "p-retransmit",
        "p-keepalive",
        "p-keepalive-byte",
    ]


def test_reordered_segments() -> None:
    pair = Pair()
    handshake(pair)
    primary = stream(P_ISN, DATA, [100, 200, 300])
    secondary = stream(S_ISN, DATA, [150, 250])
    for index in (3, 1, 0, 2):
        pair.primary(primary[index], index)
    for index in (2, 0, 1):
        pair.secondary(secondary[index], f"s{index}")
    assert pair.checkpoints() == []
    # Verified together: in stream order (earlier bytes arriving late go before later ones).
    assert pair.released() == ["p-syn", 0, 1, 2, 3]


def test_one_differing_byte_is_one_payload_divergence_at_its_offset() -> None:
    pair = Pair()
    handshake(pair)
    changed = bytearray(DATA)
    changed[700] ^= 0xFF
    for index, packet in enumerate(stream(P_ISN, DATA, [512])):
        pair.primary(packet, index)
    for index, packet in enumerate(stream(S_ISN, bytes(changed), [300, 600, 900])):
        pair.secondary(packet, f"s{index}")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.PAYLOAD
    assert needed.coalesced is False
    assert str(needed.flow) == "tcp 10.0.0.1:80 -> 10.0.0.9:40000"
    assert needed.evidence is not None
    assert needed.evidence.offset == 700
    before = needed.evidence.before
    assert needed.evidence.primary[before] == DATA[700]
    assert needed.evidence.secondary[before] == changed[700]
    assert needed.evidence.primary[:before] == needed.evidence.secondary[:before]
    assert pair.released() == ["p-syn", 0]  # [0, 512) matched before the difference
    # the diverged flow holds everything until the checkpoint; then all of it goes out
    pair.primary(tcp(P_ISN + 1 + len(DATA), b"more"), "late")
    assert pair.comparator.checkpoint_completed(pair.now) == [
        Release(1, ReleaseReason.CHECKPOINT),
        Release("late", ReleaseReason.CHECKPOINT),
    ]


def test_after_checkpoint_the_secondary_continues_with_the_primary_isn() -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"abc"), "p1")
    pair.secondary(tcp(S_ISN + 1, b"abX"), "s1")
    assert [c.reason for c in pair.checkpoints()] == [Reason.PAYLOAD]
    pair.comparator.checkpoint_started(pair.now)
    assert pair.secondary(tcp(S_ISN + 4, b"old"), "stale") == [
        Drop("stale", DropReason.CHECKPOINTING)
    ]
    assert pair.primary(tcp(P_ISN + 4, b"def"), "p-during") == []
    assert pair.comparator.checkpoint_completed(pair.now) == [
        Release("p1", ReleaseReason.CHECKPOINT),
        Release("p-during", ReleaseReason.CHECKPOINT),
    ]
    # the secondary now has the primary's TCP state: same sequence numbers
    pair.primary(tcp(P_ISN + 7, b"ghi"), "p2")
    assert pair.secondary(tcp(P_ISN + 7, b"ghi"), "s2") == [
        Drop("s2", DropReason.COMPARED),
        Release("p2", ReleaseReason.MATCHED),
    ]
    assert len(pair.checkpoints()) == 1


@pytest.mark.parametrize(
    ("primary_flags", "secondary_flags", "detail"),
    [
        (FIN | ACK, RST | ACK, "primary FIN vs secondary RST"),
        (RST | ACK, FIN | ACK, "primary RST vs secondary FIN"),
    ],
)
def test_fin_against_rst_is_a_fate_divergence(
    primary_flags: int, secondary_flags: int, detail: str
) -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"bye"), "p1")
    pair.secondary(tcp(S_ISN + 1, b"bye"), "s1")
    pair.primary(tcp(P_ISN + 4, flags=primary_flags), "p-end")
    pair.secondary(tcp(S_ISN + 4, flags=secondary_flags), "s-end")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.FATE
    assert needed.evidence is not None and needed.evidence.detail == detail
    assert pair.released() == ["p-syn", "p1"]


def test_fins_at_different_offsets_and_data_past_fin_are_fate_divergences() -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"abc", flags=FIN | ACK), "p")
    pair.secondary(tcp(S_ISN + 1, b"abcd", flags=PSH | ACK), "s")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.FATE
    assert needed.evidence is not None and needed.evidence.offset == 3


def test_syn_against_rst_is_a_fate_divergence() -> None:
    pair = Pair()
    pair.primary(tcp(P_ISN, flags=SYN | ACK), "p-syn")
    pair.secondary(tcp(0, flags=RST | ACK), "s-rst")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.FATE


def test_matching_fin_and_rst_are_released() -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"bye", flags=FIN | PSH | ACK), "p-fin")
    pair.secondary(tcp(S_ISN + 1, b"by"), "s1")
    assert pair.released() == ["p-syn"]  # FIN waits for the secondary's FIN at the same offset
    pair.secondary(tcp(S_ISN + 3, b"e", flags=FIN | ACK), "s-fin")
    pair.primary(tcp(P_ISN + 5, flags=RST), "p-rst")
    pair.secondary(tcp(S_ISN + 5, flags=RST), "s-rst")
    assert pair.checkpoints() == []
    assert pair.released() == ["p-syn", "p-fin", "p-rst"]


def test_guest_as_client_learns_isn_from_syn() -> None:
    pair = Pair()
    pair.primary(tcp(P_ISN, flags=SYN, ack=0, sport=40001, dport=80), "p-syn")
    pair.secondary(tcp(S_ISN, flags=SYN, ack=0, sport=40001, dport=80), "s-syn")
    pair.primary(tcp(P_ISN + 1, b"GET /", sport=40001, dport=80), "p1")
    pair.secondary(tcp(S_ISN + 1, b"GET /", sport=40001, dport=80), "s1")
    assert pair.released() == ["p-syn", "p1"]
    assert (
        pair.comparator.isn_offset(bytes([10, 0, 0, 1]), 40001, bytes([10, 0, 0, 9]), 80)
        == (S_ISN - P_ISN) % 2**32
    )


@pytest.mark.parametrize("p_isn", [2**32 - 1, 2**32 - 100, 2**32 - 1024])
def test_sequence_wraparound(p_isn: int) -> None:
    pair = Pair()
    handshake(pair, p_isn=p_isn, s_isn=2**32 - 7)
    changed = bytearray(DATA)
    changed[900] ^= 1
    for index, packet in enumerate(stream(p_isn, DATA, [200, 400, 800])):
        pair.primary(packet, index)
    for index, packet in enumerate(stream(2**32 - 7, bytes(changed), [300, 600])):
        pair.secondary(packet, f"s{index}")
    (needed,) = pair.checkpoints()
    assert needed.evidence is not None and needed.evidence.offset == 900
    assert pair.released() == ["p-syn", 0, 1, 2]


def test_ack_gating_holds_primary_until_secondary_acknowledged_as_much() -> None:
    pair = Pair()
    handshake(pair)
    pair.secondary(tcp(S_ISN + 1, b"x", ack=1000), "s1")
    assert pair.primary(tcp(P_ISN + 1, b"x", ack=1500), "p1") == []  # client bytes the SVM lacks
    assert pair.primary(tcp(P_ISN + 2, b"", ack=1600), "p-pure-ack") == []
    assert pair.secondary(tcp(S_ISN + 2, b"", ack=1500), "s-ack") == [
        Drop("s-ack", DropReason.COMPARED),
        Release("p1", ReleaseReason.MATCHED),
    ]
    assert pair.secondary(tcp(S_ISN + 2, b"", ack=1700), "s-ack2") == [
        Drop("s-ack2", DropReason.COMPARED),
        Release("p-pure-ack", ReleaseReason.MATCHED),
    ]


def test_ack_gating_is_modular() -> None:
    pair = Pair()
    pair.primary(tcp(P_ISN, flags=SYN | ACK, ack=2**32 - 10), "p-syn")
    pair.secondary(tcp(S_ISN, flags=SYN | ACK, ack=2**32 - 10), "s-syn")
    pair.primary(tcp(P_ISN + 1, b"", ack=5), "p-ack")  # 15 bytes later, across the wrap
    assert pair.released() == ["p-syn"]
    pair.secondary(tcp(S_ISN + 1, b"", ack=5), "s-ack")
    assert pair.released() == ["p-syn", "p-ack"]


def test_timeout_asks_once_per_flow_and_coalesces() -> None:
    pair = Pair(compare_timeout=1.0, secondary_timeout=None)
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"a"), "p1")
    pair.primary(tcp(P_ISN + 2, b"b"), "p2")
    pair.primary(tcp(P_ISN + 1, b"q", sport=81), "other-flow")
    assert pair.comparator.get_timer() == pytest.approx(1.0)
    assert pair.advance(0.5) == []
    events = pair.advance(0.6)
    assert [
        (c.reason, str(c.flow), c.coalesced) for c in events if isinstance(c, CheckpointNeeded)
    ] == [
        (Reason.TIMEOUT, "tcp 10.0.0.1:80 -> 10.0.0.9:40000", False),
        (Reason.TIMEOUT, "tcp 10.0.0.1:81 -> 10.0.0.9:40000", True),
    ]
    assert pair.advance(5) == []  # nothing new: still waiting for the checkpoint
    released = pair.comparator.checkpoint_completed(pair.now)
    assert [e.token for e in released] == ["p1", "p2", "other-flow"]


def test_secondary_only_output_times_out() -> None:
    pair = Pair(compare_timeout=1.0, secondary_timeout=2.0)
    handshake(pair)
    pair.secondary(tcp(S_ISN + 1, b"unsolicited"), "s1")
    assert pair.advance(1.9) == []
    (needed,) = pair.advance(0.2)
    assert isinstance(needed, CheckpointNeeded)
    assert needed.reason is Reason.SECONDARY_ONLY
    assert needed.evidence is not None and needed.evidence.secondary == b"unsolicited"


def test_no_spurious_timeout_after_a_segmented_match() -> None:
    """QEMU leaves a partly consumed secondary segment behind and checkpoints on idle flows."""
    pair = Pair(compare_timeout=1.0, secondary_timeout=1.0)
    handshake(pair)
    pair.secondary(tcp(S_ISN + 1, DATA[:300]), "s1")
    pair.primary(tcp(P_ISN + 1, DATA[:100]), "p1")
    pair.primary(tcp(P_ISN + 101, DATA[100:300]), "p2")
    assert pair.advance(10) == []
    assert pair.checkpoints() == []
    assert pair.comparator.stats().stored_bytes == 0


def test_overflow_asks_for_a_checkpoint_and_never_drops_a_primary_packet() -> None:
    pair = Pair(max_held_packets=3)
    handshake(pair)
    for index in range(6):
        pair.primary(tcp(P_ISN + 1 + index, b"z"), index)
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.OVERFLOW
    assert pair.secondary(tcp(S_ISN + 1, b"z"), "s") == [Drop("s", DropReason.OVERFLOW)]
    released = pair.comparator.checkpoint_completed(pair.now)
    assert [e.token for e in released] == list(range(6))
    assert all(isinstance(e, Release) for e in released)


def test_byte_bound_overflow() -> None:
    pair = Pair(max_held_bytes=1000)
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, DATA[:600]), "p1")
    pair.primary(tcp(P_ISN + 601, DATA[600:1200]), "p2")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.OVERFLOW
    assert [e.token for e in pair.comparator.checkpoint_completed(1.0)] == ["p-syn", "p1", "p2"][1:]


def test_flow_bound_evicts_idle_flows_first_then_overflows() -> None:
    pair = Pair(max_flows=2)
    for port in (1, 2, 3):  # idle after matching (equal ISNs): evictable
        pair.primary(tcp(P_ISN + 1, b"a", sport=port), f"p{port}")
        pair.secondary(tcp(P_ISN + 1, b"a", sport=port), f"s{port}")
    assert pair.checkpoints() == []
    assert pair.released() == ["p1", "p2", "p3"]
    pair.primary(tcp(P_ISN + 1, b"b", sport=10), "held-10")
    pair.primary(tcp(P_ISN + 1, b"b", sport=11), "held-11")
    pair.primary(tcp(P_ISN + 1, b"b", sport=12), "no-room")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.OVERFLOW
    assert [e.token for e in pair.comparator.checkpoint_completed(1.0)] == [
        "held-10",
        "held-11",
        "no-room",
    ]


def test_flows_with_unequal_isns_are_kept_until_a_checkpoint() -> None:
    pair = Pair(flow_idle_timeout=10.0)
    handshake(pair)
    pair.advance(100)
    assert pair.comparator.stats().flows == 1
    pair.comparator.checkpoint_completed(pair.now)
    pair.advance(100)
    assert pair.comparator.stats().flows == 0


def test_passthrough_flows_are_released_uncompared() -> None:
    from coloproxy.compare import PassthroughRule

    pair = Pair(passthrough=(PassthroughRule(protocol="tcp", guest_port=80),))
    assert pair.primary(tcp(P_ISN + 1, b"clock: 12:00"), "p") == [
        Release("p", ReleaseReason.PASSTHROUGH)
    ]
    assert pair.secondary(tcp(S_ISN + 1, b"clock: 12:01"), "s") == [
        Drop("s", DropReason.PASSTHROUGH)
    ]
    assert pair.primary(tcp(P_ISN + 1, b"x", sport=81), "other") == []


def test_ipv6_tcp() -> None:
    from craft import GUEST6, PEER6

    pair = Pair()
    pair.primary(tcp(P_ISN, flags=SYN | ACK, src=GUEST6, dst=PEER6), "p-syn")
    pair.secondary(tcp(S_ISN, flags=SYN | ACK, src=GUEST6, dst=PEER6), "s-syn")
    pair.primary(tcp(P_ISN + 1, b"hello", src=GUEST6, dst=PEER6), "p1")
    pair.secondary(tcp(S_ISN + 1, b"hellO", src=GUEST6, dst=PEER6), "s1")
    (needed,) = pair.checkpoints()
    assert str(needed.flow) == "tcp [fd00::1]:80 -> [fd00::9]:40000"
    assert needed.evidence is not None and needed.evidence.offset == 4


def test_an_unsynced_checkpoint_keeps_the_learned_isn_offset() -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"abc"), "p1")
    pair.secondary(tcp(S_ISN + 1, b"abX"), "s1")
    assert [e.token for e in pair.comparator.checkpoint_completed(0, synced=False)] == ["p1"]
    pair.primary(tcp(P_ISN + 4, b"def"), "p2")
    assert pair.secondary(tcp(S_ISN + 4, b"def"), "s2") == [
        Drop("s2", DropReason.COMPARED),
        Release("p2", ReleaseReason.MATCHED),
    ]
    assert (
        pair.comparator.isn_offset(bytes([10, 0, 0, 1]), 80, bytes([10, 0, 0, 9]), 40000)
        == (S_ISN - P_ISN) % 2**32
    )


def test_isns_are_learned_during_a_checkpoint() -> None:
    pair = Pair()
    pair.comparator.checkpoint_started(0)
    pair.primary(tcp(P_ISN, flags=SYN | ACK), "p-syn")
    pair.secondary(tcp(S_ISN, flags=SYN | ACK), "s-syn")
    pair.comparator.checkpoint_completed(0, synced=False)
    assert (
        pair.comparator.isn_offset(bytes([10, 0, 0, 1]), 80, bytes([10, 0, 0, 9]), 40000)
        == (S_ISN - P_ISN) % 2**32
    )


def test_a_new_connection_on_the_same_ports_does_not_inherit_verified_bytes() -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, DATA[:500]), "old-p")
    pair.secondary(tcp(S_ISN + 1, DATA[:500]), "old-s")
    assert pair.released() == ["p-syn", "old-p"]
    # the four-tuple is reused with new ISNs; [0, 500) was verified for the old connection
    pair.primary(tcp(7, flags=SYN | ACK), "new-p-syn")
    pair.primary(tcp(8, b"new bytes"), "new-p")
    assert pair.released() == ["p-syn", "old-p"]  # nothing of the new one released unchecked
    pair.secondary(tcp(99, flags=SYN | ACK), "new-s-syn")
    pair.secondary(tcp(100, b"new bytes"), "new-s")
    assert pair.released() == ["p-syn", "old-p", "new-p-syn", "new-p"]


def test_isn_offsets_are_learned_from_the_syns_and_zero_after_a_synced_checkpoint() -> None:
    pair = Pair()
    pair.primary(tcp(P_ISN, flags=SYN | ACK), "p-syn")
    pair.secondary(tcp(S_ISN, flags=SYN | ACK), "s-syn")
    guest, peer = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 9])
    assert pair.comparator.isn_offset(guest, 80, peer, 40000) == (S_ISN - P_ISN) % 2**32
    pair.comparator.checkpoint_completed(0)  # synced: the secondary now has the primary's ISN
    assert pair.comparator.isn_offset(guest, 80, peer, 40000) == 0


def test_packets_sent_after_the_checkpoint_ended_are_compared_not_released() -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"abc"), "p1")
    pair.comparator.checkpoint_started(1.0)
    pair.primary(tcp(P_ISN + 4, b"def"), "before-stop")  # in flight from before the stop
    pair.secondary(tcp(S_ISN + 4, b"old"), "stale")  # the old epoch: never compared
    # the guests resumed at 2.0; the shell hears of it at 2.5
    pair.now = 2.2
    pair.primary(tcp(P_ISN + 7, b"ghi"), "after-resume")
    pair.secondary(tcp(P_ISN + 7, b"ghX"), "s-after-resume")  # synced: the primary's ISN
    events = pair.comparator.checkpoint_completed(2.5, resumed=2.0)
    assert [e.token for e in events if isinstance(e, Release)] == ["p1", "before-stop"]
    (needed,) = [e for e in events if isinstance(e, CheckpointNeeded)]
    assert needed.reason is Reason.PAYLOAD  # "ghi" vs "ghX" was compared, not released
    assert not any(isinstance(e, Drop) and e.token is None for e in events)


def test_a_gibibyte_in_one_epoch_asks_for_a_checkpoint_that_rebases_the_offsets() -> None:
    """Offsets are 32-bit distances: before they could wrap onto ranges verified in the same
    epoch (and release bytes unchecked), a checkpoint moves their base forward."""
    from coloproxy.compare.tcp import REBASE_AT

    pair = Pair()
    handshake(pair)
    far = P_ISN + 1 + REBASE_AT  # the stream has moved 1 GiB since the SYN
    pair.primary(tcp(far, b"abc"), "p-far")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.OVERFLOW
    assert needed.evidence is not None and needed.evidence.offset == REBASE_AT + 3
    pair.comparator.checkpoint_completed(pair.now)  # synced: the secondary shares the base
    pair.primary(tcp(far + 3, b"defg"), "p-next")
    pair.secondary(tcp(far + 3, b"deXg"), "s-next")
    (_, diverged) = pair.checkpoints()
    assert diverged.reason is Reason.PAYLOAD
    assert diverged.evidence is not None and diverged.evidence.offset == 2  # near the new base
    assert pair.comparator.isn_offset(bytes([10, 0, 0, 1]), 80, bytes([10, 0, 0, 9]), 40000) == 0


def test_a_retransmitted_syn_after_a_rebase_is_not_a_new_connection() -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"abc"), "p1")
    pair.secondary(tcp(S_ISN + 1, b"abc"), "s1")
    pair.comparator.checkpoint_completed(pair.now, synced=False)  # rebased by 3 bytes
    pair.primary(tcp(P_ISN, flags=SYN | ACK), "p-syn-again")
    pair.secondary(tcp(S_ISN, flags=SYN | ACK), "s-syn-again")
    pair.primary(tcp(P_ISN + 4, b"def"), "p2")
    pair.secondary(tcp(S_ISN + 4, b"def"), "s2")
    assert pair.checkpoints() == []
    assert pair.released()[-2:] == ["p-syn-again", "p2"]


# -- split: a held GSO packet cut into segments --------------------------------------------

GSO_DATA = bytes(range(256)) * 40  # 10 240 bytes: longer than any 1500-byte MTU's segment


def test_a_gso_packet_the_secondary_covers_only_in_part_is_split_then_released_in_order() -> None:
    # The SVM sent 6000 of the PVM's 10 240 bytes and waits for the client's ACK of them,
    # which comes only once the PVM's packet is released: the packet goes back to the kernel
    # to be cut into segments, and the verified ones leave at once.
    pair = Pair(split_after=0.02)
    handshake(pair)
    (gso,) = stream(P_ISN, GSO_DATA, [])
    later = tcp(P_ISN + 1 + len(GSO_DATA), b"later", ack=1000)
    assert pair.primary(gso, "gso") == []
    assert pair.primary(later, "later") == []
    for number, segment in enumerate(stream(S_ISN, GSO_DATA[:6000], [1448 * k for k in range(5)])):
        pair.secondary(segment, f"s{number}")
    assert pair.advance(0.019) == []
    assert pair.advance(0.001) == [Split("gso")]
    # The SVM catches up before the segments are back: "later" still waits for them (stream
    # order; the client would see a hole and the PVM might retransmit into it).
    pair.secondary(stream(S_ISN, GSO_DATA, [6000])[1], "rest")
    pair.secondary(tcp(S_ISN + 1 + len(GSO_DATA), b"later", ack=1000), "s-later")
    assert pair.released()[1:] == []
    segments = stream(P_ISN, GSO_DATA, list(range(0, len(GSO_DATA), 1448)))
    for number, segment in enumerate(segments[:3]):
        pair.primary(segment, f"p{number}")
    assert pair.released()[1:] == ["p0", "p1", "p2"]
    for number, segment in enumerate(segments[3:], start=3):
        pair.primary(segment, f"p{number}")
    assert pair.released()[1:] == [f"p{number}" for number in range(len(segments))] + ["later"]
    assert pair.checkpoints() == []


def test_no_split_without_split_after_or_below_the_mtu() -> None:
    for settings, data in (({"split_after": None}, GSO_DATA), ({}, GSO_DATA[:1400])):
        pair = Pair(**settings)
        handshake(pair)
        pair.primary(stream(P_ISN, data, [])[0], "held")
        pair.secondary(stream(S_ISN, data[:100], [])[0], "part")
        assert not [e for e in pair.advance(0.5) if isinstance(e, Split)]


# -- ack-lag: a verified segment held for the secondary's ACK ------------------------------


def test_a_verified_segment_whose_ack_the_secondary_lacks_asks_for_a_checkpoint() -> None:
    # The SVM dropped client data the PVM took (its window had closed): the PVM's ACK of it
    # is held by ACK gating, and the client resends only at its RTO. A checkpoint repairs it.
    pair = Pair(ack_lag_timeout=0.1)
    handshake(pair)
    assert pair.primary(tcp(P_ISN + 1, b"ok", ack=5000), "p-ack") == []
    assert pair.secondary(tcp(S_ISN + 1, b"ok", ack=1000), "s-ack") == [
        Drop("s-ack", DropReason.COMPARED)
    ]
    assert pair.advance(0.099) == []
    (needed,) = pair.advance(0.001)
    assert isinstance(needed, CheckpointNeeded) and needed.reason is Reason.ACK_LAG
    assert pair.released()[1:] == []  # still held: the checkpoint releases it
    assert pair.advance(1.0) == []  # one request per flow and epoch


def test_no_ack_lag_when_the_secondarys_ack_comes_in_time_or_the_bytes_wait() -> None:
    pair = Pair(ack_lag_timeout=0.1)
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"ok", ack=5000), "p-ack")
    pair.secondary(tcp(S_ISN + 1, b"ok", ack=1000), "s-data")
    pair.advance(0.05)
    pair.secondary(tcp(S_ISN + 3, b"", ack=5000), "s-ack")
    assert pair.released()[1:] == ["p-ack"]
    # Bytes the secondary has not sent yet are compare_timeout's, not ack-lag's.
    pair.primary(tcp(P_ISN + 3, b"more", ack=6000), "p-more")
    assert [e for e in pair.advance(0.5) if isinstance(e, CheckpointNeeded)] == []


# -- retransmissions of compared bytes ---------------------------------------------------------


def _verified_pair(**settings: object) -> Pair:
    """[0, 100) sent and matched on both sides, p1 released."""
    pair = Pair(**settings)
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, DATA[:100]), "p1")
    pair.secondary(tcp(S_ISN + 1, DATA[:100]), "s1")
    assert pair.released() == ["p-syn", "p1"]
    return pair


def _changed(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0xFF
    return bytes(out)


def test_a_primary_resend_of_verified_bytes_with_other_bytes_is_a_divergence() -> None:
    """sendfile or zero-copy pages can change under a retransmission: the resend is output
    the secondary never produced, so it is compared, not released."""
    pair = _verified_pair()
    assert pair.primary(tcp(P_ISN + 1 + 10, _changed(DATA[10:30], 5)), "p-resend") != []
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.RETRANSMISSION
    assert needed.evidence is not None and needed.evidence.offset == 15
    assert pair.released() == ["p-syn", "p1"]
    assert pair.comparator.checkpoint_completed(pair.now) == [
        Release("p-resend", ReleaseReason.CHECKPOINT)
    ]


def test_an_equal_primary_resend_of_verified_bytes_is_released() -> None:
    pair = _verified_pair()
    assert pair.primary(tcp(P_ISN + 1 + 10, DATA[10:30]), "p-resend") == [
        Release("p-resend", ReleaseReason.MATCHED)
    ]
    assert pair.checkpoints() == []


def test_a_secondary_resend_of_verified_bytes_with_other_bytes_is_a_divergence() -> None:
    pair = _verified_pair()
    pair.secondary(tcp(S_ISN + 1 + 90, _changed(DATA[90:100], 0)), "s-resend")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.RETRANSMISSION
    assert needed.evidence is not None and needed.evidence.offset == 90


def test_primary_a_then_b_at_the_same_range_is_a_divergence_whatever_the_secondary_sends() -> None:
    """Both versions would be released against the secondary's A before: the client gets
    whichever arrives first."""
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, DATA[:50]), "p-a")
    pair.primary(tcp(P_ISN + 1, _changed(DATA[:50], 7)), "p-b")
    pair.secondary(tcp(S_ISN + 1, DATA[:50]), "s-a")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.RETRANSMISSION
    assert pair.released() == ["p-syn"]
    released = pair.comparator.checkpoint_completed(pair.now)
    assert [e.token for e in released] == ["p-a", "p-b"]


def test_secondary_a_then_b_before_the_primary_is_a_divergence() -> None:
    pair = Pair()
    handshake(pair)
    pair.secondary(tcp(S_ISN + 1, DATA[:50]), "s-a")
    pair.secondary(tcp(S_ISN + 1 + 20, _changed(DATA[20:50], 0)), "s-b")
    pair.primary(tcp(P_ISN + 1, DATA[:50]), "p")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.RETRANSMISSION
    assert pair.released() == ["p-syn"]


def test_a_primary_resend_of_verified_bytes_no_longer_kept_is_held_for_a_checkpoint() -> None:
    """Past retransmit_window the verified bytes are forgotten: a resend of them cannot be
    compared, so it is not released; it waits for the checkpoint it asks for."""
    pair = Pair(retransmit_window=100)
    handshake(pair)
    for index in range(4):  # four segments of 100: only the last is kept
        low = index * 100
        pair.primary(tcp(P_ISN + 1 + low, DATA[low : low + 100]), f"p{index}")
        pair.secondary(tcp(S_ISN + 1 + low, DATA[low : low + 100]), f"s{index}")
    assert pair.released() == ["p-syn", "p0", "p1", "p2", "p3"]
    assert pair.comparator.stats().kept_bytes == 100
    assert pair.primary(tcp(P_ISN + 1 + 350, DATA[350:400]), "p-kept") == [
        Release("p-kept", ReleaseReason.MATCHED)
    ]
    pair.secondary(tcp(S_ISN + 1 + 10, _changed(DATA[10:20], 0)), "s-unkept")  # not compared
    assert pair.checkpoints() == []
    pair.primary(tcp(P_ISN + 1 + 10, DATA[10:20]), "p-unkept")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.RETRANSMISSION_UNKEPT
    assert needed.evidence is not None and needed.evidence.offset == 10
    assert pair.released() == ["p-syn", "p0", "p1", "p2", "p3", "p-kept"]
    assert pair.comparator.checkpoint_completed(pair.now) == [
        Release("p-unkept", ReleaseReason.CHECKPOINT)
    ]


def test_the_global_bound_on_kept_bytes_forgets_the_oldest_first() -> None:
    pair = Pair(max_retransmit_bytes=150)
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, DATA[:100]), "p1")
    pair.secondary(tcp(S_ISN + 1, DATA[:100]), "s1")
    other = {"dport": 40001}
    pair.primary(tcp(P_ISN, flags=SYN | ACK, **other), "q-syn")  # type: ignore[arg-type]
    pair.secondary(tcp(S_ISN, flags=SYN | ACK, **other), "r-syn")  # type: ignore[arg-type]
    pair.primary(tcp(P_ISN + 1, DATA[:100], **other), "q1")  # type: ignore[arg-type]
    pair.secondary(tcp(S_ISN + 1, DATA[:100], **other), "r1")  # type: ignore[arg-type]
    assert pair.comparator.stats().kept_bytes == 100  # the first connection's were forgotten
    pair.primary(tcp(P_ISN + 1, DATA[:10], **other), "q-resend")  # type: ignore[arg-type]
    assert pair.checkpoints() == []
    pair.primary(tcp(P_ISN + 1, DATA[:10]), "p-resend")
    assert [c.reason for c in pair.checkpoints()] == [Reason.RETRANSMISSION_UNKEPT]
    assert pair.released()[-1] == "q-resend"


def test_kept_bytes_are_forgotten_at_a_checkpoint_and_with_their_connection() -> None:
    pair = _verified_pair(flow_idle_timeout=10.0)
    assert pair.comparator.stats().kept_bytes == 100
    pair.comparator.checkpoint_completed(pair.now)
    assert pair.comparator.stats().kept_bytes == 0
    pair.primary(tcp(P_ISN + 101, DATA[100:200]), "p2")
    pair.secondary(tcp(P_ISN + 101, DATA[100:200]), "s2")  # synced: the primary's numbers
    assert pair.released()[-1] == "p2"
    assert pair.comparator.stats().kept_bytes == 100
    pair.advance(100.0)
    assert pair.comparator.stats().flows == 0
    assert pair.comparator.stats().kept_bytes == 0


# -- a RST after a FIN ---------------------------------------------------------------------


def _closed_pair(**settings: object) -> Pair:
    """Equal bytes and equal FINs on both sides, all released."""
    pair = Pair(**settings)
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"bye", flags=FIN | ACK), "p-fin")
    pair.secondary(tcp(S_ISN + 1, b"bye", flags=FIN | ACK), "s-fin")
    assert pair.released() == ["p-syn", "p-fin"]
    return pair


def test_a_secondary_rst_after_its_fin_without_one_from_the_primary_is_a_fate_divergence() -> None:
    """The secondary's client would see the connection aborted, the primary's a clean close."""
    pair = _closed_pair()
    pair.secondary(tcp(S_ISN + 5, flags=RST), "s-rst")
    assert pair.advance(1.0) == []  # the primary may still reset: it runs behind at times
    pair.advance(3.0)
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.FATE
    assert needed.evidence is not None and needed.evidence.offset == 4
    assert "RST" in needed.evidence.detail


def test_a_primary_rst_after_its_fin_waits_for_the_secondary_rst() -> None:
    pair = _closed_pair()
    assert pair.primary(tcp(P_ISN + 5, flags=RST), "p-rst") == []
    pair.advance(3.0)
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.TIMEOUT
    assert pair.released() == ["p-syn", "p-fin"]


def test_rsts_after_fins_on_both_sides_are_released() -> None:
    for secondary_first in (False, True):
        pair = _closed_pair()
        if secondary_first:
            pair.secondary(tcp(S_ISN + 5, flags=RST), "s-rst")
            pair.primary(tcp(P_ISN + 5, flags=RST), "p-rst")
        else:
            pair.primary(tcp(P_ISN + 5, flags=RST), "p-rst")
            pair.secondary(tcp(S_ISN + 5, flags=RST), "s-rst")
        pair.advance(10.0)
        assert pair.checkpoints() == []
        assert pair.released() == ["p-syn", "p-fin", "p-rst"]


def test_a_rst_whose_fate_differs_is_not_released_as_matched() -> None:
    """Found by bench/fuzz_compare.py: the secondary's RST came with another incarnation's
    sequence number, so it landed before bytes the primary had sent, a fate divergence; the
    primary's RST was released as matched all the same, because the secondary had a RST."""
    pair = _closed_pair()
    assert pair.primary(tcp(P_ISN + 5, flags=RST), "p-rst") == []
    pair.secondary(tcp(S_ISN + 2, flags=RST), "s-rst")  # before the primary's "bye"
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.FATE
    assert pair.released() == ["p-syn", "p-fin"]  # the RST waits for the checkpoint
    pair.comparator.checkpoint_started(pair.now)
    completed = pair.comparator.checkpoint_completed(pair.now, synced=True)
    assert Release("p-rst", ReleaseReason.CHECKPOINT) in completed


def test_a_secondary_fin_the_primary_never_sends_is_a_fate_divergence() -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"abc"), "p1")
    pair.secondary(tcp(S_ISN + 1, b"abc", flags=FIN | ACK), "s1")
    assert pair.released() == ["p-syn", "p1"]
    pair.advance(5.0)
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.FATE


# -- urgent data ---------------------------------------------------------------------------


def test_urgent_data_on_the_primary_only_is_not_released() -> None:
    """A client without SO_OOBINLINE reads a different stream and gets SIGURG."""
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"abc!", flags=PSH | ACK | URG, urgent=4), "p-urg")
    pair.secondary(tcp(S_ISN + 1, b"abc!"), "s")
    assert pair.released() == ["p-syn"]
    pair.advance(5.0)
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.TIMEOUT
    assert needed.evidence is not None and "urgent" in needed.evidence.detail


def test_urgent_data_on_the_secondary_only_is_a_divergence() -> None:
    pair = Pair()
    handshake(pair)
    pair.secondary(tcp(S_ISN + 1, b"abc!", flags=PSH | ACK | URG, urgent=4), "s-urg")
    pair.primary(tcp(P_ISN + 1, b"abc!"), "p")
    pair.advance(5.0)
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.URGENT
    assert needed.evidence is not None and needed.evidence.offset == 4


def test_the_same_urgent_offset_in_other_segments_is_released() -> None:
    """The pointer is relative to each segment's sequence number: what is compared is the
    stream offset it names (4 here), whatever the segmentation."""
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"abc!", flags=PSH | ACK | URG, urgent=4), "p-urg")
    pair.secondary(tcp(S_ISN + 1, b"ab", flags=ACK | URG, urgent=4), "s1")
    pair.secondary(tcp(S_ISN + 3, b"c!", flags=PSH | ACK | URG, urgent=2), "s2")
    pair.primary(tcp(P_ISN + 5, b"more"), "p-after")
    pair.secondary(tcp(S_ISN + 5, b"more"), "s3")
    pair.advance(10.0)
    assert pair.checkpoints() == []
    assert pair.released() == ["p-syn", "p-urg", "p-after"]


def test_urgent_offsets_that_differ_do_not_match() -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, b"abc!", flags=PSH | ACK | URG, urgent=4), "p-urg")
    pair.secondary(tcp(S_ISN + 1, b"abc!", flags=PSH | ACK | URG, urgent=3), "s-urg")
    assert pair.released() == ["p-syn"]


# -- a four-tuple reused ------------------------------------------------------------------


NEW_P_ISN, NEW_S_ISN = 2_000_000, 4_000_000_000
OLD = DATA[:300]
NEW = b"the new connection's bytes"


def _old_then_new(pair: Pair, lagging: str) -> None:
    """The old connection sends OLD and closes; the four-tuple is reused with new ISNs. The
    ``lagging`` side sends the end of the old connection after the other side's new SYN-ACK."""
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, OLD[:200]), "old-p1")
    pair.secondary(tcp(S_ISN + 1, OLD[:200]), "old-s1")
    primary_old = [
        (tcp(P_ISN + 201, OLD[200:], flags=FIN | PSH | ACK), "old-p2"),
        (tcp(P_ISN + 302, flags=ACK, ack=1001), "old-p-last-ack"),
    ]
    secondary_old = [
        (tcp(S_ISN + 201, OLD[200:], flags=FIN | PSH | ACK), "old-s2"),
        (tcp(S_ISN + 302, flags=ACK, ack=1001), "old-s-last-ack"),
    ]
    primary_new = [
        (tcp(NEW_P_ISN, flags=SYN | ACK, ack=5000), "new-p-syn"),
        (tcp(NEW_P_ISN + 1, NEW, flags=FIN | PSH | ACK, ack=5001), "new-p1"),
    ]
    secondary_new = [
        (tcp(NEW_S_ISN, flags=SYN | ACK, ack=5000), "new-s-syn"),
        (tcp(NEW_S_ISN + 1, NEW, flags=FIN | PSH | ACK, ack=5001), "new-s1"),
    ]
    if lagging == "secondary":
        steps = [("p", *primary_old[0]), ("p", *primary_old[1]), ("p", *primary_new[0])]
        steps += [("s", *secondary_old[0]), ("s", *secondary_old[1]), ("s", *secondary_new[0])]
    else:
        steps = [("s", *secondary_old[0]), ("s", *secondary_old[1]), ("s", *secondary_new[0])]
        steps += [("p", *primary_old[0]), ("p", *primary_old[1]), ("p", *primary_new[0])]
    steps += [("p", *primary_new[1]), ("s", *secondary_new[1])]
    for side, packet, token in steps:
        if side == "p":
            pair.primary(packet, token)
        else:
            pair.secondary(packet, token)


@pytest.mark.parametrize("lagging", ["secondary", "primary"])
def test_the_end_of_an_old_connection_after_the_new_syn_ack_stays_with_the_old(
    lagging: str,
) -> None:
    pair = Pair()
    _old_then_new(pair, lagging)
    pair.advance(10.0)
    assert pair.checkpoints() == []
    assert sorted(pair.released()) == sorted(
        ["p-syn", "old-p1", "old-p2", "old-p-last-ack", "new-p-syn", "new-p1"]
    )


def test_a_new_connection_that_differs_still_diverges_while_the_old_one_lingers() -> None:
    pair = Pair()
    handshake(pair)
    pair.primary(tcp(P_ISN + 1, OLD), "old-p")
    pair.primary(tcp(NEW_P_ISN, flags=SYN | ACK), "new-p-syn")
    pair.primary(tcp(NEW_P_ISN + 1, NEW), "new-p1")
    pair.secondary(tcp(S_ISN + 1, OLD), "old-s")
    pair.secondary(tcp(NEW_S_ISN, flags=SYN | ACK), "new-s-syn")
    pair.secondary(tcp(NEW_S_ISN + 1, _changed(NEW, 3)), "new-s1")
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.PAYLOAD
    assert needed.evidence is not None and needed.evidence.offset == 3
    assert pair.released() == ["p-syn", "old-p", "new-p-syn"]


def test_a_side_two_incarnations_behind_is_compared_with_each_in_turn() -> None:
    """The primary opens and closes three connections on one four-tuple before the secondary
    sends anything: each of the secondary's connections is compared with the primary's
    same one, told apart by the peer ISN each SYN-ACK acknowledges."""
    pair = Pair()
    isns = [(P_ISN, S_ISN), (NEW_P_ISN, NEW_S_ISN), (7_000_000, 9_000_000)]
    streams = [OLD, NEW, b"third"]
    for side in ("p", "s"):
        for index, ((p_isn, s_isn), data) in enumerate(zip(isns, streams, strict=True)):
            isn = p_isn if side == "p" else s_isn
            peer = 5000 * (index + 1)  # the client's ISN in this connection
            feed = pair.primary if side == "p" else pair.secondary
            feed(tcp(isn, flags=SYN | ACK, ack=peer + 1), f"{side}{index}-syn")
            feed(tcp(isn + 1, data, flags=FIN | PSH | ACK, ack=peer + 1), f"{side}{index}-fin")
    pair.advance(10.0)
    assert pair.checkpoints() == []
    assert pair.released() == [f"p{index}-{what}" for index in range(3) for what in ("syn", "fin")]


def test_a_syn_ack_answering_another_peer_syn_is_another_connection() -> None:
    """The secondary's first SYN-ACK seen acknowledges another SYN of the client than the
    primary's did: it is not the secondary's side of the primary's connection."""
    pair = Pair()
    pair.primary(tcp(P_ISN, flags=SYN | ACK, ack=5001), "p-syn")
    pair.secondary(tcp(NEW_S_ISN, flags=SYN | ACK, ack=9001), "s-other-syn")
    assert pair.released() == []
    pair.secondary(tcp(S_ISN, flags=SYN | ACK, ack=5001), "s-syn")
    assert pair.released() == ["p-syn"]


# -- found by bench/fuzz_compare.py ----------------------------------------------------------


def test_segments_before_the_syn_ack_of_an_earlier_incarnation_lose_no_primary_packet() -> None:
    """The secondary's data of the first connection comes before its own SYN-ACK, after the
    primary opened a second connection: the SYN-ACK then contradicts the base the data was
    placed by. (That once renewed the earlier incarnation inside itself, and the primary
    packets held there were never released.)"""
    pair = Pair()
    pair.primary(tcp(P_ISN, flags=SYN | ACK, ack=5001), "p0-syn")
    pair.primary(tcp(P_ISN + 1, OLD[:100], ack=5001), "p0-data")
    pair.primary(tcp(NEW_P_ISN, flags=SYN | ACK, ack=9001), "p1-syn")
    pair.secondary(tcp(S_ISN + 51, OLD[50:100], ack=5001), "s0-late-data")
    pair.secondary(tcp(S_ISN, flags=SYN | ACK, ack=5001), "s0-syn")
    pair.secondary(tcp(S_ISN + 1, OLD[:100], ack=5001), "s0-data")
    pair.secondary(tcp(NEW_S_ISN, flags=SYN | ACK, ack=9001), "s1-syn")
    pair.advance(10.0)
    released = pair.released(ReleaseReason.MATCHED)
    released += [
        e.token for e in pair.comparator.checkpoint_completed(pair.now) if isinstance(e, Release)
    ]
    assert sorted(released) == ["p0-data", "p0-syn", "p1-syn"]
    assert "p1-syn" in pair.released(ReleaseReason.MATCHED)


def test_a_syn_contradicting_where_earlier_data_was_placed_releases_none_of_it() -> None:
    """A segment that came before its side's SYN was placed by a base guessed from its own
    sequence number; the SYN names another: the segment's bytes were compared at offsets
    that are not theirs, so a match there proves nothing."""
    pair = Pair()
    pair.primary(tcp(P_ISN + 1 + 16, DATA[:20]), "p-early")  # its number says offset 16
    pair.primary(tcp(P_ISN, flags=SYN | ACK), "p-syn")
    pair.secondary(tcp(S_ISN, flags=SYN | ACK), "s-syn")
    pair.secondary(tcp(S_ISN + 1, DATA[:40]), "s-data")
    assert "p-early" not in pair.released()
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.FATE


def test_syns_during_an_overflow_still_name_the_isns() -> None:
    """At a bound nothing is compared until the checkpoint, but a connection opened meanwhile
    must still be aligned by its SYNs afterwards (here the secondary keeps its own ISN:
    synced=False)."""
    pair = Pair(max_held_packets=2)
    pair.primary(udp_datagram(b"unanswered"), "p-udp")
    pair.primary(udp_datagram(b"unanswered too"), "p-udp2")
    pair.primary(tcp(P_ISN, flags=SYN | ACK), "p-syn")  # past the bound: overflow
    pair.secondary(tcp(S_ISN, flags=SYN | ACK), "s-syn")
    assert [c.reason for c in pair.checkpoints()] == [Reason.OVERFLOW]
    pair.comparator.checkpoint_completed(pair.now, synced=False)
    pair.primary(tcp(P_ISN + 1, DATA[:50]), "p-data")
    pair.secondary(tcp(S_ISN + 1, DATA[:50]), "s-data")
    assert pair.released(ReleaseReason.MATCHED) == ["p-data"]
    assert len(pair.checkpoints()) == 1


def test_ranges_compared_in_place_agree_with_slices() -> None:
    # tcp._same compares ours[low:high] with theirs[at:at + high - low] without slicing where a
    # range is a whole buffer or begins or ends one: every such case, and the general one,
    # against the slices themselves, for equal ranges and for ranges differing in one byte.
    from coloproxy.compare.tcp import _same

    rng = random.Random(14)
    cases = 0
    for _ in range(3000):
        ours = rng.randbytes(rng.randint(1, 40))
        theirs = bytearray(rng.randbytes(rng.randint(1, 40)))
        length = rng.randint(1, min(len(ours), len(theirs)))
        low = rng.choice([0, len(ours) - length, rng.randint(0, len(ours) - length)])
        at = rng.choice([0, len(theirs) - length, rng.randint(0, len(theirs) - length)])
        if rng.random() < 0.6:  # make the ranges equal, then perhaps differ in one byte
            theirs[at : at + length] = ours[low : low + length]
            if rng.random() < 0.5:
                theirs[at + rng.randrange(length)] ^= 0x01
        expected = ours[low : low + length] == bytes(theirs[at : at + length])
        assert _same(ours, low, low + length, bytes(theirs), at) is expected
        cases += expected
    assert 500 < cases < 2500  # both outcomes were exercised


def test_a_rst_of_a_newer_connection_does_not_match_an_older_ones_rst() -> None:
    """Found by bench/fuzz_compare.py: the secondary's RST of its second connection on a
    four-tuple came before its SYN-ACK of it, while the secondary was still in the first; its
    sequence number lay far beyond that connection's, yet it was taken as the first one's RST
    and released the primary's RST of the first connection as matched."""
    pair = Pair()
    pair.primary(tcp(P_ISN, flags=SYN | ACK, ack=5001), "p0-syn")
    pair.primary(tcp(P_ISN + 1, OLD, flags=FIN | PSH | ACK, ack=5001), "p0-fin")
    pair.secondary(tcp(S_ISN, flags=SYN | ACK, ack=5001), "s0-syn")
    pair.secondary(tcp(S_ISN + 1, OLD, flags=FIN | PSH | ACK, ack=5001), "s0-fin")
    assert pair.released() == ["p0-syn", "p0-fin"]
    end = len(OLD) + 2  # after the FIN
    pair.primary(tcp(P_ISN + end, flags=RST), "p0-rst")
    pair.primary(tcp(NEW_P_ISN, flags=SYN | ACK, ack=9001), "p1-syn")
    pair.primary(tcp(NEW_P_ISN + 1, NEW, flags=FIN | PSH | ACK, ack=9001), "p1-fin")
    pair.primary(tcp(NEW_P_ISN + len(NEW) + 2, flags=RST), "p1-rst")
    pair.secondary(tcp(NEW_S_ISN + len(NEW) + 2, flags=RST), "s1-rst")  # before its SYN-ACK
    assert pair.released() == ["p0-syn", "p0-fin"]
    pair.secondary(tcp(NEW_S_ISN, flags=SYN | ACK, ack=9001), "s1-syn")
    pair.secondary(tcp(S_ISN + end, flags=RST), "s0-rst")
    assert pair.released() == ["p0-syn", "p0-fin", "p1-syn", "p0-rst"]
