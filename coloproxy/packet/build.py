"""Build the few packets coloproxy sends itself (pure).

Theory of operation
-------------------
Host S sends its guest one kind of packet of its own making, at a takeover: an ICMP
"destination unreachable" about one of the guest's TCP connections
(:func:`tcp_unreachable`), which makes Linux undo one step of that connection's
retransmission backoff and, when the undone timeout has already passed, retransmit at once
(RFC 6069; ``tcp_ld_RTO_revert`` in Linux, docs/data-path.md, "Host S"). The message names
the connection by what it quotes: an IP header from the guest to its peer and the first 8
bytes of a TCP header (ports, sequence number), as a router would quote a segment it could
not deliver (RFC 792, RFC 4443 section 3.1).

The codes are the ones Linux reverts on: ICMP host unreachable (type 3 code 1; net
unreachable, code 0, would do too) and ICMPv6 "no route to destination" (type 1 code 0).
Everything is built with full checksums: nothing offloads them on the way.
"""

from __future__ import annotations

import struct
from typing import Final

from coloproxy.errors import UsageError
from coloproxy.packet.checksum import fold, internet_checksum, ones_sum, pseudo_header_sum
from coloproxy.packet.parse import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP

ICMP_DEST_UNREACH: Final = 3
ICMP_HOST_UNREACH: Final = 1
ICMPV6_DEST_UNREACH: Final = 1
ICMPV6_NOROUTE: Final = 0
TTL: Final = 64
# The quoted datagram claims a bare TCP header (20 bytes): its length is not checked by the
# receiver, which only needs the addresses, the ports and the sequence number.
_QUOTED_TCP_LEN: Final = 20

_IPV4: Final = struct.Struct("!BBHHHBBH4s4s")
_IPV6: Final = struct.Struct("!IHBB16s16s")
_TCP_FIRST_8: Final = struct.Struct("!HHI")


def _ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    header = _IPV4.pack(0x45, 0, 20 + payload_len, 0, 0x4000, TTL, proto, 0, src, dst)
    checksum = internet_checksum(header)
    return header[:10] + checksum.to_bytes(2, "big") + header[12:]


def _ipv6_header(src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    return _IPV6.pack(6 << 28, payload_len, proto, TTL, src, dst)


def tcp_unreachable(
    reporter: bytes, guest: bytes, peer: bytes, guest_port: int, peer_port: int, seq: int
) -> bytes:
    """An IP packet from ``reporter`` to ``guest``: the guest's TCP segment from
    ``guest:guest_port`` to ``peer:peer_port`` with sequence number ``seq`` could not be
    delivered (ICMP host unreachable, or ICMPv6 no route, by the address length)."""
    if not len(reporter) == len(guest) == len(peer) in (4, 16):
        raise UsageError("tcp_unreachable needs three IPv4 or three IPv6 addresses")
    if not (0 <= guest_port <= 0xFFFF and 0 <= peer_port <= 0xFFFF and 0 <= seq < 1 << 32):
        raise UsageError(
            f"tcp_unreachable: ports {guest_port}, {peer_port} or seq {seq} out of range"
        )
    tcp = _TCP_FIRST_8.pack(guest_port, peer_port, seq)
    if len(guest) == 4:
        quoted = _ipv4_header(guest, peer, PROTO_TCP, _QUOTED_TCP_LEN) + tcp
        message = bytes((ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, 0, 0, 0, 0, 0, 0)) + quoted
        checksum = internet_checksum(message)
        message = message[:2] + checksum.to_bytes(2, "big") + message[4:]
        return _ipv4_header(reporter, guest, PROTO_ICMP, len(message)) + message
    quoted = _ipv6_header(guest, peer, PROTO_TCP, _QUOTED_TCP_LEN) + tcp
    message = bytes((ICMPV6_DEST_UNREACH, ICMPV6_NOROUTE, 0, 0, 0, 0, 0, 0)) + quoted
    # RFC 4443 section 2.3: the checksum covers the IPv6 pseudo-header too.
    total = fold(pseudo_header_sum(reporter, guest, PROTO_ICMPV6, len(message)) + ones_sum(message))
    checksum = ~total & 0xFFFF
    message = message[:2] + checksum.to_bytes(2, "big") + message[4:]
    return _ipv6_header(reporter, guest, PROTO_ICMPV6, len(message)) + message
