"""Shift TCP sequence and acknowledgement numbers in place, fixing the checksum incrementally.

Theory of operation
-------------------
On queue S-in, client -> PVM segments are copied to the SVM, whose connection started from a
different ISN; the acknowledgement number and every SACK block edge (RFC 2018) must be moved
by the ISN offset so that the SVM's TCP accepts them (QEMU's filter-rewriter does the same).
:func:`shift_tcp_ack` and :func:`shift_tcp_seq` do that on the ``bytearray`` the packet was
parsed from, without copying, and return a :class:`ShiftResult` instead of raising on bad
input (I5).

Checksum. Only the changed 32-bit fields enter the update, RFC 1624 eqn. 3 (see
:mod:`coloproxy.packet.checksum`), so the cost does not grow with the payload. The words are
counted from the start of the TCP header (the pseudo-header has even length); a SACK edge that
sits at an odd offset, behind a single NOP for example, contributes its bytes swapped (RFC 1071
section 2(B)). A correct checksum stays correct and a wrong one stays exactly as wrong, so a
corrupted segment is still dropped by the receiver.

Partial checksums (checksum offload). With ``VIRTIO_NET_HDR_F_NEEDS_CSUM`` / Linux
``CHECKSUM_PARTIAL`` the field holds the pseudo-header sum, and whoever completes it sums the
whole segment *as it is then*, our rewritten fields included. The sequence, acknowledgement
and SACK fields are not part of the pseudo-header, so the correct partial value after the
rewrite is the unchanged one: an RFC 1624 update would make the completed checksum cover the
old values and be wrong. For a PARTIAL field we therefore leave the checksum alone, exactly as
Linux's ``inet_proto_csum_replace4(..., pseudohdr=false)`` does. The caller that knows the
form (vnet header flags, NFQUEUE's CSUMNOTREADY) passes it; otherwise it is classified from the
bytes (:func:`~coloproxy.packet.checksum.classify_checksum`, always right for full checksums).
Leaving a partial field is only right if something completes it downstream (a virtio guest
receiving with NEEDS_CSUM, a NIC with TX offload). NFQUEUE does not: a verdict with a modified
payload turns the skb into CHECKSUM_NONE (``nfqnl_mangle``), so there the caller must write
:func:`~coloproxy.packet.checksum.tcp_udp_checksum` into the field itself. Without
``NFQA_CFG_F_GSO`` the kernel completes checksums before queueing, so that path sees FULL only.

Malformed options. Options are walked like a receiver walks them (RFC 9293 section 3.2,
Linux ``tcp_parse_options``): EOL ends the list, NOP is one byte, every other kind carries a
length of at least 2 that must stay inside the header. At a length that breaks the framing the
walk stops, as the receiver's does; SACK blocks before that point are shifted (the receiver
uses them) and the result says ``BAD_TCP_OPTIONS``. A SACK option whose length is not 2 + 8n
is ignored by receivers, so it is left untouched and reported the same way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from coloproxy import seq
from coloproxy.errors import UsageError
from coloproxy.packet.checksum import (
    TCP_CHECKSUM_OFFSET,
    ChecksumForm,
    classify_checksum,
    fold,
    update16,
)
from coloproxy.packet.options import find_timestamps
from coloproxy.packet.parse import PROTO_TCP, TCP_ACK, Packet

_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")

TCP_SEQ_OFFSET: Final = 4
TCP_ACK_OFFSET: Final = 8
TCP_OPTIONS_OFFSET: Final = 20
OPTION_EOL: Final = 0
OPTION_NOP: Final = 1
OPTION_SACK: Final = 5
# RFC 2018 section 3: kind, length, then n blocks of two 32-bit edges.
_SACK_BASE: Final = 2
_SACK_BLOCK: Final = 8


class ShiftStatus(StrEnum):
    """What a shift did; the closed vocabulary that is also the metric label."""

    SHIFTED = "shifted"  # every field present was shifted (``fields`` >= 1)
    NOTHING_TO_SHIFT = "nothing-to-shift"  # ACK flag clear and no SACK block: untouched
    BAD_TCP_OPTIONS = "bad-tcp-options"  # malformed options; fields before the defect shifted
    FRAGMENT = "fragment"  # an IP fragment: its TCP header is not parsed; untouched


@dataclass(frozen=True, slots=True)
class ShiftResult:
    """The outcome of one shift; ``fields`` counts the 32-bit fields rewritten (ack, seq and
    each SACK block edge count one each)."""

    status: ShiftStatus
    fields: int

    @property
    def complete(self) -> bool:
        """Every field the receiver will read was shifted (nothing left unshifted)."""
        return self.status is ShiftStatus.SHIFTED or self.status is ShiftStatus.NOTHING_TO_SHIFT


_FRAGMENT: Final = ShiftResult(ShiftStatus.FRAGMENT, 0)
_NOTHING: Final = ShiftResult(ShiftStatus.NOTHING_TO_SHIFT, 0)
# At most 10 fields: the ack, 8 SACK edges (40 option bytes hold at most 4 blocks), TSecr.
_SHIFTED: Final = tuple(ShiftResult(ShiftStatus.SHIFTED, count) for count in range(11))
# Unpackers for the edges of one SACK option, by edge count (2, 4, 6 or 8 fit in a header).
_EDGES: Final = tuple(struct.Struct(f"!{count}I") for count in range(9))


def shift_tcp_ack(
    buf: bytearray,
    packet: Packet,
    delta: int,
    *,
    checksum: ChecksumForm | None = None,
    tsecr_delta: int = 0,
) -> ShiftResult:
    """Add ``delta`` (mod 2**32) to the acknowledgement number and every SACK block edge,
    and ``tsecr_delta`` to the timestamp echo (TSecr, RFC 7323) when it is not 0.

    The ack field only when the ACK flag is set (otherwise it means nothing and may be
    anything); SACK blocks wherever present. ``packet`` must have been parsed from ``buf``;
    its ``ack`` attribute is updated to match. ``checksum`` says what the TCP checksum field
    holds; None classifies it from the bytes. Raises UsageError only for misuse: a packet
    that is not TCP or not parsed from ``buf``.
    """
    _check_usage(buf, packet)
    if packet.fragment:
        return _FRAGMENT
    l4 = packet.l4
    sacks: list[tuple[int, int]] = []
    clean = True
    if packet.payload - l4 > TCP_OPTIONS_OFFSET:
        clean = _find_sacks(buf, l4 + TCP_OPTIONS_OFFSET, packet.payload, sacks)
    has_ack = bool(packet.flags & TCP_ACK)
    fields = 1 if has_ack else 0
    for _, count in sacks:
        fields += count
    tsecr_at: int | None = None
    if tsecr_delta and packet.payload - l4 > TCP_OPTIONS_OFFSET:
        tsval_at = find_timestamps(buf, l4 + TCP_OPTIONS_OFFSET, packet.payload)
        if tsval_at is not None:
            tsecr_at = tsval_at + 4
            fields += 1
    if not fields:
        return _NOTHING if clean else ShiftResult(ShiftStatus.BAD_TCP_OPTIONS, 0)
    form = checksum if checksum is not None else classify_checksum(packet)
    # Sums of the old and new 32-bit values; 2**16 == 1 (mod 0xFFFF) lets them be added as
    # plain ints and folded once. Fields at odd offsets from the TCP header are summed apart
    # and byte-swapped before they join (swapping is multiplying by 256 modulo 0xFFFF).
    even_old = even_new = odd_old = odd_new = 0
    if has_ack:
        offset = l4 + TCP_ACK_OFFSET
        old = _U32.unpack_from(buf, offset)[0]
        new = seq.add(old, delta)
        _U32.pack_into(buf, offset, new)
        packet.ack = new
        even_old = old
        even_new = new
    if tsecr_at is not None:
        old = _U32.unpack_from(buf, tsecr_at)[0]
        new = seq.add(old, tsecr_delta)
        _U32.pack_into(buf, tsecr_at, new)
        if (tsecr_at - l4) & 1:
            odd_old += old
            odd_new += new
        else:
            even_old += old
            even_new += new
    for offset, count in sacks:
        # All edges of one option share its parity: one struct call each way.
        edges = _EDGES[count]
        olds = edges.unpack_from(buf, offset)
        news = [seq.add(old, delta) for old in olds]
        edges.pack_into(buf, offset, *news)
        if (offset - l4) & 1:
            odd_old += sum(olds)
            odd_new += sum(news)
        else:
            even_old += sum(olds)
            even_new += sum(news)
    if form is ChecksumForm.FULL:
        old_sum = fold(even_old + (odd_old << 8))
        new_sum = fold(even_new + (odd_new << 8))
        _update_checksum(buf, l4, old_sum, new_sum)
    # A PARTIAL field covers the pseudo-header only, which did not change: leave it.
    if not clean:
        return ShiftResult(ShiftStatus.BAD_TCP_OPTIONS, fields)
    if fields < len(_SHIFTED):
        return _SHIFTED[fields]
    return ShiftResult(ShiftStatus.SHIFTED, fields)


def shift_tcp_seq(
    buf: bytearray,
    packet: Packet,
    delta: int,
    *,
    checksum: ChecksumForm | None = None,
    tsval_delta: int = 0,
) -> ShiftResult:
    """Add ``delta`` (mod 2**32) to the sequence number, and ``tsval_delta`` to the timestamp
    value (TSval) when it is not 0; SACK blocks are left alone.

    The sequence number is meaningful in every segment, so it is always shifted. Same
    contract as :func:`shift_tcp_ack`; ``packet.seq`` is updated to match.
    """
    _check_usage(buf, packet)
    if packet.fragment:
        return _FRAGMENT
    form = checksum if checksum is not None else classify_checksum(packet)
    l4 = packet.l4
    offset = l4 + TCP_SEQ_OFFSET
    old = _U32.unpack_from(buf, offset)[0]
    new = seq.add(old, delta)
    _U32.pack_into(buf, offset, new)
    packet.seq = new
    even_old, even_new, odd_old, odd_new, fields = old, new, 0, 0, 1
    if tsval_delta and packet.payload - l4 > TCP_OPTIONS_OFFSET:
        tsval_at = find_timestamps(buf, l4 + TCP_OPTIONS_OFFSET, packet.payload)
        if tsval_at is not None:
            old = _U32.unpack_from(buf, tsval_at)[0]
            new = seq.add(old, tsval_delta)
            _U32.pack_into(buf, tsval_at, new)
            fields = 2
            if (tsval_at - l4) & 1:
                odd_old, odd_new = old, new
            else:
                even_old += old
                even_new += new
    if form is ChecksumForm.FULL:
        old_sum = fold(even_old + (odd_old << 8))
        new_sum = fold(even_new + (odd_new << 8))
        _update_checksum(buf, l4, old_sum, new_sum)
    return _SHIFTED[fields]


def _check_usage(buf: bytearray, packet: Packet) -> None:
    # Misuse by our own code, not bad input: raise (STYLE rule 4).
    if not isinstance(buf, bytearray):
        raise UsageError(f"TCP rewrite needs a bytearray, got {type(buf).__name__}")
    if packet.data is not buf:
        raise UsageError("the packet was not parsed from this buffer")
    if packet.proto != PROTO_TCP or packet.version not in (4, 6):
        raise UsageError(f"TCP rewrite of a non-TCP packet: {packet!r}")
    if packet.end > len(buf):
        raise UsageError("the buffer shrank after the packet was parsed")


def _update_checksum(buf: bytearray, l4: int, old_sum: int, new_sum: int) -> None:
    offset = l4 + TCP_CHECKSUM_OFFSET
    _U16.pack_into(buf, offset, update16(_U16.unpack_from(buf, offset)[0], old_sum, new_sum))


def _find_sacks(buf: bytearray, start: int, end: int, sacks: list[tuple[int, int]]) -> bool:
    """Append (offset of the first edge, number of edges) for every SACK option in the options
    ``buf[start:end]``; return whether the options were well formed. Never reads outside
    [start, end)."""
    clean = True
    offset = start
    while offset < end:
        kind = buf[offset]
        if kind == OPTION_EOL:
            break  # the rest is padding (RFC 9293 section 3.2)
        if kind == OPTION_NOP:
            offset += 1
            continue
        if offset + 1 >= end:
            return False  # a kind with no room for its length byte
        length = buf[offset + 1]
        if length < 2 or offset + length > end:
            return False  # framing lost: a receiver stops here too
        if kind == OPTION_SACK:
            if length > _SACK_BASE and (length - _SACK_BASE) % _SACK_BLOCK == 0:
                sacks.append((offset + _SACK_BASE, (length - _SACK_BASE) // 4))
            else:
                clean = False  # ignored by receivers, so left as it is
        offset += length
    return clean
