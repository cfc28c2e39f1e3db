"""IP fragment reassembly (IPv4 and IPv6), bounded, for comparison only.

The two guests may fragment one datagram differently (different MTU estimates, different
IPv4 identifiers), so fragments are compared after reassembly. A complete datagram is handed
back as a synthetic IP packet (a minimal header with the same addresses and protocol, then
the reassembled payload) that parses like any other. Nothing here changes what is sent: the
primary's original fragments are released, each with its own token.

Overlapping fragments that disagree are malformed (RFC 5722 forbids overlaps in IPv6; in
IPv4 they are the classic evasion trick). Limits: ``max_fragment_datagrams`` and
``max_fragment_bytes`` per comparator; incomplete datagrams expire after ``compare_timeout``.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

from coloproxy.packet.parse import Packet

# Largest reassembled payload that still fits the 16-bit length field of our synthetic header.
MAX_PAYLOAD_V4: Final = 65535 - 20
MAX_PAYLOAD_V6: Final = 65535
_V4_HEADER: Final = struct.Struct("!BBHHHBBH4s4s")
_V6_HEADER: Final = struct.Struct("!IHBB16s16s")


class Partial:
    """The fragments of one datagram seen so far on one side."""

    __slots__ = ("arrival", "key", "pieces", "size", "tokens", "total")

    def __init__(self, key: tuple[object, ...], arrival: float) -> None:
        self.key = key
        self.arrival = arrival
        self.pieces: dict[int, bytes] = {}  # fragment offset -> data
        self.total: int | None = None  # payload length, known once the last fragment arrived
        self.size = 0
        self.tokens: list[object] = []


class AddResult:
    __slots__ = ("complete", "conflict", "overflow")

    def __init__(self) -> None:
        self.complete: bytes | None = None
        self.conflict = False
        self.overflow = False


class Reassembler:
    def __init__(self, max_datagrams: int, max_bytes: int) -> None:
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.partials: dict[tuple[object, ...], Partial] = {}
        self.order: deque[Partial] = deque()  # arrival order of first fragments, for expiry
        self.bytes = 0

    def clear(self) -> list[Partial]:
        dropped = list(self.partials.values())
        self.partials.clear()
        self.order.clear()
        self.bytes = 0
        return dropped

    def oldest(self) -> float | None:
        while self.order and self.order[0].key not in self.partials:
            self.order.popleft()
        while self.order and self.partials.get(self.order[0].key) is not self.order[0]:
            self.order.popleft()
        return self.order[0].arrival if self.order else None

    def expire(self, now: float, timeout: float) -> list[Partial]:
        """Forget the datagrams whose first fragment came at least ``timeout`` ago."""
        expired: list[Partial] = []
        while True:
            oldest = self.oldest()
            if oldest is None or oldest + timeout > now:
                return expired
            partial = self.order.popleft()
            self._forget(partial)
            expired.append(partial)

    def _forget(self, partial: Partial) -> None:
        del self.partials[partial.key]
        self.bytes -= partial.size

    def add(
        self, side: str, packet: Packet, token: object, now: float
    ) -> tuple[AddResult, Partial | None]:
        """Add a fragment. ``complete`` is a reassembled raw IP datagram when it is whole."""
        result = AddResult()
        key = (
            side,
            packet.version,
            packet.src,
            packet.dst,
            packet.proto,
            packet.frag_id,
            packet.vlan,
        )
        partial = self.partials.get(key)
        data = bytes(packet.data[packet.payload : packet.end])
        if partial is None:
            if len(self.partials) >= self.max_datagrams or self.bytes + len(data) > self.max_bytes:
                result.overflow = True
                return result, None
            partial = Partial(key, now)
            self.partials[key] = partial
            self.order.append(partial)
        elif self.bytes + len(data) > self.max_bytes:
            result.overflow = True
            return result, partial
        partial.tokens.append(token)
        offset = packet.frag_offset
        end = offset + len(data)
        limit = MAX_PAYLOAD_V4 if packet.version == 4 else MAX_PAYLOAD_V6
        if end > limit or (packet.frag_more and len(data) % 8):
            result.conflict = True
            self._forget(partial)
            return result, partial
        if not packet.frag_more:
            if partial.total is not None and partial.total != end:
                result.conflict = True
                self._forget(partial)
                return result, partial
            partial.total = end
        for other_offset, other in partial.pieces.items():
            low = max(offset, other_offset)
            high = min(end, other_offset + len(other))
            if (
                low < high
                and data[low - offset : high - offset]
                != other[low - other_offset : high - other_offset]
            ):
                result.conflict = True
                self._forget(partial)
                return result, partial
        previous = partial.pieces.get(offset)
        if previous is None or len(previous) < len(data):
            grown = len(data) - (len(previous) if previous is not None else 0)
            partial.pieces[offset] = data
            partial.size += grown
            self.bytes += grown
        if partial.total is None:
            return result, partial
        payload = _assemble(partial)
        if payload is None:
            return result, partial
        self._forget(partial)
        result.complete = _header(packet, len(payload)) + payload
        return result, partial


def _assemble(partial: Partial) -> bytes | None:
    total = partial.total
    if total is None:
        return None
    buffer = bytearray(total)
    covered = 0
    for offset in sorted(partial.pieces):
        data = partial.pieces[offset]
        if offset > covered:
            return None  # a hole
        buffer[offset : offset + len(data)] = data
        covered = max(covered, offset + len(data))
    if covered < total:
        return None
    return bytes(buffer)


def _header(packet: Packet, payload_length: int) -> bytes:
    if packet.version == 4:
        return _V4_HEADER.pack(
            0x45, 0, 20 + payload_length, 0, 0, 64, packet.proto, 0, packet.src, packet.dst
        )
    return _V6_HEADER.pack(6 << 28, payload_length, packet.proto, 64, packet.src, packet.dst)
