"""Held primary frames and their way out, for a shell that relays frames (pure, compiled).

The chardev transport (and bench/compare_bench.py's socket server, which stands in for it)
holds each primary frame under an integer token while the comparator decides, and writes the
released ones to outdev framed as colo-compare does (length, [vnet header length, vnet
header,] frame). That is per-packet work: done here, compiled with the comparator (setup.py).

The hot path holds a whole receive at once, in place: ``hold_frames(frames)`` takes the
decoder's :class:`~coloproxy.protocol.colo_frames.Frames` (offsets into the receive buffer)
and gives its frames consecutive tokens. The output framing is the input's, so a released
frame goes out as the very bytes it came as, and frames released one after the other in
the order they came (the common case: a connection's segments, matched in stream order)
go out as one slice of that buffer: no copy per frame, no framing per frame, one join per
write. A receive buffer stays referenced while one of its frames is held; past
``PINNED_LIMIT`` bytes of such buffers the oldest one's held frames are copied out and the
buffer let go, so that what is kept stays bounded by what is held.

``hold(packets, headers)`` holds packets given one by one (framed then, copied);
``release(token)`` queues one for output and returns whether it was held (``accept``, the
same raising when nothing is held, makes a ``HeldFrames`` the proxy's P-out verdicts, and
``accept_many(tokens)`` takes a batch's releases in one call; the shell learns of a first
queued frame from ``on_queued``);
``release_events(events)`` does that for every ``Release`` among a ``feed``'s events and
returns how many other events (neither ``Release`` nor ``Drop``: checkpoint requests,
malformed packets) it saw, so that a shell looks at events only when there is more than
verdicts; ``take()`` returns the queued output as one bytes object, ``take_parts()`` as the
parts it is made of, for a vectored write.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from coloproxy.compare.verdicts import Drop, Release
from coloproxy.errors import UsageError
from coloproxy.protocol.colo_frames import Frames

_LENGTH: Final = struct.Struct("!I")
_LENGTHS: Final = struct.Struct("!II")
# Receive buffers kept for their held frames, in bytes, before the oldest one's held frames
# are copied out (QEMU and asyncio read at most 256 KiB at once: 64 of them).
PINNED_LIMIT: Final = 16 << 20
# Output parts queued and not taken (outdev slow or away) before they are joined into one:
# each part may keep a whole receive buffer alive.
MAX_PARTS: Final = 64


class _Batch:
    """One receive's primary frames, held in place: token ``first + i`` is frame ``i``."""

    __slots__ = ("bounds", "data", "first", "held", "live")

    def __init__(self, frames: Frames, first: int) -> None:
        self.data = frames.data
        self.bounds = frames.bounds
        self.first = first
        count = len(frames)
        self.live = [True] * count  # held, not yet released (nor copied out)
        self.held = count


class HeldFrames:
    """Primary frames by token until released; released frames framed for outdev."""

    def __init__(self, vnet_hdr: bool = False) -> None:
        self.vnet_hdr = vnet_hdr
        # Frames held one by one, framed already (``hold``, and frames copied out of a batch).
        self._framed: dict[int, bytes] = {}
        # Batches with frames still held, oldest first (their tokens increase).
        self._batches: list[_Batch] = []
        self._pinned = 0  # bytes of the receive buffers in ``_batches``
        self._held = 0  # frames held in ``_batches``
        self._next = 0
        self._out: list[bytes | memoryview] = []
        # The run of frames released in a row from one batch, not yet in ``_out``: frames
        # [_run_start, _run_end) of ``_run``.
        self._run: _Batch | None = None
        self._run_start = 0
        self._run_end = 0
        self.queued_frames = 0  # released, not yet taken
        self.queued_bytes = 0
        self.unknown = 0  # releases of tokens not held (never, unless a shell is wrong)
        # Called when a release makes the empty queue non-empty (the shell schedules its
        # write then: once per batch of releases, not per frame).
        self.on_queued: Callable[[], object] | None = None

    def __len__(self) -> int:
        return len(self._framed) + self._held

    def hold(self, packets: list[bytes], headers: list[bytes] | None = None) -> range:
        """Hold ``packets`` (with their vnet ``headers`` when vnet is on) under fresh tokens."""
        start = self._next
        count = len(packets)
        self._next = start + count
        framed = self._framed
        vnet = self.vnet_hdr
        for index in range(count):
            packet = packets[index]
            if vnet:
                header = headers[index] if headers is not None else b""
                length = len(header) + len(packet)
                framed[start + index] = _LENGTHS.pack(length, len(header)) + header + packet
            else:
                framed[start + index] = _LENGTH.pack(len(packet)) + packet
        return range(start, start + count)

    def hold_frames(self, frames: Frames) -> range:
        """Hold every frame of ``frames`` in place under fresh tokens (consecutive: token
        ``first + i`` is frame ``i``). A frame whose vnet header length exceeded its data goes
        out framed as its header and an empty packet, as ``hold`` would."""
        first = self._next
        count = len(frames)
        self._next = first + count
        if not count:
            return range(first, first)
        batch = _Batch(frames, first)
        if frames.events:
            self._reframe_odd(batch, frames)
        if batch.held:
            self._batches.append(batch)
            self._held += batch.held
            self._pinned += len(batch.data)
            if self._pinned > PINNED_LIMIT:
                self._unpin()
        return range(first, first + count)

    def _reframe_odd(self, batch: _Batch, frames: Frames) -> None:
        """Frames whose vnet header length exceeded their data: framed anew, held apart."""
        bounds = frames.bounds
        for index in range(len(frames)):
            if frames.vnet_hdr and frames.start(index) == bounds[index + 1]:
                # (an empty packet after a fitting vnet header comes out the same)
                header = frames.vnet_header(index)
                batch.live[index] = False
                batch.held -= 1
                self._framed[batch.first + index] = _LENGTHS.pack(len(header), len(header)) + (
                    header
                )

    def _unpin(self) -> None:
        """Copy the held frames of the oldest batches out until the buffers kept are under
        PINNED_LIMIT (the newest stays: its frames were just received)."""
        batches = self._batches
        while self._pinned > PINNED_LIMIT and len(batches) > 1:
            batch = batches.pop(0)
            self._pinned -= len(batch.data)
            live = batch.live
            bounds = batch.bounds
            data = batch.data
            for index in range(len(live)):
                if live[index]:
                    live[index] = False
                    self._framed[batch.first + index] = data[bounds[index] : bounds[index + 1]]
            self._held -= batch.held
            batch.held = 0

    def _find(self, token: int) -> _Batch | None:
        """The batch holding ``token``'s frame, if any (batches are sorted by first token)."""
        batches = self._batches
        low: int = 0
        high: int = len(batches)
        if not high:
            return None
        last = batches[high - 1]
        if token >= last.first:
            return last if token < last.first + len(last.live) else None
        while low < high:
            mid: int = (low + high) // 2
            if batches[mid].first <= token:
                low = mid + 1
            else:
                high = mid
        if not low:
            return None
        batch = batches[low - 1]
        return batch if token < batch.first + len(batch.live) else None

    def release(self, token: object) -> bool:
        """Queue the frame held as ``token`` for output; False if none is."""
        if not isinstance(token, int):
            self.unknown += 1
            return False
        if self._framed:
            wire = self._framed.pop(token, None)
            if wire is not None:
                self._close_run()
                self._out.append(wire)
                self.queued_bytes += len(wire)
                self._queued(1)
                return True
        batch = self._find(token)
        if batch is None:
            self.unknown += 1
            return False
        index: int = token - batch.first
        live = batch.live
        if not live[index]:
            self.unknown += 1
            return False
        live[index] = False
        self._release_stretch(batch, index, index + 1)
        return True

    def _queued(self, frames: int) -> None:
        """``frames`` more frames queued: say so to ``on_queued`` if the queue was empty."""
        was_empty = not self.queued_frames
        self.queued_frames += frames
        if was_empty and self.on_queued is not None:
            self.on_queued()

    def accept(self, handle: object, payload: bytes | None = None) -> None:
        """The proxy released the primary frame ``handle``: queue it (the P-out ``Verdicts``
        of a frame-relaying shell, called per released frame, compiled)."""
        if not self.release(handle):
            raise UsageError(f"release of frame {handle!r}, which is not held")

    def accept_many(self, handles: list[object]) -> None:
        """``accept`` each of ``handles``, in order (the proxy hands over a batch's releases
        in one call: ``daemon/primary.py`` ``BatchVerdicts``).

        The same as ``accept`` one by one, taken a stretch at a time: consecutive tokens
        held in one batch (a connection's segments matched in stream order: nearly always
        the whole list) are released together, the batch found once and the counts added
        once per stretch."""
        count: int = len(handles)
        position: int = 0
        while position < count:
            handle = handles[position]
            batch: _Batch | None = None
            start: int = 0
            if isinstance(handle, int):
                run = self._run
                if run is not None and run.first <= handle < run.first + len(run.live):
                    batch = run  # the common case: the run being extended
                else:
                    batch = self._find(handle)
                if batch is not None:
                    start = handle - batch.first
            if batch is None or not batch.live[start]:
                # Not in a batch (held apart, or not held): one at a time.
                if not self.release(handle):
                    raise UsageError(f"release of frame {handle!r}, which is not held")
                position += 1
                continue
            live = batch.live
            end: int = start
            limit: int = len(live)
            # The stretch: tokens that follow one another, each still held in ``batch``.
            while True:
                live[end] = False
                end += 1
                position += 1
                if position >= count or end >= limit or not live[end]:
                    break
                following = handles[position]
                if not isinstance(following, int) or following != batch.first + end:
                    break
            self._release_stretch(batch, start, end)

    def _release_stretch(self, batch: _Batch, start: int, end: int) -> None:
        """Frames [start, end) of ``batch``, just marked not live: queue them (``release``
        for each, in order, at once)."""
        stretch: int = end - start
        batch.held -= stretch
        self._held -= stretch
        bounds = batch.bounds
        self.queued_bytes += bounds[end] - bounds[start]
        if batch is self._run and start == self._run_end:
            self._run_end = end
        else:
            self._close_run()
            self._run = batch
            self._run_start = start
            self._run_end = end
        if not batch.held:
            self._drop_batch(batch)
        self._queued(stretch)

    def drop(self, handle: object) -> None:
        raise UsageError("a frame-relaying shell never drops a primary frame (I2)")

    def _drop_batch(self, batch: _Batch) -> None:
        """``batch`` holds nothing any more (its buffer may still be in a queued run)."""
        batches = self._batches
        if batches and batches[0] is batch:
            del batches[0]
        else:
            batches.remove(batch)
        self._pinned -= len(batch.data)

    def _close_run(self) -> None:
        run = self._run
        if run is None:
            return
        self._run = None
        bounds = run.bounds
        low: int = bounds[self._run_start]
        high: int = bounds[self._run_end]
        out = self._out
        if low == 0 and high == len(run.data):
            out.append(run.data)
        else:
            out.append(memoryview(run.data)[low:high])
        if len(out) > MAX_PARTS:
            # outdev is not taking it: join, so that the queue keeps no receive buffer alive
            self._out = [b"".join(out)]

    def release_events(self, events: list[object]) -> int:
        """``release`` the token of every ``Release`` in ``events``; the number of events
        that are neither ``Release`` nor ``Drop``."""
        others = 0
        for event in events:
            if isinstance(event, Release):
                self.release(event.token)
            elif not isinstance(event, Drop):
                others += 1
        return others

    def take(self) -> bytes:
        """Everything queued, as one bytes object; the queue is empty afterwards."""
        # (one whole receive released in order: join returns the very bytes received)
        return b"".join(self.take_parts())

    def take_parts(self) -> list[bytes | memoryview]:
        """What ``take`` would join, not joined: the queued output as the parts it is made of
        (runs of frames: whole receives, or slices of them), for a writer that writes them
        as they are (``writelines``: one vectored write, no copy); the queue is empty
        afterwards. Each part keeps its receive buffer alive until written."""
        self._close_run()
        out = self._out
        self._out = []
        self.queued_frames = 0
        self.queued_bytes = 0
        return out

    def requeue(self, data: bytes, frames: int) -> None:
        """Put what ``take`` returned (``frames`` frames) back in front of the queue: it
        could not be written."""
        self._close_run()
        self._out.insert(0, data)
        self.queued_frames += frames
        self.queued_bytes += len(data)

    def discard_held(self) -> int:
        """Forget every held frame (the shell is closing); how many there were."""
        count = len(self)
        self._framed.clear()
        for batch in self._batches:
            batch.live = [False] * len(batch.live)
            batch.held = 0
        self._batches = []
        self._held = 0
        self._pinned = 0
        return count
