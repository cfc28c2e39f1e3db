"""Parse IPv4, IPv6, TCP, UDP, ICMP and ICMPv6 from bytes or a bytearray, without copying.

Theory of operation
-------------------
``parse_ip(data)`` and ``parse_ethernet(data)`` read headers in place with precompiled
``struct`` unpackers and return either a :class:`Packet` (offsets into ``data`` plus the
few header fields the comparator and the rewriter need) or a :class:`Malformed` with a reason
from the closed vocabulary :class:`MalformedReason`. They never raise on any input (I5).

Nothing is copied except the two address fields (``bytes`` slices of 4 or 16 bytes, which are
the flow key). Payload is ``data[packet.payload:packet.end]``; ``end`` is where the IP packet
ends by its own length fields, so Ethernet padding and trailing garbage are not payload.

Checksums are *not* verified: a guest with checksum offload hands the host packets whose
TCP/UDP checksum holds only the pseudo-header sum (virtio-net's CHECKSUM_PARTIAL), so a
checksum mismatch says nothing about the guest's output.

Fragments (IPv4 with MF or a non-zero offset, IPv6 with a non-atomic fragment header) are
parsed to the IP layer only: ``fragment`` is true, ``proto`` is the protocol of the
reassembled datagram, ``l4`` is where the fragment's data starts and the port and TCP fields
stay zero. The comparator reassembles them and parses the result again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, TypeAlias

from mypy_extensions import i64

ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
ETH_P_8021Q: Final = 0x8100
ETH_P_8021AD: Final = 0x88A8

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMPV6: Final = 58
PROTO_NONE_V6: Final = 59
NOT_IP: Final = -1

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10

ETHERNET_HEADER_LEN: Final = 14
# IPv6 extension headers that share the generic "next header, length in 8-octet units" layout
# (RFC 8200 section 4; mobility RFC 6275; HIP RFC 7401; shim6 RFC 5533).
_V6_GENERIC_EXT: Final = frozenset({0, 43, 60, 135, 139, 140})
_V6_FRAGMENT: Final = 44
_V6_AH: Final = 51
# A chain longer than this is treated as hostile: RFC 8200 expects a handful at most.
MAX_V6_EXTENSION_HEADERS: Final = 16
MAX_VLAN_TAGS: Final = 2

_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
# vhl, total length, id, frag field, proto, source, destination: one unpack for the header (no
# slices), the same for bytes and bytearrays. The parsers declare the types of what it returns
# (Any to mypy), so that compiled they check each field once and do the arithmetic on ints.
_V4: Final = struct.Struct("!BxHHHxBxx4s4s")
_V6: Final = struct.Struct("!4xHBx16s16s")  # payload length, next header, source, destination
_TCP: Final = struct.Struct("!HHIIBBH")  # sport, dport, seq, ack, data offset, flags, window
_PORTS: Final = struct.Struct("!HHH")  # sport, dport, UDP length

# What the parsers read: the bytes a queue or the comparator hands over, or the bytearray a
# rewrite shifts in place (coloproxy.packet.shift needs the packet parsed from, or moved onto,
# that very buffer). Not a memoryview: no caller makes one, and this module is compiled
# (coloproxy/variant.py), where the annotation is checked at the call (TypeError).
PacketData: TypeAlias = bytes | bytearray


def be32(data: bytes, at: i64) -> i64:
    """The big-endian 32-bit number in ``data[at:at + 4]`` (the four bytes must be there).

    Compiled, machine arithmetic on the four bytes in place: no slice, no struct tuple, no
    object. The lanes read their fields with it, the chardev framing its lengths."""
    b0: i64 = data[at]
    b1: i64 = data[at + 1]
    b2: i64 = data[at + 2]
    b3: i64 = data[at + 3]
    return (b0 << 24) | (b1 << 16) | (b2 << 8) | b3


class MalformedReason(StrEnum):
    """Why a packet could not be parsed. These strings are also the metric label values."""

    TRUNCATED = "truncated"
    BAD_VERSION = "bad-version"
    BAD_HEADER_LENGTH = "bad-header-length"
    BAD_TOTAL_LENGTH = "bad-total-length"
    BAD_EXTENSION_HEADER = "bad-extension-header"
    BAD_FRAGMENT = "bad-fragment"
    BAD_TCP_OFFSET = "bad-tcp-offset"
    BAD_UDP_LENGTH = "bad-udp-length"
    REASSEMBLY_CONFLICT = "reassembly-conflict"


@dataclass(frozen=True, slots=True)
class Malformed:
    """An input that is not a usable packet, with the closed-vocabulary reason."""

    reason: MalformedReason
    detail: str = ""


class Packet:
    """Offsets into ``data`` and the header fields coloproxy needs; built by the parsers only.

    ``version`` is 4 or 6, or 0 for a non-IP Ethernet frame (then ``proto`` is ``NOT_IP``,
    ``src``/``dst`` are the MAC addresses and the payload is everything after the L2 header).
    ``vlan`` is the outer VLAN id or -1. ``ethertype`` is 0 when parsed from raw IP.
    """

    __slots__ = (
        "ack",
        "data",
        "dport",
        "dst",
        "end",
        "ethertype",
        "flags",
        "frag_id",
        "frag_more",
        "frag_offset",
        "fragment",
        "l3",
        "l4",
        "payload",
        "proto",
        "seq",
        "sport",
        "src",
        "version",
        "vlan",
        "window",
    )

    data: PacketData
    l3: int
    version: int
    ethertype: int
    vlan: int
    proto: int
    src: bytes
    dst: bytes
    l4: int
    end: int
    payload: int
    fragment: bool
    frag_id: int
    frag_offset: int
    frag_more: bool
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int

    def __init__(self, data: PacketData, l3: int, ethertype: int, vlan: int) -> None:
        # The parsers set version, proto, src, dst, l4, end and payload before returning it.
        self.data = data
        self.l3 = l3
        self.ethertype = ethertype
        self.vlan = vlan
        self.fragment = False
        self.frag_id = 0
        self.frag_offset = 0
        self.frag_more = False
        self.sport = 0
        self.dport = 0
        self.seq = 0
        self.ack = 0
        self.flags = 0
        self.window = 0

    @property
    def payload_len(self) -> int:
        return self.end - self.payload

    def payload_bytes(self) -> bytes:
        """A copy of the payload (the comparator keeps these; parsing itself copies nothing)."""
        return bytes(self.data[self.payload : self.end])

    def __repr__(self) -> str:
        return (
            f"Packet(v{self.version} proto={self.proto} {self.src.hex()}:{self.sport}"
            f" -> {self.dst.hex()}:{self.dport} seq={self.seq} ack={self.ack}"
            f" flags={self.flags:#04x} payload={self.payload_len}"
            f"{' fragment' if self.fragment else ''})"
        )


def parse_ip(
    data: PacketData, l3: int = 0, ethertype: int = 0, vlan: int = -1
) -> Packet | Malformed:
    """Parse the IP packet that starts at ``data[l3]``; the version nibble picks v4 or v6."""
    if len(data) <= l3:
        return Malformed(MalformedReason.TRUNCATED, "no IP header")
    version: int = data[l3] >> 4
    if version == 4:
        return _parse_v4(data, l3, ethertype, vlan)
    if version == 6:
        return _parse_v6(data, l3, ethertype, vlan)
    return Malformed(MalformedReason.BAD_VERSION, f"IP version {version}")


def parse_ethernet(data: PacketData) -> Packet | Malformed:
    """Parse an Ethernet II frame, with up to two VLAN tags, carrying IP or anything else."""
    if len(data) < ETHERNET_HEADER_LEN:
        return Malformed(MalformedReason.TRUNCATED, "short Ethernet header")
    ethertype: int = _U16.unpack_from(data, 12)[0]
    offset = ETHERNET_HEADER_LEN
    vlan = -1
    tags = 0
    while ethertype in (ETH_P_8021Q, ETH_P_8021AD):
        tags += 1
        if tags > MAX_VLAN_TAGS or len(data) < offset + 4:
            return Malformed(MalformedReason.TRUNCATED, "VLAN tag")
        if vlan < 0:
            vlan = _U16.unpack_from(data, offset)[0] & 0x0FFF
        ethertype = _U16.unpack_from(data, offset + 2)[0]
        offset += 4
    if ethertype in (ETH_P_IP, ETH_P_IPV6):
        result = parse_ip(data, offset, ethertype, vlan)
        if isinstance(result, Packet) and (result.version == 4) != (ethertype == ETH_P_IP):
            return Malformed(MalformedReason.BAD_VERSION, "IP version does not match ethertype")
        return result
    packet = Packet(data, offset, ethertype, vlan)
    packet.version = 0
    packet.proto = NOT_IP
    packet.dst = bytes(data[0:6])
    packet.src = bytes(data[6:12])
    packet.l4 = offset
    packet.payload = offset
    packet.end = len(data)
    return packet


def _parse_v4(data: PacketData, l3: int, ethertype: int, vlan: int) -> Packet | Malformed:
    if len(data) < l3 + 20:
        return Malformed(MalformedReason.TRUNCATED, "IPv4 header")
    vhl: int
    total: int
    ident: int
    frag: int
    proto: int
    src: bytes
    dst: bytes
    vhl, total, ident, frag, proto, src, dst = _V4.unpack_from(data, l3)
    ihl = (vhl & 0x0F) * 4
    if ihl < 20:
        return Malformed(MalformedReason.BAD_HEADER_LENGTH, f"IHL {ihl}")
    if total < ihl:
        return Malformed(MalformedReason.BAD_TOTAL_LENGTH, f"total length {total} < IHL {ihl}")
    end = l3 + total
    if end > len(data):
        return Malformed(MalformedReason.TRUNCATED, f"IPv4 total length {total}")
    packet = Packet(data, l3, ethertype, vlan)
    packet.version = 4
    packet.proto = proto
    packet.src = src
    packet.dst = dst
    packet.end = end
    l4 = l3 + ihl
    packet.l4 = l4
    frag_offset = (frag & 0x1FFF) * 8
    more = bool(frag & 0x2000)
    if more or frag_offset:
        packet.fragment = True
        packet.frag_id = ident
        packet.frag_offset = frag_offset
        packet.frag_more = more
        packet.payload = l4
        return packet
    return _parse_l4(packet, data, proto, l4, end)


def _parse_v6(data: PacketData, l3: int, ethertype: int, vlan: int) -> Packet | Malformed:
    if len(data) < l3 + 40:
        return Malformed(MalformedReason.TRUNCATED, "IPv6 header")
    payload_length: int
    next_header: int
    src: bytes
    dst: bytes
    payload_length, next_header, src, dst = _V6.unpack_from(data, l3)
    end = l3 + 40 + payload_length
    if end > len(data):
        return Malformed(MalformedReason.TRUNCATED, f"IPv6 payload length {payload_length}")
    packet = Packet(data, l3, ethertype, vlan)
    packet.version = 6
    packet.src = src
    packet.dst = dst
    packet.end = end
    offset = l3 + 40
    # One pass per extension header plus the final one for the upper-layer header.
    for _ in range(MAX_V6_EXTENSION_HEADERS + 1):
        if next_header in _V6_GENERIC_EXT or next_header == _V6_AH:
            if offset + 2 > end:
                return Malformed(MalformedReason.TRUNCATED, "IPv6 extension header")
            if next_header == _V6_AH:
                length = (data[offset + 1] + 2) * 4
            else:
                length = (data[offset + 1] + 1) * 8
            if offset + length > end:
                return Malformed(MalformedReason.BAD_EXTENSION_HEADER, f"header {next_header}")
            next_header = data[offset]
            offset += length
            continue
        if next_header == _V6_FRAGMENT:
            if offset + 8 > end:
                return Malformed(MalformedReason.TRUNCATED, "IPv6 fragment header")
            frag = _U16.unpack_from(data, offset + 2)[0]
            frag_offset = frag & 0xFFF8
            more = bool(frag & 0x0001)
            next_header = data[offset]
            if frag_offset or more:
                packet.proto = next_header
                packet.fragment = True
                packet.frag_id = _U32.unpack_from(data, offset + 4)[0]
                packet.frag_offset = frag_offset
                packet.frag_more = more
                packet.l4 = offset + 8
                packet.payload = offset + 8
                return packet
            offset += 8  # an atomic fragment (RFC 6946): parse on as a whole datagram
            continue
        packet.proto = next_header
        packet.l4 = offset
        return _parse_l4(packet, data, next_header, offset, end)
    return Malformed(MalformedReason.BAD_EXTENSION_HEADER, "extension header chain too long")


def _parse_l4(
    packet: Packet, data: PacketData, proto: int, l4: int, end: int
) -> Packet | Malformed:
    if proto == PROTO_TCP:
        if l4 + 20 > end:
            return Malformed(MalformedReason.TRUNCATED, "TCP header")
        sport: int
        dport: int
        seq: int
        ack: int
        offset: int
        flags: int
        window: int
        sport, dport, seq, ack, offset, flags, window = _TCP.unpack_from(data, l4)
        doff = (offset >> 4) * 4
        if doff < 20 or l4 + doff > end:
            return Malformed(MalformedReason.BAD_TCP_OFFSET, f"data offset {doff}")
        packet.sport = sport
        packet.dport = dport
        packet.seq = seq
        packet.ack = ack
        packet.flags = flags
        packet.window = window
        packet.payload = l4 + doff
        return packet
    if proto == PROTO_UDP:
        if l4 + 8 > end:
            return Malformed(MalformedReason.TRUNCATED, "UDP header")
        length: int
        sport, dport, length = _PORTS.unpack_from(data, l4)
        if length < 8 or l4 + length > end:
            return Malformed(MalformedReason.BAD_UDP_LENGTH, f"UDP length {length}")
        packet.sport = sport
        packet.dport = dport
        packet.payload = l4 + 8
        packet.end = l4 + length
        return packet
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        if l4 + 4 > end:
            return Malformed(MalformedReason.TRUNCATED, "ICMP header")
    # ICMP is compared whole (type, code and body); other protocols as opaque payload.
    packet.payload = l4
    return packet
