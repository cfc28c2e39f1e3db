#!/usr/bin/env python3
"""The netlink queue's reader per wake-up, in process, without a kernel queue: for perf/callgrind.

    python3 bench/netlink_loop.py [--wakeups N] [--runs R] [--payload BYTES]
    perf stat -e instructions:u python3 bench/netlink_loop.py --runs 1
    perf stat -e instructions:u python3 bench/netlink_loop.py --setup-only

What ``coloproxy run`` does on each wake-up of an NFQUEUE in the lab's regime, one packet per
wake-up: ``NetlinkQueue._on_readable`` (the clock, recvmmsg(), the walk of the
NFQNL_MSG_PACKET's attributes, the payload copied out, ``on_packet``), the consumer's
``accept`` inside ``on_packet``, the verdict sent at once (the first packets' are eager:
one NFQNL_MSG_VERDICT_BATCH), and the end of the wake-up (the daemon's
``WakeGroup(pump.settle)``: ``TimerPump.settle`` asks a target for its deadline). The netlink
socket is replaced by one end of an AF_UNIX datagram pair: the other end sends each packet
message and reads the verdict back, so the syscalls are there but not the kernel's queue.
(instructions of ``--runs 1``) minus (instructions of ``--setup-only``), divided by
``--wakeups``, is the user-space instructions per wake-up; the printed CPU time per wake-up
includes the syscalls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from typing import Any, Final

REPO_ROOT: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

QUEUE_NUM: Final = 1


def packet_message(packet_id: int, payload: bytes) -> bytes:
    """An NFQNL_MSG_PACKET as the kernel sends it: the packet header, a few metadata
    attributes (hardware header-less: in device, hook info, skb info) and the payload."""
    import struct

    from coloproxy.capture.netlink_codec import (
        BE32,
        NFQA_IFINDEX_INDEV,
        NFQA_PACKET_HDR,
        NFQA_PAYLOAD,
        NFQA_SKB_INFO,
        NLMSGHDR,
        TYPE_PACKET,
    )

    def attr(attr_type: int, value: bytes) -> bytes:
        length = 4 + len(value)
        return struct.pack("=HH", length, attr_type) + value + bytes(-length % 4)

    attrs = (
        attr(NFQA_PACKET_HDR, struct.pack(">IHB", packet_id, 0x0800, 2) + b"\0")
        + attr(NFQA_IFINDEX_INDEV, BE32.pack(3))
        + attr(NFQA_SKB_INFO, BE32.pack(0))
        + attr(NFQA_PAYLOAD, payload)
    )
    body = struct.pack(">BBH", 0, 0, QUEUE_NUM) + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), TYPE_PACKET, 0, 0, 0) + body


class _Deadline:
    """A pump target whose deadline never moves (the comparator's, between checkpoints)."""

    def get_timer(self) -> float | None:
        return 1e9

    def handle_timer(self, now: float) -> None:
        raise SystemExit("the timer never fires here")


def run(messages: list[bytes]) -> float:
    """CPU seconds for a wake-up of one packet per message; checks every verdict."""
    from coloproxy.capture import recvmmsg
    from coloproxy.capture.netlink import _RECV_SIZE, NetlinkQueue, WakeGroup
    from coloproxy.capture.queue import QueueConfig
    from coloproxy.pump import TimerPump

    loop = asyncio.new_event_loop()
    pump = TimerPump(loop, _Deadline())
    queue: Any = None

    def on_packet(handle: Any, payload: bytes, now: float) -> None:
        queue.accept(handle)

    config = QueueConfig(QUEUE_NUM, replies_here=False)
    queue = NetlinkQueue(config, on_packet, WakeGroup(pump.settle))
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    # What open() sets after the bind (bench/netlink_loop.py has no kernel queue to bind).
    queue._loop = loop
    queue._sock = ours
    queue._slots = recvmmsg.Slots(min(32, config.batch), _RECV_SIZE)
    wakeups = len(messages)
    on_readable = queue._on_readable
    send, recv = kernel.send, kernel.recv
    verdicts = 0
    started = time.process_time()
    for message in messages:
        send(message)
        on_readable()
        verdicts += len(recv(4096)) > 0
    seconds = time.process_time() - started
    counters = queue.counters()
    if counters.received != wakeups or counters.wakeups != wakeups or verdicts != wakeups:
        raise SystemExit(f"{counters}, {verdicts} verdicts for {wakeups} wake-ups")
    ours.close()
    kernel.close()
    loop.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wakeups", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=60, help="packet bytes (a TCP ACK: 52-60)")
    parser.add_argument("--runs", type=int, default=3, help="loops, the best is shown")
    parser.add_argument("--setup-only", action="store_true", help="import, do not run the loop")
    args = parser.parse_args()
    from coloproxy import variant

    payload = bytes(args.payload)
    messages = [packet_message(packet_id, payload) for packet_id in range(1, args.wakeups + 1)]
    if args.setup_only:
        import coloproxy.capture.netlink
        import coloproxy.pump  # noqa: F401  the same imports as a run

        variant.describe()  # imports every compiled module, as the run's last line does
        return 0
    best = min(run(messages) for _ in range(max(1, args.runs)))
    print(
        f"{best / args.wakeups * 1e6:.2f} us CPU per wake-up of one {args.payload}-byte packet "
        f"(best of {args.runs}, {args.wakeups:,} wake-ups; {variant.describe()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
