"""Verified TCP bytes kept for comparing retransmissions of them, bounded.

Bytes at a verified stream offset were sent by both sides and were equal. A retransmission
of them normally carries the same bytes, but not always: a page handed to sendfile or to a
zero-copy send can change before the retransmission reads it again. Such a resend is output
the secondary never produced, so it must be compared, and for that the verified bytes are
kept here (one copy: both sides' were equal) as long as a retransmission of them can come.

What bounds that: a guest retransmits only bytes its peer has not acknowledged, and never
more than its send buffer holds. The comparator sees guest output only, not the peer's
acknowledgements, so it keeps, per connection, the last ``window`` bytes by stream offset
(``CompareConfig.retransmit_window``; the oldest are cut off in batches, once a quarter more
has come, whole pieces, so between ``window`` and 1.25 ``window`` bytes plus a piece: a
segment, a run of segments (lanes.py) or ``_JOIN_AT`` bytes joined), and over all
connections at most ``limit`` bytes (``max_retransmit_bytes``): past it the connection that
kept bytes longest ago (to within 64 KiB of its bytes) gives up its oldest first, down to a
sixteenth below the limit. A resend of verified bytes no longer kept
cannot be compared: the connection decides what that means (tcp.py: the primary's is held
for a checkpoint, the secondary's is not compared).

Per connection the pieces are two parallel lists sorted by offset (verified ranges are
disjoint), cut from the front: appending in order and cutting the oldest are O(1).

Pieces that continue each other are joined into one once they hold ``_JOIN_AT`` bytes
(``_join``: one more copy of each byte). A segment's bytes come as a buffer of their own
(1.5 kB for a full-size segment, from malloc): kept one by one for the whole window, each
buffer would be freed a window later, far out of the CPU's caches by then, and the buffers
malloc hands out next would be those cold ones (with 16 connections, 64 MiB of them). Joined,
a segment's own buffer is freed while still warm and reused at once, and what stays for the
window is one buffer per ``_JOIN_AT`` bytes (docs/benchmarks.md, "The kept bytes joined").
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Final

# Cut the front off the lists once this many entries before ``head`` are dead and they are
# the majority (a slice delete moves the rest).
_COMPACT_AT: Final = 256
# A connection moves to the end of the order it last kept in after this many bytes (a dict
# operation per segment costs more than the rest of the bookkeeping together).
_TOUCH_EVERY: Final = 64 << 10
# Contiguous pieces are joined into one once they hold this many bytes (module doc).
_JOIN_AT: Final = 16 << 10


class KeptBudget:
    """The bound over every connection, and the connections in the order they last kept
    something (a dict keeps insertion order: the first is the one that kept longest ago)."""

    __slots__ = ("limit", "owners", "total", "trim_at", "trim_to", "window")

    def __init__(self, window: int, limit: int) -> None:
        self.window = window  # per connection
        self.trim_at = window + (window >> 2)  # cut down to ``window`` past this
        self.limit = limit  # all connections
        self.trim_to = limit - (limit >> 4)  # past the limit, cut down to this
        self.total = 0
        self.owners: dict[KeptBytes, None] = {}

    def touch(self, owner: KeptBytes) -> None:
        """``owner`` kept something last."""
        owners = self.owners
        owners.pop(owner, None)
        owners[owner] = None
        owner.untouched = 0

    def forget_oldest(self) -> None:
        """Past the limit: cut the oldest bytes of the connections that kept longest ago, down
        to a sixteenth below the limit (so that this runs once in many segments)."""
        owners = self.owners
        while self.total > self.trim_to and owners:
            owner = next(iter(owners))
            owner.cut(owner.size - (self.total - self.trim_to), False)
            if not owner.size or not owner.starts:  # (both, always: never loop forever)
                del owners[owner]


class KeptBytes:
    """One connection's kept pieces: ``starts[i]`` is where ``datas[i]`` starts; the live ones
    are from ``head`` on, sorted by offset and disjoint."""

    __slots__ = ("budget", "datas", "head", "size", "starts", "tail", "tail_bytes", "untouched")

    def __init__(self, budget: KeptBudget) -> None:
        self.budget = budget
        self.starts: list[int] = []
        self.datas: list[bytes] = []
        self.head = 0
        self.size = 0  # bytes of the live pieces
        self.untouched = _TOUCH_EVERY  # bytes kept since it last moved in budget.owners
        # The last pieces, from ``tail`` on, continue each other and hold ``tail_bytes``:
        # joined into one at ``_JOIN_AT`` (module doc).
        self.tail = 0
        self.tail_bytes = 0

    def add(self, start: int, data: bytes) -> None:
        # Called for every segment compared: as few steps as the bookkeeping allows.
        starts = self.starts
        length = len(data)
        if starts and starts[-1] >= start:
            self._insert(start, data)
        else:
            datas = self.datas
            count = len(starts)
            # in order, the common case; does it continue the last piece?
            if not count or starts[count - 1] + len(datas[count - 1]) != start:
                self.tail = count
                self.tail_bytes = 0
            starts.append(start)
            datas.append(data)
            tail_bytes = self.tail_bytes + length
            self.tail_bytes = tail_bytes
            if tail_bytes >= _JOIN_AT:
                self._join()
        self.size += length
        budget = self.budget
        budget.total += length
        self.untouched += length
        if self.untouched >= _TOUCH_EVERY:
            budget.touch(self)
        if self.size > budget.trim_at:
            self.cut(budget.window, True)
        if budget.total > budget.limit:
            budget.forget_oldest()

    def _insert(self, start: int, data: bytes) -> None:
        index = bisect_right(self.starts, start, self.head)
        self.starts.insert(index, start)
        self.datas.insert(index, data)
        self.tail = len(self.starts)  # no join across an insertion
        self.tail_bytes = 0

    def _join(self) -> None:
        """The last pieces, from ``tail`` on, continue each other: make them one."""
        first = self.tail
        datas = self.datas
        if len(datas) - first > 1:
            datas[first] = b"".join(datas[first:])
            del datas[first + 1 :]
            del self.starts[first + 1 :]
        self.tail = len(datas)
        self.tail_bytes = 0

    def cut(self, target: int, keep: bool) -> None:
        """Forget the lowest offsets, whole pieces: with ``keep``, while ``target`` bytes or
        more would be left; else until no more than ``target`` bytes are left."""
        datas = self.datas
        head = self.head
        size = self.size
        count = len(datas)
        while head < count:
            length = len(datas[head])
            if (size - length < target) if keep else (size <= target):
                break
            size -= length
            datas[head] = b""
            head += 1
        self.budget.total -= self.size - size
        self.size = size
        if head > self.tail:  # the window reached the last pieces: no join of those cut
            self.tail = head
            self.tail_bytes = sum([len(data) for data in datas[head:]])
        if head == count:
            self.starts = []
            self.datas = []
            self.tail = 0
            head = 0
        elif head >= _COMPACT_AT and head * 2 > count:
            del self.starts[:head]
            del datas[:head]
            self.tail -= head
            head = 0
        self.head = head

    def clear(self) -> None:
        """Forget every piece (a checkpoint, a divergence, the connection forgotten)."""
        budget = self.budget
        budget.total -= self.size
        self.starts = []
        self.datas = []
        self.head = 0
        self.size = 0
        self.untouched = _TOUCH_EVERY
        self.tail = 0
        self.tail_bytes = 0
        budget.owners.pop(self, None)

    def lookup(self, start: int, end: int) -> list[tuple[int, int, bytes | None]]:
        """[start, end) cut into (low, high, kept bytes of [low, high) or None if not kept)."""
        out: list[tuple[int, int, bytes | None]] = []
        pos = start
        if self.size:
            starts, datas = self.starts, self.datas
            index = max(self.head, bisect_right(starts, start, self.head) - 1)
            while index < len(starts) and pos < end:
                piece_start = starts[index]
                data = datas[index]
                index += 1
                piece_end = piece_start + len(data)
                if piece_end <= pos:
                    continue
                if piece_start >= end:
                    break
                if piece_start > pos:
                    out.append((pos, piece_start, None))
                    pos = piece_start
                stop = min(end, piece_end)
                out.append((pos, stop, data[pos - piece_start : stop - piece_start]))
                pos = stop
        if pos < end:
            out.append((pos, end, None))
        return out
