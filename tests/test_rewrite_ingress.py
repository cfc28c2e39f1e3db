"""Queue S-in rewrite: the client's ACK and SACK moved into the secondary's sequence space."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from coloproxy.rewrite import IngressRewriter, RewriteStatus

CLIENT, GUEST = "10.0.0.9", "10.0.0.1"
OFFSET = 2**32 - 1000  # secondary ISN - primary ISN, wrapping


def lookup_table(table: dict[tuple[bytes, int, bytes, int], int], ts_offset: int = 0):  # type: ignore[no-untyped-def]
    def lookup(
        guest: bytes, guest_port: int, peer: bytes, peer_port: int, vlan: int
    ) -> tuple[int, int] | None:
        offset = table.get((guest, guest_port, peer, peer_port))
        return None if offset is None else (offset, ts_offset)

    return lookup


def rewriter(offset: int | None = OFFSET) -> IngressRewriter:
    table = (
        {} if offset is None else {(bytes([10, 0, 0, 1]), 80, bytes([10, 0, 0, 9]), 40000): offset}
    )
    return IngressRewriter(lookup_table(table))


def client_segment(ack: int, sack: list[tuple[int, int]] | None = None, flags: str = "A") -> bytes:
    options = (
        [("NOP", None), ("NOP", None), ("SAck", tuple(v for block in sack for v in block))]
        if sack
        else []
    )
    return bytes(
        IP(src=CLIENT, dst=GUEST)
        / TCP(sport=40000, dport=80, seq=5, ack=ack, flags=flags, options=options)
        / b"GET / HTTP/1.0\r\n\r\n"
    )


def test_ack_and_sack_are_shifted_and_the_checksum_stays_right() -> None:
    outcome = rewriter().rewrite(client_segment(ack=500, sack=[(1500, 2000), (3000, 3500)]))
    assert outcome.status is RewriteStatus.SHIFTED
    assert outcome.payload is not None
    packet = IP(outcome.payload)
    assert packet[TCP].ack == (500 + OFFSET) % 2**32
    sack = dict(packet[TCP].options)["SAck"]
    assert sack == tuple((v + OFFSET) % 2**32 for v in (1500, 2000, 3000, 3500))
    assert packet[TCP].seq == 5  # the client's own numbers are the same for both guests
    expected = IP(outcome.payload)
    del expected[TCP].chksum
    assert IP(bytes(expected))[TCP].chksum == packet[TCP].chksum


def test_partial_checksum_is_computed_afresh() -> None:
    original = client_segment(ack=500)
    outcome = rewriter().rewrite(original, checksum_partial=True)
    assert outcome.payload is not None
    rebuilt = IP(outcome.payload)
    check = rebuilt.copy()
    del check[TCP].chksum
    assert IP(bytes(check))[TCP].chksum == rebuilt[TCP].chksum


@pytest.mark.parametrize(
    ("data", "offset", "status"),
    [
        (
            bytes(IP(src=CLIENT, dst=GUEST) / UDP(sport=1, dport=2) / b"x"),
            OFFSET,
            RewriteStatus.NOT_TCP,
        ),
        (client_segment(ack=0, flags="S"), OFFSET, RewriteStatus.NO_ACK),
        (client_segment(ack=500), None, RewriteStatus.NO_OFFSET),
        (client_segment(ack=500), 0, RewriteStatus.ZERO_OFFSET),
        (b"\x45\x00", OFFSET, RewriteStatus.MALFORMED),
    ],
)
def test_packets_that_pass_unchanged(
    data: bytes, offset: int | None, status: RewriteStatus
) -> None:
    outcome = rewriter(offset).rewrite(data)
    assert outcome.status is status
    assert outcome.payload is None


def test_ipv6() -> None:
    guest6, client6 = "fd00::1", "fd00::9"
    import ipaddress

    table = {
        (ipaddress.ip_address(guest6).packed, 80, ipaddress.ip_address(client6).packed, 40000): 10
    }
    outcome = IngressRewriter(lookup_table(table)).rewrite(
        bytes(IPv6(src=client6, dst=guest6) / TCP(sport=40000, dport=80, ack=7, flags="A"))
    )
    assert outcome.payload is not None
    assert IPv6(outcome.payload)[TCP].ack == 17


def test_the_timestamp_echo_is_moved_into_the_secondarys_timestamp_space() -> None:
    table = {(bytes([10, 0, 0, 1]), 80, bytes([10, 0, 0, 9]), 40000): 100}
    rewriter = IngressRewriter(lookup_table(table, ts_offset=2**32 - 3))
    segment = bytes(
        IP(src=CLIENT, dst=GUEST)
        / TCP(
            sport=40000,
            dport=80,
            seq=5,
            ack=500,
            flags="A",
            options=[("NOP", None), ("NOP", None), ("Timestamp", (777, 1000))],
        )
    )
    outcome = rewriter.rewrite(segment)
    assert outcome.payload is not None
    packet = IP(outcome.payload)
    assert dict(packet[TCP].options)["Timestamp"] == (777, 997)  # TSval is the client's own
    assert packet[TCP].ack == 600
    check = packet.copy()
    del check[TCP].chksum
    assert IP(bytes(check))[TCP].chksum == packet[TCP].chksum


@pytest.mark.parametrize("partial", [False, True])
def test_a_packet_parsed_by_the_caller_is_not_parsed_again_and_the_result_is_the_same(
    partial: bool,
) -> None:
    # The S-in hot path hands shifted_copy the packet it parsed: the copy must come out
    # byte for byte as when shifted_copy parses the copy itself, and the input stays as it was.
    from coloproxy.packet.parse import Packet, parse_ip
    from coloproxy.packet.shift import shift_tcp_ack
    from coloproxy.rewrite.ingress import shifted_copy

    data = client_segment(ack=500, sack=[(1500, 2000)])
    original = bytes(data)

    def shift(buffer, packet, form):  # type: ignore[no-untyped-def]
        return shift_tcp_ack(buffer, packet, OFFSET, checksum=form)

    parsed = parse_ip(data)
    assert isinstance(parsed, Packet)
    reused = shifted_copy(data, partial, shift, parsed)
    fresh = shifted_copy(data, partial, shift)
    assert reused == fresh
    assert reused.status is RewriteStatus.SHIFTED
    assert data == original  # the copy was shifted, not the caller's bytes
    assert parsed.data == reused.payload  # the parsed packet moved onto the copy
    # A packet parsed from other bytes is not taken for this one's: parsed afresh.
    other = parse_ip(client_segment(ack=7))
    assert isinstance(other, Packet)
    assert shifted_copy(data, partial, shift, other) == fresh
