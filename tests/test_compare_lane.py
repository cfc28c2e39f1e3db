"""The comparator's TCP and UDP lanes give exactly the events of the general path.

``Comparator.feed`` reads packets of known IPv4 TCP and UDP flows with one unpack and hands
them straight to the flow (the lanes); everything else is parsed in full (the general path).
The lane is only an optimisation: here the same random inputs (TCP and UDP on several flows,
both framings, VLAN tags, IP options, fragments, truncation, corruption, bounds, passthrough,
timers and checkpoints; resends with other bytes, URG with its pointer, FIN then RST, a
four-tuple reused with new ISNs, ICMP echo sessions) go to a comparator with the lane and to
one with the lane turned off, and every event list, timer and statistic must be equal.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coloproxy.compare import (
    Comparator,
    CompareConfig,
    Drop,
    DropReason,
    Event,
    Framing,
    PassthroughRule,
    Release,
    ReleaseReason,
    Side,
)
from craft import (
    ACK,
    FIN,
    GUEST6,
    PEER6,
    PSH,
    RST,
    SYN,
    URG,
    icmp_echo_reply,
    icmp_echo_request,
    icmpv6_echo_reply,
    tcp,
    udp,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STREAM = bytes((i * 13 + 5) % 251 for i in range(400))
ISNS = {Side.PRIMARY: 4_294_967_000, Side.SECONDARY: 77}
NEW_ISNS = {Side.PRIMARY: 5_000, Side.SECONDARY: 3_000_000_000}
MACS = bytes.fromhex("525400000002525400000001")


def without_lane(config: CompareConfig) -> Comparator:
    comparator = Comparator(config)
    comparator._lanes.min_length = sys.maxsize  # no frame is long enough: general path only
    return comparator


def _ethernet(packet: bytes, draw: st.DrawFn) -> bytes:
    version = packet[0] >> 4 if packet else 4
    ethertype = 0x86DD if version == 6 else 0x0800
    ethertype = draw(st.sampled_from([ethertype, ethertype, ethertype, 0x86DD, 0x0806]))
    tag = b""
    if draw(st.integers(0, 5)) == 0:
        tag = struct.pack("!HH", 0x8100, draw(st.integers(0, 0xFFFF)))
    return MACS + tag + struct.pack("!H", ethertype) + packet


def _with_ip_options(packet: bytes) -> bytes:
    """The same IPv4 packet with a 4-byte header option (IHL 6): the lane must pass it on."""
    header, body = packet[:20], packet[20:]
    total = struct.unpack_from("!H", header, 2)[0] + 4
    return bytes([0x46]) + header[1:2] + struct.pack("!H", total) + header[4:] + b"\x01" * 4 + body


def _mangle(packet: bytes, draw: st.DrawFn) -> bytes:
    """Sometimes change an IPv4 header field so the lanes must pass the packet on."""
    if draw(st.integers(0, 10)) == 0:
        packet = _with_ip_options(packet)
    if draw(st.integers(0, 10)) == 0:  # MF, or a fragment offset, or DF (not a fragment)
        frag = draw(st.sampled_from([0x2000, 0x0001, 0x4000]))
        packet = packet[:6] + struct.pack("!H", frag) + packet[8:]
    if packet[9] == 6 and draw(st.integers(0, 10)) == 0:  # TCP's data offset
        packet = packet[:32] + bytes([draw(st.integers(0, 255))]) + packet[33:]
    if packet[9] == 17 and draw(st.integers(0, 8)) == 0:  # the UDP length
        body = len(packet) - 20
        length = draw(st.sampled_from([0, 7, 8, body - 1, body + 1, 0xFFFF]))
        packet = packet[:24] + struct.pack("!H", max(0, length)) + packet[26:]
    if draw(st.integers(0, 10)) == 0:  # a total length that disagrees with the frame
        total = draw(st.integers(0, len(packet) + 8))
        packet = packet[:2] + struct.pack("!H", total) + packet[4:]
    if draw(st.integers(0, 10)) == 0:  # protocol field
        packet = packet[:9] + bytes([draw(st.sampled_from([6, 17, 1, 0]))]) + packet[10:]
    if draw(st.integers(0, 10)) == 0:  # the version and IHL byte
        packet = bytes([draw(st.integers(0, 255))]) + packet[1:]
    return packet


@st.composite
def tcp_segment(draw: st.DrawFn, side: Side) -> bytes:
    # 40064 shares a slot of the TCP lane's table of recent flows with 40000 (the low bytes
    # of the ports, 80 ^ 0x40 and 80 ^ 0x80, agree in their six low bits).
    port = draw(st.sampled_from([40000, 40000, 40001, 40002, 40064]))
    low = draw(st.integers(0, len(STREAM)))
    high = draw(st.integers(low, min(len(STREAM), low + 60)))
    payload = bytearray(STREAM[low:high])
    if payload and draw(st.integers(0, 15)) == 0:
        # a difference, or on a resend a retransmission with other bytes
        payload[draw(st.integers(0, len(payload) - 1))] ^= 0x40
    # Mostly the first connection on the four-tuple; sometimes a later one (a new ISN), whose
    # SYN starts a new incarnation while the old one's segments may still come.
    isn = draw(st.sampled_from([ISNS[side]] * 4 + [NEW_ISNS[side]]))
    number = isn + 1 + low
    if draw(st.integers(0, 20)) == 0:
        number = draw(st.integers(0, 2**32 - 1))
    flags = draw(
        st.sampled_from(
            [PSH | ACK, PSH | ACK, ACK, 0, SYN | ACK, SYN, FIN | ACK, RST, RST | ACK, URG | ACK]
        )
    )
    if flags & SYN:
        number = isn
    urgent = 0
    if draw(st.integers(0, 8)) == 0:
        flags |= URG
    if flags & URG:  # mostly a pointer to offset 40 of the stream, as both sides would send
        urgent = draw(st.sampled_from([max(0, 40 - low)] * 3 + [0, 0xFFFF, 7]))
    ack = 1000 + draw(st.integers(0, 3)) * 100
    options = draw(st.sampled_from([b"", b"", b"\x01\x01\x08\x0a" + bytes(8)]))
    if draw(st.integers(0, 10)) == 0:
        return tcp(
            number, bytes(payload), flags, ack, src=GUEST6, dst=PEER6, dport=port, urgent=urgent
        )
    packet = tcp(number, bytes(payload), flags, ack, dport=port, options=options, urgent=urgent)
    return _mangle(packet, draw)


@st.composite
def echo_datagram(draw: st.DrawFn) -> bytes:
    """An ICMP or ICMPv6 echo request or reply of one of two sessions (general path only)."""
    make = draw(st.sampled_from([icmp_echo_reply, icmp_echo_request, icmpv6_echo_reply]))
    return make(draw(st.sampled_from([7, 8])), draw(st.integers(1, 3)), b"ping")


@st.composite
def udp_datagram(draw: st.DrawFn) -> bytes:
    port = draw(st.sampled_from([40000, 40001, 40002]))
    low = draw(st.sampled_from([0, 0, 3]))  # mostly the same datagrams on both sides
    payload = STREAM[low : low + draw(st.sampled_from([4, 12, 20, 30]))]
    if draw(st.integers(0, 10)) == 0:
        return udp(payload, src=GUEST6, dst=PEER6, dport=port)
    return _mangle(udp(payload, dport=port), draw)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[CompareConfig, list[tuple[str, Side, bytes]]]:
    config = CompareConfig(
        framing=draw(st.sampled_from(Framing)),
        compare_timeout=draw(st.sampled_from([0.05, 3.0])),
        secondary_timeout=draw(st.sampled_from([None, 0.05, 3.0])),
        datagram_reorder_window=draw(st.sampled_from([0.005, 0.1])),
        max_flows=draw(st.sampled_from([1, 2, 16384, 16384, 16384])),
        max_held_packets=draw(st.sampled_from([3, 4096, 4096, 4096])),
        max_held_bytes=draw(st.sampled_from([40, 90, 64 << 20, 64 << 20, 64 << 20])),
        retransmit_window=draw(st.sampled_from([10, 4 << 20, 4 << 20])),
        max_retransmit_bytes=draw(st.sampled_from([30, 64 << 20, 64 << 20])),
        flow_idle_timeout=draw(st.sampled_from([0.05, 120.0])),
        passthrough=draw(st.sampled_from([(), (PassthroughRule(peer_port=40001),)])),
    )
    steps: list[tuple[str, Side, bytes]] = []
    for _ in range(draw(st.integers(0, 40))):
        side = draw(st.sampled_from(Side))
        action = draw(
            st.sampled_from(["tcp"] * 9 + ["udp"] * 4 + ["echo", "timer", "started", "completed"])
        )
        packet = b""
        if action == "tcp":
            packet = draw(tcp_segment(side))
        elif action == "udp":
            packet = draw(udp_datagram())
        elif action == "echo":
            packet = draw(echo_datagram())
        if draw(st.integers(0, 15)) == 0:
            packet = packet[: draw(st.integers(0, len(packet)))]
        if draw(st.integers(0, 10)) == 0:
            packet += b"\x00" * draw(st.integers(1, 12))  # Ethernet padding
        if action in ("tcp", "udp", "echo") and config.framing is Framing.ETHERNET:
            packet = _ethernet(packet, draw)
        steps.append((action, side, packet))
    return config, steps


def _run(comparator: Comparator, steps: list[tuple[str, Side, bytes]]) -> list[object]:
    """Everything observable: each call's events, the timer after it, and the end state."""
    seen: list[object] = []
    now = 0.0
    handshake = [
        (Side.PRIMARY, tcp(ISNS[Side.PRIMARY], flags=SYN | ACK)),
        (Side.SECONDARY, tcp(ISNS[Side.SECONDARY], flags=SYN | ACK)),
    ]
    for side, packet in handshake:
        if comparator.config.framing is Framing.ETHERNET:
            packet = MACS + b"\x08\x00" + packet  # noqa: PLW2901
        seen.append(comparator.feed(side, packet, now, ("syn", side.value)))
    for index, (action, side, packet) in enumerate(steps):
        now += 0.02
        if action == "timer":
            seen.append(comparator.handle_timer(now))
        elif action == "started":
            seen.append(comparator.checkpoint_started(now))
        elif action == "completed":
            seen.append(comparator.checkpoint_completed(now))
        else:
            seen.append(comparator.feed(side, packet, now, index))
        seen.append(comparator.get_timer())
    seen.append(comparator.stats())
    seen.append(comparator.handle_timer(float("inf")))
    seen.append(comparator.checkpoint_completed(now + 1))
    seen.append(comparator.stats())
    return seen


@SETTINGS
@given(scenario())
def test_lane_and_general_path_give_the_same_events(
    case: tuple[CompareConfig, list[tuple[str, Side, bytes]]],
) -> None:
    config, steps = case
    assert _run(Comparator(config), steps) == _run(without_lane(config), steps)


def _same_with_and_without_lane(
    config: CompareConfig, steps: list[tuple[str, Side, bytes]]
) -> None:
    assert _run(Comparator(config), steps) == _run(without_lane(config), steps)


BOUNDS = [
    pytest.param(CompareConfig(max_held_bytes=40), id="bytes"),
    pytest.param(CompareConfig(max_held_packets=3), id="packets"),
]


@pytest.mark.parametrize("config", BOUNDS)
@pytest.mark.parametrize(
    "make",
    [lambda n: udp(STREAM[n : n + 15]), lambda n: tcp(10 + n * 15, STREAM[n * 15 : n * 15 + 15])],
    ids=["udp", "tcp"],
)
def test_the_lanes_leave_a_packet_past_a_bound_to_the_general_path(
    config: CompareConfig, make: Callable[[int], bytes]
) -> None:
    """Unmatched primary packets fill a bound: the one that passes it saturates."""
    steps = [("feed", Side.PRIMARY, make(n)) for n in range(5)]
    steps += [("feed", Side.SECONDARY, make(n)) for n in range(5)]
    _same_with_and_without_lane(config, steps)


@pytest.mark.parametrize(
    "make", [lambda: udp(STREAM[:20]), lambda: tcp(10, STREAM[:20])], ids=["udp", "tcp"]
)
def test_the_lanes_forget_evicted_flows(make: Callable[[], bytes]) -> None:
    """An idle flow is forgotten after flow_idle_timeout; its next packet makes a new flow."""
    packet = make()
    steps = [
        ("feed", Side.PRIMARY, packet),
        ("feed", Side.SECONDARY, packet),
        *[("timer", Side.PRIMARY, b"")] * 5,
        ("feed", Side.PRIMARY, packet),
        ("feed", Side.SECONDARY, packet),
    ]
    _same_with_and_without_lane(CompareConfig(flow_idle_timeout=0.05), steps)


@pytest.mark.parametrize("framing", list(Framing))
def test_the_lane_takes_in_order_data_of_a_known_connection(framing: Framing) -> None:
    """After the handshake, data segments never reach the parser (so the lane is used)."""
    wrap: Callable[[bytes], bytes] = (
        (lambda packet: MACS + b"\x08\x00" + packet)
        if framing is Framing.ETHERNET
        else (lambda packet: packet)
    )
    comparator = Comparator(CompareConfig(framing=framing))
    primary_isn, secondary_isn = ISNS[Side.PRIMARY], ISNS[Side.SECONDARY]
    comparator.feed(Side.PRIMARY, wrap(tcp(primary_isn, flags=SYN | ACK)), 0.0, "p-syn")
    comparator.feed(Side.SECONDARY, wrap(tcp(secondary_isn, flags=SYN | ACK)), 0.0, "s-syn")

    def no_parsing(data: bytes) -> object:
        raise AssertionError("the general path parsed a segment the lane should have taken")

    comparator._parse = no_parsing  # type: ignore[assignment]
    for index in range(3):
        low, high = index * 100, index * 100 + 100
        primary = wrap(tcp(primary_isn + 1 + low, STREAM[low:high]))
        secondary = wrap(tcp(secondary_isn + 1 + low, STREAM[low:high]))
        assert comparator.feed(Side.PRIMARY, primary, 1.0, f"p{index}") == []
        assert comparator.feed(Side.SECONDARY, secondary, 1.0, f"s{index}") == [
            Drop(f"s{index}", DropReason.COMPARED),
            Release(f"p{index}", ReleaseReason.MATCHED),
        ]


@pytest.mark.parametrize("framing", list(Framing))
def test_the_tcp_lane_keeps_interleaved_connections_apart(framing: Framing) -> None:
    """Connections whose segments interleave, two of them in one slot of the lane's table of
    recent flows (peer ports 40000 and 40064): each segment reaches its own connection. Each
    connection sends other bytes, so a segment taken to another one would be held or differ."""
    wrap: Callable[[bytes], bytes] = (
        (lambda packet: MACS + b"\x08\x00" + packet)
        if framing is Framing.ETHERNET
        else (lambda packet: packet)
    )
    ports = (40000, 40064, 40001)
    # Each connection's ISNs apart from the others' by another distance on each side: a
    # segment taken to another connection lands at an offset its peer's segment does not.
    step = {Side.PRIMARY: 7919, Side.SECONDARY: 104729}
    isns = {
        side: {port: ISNS[side] + n * step[side] for n, port in enumerate(ports)} for side in Side
    }
    comparator = Comparator(CompareConfig(framing=framing))
    for port in ports:
        for side in Side:
            syn = tcp(isns[side][port], flags=SYN | ACK, dport=port)
            comparator.feed(side, wrap(syn), 0.0, ("syn", side.value, port))
    for index in range(4):
        for n, port in enumerate(ports):
            low = index * 50
            payload = bytes([n + 1]) * 50  # this connection's bytes
            tokens = [(side.value, port, index) for side in Side]
            segments = [wrap(tcp(isns[side][port] + 1 + low, payload, dport=port)) for side in Side]
            assert comparator.feed(Side.PRIMARY, segments[0], 1.0, tokens[0]) == []
            assert comparator.feed(Side.SECONDARY, segments[1], 1.0, tokens[1]) == [
                Drop(tokens[1], DropReason.COMPARED),
                Release(tokens[0], ReleaseReason.MATCHED),
            ]
    assert comparator.stats().flows == 3


@pytest.mark.parametrize("framing", list(Framing))
def test_the_lane_takes_datagrams_of_a_known_udp_flow(framing: Framing) -> None:
    wrap: Callable[[bytes], bytes] = (
        (lambda packet: MACS + b"\x08\x00" + packet)
        if framing is Framing.ETHERNET
        else (lambda packet: packet)
    )
    comparator = Comparator(CompareConfig(framing=framing))
    comparator.feed(Side.PRIMARY, wrap(udp(STREAM[:20])), 0.0, "p0")
    comparator.feed(Side.SECONDARY, wrap(udp(STREAM[:20])), 0.0, "s0")

    def no_parsing(data: bytes) -> object:
        raise AssertionError("the general path parsed a datagram the lane should have taken")

    comparator._parse = no_parsing  # type: ignore[assignment]
    for index in range(1, 4):
        datagram = wrap(udp(STREAM[index : index + 20]))
        assert comparator.feed(Side.SECONDARY, datagram, 1.0, f"s{index}") == [
            Drop(f"s{index}", DropReason.COMPARED)
        ]
        assert comparator.feed(Side.PRIMARY, datagram, 1.0, f"p{index}") == [
            Release(f"p{index}", ReleaseReason.MATCHED)
        ]


def test_a_lane_connection_is_forgotten_with_its_flow() -> None:
    """Idle eviction removes a connection from the lane too: it comes back as a new flow."""
    comparator = Comparator(CompareConfig(flow_idle_timeout=1.0))
    comparator.feed(Side.PRIMARY, tcp(10, b"ab"), 0.0, "p1")
    comparator.feed(Side.SECONDARY, tcp(10, b"ab"), 0.0, "s1")
    assert comparator.stats().flows == 1
    comparator.handle_timer(5.0)
    assert comparator.stats().flows == 0
    events: list[Event] = comparator.feed(Side.PRIMARY, tcp(12, b"cd"), 6.0, "p2")
    assert events == []
    assert comparator.stats().flows == 1
