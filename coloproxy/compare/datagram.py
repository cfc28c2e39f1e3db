"""UDP, ICMP, ICMPv6, other IP protocols and non-IP frames: compare whole datagrams.

Within a flow the two sides must send the same multiset of datagrams; order is free, since
datagram protocols do not promise it. A primary datagram is released as soon as an equal
secondary datagram exists (and the other way round). When both sides hold unmatched
datagrams for ``datagram_reorder_window``, they differ: that is a divergence, reported with
the oldest datagram of each side as evidence.
"""

from __future__ import annotations

import heapq
from typing import Final

from coloproxy.compare.events import Event, Flow, Reason, ReleaseReason
from coloproxy.compare.state import Book, FlowState, Held, Stored, difference

# Read once: an enum member is an attribute lookup through the enum's metaclass (about 85 ns).
_MATCHED: Final = ReleaseReason.MATCHED


class DatagramFlow(FlowState):
    # A held datagram leaves by its index (any secondary datagram may match any held one),
    # never from the front by ``head``: here ``head`` stays 0 and ``held`` is a plain list.

    __slots__ = ("protocol", "reorder_deadline", "secondary")

    def __init__(self, key: tuple[object, ...], label: Flow, now: float) -> None:
        super().__init__(key, label, now)
        self.protocol = label.protocol
        self.secondary: list[Stored] = []
        self.reorder_deadline: float | None = None

    def idle(self) -> bool:
        return not self.held and not self.secondary

    def reset_epoch(self, book: Book) -> None:
        for stored in self.secondary:
            stored.live = False
            book.stored_bytes -= len(stored.data)
        self.secondary = []
        self.reorder_deadline = None
        self.diverged = False
        self.timed_out = False

    def feed_primary(
        self, payload: bytes, held: Held, now: float, book: Book, out: list[Event]
    ) -> bool:
        """Returns True when a reorder timer must be armed."""
        held.payload = payload
        if self.diverged:
            self.held.append(held)
            return False
        for index, stored in enumerate(self.secondary):
            if stored.data == payload:
                self.secondary.pop(index)
                stored.live = False
                book.stored_bytes -= len(payload)
                book.bytes_compared += len(payload)
                book.release(held, out, _MATCHED)
                return False
        self.held.append(held)
        book.stored_bytes += len(payload)
        return self._arm(now, book)

    def feed_secondary(self, payload: bytes, now: float, book: Book, out: list[Event]) -> bool:
        if self.diverged:
            return False
        queue = self.held
        for index in range(len(queue)):
            held = queue[index]
            if held.payload == payload:
                queue.pop(index)
                book.stored_bytes -= len(payload)
                book.bytes_compared += len(payload)
                book.release(held, out, _MATCHED)
                return False
        stored = Stored(0, payload, now, self)
        self.secondary.append(stored)
        book.store_secondary(stored)
        return self._arm(now, book)

    def _arm(self, now: float, book: Book) -> bool:
        if self.held and self.secondary and self.reorder_deadline is None:
            self.reorder_deadline = now + book.reorder_window
            return True
        return False

    def reorder_expired(self, now: float, book: Book, out: list[Event]) -> None:
        """The reorder window ran out: unmatched datagrams on both sides differ."""
        self.reorder_deadline = None
        if self.diverged or not self.held or not self.secondary:
            return
        primary = self.held[0].payload
        secondary = self.secondary[0].data
        evidence = difference(
            primary,
            secondary,
            None,
            len(primary),
            len(secondary),
            f"{len(self.held)} primary and {len(self.secondary)} secondary datagrams unmatched",
        )
        self.diverged = True
        for stored in self.secondary:
            stored.live = False
            book.stored_bytes -= len(stored.data)
        self.secondary = []
        for held in self.held:
            book.stored_bytes -= len(held.payload)
            held.payload = b""
        book.request(out, Reason.PAYLOAD, self.protocol, self.label, evidence)


class ReorderTimers:
    """The datagram flows' reorder-window deadlines, earliest first (a flow's deadline is
    current while it equals ``reorder_deadline``; a stale entry is skipped)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, DatagramFlow]] = []
        self._serial = 0  # ties in deadline go in arming order

    def arm(self, flow: DatagramFlow) -> None:
        """``flow`` has a new reorder deadline (a feed returned True)."""
        deadline = flow.reorder_deadline
        if deadline is not None:
            self._serial += 1
            heapq.heappush(self._heap, (deadline, self._serial, flow))

    def earliest(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].reorder_deadline != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, now: float, book: Book, out: list[Event]) -> None:
        """Every flow whose reorder window ran out by ``now``: its unmatched datagrams differ."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, flow = heapq.heappop(heap)
            if flow.reorder_deadline == deadline:
                flow.reorder_expired(now, book, out)

    def clear(self) -> None:
        self._heap = []
