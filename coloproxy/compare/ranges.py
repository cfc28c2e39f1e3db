"""A set of half-open integer ranges, kept as sorted disjoint intervals.

Used for the verified part of a TCP stream. In the common case (in-order data) it holds a
single interval, so every operation is a couple of comparisons.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Final

# ``high`` of an empty set: below any stream offset (offsets lie within +-2**32), and an int so
# that the attribute has one type (mypyc compiles this module: setup.py).
EMPTY_HIGH: Final = -(1 << 40)


class RangeSet:
    __slots__ = ("_ends", "_starts", "high")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        # The end of the last interval, or EMPTY_HIGH when empty. A plain attribute kept up to
        # date by every change, not a property: the TCP hot path reads it for every segment.
        # The in-order fast path of ``add`` moves only this one (compiled, an int in a list
        # is an object, made anew for every segment): ``_ends[-1]`` may lag behind it, and is
        # brought up to date (``_sync``) before anything but that path and ``contains`` read
        # the lists.
        self.high: int = EMPTY_HIGH

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> object:
        self._sync()
        return iter(zip(self._starts, self._ends, strict=True))

    def intervals(self) -> list[tuple[int, int]]:
        self._sync()
        return list(zip(self._starts, self._ends, strict=True))

    def _sync(self) -> None:
        """``_ends[-1]`` brought up to ``high`` (the fast path of ``add`` moves only that)."""
        if self._ends:
            self._ends[-1] = self.high

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self.high = EMPTY_HIGH

    def add(self, start: int, end: int) -> None:
        """Add [start, end), merging with overlapping or touching intervals."""
        if start >= end:
            return
        starts = self._starts
        if starts and self.high == start:  # the in-order fast path: extend the last interval
            self.high = end
            return
        self._sync()
        ends = self._ends
        # first interval that could touch: the last one starting at or before `start`
        i = bisect_right(starts, start) - 1
        if i < 0 or ends[i] < start:
            i += 1
        j = i
        while j < len(starts) and starts[j] <= end:
            start = min(start, starts[j])
            end = max(end, ends[j])
            j += 1
        starts[i:j] = [start]
        ends[i:j] = [end]
        self.high = ends[-1]

    def contains(self, start: int, end: int) -> bool:
        """Whether [start, end) lies wholly inside the set (an empty range always does)."""
        if start >= end:
            return True
        starts = self._starts
        if not starts:
            return False
        if starts[-1] <= start:
            return end <= self.high
        i = bisect_right(starts, start) - 1  # (not the last interval: its end may lag)
        return i >= 0 and end <= self._ends[i]

    def subtract(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) not in the set, in order."""
        self._sync()
        starts, ends = self._starts, self._ends
        if not starts or start >= ends[-1] or end <= starts[0]:
            return [(start, end)] if start < end else []
        out: list[tuple[int, int]] = []
        i = bisect_right(starts, start) - 1
        i = max(i, 0)
        pos = start
        while pos < end and i < len(starts):
            if ends[i] <= pos:
                i += 1
                continue
            if starts[i] > pos:
                out.append((pos, min(starts[i], end)))
            pos = max(pos, ends[i])
            i += 1
        if pos < end:
            out.append((pos, end))
        return out

    def pieces(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """[start, end) cut at the set's boundaries: (low, high, inside the set), in order."""
        out: list[tuple[int, int, bool]] = []
        pos = start
        for low, high in self.subtract(start, end):
            if low > pos:
                out.append((pos, low, True))
            out.append((low, high, False))
            pos = high
        if pos < end:
            out.append((pos, end, True))
        return out
