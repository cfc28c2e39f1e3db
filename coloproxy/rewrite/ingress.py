"""Queue S-in: shift the client's acknowledgements into the secondary's sequence space.

The client talks to the primary. The secondary receives a copy of every client packet, but
its own TCP connection started from its own ISN, so the client's ACK numbers and SACK edges
(which count the primary's bytes) must be moved by ``secondary ISN - primary ISN`` before the
secondary sees them; otherwise it would answer with challenge ACKs or resets. The timestamp
echo (TSecr) is moved by ``secondary TSval - primary TSval`` at the SYNs as well: Linux 6.x
drops a handshake ACK whose TSecr is not one of the TSvals its SYN-ACKs carried, leaving the
secondary's connection in SYN-RECEIVED (seen in tests/test_proxy_netns.py before this). Like
QEMU's filter-rewriter this runs on the secondary's host. The client's own sequence numbers
are the same for both guests and stay untouched.

Where the offsets come from: the ``OffsetLookup`` given, in the daemon
``SecondaryRewriter.sequence_offsets`` (coloproxy/rewrite/secondary.py), which learns them on
host S; after a checkpoint both guests share ISNs and the offset is 0.

Checksums: a rewritten packet goes back to the kernel through an NFQUEUE verdict with a new
payload, which marks it as needing no checksum completion, so the checksum must be complete.
With a full checksum (the kernel completes checksums before queueing unless the queue asked
for GSO packets) the RFC 1624 update keeps it right. With a partial one (``checksum_partial``)
the whole checksum is computed afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from coloproxy.packet.checksum import (
    ChecksumForm,
    checksum_field_offset,
    tcp_udp_checksum,
)
from coloproxy.packet.parse import PROTO_TCP, TCP_ACK, Malformed, Packet, parse_ip
from coloproxy.packet.shift import ShiftResult, ShiftStatus, shift_tcp_ack

# (guest address, guest port, peer address, peer port, vlan) -> (secondary ISN - primary ISN,
# secondary TSval - primary TSval), or None while the connection's ISNs are not both known
OffsetLookup = Callable[[bytes, int, bytes, int, int], "tuple[int, int] | None"]


class RewriteStatus(StrEnum):
    """What happened to one S-in packet; also the metric label."""

    SHIFTED = "shifted"
    NOT_TCP = "not-tcp"  # passed unchanged: only TCP carries acknowledgements
    NO_ACK = "no-ack"  # passed unchanged: a segment without ACK (the client's SYN)
    NO_OFFSET = "no-offset"  # passed unchanged: connection unknown (after a checkpoint: equal)
    ZERO_OFFSET = "zero-offset"  # passed unchanged: both guests share the ISN
    MALFORMED = "malformed"  # passed unchanged: the secondary's stack judges it as the primary's
    BAD_TCP_OPTIONS = "bad-tcp-options"  # ACK shifted, SACK options unusable
    FRAGMENT = "fragment"  # passed unchanged: no TCP header in this fragment


@dataclass(frozen=True, slots=True)
class RewriteOutcome:
    status: RewriteStatus
    payload: bytes | None = None  # the new packet, or None when it passes unchanged


class IngressRewriter:
    def __init__(self, offsets: OffsetLookup) -> None:
        self._offsets = offsets

    def rewrite(self, data: bytes, checksum_partial: bool = False) -> RewriteOutcome:
        """Rewrite one client -> guest IP packet for the secondary."""
        return self.rewrite_parsed(data, parse_ip(data), checksum_partial)

    def rewrite_parsed(
        self, data: bytes, packet: Packet | Malformed, checksum_partial: bool = False
    ) -> RewriteOutcome:
        """``rewrite`` for a caller that parsed ``data`` already (``parse_ip(data)``).

        ``packet`` is consumed: when the packet is shifted, it ends up describing the
        rewritten copy (its ``data`` and ``ack``), so a caller reads what it needs first."""
        if isinstance(packet, Malformed):
            return RewriteOutcome(RewriteStatus.MALFORMED)
        if packet.proto != PROTO_TCP:
            return RewriteOutcome(RewriteStatus.NOT_TCP)
        if packet.fragment:
            return RewriteOutcome(RewriteStatus.FRAGMENT)
        if not packet.flags & TCP_ACK:
            return RewriteOutcome(RewriteStatus.NO_ACK)
        # The packet goes client -> guest: the guest is its destination.
        offsets = self._offsets(packet.dst, packet.dport, packet.src, packet.sport, packet.vlan)
        if offsets is None:
            return RewriteOutcome(RewriteStatus.NO_OFFSET)
        offset, ts_offset = offsets
        if offset == 0 and ts_offset == 0:
            return RewriteOutcome(RewriteStatus.ZERO_OFFSET)
        return shifted_copy(
            data,
            checksum_partial,
            lambda buffer, packet, form: shift_tcp_ack(
                buffer, packet, offset, checksum=form, tsecr_delta=ts_offset
            ),
            packet,
        )


# An in-place TCP shift of coloproxy.packet.shift, its offsets bound.
Shift = Callable[[bytearray, Packet, ChecksumForm], ShiftResult]


def shifted_copy(
    data: bytes, checksum_partial: bool, shift: Shift, parsed: Packet | None = None
) -> RewriteOutcome:
    """A copy of ``data`` changed by ``shift``, with a complete checksum either way.

    ``parsed``: ``parse_ip(data)`` if the caller has it. It is then not parsed again (the
    copy has the same bytes, so the same offsets): it is moved onto the copy (its ``data``
    becomes the copy, the shift updates its fields), so the caller must not use it after."""
    buffer = bytearray(data)
    packet: Packet | Malformed
    if parsed is not None and parsed.data is data:
        packet = parsed
        packet.data = buffer
    else:
        packet = parse_ip(buffer)
    if not isinstance(packet, Packet):  # the caller parsed it once already: cannot differ
        return RewriteOutcome(RewriteStatus.MALFORMED)
    form = ChecksumForm.PARTIAL if checksum_partial else ChecksumForm.FULL
    result = shift(buffer, packet, form)
    if checksum_partial:
        field = checksum_field_offset(packet)
        buffer[field : field + 2] = tcp_udp_checksum(packet).to_bytes(2, "big")
    status = (
        RewriteStatus.BAD_TCP_OPTIONS
        if result.status is ShiftStatus.BAD_TCP_OPTIONS
        else RewriteStatus.SHIFTED
    )
    return RewriteOutcome(status, bytes(buffer))
