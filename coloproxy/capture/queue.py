"""The NFQUEUE interface every capture transport shares: bind, hand packets over, verdicts later.

Theory of operation
-------------------
Every packet that hits an ``NFQUEUE --queue-num N`` rule waits in the kernel's queue N while
a copy goes to the one netlink socket bound to N. The packet stays there until that socket
sends a verdict for its id -- accept, accept with a new payload, or drop -- however long
that takes and however many packets come after it. That wait is how coloproxy *holds* PVM
output until the comparator releases it.

A transport is the shell around that: ``open()`` binds the queue and registers the socket
with the running asyncio loop (``loop.add_reader``). Each wake-up reads the clock once
(``now = loop.time()``) and delivers up to ``batch`` packets as
``on_packet(handle, payload, now)``. The consumer keeps ``handle`` as long as it likes and
passes it back to ``accept(handle)``, ``accept(handle, new_payload)`` or ``drop(handle)``,
inside the callback or any time later. ``close()`` unbinds.

This module holds that interface (``PacketQueue``, ``QueueConfig``, ``QueueCounters``,
``QueueState``, ``QueueError``) and what both transports do alike (``QueueBase``: the
queue's namespace, the words of a failed bind; ``no_enobufs``). Two transports implement
it, each importing this module and never the other; ``transports.py`` opens the one the
configuration names:

* ``NetlinkQueue`` (``netlink.py``): the protocol spoken over a raw netlink socket of our
  own, which can set the GSO flag and send batch verdicts (the default);
* ``NfQueue`` (``libnfq.py``): the netfilterqueue library (libnetfilter_queue underneath),
  an optional fallback. ``bench/nfqueue_README.md`` has the measurements that choose.

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

import abc
import asyncio
import enum
import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, Self, TypeVar

from coloproxy.capture.stats import read_queue_stats
from coloproxy.errors import ColoproxyError, InputError, UsageError
from coloproxy.net import NetError
from coloproxy.net.netns import run_in

__all__ = [
    "OnPacket",
    "PacketQueue",
    "QueueBase",
    "QueueConfig",
    "QueueCounters",
    "QueueError",
    "QueueState",
    "no_enobufs",
]

P = ParamSpec("P")
T = TypeVar("T")

# linux/netlink.h
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5

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
    # Whether forwarding an accepted packet can bring its answer to this same queue while
    # the verdict is being sent (the receiver a kernel stack that answers in our context, as
    # in bench/nfqueue_bench.py): the netlink reader then reads once more after the first
    # accepts of a wake-up. The daemon's queues say no: their packets go to a VM (a QEMU
    # process answers later, on its own) or leave the host, and the answers reach other
    # queues or none, so that read would be a receive syscall for nothing.
    replies_here: bool = True

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


class QueueBase(abc.ABC):
    """What both transports keep alike: their settings, their state, the consumer, the loop."""

    def __init__(self, config: QueueConfig, on_packet: OnPacket) -> None:
        self._config = config
        self._on_packet = on_packet
        self._state = QueueState.IDLE
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def config(self) -> QueueConfig:
        return self._config

    @property
    def state(self) -> QueueState:
        return self._state

    def _start_open(self) -> asyncio.AbstractEventLoop:
        """The first step of ``open()``: refuse a second open, take the running loop."""
        if self._state is not QueueState.IDLE:
            raise UsageError(f"queue {self._config.queue_num} is {self._state.value}, not idle")
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _in_netns(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``function(*args, **kwargs)`` inside the queue's network namespace
        (``netns.run_in``): a netfilter queue belongs to the namespace of the rule that feeds
        it, and a socket to the namespace it was created in. A namespace that cannot be
        entered is a QueueError."""
        config = self._config
        try:
            return run_in(config.netns, function, *args, **kwargs)
        except NetError as exc:
            raise QueueError(f"queue {config.queue_num}: {exc}", config.queue_num) from exc

    def _bind_error(
        self, err: int | None, exc: BaseException, *, may_be_held: bool = True
    ) -> QueueError:
        """The QueueError for a failed bind, saying why in words an operator can act on.

        The kernel answers EPERM both to a process without CAP_NET_ADMIN and to a bind of a
        queue another socket holds (``nfqnl_recv_config`` checks the owner before the
        command), and netfilterqueue drops the errno altogether: /proc tells the two apart.
        """
        config = self._config
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

    @abc.abstractmethod
    def open(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
    try:
        stats = read_queue_stats(netns=config.netns)
    except (OSError, ColoproxyError):
        return None
    held = stats.get(config.queue_num)
    return None if held is None else held.portid
