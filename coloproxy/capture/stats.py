"""The kernel's own NFQUEUE counters, from /proc/net/netfilter/nfnetlink_queue.

One line per bound queue, written by ``seq_show`` in net/netfilter/nfnetlink_queue.c as
``"%5u %6u %5u %1u %5u %5u %5u %8u %2d\\n"``: queue number, peer portid, queue total,
copy mode, copy range, queue dropped, user dropped, id sequence, and a constant 1. The file
is per network namespace and lists only bound queues. The drop counters become metrics:
both count packets the kernel dropped because we could not take them (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coloproxy.errors import InputError
from coloproxy.net.netns import run_in

__all__ = ["PROC_PATH", "QueueStats", "parse_queue_stats", "read_queue_stats"]

# /proc/net is /proc/self/net: the namespace of the process's main thread. thread-self is the
# calling thread's, the one netns.run_in moved (the same in the main thread).
PROC_PATH = Path("/proc/thread-self/net/netfilter/nfnetlink_queue")

_FIELDS = 9


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue as the kernel counts it."""

    queue_num: int
    portid: int  # netlink port id of the bound socket (usually the holder's pid)
    queue_total: int  # packets in the queue now: unread, or read and awaiting a verdict
    copy_mode: int  # 0 none, 1 meta, 2 packet (NFQNL_COPY_*)
    copy_range: int  # bytes of each packet copied to userspace
    queue_dropped: int  # dropped because queue_total reached the queue's max length
    user_dropped: int  # dropped because the socket's receive buffer was full (ENOBUFS)
    id_sequence: int  # id of the last packet queued (wraps at 2**32)


def parse_queue_stats(text: str, source: str = str(PROC_PATH)) -> dict[int, QueueStats]:
    """Parse the file's text into ``{queue_num: QueueStats}``; blank lines are skipped.

    A line that is not nine unsigned integers raises ``InputError`` naming ``source`` and the
    line: a kernel that changed the format should be noticed, not half-read.
    """
    queues: dict[int, QueueStats] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != _FIELDS or not all(field.isdigit() for field in fields):
            raise InputError(f"{source}:{lineno}: not an nfnetlink_queue line: {line!r}")
        values = [int(field) for field in fields[:8]]
        queues[values[0]] = QueueStats(*values)
    return queues


def read_queue_stats(path: Path = PROC_PATH, netns: str | None = None) -> dict[int, QueueStats]:
    """Read and parse the file, as seen from network namespace ``netns`` if given.

    No bound queue in the namespace yet may mean no file at all (the module is loaded on
    the first bind): that reads as no queues.
    """
    try:
        text = run_in(netns, _read, path)
    except FileNotFoundError:
        return {}
    return parse_queue_stats(text, str(path))


def _read(path: Path) -> str:
    with open(path, encoding="ascii") as stream:
        return stream.read()
