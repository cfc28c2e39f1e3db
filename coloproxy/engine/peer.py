"""The heartbeat between the two daemons of a pair (shell): UDP datagrams on one or more
paths (the replication link, and optionally the LAN).

Theory of operation
-------------------
Each path is one UDP socket bound to this host's address on that network and the engine's
heartbeat port, sending to the peer's address and the same port. What to send and when is
the failover decider's business (:mod:`coloproxy.engine.decider`): :meth:`HeartbeatPeer.send`
puts the same datagram on every path at once, never waiting (a datagram the kernel cannot
take is counted and dropped: the next one follows within the interval). Every datagram that
arrives is decoded (never raises) and handed to ``on_heartbeat(path, heartbeat, now)``;
bad ones are counted by reason, the metric label.

Why UDP: a heartbeat is only worth something when fresh; a lost one must not delay the next
(TCP would retransmit it, and queue the next behind it). Why a socket per path, bound to the
local address: a heartbeat heard on the LAN while the replication link is cut is exactly the
evidence that keeps the secondary from taking over (split brain); binding pins each to its
network.

Datagrams come only from the peer's address on each path (``connect``-ed sockets: the kernel
drops the rest), which a host on the link can forge. So every datagram is sealed with
HMAC-SHA256 under a key both daemons share (``engine.heartbeat_key``), and each path keeps a
replay window over the sender's ``boot`` and ``seq`` (:class:`~coloproxy.engine.heartbeat.
ReplayWindow`): a datagram whose tag is wrong is counted ``bad-forged``, an authentic one
heard before (or older than one heard) ``bad-replayed``; neither reaches the decider.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from coloproxy.engine.heartbeat import (
    BadHeartbeat,
    Heartbeat,
    ReplayWindow,
    open_heartbeat,
    seal_heartbeat,
)
from coloproxy.engine.qmp import EngineError

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class PeerError(EngineError):
    """A heartbeat socket cannot be opened."""


@dataclass(frozen=True, slots=True)
class HeartbeatPath:
    name: str  # "replication", "lan": the metric label and the decider's path name
    local: Address
    remote: Address
    port: int


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, peer: HeartbeatPeer, path: HeartbeatPath) -> None:
        self.peer = peer
        self.path = path
        self.transport: asyncio.DatagramTransport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.peer._received(self.path, data)

    def error_received(self, exc: Exception) -> None:
        # ECONNREFUSED after an ICMP port unreachable: the peer daemon is not (yet) there.
        self.peer.counters["error-" + type(exc).__name__] += 1
        log.debug("heartbeat path %s: %r", self.path.name, exc)


def _same(endpoint: _Endpoint) -> _Endpoint:
    return endpoint


class HeartbeatPeer:
    def __init__(
        self,
        paths: list[HeartbeatPath],
        on_heartbeat: Callable[[str, Heartbeat, float], None],
        key: bytes,
    ) -> None:
        self.paths = list(paths)
        self.on_heartbeat = on_heartbeat
        self._key = key
        self._window = ReplayWindow()
        self.counters: Counter[str] = Counter()  # sent, received, bad-<reason>, error-<type>
        self._endpoints: list[_Endpoint] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        try:
            for path in self.paths:
                family = socket.AF_INET6 if path.local.version == 6 else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((str(path.local), path.port))
                    sock.connect((str(path.remote), path.port))
                    sock.setblocking(False)
                except OSError as exc:
                    sock.close()
                    raise PeerError(
                        f"heartbeat path {path.name}: cannot use {path.local} port {path.port}"
                        f" towards {path.remote}: {exc.strerror or exc}"
                    ) from exc
                endpoint = _Endpoint(self, path)
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_same, endpoint), sock=sock
                )
                endpoint.transport = transport
                self._endpoints.append(endpoint)
        except BaseException:
            await self.aclose()
            raise
        log.info(
            "heartbeats on %s",
            ", ".join(f"{p.name} {p.local} <-> {p.remote} port {p.port}" for p in self.paths),
        )

    async def aclose(self) -> None:
        """Close every socket and wait until asyncio has let go of them."""
        endpoints, self._endpoints = self._endpoints, []
        for endpoint in endpoints:
            if endpoint.transport is not None:
                endpoint.transport.close()
        if endpoints:
            await asyncio.wait([endpoint.lost for endpoint in endpoints], timeout=1.0)

    def send(self, heartbeat: Heartbeat) -> None:
        data = seal_heartbeat(heartbeat, self._key)
        for endpoint in self._endpoints:
            transport = endpoint.transport
            if transport is None or transport.is_closing():
                continue
            try:
                transport.sendto(data)
            except OSError as exc:  # pragma: no cover - asyncio reports most via error_received
                self.counters["error-" + type(exc).__name__] += 1
                continue
            self.counters["sent"] += 1

    def _received(self, path: HeartbeatPath, data: bytes) -> None:
        item = open_heartbeat(data, self._key)
        if isinstance(item, BadHeartbeat):
            self.counters["bad-" + item.reason] += 1
            return
        if not self._window.fresh(path.name, item.boot, item.sequence):
            self.counters["bad-replayed"] += 1
            return
        self.counters["received"] += 1
        loop = self._loop
        now = loop.time() if loop is not None else 0.0
        self.on_heartbeat(path.name, item, now)
