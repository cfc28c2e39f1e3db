"""NFQUEUE on an asyncio loop: bind one queue, hand packets to a consumer, take verdicts later.

Theory of operation
-------------------
Every packet that hits an ``NFQUEUE --queue-num N`` rule waits in the kernel's queue N while
a copy goes to the one netlink socket bound to N. The packet stays there until that socket
sends a verdict for its id -- accept, accept with a new payload, or drop -- however long
that takes and however many packets come after it. That wait is how coloproxy *holds* PVM
output until the comparator releases it.

This module is the shell around that: ``open()`` binds the queue and registers the socket
with the running asyncio loop (``loop.add_reader``). Each wake-up reads the clock once
(``now = loop.time()``) and delivers up to ``batch`` packets as
``on_packet(handle, payload, now)``. The consumer keeps ``handle`` as long as it likes and
passes it back to ``accept(handle)``, ``accept(handle, new_payload)`` or ``drop(handle)``,
inside the callback or any time later. ``close()`` unbinds.

Two transports share that interface (``PacketQueue``):

* ``NfQueue`` (here): the netfilterqueue library (libnetfilter_queue underneath);
* ``NetlinkQueue`` (``netlink.py``): the same protocol spoken over a raw netlink socket,
  which can set the GSO flag and send batch verdicts (see that module and
  ``bench/nfqueue_README.md`` for the measurements that choose between them).

Fail closed, always. We never set ``NFQA_CFG_F_FAIL_OPEN`` and the rules carry no
``--queue-bypass`` (docs/data-path.md). So the kernel *drops* a packet when the queue holds
``max_len`` packets (held ones count; /proc ``queue_dropped``), when the socket's receive
buffer is full (``user_dropped``), when no process is bound, and -- every held packet at
once -- when a bound queue is closed or its process dies. Dropping PVM output costs a stall
that the guest's TCP recovers from; releasing it unchecked would break invariant I1.

Bounds. ``max_len`` must stay above the comparator's ``max_held_packets`` (4096) plus one
receive burst, or the kernel drops PVM packets before the comparator's overflow checkpoint
can release them (I2); hence the default of 8192. The kernel finds a verdict's packet by a
linear walk of its queue from the oldest entry (``find_dequeue_entry`` in
net/netfilter/nfnetlink_queue.c), so a verdict costs more the more packets are held in
front of it.

Hot path: one Python call per packet into ``on_packet``, the payload copied once into a
``bytes``; no logging, no per-packet objects of ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import logging
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from coloproxy.config import Transport
from coloproxy.errors import ColoproxyError, InputError, UsageError

if TYPE_CHECKING:
    import asyncio

    from netfilterqueue import NetfilterQueue, Packet

__all__ = [
    "NETLINK_NETFILTER",
    "NfQueue",
    "OnPacket",
    "PacketQueue",
    "QueueConfig",
    "QueueCounters",
    "QueueError",
    "QueueState",
    "Transport",
    "in_netns",
    "netlink_socket",
    "open_queue",
]

log = logging.getLogger(__name__)

# linux/netlink.h
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
# asm-generic/socket.h: like SO_RCVBUF but may exceed net.core.rmem_max (needs CAP_NET_ADMIN)
SO_RCVBUFFORCE = 33
# linux/sched.h
_CLONE_NEWNET = 0x40000000

OnPacket = Callable[[Any, bytes, float], None]
"""``on_packet(handle, payload, now)``: ``handle`` is opaque, give it back for the verdict;
``payload`` is the packet from its IP header on (a copy the consumer may keep); ``now`` is
``loop.time()`` read once for the whole batch the packet arrived in."""


class QueueError(ColoproxyError):
    """An NFQUEUE cannot be bound or used (not root, queue held by another socket, ...).

    The cause is chained (``raise ... from exc``); ``queue_num`` says which queue.
    """

    def __init__(self, message: str, queue_num: int | None = None) -> None:
        super().__init__(message)
        self.queue_num = queue_num


class QueueState(enum.Enum):
    IDLE = "idle"  # built, not bound yet
    OPEN = "open"  # bound, reader registered
    CLOSED = "closed"  # unbound; the kernel dropped whatever was still queued


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """One queue's settings. Every default has its reason next to it."""

    queue_num: int
    # Kernel queue length in packets, held ones included; above the comparator's
    # max_held_packets (4096) plus a receive burst, so the comparator's overflow checkpoint,
    # not the kernel, deals with a full queue. Kernel default: 1024.
    max_len: int = 8192
    # Bytes of each packet copied to us. The comparator needs whole packets; the kernel caps
    # it at 65531 (NFQNL_MAX_COPY_RANGE), netfilterqueue at 4016 (its 4 KiB receive buffer).
    copy_range: int = 0xFFFF
    # Socket receive buffer (SO_RCVBUFFORCE; the kernel doubles it for bookkeeping). A full
    # buffer makes the kernel drop packets (user_dropped). 8 MiB holds about 4000 packets of
    # 1500 B, or about 120 GSO packets of 64 KiB, i.e. a few milliseconds at full speed.
    rcvbuf: int = 8 << 20
    # Packets delivered per loop wake-up at most, so that timers and other sockets run and
    # ``now`` stays fresh under sustained load.
    batch: int = 256
    # NFQA_CFG_F_GSO: let GSO packets (up to 64 KiB) reach us whole instead of having the
    # kernel segment them first. Only the netlink transport can set it. Such packets carry
    # partial checksums, so not for a queue whose verdicts rewrite payloads (S-in).
    gso: bool = False
    # Bind in this named network namespace (``ip netns``) instead of ours: for the lab and the
    # tests, where each "host" is a namespace. The socket stays in it; the process does not.
    netns: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.queue_num <= 0xFFFF:
            raise InputError(f"queue number {self.queue_num} is outside 0..65535")
        if self.max_len < 1:
            raise InputError(f"queue {self.queue_num}: max_len must be at least 1")
        if not 1 <= self.copy_range <= 0xFFFF:
            raise InputError(f"queue {self.queue_num}: copy_range must be within 1..65535")
        if self.rcvbuf < 4096:
            raise InputError(f"queue {self.queue_num}: rcvbuf must be at least 4096 bytes")
        if self.batch < 1:
            raise InputError(f"queue {self.queue_num}: batch must be at least 1")


@dataclass(frozen=True, slots=True)
class QueueCounters:
    """Counters of one queue since ``open()``; the kernel's own are in ``stats.py``."""

    received: int  # packets delivered to on_packet
    wakeups: int  # reader calls that delivered at least one packet
    truncated: int  # packets longer than copy_range (delivered cut short)
    kernel_errors: int  # error replies to our verdicts (unknown id, ...)
    verdict_sends: int  # send() calls that carried verdicts
    batch_verdicts: int  # NFQNL_MSG_VERDICT_BATCH messages among them


class PacketQueue(Protocol):
    """What the daemon uses, whatever the transport."""

    @property
    def config(self) -> QueueConfig: ...

    @property
    def state(self) -> QueueState: ...

    def open(self) -> None:
        """Bind and start delivering to ``on_packet``; call from the running loop's thread."""

    def accept(self, handle: Any, payload: bytes | None = None) -> None:
        """Let the packet go on, with ``payload`` instead of its own bytes if given."""

    def drop(self, handle: Any) -> None:
        """Drop the packet."""

    def close(self) -> None:
        """Unbind; the kernel drops every packet still queued. Idempotent."""

    def counters(self) -> QueueCounters: ...

    def fileno(self) -> int:
        """The netlink socket's descriptor (diagnostics; -1 when not open)."""


# ---------------------------------------------------------------------------------------------
# Network namespaces: the lab and the tests model hosts as namespaces, and a netfilter queue
# belongs to the namespace of the rule that feeds it. A socket keeps the namespace it was
# created in, so we enter the namespace (this thread only), create the socket and come back.
# Python 3.11 has no os.setns, hence ctypes.

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace ``name`` (no-op for ``None``).

    For creating sockets and opening /proc/net files there; keep the body short, since
    anything else this thread does meanwhile happens in that namespace too.
    """
    if name is None:
        yield
        return
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise QueueError(f"network namespace {name!r} not found: {exc}") from exc
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target)
        except OSError as exc:
            raise QueueError(f"cannot enter network namespace {name!r}: {exc}") from exc
        try:
            yield
        finally:
            # Staying in the wrong namespace would silently misdirect every later socket.
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def netlink_socket(netns: str | None = None) -> socket.socket:
    """A NETLINK_NETFILTER socket, created in ``netns`` if given, not bound."""
    with in_netns(netns):
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


def no_enobufs(fd: int) -> None:
    """Tell the kernel not to report a full receive buffer as a socket error (ENOBUFS).

    It still drops what does not fit (``user_dropped`` in /proc/net/netfilter/
    nfnetlink_queue counts it). The error itself would be a hazard: epoll reports it as
    EPOLLERR, and libuv answers EPOLLERR by closing the poll handle, so under uvloop the
    queue's reader was gone after its first overrun and the kernel dropped everything that
    came after (fail closed, but an outage until a restart)."""
    # socket(fileno=) wraps the fd without a dup; detach() leaves it open for its owner.
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    finally:
        sock.detach()


def _holder(config: QueueConfig) -> int | None:
    """The portid bound to the queue now, from /proc; None if unbound or unreadable."""
    from coloproxy.capture.stats import read_queue_stats

    try:
        stats = read_queue_stats(netns=config.netns)
    except (OSError, ColoproxyError):
        return None
    held = stats.get(config.queue_num)
    return None if held is None else held.portid


def bind_error(
    config: QueueConfig, err: int | None, exc: BaseException, *, may_be_held: bool = True
) -> QueueError:
    """The QueueError for a failed bind, saying why in words an operator can act on.

    The kernel answers EPERM both to a process without CAP_NET_ADMIN and to a bind of a
    queue another socket holds (``nfqnl_recv_config`` checks the owner before the command),
    and netfilterqueue drops the errno altogether: /proc tells the two apart.
    """
    where = f" in network namespace {config.netns!r}" if config.netns else ""
    num = config.queue_num
    portid = _holder(config) if may_be_held else None
    if portid is not None:
        text = (
            f"NFQUEUE {num}{where} is already bound by another socket "
            f"(netlink portid {portid}, usually the holder's pid)"
        )
    elif err == errno.EPERM:
        text = f"cannot bind NFQUEUE {num}{where}: needs root (CAP_NET_ADMIN)"
    else:
        text = f"cannot bind NFQUEUE {num}{where}: {exc}"
    return QueueError(text, num)


# ---------------------------------------------------------------------------------------------
# netfilterqueue transport


class _BatchFull(Exception):  # noqa: N818 -- a control-flow signal, not an error
    """Raised from the per-packet callback to leave ``NetfilterQueue.run`` early.

    ``run(block=False)`` reads until the socket is empty, which under sustained load may be
    never. An exception from the callback makes ``nfq_handle_packet`` fail and ``run``
    return it to us; the packets still unread stay in the socket for the next wake-up.
    """


class NfQueue:
    """One NFQUEUE through netfilterqueue (libnetfilter_queue), on the running asyncio loop.

    ``handle`` is netfilterqueue's ``Packet``. We copy the payload out with
    ``get_payload()`` inside the callback, which is all ``retain()`` would do (a second
    copy), so we do not call it; the Packet keeps its id and its queue, which is all a
    verdict needs, however late it comes.

    Limits of the library (1.1.0): it reads into a 4 KiB buffer, so the copy range is capped
    at 4016 bytes and longer packets reach us truncated without a sign; it cannot set the GSO
    flag; its receive loop silently skips ENOBUFS (which ``no_enobufs`` turns off anyway).
    """

    transport = Transport.NETFILTERQUEUE
    max_copy_range = 4016  # netfilterqueue: BufferSize 4096 - MetadataSize 80

    def __init__(self, config: QueueConfig, on_packet: OnPacket) -> None:
        if config.gso:
            raise InputError(
                f"queue {config.queue_num}: gso needs the netlink transport; netfilterqueue "
                "cannot set NFQA_CFG_F_GSO and would truncate GSO packets to 4016 bytes"
            )
        self._config = config
        self._on_packet = on_packet
        self._state = QueueState.IDLE
        self._nfq: NetfilterQueue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._now = 0.0
        self._budget = config.batch
        self._received = 0
        self._wakeups = 0

    @property
    def config(self) -> QueueConfig:
        return self._config

    @property
    def state(self) -> QueueState:
        return self._state

    def fileno(self) -> int:
        """The netlink socket's fd (for diagnostics; do not read from it)."""
        return self._fd if self._state is QueueState.OPEN else -1

    def open(self) -> None:
        import asyncio

        try:
            from netfilterqueue import COPY_PACKET, NetfilterQueue
        except ImportError as exc:  # an optional extra (pyproject.toml): say how to get it
            raise QueueError(
                f"queue {self._config.queue_num}: the netfilterqueue transport needs the"
                " netfilterqueue package, which is not installed (scripts/setup nfqueue);"
                " the default transport, netlink, needs nothing more"
            ) from exc
        if self._state is not QueueState.IDLE:
            raise UsageError(f"queue {self._config.queue_num} is {self._state.value}, not idle")
        loop = asyncio.get_running_loop()
        config = self._config
        # In another namespace, libnetfilter_queue opens (and autobinds) its socket there.
        # Not netfilterqueue's sockfd= route: that rebinds the given socket to the portid
        # autobound in *our* namespace, our pid for every queue, so a second queue of this
        # process in the same namespace fails with EADDRINUSE.
        with in_netns(config.netns):
            try:
                nfq = NetfilterQueue()
            except OSError as exc:
                # "Failed to bind family 2. Are you root?": nfnetlink's capability check.
                raise bind_error(config, exc.errno or errno.EPERM, exc, may_be_held=False) from exc
        try:
            with in_netns(config.netns), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                nfq.bind(
                    config.queue_num,
                    self._deliver,
                    max_len=config.max_len,
                    mode=COPY_PACKET,
                    range=min(config.copy_range, self.max_copy_range),
                    sock_len=config.rcvbuf,
                )
        except OSError as exc:
            # "Failed to create queue N." carries no errno; bind_error asks /proc.
            raise bind_error(config, exc.errno, exc) from exc
        for warning in caught:
            # The receive buffer came out smaller than asked (not root?); say so, go on.
            log.warning("queue %d: %s", config.queue_num, warning.message)
        self._nfq = nfq
        self._loop = loop
        self._fd = nfq.get_fd()
        no_enobufs(self._fd)
        loop.add_reader(self._fd, self._on_readable)
        self._state = QueueState.OPEN

    def _on_readable(self) -> None:
        nfq = self._nfq
        if nfq is None:
            return
        assert self._loop is not None
        self._now = self._loop.time()
        budget = self._budget = self._config.batch
        try:
            nfq.run(False)
        except _BatchFull:
            pass
        finally:
            delivered = budget - self._budget
            if delivered:
                self._received += delivered
                self._wakeups += 1

    def _deliver(self, packet: Packet) -> None:
        self._on_packet(packet, packet.get_payload(), self._now)
        self._budget -= 1
        if not self._budget:
            raise _BatchFull

    def accept(self, handle: Any, payload: bytes | None = None) -> None:
        try:
            if payload is not None:
                handle.set_payload(payload)
            handle.accept()
        except RuntimeError as exc:
            self._verdict_failed(handle, exc)

    def drop(self, handle: Any) -> None:
        try:
            handle.drop()
        except RuntimeError as exc:
            self._verdict_failed(handle, exc)

    def _verdict_failed(self, handle: Any, exc: RuntimeError) -> None:
        if self._state is QueueState.CLOSED:
            return  # the kernel dropped it at unbind; nothing left to decide
        raise UsageError(
            f"queue {self._config.queue_num}: verdict for packet {handle.id} refused: {exc}"
        ) from exc

    def close(self) -> None:
        if self._state is QueueState.OPEN:
            assert self._loop is not None and self._nfq is not None
            self._loop.remove_reader(self._fd)
            # nfq_destroy_queue: the kernel destroys the instance and drops what it holds.
            self._nfq.unbind()
            self._nfq = None
        self._state = QueueState.CLOSED

    def counters(self) -> QueueCounters:
        return QueueCounters(
            received=self._received,
            wakeups=self._wakeups,
            truncated=0,
            kernel_errors=0,
            verdict_sends=0,
            batch_verdicts=0,
        )

    def __enter__(self) -> NfQueue:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_queue(
    config: QueueConfig,
    on_packet: OnPacket,
    transport: Transport | str = Transport.NETLINK,
) -> PacketQueue:
    """Build and open the queue of ``transport``; call from the running loop's thread.

    The default is the netlink transport: it measured faster without GSO (batched verdicts,
    recvmmsg) and is the only one that can take GSO packets (bench/nfqueue_README.md).
    """
    try:
        kind = Transport(transport)
    except ValueError as exc:
        known = ", ".join(t.value for t in Transport)
        raise InputError(f"unknown capture transport {transport!r} (known: {known})") from exc
    queue: PacketQueue
    if kind is Transport.NETLINK:
        from coloproxy.capture.netlink import NetlinkQueue

        queue = NetlinkQueue(config, on_packet)
    else:
        queue = NfQueue(config, on_packet)
    queue.open()
    return queue
