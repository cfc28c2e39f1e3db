"""QEMU's socket-chardev packet framing and the Xen COLO notify messages (pure, sans-IO).

Theory of operation
-------------------
QEMU's filter-mirror, filter-redirector and colo-compare pass packets over stream chardevs
(unix or TCP sockets) as frames (QEMU net/net.c ``net_fill_rstate``, net/filter-mirror.c
``filter_send``, net/colo-compare.c ``_compare_chr_send``)::

    4 bytes  big-endian length L of the data (vnet header included)
    4 bytes  big-endian vnet header length V        only with vnet_hdr_support=on
    L bytes  data: V bytes of virtio-net header, then the Ethernet frame

The receiver's buffer is ``NET_BUFSIZE`` (4096 + 65536 = 69 632 bytes, include/net/net.h).
QEMU, given a larger L, prints "serious error: oversized packet received" and stops reading
that chardev for good (colo-compare unregisters its handlers): every later packet on it is
lost without a word. No QEMU filter can send such a frame to a QEMU receiver, so a larger L
means the stream lost its framing (or someone else is writing it). :class:`FrameDecoder`
reports :class:`Desynchronised` as soon as that length is read, after delivering every
frame that came whole before it, and decodes nothing more until :meth:`FrameDecoder.end`:
the shell drops the connection and the sender starts a fresh stream on its next one.
Trusting L instead (skipping L bytes) would let a length of 2^31 swallow gigabytes of later
frames. A vnet header length larger than the frame is reported (:class:`VnetHeaderTooLong`)
and the frame is still delivered, with an empty packet to compare, so that the shell can hold
and release it unchanged (a primary frame is never dropped: I2).

The decoder returns, per call, the packets to compare (vnet header stripped), the vnet
headers (only with vnet on; kept for the outdev copy) and the problems, in arrival order
among themselves; ``FrameDecoder.cut`` returns the same frames without copying them
(:class:`Frames`: offsets into the received bytes), for the chardev transport's hot path. A
frame cut by the stream's segmentation waits in a carry buffer for its remainder.

The notify channel (colo-compare's ``notify_dev``, used by Xen's COLO frame) carries the same
framing without vnet header lengths; each frame's data is an ASCII word without NUL:
``COLO_USERSPACE_PROXY_INIT`` (Xen asks for the proxy) is answered
``COLO_COMPARE_GET_XEN_INIT``; colo-compare sends ``DO_CHECKPOINT`` when it needs a
checkpoint; Xen sends ``COLO_CHECKPOINT`` when one is done, on which colo-compare releases
every held primary packet and forgets the secondary's (``colo_flush_packets``). Words are
compared exactly, as QEMU's ``packet_matches_str`` does (length and bytes).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple, overload

from mypy_extensions import i64

from coloproxy.errors import UsageError
from coloproxy.packet.parse import be32

# include/net/net.h: #define NET_BUFSIZE (4096 + 65536): a 64 KiB GSO frame plus headers.
MAX_FRAME: Final = 4096 + 65536
HEADER: Final = 4
VNET_HEADER: Final = 8

NOTIFY_PROXY_INIT: Final = b"COLO_USERSPACE_PROXY_INIT"
NOTIFY_PROXY_INIT_REPLY: Final = b"COLO_COMPARE_GET_XEN_INIT"
NOTIFY_DO_CHECKPOINT: Final = b"DO_CHECKPOINT"
NOTIFY_CHECKPOINT_DONE: Final = b"COLO_CHECKPOINT"

_LENGTH: Final = struct.Struct("!I")
_LENGTHS: Final = struct.Struct("!II")


class FrameProblem(StrEnum):
    """What can be wrong with a stream of frames; also the metric label."""

    DESYNC = "desync"  # a length above QEMU's limit: the framing is lost
    VNET_HEADER_TOO_LONG = "vnet-header-too-long"
    TRUNCATED = "truncated"


@dataclass(frozen=True, slots=True)
class Desynchronised:
    """A frame announced ``length`` bytes, above ``limit``: the stream lost its framing.
    Nothing from ``offset`` on is decoded; ``discarded`` bytes received so far from there
    (the bad length included) were not used. The connection must go."""

    length: int
    limit: int
    offset: int  # stream offset of the bad length's first byte
    discarded: int
    problem: FrameProblem = FrameProblem.DESYNC


@dataclass(frozen=True, slots=True)
class VnetHeaderTooLong:
    """A frame's vnet header length exceeds its data: delivered with an empty packet."""

    vnet_hdr_len: int
    length: int
    offset: int
    problem: FrameProblem = FrameProblem.VNET_HEADER_TOO_LONG


@dataclass(frozen=True, slots=True)
class Truncated:
    """The stream ended (the connection closed) inside a frame: ``pending`` bytes lost."""

    pending: int
    offset: int
    problem: FrameProblem = FrameProblem.TRUNCATED


FrameEvent = Desynchronised | VnetHeaderTooLong | Truncated


class Decoded(NamedTuple):
    """One ``feed``'s result."""

    packets: list[bytes]  # what to compare: each frame's data after its vnet header
    vnet_headers: list[bytes] | None  # the same frames' vnet headers; None with vnet off
    events: list[FrameEvent]


class Frames(Sequence[bytes]):
    """One receive's whole frames, in place: frame ``i`` is ``data[bounds[i]:bounds[i + 1]]``
    on the wire (length fields, vnet header, packet) and its packet, what is compared, is
    ``data[start(i):bounds[i + 1]]``: ``starts[i]``, or with ``starts`` empty (the framing
    without vnet headers, as the decoder cuts it) right after the frame's length field,
    ``bounds[i] + HEADER`` (one offset a frame, each an int object, instead of two).
    Nothing is copied until a packet is asked for
    (``frames[i]``); the comparator (``Comparator.feed_many``) reads the packets in place and
    ``HeldFrames.hold_frames`` holds the primary's wire bytes as they came, so that a run of
    released frames goes out as one slice of ``data`` (the output framing is the input's).

    A sequence of the packets (``len``, ``frames[i]``) for everything else. ``events``: the
    problems the decoder found in this receive (``FrameDecoder.feed``'s)."""

    __slots__ = ("bounds", "data", "events", "starts", "vnet_hdr")

    def __init__(
        self,
        data: bytes,
        bounds: list[int],
        starts: list[int],
        vnet_hdr: bool,
        events: list[FrameEvent],
    ) -> None:
        self.data = data
        self.bounds = bounds  # where each frame starts, then where the last ends
        self.starts = starts  # where each packet starts, or empty: after its length field
        self.vnet_hdr = vnet_hdr
        self.events = events

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def start(self, index: int) -> int:
        """Where the packet of frame ``index`` (0 <= ``index`` < len) starts in ``data``."""
        return self.starts[index] if self.starts else self.bounds[index] + HEADER

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        """The packet of frame ``index`` (its vnet header left out), copied."""
        if isinstance(index, slice):
            return [self.packet(position) for position in range(len(self))[index]]
        return self.packet(index)

    def packet(self, index: int) -> bytes:
        if index < 0:
            index += len(self)
        return self.data[self.start(index) : self.bounds[index + 1]]

    def __iter__(self) -> Iterator[bytes]:
        for index in range(len(self)):
            yield self.packet(index)

    def wire(self, index: int) -> bytes:
        """Frame ``index`` as it came on the wire (length fields included), copied."""
        return self.data[self.bounds[index] : self.bounds[index + 1]]

    def vnet_header(self, index: int) -> bytes:
        """The vnet header of frame ``index`` (vnet on; b"" otherwise). A frame whose vnet
        header length exceeded its data has all of its data here and an empty packet."""
        if not self.vnet_hdr:
            return b""
        return self.data[self.bounds[index] + VNET_HEADER : self.start(index)]

    def vnet_headers(self) -> list[bytes]:
        return [self.vnet_header(index) for index in range(len(self))]


class FrameDecoder:
    """Cut a byte stream into frames; one decoder per connection.

    ``vnet_hdr`` must match the sender's ``vnet_hdr_support``: the framing carries no marker
    that would tell. ``max_frame`` is the largest data length accepted (QEMU's limit by
    default: QEMU can neither receive nor pass on a larger frame).
    """

    def __init__(self, vnet_hdr: bool = False, max_frame: int = MAX_FRAME) -> None:
        if max_frame < 0:
            raise UsageError(f"max_frame must be non-negative, got {max_frame}")
        self.vnet_hdr = vnet_hdr
        self.max_frame = max_frame
        self._carried = b""
        self.desynchronised = False  # a bad length was read: nothing more until end()
        self.offset = 0  # stream bytes consumed before the carry buffer
        self.frames = 0  # frames delivered

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._carried)

    def feed(self, data: bytes) -> Decoded:
        """The frames ``data`` completes, with the problems found on the way. After a
        :class:`Desynchronised` the stream is not read any more: nothing is decoded."""
        frames = self.cut(data)
        packets = [frames.packet(index) for index in range(len(frames))]
        headers = frames.vnet_headers() if self.vnet_hdr else None
        return Decoded(packets, headers, frames.events)

    def cut(self, data: bytes) -> Frames:
        """Like :meth:`feed`, without copying: the frames ``data`` completes as offsets into
        one buffer (``data`` itself unless a frame was carried over from the last call)."""
        events: list[FrameEvent] = []
        if self.desynchronised:
            return Frames(b"", [0], [], self.vnet_hdr, events)
        if self._carried:
            data = self._carried + data
        bounds: list[int] = [0]
        starts: list[int] = []
        if self.vnet_hdr:
            position, bad = self._vnet(data, bounds, starts, events)
        else:
            position, bad = self._plain(data, bounds)  # (``starts`` stays empty)
        if bad is not None:
            # Every frame before the bad length is delivered (a primary frame received
            # whole is held, never lost); the rest of what came is of no use.
            events.append(
                Desynchronised(bad, self.max_frame, self.offset + position, len(data) - position)
            )
            self.desynchronised = True
            self._carried = b""
        else:
            self._carried = data[position:] if position < len(data) else b""
        self.offset += position
        self.frames += len(bounds) - 1
        return Frames(data, bounds, starts, self.vnet_hdr, events)

    def _plain(self, data: bytes, bounds: list[int]) -> tuple[int, int | None]:
        """Frames from ``data`` into ``bounds`` (each packet starts ``HEADER`` bytes after its
        frame): (where the first incomplete frame starts, the bad length found there or
        None)."""
        # Typed, with the lengths read byte by byte: compiled (setup.py) this is machine
        # arithmetic, no object per field (struct would make two) and no copy.
        limit: int = self.max_frame
        position: i64 = 0
        available: i64 = len(data)
        while position + HEADER <= available:
            length: i64 = be32(data, position)
            if length > limit:
                return position, length
            end: i64 = position + HEADER + length
            if end > available:
                break
            bounds.append(end)
            position = end
        return position, None

    def _vnet(
        self, data: bytes, bounds: list[int], starts: list[int], events: list[FrameEvent]
    ) -> tuple[int, int | None]:
        limit: int = self.max_frame
        position: i64 = 0
        available: i64 = len(data)
        while position + VNET_HEADER <= available:
            length: i64 = be32(data, position)
            if length > limit:
                return position, length
            vnet_len: i64 = be32(data, position + HEADER)
            start: i64 = position + VNET_HEADER
            end: i64 = start + length
            if end > available:
                break
            if vnet_len > length:
                events.append(VnetHeaderTooLong(vnet_len, length, self.offset + position))
                starts.append(end)  # an empty packet; the whole data is its "header"
            else:
                starts.append(start + vnet_len)
            bounds.append(end)
            position = end
        return position, None

    def end(self) -> list[FrameEvent]:
        """The stream ended (connection closed): report a cut frame, and start afresh (a new
        connection starts with a length, whatever the old one left). A desynchronised
        stream was reported already."""
        events: list[FrameEvent] = []
        if self._carried:
            events.append(Truncated(len(self._carried), self.offset))
        self._carried = b""
        self.desynchronised = False
        self.offset = 0
        return events


def frame_header(length: int, vnet_hdr_len: int | None = None) -> bytes:
    """The length field(s) that precede ``length`` bytes of data (vnet header included);
    ``vnet_hdr_len`` None means vnet_hdr_support off."""
    if vnet_hdr_len is None:
        return _LENGTH.pack(length)
    return _LENGTHS.pack(length, vnet_hdr_len)


def encode_frame(packet: bytes, vnet_header: bytes | None = None) -> bytes:
    """One frame: ``packet`` (an Ethernet frame) after ``vnet_header`` when vnet is on."""
    if vnet_header is None:
        return _LENGTH.pack(len(packet)) + packet
    return _LENGTHS.pack(len(vnet_header) + len(packet), len(vnet_header)) + vnet_header + packet


def encode_frames(packets: list[bytes], vnet_headers: list[bytes] | None = None) -> bytes:
    """Several frames, one bytes object (one write)."""
    parts: list[bytes] = []
    if vnet_headers is None:
        pack = _LENGTH.pack
        for packet in packets:
            parts.append(pack(len(packet)))
            parts.append(packet)
    else:
        pack_both = _LENGTHS.pack
        for packet, header in zip(packets, vnet_headers, strict=True):
            parts.append(pack_both(len(header) + len(packet), len(header)))
            parts.append(header)
            parts.append(packet)
    return b"".join(parts)


# -- the Xen notify channel ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyInitRequested:
    """Xen's COLO frame asks whether the proxy is there (answer :func:`proxy_init_reply`)."""


@dataclass(frozen=True, slots=True)
class CheckpointDone:
    """Xen finished a checkpoint: release every held primary packet, compare afresh."""


@dataclass(frozen=True, slots=True)
class UnknownNotify:
    """A notify message that is none of the known words (QEMU logs "unsupported
    instruction"); ``data`` is its first bytes, for the log."""

    data: bytes
    length: int


NOTIFY_SHOWN: Final = 64  # bytes of an unknown message kept for the log

NotifyEvent = ProxyInitRequested | CheckpointDone | UnknownNotify | FrameEvent


class NotifyDecoder:
    """The notify channel's messages from a byte stream; one decoder per connection.

    The words are short; a frame above ``max_frame`` desynchronises the channel like any
    stream (QEMU would accept up to 69 632 bytes and then not recognise it).
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._frames = FrameDecoder(vnet_hdr=False, max_frame=max_frame)

    def feed(self, data: bytes) -> list[NotifyEvent]:
        decoded = self._frames.feed(data)
        events: list[NotifyEvent] = []
        for message in decoded.packets:
            if message == NOTIFY_PROXY_INIT:
                events.append(ProxyInitRequested())
            elif message == NOTIFY_CHECKPOINT_DONE:
                events.append(CheckpointDone())
            else:
                events.append(UnknownNotify(message[:NOTIFY_SHOWN], len(message)))
        events += decoded.events  # a desync comes after every word received before it
        return events

    def end(self) -> list[NotifyEvent]:
        return list(self._frames.end())


def proxy_init_reply() -> bytes:
    """The answer to ``COLO_USERSPACE_PROXY_INIT``, framed."""
    return encode_frame(NOTIFY_PROXY_INIT_REPLY)


def do_checkpoint() -> bytes:
    """colo-compare's checkpoint request to Xen, framed."""
    return encode_frame(NOTIFY_DO_CHECKPOINT)


__all__ = [
    "HEADER",
    "MAX_FRAME",
    "NOTIFY_CHECKPOINT_DONE",
    "NOTIFY_DO_CHECKPOINT",
    "NOTIFY_PROXY_INIT",
    "NOTIFY_PROXY_INIT_REPLY",
    "VNET_HEADER",
    "CheckpointDone",
    "Decoded",
    "Desynchronised",
    "FrameDecoder",
    "FrameEvent",
    "FrameProblem",
    "Frames",
    "NotifyDecoder",
    "NotifyEvent",
    "ProxyInitRequested",
    "Truncated",
    "UnknownNotify",
    "VnetHeaderTooLong",
    "do_checkpoint",
    "encode_frame",
    "encode_frames",
    "frame_header",
    "proxy_init_reply",
]
