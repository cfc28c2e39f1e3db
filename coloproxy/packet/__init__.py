"""Packet layer (pure): parse and build IP packets from bytes; checksums; TCP rewrites."""

from coloproxy.packet.parse import (
    Malformed,
    MalformedReason,
    Packet,
    parse_ethernet,
    parse_ip,
)

__all__ = ["Malformed", "MalformedReason", "Packet", "parse_ethernet", "parse_ip"]
