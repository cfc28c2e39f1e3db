"""Capture: the shell that takes packets from the kernel and gives it verdicts.

``queue.py`` holds the interface every NFQUEUE transport shares (``PacketQueue``,
``QueueConfig``); ``netlink.py`` (its messages in ``netlink_codec.py``) and ``libnfq.py``
are the two transports; ``transports.py`` has ``open_queue``, which opens the one the
configuration names; ``stats.py`` reads the kernel's counters from /proc. ``chardev.py`` is
the other way in: QEMU's chardev sockets instead of NFQUEUE (docs/chardev.md), each socket a
``Link`` of ``chardev_link.py``.
"""

from coloproxy.capture.libnfq import NfQueue
from coloproxy.capture.netlink import NetlinkQueue, WakeGroup
from coloproxy.capture.queue import (
    OnPacket,
    PacketQueue,
    QueueConfig,
    QueueCounters,
    QueueError,
    QueueState,
)
from coloproxy.capture.stats import QueueStats, parse_queue_stats, read_queue_stats
from coloproxy.capture.transports import open_queue

__all__ = [
    "NetlinkQueue",
    "NfQueue",
    "OnPacket",
    "PacketQueue",
    "QueueConfig",
    "QueueCounters",
    "QueueError",
    "QueueState",
    "QueueStats",
    "WakeGroup",
    "open_queue",
    "parse_queue_stats",
    "read_queue_stats",
]
