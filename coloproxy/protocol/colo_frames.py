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
among themselves. Frames are sliced from the received bytes once (one copy per frame); a
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
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple

from coloproxy.errors import UsageError

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


def _be32(data: bytes, position: int) -> int:
    """The big-endian 32-bit number at ``position`` (four bytes must be there)."""
    return (
        (data[position] << 24)
        | (data[position + 1] << 16)
        | (data[position + 2] << 8)
        | data[position + 3]
    )


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
        events: list[FrameEvent] = []
        if self.desynchronised:
            return Decoded([], [] if self.vnet_hdr else None, events)
        if self._carried:
            data = self._carried + data
        if self.vnet_hdr:
            packets, headers, position, bad = self._vnet(data, events)
        else:
            packets, position, bad = self._plain(data)
            headers = None
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
        self.frames += len(packets)
        return Decoded(packets, headers, events)

    def _plain(self, data: bytes) -> tuple[list[bytes], int, int | None]:
        """Frames from ``data``: (packets, where the first incomplete frame starts, the bad
        length found there or None)."""
        # Typed, with the lengths read byte by byte: compiled (setup.py) this is machine
        # arithmetic and one slice per frame, no object per field (struct would make two).
        packets: list[bytes] = []
        limit: int = self.max_frame
        position: int = 0
        available: int = len(data)
        while position + HEADER <= available:
            length: int = _be32(data, position)
            if length > limit:
                return packets, position, length
            end: int = position + HEADER + length
            if end > available:
                break
            packets.append(data[position + HEADER : end])
            position = end
        return packets, position, None

    def _vnet(
        self, data: bytes, events: list[FrameEvent]
    ) -> tuple[list[bytes], list[bytes], int, int | None]:
        packets: list[bytes] = []
        headers: list[bytes] = []
        limit: int = self.max_frame
        position: int = 0
        available: int = len(data)
        while position + VNET_HEADER <= available:
            length: int = _be32(data, position)
            if length > limit:
                return packets, headers, position, length
            vnet_len: int = _be32(data, position + HEADER)
            start: int = position + VNET_HEADER
            end: int = start + length
            if end > available:
                break
            if vnet_len > length:
                events.append(VnetHeaderTooLong(vnet_len, length, self.offset + position))
                headers.append(data[start:end])
                packets.append(b"")
            else:
                headers.append(data[start : start + vnet_len])
                packets.append(data[start + vnet_len : end])
            position = end
        return packets, headers, position, None

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
