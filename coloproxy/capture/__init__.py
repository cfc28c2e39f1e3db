"""Capture: the shell that takes packets from the kernel and gives it verdicts.

``nfqueue.py`` holds the interface (``PacketQueue``, ``QueueConfig``, ``open_queue``) and the
netfilterqueue transport, ``netlink.py`` the raw-netlink transport, ``stats.py`` the kernel's
counters from /proc.
"""

from coloproxy.capture.nfqueue import (
    NfQueue,
    OnPacket,
    PacketQueue,
    QueueConfig,
    QueueCounters,
    QueueError,
    QueueState,
    open_queue,
)
from coloproxy.capture.stats import QueueStats, parse_queue_stats, read_queue_stats

__all__ = [
    "NfQueue",
    "OnPacket",
    "PacketQueue",
    "QueueConfig",
    "QueueCounters",
    "QueueError",
    "QueueState",
    "QueueStats",
    "open_queue",
    "parse_queue_stats",
    "read_queue_stats",
]
