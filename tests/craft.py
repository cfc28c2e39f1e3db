"""Fast packet builders for core tests (struct, no scapy: hypothesis builds thousands).

Checksums are left zero: the comparator never verifies them (guests with checksum offload
hand over partial checksums), and these packets never reach a real stack.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

GUEST = "10.0.0.1"
PEER = "10.0.0.9"
GUEST6 = "fd00::1"
PEER6 = "fd00::9"

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def _ip(src: str, dst: str, proto: int, body: bytes, ident: int = 0, frag: int = 0) -> bytes:
    source = ipaddress.ip_address(src)
    target = ipaddress.ip_address(dst)
    if source.version == 4:
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, frag, 64, proto, 0,
            source.packed, target.packed,
        )  # fmt: skip
        return header + body
    return (
        struct.pack("!IHBB16s16s", 6 << 28, len(body), proto, 64, source.packed, target.packed)
        + body
    )


def tcp(
    seq: int,
    payload: bytes = b"",
    flags: int = PSH | ACK,
    ack: int = 1000,
    *,
    src: str = GUEST,
    dst: str = PEER,
    sport: int = 80,
    dport: int = 40000,
    window: int = 65535,
    options: bytes = b"",
    urgent: int = 0,
) -> bytes:
    options += b"\x00" * (-len(options) % 4)
    offset = (20 + len(options)) // 4
    header = struct.pack(
        "!HHIIBBHHH", sport, dport, seq % 2**32, ack % 2**32, offset << 4, flags, window, 0, urgent
    )
    return _ip(src, dst, 6, header + options + payload)


def udp(
    payload: bytes, *, src: str = GUEST, dst: str = PEER, sport: int = 53, dport: int = 40000
) -> bytes:
    return _ip(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def icmp_echo_reply(
    ident: int, sequence: int, payload: bytes, *, src: str = GUEST, dst: str = PEER
) -> bytes:
    return _ip(src, dst, 1, struct.pack("!BBHHH", 0, 0, 0, ident, sequence) + payload)


def icmp_echo_request(
    ident: int, sequence: int, payload: bytes, *, src: str = GUEST, dst: str = PEER
) -> bytes:
    return _ip(src, dst, 1, struct.pack("!BBHHH", 8, 0, 0, ident, sequence) + payload)


def icmpv6_echo_reply(
    ident: int, sequence: int, payload: bytes, *, src: str = GUEST6, dst: str = PEER6
) -> bytes:
    return _ip(src, dst, 58, struct.pack("!BBHHH", 129, 0, 0, ident, sequence) + payload)


def raw_ip(proto: int, payload: bytes, *, src: str = GUEST, dst: str = PEER) -> bytes:
    return _ip(src, dst, proto, payload)


def fragments(datagram: bytes, sizes: list[int], ident: int) -> list[bytes]:
    """Cut an IPv4 datagram's payload into fragments of the given sizes (multiples of 8)."""
    header, body = datagram[:20], datagram[20:]
    proto = header[9]
    src = str(ipaddress.ip_address(header[12:16]))
    dst = str(ipaddress.ip_address(header[16:20]))
    out = []
    offset = 0
    for index, size in enumerate(sizes):
        last = index == len(sizes) - 1
        piece = body[offset:] if last else body[offset : offset + size]
        frag = (offset // 8) | (0 if last else 0x2000)
        out.append(_ip(src, dst, proto, piece, ident=ident, frag=frag))
        offset += size
    return out


def stream(isn: int, data: bytes, cuts: list[int], ack: int = 1000) -> list[bytes]:
    """Data segments of one TCP stream (after the SYN at ``isn``), cut at the given offsets."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    return [tcp(isn + 1 + low, data[low:high], ack=ack) for low, high in itertools.pairwise(bounds)]
