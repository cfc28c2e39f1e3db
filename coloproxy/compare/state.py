"""Bookkeeping shared by every flow of one comparator: held packets, stored bytes, the
timeout queues, and the checkpoint request with its coalescing (invariant I4), kept in the
epoch's state (``epoch.py``).

Flows never talk to the shell; they append events to the ``out`` list they are handed.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from coloproxy.compare.config import CompareConfig
from coloproxy.compare.epoch import COMPLETE, REQUEST, SATURATE, Epoch
from coloproxy.compare.events import (
    EVIDENCE_BEFORE,
    EVIDENCE_BYTES,
    CheckpointNeeded,
    Event,
    Evidence,
    Flow,
    Reason,
    Release,
    ReleaseReason,
)
from coloproxy.compare.kept import KeptBudget

# What a held TCP segment waits for besides its data being verified.
NEED_SYN: Final = 1  # the secondary sent its SYN too
NEED_FIN: Final = 2  # the secondary's FIN sits at the same stream offset
NEED_RST: Final = 4  # the secondary reset the connection too
NEED_ACK: Final = 8  # the secondary acknowledged at least ``ack`` (ACK gating)
NEED_URG: Final = 16  # the secondary's urgent pointer named the stream offset ``urgent`` too
NEED_CHECKPOINT: Final = 32  # nothing the secondary sends can match it: a checkpoint only

# The queues of held packets (FlowState.held, Book.primary_fifo) are lists with a head index,
# not deques: compiled, a list's operations are native calls and a deque's are generic method
# calls (about 175 instructions for an append or popleft, 95 for an index). The front is cut
# off once this many entries before the head are gone and they are the majority (a slice
# delete moves the rest); a queue that runs empty starts again at 0.
COMPACT_AT: Final = 256


def cut_front(queue: list[Held], head: int) -> int:
    """``queue[head:]`` is what is left of a queue with a head index: empty it when nothing
    is, cut its front off when COMPACT_AT says so; the head index to store."""
    count = len(queue)
    if head >= count:
        queue.clear()
        return 0
    if head >= COMPACT_AT and head * 2 > count:
        del queue[:head]
        return 0
    return head


class FlowState:
    """What every kind of flow has: identity, held primary packets, divergence marks."""

    __slots__ = (
        "diverged",
        "head",
        "held",
        "key",
        "label",
        "last_active",
        "passthrough",
        "timed_out",
    )

    def __init__(self, key: tuple[object, ...], label: Flow, now: float) -> None:
        self.key = key
        self.label = label
        # The held packets are ``held[head:]``, in order; ``held`` is empty (and ``head`` 0)
        # when none is, so ``not held`` says whether any is.
        self.held: list[Held] = []
        self.head = 0
        self.diverged = False  # a divergence was reported: hold everything until checkpoint
        self.timed_out = False  # a timeout was reported for this flow in this epoch
        self.passthrough = False
        self.last_active = now

    def idle(self) -> bool:
        """Nothing held or stored: the flow may be forgotten without losing anything."""
        return not self.held

    def drain(self) -> list[Held]:
        """The held packets, in order, taken away (the queue is empty after)."""
        held = self.held[self.head :] if self.head else self.held
        self.held = []
        self.head = 0
        return held

    def trim(self, head: int) -> None:
        """The held packets before ``head`` are gone (released or removed): store ``head``,
        emptying or compacting the queue as it says above COMPACT_AT."""
        self.head = cut_front(self.held, head)


class Held:
    """One held primary packet (or the fragments of one datagram)."""

    __slots__ = (
        "ack",
        "arrival",
        "end",
        "extra",
        "flow",
        "gated",
        "need",
        "payload",
        "released",
        "serial",
        "start",
        "token",
        "urgent",
    )

    def __init__(self, token: object, serial: int, arrival: float, flow: FlowState | None) -> None:
        self.token = token
        self.extra: list[object] | None = None  # further tokens (IP fragments of one datagram)
        self.serial = serial
        self.arrival = arrival
        self.flow = flow
        self.released = False
        self.gated = False  # waits only for the secondary's ACK (in Book.gated_fifo)
        self.start = 0
        self.end = 0
        self.need = 0
        self.ack = 0
        self.urgent = 0  # the stream offset the urgent pointer names, with NEED_URG
        self.payload = b""  # datagrams only: the bytes to match


class Stored:
    """Bytes one side produced that wait for the other side (a TCP chunk or a datagram).

    What waits is [``start``, ``end``); ``data`` holds it from ``base`` on, and may hold more
    at either end: a TCP chunk partly matched keeps the buffer it arrived in and moves its
    bounds (compiled, a slice is a copy). ``span(low, high)`` gives bytes of [start, end).
    """

    __slots__ = ("arrival", "base", "data", "end", "flow", "live", "start")

    def __init__(self, start: int, data: bytes, arrival: float, flow: FlowState) -> None:
        self.start = start
        self.base = start
        self.end = start + len(data)
        self.data = data
        self.arrival = arrival
        self.flow = flow
        self.live = True

    def span(self, low: int, high: int) -> bytes:
        """The bytes of [low, high), within [start, end)."""
        data = self.data
        base = self.base
        if low == base and high - low == len(data):
            return data
        return data[low - base : high - base]


class Signal(Stored):
    """A TCP FIN, RST or urgent pointer of the secondary that waits for the primary's: no
    bytes, ``start`` is the stream offset, ``kind`` one of "FIN", "RST", "URG"; it times out
    with the secondary's bytes (secondary_timeout)."""

    __slots__ = ("kind",)

    def __init__(self, kind: str, offset: int, arrival: float, flow: FlowState) -> None:
        super().__init__(offset, b"", arrival, flow)
        self.kind = kind


class Book:
    """Comparator-wide counters and queues."""

    def __init__(self, config: CompareConfig) -> None:
        self.config = config
        # Read per packet: plain attributes (config is a frozen dataclass, which compiled
        # code reads by name).
        self.secondary_timeout = config.secondary_timeout
        self.reorder_window = config.datagram_reorder_window
        self.serial = 0
        self.held_packets = 0
        self.stored_bytes = 0
        self.bytes_compared = 0
        # Whether a checkpoint was asked for, a bound hit (hold and drop uncompared until the
        # checkpoint), a checkpoint runs.
        self.epoch = Epoch()
        # Arrival order, for compare_timeout: ``primary_fifo[primary_head:]`` (as for
        # FlowState.held; released entries are dropped from the front lazily).
        self.primary_fifo: list[Held] = []
        self.primary_head = 0
        self.secondary_fifo: deque[Stored] = deque()  # arrival order, for secondary_timeout
        # Held GSO packets that may be split (CompareConfig.split_after), arrival order.
        self.split_after = config.split_after
        self.gso_payload = config.gso_above - 40  # a longer TCP payload is a GSO packet's
        self.split_fifo: deque[Held] = deque()
        # Held segments that wait only for the secondary's ACK (ack_lag_timeout), in the order
        # they came to wait (arrival order within a connection).
        self.ack_lag = config.ack_lag_timeout
        self.gated_fifo: deque[tuple[float, Held]] = deque()  # (since, segment)
        self.now = 0.0  # the time of the call being handled (feed or handle_timer)
        self.kept = KeptBudget(config.retransmit_window, config.max_retransmit_bytes)

    def new_held(self, token: object, now: float, flow: FlowState | None) -> Held:
        self.serial += 1
        held = Held(token, self.serial, now, flow)
        self.held_packets += 1
        self.primary_fifo.append(held)
        return held

    def oldest_primary(self) -> Held | None:
        """The oldest held primary packet that waits for compare_timeout, or None (the released
        ones before it are dropped)."""
        fifo = self.primary_fifo
        head = self.primary_head
        count = len(fifo)
        while head < count and fifo[head].released:
            head += 1
        if head != self.primary_head:
            self.trim_primary(head)
            head = self.primary_head
        return fifo[head] if head < len(fifo) else None

    def trim_primary(self, head: int) -> None:
        """The entries of primary_fifo before ``head`` are done with: as FlowState.trim."""
        self.primary_head = cut_front(self.primary_fifo, head)

    def freeze(self, token: object, now: float, extra: list[object] | None) -> Held:
        """A primary packet held uncompared until the next checkpoint completes (no flow, no
        timeout: the checkpoint releases it)."""
        self.serial += 1
        held = Held(token, self.serial, now, None)
        held.extra = extra
        self.held_packets += 1
        return held

    def release(self, held: Held, out: list[Event], reason: ReleaseReason) -> None:
        held.released = True
        self.held_packets -= 1
        out.append(Release(held.token, reason))
        if held.extra:
            for token in held.extra:
                out.append(Release(token, reason))

    def store_secondary(self, stored: Stored) -> None:
        self.stored_bytes += stored.end - stored.start
        if self.secondary_timeout is not None:
            self.secondary_fifo.append(stored)

    def request(
        self,
        out: list[Event],
        reason: Reason,
        protocol: str,
        flow: Flow | None,
        evidence: Evidence | None,
    ) -> None:
        """Ask for a checkpoint (coalesced while one is asked for already, I4)."""
        epoch = self.epoch
        out.append(CheckpointNeeded(reason, protocol, flow, evidence, epoch.requested))
        epoch.handle(REQUEST)

    def saturate(
        self, out: list[Event], protocol: str, flow: Flow | None, evidence: Evidence
    ) -> None:
        """A bound was hit: ask for a checkpoint and hold everything uncompared until then."""
        epoch = self.epoch
        out.append(CheckpointNeeded(Reason.OVERFLOW, protocol, flow, evidence, epoch.requested))
        epoch.handle(SATURATE)

    def new_epoch(self) -> None:
        """A checkpoint completed (everything held was released, every flow reset): nothing
        is held, stored or waiting for a timeout any more."""
        self.primary_fifo.clear()
        self.primary_head = 0
        self.secondary_fifo.clear()
        self.split_fifo.clear()
        self.gated_fifo.clear()
        self.held_packets = 0
        self.stored_bytes = 0
        self.epoch.handle(COMPLETE)

    def over_bounds(self, extra_bytes: int) -> bool:
        config = self.config
        return (
            self.held_packets >= config.max_held_packets
            or self.stored_bytes + extra_bytes > config.max_held_bytes
        )


def difference(
    primary: bytes,
    secondary: bytes,
    base: int | None,
    primary_length: int,
    secondary_length: int,
    detail: str,
) -> Evidence:
    """Evidence for two byte strings that differ: find the first difference and cut a window.

    ``base`` is the stream offset of index 0 (TCP) or None (datagrams: offsets are indices).
    """
    limit = min(len(primary), len(secondary))
    index = 0
    # Halve the search space with slice comparisons (memcmp) instead of a byte loop.
    low, high = 0, limit
    while low < high:
        mid = (low + high) // 2
        if primary[low : mid + 1] == secondary[low : mid + 1]:
            low = mid + 1
        else:
            high = mid
    index = low
    begin = max(0, index - EVIDENCE_BEFORE)
    stop = begin + EVIDENCE_BYTES
    offset = index if base is None else base + index
    return Evidence(
        offset=offset,
        primary=bytes(primary[begin:stop]),
        secondary=bytes(secondary[begin:stop]),
        primary_length=primary_length,
        secondary_length=secondary_length,
        before=index - begin,
        detail=detail,
    )
