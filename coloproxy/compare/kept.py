"""Verified TCP bytes kept for comparing retransmissions of them, bounded.

Bytes at a verified stream offset were sent by both sides and were equal. A retransmission
of them normally carries the same bytes, but not always: a page handed to sendfile or to a
zero-copy send can change before the retransmission reads it again. Such a resend is output
the secondary never produced, so it must be compared, and for that the verified bytes are
kept here (one copy: both sides' were equal) as long as a retransmission of them can come.

What bounds that: a guest retransmits only bytes its peer has not acknowledged, and never
more than its send buffer holds. The comparator sees guest output only, not the peer's
acknowledgements, so it keeps, per connection, the last ``window`` bytes by stream offset
(``CompareConfig.retransmit_window``; whole pieces, so up to one segment more), and across all
connections at most ``limit`` bytes (``max_retransmit_bytes``), forgetting the pieces kept
longest ago first. A resend of verified bytes no longer kept cannot be compared: the
connection decides what that means (tcp.py: the primary's is held for a checkpoint).

Pieces are forgotten lazily: a forgotten piece is marked dead, its bytes dropped at once, and
it leaves the lists when it reaches their front (or when dead ones are the majority).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from typing import Final

# Rebuild the global queue when this many more than half of it are dead pieces.
_COMPACT_SLACK: Final = 1024


class KeptPiece:
    """Verified bytes [start, end) of one connection."""

    __slots__ = ("data", "end", "live", "owner", "start")

    def __init__(self, start: int, data: bytes, owner: KeptBytes) -> None:
        self.start = start
        self.end = start + len(data)
        self.data = data
        self.owner = owner
        self.live = True


class KeptBudget:
    """The bound over every connection: the pieces in the order they were kept."""

    __slots__ = ("dead", "fifo", "limit", "total", "window")

    def __init__(self, window: int, limit: int) -> None:
        self.window = window  # per connection
        self.limit = limit  # all connections
        self.total = 0
        self.fifo: deque[KeptPiece] = deque()
        self.dead = 0  # dead pieces still in ``fifo``

    def forget_oldest(self) -> None:
        """Forget the pieces kept longest ago until the total is within the limit."""
        fifo = self.fifo
        while self.total > self.limit and fifo:
            piece = fifo.popleft()
            if not piece.live:
                self.dead -= 1
                continue
            owner = piece.owner
            owner.size -= piece.end - piece.start
            self.total -= piece.end - piece.start
            piece.live = False
            piece.data = b""
            owner.skip_dead()

    def killed(self) -> None:
        """One more dead piece in the queue: drop dead ones from its front, or rebuild it."""
        self.dead += 1
        fifo = self.fifo
        while fifo and not fifo[0].live:
            fifo.popleft()
            self.dead -= 1
        if self.dead > len(fifo) // 2 + _COMPACT_SLACK:
            self.fifo = deque(piece for piece in fifo if piece.live)
            self.dead = 0


class KeptBytes:
    """One connection's kept pieces, sorted by offset and disjoint (verified ranges are)."""

    __slots__ = ("budget", "head", "pieces", "size")

    def __init__(self, budget: KeptBudget) -> None:
        self.budget = budget
        self.pieces: list[KeptPiece] = []
        self.head = 0  # pieces before it are dead and wait to be cut off
        self.size = 0  # bytes of live pieces

    def add(self, start: int, data: bytes) -> None:
        piece = KeptPiece(start, data, self)
        pieces = self.pieces
        if not pieces or pieces[-1].end <= start:
            pieces.append(piece)  # in order, the common case
        else:
            index = bisect_right(pieces, start, lo=self.head, key=_start_of)
            pieces.insert(index, piece)
        length = len(data)
        self.size += length
        budget = self.budget
        budget.total += length
        budget.fifo.append(piece)
        if self.size > budget.window:
            self._trim()
        if budget.total > budget.limit:
            budget.forget_oldest()

    def _trim(self) -> None:
        """Forget the lowest offsets while what is left still holds ``window`` bytes."""
        pieces = self.pieces
        budget = self.budget
        window = budget.window
        head = self.head
        while head < len(pieces):
            piece = pieces[head]
            if piece.live:
                length = piece.end - piece.start
                if self.size - length < window:
                    break
                self.size -= length
                budget.total -= length
                piece.live = False
                piece.data = b""
                budget.killed()
            head += 1
        self.head = head
        self._compact()

    def skip_dead(self) -> None:
        pieces = self.pieces
        head = self.head
        while head < len(pieces) and not pieces[head].live:
            head += 1
        self.head = head
        self._compact()

    def _compact(self) -> None:
        if self.head == len(self.pieces):
            self.pieces = []
            self.head = 0
        elif self.head > 32 and self.head * 2 > len(self.pieces):
            del self.pieces[: self.head]
            self.head = 0

    def clear(self) -> None:
        """Forget every piece (a checkpoint, a divergence, the connection forgotten)."""
        budget = self.budget
        for piece in self.pieces[self.head :]:
            if piece.live:
                budget.total -= piece.end - piece.start
                piece.live = False
                piece.data = b""
                budget.killed()
        self.pieces = []
        self.head = 0
        self.size = 0

    def lookup(self, start: int, end: int) -> list[tuple[int, int, bytes | None]]:
        """[start, end) cut into (low, high, kept bytes of [low, high) or None if not kept)."""
        out: list[tuple[int, int, bytes | None]] = []
        pieces = self.pieces
        pos = start
        if self.size:
            index = max(self.head, bisect_right(pieces, start, lo=self.head, key=_start_of) - 1)
            while index < len(pieces) and pos < end:
                piece = pieces[index]
                index += 1
                if not piece.live or piece.end <= pos:
                    continue
                if piece.start >= end:
                    break
                if piece.start > pos:
                    out.append((pos, piece.start, None))
                    pos = piece.start
                stop = min(end, piece.end)
                out.append((pos, stop, piece.data[pos - piece.start : stop - piece.start]))
                pos = stop
        if pos < end:
            out.append((pos, end, None))
        return out


def _start_of(piece: KeptPiece) -> int:
    return piece.start
