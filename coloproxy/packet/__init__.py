"""Packet layer (pure): parse and build IP packets from bytes; checksums; TCP rewrites."""

from coloproxy.packet.checksum import (
    ChecksumForm,
    classify_checksum,
    internet_checksum,
    ipv4_header_checksum,
    tcp_udp_checksum,
    update16,
    update32,
)
from coloproxy.packet.parse import (
    Malformed,
    MalformedReason,
    Packet,
    parse_ethernet,
    parse_ip,
)
from coloproxy.packet.shift import ShiftResult, ShiftStatus, shift_tcp_ack, shift_tcp_seq

__all__ = [
    "ChecksumForm",
    "Malformed",
    "MalformedReason",
    "Packet",
    "ShiftResult",
    "ShiftStatus",
    "classify_checksum",
    "internet_checksum",
    "ipv4_header_checksum",
    "parse_ethernet",
    "parse_ip",
    "shift_tcp_ack",
    "shift_tcp_seq",
    "tcp_udp_checksum",
    "update16",
    "update32",
]
