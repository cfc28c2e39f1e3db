"""Held primary frames and their way out, for a shell that relays frames (pure, compiled).

The chardev transport (and bench/compare_bench.py's socket server, which stands in for it)
holds each primary frame under an integer token while the comparator decides, and writes the
released ones to outdev re-framed as colo-compare does (length, [vnet header length, vnet
header,] frame). That is per-packet work: done here, compiled with the comparator (setup.py),
with one dict entry per held frame and the framed output kept as a list of parts joined once
per write.

``hold(packets, headers)`` stores a batch under fresh tokens (a range); ``release(token)``
queues one for output and returns whether it was held; ``release_events(events)`` does that
for every ``Release`` among a ``feed``'s events and returns how many other events (neither
``Release`` nor ``Drop``: checkpoint requests, malformed packets) it saw, so that a shell
looks at events only when there is more than verdicts; ``take()`` returns the queued output
as one bytes object.
"""

from __future__ import annotations

import struct
from typing import Final

from coloproxy.compare.verdicts import Drop, Release

_LENGTH: Final = struct.Struct("!I")
_LENGTHS: Final = struct.Struct("!II")


class HeldFrames:
    """Primary frames by token until released; released frames framed for outdev."""

    def __init__(self, vnet_hdr: bool = False) -> None:
        self.vnet_hdr = vnet_hdr
        self._frames: dict[int, bytes] = {}
        self._headers: dict[int, bytes] = {}
        self._next = 0
        self._out: list[bytes] = []
        self.queued_frames = 0  # released, not yet taken
        self.queued_bytes = 0
        self.unknown = 0  # releases of tokens not held (never, unless a shell is wrong)

    def __len__(self) -> int:
        return len(self._frames)

    def hold(self, packets: list[bytes], headers: list[bytes] | None = None) -> range:
        """Hold ``packets`` (with their vnet ``headers`` when vnet is on) under fresh tokens."""
        start = self._next
        count = len(packets)
        self._next = start + count
        frames = self._frames
        for index in range(count):
            frames[start + index] = packets[index]
        if self.vnet_hdr and headers is not None:
            stored = self._headers
            for index in range(count):
                stored[start + index] = headers[index]
        return range(start, start + count)

    def release(self, token: object) -> bool:
        """Queue the frame held as ``token`` for output; False if none is."""
        if not isinstance(token, int):
            self.unknown += 1
            return False
        packet = self._frames.pop(token, None)
        if packet is None:
            self.unknown += 1
            return False
        out = self._out
        if self.vnet_hdr:
            header = self._headers.pop(token, b"")
            length = len(header) + len(packet)
            out.append(_LENGTHS.pack(length, len(header)))
            out.append(header)
            self.queued_bytes += 8 + length
        else:
            out.append(_LENGTH.pack(len(packet)))
            self.queued_bytes += 4 + len(packet)
        out.append(packet)
        self.queued_frames += 1
        return True

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
        data = b"".join(self._out)
        self._out.clear()
        self.queued_frames = 0
        self.queued_bytes = 0
        return data

    def requeue(self, data: bytes, frames: int) -> None:
        """Put what ``take`` returned (``frames`` frames) back in front of the queue: it
        could not be written."""
        self._out.insert(0, data)
        self.queued_frames += frames
        self.queued_bytes += len(data)

    def discard_held(self) -> int:
        """Forget every held frame (the shell is closing); how many there were."""
        count = len(self._frames)
        self._frames.clear()
        self._headers.clear()
        return count
