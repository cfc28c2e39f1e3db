"""The kernel's NFQUEUE counters: parsing /proc/net/netfilter/nfnetlink_queue, and reading it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coloproxy.capture import QueueConfig, QueueStats, open_queue
from coloproxy.capture.stats import parse_queue_stats, read_queue_stats
from coloproxy.config import Transport
from coloproxy.errors import InputError
from coloproxy.net.netns import run_in
from netfixtures import require_root_and_netns, setup_step

# Two queues as the kernel prints them ("%5u %6u %5u %1u %5u %5u %5u %8u %2d\n").
SAMPLE = """\
    7  12299     3 2 65531     0     0       42  1
65535 4294967295 10000 2  4016    17    25 4294967295  1
"""


def test_parse_sample() -> None:
    assert parse_queue_stats(SAMPLE) == {
        7: QueueStats(7, 12299, 3, 2, 65531, 0, 0, 42),
        65535: QueueStats(65535, 4294967295, 10000, 2, 4016, 17, 25, 4294967295),
    }


def test_parse_empty_and_blank_lines() -> None:
    assert parse_queue_stats("") == {}
    assert parse_queue_stats("\n   \n") == {}


@pytest.mark.parametrize(
    "line",
    [
        "    7  12299     3 2 65531     0     0       42",  # a field short
        "    7  12299     3 2 65531     0     0       42  1  9",  # a field too many
        "    7  12299    -3 2 65531     0     0       42  1",  # not unsigned
        "queue portid total mode range qdrop udrop seq one",  # a header line
    ],
)
def test_an_unexpected_line_is_an_input_error_naming_it(line: str) -> None:
    with pytest.raises(InputError, match=r"nfq:2: not an nfnetlink_queue line"):
        parse_queue_stats(SAMPLE.splitlines()[0] + "\n" + line, "nfq")


def test_a_missing_file_reads_as_no_queues(tmp_path: Path) -> None:
    assert read_queue_stats(tmp_path / "absent") == {}


def test_read_a_file(tmp_path: Path) -> None:
    path = tmp_path / "nfnetlink_queue"
    path.write_text(SAMPLE)
    assert set(read_queue_stats(path)) == {7, 65535}


@pytest.fixture
def namespace() -> Iterator[str]:
    """One namespace of our own whose OUTPUT to UDP port 9499 on loopback goes to queue 49.
    Skipped only when not root or a kernel feature is missing; a set-up error fails."""
    require_root_and_netns()
    name = f"cqs{os.getpid() % 100000}"
    setup_step("ip", "netns", "add", name)
    try:
        setup_step("ip", "-n", name, "link", "set", "lo", "up")
        rule = ["OUTPUT", "-o", "lo", "-p", "udp", "--dport", "9499"]
        setup_step("ip", "netns", "exec", name, "iptables", "-A", *rule,
                   "-j", "NFQUEUE", "--queue-num", "49")  # fmt: skip
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


async def settle(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Until ``condition()`` holds (bounded), letting the loop run meanwhile."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", [Transport.NETFILTERQUEUE, Transport.NETLINK])
async def test_live_file_while_a_queue_is_bound(namespace: str, transport: Transport) -> None:
    assert 49 not in read_queue_stats(netns=namespace)
    held: list[Any] = []
    queue = open_queue(
        QueueConfig(49, max_len=3, netns=namespace),
        lambda handle, payload, now: held.append(handle),
        transport,
    )
    try:
        sender = run_in(namespace, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        with sender:
            for _ in range(4):
                sender.sendto(b"x", ("127.0.0.1", 9499))
        # The kernel has decided on all four once the fourth is counted dropped.
        await settle(
            lambda: len(held) >= 3 and read_queue_stats(netns=namespace)[49].queue_dropped >= 1
        )
        assert len(held) == 3
        stats = read_queue_stats(netns=namespace)[49]
        # Held packets count in queue_total until their verdict; the fourth found the queue
        # full and was dropped (fail closed) before it got an id.
        assert (stats.queue_total, stats.copy_mode, stats.id_sequence) == (3, 2, 3)
        assert stats.copy_range == (4016 if transport is Transport.NETFILTERQUEUE else 65531)
        assert (stats.queue_dropped, stats.user_dropped) == (1, 0)
        for handle in held:
            queue.accept(handle)
        # The netlink transport sends verdicts one loop iteration later.
        await settle(lambda: read_queue_stats(netns=namespace)[49].queue_total == 0)
    finally:
        queue.close()
    assert 49 not in read_queue_stats(netns=namespace)
