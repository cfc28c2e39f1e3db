"""UDP, ICMP, other protocols, fragments, malformed input and epochs."""

from __future__ import annotations

import pytest

from coloproxy.compare import (
    CheckpointNeeded,
    CompareConfig,
    Drop,
    DropReason,
    Framing,
    MalformedPacket,
    MalformedPolicy,
    Reason,
    Release,
    ReleaseReason,
)
from coloproxy.packet import MalformedReason
from craft import (
    GUEST6,
    PEER6,
    fragments,
    icmp_echo_reply,
    icmp_echo_request,
    icmpv6_echo_reply,
    raw_ip,
    tcp,
    udp,
)
from test_compare_tcp import Pair


def test_udp_same_datagrams_in_any_order() -> None:
    pair = Pair()
    pair.primary(udp(b"one"), "p1")
    pair.primary(udp(b"two"), "p2")
    assert pair.secondary(udp(b"two"), "s2") == [
        Drop("s2", DropReason.COMPARED),
        Release("p2", ReleaseReason.MATCHED),
    ]
    assert pair.secondary(udp(b"one"), "s1") == [
        Drop("s1", DropReason.COMPARED),
        Release("p1", ReleaseReason.MATCHED),
    ]
    assert pair.secondary(udp(b"three"), "s3") == [Drop("s3", DropReason.COMPARED)]
    assert pair.primary(udp(b"three"), "p3") == [Release("p3", ReleaseReason.MATCHED)]
    assert pair.advance(10) == []


def test_udp_difference_is_a_divergence_after_the_reorder_window() -> None:
    pair = Pair(datagram_reorder_window=0.005)
    pair.primary(udp(b"answer: 42"), "p1")
    pair.secondary(udp(b"answer: 43"), "s1")
    assert pair.comparator.get_timer() == 0.005
    (needed,) = pair.advance(0.005)
    assert isinstance(needed, CheckpointNeeded)
    assert needed.reason is Reason.PAYLOAD
    assert needed.protocol == "udp"
    assert str(needed.flow) == "udp 10.0.0.1:53 -> 10.0.0.9:40000"
    assert needed.evidence is not None
    assert needed.evidence.offset == 9
    assert needed.evidence.primary == b"answer: 42"
    assert needed.evidence.secondary == b"answer: 43"


def test_reordering_within_the_window_is_not_a_divergence() -> None:
    pair = Pair(datagram_reorder_window=0.005)
    pair.primary(udp(b"a"), "p1")
    pair.secondary(udp(b"b"), "s2")
    pair.now += 0.001
    pair.primary(udp(b"b"), "p2")
    pair.secondary(udp(b"a"), "s1")
    assert pair.advance(1) == []
    assert sorted(pair.released()) == ["p1", "p2"]


def test_icmp_echo_replies() -> None:
    pair = Pair()
    pair.primary(icmp_echo_reply(7, 1, b"ping"), "p1")
    pair.secondary(icmp_echo_reply(7, 1, b"ping"), "s1")
    pair.primary(icmp_echo_reply(7, 2, b"ping"), "p2")
    pair.secondary(icmp_echo_reply(7, 2, b"pong"), "s2")
    pair.advance(1)
    (needed,) = pair.checkpoints()
    assert pair.released() == ["p1"]
    assert needed.protocol == "icmp"
    assert str(needed.flow) == "icmp 10.0.0.1 -> 10.0.0.9 echo id 7"


@pytest.mark.parametrize("make", [icmp_echo_reply, icmp_echo_request, icmpv6_echo_reply])
def test_two_ping_sessions_interleaved_differently_are_not_a_divergence(make: object) -> None:
    """Echo flows are keyed by their identifier: session 8 running ahead of session 7 on the
    secondary is two flows each waiting for the other side, not one flow whose datagrams
    differ for longer than the reorder window."""
    assert callable(make)
    pair = Pair()
    pair.primary(make(7, 1, b"seven"), "p7")
    pair.secondary(make(8, 1, b"eight"), "s8")
    assert pair.advance(0.5) == []
    pair.primary(make(8, 1, b"eight"), "p8")
    pair.secondary(make(7, 1, b"seven"), "s7")
    assert pair.advance(10) == []
    assert pair.checkpoints() == []
    assert sorted(pair.released()) == ["p7", "p8"]


def test_an_echo_request_and_a_reply_with_one_identifier_are_two_flows() -> None:
    pair = Pair()
    pair.primary(icmp_echo_request(7, 1, b"same"), "p-request")
    pair.secondary(icmp_echo_reply(7, 1, b"same"), "s-reply")
    pair.advance(10)
    assert pair.released() == []
    assert {c.reason for c in pair.checkpoints()} == {Reason.TIMEOUT, Reason.SECONDARY_ONLY}


def test_other_ip_protocol_is_compared_as_opaque_payload() -> None:
    pair = Pair()
    pair.primary(raw_ip(132, b"sctp-ish"), "p1")
    pair.secondary(raw_ip(132, b"sctp-ish"), "s1")
    pair.primary(raw_ip(132, b"sctp-2"), "p2")
    pair.secondary(raw_ip(132, b"sctp-3"), "s2")
    pair.advance(1)
    assert pair.released() == ["p1"]
    (needed,) = pair.checkpoints()
    assert needed.protocol == "ip-proto-132"


def test_ipv6_udp() -> None:
    pair = Pair()
    pair.primary(udp(b"v6", src=GUEST6, dst=PEER6), "p")
    pair.secondary(udp(b"v6", src=GUEST6, dst=PEER6), "s")
    assert pair.released() == ["p"]


def test_fragments_cut_differently_match_after_reassembly() -> None:
    datagram = udp(bytes(range(200)) * 3)
    pair = Pair()
    for index, fragment in enumerate(fragments(datagram, [200, 200, 200], ident=1)):
        assert pair.primary(fragment, f"p{index}") == []
    secondary = fragments(datagram, [504, 104], ident=99)
    assert pair.secondary(secondary[1], "s1") == [Drop("s1", DropReason.COMPARED)]
    assert pair.secondary(secondary[0], "s0") == [
        Drop("s0", DropReason.COMPARED),
        Release("p0", ReleaseReason.MATCHED),
        Release("p1", ReleaseReason.MATCHED),
        Release("p2", ReleaseReason.MATCHED),
    ]


def test_fragmented_datagrams_that_differ_diverge() -> None:
    pair = Pair()
    for index, fragment in enumerate(fragments(udp(b"x" * 400), [200, 200], ident=1)):
        pair.primary(fragment, f"p{index}")
    for index, fragment in enumerate(fragments(udp(b"x" * 399 + b"y"), [200, 200], ident=2)):
        pair.secondary(fragment, f"s{index}")
    pair.advance(1)
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.PAYLOAD
    assert needed.evidence is not None and needed.evidence.offset == 399
    assert [e.token for e in pair.comparator.checkpoint_completed(pair.now)] == ["p0", "p1"]


def test_overlapping_fragments_that_disagree_are_malformed() -> None:
    pair = Pair()
    first, _ = fragments(udp(b"a" * 400), [200, 200], ident=5)
    conflicting = fragments(udp(b"b" * 400), [200, 200], ident=5)[0]
    pair.primary(first, "p0")
    events = pair.primary(conflicting, "p0-again")
    assert [type(e) for e in events] == [MalformedPacket, CheckpointNeeded]
    assert events[0].reason is MalformedReason.REASSEMBLY_CONFLICT  # type: ignore[union-attr]
    assert [e.token for e in pair.comparator.checkpoint_completed(0)] == ["p0", "p0-again"]


def test_incomplete_primary_datagram_times_out_and_is_released_by_the_checkpoint() -> None:
    pair = Pair(compare_timeout=1.0)
    first, _ = fragments(udp(b"a" * 400), [200, 200], ident=5)
    pair.primary(first, "p0")
    (needed,) = pair.advance(1.0)
    assert isinstance(needed, CheckpointNeeded) and needed.reason is Reason.TIMEOUT
    assert pair.comparator.checkpoint_completed(pair.now) == [
        Release("p0", ReleaseReason.CHECKPOINT)
    ]


def test_fragment_bound_is_an_overflow() -> None:
    pair = Pair(max_fragment_datagrams=2)
    for ident in range(3):
        pair.primary(fragments(udp(b"a" * 400), [200, 200], ident=ident)[0], ident)
    (needed,) = pair.checkpoints()
    assert needed.reason is Reason.OVERFLOW
    assert sorted(e.token for e in pair.comparator.checkpoint_completed(0)) == [0, 1, 2]  # type: ignore[type-var]


def test_malformed_primary_is_held_and_asks_for_a_checkpoint() -> None:
    pair = Pair()
    events = pair.primary(b"\x45\x00\x00", "bad")
    assert events[0] == MalformedPacket(
        events[0].side, "bad", MalformedReason.TRUNCATED, "IPv4 header"
    )  # type: ignore[union-attr]
    assert isinstance(events[1], CheckpointNeeded) and events[1].reason is Reason.MALFORMED
    assert pair.comparator.checkpoint_completed(0) == [Release("bad", ReleaseReason.CHECKPOINT)]


def test_malformed_policy_release() -> None:
    pair = Pair(malformed_policy=MalformedPolicy.RELEASE)
    events = pair.primary(b"\x60", "bad")
    assert events[1:] == [Release("bad", ReleaseReason.MALFORMED)]
    assert pair.checkpoints() == []


def test_malformed_secondary_is_dropped_and_counted() -> None:
    pair = Pair()
    events = pair.secondary(b"\x00" * 30, "bad")
    assert [type(e) for e in events] == [MalformedPacket, Drop]
    assert events[1] == Drop("bad", DropReason.MALFORMED)


def test_ethernet_framing_compares_non_ip_frames_too() -> None:
    arp = bytes.fromhex("ffffffffffff5254000000010806") + b"\x00\x01" * 14
    pair = Pair(framing=Framing.ETHERNET)
    pair.primary(arp, "p")
    pair.secondary(arp, "s")
    assert pair.released() == ["p"]
    ip_frame = bytes.fromhex("5254000000095254000000010800") + udp(b"hi")
    pair.primary(ip_frame, "p-ip")
    pair.secondary(ip_frame, "s-ip")
    assert pair.released() == ["p", "p-ip"]


def test_a_checkpoint_in_progress_stops_comparison() -> None:
    pair = Pair()
    pair.comparator.checkpoint_started(0)
    assert pair.primary(udp(b"x"), "p") == []
    assert pair.secondary(udp(b"x"), "s") == [Drop("s", DropReason.CHECKPOINTING)]
    assert pair.comparator.checkpoint_completed(0) == [Release("p", ReleaseReason.CHECKPOINT)]
    assert pair.comparator.stats().checkpointing is False


def test_config_rejects_nonsense() -> None:
    import pytest

    from coloproxy.compare import PassthroughRule
    from coloproxy.errors import UsageError

    with pytest.raises(UsageError, match="compare_timeout"):
        CompareConfig(compare_timeout=0)
    with pytest.raises(UsageError, match="guest_port"):
        PassthroughRule(guest_port=70000)
    with pytest.raises(UsageError, match="peer_network"):
        PassthroughRule(peer_network="10.0.0.0/33")


def test_stats_report_oldest_held() -> None:
    pair = Pair()
    pair.now = 5.0
    pair.primary(tcp(1, b"a"), "p")
    pair.secondary(tcp(9, b"zz", sport=81), "s")
    stats = pair.comparator.stats()
    assert (stats.oldest_primary, stats.oldest_secondary, stats.held_packets) == (5.0, 5.0, 1)


def test_a_datagram_mismatch_is_one_payload_divergence_even_when_all_timers_expire_at_once() -> (
    None
):
    pair = Pair()
    pair.primary(udp(b"answer 1"), "p1")
    pair.primary(udp(b"answer 2"), "p2")
    pair.secondary(udp(b"answer 1"), "s1")
    pair.secondary(udp(b"answer 3"), "s2")
    pair.log += pair.comparator.handle_timer(float("inf"))
    assert [(c.reason, c.coalesced) for c in pair.checkpoints()] == [(Reason.PAYLOAD, False)]


def test_handle_timer_at_get_timer_always_fires() -> None:
    pair = Pair(secondary_timeout=3.0)
    pair.now = 0.01
    pair.secondary(udp(b"unsolicited"), "s")
    deadline = pair.comparator.get_timer()
    assert deadline is not None
    (needed,) = pair.comparator.handle_timer(deadline)
    assert isinstance(needed, CheckpointNeeded) and needed.reason is Reason.SECONDARY_ONLY
