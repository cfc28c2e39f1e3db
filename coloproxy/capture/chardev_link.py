"""One chardev socket of the chardev transport: listen or connect, one peer at a time (shell).

A ``Link`` is one of colo-compare's stream sockets as QEMU's chardev on the other end is
configured: unix or TCP, and we listen or connect; a client socket reconnects every
``reconnect_ms`` while it is down. It hands the bytes it receives to its owner
(``chardev.py``, which cuts them into frames), writes what it is given, counts what it sees
(``LinkFigures``, for the metrics) and tells its owner when a connection comes, ends, or
cannot take more writes.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from coloproxy.config import ChardevSocket
from coloproxy.errors import ColoproxyError

__all__ = [
    "BACKLOG",
    "CONNECT_TIMEOUT",
    "KEEPALIVE_COUNT",
    "KEEPALIVE_IDLE",
    "KEEPALIVE_INTERVAL",
    "REFUSED_BUSY",
    "REFUSED_NOT_ALLOWED",
    "WRITE_HIGH",
    "WRITE_LOW",
    "ChardevError",
    "Link",
    "LinkFigures",
]

log = logging.getLogger(__name__)

# A TCP connect to an address that never answers would wait for the kernel's SYN retries
# (about two minutes); give up sooner and try again.
CONNECT_TIMEOUT: Final = 10.0
# asyncio's write buffer of the outdev connection: above the high mark it calls
# pause_writing and we keep frames in our own (bounded) buffer instead.
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


class _LinkProtocol(asyncio.Protocol):
    def __init__(self, link: Link) -> None:
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


class Link:
    """One socket: listens or connects (and reconnects); at most one connection at a time."""

    def __init__(
        self,
        name: str,
        spec: ChardevSocket,
        on_data: Callable[[bytes], None],
        *,
        reconnect: float,
        gid: int | None = None,
        on_connected: Callable[[], None] = lambda: None,
        on_disconnected: Callable[[], None] = lambda: None,
        on_writable: Callable[[bool], None] = lambda writable: None,
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

    def writelines(self, parts: list[bytes | memoryview]) -> bool:
        """Write ``parts`` one after the other on the current connection (uvloop: one
        vectored write, nothing joined); False if there is none."""
        current = self.current
        if current is None or current.transport is None or current.transport.is_closing():
            return False
        current.transport.writelines(parts)
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
