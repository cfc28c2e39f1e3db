"""The capture layer against the real kernel: NFQUEUE on the FORWARD chain of a router namespace.

client (10.204.1.1) -- router -- server (10.204.2.1), each a network namespace of our own,
joined by veth pairs; the queue rule sits on the router's FORWARD chain without
``--queue-bypass`` (fail closed), as the data path has it. The test process binds the queue
inside the router's namespace and talks through sockets created in the client's and the
server's: no traffic leaves the namespaces. Every scenario runs on both transports.

The codec's tests, which need no kernel, are in tests/test_netlink_codec.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from coloproxy.capture import (
    NfQueue,
    PacketQueue,
    QueueConfig,
    QueueError,
    QueueState,
    open_queue,
    read_queue_stats,
)
from coloproxy.capture.netlink import NetlinkQueue, WakeGroup, _ascending
from coloproxy.capture.netlink_codec import NF_ACCEPT, build_verdict
from coloproxy.config import Transport
from coloproxy.errors import InputError, UsageError
from coloproxy.net.netns import run_in
from coloproxy.packet import Packet, parse_ip
from netfixtures import require_root_and_netns, setup_step

CLIENT = "10.204.1.1"
SERVER = "10.204.2.1"
QUEUE = 41  # UDP to UDP_PORT
TCP_QUEUE = 42  # TCP from or to TCP_PORT, TCP_PORT + 1
UDP_PORT = 9411
TCP_PORT = 9412
SILENCE = 0.25  # how long "nothing arrives" is watched

TRANSPORTS = [Transport.NETFILTERQUEUE, Transport.NETLINK]


sh = setup_step  # a kernel without a feature skips the test; any other set-up error fails it


class Lab:
    """client -- router -- server namespaces; the queue rule on the router's FORWARD."""

    def __init__(self) -> None:
        prefix = f"cqt{os.getpid() % 100000}"
        self.prefix = prefix
        self.client, self.router, self.server = f"{prefix}c", f"{prefix}r", f"{prefix}s"

    def up(self) -> None:
        p = self.prefix
        for ns in (self.client, self.router, self.server):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"{p}c0", "netns", self.client, "type", "veth",
           "peer", "name", f"{p}r0", "netns", self.router)  # fmt: skip
        sh("ip", "link", "add", f"{p}s0", "netns", self.server, "type", "veth",
           "peer", "name", f"{p}r1", "netns", self.router)  # fmt: skip
        for ns, dev, addr in (
            (self.client, f"{p}c0", f"{CLIENT}/24"),
            (self.router, f"{p}r0", "10.204.1.2/24"),
            (self.router, f"{p}r1", "10.204.2.2/24"),
            (self.server, f"{p}s0", f"{SERVER}/24"),
        ):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.client, "route", "add", "default", "via", "10.204.1.2")
        sh("ip", "-n", self.server, "route", "add", "default", "via", "10.204.2.2")
        sh("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def rules(self, action: str) -> None:
        # UDP and TCP tests use queues of their own, so that a late TCP retransmission of an
        # earlier test (its queue closed, the segment dropped) never reaches a UDP test.
        for match, queue in (
            (["-p", "udp", "--dport", str(UDP_PORT)], QUEUE),
            (["-p", "tcp", "-m", "multiport", "--ports", f"{TCP_PORT},{TCP_PORT + 1}"], TCP_QUEUE),
        ):
            sh("ip", "netns", "exec", self.router, "iptables", action, "FORWARD", *match,
               "-j", "NFQUEUE", "--queue-num", str(queue))  # fmt: skip

    def down(self) -> None:
        for ns in (self.client, self.router, self.server):
            subprocess.run(("ip", "netns", "del", ns), capture_output=True, check=False)

    def socket(self, ns: str, kind: int) -> socket.socket:
        sock = run_in(ns, socket.socket, socket.AF_INET, kind)
        sock.setblocking(False)
        return sock


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_root_and_netns()
    lab = Lab()
    try:
        lab.up()
    except BaseException:  # a skip (feature missing) or a set-up error: leave nothing behind
        lab.down()
        raise
    try:
        yield lab
    finally:
        lab.down()
        assert not Path("/run/netns", lab.router).exists()


@pytest.fixture
def queued(lab: Lab) -> Iterator[Lab]:
    """The lab with the FORWARD rules in place for one test."""
    lab.rules("-A")
    try:
        yield lab
    finally:
        lab.rules("-D")


def config(lab: Lab, queue: int = QUEUE, **overrides: Any) -> QueueConfig:
    return QueueConfig(queue, netns=lab.router, **overrides)


class Held:
    """A consumer that holds everything: the handles and payloads, in arrival order."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.payloads: list[bytes] = []
        self.nows: list[float] = []
        self.arrived = asyncio.Event()

    def __call__(self, handle: Any, payload: bytes, now: float) -> None:
        self.handles.append(handle)
        self.payloads.append(payload)
        self.nows.append(now)
        self.arrived.set()

    async def wait_for(self, count: int, timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.handles) < count:
                self.arrived.clear()
                await self.arrived.wait()


async def settle(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Until ``condition()`` holds (bounded), letting the loop run meanwhile."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def receive(sock: socket.socket, timeout: float = 2.0) -> bytes | None:
    """One datagram, or None if nothing came within ``timeout``."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
    except TimeoutError:
        return None


class Udp:
    """A sender in the client's namespace, a receiver in the server's."""

    def __init__(self, lab: Lab, port: int = UDP_PORT) -> None:
        self.tx = lab.socket(lab.client, socket.SOCK_DGRAM)
        self.rx = lab.socket(lab.server, socket.SOCK_DGRAM)
        self.rx.bind((SERVER, port))
        # Room for every datagram a test sends before it reads (SO_RCVBUFFORCE, root only).
        self.rx.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)
        self.port = port

    def send(self, data: bytes) -> None:
        self.tx.sendto(data, (SERVER, self.port))

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


@pytest.fixture
def udp(lab: Lab) -> Iterator[Udp]:
    flow = Udp(lab)
    try:
        yield flow
    finally:
        flow.close()


def run_on(loop_kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def udp_payload(packet: bytes) -> bytes:
    header = (packet[0] & 0x0F) * 4
    return packet[header + 8 :]


# --------------------------------------------------------------------------------------------
# scenarios


@pytest.mark.root
@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tcp_exchange_passes_with_an_accept_all_consumer(
    queued: Lab, transport: Transport, loop_kind: str
) -> None:
    data = os.urandom(200_000)

    async def main() -> None:
        queue: PacketQueue | None = None

        def on_packet(handle: Any, payload: bytes, now: float) -> None:
            assert queue is not None
            queue.accept(handle)

        queue = open_queue(config(queued, TCP_QUEUE), on_packet, transport)

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(len(data)))
            await writer.drain()
            writer.close()

        listener = queued.socket(queued.server, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((SERVER, TCP_PORT))
        listener.listen()
        server = await asyncio.start_server(echo, sock=listener)
        try:
            client = queued.socket(queued.client, socket.SOCK_STREAM)
            await asyncio.get_running_loop().sock_connect(client, (SERVER, TCP_PORT))
            reader, writer = await asyncio.open_connection(sock=client)
            writer.write(data)
            async with asyncio.timeout(10):
                echoed = await reader.readexactly(len(data))
            writer.close()
            assert echoed == data
            counters = queue.counters()
            assert counters.received >= 2 * len(data) // 65536  # both directions queued
            assert counters.wakeups >= 1
        finally:
            server.close()
            queue.close()

    run_on(loop_kind, main)


@pytest.mark.root
@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_held_packets_block_until_accepted_later(
    queued: Lab, udp: Udp, transport: Transport, loop_kind: str
) -> None:
    async def main() -> None:
        held = Held()
        queue = open_queue(config(queued), held, transport)
        try:
            for index in range(3):
                udp.send(b"held %d" % index)
            await held.wait_for(3)
            assert [udp_payload(p) for p in held.payloads] == [b"held 0", b"held 1", b"held 2"]
            assert await receive(udp.rx, SILENCE) is None  # held: nothing passes
            # Verdicts long after the callbacks returned, in reverse order, from a timer.
            loop = asyncio.get_running_loop()
            for handle in reversed(held.handles):
                loop.call_later(0.01, queue.accept, handle)
            arrived = [await receive(udp.rx) for _ in range(3)]
            assert arrived == [b"held 2", b"held 1", b"held 0"]
        finally:
            queue.close()

    run_on(loop_kind, main)


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_held_packet_is_released_after_many_others(
    queued: Lab, udp: Udp, transport: Transport
) -> None:
    queue: PacketQueue | None = None
    first: list[Any] = []

    def on_packet(handle: Any, payload: bytes, now: float) -> None:
        assert queue is not None
        if not first:
            first.append(handle)  # hold the first packet
        else:
            queue.accept(handle)

    queue = open_queue(config(queued, batch=16), on_packet, transport)
    try:
        for index in range(501):
            udp.send(b"%d" % index)
            if index % 50 == 49:  # let the queue keep up: no socket-buffer drops
                await settle(lambda sent=index + 1: queue.counters().received == sent)
        got = [await receive(udp.rx) for _ in range(500)]
        assert got == [b"%d" % index for index in range(1, 501)]
        assert await receive(udp.rx, SILENCE) is None
        queue.accept(first[0])
        assert await receive(udp.rx) == b"0"
        counters = queue.counters()
        assert counters.received == 501
        assert counters.wakeups >= 501 // 16  # the batch bound held
        assert counters.kernel_errors == 0
        stats = read_queue_stats(netns=queued.router)[QUEUE]
        assert (stats.queue_total, stats.queue_dropped, stats.user_dropped) == (0, 0, 0)
    finally:
        queue.close()


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_thousands_of_held_packets_released_at_once_in_any_order(
    queued: Lab, udp: Udp, transport: Transport
) -> None:
    held = Held()
    queue = open_queue(config(queued), held, transport)
    count = 5000  # the netlink transport's verdicts then need two datagrams (160 KB)
    try:
        for index in range(count):
            udp.send(b"%d" % index)
            if index % 500 == 499:  # let the queue keep up: no socket-buffer drops
                await held.wait_for(index + 1)
        await held.wait_for(count, timeout=10)
        sends = queue.counters().verdict_sends
        for handle in reversed(held.handles):  # one loop iteration, newest first
            queue.accept(handle)
        arrived = [await receive(udp.rx) for _ in range(count)]
        assert arrived == [b"%d" % index for index in reversed(range(count))]
        stats = read_queue_stats(netns=queued.router)[QUEUE]
        assert (stats.queue_total, stats.queue_dropped, stats.user_dropped) == (0, 0, 0)
        assert queue.counters().kernel_errors == 0
        if transport is Transport.NETLINK:
            assert queue.counters().verdict_sends - sends == 2
    finally:
        queue.close()


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_drop(queued: Lab, udp: Udp, transport: Transport) -> None:
    queue: PacketQueue | None = None

    def on_packet(handle: Any, payload: bytes, now: float) -> None:
        assert queue is not None
        if udp_payload(payload).startswith(b"drop"):
            queue.drop(handle)
        else:
            queue.accept(handle)

    queue = open_queue(config(queued), on_packet, transport)
    try:
        udp.send(b"drop me")
        udp.send(b"keep me")
        assert await receive(udp.rx) == b"keep me"
        assert await receive(udp.rx, SILENCE) is None
    finally:
        queue.close()


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_accept_with_a_modified_payload(queued: Lab, udp: Udp, transport: Transport) -> None:
    queue: PacketQueue | None = None

    def on_packet(handle: Any, payload: bytes, now: float) -> None:
        assert queue is not None
        packet = bytearray(payload)
        udp_at = (packet[0] & 0x0F) * 4
        packet[udp_at + 8] ^= 0x20  # "hello" -> "Hello"
        packet[udp_at + 6 : udp_at + 8] = b"\0\0"  # no UDP checksum (allowed over IPv4)
        queue.accept(handle, bytes(packet))

    queue = open_queue(config(queued), on_packet, transport)
    try:
        udp.send(b"hello, modified")
        assert await receive(udp.rx) == b"Hello, modified"
    finally:
        queue.close()


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_payloads_are_bytes_that_the_compiled_parser_reads(
    queued: Lab, udp: Udp, transport: Transport
) -> None:
    # The parser (compiled: coloproxy/variant.py) takes bytes | bytearray and raises
    # TypeError for anything else, a memoryview of the receive buffer say.
    parsed: list[tuple[type, int, bytes]] = []
    queue: PacketQueue | None = None

    def on_packet(handle: Any, payload: bytes, now: float) -> None:
        assert queue is not None
        packet = parse_ip(payload)
        assert isinstance(packet, Packet), packet
        parsed.append((type(payload), packet.dport, packet.payload_bytes()))
        queue.accept(handle)

    queue = open_queue(config(queued), on_packet, transport)
    try:
        udp.send(b"parse me")
        assert await receive(udp.rx) == b"parse me"
    finally:
        queue.close()
    assert parsed == [(bytes, UDP_PORT, b"parse me")]


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_closing_with_held_packets_fails_closed(
    queued: Lab, udp: Udp, transport: Transport
) -> None:
    held = Held()
    queue = open_queue(config(queued), held, transport)
    for index in range(3):
        udp.send(b"held %d" % index)
    await held.wait_for(3)
    queue.close()  # at once: it waits for no verdict
    assert queue.state is QueueState.CLOSED
    queue.close()  # idempotent
    for handle in held.handles:
        queue.accept(handle)  # too late: a no-op, the kernel dropped them
    assert await receive(udp.rx, SILENCE) is None
    assert QUEUE not in read_queue_stats(netns=queued.router)
    udp.send(b"after close")  # no listener and no --queue-bypass: dropped too
    assert await receive(udp.rx, SILENCE) is None


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("second", TRANSPORTS)
@pytest.mark.parametrize("first", TRANSPORTS)
async def test_binding_a_bound_queue_is_a_clear_error(
    lab: Lab, first: Transport, second: Transport
) -> None:
    queue = open_queue(config(lab), Held(), first)
    try:
        portid = read_queue_stats(netns=lab.router)[QUEUE].portid
        with pytest.raises(QueueError, match=f"already bound.*portid {portid}") as raised:
            open_queue(config(lab), Held(), second)
        assert raised.value.queue_num == QUEUE
        assert raised.value.__cause__ is not None
        assert queue.state is QueueState.OPEN  # the first binding is untouched
    finally:
        queue.close()
    queue = open_queue(config(lab), Held(), second)  # free again once closed
    queue.close()


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_double_verdict_is_a_usage_error(
    queued: Lab, udp: Udp, transport: Transport
) -> None:
    held = Held()
    queue = open_queue(config(queued), held, transport)
    try:
        udp.send(b"once")
        await held.wait_for(1)
        queue.accept(held.handles[0])
        with pytest.raises(UsageError):
            queue.drop(held.handles[0])
        assert await receive(udp.rx) == b"once"
    finally:
        queue.close()


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_one_wakeup_delivers_at_most_batch_packets_with_one_clock(
    queued: Lab, udp: Udp, transport: Transport
) -> None:
    held = Held()
    queue = open_queue(config(queued, batch=4), held, transport)
    try:
        for index in range(20):
            udp.send(b"%d" % index)
        await held.wait_for(20)
        assert queue.counters().wakeups >= 5
        # ``now`` is read once per wake-up: runs of equal values, each at most 4 long.
        runs: list[int] = []
        for index, now in enumerate(held.nows):
            if index and now == held.nows[index - 1]:
                runs[-1] += 1
            else:
                runs.append(1)
        assert max(runs) <= 4
        assert held.nows == sorted(held.nows)
        for handle in held.handles:
            queue.drop(handle)
    finally:
        queue.close()


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("decide", ["drop", "hold", "accept", "accept-no-replies"])
async def test_netlink_reads_a_drained_socket_again_only_after_sending_accepts(
    queued: Lab, udp: Udp, decide: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One packet per wake-up (the lab's regime): after a receive that returned fewer packets
    # than it asked for, reading again finds something only if our own verdicts made it come:
    # accepts can (the receiver's immediate answer), drops and no verdict cannot, nor accepts
    # on a queue configured to get no replies (the daemon's). Each wasted receive is a
    # syscall per packet.
    from coloproxy.capture import recvmmsg

    calls: list[int] = []
    real = recvmmsg.libc_recvmmsg()

    def counting(*args: Any) -> int:
        count: int = real(*args)
        calls.append(count)
        return count

    monkeypatch.setattr(recvmmsg, "libc_recvmmsg", lambda: counting)
    queue: PacketQueue | None = None
    held: list[Any] = []

    def on_packet(handle: Any, payload: bytes, now: float) -> None:
        assert queue is not None
        if decide == "drop":
            queue.drop(handle)
        elif decide.startswith("accept"):
            queue.accept(handle)
        else:
            held.append(handle)

    replies_here = decide != "accept-no-replies"
    queue = open_queue(config(queued, replies_here=replies_here), on_packet, Transport.NETLINK)
    try:
        for index in range(20):
            udp.send(b"%d" % index)
            await settle(lambda sent=index + 1: queue.counters().received == sent)
            await asyncio.sleep(0.002)
        counters = queue.counters()
        assert counters.received == 20
        per_wakeup = len(calls) / counters.wakeups
        if decide.startswith("accept"):
            if replies_here:
                assert per_wakeup >= 2  # the read after the eager flush stays
            else:
                assert per_wakeup == 1, calls
            assert [await receive(udp.rx) for _ in range(20)] == [b"%d" % i for i in range(20)]
        else:
            assert per_wakeup == 1, calls
            assert await receive(udp.rx, SILENCE) is None  # dropped or held: nothing passed
        for handle in held:
            queue.drop(handle)
        queue.flush()
        await settle(lambda: read_queue_stats(netns=queued.router)[QUEUE].queue_total == 0)
    finally:
        queue.close()


@pytest.mark.root
@pytest.mark.asyncio
async def test_netlink_a_wake_group_sends_a_siblings_verdicts_at_the_end_of_the_wakeup(
    queued: Lab, udp: Udp
) -> None:
    # Host P's shape: a packet read on one queue (S-out) decides one held on another (P-out).
    # In a WakeGroup that verdict goes out when the reader ends, not in a loop callback
    # scheduled after it, and after_wakeup runs once per wake-up.
    loop = asyncio.get_running_loop()
    group = WakeGroup()
    wakeups: list[int] = []
    group.after_wakeup = lambda: wakeups.append(1)
    held_tcp: list[Any] = []
    sends_seen: list[int] = []
    udp_queue: NetlinkQueue | None = None
    tcp_queue: NetlinkQueue | None = None

    def on_tcp(handle: Any, payload: bytes, now: float) -> None:
        assert tcp_queue is not None
        if not held_tcp:
            held_tcp.append(handle)  # the SYN, held
        else:
            tcp_queue.accept(handle)  # the RST that answers it, and anything after

    def on_udp(handle: Any, payload: bytes, now: float) -> None:
        assert udp_queue is not None and tcp_queue is not None
        udp_queue.drop(handle)
        if held_tcp and not sends_seen:
            # Scheduled before the verdict: it sees the verdict sent only if the wake-up
            # sent it itself.
            loop.call_soon(lambda: sends_seen.append(tcp_queue.counters().verdict_sends))
            tcp_queue.accept(held_tcp[0])

    tcp_queue = NetlinkQueue(config(queued, TCP_QUEUE, replies_here=False), on_tcp, group)
    udp_queue = NetlinkQueue(config(queued, replies_here=False), on_udp, group)
    tcp_queue.open()
    udp_queue.open()
    client = queued.socket(queued.client, socket.SOCK_STREAM)
    try:
        connecting = loop.create_task(loop.sock_connect(client, (SERVER, TCP_PORT)))
        await settle(lambda: bool(held_tcp))
        assert tcp_queue.counters().verdict_sends == 0
        udp.send(b"go")
        await settle(lambda: bool(sends_seen))
        assert sends_seen == [1]
        # The SYN went on: the server (no listener) answers with a RST, refused.
        with pytest.raises(ConnectionRefusedError):
            async with asyncio.timeout(5):
                await connecting
        assert len(wakeups) == tcp_queue.counters().wakeups + udp_queue.counters().wakeups
        assert tcp_queue.counters().kernel_errors == udp_queue.counters().kernel_errors == 0
    finally:
        client.close()
        udp_queue.close()
        tcp_queue.close()


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("decide", ["drop", "hold"])
async def test_netlink_a_burst_is_delivered_whole_when_reads_stop_at_a_drained_socket(
    queued: Lab, udp: Udp, decide: str
) -> None:
    # Stopping at a partial receive must lose nothing: what arrives later wakes the loop.
    queue: PacketQueue | None = None
    got: list[bytes] = []
    held: list[Any] = []

    def on_packet(handle: Any, payload: bytes, now: float) -> None:
        assert queue is not None
        got.append(udp_payload(payload))
        if decide == "drop":
            queue.drop(handle)
        else:
            held.append(handle)

    queue = open_queue(config(queued, batch=8), on_packet, Transport.NETLINK)
    try:
        for burst in range(30):
            for index in range(burst % 7 + 1):
                udp.send(b"%d.%d" % (burst, index))
            await asyncio.sleep(0.001 * (burst % 3))
        expected = [b"%d.%d" % (b, i) for b in range(30) for i in range(b % 7 + 1)]
        await settle(lambda: len(got) == len(expected))
        assert got == expected
        for handle in held:
            queue.accept(handle)
        arrived = [await receive(udp.rx) for _ in held]
        assert arrived == (expected if decide == "hold" else [])
        assert await receive(udp.rx, SILENCE) is None
        assert queue.counters().kernel_errors == 0
    finally:
        queue.close()


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_full_receive_buffer_drops_and_is_counted(
    queued: Lab, udp: Udp, transport: Transport
) -> None:
    held = Held()
    queue = open_queue(config(queued, rcvbuf=4096), held, transport)
    try:
        for index in range(100):  # the loop does not run meanwhile: nobody reads
            udp.send(b"%d" % index)

        def accounted() -> bool:  # each of the 100 read by us or dropped by the kernel
            dropped = read_queue_stats(netns=queued.router)[QUEUE].user_dropped
            return len(held.handles) + dropped == 100

        await settle(accounted)
        stats = read_queue_stats(netns=queued.router)[QUEUE]
        assert stats.user_dropped > 0  # dropped, not passed: fail closed
        assert len(held.handles) + stats.user_dropped == 100
        for handle in held.handles:
            queue.accept(handle)
        arrived = [await receive(udp.rx) for _ in held.handles]
        assert arrived == [udp_payload(payload) for payload in held.payloads]
        assert await receive(udp.rx, SILENCE) is None
    finally:
        queue.close()


@pytest.mark.root
@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_queue_keeps_delivering_after_its_receive_buffer_overflowed(
    queued: Lab, udp: Udp, transport: Transport, loop_kind: str
) -> None:
    # An overrun is a socket error (sk_err), which epoll reports as EPOLLERR; libuv answers
    # EPOLLERR on a poll handle by closing it, so under uvloop the queue's reader was gone
    # for good after its first overrun and the kernel dropped everything after (fail closed:
    # an outage of that queue until the daemon restarted).
    async def main() -> None:
        held = Held()
        queue = open_queue(config(queued, rcvbuf=4096), held, transport)
        try:
            for index in range(100):  # the loop does not run meanwhile: nobody reads
                udp.send(b"%d" % index)

            def accounted() -> bool:  # each of the 100 read by us or dropped by the kernel
                dropped = read_queue_stats(netns=queued.router)[QUEUE].user_dropped
                return len(held.handles) + dropped == 100

            await settle(accounted)
            assert read_queue_stats(netns=queued.router)[QUEUE].user_dropped > 0
            for handle in held.handles:
                queue.accept(handle)
            for _ in held.handles:
                assert await receive(udp.rx) is not None
            before = len(held.handles)
            for index in range(3):  # one at a time: no overrun now
                udp.send(b"after %d" % index)
                await held.wait_for(before + index + 1)
                queue.accept(held.handles[-1])
                assert await receive(udp.rx) == b"after %d" % index
        finally:
            queue.close()

    run_on(loop_kind, main)


@pytest.mark.root
@pytest.mark.asyncio
async def test_netlink_gso_delivers_whole_gso_packets(queued: Lab) -> None:
    queue: PacketQueue | None = None
    largest = 0

    def on_packet(handle: Any, payload: bytes, now: float) -> None:
        nonlocal largest
        assert queue is not None
        largest = max(largest, len(payload))
        queue.accept(handle)

    queue = open_queue(config(queued, TCP_QUEUE, gso=True), on_packet, Transport.NETLINK)
    listener = queued.socket(queued.server, socket.SOCK_STREAM)
    listener.bind((SERVER, TCP_PORT + 1))
    listener.listen()
    loop = asyncio.get_running_loop()
    try:
        client = queued.socket(queued.client, socket.SOCK_STREAM)
        await loop.sock_connect(client, (SERVER, TCP_PORT + 1))
        conn, _ = await loop.sock_accept(listener)
        data = os.urandom(1 << 20)
        sending = asyncio.ensure_future(loop.sock_sendall(client, data))
        received = bytearray()
        async with asyncio.timeout(10):
            while len(received) < len(data):
                received += await loop.sock_recv(conn, 1 << 16)
        await sending
        assert received == data
        assert largest > 1500  # more than one MTU: the kernel did not segment it
        conn.close()
        client.close()
    finally:
        listener.close()
        queue.close()


@pytest.mark.root
@pytest.mark.asyncio
async def test_netlink_counts_the_kernels_error_replies(
    queued: Lab, udp: Udp, caplog: pytest.LogCaptureFixture
) -> None:
    held = Held()
    queue = open_queue(config(queued), held, Transport.NETLINK)
    try:
        # A verdict for an id the kernel does not hold, sent behind the queue's back: the
        # ENOENT reply arrives among the packets and takes the reader's slow path.
        os.write(queue.fileno(), build_verdict(QUEUE, 123456, NF_ACCEPT))
        udp.send(b"after the error")
        await held.wait_for(1)
        assert queue.counters().kernel_errors == 1
        assert "ENOENT" in caplog.text
        queue.accept(held.handles[0])
        assert await receive(udp.rx) == b"after the error"
    finally:
        queue.close()


@pytest.mark.root
@pytest.mark.asyncio
async def test_netlink_gso_refuses_payload_rewrites(queued: Lab, udp: Udp) -> None:
    held = Held()
    queue = open_queue(config(queued, gso=True), held, Transport.NETLINK)
    try:
        udp.send(b"x")
        await held.wait_for(1)
        with pytest.raises(UsageError, match="partial checksums"):
            queue.accept(held.handles[0], held.payloads[0])
        queue.accept(held.handles[0])
        assert await receive(udp.rx) == b"x"
    finally:
        queue.close()


@pytest.mark.root
def test_without_cap_net_admin_the_error_says_so(lab: Lab) -> None:
    script = (
        "import asyncio, sys\n"
        "from coloproxy.capture import QueueConfig, QueueError, open_queue\n"
        "async def main():\n"
        "    try:\n"
        f"        open_queue(QueueConfig({QUEUE}), lambda *a: None, sys.argv[1])\n"
        "    except QueueError as exc:\n"
        "        print(exc)\n"
        "asyncio.run(main())\n"
    )
    for transport in TRANSPORTS:
        done = subprocess.run(
            ["ip", "netns", "exec", lab.router, "setpriv", "--inh-caps=-net_admin",
             "--bounding-set=-net_admin", sys.executable, "-c", script, transport.value],
            capture_output=True, text=True, timeout=30, check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )  # fmt: skip
        assert "needs root (CAP_NET_ADMIN)" in done.stdout, (transport, done.stdout, done.stderr)


# --------------------------------------------------------------------------------------------
# interface and config, no kernel needed


def test_config_refuses_impossible_values() -> None:
    for bad in ({"queue_num": 70000}, {"max_len": 0}, {"copy_range": 0}, {"batch": 0}):
        with pytest.raises(InputError):
            QueueConfig(**{"queue_num": 1, **bad})


def test_netfilterqueue_cannot_do_gso() -> None:
    with pytest.raises(InputError, match="netlink"):
        NfQueue(QueueConfig(1, gso=True), lambda *a: None)


def test_an_unknown_transport_is_an_input_error() -> None:
    with pytest.raises(InputError, match="netfilterqueue, netlink"):
        open_queue(QueueConfig(1), lambda *a: None, "pcap")


def test_open_twice_is_a_usage_error() -> None:
    async def main() -> None:
        queue = NetlinkQueue(QueueConfig(1), lambda *a: None)
        queue.close()
        with pytest.raises(UsageError):
            queue.open()

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# the netlink transport's batch rule


def test_ascending_decides_whether_a_run_may_become_one_batch_verdict() -> None:
    assert _ascending([]) and _ascending([5]) and _ascending([5, 6]) and _ascending([1, 5, 9])
    assert not _ascending([6, 5]) and not _ascending([5, 5])
    assert not _ascending([1, 3, 2]) and not _ascending([1, 2, 2]) and not _ascending([2, 1, 3])


def test_without_the_netfilterqueue_package_the_error_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An optional extra since the daemon-only install (scripts/setup daemon) leaves it out.
    monkeypatch.setitem(sys.modules, "netfilterqueue", None)  # import raises ImportError

    async def main() -> None:
        queue = NfQueue(QueueConfig(1), lambda *a: None)
        with pytest.raises(QueueError, match=r"needs the netfilterqueue package.*setup nfqueue"):
            queue.open()

    asyncio.run(main())
