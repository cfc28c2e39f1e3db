"""The chardev transport: colo-compare's three stream sockets instead of NFQUEUE (shell).

Theory of operation
-------------------
QEMU's filter-redirector (or filter-mirror) on the primary writes the PVM's output to
``primary_in``; the secondary host's filter-redirector writes the SVM's output to
``secondary_in``; what we release goes out on ``outdev`` to a filter-redirector ``indev``,
which puts it back on the PVM's netdev. Every socket carries QEMU's frames
(:mod:`coloproxy.protocol.colo_frames`: length, optional vnet header length, data). Each
socket is unix or TCP, and we listen or connect, as the QEMU chardev on the other end is
configured; a client socket reconnects every ``reconnect_ms`` while it is down.

Who may feed the comparator: whatever reaches ``primary_in`` is held as the PVM's output and
released at the next checkpoint, whatever reaches ``secondary_in`` vouches for it. So a
listening socket has one peer at a time: a connection that comes while one is connected is
refused (closed at once, logged, counted ``busy``), never allowed to replace it. QEMU's own
client chardev closes its connection before it reconnects, so it is never refused for
itself; a peer that vanished without closing (a crashed host) is found by TCP keepalive
within about ``KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL`` seconds, and the
next connection is then taken. Unix sockets are created with mode 0600 (0660 and the group
with ``chardev.group``) before ``listen()``, whatever the umask; a TCP listener accepts only
the peers of its ``allow`` list when it has one (counted ``not-allowed`` otherwise).

Each connection gets a fresh decoder: a frame cut by a disconnection is reported
(``truncated``) and forgotten. A length above QEMU's limit means the stream lost its framing
(``desync``): every frame received whole before it is handed on as usual, the connection is
dropped at once (the sender starts a fresh stream on its next one) and, on an input, a
checkpoint is asked for.

Per receive: one ``loop.time()``, the decoder cuts the frames, the primary's are stored under
fresh integer tokens and handed to the proxy in one batch (``on_primary(tokens, packets,
now)``), the secondary's likewise (token None: nothing of them is kept). The proxy answers
through the transport itself (its P-out verdicts): ``accept(token)`` queues that frame,
re-framed with its vnet header, for outdev; the queue is written once per event-loop
iteration. The secondary's verdicts are all drops and cost nothing.

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
import contextlib
import grp
import ipaddress
import logging
import os
import socket
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from coloproxy.compare.relay import HeldFrames
from coloproxy.config import ChardevConfig, ChardevSocket
from coloproxy.errors import ColoproxyError, UsageError
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

log = logging.getLogger(__name__)

PRIMARY_IN: Final = "primary_in"
SECONDARY_IN: Final = "secondary_in"
OUTDEV: Final = "outdev"
NOTIFY: Final = "notify"
# asyncio's write buffer of the outdev connection: above the high mark it calls
# pause_writing and we keep frames in our own (bounded) buffer instead.
# A TCP connect to an address that never answers would wait for the kernel's SYN retries
# (about two minutes); give up sooner and try again.
CONNECT_TIMEOUT: Final = 10.0
WRITE_HIGH: Final = 1 << 20
WRITE_LOW: Final = 256 << 10
# TCP keepalive on every connection: we never write to an input socket, so a peer host that
# died without a FIN would otherwise hold a listening socket's one connection for ever.
KEEPALIVE_IDLE: Final = 5
KEEPALIVE_INTERVAL: Final = 1
KEEPALIVE_COUNT: Final = 5
BACKLOG: Final = 4  # connections waiting for accept(): one peer is expected
# Why a connection to a listening socket was refused (metric label).
REFUSED_BUSY: Final = "busy"  # another peer is connected
REFUSED_NOT_ALLOWED: Final = "not-allowed"  # the peer is not on the allow list


class ChardevError(ColoproxyError):
    """A chardev socket cannot be listened on (address in use, bad path, permissions)."""


@dataclass
class LinkFigures:
    """One socket's counts, read by the metrics at scrape time."""

    name: str
    address: str
    connected: bool = False
    connections: int = 0  # connections made or accepted
    disconnections: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # listening: by REFUSED_* reason
    connect_failures: int = 0  # connecting: attempts that failed
    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    problems: Counter[str] = field(default_factory=Counter)  # FrameProblem values
    discarded_bytes: int = 0  # received after a desync, not decoded


OnFrames = Callable[[Sequence[object], list[bytes], float], None]


class _LinkProtocol(asyncio.Protocol):
    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # stream sockets only
        self.link.attach(self)

    def data_received(self, data: bytes) -> None:
        if self.link.current is self:
            self.link.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.detach(self, exc)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        if self.link.current is self:
            self.link.on_writable(False)

    def resume_writing(self) -> None:
        if self.link.current is self:
            self.link.on_writable(True)


class _Link:
    """One socket: listens or connects (and reconnects); at most one connection at a time."""

    def __init__(
        self,
        name: str,
        spec: ChardevSocket,
        reconnect: float,
        on_data: Callable[[bytes], None],
        on_connected: Callable[[], None] = lambda: None,
        on_disconnected: Callable[[], None] = lambda: None,
        on_writable: Callable[[bool], None] = lambda writable: None,
        gid: int | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.gid = gid  # a unix socket we listen on: its group (mode 0660), else mode 0600
        self.reconnect = reconnect
        self.on_data = on_data
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self.on_writable = on_writable
        self.figures = LinkFigures(name, str(spec))
        self.current: _LinkProtocol | None = None
        self.reading_paused = False
        self._server: asyncio.AbstractServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        spec = self.spec
        if not spec.server:
            self._task = asyncio.create_task(self._connect_loop(), name=f"chardev-{self.name}")
            self._task.add_done_callback(self._connect_loop_ended)
            return
        try:
            if spec.path is not None:
                listener = _listen_unix(spec.path, self.gid)
                try:
                    self._server = await loop.create_unix_server(
                        lambda: _LinkProtocol(self), sock=listener
                    )
                except BaseException:
                    listener.close()
                    with contextlib.suppress(OSError):
                        os.unlink(spec.path)
                    raise
            else:
                self._server = await loop.create_server(
                    lambda: _LinkProtocol(self),
                    spec.host,
                    spec.port,
                    reuse_address=True,
                    backlog=BACKLOG,
                )
        except OSError as exc:
            raise ChardevError(f"chardev {self.name}: cannot listen on {spec}: {exc}") from exc
        log.info("chardev %s: listening on %s", self.name, spec)
        if spec.host is not None and not spec.allow and _unspecified(spec.host):
            log.warning(
                "chardev %s: listening on every address of this host with no allow list:"
                " any host that reaches port %d can feed the comparator (docs/chardev.md)",
                self.name,
                spec.port,
            )

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        current = self.current
        if current is not None and current.transport is not None:
            current.transport.abort()  # first: wait_closed may wait for open connections
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            if self.spec.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.spec.path)

    def _connect_loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "chardev %s: the connecting loop stopped: %r; the socket stays down",
                self.name,
                task.exception(),
            )

    async def _connect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        spec = self.spec
        failures = 0
        while not self._closing:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    if spec.path is not None:
                        _, protocol = await loop.create_unix_connection(
                            lambda: _LinkProtocol(self), str(spec.path)
                        )
                    else:
                        _, protocol = await loop.create_connection(
                            lambda: _LinkProtocol(self), str(spec.host), spec.port
                        )
            except (OSError, TimeoutError) as exc:
                self.figures.connect_failures += 1
                # The first failure of a series is worth a warning; the rest would flood.
                level = logging.WARNING if failures == 0 else logging.DEBUG
                reason = str(exc) or f"no answer in {CONNECT_TIMEOUT:g} s"
                log.log(level, "chardev %s: cannot connect to %s: %s; retrying every %g s",
                        self.name, spec, reason, self.reconnect)  # fmt: skip
                failures += 1
                await asyncio.sleep(self.reconnect)
                continue
            failures = 0
            await protocol.lost
            if not self._closing:
                await asyncio.sleep(self.reconnect)

    # -- connections -----------------------------------------------------------------------

    def attach(self, protocol: _LinkProtocol) -> None:
        transport = protocol.transport
        if self._closing:
            if transport is not None:
                transport.abort()
            return
        refusal = self._refusal(protocol)
        if refusal is not None:
            peer = transport.get_extra_info("peername") if transport is not None else None
            log.warning(
                "chardev %s: refused a connection%s: %s",
                self.name,
                f" from {_peer(peer)}" if peer else "",
                "another peer is connected (one at a time)"
                if refusal == REFUSED_BUSY
                else "not on the allow list",
            )
            self.figures.refused[refusal] += 1
            if transport is not None:
                # Before its first byte is read: asyncio starts reading only after
                # connection_made, and never on a closing transport.
                transport.abort()
            return
        self.current = protocol
        if transport is not None:
            transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
            if self.reading_paused:
                transport.pause_reading()
            _tune_tcp(transport)
        self.figures.connected = True
        self.figures.connections += 1
        log.info("chardev %s: connected (%s)", self.name, self.spec)
        self._on_connected()

    def _refusal(self, protocol: _LinkProtocol) -> str | None:
        """Why a new connection may not be this link's, or None when it may."""
        allow = self.spec.allow
        if allow and protocol.transport is not None:
            peer = protocol.transport.get_extra_info("peername")
            try:
                address = ipaddress.ip_address(peer[0]) if peer else None
            except (ValueError, TypeError):
                address = None
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
            if address is None or not any(address in network for network in allow):
                return REFUSED_NOT_ALLOWED
        if self.current is not None:
            # One peer at a time; QEMU closes its old connection before it reconnects.
            return REFUSED_BUSY
        return None

    def drop(self) -> None:
        """Close the current connection at once (its stream is of no use any more)."""
        current = self.current
        if current is not None and current.transport is not None:
            current.transport.abort()  # connection_lost -> detach, as for any end

    def detach(self, protocol: _LinkProtocol, exc: Exception | None) -> None:
        if self.current is not protocol:
            return
        self.current = None
        if not self._closing:
            log.warning(
                "chardev %s: disconnected (%s)%s",
                self.name,
                self.spec,
                f": {exc}" if exc is not None else "",
            )
        self._ended()

    def _ended(self) -> None:
        self.figures.connected = False
        self.figures.disconnections += 1
        self._on_disconnected()

    @property
    def connected(self) -> bool:
        return self.current is not None

    def write(self, data: bytes) -> bool:
        """Write on the current connection; False if there is none."""
        current = self.current
        if current is None or current.transport is None or current.transport.is_closing():
            return False
        current.transport.write(data)
        return True

    def write_buffered(self) -> int:
        current = self.current
        if current is None or current.transport is None:
            return 0
        return current.transport.get_write_buffer_size()

    def pause_reading(self, paused: bool) -> None:
        if paused == self.reading_paused:
            return
        self.reading_paused = paused
        current = self.current
        if current is not None and current.transport is not None:
            if paused:
                current.transport.pause_reading()
            else:
                current.transport.resume_reading()


def _remove_stale_socket(path: Path) -> None:
    """A socket file nobody listens on is removed; a live one is an error."""
    if not path.exists():
        return
    if not path.is_socket():
        raise ChardevError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise ChardevError(f"{path}: another process listens there")


def _listen_unix(path: Path, gid: int | None) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 (0660 and group ``gid``) whatever the
    umask: the mode is set before ``listen()``, until which every connect() is refused."""
    _remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        try:
            os.chmod(path, 0o600 if gid is None else 0o660)
            if gid is not None:
                os.chown(path, -1, gid)
            listener.listen(BACKLOG)
            listener.setblocking(False)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
    except OSError:
        listener.close()
        raise
    return listener


def _unspecified(host: str) -> bool:
    """0.0.0.0 or ::, which bind every address of the host."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


def _tune_tcp(transport: asyncio.Transport) -> None:
    """No Nagle delay on released frames; keepalive to find a peer that died silently."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


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
        reconnect = config.reconnect_ms / 1000
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
        self.primary_in = _Link(
            PRIMARY_IN,
            config.primary_in,
            reconnect,
            self._primary_data,
            on_disconnected=lambda: self._input_ended(self.primary_in, self._primary_decoder),
            gid=gid,
        )
        self.secondary_in = _Link(
            SECONDARY_IN,
            config.secondary_in,
            reconnect,
            self._secondary_data,
            on_disconnected=lambda: self._input_ended(self.secondary_in, self._secondary_decoder),
            gid=gid,
        )
        self.outdev = _Link(
            OUTDEV,
            config.outdev,
            reconnect,
            self._outdev_data,
            on_connected=self._outdev_connected,
            on_writable=self._outdev_writable,
            gid=gid,
        )
        self.notify: _Link | None = None
        self._notify_decoder = NotifyDecoder()
        self._notify_wanted = False  # a DO_CHECKPOINT waits for the notify channel
        self.notify_counts: Counter[tuple[str, str]] = (
            Counter()
        )  # notify messages by word, in and out
        if config.notify is not None:
            self.notify = _Link(
                NOTIFY,
                config.notify,
                reconnect,
                self._notify_data,
                on_connected=self._notify_connected,
                on_disconnected=self._notify_ended,
                gid=gid,
            )
        # Held primary frames by token (their vnet headers when vnet is on), and the released
        # ones not yet written to outdev, framed (bounded by outdev_buffer_bytes): compiled
        # with the comparator (coloproxy/compare/relay.py).
        self._frames = HeldFrames(vnet)
        self._writable = True
        self._flush_pending = False
        self.primary_verdicts = self
        self.secondary_verdicts = _SecondaryOut()

    # -- life cycle ------------------------------------------------------------------------

    @property
    def links(self) -> list[_Link]:
        links = [self.primary_in, self.secondary_in, self.outdev]
        if self.notify is not None:
            links.append(self.notify)
        return links

    async def start(self) -> None:
        started: list[_Link] = []
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
        decoded = self._primary_decoder.feed(data)
        figures = self.primary_in.figures
        figures.bytes_in += len(data)
        now = self._loop.time()
        packets = decoded.packets
        if packets:
            tokens = self._frames.hold(packets, decoded.vnet_headers)
            figures.frames_in += len(packets)
            self._on_primary(tokens, packets, now)
        # After the frames: those that came whole before a desync are held like any.
        if decoded.events:
            self._problems(self.primary_in, decoded.events, now)

    def _secondary_data(self, data: bytes) -> None:
        decoded = self._secondary_decoder.feed(data)
        figures = self.secondary_in.figures
        figures.bytes_in += len(data)
        now = self._loop.time()
        packets = decoded.packets
        if packets:
            figures.frames_in += len(packets)
            self._on_secondary([None] * len(packets), packets, now)
        if decoded.events:
            self._problems(self.secondary_in, decoded.events, now)

    def _input_ended(self, link: _Link, decoder: FrameDecoder) -> None:
        events = decoder.end()
        if events:
            self._problems(link, events, self._loop.time())

    def _problems(self, link: _Link, events: Sequence[FrameEvent], now: float) -> None:
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
        (The transport is the proxy's P-out ``Verdicts``.)"""
        if not self._frames.release(handle):
            raise UsageError(f"chardev: release of frame {handle!r}, which is not held")
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    def drop(self, handle: object) -> None:
        raise UsageError("the chardev transport never drops a primary frame (I2)")

    def flush(self) -> None:
        """Write what was released to outdev, if it can take it; else keep it (bounded)."""
        self._flush_pending = False
        frames = self._frames
        if frames.queued_frames and self._writable and self.outdev.connected:
            count = frames.queued_frames
            data = frames.take()
            if self.outdev.write(data):
                figures = self.outdev.figures
                figures.frames_out += count
                figures.bytes_out += len(data)
            else:  # the connection is closing: keep it all for the next one
                frames.requeue(data, count)
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


__all__ = [
    "OUTDEV",
    "PRIMARY_IN",
    "SECONDARY_IN",
    "ChardevError",
    "ChardevTransport",
    "LinkFigures",
]
