"""TCP options: find the timestamps option (RFC 7323 section 3) without raising.

Host S's rewriter learns the secondary's TSval from its SYN-ACK and the primary's from the
client's echo (TSecr), and shifts both fields; it walks the options here, the way a receiver
does (EOL ends them, NOP is one byte, every other kind carries a length of at least 2 that
stays inside the header).
"""

from __future__ import annotations

import struct
from typing import Final

from coloproxy.packet.checksum import Buffer
from coloproxy.packet.parse import PROTO_TCP, Packet

OPTION_EOL: Final = 0
OPTION_NOP: Final = 1
OPTION_TIMESTAMPS: Final = 8
TIMESTAMPS_LENGTH: Final = 10  # kind, length, TSval, TSecr
_TCP_OPTIONS_OFFSET: Final = 20
_U32: Final = struct.Struct("!I")


def find_timestamps(buf: Buffer, start: int, end: int) -> int | None:
    """Offset of the TSval field of the timestamps option in ``buf[start:end]``, or None."""
    offset = start
    while offset < end:
        kind = buf[offset]
        if kind == OPTION_EOL:
            return None
        if kind == OPTION_NOP:
            offset += 1
            continue
        if offset + 1 >= end:
            return None
        length = buf[offset + 1]
        if length < 2 or offset + length > end:
            return None
        if kind == OPTION_TIMESTAMPS:
            return offset + 2 if length == TIMESTAMPS_LENGTH else None
        offset += length
    return None


def timestamps(packet: Packet) -> tuple[int, int] | None:
    """(TSval, TSecr) of a parsed TCP segment, or None when it carries no valid option."""
    if packet.proto != PROTO_TCP or packet.fragment:
        return None
    data = packet.data
    found = find_timestamps(data, packet.l4 + _TCP_OPTIONS_OFFSET, packet.payload)
    if found is None:
        return None
    return _U32.unpack_from(data, found)[0], _U32.unpack_from(data, found + 4)[0]
