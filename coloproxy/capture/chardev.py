"""The chardev transport: colo-compare's three stream sockets instead of NFQUEUE (shell).

Theory of operation
-------------------
QEMU's filter-redirector (or filter-mirror) on the primary writes the PVM's output to
``primary_in``; the secondary host's filter-redirector writes the SVM's output to
``secondary_in``; what we release goes out on ``outdev`` to a filter-redirector ``indev``,
which puts it back on the PVM's netdev. Every socket carries QEMU's frames
(:mod:`coloproxy.protocol.colo_frames`: length, optional vnet header length, data). Each
socket is a ``Link`` (``chardev_link.py``): unix or TCP, listening or connecting, one peer
at a time.

Each connection gets a fresh decoder: a frame cut by a disconnection is reported
(``truncated``) and forgotten. A length above QEMU's limit means the stream lost its framing
(``desync``): every frame received whole before it is handed on as usual, the connection is
dropped at once (the sender starts a fresh stream on its next one) and, on an input, a
checkpoint is asked for.

Per receive: one ``loop.time()``, the decoder cuts the frames (in place: offsets into the
received bytes, no copy), the primary's are held where they lie under fresh integer tokens
and handed to the proxy in one batch (``on_primary(tokens, frames, now)``), the secondary's
likewise (token None: nothing of them is kept). The proxy answers
through the held frames (its P-out verdicts, ``HeldFrames.accept``): ``accept(token)``
queues that frame, as it came, for outdev (``accept_many(tokens)``: a batch's releases in one
call, as the proxy hands them over); the queue is written once per event-loop iteration, as
the runs of frames it is made of (slices of the receive buffers, one vectored write under
uvloop: nothing joined) unless outdev is behind (then joined: what waits in the connection's
buffer keeps no receive buffer alive).
The secondary's verdicts are all drops and cost nothing. This module is compiled with the
comparator (``coloproxy/variant.py``): what runs per receive and per write is native code;
its sockets (``chardev_link.py``) and the event loop are not.

Output is never lost while coloproxy holds it: released frames wait in our buffer while
outdev is disconnected or its socket is full (asyncio's ``pause_writing``). When the buffer
passes ``outdev_buffer_bytes`` we stop reading ``primary_in`` (the PVM's output then waits
in QEMU's socket and, with the socket full, QEMU's filter holds it) until outdev has taken
half of it. QEMU's colo-compare instead discards what it releases while outdev is
disconnected. Frames already written into a connection that then breaks are lost with it,
as with any stream socket.

Problems the decoder reports (desync, vnet header longer than the frame, truncation) are
logged and counted per socket; on ``primary_in`` and ``secondary_in`` a desync or a
truncation means frames are gone, and the transport asks for a checkpoint (``on_damage``,
the problem as its reason) so that the secondary is made equal to the primary again instead
of waiting for a timeout.

The Xen notify channel (optional): ``COLO_USERSPACE_PROXY_INIT`` is answered
``COLO_COMPARE_GET_XEN_INIT``; ``request_checkpoint`` writes ``DO_CHECKPOINT`` (kept until
the channel is connected if it is down, never twice for one outstanding request); a
``COLO_CHECKPOINT`` from Xen calls ``on_checkpoint_done``.
"""

from __future__ import annotations

import asyncio
import functools
import grp
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final

from coloproxy.capture.chardev_link import ChardevError, Link, LinkFigures
from coloproxy.compare.relay import HeldFrames
from coloproxy.config import ChardevConfig
from coloproxy.errors import UsageError
from coloproxy.protocol.colo_frames import (
    CheckpointDone,
    Desynchronised,
    FrameDecoder,
    FrameEvent,
    NotifyDecoder,
    ProxyInitRequested,
    Truncated,
    UnknownNotify,
    VnetHeaderTooLong,
    do_checkpoint,
    proxy_init_reply,
)

__all__ = ["NOTIFY", "OUTDEV", "PRIMARY_IN", "SECONDARY_IN", "ChardevTransport", "OnFrames"]

log = logging.getLogger(__name__)

PRIMARY_IN: Final = "primary_in"
SECONDARY_IN: Final = "secondary_in"
OUTDEV: Final = "outdev"
NOTIFY: Final = "notify"


# (tokens, packets, now). The packets are a ``Frames``: a sequence of bytes (each packet copied
# when indexed), read in place by ``Comparator.feed_many``.
OnFrames = Callable[[Sequence[object], Sequence[bytes], float], None]


class _SecondaryOut:
    """Secondary frames are never kept: a drop costs nothing, an accept is a bug (I3)."""

    def accept(self, handle: object, payload: bytes | None = None) -> None:
        raise UsageError("a secondary frame released (I3)")

    def drop(self, handle: object) -> None:
        pass


class ChardevTransport:
    """colo-compare's sockets in front of the proxy; see the module docstring.

    ``on_primary(tokens, packets, now)`` and ``on_secondary(tokens, packets, now)`` get each
    receive batch (the daemon feeds them to ``PrimaryProxy.on_primary_many`` /
    ``on_secondary_many``); ``on_damage(reason, now)`` asks for a checkpoint after a frame
    was lost on an input; ``on_checkpoint_done(now)`` is Xen's ``COLO_CHECKPOINT``.
    """

    def __init__(
        self,
        config: ChardevConfig,
        on_primary: OnFrames,
        on_secondary: OnFrames,
        on_damage: Callable[[str, float], None] = lambda reason, now: None,
        on_checkpoint_done: Callable[[float], None] = lambda now: None,
    ) -> None:
        self.config = config
        self._loop = asyncio.get_running_loop()
        self._on_primary = on_primary
        self._on_secondary = on_secondary
        self._on_damage = on_damage
        self._on_checkpoint_done = on_checkpoint_done
        gid: int | None = None
        if config.group is not None:
            try:
                gid = grp.getgrnam(config.group).gr_gid
            except KeyError:
                raise ChardevError(f"chardev group {config.group!r} does not exist") from None
        vnet = config.vnet_hdr
        self._vnet = vnet
        self._primary_decoder = FrameDecoder(vnet_hdr=vnet)
        self._secondary_decoder = FrameDecoder(vnet_hdr=vnet)
        link = functools.partial(Link, reconnect=config.reconnect_ms / 1000, gid=gid)
        self.primary_in = link(
            PRIMARY_IN, config.primary_in, self._primary_data, on_disconnected=self._primary_ended
        )
        self.secondary_in = link(
            SECONDARY_IN,
            config.secondary_in,
            self._secondary_data,
            on_disconnected=self._secondary_ended,
        )
        self.outdev = link(
            OUTDEV,
            config.outdev,
            self._outdev_data,
            on_connected=self._outdev_connected,
            on_writable=self._outdev_writable,
        )
        self.notify: Link | None = None
        self._notify_decoder = NotifyDecoder()
        self._notify_wanted = False  # a DO_CHECKPOINT waits for the notify channel
        # notify messages by word, in and out
        self.notify_counts: Counter[tuple[str, str]] = Counter()
        if config.notify is not None:
            self.notify = link(
                NOTIFY,
                config.notify,
                self._notify_data,
                on_connected=self._notify_connected,
                on_disconnected=self._notify_ended,
            )
        # Held primary frames by token (their vnet headers when vnet is on), and the released
        # ones not yet written to outdev, framed (bounded by outdev_buffer_bytes): compiled
        # with the comparator (coloproxy/compare/relay.py).
        self._frames = HeldFrames(vnet)
        self._frames.on_queued = self._queued
        self._writable = True
        self._flush_pending = False
        # The proxy's P-out verdicts: ``HeldFrames.accept_many`` itself (compiled, a batch's
        # releases in one call), which calls ``_queued`` when the first frame waits for outdev.
        self.primary_verdicts = self._frames
        self.secondary_verdicts = _SecondaryOut()

    # -- life cycle ------------------------------------------------------------------------

    @property
    def links(self) -> list[Link]:
        links = [self.primary_in, self.secondary_in, self.outdev]
        if self.notify is not None:
            links.append(self.notify)
        return links

    async def start(self) -> None:
        started: list[Link] = []
        try:
            for link in self.links:
                await link.start()
                started.append(link)
        except BaseException:
            for link in started:
                await link.close()
            raise

    async def close(self) -> None:
        for link in self.links:
            await link.close()
        frames = self._frames
        if len(frames) or frames.queued_frames:
            log.warning(
                "chardev: closing with %d primary frames held and %d released but not "
                "written to outdev",
                len(frames),
                frames.queued_frames,
            )

    def figures(self) -> list[LinkFigures]:
        return [link.figures for link in self.links]

    @property
    def held_frames(self) -> int:
        return len(self._frames)

    @property
    def outdev_buffered(self) -> int:
        """Bytes released and not yet handed to the outdev connection."""
        return self._frames.queued_bytes

    @property
    def primary_paused(self) -> bool:
        return self.primary_in.reading_paused

    # -- input -----------------------------------------------------------------------------

    def _primary_data(self, data: bytes) -> None:
        # The frames stay where they came (Frames: offsets into ``data``): held in place,
        # compared in place, written out as they came (compare/relay.py).
        frames = self._primary_decoder.cut(data)
        figures = self.primary_in.figures
        figures.bytes_in += len(data)
        now = self._loop.time()
        count = len(frames)
        if count:
            tokens = self._frames.hold_frames(frames)
            figures.frames_in += count
            self._on_primary(tokens, frames, now)
            if self._frames.queued_frames:  # (still waiting: flush checks the bound again)
                self._queued()
        # After the frames: those that came whole before a desync are held like any.
        if frames.events:
            self._problems(self.primary_in, frames.events, now)

    def _secondary_data(self, data: bytes) -> None:
        frames = self._secondary_decoder.cut(data)
        figures = self.secondary_in.figures
        figures.bytes_in += len(data)
        now = self._loop.time()
        count = len(frames)
        if count:
            figures.frames_in += count
            self._on_secondary([None] * count, frames, now)
            if self._frames.queued_frames:
                self._queued()
        if frames.events:
            self._problems(self.secondary_in, frames.events, now)

    def _primary_ended(self) -> None:
        self._input_ended(self.primary_in, self._primary_decoder)

    def _secondary_ended(self) -> None:
        self._input_ended(self.secondary_in, self._secondary_decoder)

    def _input_ended(self, link: Link, decoder: FrameDecoder) -> None:
        events = decoder.end()
        if events:
            self._problems(link, events, self._loop.time())

    def _problems(self, link: Link, events: Sequence[FrameEvent], now: float) -> None:
        figures = link.figures
        damaged = ""
        for event in events:
            figures.problems[event.problem.value] += 1
            if isinstance(event, Desynchronised):
                figures.discarded_bytes += event.discarded
                log.error(
                    "chardev %s: a frame length of %d at stream offset %d is above QEMU's "
                    "limit of %d: the stream lost its framing; dropping the connection (%d "
                    "bytes received after it discarded)",
                    link.name,
                    event.length,
                    event.offset,
                    event.limit,
                    event.discarded,
                )
                link.drop()
                damaged = event.problem.value
            elif isinstance(event, VnetHeaderTooLong):
                log.error(
                    "chardev %s: frame at stream offset %d has a vnet header length of %d "
                    "but only %d bytes (is vnet_hdr set as on QEMU's filters?)",
                    link.name,
                    event.offset,
                    event.vnet_hdr_len,
                    event.length,
                )
            elif isinstance(event, Truncated):
                log.error(
                    "chardev %s: connection ended inside a frame: %d bytes lost",
                    link.name,
                    event.pending,
                )
                damaged = damaged or event.problem.value
        if damaged and (link is self.primary_in or link is self.secondary_in):
            self._on_damage(damaged, now)

    def _outdev_data(self, data: bytes) -> None:
        # colo-compare never reads outdev; a filter-redirector indev never writes to it.
        self.outdev.figures.bytes_in += len(data)

    # -- output ----------------------------------------------------------------------------

    def accept(self, handle: object, payload: bytes | None = None) -> None:
        """The proxy released the primary frame ``handle`` (a token): queue it for outdev.
        (What ``primary_verdicts``, the held frames, do; here for callers of the transport.)"""
        self._frames.accept(handle, payload)

    def accept_many(self, handles: list[object]) -> None:
        """``accept`` each of ``handles``, in order (``HeldFrames.accept_many``)."""
        self._frames.accept_many(handles)

    def drop(self, handle: object) -> None:
        raise UsageError("the chardev transport never drops a primary frame (I2)")

    def _queued(self) -> None:
        """A released frame waits for outdev: write at the end of this loop iteration."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what was released to outdev, if it can take it; else keep it (bounded)."""
        self._flush_pending = False
        frames = self._frames
        outdev = self.outdev
        if frames.queued_frames and self._writable and outdev.connected:
            count = frames.queued_frames
            size = frames.queued_bytes
            if outdev.write_buffered():
                # outdev is behind: one compact copy waits in the connection's buffer, no
                # receive buffer kept alive for the few frames of it that are queued
                parts: list[bytes | memoryview] = [frames.take()]
            else:
                # the usual case: the runs of released frames as they lie in the receive
                # buffers, in one vectored write (what the socket does not take at once
                # keeps at most these buffers alive)
                parts = frames.take_parts()
            if outdev.writelines(parts):
                figures = outdev.figures
                figures.frames_out += count
                figures.bytes_out += size
            else:  # the connection is closing: keep it all for the next one
                frames.requeue(b"".join(parts), count)
        limit = self.config.outdev_buffer_bytes
        buffered = frames.queued_bytes
        if buffered > limit and not self.primary_in.reading_paused:
            log.warning(
                "chardev: %d bytes released and waiting for outdev (%s): holding primary_in",
                buffered,
                "disconnected" if not self.outdev.connected else "slow",
            )
            self.primary_in.pause_reading(True)
        elif buffered <= limit // 2 and self.primary_in.reading_paused:
            log.info("chardev: outdev caught up; reading primary_in again")
            self.primary_in.pause_reading(False)

    def _outdev_connected(self) -> None:
        self._writable = True
        if self._frames.queued_frames:
            log.info(
                "chardev outdev: writing %d frames kept while disconnected",
                self._frames.queued_frames,
            )
        self.flush()

    def _outdev_writable(self, writable: bool) -> None:
        self._writable = writable
        if writable:
            self.flush()

    # -- Xen notify ------------------------------------------------------------------------

    def request_checkpoint(self) -> None:
        """Tell Xen a checkpoint is needed (``DO_CHECKPOINT``), now or once connected."""
        if self.notify is None:
            return
        self._notify_wanted = True
        self._send_do_checkpoint()

    def _send_do_checkpoint(self) -> None:
        if self.notify is not None and self._notify_wanted and self.notify.write(do_checkpoint()):
            self._notify_wanted = False
            self.notify_counts["out", "DO_CHECKPOINT"] += 1
            self.notify.figures.frames_out += 1
        elif self._notify_wanted:
            log.warning("chardev notify: not connected; DO_CHECKPOINT sent once it is")

    def _notify_connected(self) -> None:
        self._send_do_checkpoint()

    def _notify_ended(self) -> None:
        if self.notify is not None:
            events = [e for e in self._notify_decoder.end() if isinstance(e, Truncated)]
            if events:
                self._problems(self.notify, events, self._loop.time())

    def _notify_data(self, data: bytes) -> None:
        link = self.notify
        if link is None:
            return
        link.figures.bytes_in += len(data)
        now = self._loop.time()
        frame_events: list[FrameEvent] = []
        for event in self._notify_decoder.feed(data):
            if isinstance(event, ProxyInitRequested):
                link.figures.frames_in += 1
                self.notify_counts["in", "COLO_USERSPACE_PROXY_INIT"] += 1
                log.info("chardev notify: COLO_USERSPACE_PROXY_INIT; answering")
                if link.write(proxy_init_reply()):
                    link.figures.frames_out += 1
                    self.notify_counts["out", "COLO_COMPARE_GET_XEN_INIT"] += 1
            elif isinstance(event, CheckpointDone):
                link.figures.frames_in += 1
                self.notify_counts["in", "COLO_CHECKPOINT"] += 1
                self._notify_wanted = False  # done: a waiting request is served
                self._on_checkpoint_done(now)
            elif isinstance(event, UnknownNotify):
                link.figures.frames_in += 1
                self.notify_counts["in", "unknown"] += 1
                log.error(
                    "chardev notify: unknown message of %d bytes: %r", event.length, event.data
                )
            else:
                frame_events.append(event)
        if frame_events:
            self._problems(link, frame_events, now)
