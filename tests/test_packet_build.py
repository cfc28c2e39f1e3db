"""The ICMP errors host S builds for its guest: fields, quoted segment and checksums."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6

from coloproxy.errors import UsageError
from coloproxy.packet.build import tcp_unreachable


def address(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_ipv4_host_unreachable_quotes_the_guests_segment_with_valid_checksums() -> None:
    message = tcp_unreachable(
        address("10.0.0.9"), address("10.0.0.1"), address("10.0.0.9"), 80, 40000, 0xDEADBEEF
    )
    packet = IP(message)
    assert (packet.src, packet.dst, packet[ICMP].type, packet[ICMP].code) == (
        "10.0.0.9",
        "10.0.0.1",
        3,
        1,
    )
    quoted = bytes(packet[ICMP].payload)
    inner = IP(quoted[:20])
    assert (inner.src, inner.dst, inner.proto, inner.ihl) == ("10.0.0.1", "10.0.0.9", 6, 5)
    assert quoted[20:] == struct.pack("!HHI", 80, 40000, 0xDEADBEEF)
    fresh = IP(message)
    del fresh.chksum
    del fresh[ICMP].chksum
    rebuilt = IP(bytes(fresh))
    assert (rebuilt.chksum, rebuilt[ICMP].chksum) == (packet.chksum, packet[ICMP].chksum)


def test_ipv6_no_route_checksum_covers_the_pseudo_header() -> None:
    message = tcp_unreachable(address("fd::9"), address("fd::1"), address("fd::9"), 80, 4, 7)
    packet = IPv6(message)
    error = packet[ICMPv6DestUnreach]
    assert (packet.nh, packet.plen, error.type, error.code) == (58, 56, 1, 0)
    assert bytes(error.payload)[40:] == struct.pack("!HHI", 80, 4, 7)
    fresh = IPv6(message)
    del fresh[ICMPv6DestUnreach].cksum
    assert IPv6(bytes(fresh))[ICMPv6DestUnreach].cksum == error.cksum


@pytest.mark.parametrize(
    ("addresses", "ports", "number"),
    [
        ((address("10.0.0.9"), address("fd::1"), address("10.0.0.9")), (80, 1), 0),
        ((b"\x00" * 5,) * 3, (80, 1), 0),
        ((address("10.0.0.9"),) * 3, (70000, 1), 0),
        ((address("10.0.0.9"),) * 3, (80, 1), 1 << 32),
    ],
)
def test_misuse_raises(
    addresses: tuple[bytes, bytes, bytes], ports: tuple[int, int], number: int
) -> None:
    with pytest.raises(UsageError):
        tcp_unreachable(*addresses, *ports, number)
