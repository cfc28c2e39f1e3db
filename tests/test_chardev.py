"""The chardev transport in the real daemon, against real unix sockets playing QEMU's side.

The test is QEMU: it connects to the sockets coloproxy listens on (``primary_in``,
``outdev``) and listens where coloproxy connects (``secondary_in``, ``notify``), speaking
colo-compare's framing. A control-socket client of role engine (tests/engine_double.py)
answers checkpoint requests. Nothing is mocked between the socket and the comparator.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import os
import random
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coloproxy.capture.chardev import ChardevTransport
from coloproxy.config import parse_config
from coloproxy.control import ControlClient
from coloproxy.daemon.run import Daemon
from coloproxy.protocol import CheckpointNow, ClientRole, Status, StatusRequest
from coloproxy.protocol.colo_frames import (
    MAX_FRAME,
    FrameDecoder,
    encode_frame,
    encode_frames,
    frame_header,
)
from craft import ACK, SYN, tcp, udp
from engine_double import FakeEngine

P_ISN, S_ISN = 1000, 700_000
ETH = bytes.fromhex("5254000000095254000000010800")  # peer <- guest, IPv4
VNET = bytes(range(10, 22))  # 12 bytes, as virtio-net with mergeable buffers

CONFIG = """\
pair: {{name: c5test, role: primary}}
net:
  guest_port: c5-guest
  replication: {{local: 10.255.5.1, remote: 10.255.5.2}}
control: {{socket: {dir}/ctl.sock}}
metrics: {{enabled: false}}
log: {{level: debug}}
chardev:
  primary_in: {{unix: {dir}/pin, server: true}}
  secondary_in: {{unix: {dir}/sin, server: {secondary_server}}}
  outdev: {{unix: {dir}/out, server: true}}
  vnet_hdr: {vnet}
  reconnect_ms: 20
  outdev_buffer_bytes: {buffer}
"""
NOTIFY = "  notify: {{unix: {dir}/notify, server: false}}\n"


def eth(ip_packet: bytes) -> bytes:
    return ETH + ip_packet


def segments(isn: int, data: bytes, cuts: list[int], data_isn: int | None = None) -> list[bytes]:
    """SYN-ACK then the data cut at ``cuts``, as Ethernet frames from the guest. With
    ``data_isn`` the data is numbered from it: QEMU's filter-rewriter moves the secondary's
    segments into the primary's sequence space, all but the SYN-ACK."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    base = isn if data_isn is None else data_isn
    frames = [eth(tcp(isn, flags=SYN | ACK))]
    frames += [eth(tcp(base + 1 + low, data[low:high])) for low, high in itertools.pairwise(bounds)]
    return frames


def rewritten(data: bytes, cuts: list[int]) -> list[bytes]:
    """The secondary's output as the chardev transport gets it behind filter-rewriter."""
    return segments(S_ISN, data, cuts, data_isn=P_ISN)


@dataclass
class Qemu:
    """The QEMU side of the four sockets."""

    directory: Path
    vnet: bool
    secondary_server: bool = False  # coloproxy listens on secondary_in, host S connects
    pin: asyncio.StreamWriter | None = None
    out_reader: asyncio.StreamReader | None = None
    out_writer: asyncio.StreamWriter | None = None
    secondary: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(
        default_factory=asyncio.Queue
    )
    notify: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(
        default_factory=asyncio.Queue
    )
    sin: asyncio.StreamWriter | None = None
    servers: list[asyncio.Server] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def frames(self, packets: list[bytes]) -> bytes:
        return encode_frames(packets, [VNET] * len(packets) if self.vnet else None)

    async def listen(self) -> None:
        async def secondary(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.secondary.put((reader, writer))

        async def notify(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.notify.put((reader, writer))

        if not self.secondary_server:
            self.servers.append(await asyncio.start_unix_server(secondary, self.directory / "sin"))
        self.servers.append(await asyncio.start_unix_server(notify, self.directory / "notify"))

    async def connect_primary(self) -> None:
        _, self.pin = await connect(self.directory / "pin")
        self.writers.append(self.pin)

    async def connect_outdev(self) -> None:
        self.out_reader, self.out_writer = await connect(self.directory / "out")
        self.writers.append(self.out_writer)

    async def accept_secondary(self) -> None:
        if self.secondary_server:
            _, self.sin = await connect(self.directory / "sin")
        else:
            _, self.sin = await asyncio.wait_for(self.secondary.get(), 5)
        self.writers.append(self.sin)

    async def send(self, writer: asyncio.StreamWriter | None, data: bytes) -> None:
        assert writer is not None
        writer.write(data)
        await writer.drain()

    async def read_out(self, size: int, timeout: float = 5.0) -> bytes:
        assert self.out_reader is not None
        return await asyncio.wait_for(self.out_reader.readexactly(size), timeout)

    async def nothing_out(self, wait: float = 0.2) -> None:
        """Watch outdev for ``wait`` seconds: nothing may arrive (output held)."""
        assert self.out_reader is not None
        try:
            data = await asyncio.wait_for(self.out_reader.read(65536), wait)
        except TimeoutError:
            return
        raise AssertionError(f"output reached outdev while it must be held: {data[:64]!r}")

    async def close(self) -> None:
        for queue in (self.secondary, self.notify):
            while not queue.empty():
                self.writers.append(queue.get_nowait()[1])
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        for server in self.servers:
            server.close()


async def connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    for _ in range(250):
        with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
            return await asyncio.open_unix_connection(path)
        await asyncio.sleep(0.02)
    raise AssertionError(f"nobody listens on {path}")


@dataclass
class World:
    daemon: Daemon
    qemu: Qemu
    engine: FakeEngine | None
    directory: Path


@contextlib.asynccontextmanager
async def world(
    vnet: bool = False,
    *,
    engine: bool = True,
    notify: bool = False,
    delay: float = 0.0,
    hold: bool = False,
    buffer: int = 1 << 20,
    secondary_seq: str | None = None,
    secondary_server: bool = False,
    chardev: str = "",
) -> AsyncIterator[World]:
    """The daemon, QEMU's sockets and (``engine``) the engine double, which has completed the
    restart checkpoint when this yields; with ``hold`` it holds that one open, and every later
    one, until the test completes them (tests/engine_double.py)."""
    directory = Path(tempfile.mkdtemp(prefix="c5-"))  # short: unix socket paths
    text = CONFIG.format(
        dir=directory,
        vnet=str(vnet).lower(),
        buffer=buffer,
        secondary_server=str(secondary_server).lower(),
    )
    text += chardev  # more keys of the chardev section, indented
    if secondary_seq is not None:
        text += f"compare: {{secondary_seq: {secondary_seq}}}\n"
    if notify:
        text += NOTIFY.format(dir=directory)
    daemon: Daemon | None = None
    task: asyncio.Task[None] | None = None
    qemu = Qemu(directory, vnet, secondary_server)
    fake: FakeEngine | None = None
    try:
        await qemu.listen()
        daemon = Daemon(parse_config(text, "c5.yaml"), setup_net=False)
        task = asyncio.create_task(daemon.run())
        _, probe = await connect(directory / "ctl.sock")  # the daemon is up
        probe.close()
        await probe.wait_closed()
        await qemu.connect_primary()
        await qemu.connect_outdev()
        await qemu.accept_secondary()
        if engine:
            fake = FakeEngine(directory / "ctl.sock", delay=delay, hold=hold)
            await fake.__aenter__()
            if hold:
                await fake.wait_for_requests(1)  # the restart request (I6), held open
            else:
                await fake.wait_for(1)  # the restart request (I6), completed
        yield World(daemon, qemu, fake, directory)
    finally:
        if fake is not None:
            await fake.__aexit__(None, None, None)
        await qemu.close()
        if daemon is not None and task is not None:
            daemon.stop()
            await asyncio.wait_for(task, 10)
        shutil.rmtree(directory, ignore_errors=True)


async def until(condition: object, what: str, timeout: float = 5.0) -> None:
    assert callable(condition)
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def metric(world: World, prefix: str) -> float:
    """The value of the first exposition line starting with ``prefix`` (0 if none)."""
    body, _ = world.daemon.metrics.exposition()
    for line in body.decode().splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def status(world: World) -> Status:
    """The proxy's status as an operator reads it: over the control socket."""
    async with await ControlClient.connect(
        world.directory / "ctl.sock", ClientRole.MONITOR, name="test"
    ) as monitor:
        return await monitor.request(StatusRequest())


async def holding(world: World, held: int) -> Status:
    """Until the proxy holds ``held`` primary frames; then its status."""
    chardev = world.daemon.state.chardev
    assert chardev is not None
    try:
        await until(lambda: chardev.held_frames == held, f"{held} held")
    except AssertionError as exc:
        out = metric(world, 'coloproxy_chardev_frames_total{direction="out",socket="outdev"}')
        raise AssertionError(
            f"{exc}: {chardev.held_frames} held, {out:.0f} frames written to outdev"
        ) from None
    return await status(world)


@pytest.mark.asyncio
@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize("space", ["rewritten", "own"])
async def test_matching_output_round_trips_byte_exact(vnet: bool, space: str) -> None:
    """Behind QEMU's filter-rewriter (the default) and without it (secondary_seq: own)."""
    data = random.Random(5).randbytes(20_000)
    cuts = list(range(1448, len(data), 1448))
    primary = [*segments(P_ISN, data, cuts), eth(udp(b"datagram"))]
    own = segments(S_ISN, data, cuts) if space == "own" else rewritten(data, cuts)
    secondary = [*own, eth(udp(b"datagram"))]
    async with world(vnet, secondary_seq=space if space == "own" else None) as w:
        expected = w.qemu.frames(primary)
        await w.qemu.send(w.qemu.pin, expected)
        await w.qemu.nothing_out(0.1)  # held: the secondary has said nothing yet
        await w.qemu.send(w.qemu.sin, w.qemu.frames(secondary))
        assert await w.qemu.read_out(len(expected)) == expected
        await w.qemu.nothing_out(0.1)
        assert w.engine is not None and w.engine.count == 1  # only the restart request
        assert metric(w, 'coloproxy_chardev_frames_total{direction="in",socket="primary_in"}') == (
            len(primary)
        )
        assert metric(w, 'coloproxy_chardev_frames_total{direction="out",socket="outdev"}') == (
            len(primary)
        )


@pytest.mark.asyncio
async def test_resegmented_secondary_and_arbitrary_socket_cuts_match() -> None:
    rng = random.Random(7)
    data = rng.randbytes(50_000)
    primary = segments(P_ISN, data, list(range(1448, len(data), 1448)))
    secondary_cuts, position = [], 0
    while position < len(data):
        position += rng.randint(300, 1448)
        secondary_cuts.append(position)
    secondary = rewritten(data, secondary_cuts)
    async with world() as w:
        primary_stream, secondary_stream = w.qemu.frames(primary), w.qemu.frames(secondary)
        # Both streams written in pieces cut anywhere, interleaved.
        p = s = 0
        while p < len(primary_stream) or s < len(secondary_stream):
            step = rng.randint(1, 3000)
            await w.qemu.send(w.qemu.pin, primary_stream[p : p + step])
            await w.qemu.send(w.qemu.sin, secondary_stream[s : s + step])
            p, s = p + step, s + step
        assert await w.qemu.read_out(len(primary_stream)) == primary_stream
        assert w.engine is not None and w.engine.count == 1


@pytest.mark.asyncio
async def test_a_divergence_asks_the_engine_for_a_checkpoint_and_holds_until_it() -> None:
    """Output commit: from the divergence to ``checkpoint-completed`` nothing reaches outdev,
    neither while the request waits for the engine nor while the checkpoint runs."""
    async with world(hold=True) as w:
        engine = w.engine
        assert engine is not None
        await engine.complete()  # the restart checkpoint
        primary = segments(P_ISN, b"HTTP/1.0 200 OK\r\nDate: 1\r\n", [])
        secondary = rewritten(b"HTTP/1.0 200 OK\r\nDate: 2\r\n", [])
        await w.qemu.send(w.qemu.pin, w.qemu.frames(primary))
        await w.qemu.send(w.qemu.sin, w.qemu.frames(secondary))
        # The SYN-ACKs match and come out; the data segment waits for the checkpoint.
        syn_ack = w.qemu.frames(primary[:1])
        assert await w.qemu.read_out(len(syn_ack)) == syn_ack
        await engine.wait_for_requests(2)
        request = engine.requests[1]
        assert request.reason == "payload" and request.protocol == "tcp"
        assert request.evidence is not None and request.evidence.offset == 23
        # Later output of the diverged connection is held too.
        later = [eth(tcp(P_ISN + 1 + 26, b"Server: x\r\n"))]
        await w.qemu.send(w.qemu.pin, w.qemu.frames(later))
        asked = await holding(w, 2)
        assert (asked.checkpoint_requested, asked.checkpointing) == (True, False)
        await w.qemu.nothing_out(0.5)
        await engine.start()
        running = await holding(w, 2)
        assert (running.checkpoint_requested, running.checkpointing) == (True, True)
        await w.qemu.nothing_out(0.3)
        assert (await status(w)).held_packets == 2
        await engine.complete()
        rest = w.qemu.frames(primary[1:] + later)
        assert await w.qemu.read_out(len(rest)) == rest
        done = await status(w)
        assert (done.held_packets, done.checkpoint_requested, done.epoch) == (0, False, 2)


@pytest.mark.asyncio
async def test_a_restarted_proxy_releases_nothing_before_a_checkpoint() -> None:
    """I6: a new proxy holds everything, even output the secondary matches exactly, until the
    engine completes the checkpoint it asked for at start."""
    data = random.Random(11).randbytes(3000)
    cuts = [1448, 2896]
    primary = segments(P_ISN, data, cuts)
    async with world(hold=True) as w:
        engine = w.engine
        assert engine is not None
        assert [(r.id, r.reason) for r in engine.pending] == [(1, "restart")]
        expected = w.qemu.frames(primary)
        await w.qemu.send(w.qemu.pin, expected)
        await w.qemu.send(w.qemu.sin, w.qemu.frames(rewritten(data, cuts)))
        frozen = await holding(w, len(primary))
        assert (frozen.checkpoint_requested, frozen.checkpointing, frozen.epoch) == (
            True,
            True,
            0,
        )
        await w.qemu.nothing_out(0.5)
        assert (await status(w)).held_packets == len(primary)
        await engine.complete()
        assert await w.qemu.read_out(len(expected)) == expected
        # Compared afresh from now on: matching output leaves without another request.
        more = [eth(tcp(P_ISN + 1 + len(data), b"after the checkpoint"))]
        await w.qemu.send(w.qemu.pin, w.qemu.frames(more))
        await w.qemu.send(
            w.qemu.sin, w.qemu.frames([eth(tcp(P_ISN + 1 + len(data), b"after the checkpoint"))])
        )
        assert await w.qemu.read_out(len(w.qemu.frames(more))) == w.qemu.frames(more)
        assert engine.count == 1


@pytest.mark.asyncio
async def test_reconnects_of_each_socket_are_survived() -> None:
    data = random.Random(9).randbytes(4 * 1448)
    cuts = [1448, 2896, 4344]
    primary = segments(P_ISN, data, cuts)
    secondary = rewritten(data, cuts)
    async with world() as w:
        qemu = w.qemu
        first = qemu.frames(primary[:2])
        await qemu.send(qemu.pin, first)
        await qemu.send(qemu.sin, qemu.frames(secondary[:2]))
        assert await qemu.read_out(len(first)) == first
        # secondary_in (coloproxy connects): QEMU's server drops it; coloproxy reconnects.
        assert qemu.sin is not None
        qemu.sin.close()
        await qemu.accept_secondary()
        # outdev (coloproxy listens) goes away: released frames are kept, then delivered.
        assert qemu.out_writer is not None
        qemu.out_writer.close()
        await until(
            lambda: metric(w, 'coloproxy_chardev_connected{socket="outdev"}') == 0,
            "outdev seen disconnected",
        )
        await qemu.send(qemu.pin, qemu.frames(primary[2:3]))
        await qemu.send(qemu.sin, qemu.frames(secondary[2:3]))
        await until(
            lambda: (
                w.daemon.state.chardev is not None and w.daemon.state.chardev.outdev_buffered > 0
            ),
            "released frames kept for outdev",
        )
        await qemu.connect_outdev()
        third = qemu.frames(primary[2:3])
        assert await qemu.read_out(len(third)) == third
        # primary_in (coloproxy listens): a connection ends inside a frame, QEMU reconnects.
        assert w.engine is not None and w.engine.count == 1
        await qemu.send(qemu.pin, qemu.frames(primary[3:4])[:30])
        assert qemu.pin is not None
        qemu.pin.close()
        await until(
            lambda: metric(w, 'coloproxy_chardev_frame_problems_total{problem="truncated"') == 1,
            "the truncated frame counted",
        )
        await qemu.connect_primary()
        await qemu.send(qemu.pin, qemu.frames(primary[3:]))
        # After a checkpoint the secondary is a copy of the primary: its sequence numbers too.
        await qemu.send(qemu.sin, qemu.frames(segments(P_ISN, data, cuts)[3:]))
        rest = qemu.frames(primary[3:])
        assert await qemu.read_out(len(rest)) == rest
        # The truncated frame was lost: coloproxy asked for a checkpoint at once.
        assert [r.reason for r in w.engine.requests] == ["restart", "truncated"]
        for name in ("primary_in", "secondary_in", "outdev"):
            assert metric(w, f'coloproxy_chardev_connections_total{{socket="{name}"}}') == 2


@pytest.mark.asyncio
async def test_a_full_outdev_buffer_holds_primary_in_and_loses_nothing() -> None:
    payload = 1400
    count = 200  # about 290 kB through a 64 KiB buffer
    data = random.Random(3).randbytes(payload * count)
    cuts = list(range(payload, len(data), payload))
    primary = segments(P_ISN, data, cuts)
    secondary = rewritten(data, cuts)
    async with world(buffer=65536) as w:
        qemu = w.qemu
        assert qemu.out_writer is not None
        qemu.out_writer.close()
        await until(
            lambda: metric(w, 'coloproxy_chardev_connected{socket="outdev"}') == 0, "outdev down"
        )
        expected = qemu.frames(primary)
        sender = asyncio.create_task(qemu.send(qemu.pin, expected))
        await qemu.send(qemu.sin, qemu.frames(secondary))
        await until(lambda: metric(w, "coloproxy_chardev_primary_in_paused") == 1, "the hold")
        # Held back because the released frames kept for outdev passed the bound: none lost.
        assert w.daemon.state.chardev is not None and w.daemon.state.chardev.outdev_buffered > 65536
        assert metric(w, 'coloproxy_chardev_frames_total{direction="out",socket="outdev"}') == 0
        await qemu.connect_outdev()
        assert await qemu.read_out(len(expected), timeout=10) == expected
        await sender
        assert metric(w, "coloproxy_chardev_primary_in_paused") == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
async def test_a_frame_above_qemus_limit_is_a_desync_and_the_next_connection_goes_on(
    vnet: bool,
) -> None:
    async with world(vnet) as w:
        qemu = w.qemu
        primary = segments(P_ISN, b"after the big one", [])
        secondary = rewritten(b"after the big one", [])
        big = eth(b"\x00" * (MAX_FRAME + 100))
        with contextlib.suppress(ConnectionError):  # coloproxy may close before it all went
            await qemu.send(qemu.pin, qemu.frames([big]) + qemu.frames(primary))
        await until(
            lambda: metric(w, 'coloproxy_chardev_connected{socket="primary_in"}') == 0,
            "primary_in dropped",
        )
        assert metric(w, 'coloproxy_chardev_frame_problems_total{problem="desync"') == 1
        assert metric(w, 'coloproxy_chardev_discarded_bytes_total{socket="primary_in"}') > 0
        assert w.engine is not None
        await until(lambda: w.engine is not None and w.engine.count == 2, "the request")
        assert w.engine.requests[1].reason == "desync"
        await w.engine.wait_for(2)
        # QEMU's chardev reconnects (reconnect=) and starts a fresh stream.
        await qemu.connect_primary()
        await qemu.send(qemu.pin, qemu.frames(primary))
        await qemu.send(qemu.sin, qemu.frames(secondary))
        expected = qemu.frames(primary)
        assert await qemu.read_out(len(expected)) == expected


@pytest.mark.asyncio
async def test_xen_notify_handshake_do_checkpoint_and_colo_checkpoint() -> None:
    async with world(engine=False, notify=True) as w:
        qemu = w.qemu
        reader, writer = await asyncio.wait_for(qemu.notify.get(), 5)
        qemu.writers.append(writer)

        async def word() -> bytes:
            length = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 5), "big")
            return await asyncio.wait_for(reader.readexactly(length), 5)

        # The restart request (I6) goes to Xen too: nothing is released before a checkpoint.
        assert await word() == b"DO_CHECKPOINT"
        writer.write(encode_frame(b"COLO_USERSPACE_PROXY_INIT"))
        assert await word() == b"COLO_COMPARE_GET_XEN_INIT"
        primary = segments(P_ISN, b"same", [])
        held = qemu.frames(primary)
        await qemu.send(qemu.pin, held)
        await qemu.nothing_out(0.2)
        writer.write(encode_frame(b"COLO_CHECKPOINT"))
        assert await qemu.read_out(len(held)) == held
        # Compared afresh: a divergence is a DO_CHECKPOINT, its end releases the frame.
        await qemu.send(qemu.sin, qemu.frames(rewritten(b"same", [])))
        await qemu.send(qemu.pin, qemu.frames([eth(tcp(P_ISN + 5, b"abc"))]))
        await qemu.send(qemu.sin, qemu.frames([eth(tcp(S_ISN + 5, b"abd"))]))
        assert await word() == b"DO_CHECKPOINT"
        await qemu.nothing_out(0.3)  # held until Xen's checkpoint, not released on the request
        writer.write(encode_frame(b"NONSENSE"))
        writer.write(encode_frame(b"COLO_CHECKPOINT"))
        diverged = qemu.frames([eth(tcp(P_ISN + 5, b"abc"))])
        assert await qemu.read_out(len(diverged)) == diverged
        await until(
            lambda: (
                metric(
                    w, 'coloproxy_chardev_notify_messages_total{direction="in",message="unknown"}'
                )
                == 1
            ),
            "the unknown word counted",
        )
        writer.close()


def test_frame_header_helper_matches_qemu() -> None:
    assert frame_header(3, 0) == b"\x00\x00\x00\x03\x00\x00\x00\x00"
    assert FrameDecoder(vnet_hdr=True).feed(frame_header(2, 0) + b"ab").packets == [b"ab"]


@pytest.mark.asyncio
async def test_a_chardev_primary_touches_no_host_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """setup_net on, an engine configured: still no links, tc or rules, now or at failover."""
    from coloproxy.net import host as hostnet

    def refuse(*args: object) -> None:
        raise AssertionError("the host network was touched")

    monkeypatch.setattr(hostnet, "setup", refuse)
    monkeypatch.setattr(hostnet, "attach_guest_to_lan", refuse)
    directory = Path(tempfile.mkdtemp(prefix="c5-"))
    text = CONFIG.format(dir=directory, vnet="false", buffer=1 << 20, secondary_server="false")
    text = text.replace(
        "  guest_port: c5-guest\n", "  guest_port: c5-guest\n  lan_bridge: c5-lan\n"
    )
    key = directory / "hb.key"
    key.write_bytes(b"chardev-test-heartbeat-key")
    key.chmod(0o600)
    text += f"engine: {{qmp: {directory}/absent-qmp.sock, heartbeat_key: {key}}}\n"
    daemon = Daemon(parse_config(text, "c5.yaml"), setup_net=True)
    task = asyncio.create_task(daemon.run())
    try:
        await until(
            lambda: daemon.state.chardev is not None and daemon.state.engine is not None, "start"
        )
        assert not task.done()
        assert daemon.state.engine is not None and daemon.state.engine.colo.attach_lan is None
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.asyncio
async def test_unprotected_after_the_secondary_is_lost_releases_everything() -> None:
    from coloproxy.protocol import Failover, Mode
    from coloproxy.role import Role

    async with world() as w:
        qemu = w.qemu
        held = qemu.frames(segments(P_ISN, b"waiting for a secondary that is gone", []))
        await qemu.send(qemu.pin, held)
        await qemu.nothing_out(0.2)
        socket_path = w.directory / "ctl.sock"
        async with await ControlClient.connect(socket_path, ClientRole.CLI) as cli:
            await cli.request(Failover(Role.PRIMARY, Mode.UNPROTECTED, "secondary lost"))
        assert await qemu.read_out(len(held)) == held  # what was held
        later = qemu.frames([eth(tcp(P_ISN + 100, b"uncompared now"))])
        await qemu.send(qemu.pin, later)
        assert await qemu.read_out(len(later)) == later  # and what comes next, at once
        await qemu.send(qemu.sin, qemu.frames(rewritten(b"late", [])))
        await qemu.nothing_out(0.2)  # the secondary's output never leaves


@pytest.mark.asyncio
async def test_a_socket_that_cannot_be_listened_on_is_a_clear_error() -> None:
    from coloproxy.capture.chardev_link import ChardevError

    directory = Path(tempfile.mkdtemp(prefix="c5-"))
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        text = CONFIG.format(
            dir=directory, vnet="false", buffer=1 << 20, secondary_server="false"
        ).replace(
            f"{{unix: {directory}/pin, server: true}}", f'{{tcp: "127.0.0.1:{port}", server: true}}'
        )
        daemon = Daemon(parse_config(text, "c5.yaml"), setup_net=False)
        with pytest.raises(ChardevError) as raised:
            await asyncio.wait_for(daemon.run(), 10)
        assert str(raised.value).startswith(
            f"chardev primary_in: cannot listen on tcp:127.0.0.1:{port},server: "
        )
        assert "address already in use" in str(raised.value).lower()
    finally:
        busy.close()
        shutil.rmtree(directory, ignore_errors=True)


# -- who may feed the transport, and a stream that lost its framing ---------------------------

REFUSED = "coloproxy_chardev_refused_connections_total"


async def refused_at_once(reader: asyncio.StreamReader) -> None:
    """The connection is closed by coloproxy without a word."""
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(1), 5) == b""


def counted(w: World, name: str) -> int:
    """A counter of the proxy (``ProxyCounters.packets``) by (queue, verdict)."""
    assert w.daemon.state.proxy is not None
    queue, verdict = name.split(":")
    return w.daemon.state.proxy.counters.packets[queue, verdict]


@pytest.mark.asyncio
@pytest.mark.parametrize("group", [False, True], ids=["private", "group"])
async def test_unix_listeners_are_private_whatever_the_umask(group: bool) -> None:
    """0600 (0660 and the group with chardev.group) although the umask would give 0777."""
    own_group = grp.getgrgid(os.getgid()).gr_name
    extra = f"  group: {own_group}\n" if group else ""
    old = os.umask(0)
    try:
        async with world(secondary_server=True, chardev=extra) as w:
            os.umask(old)
            for name in ("pin", "sin", "out"):
                info = (w.directory / name).stat()
                assert stat.S_IMODE(info.st_mode) == (0o660 if group else 0o600), name
                assert info.st_gid == os.getgid()
    finally:
        os.umask(old)


@pytest.mark.asyncio
async def test_a_second_client_on_primary_in_is_refused_and_its_frame_never_released() -> None:
    async with world() as w:
        qemu = w.qemu
        assert w.engine is not None
        reader, intruder = await connect(w.directory / "pin")
        qemu.writers.append(intruder)
        intruder.write(qemu.frames([eth(udp(b"forged: not the PVM's"))]))
        await refused_at_once(reader)
        await until(
            lambda: metric(w, f'{REFUSED}{{reason="busy",socket="primary_in"}}') == 1, "counted"
        )
        # The PVM's own connection was not cut: its output is compared and released.
        first = [eth(udp(b"the PVM's first"))]
        await qemu.send(qemu.pin, qemu.frames(first))
        await qemu.send(qemu.sin, qemu.frames(first))
        assert await qemu.read_out(len(qemu.frames(first))) == qemu.frames(first)
        # A checkpoint releases what is held: the forged frame would come out here.
        socket_path = w.directory / "ctl.sock"
        async with await ControlClient.connect(socket_path, ClientRole.CLI) as cli:
            await cli.request(CheckpointNow("manual"))
        await w.engine.wait_for(2)
        second = [eth(udp(b"the PVM's second"))]
        await qemu.send(qemu.pin, qemu.frames(second))
        await qemu.send(qemu.sin, qemu.frames(second))
        assert await qemu.read_out(len(qemu.frames(second))) == qemu.frames(second)
        assert metric(w, 'coloproxy_chardev_frames_total{direction="in",socket="primary_in"}') == 2
        assert metric(w, 'coloproxy_chardev_frames_total{direction="out",socket="outdev"}') == 2
        assert counted(w, "primary-out:accept-matched") == 2
        assert counted(w, "primary-out:accept-checkpoint") == 0
        assert w.daemon.state.chardev is not None and w.daemon.state.chardev.held_frames == 0
        assert metric(w, 'coloproxy_chardev_connected{socket="primary_in"}') == 1


@pytest.mark.asyncio
async def test_a_second_client_on_secondary_in_is_refused_and_matches_nothing() -> None:
    async with world(secondary_server=True) as w:
        qemu = w.qemu
        pvm = [eth(udp(b"the PVM's output"))]
        reader, intruder = await connect(w.directory / "sin")
        qemu.writers.append(intruder)
        intruder.write(qemu.frames(pvm))  # a copy of what the PVM is about to send
        await until(
            lambda: (
                metric(w, f'{REFUSED}{{reason="busy",socket="secondary_in"}}') == 1
                or metric(w, 'coloproxy_chardev_frames_total{direction="in",socket="secondary_in"}')
                > 0
            ),
            "the intruder refused or read",
        )
        await refused_at_once(reader)
        await qemu.send(qemu.pin, qemu.frames(pvm))
        await until(
            lambda: (
                metric(w, 'coloproxy_chardev_frames_total{direction="in",socket="primary_in"}') == 1
            ),
            "the PVM's frame read",
        )
        assert w.daemon.state.chardev is not None and w.daemon.state.chardev.held_frames == 1
        assert counted(w, "primary-out:accept-matched") == 0
        # The real secondary's feed was not cut: its copy releases the frame.
        await qemu.send(qemu.sin, qemu.frames(pvm))
        assert await qemu.read_out(len(qemu.frames(pvm))) == qemu.frames(pvm)
        assert counted(w, "primary-out:accept-matched") == 1
        assert metric(w, 'coloproxy_chardev_connected{socket="secondary_in"}') == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.asyncio
async def test_a_tcp_listener_accepts_only_the_peers_it_allows() -> None:
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="c5-"))
    text = CONFIG.format(
        dir=directory, vnet="false", buffer=1 << 20, secondary_server="true"
    ).replace(
        f"{{unix: {directory}/sin, server: true}}",
        f'{{tcp: "127.0.0.1:{port}", server: true, allow: [127.0.0.2, 10.0.0.0/8]}}',
    )
    daemon = Daemon(parse_config(text, "c5.yaml"), setup_net=False)
    task = asyncio.create_task(daemon.run())
    writers: list[asyncio.StreamWriter] = []
    try:
        await until(lambda: daemon.state.chardev is not None, "the transport")
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except ConnectionRefusedError:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
        writers.append(writer)
        await refused_at_once(reader)  # from 127.0.0.1: not on the list
        _, allowed = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        writers.append(allowed)
        transport = daemon.state.chardev
        assert transport is not None
        await until(lambda: transport.secondary_in.connected, "the allowed peer")
        body = daemon.metrics.exposition()[0].decode()
        assert f'{REFUSED}{{reason="not-allowed",socket="secondary_in"}} 1.0' in body
        current = transport.secondary_in.current
        assert current is not None and current.transport is not None
        sock = current.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        for writer in writers:
            writer.close()
        daemon.stop()
        await asyncio.wait_for(task, 10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.asyncio
@pytest.mark.parametrize("cut", ["together", "split"])
async def test_an_impossible_length_on_primary_in_drops_the_connection_and_loses_nothing(
    cut: str,
) -> None:
    """2^31 bytes announced: the connection goes, a checkpoint is asked for (desync), the
    frame received whole before it is held and released by that checkpoint."""
    async with world(delay=0.05) as w:
        qemu = w.qemu
        assert w.engine is not None
        before = [eth(udp(b"received whole before the bad length"))]
        after = [eth(udp(b"behind the bad length: never read"))]
        bad = frame_header(2**31, 0 if qemu.vnet else None)
        stream = qemu.frames(before) + bad + b"\x00" * 64 + qemu.frames(after)
        if cut == "together":
            await qemu.send(qemu.pin, stream)
        else:
            split = len(qemu.frames(before)) + 2
            await qemu.send(qemu.pin, stream[:split])
            await until(
                lambda: (
                    w.daemon.state.chardev is not None and w.daemon.state.chardev.held_frames == 1
                ),
                "the whole frame held",
            )
            await qemu.send(qemu.pin, stream[split:])
        await until(
            lambda: metric(w, 'coloproxy_chardev_connected{socket="primary_in"}') == 0,
            "primary_in dropped",
        )
        await until(lambda: w.engine is not None and w.engine.count == 2, "the request")
        assert w.engine.requests[1].reason == "desync"
        assert (
            metric(
                w, 'coloproxy_chardev_frame_problems_total{problem="desync",socket="primary_in"}'
            )
            == 1
        )
        # Held, not lost: the checkpoint it asked for releases it.
        assert await qemu.read_out(len(qemu.frames(before))) == qemu.frames(before)
        # QEMU reconnects; a fresh stream is compared as usual.
        await qemu.connect_primary()
        later = [eth(udp(b"after the reconnect"))]
        await qemu.send(qemu.pin, qemu.frames(later))
        await qemu.send(qemu.sin, qemu.frames(later))
        assert await qemu.read_out(len(qemu.frames(later))) == qemu.frames(later)
        assert metric(w, 'coloproxy_chardev_frames_total{direction="in",socket="primary_in"}') == 2
        assert metric(w, 'coloproxy_chardev_frames_total{direction="out",socket="outdev"}') == 2
        assert counted(w, "primary-out:accept-checkpoint") == 1
        assert counted(w, "primary-out:accept-matched") == 1
        assert w.daemon.state.chardev is not None and w.daemon.state.chardev.held_frames == 0


@pytest.mark.asyncio
async def test_an_impossible_length_on_secondary_in_drops_the_connection() -> None:
    async with world() as w:
        qemu = w.qemu
        assert w.engine is not None
        pvm = [eth(udp(b"compared before the bad length"))]
        await qemu.send(qemu.pin, qemu.frames(pvm))
        await until(
            lambda: w.daemon.state.chardev is not None and w.daemon.state.chardev.held_frames == 1,
            "held",
        )
        bad = frame_header(2**31)
        await qemu.send(qemu.sin, qemu.frames(pvm) + bad + qemu.frames(pvm))
        # The frame before the bad length was compared; the connection goes and coloproxy
        # (the client here) connects again.
        assert await qemu.read_out(len(qemu.frames(pvm))) == qemu.frames(pvm)
        assert counted(w, "primary-out:accept-matched") == 1
        await qemu.accept_secondary()
        await until(lambda: w.engine is not None and w.engine.count == 2, "the request")
        assert w.engine.requests[1].reason == "desync"
        assert (
            metric(
                w, 'coloproxy_chardev_frame_problems_total{problem="desync",socket="secondary_in"}'
            )
            == 1
        )
        assert (
            metric(w, 'coloproxy_chardev_frames_total{direction="in",socket="secondary_in"}') == 1
        )
        await w.engine.wait_for(2)
        later = [eth(udp(b"after the reconnect"))]
        await qemu.send(qemu.pin, qemu.frames(later))
        await qemu.send(qemu.sin, qemu.frames(later))
        assert await qemu.read_out(len(qemu.frames(later))) == qemu.frames(later)
        assert counted(w, "primary-out:accept-matched") == 2


@pytest.mark.asyncio
async def test_every_frame_reaches_the_comparator_as_sent() -> None:
    """No de-duplication in the transport: a range sent twice, the second time with other
    bytes, reaches the comparator twice, byte for byte (the comparator judges it)."""
    directory = Path(tempfile.mkdtemp(prefix="c5-"))
    text = CONFIG.format(dir=directory, vnet="false", buffer=1 << 20, secondary_server="true")
    config = parse_config(text, "c5.yaml").chardev
    assert config is not None
    seen: dict[str, list[bytes]] = {"primary": [], "secondary": []}
    transport = ChardevTransport(
        config,
        lambda tokens, packets, now: seen["primary"].extend(packets),
        lambda tokens, packets, now: seen["secondary"].extend(packets),
    )
    await transport.start()
    writers = []
    try:
        frames = [
            eth(tcp(P_ISN + 1, b"verified")),
            eth(tcp(P_ISN + 1, b"verified")),  # a retransmission
            eth(tcp(P_ISN + 1, b"VERIFIED")),  # the same range, other bytes
        ]
        for name in ("pin", "sin"):
            _, writer = await connect(directory / name)
            writers.append(writer)
            writer.write(encode_frames(frames))
            await writer.drain()
        await until(lambda: len(seen["primary"]) + len(seen["secondary"]) == 6, "the frames")
        assert seen == {"primary": frames, "secondary": frames}
    finally:
        for writer in writers:
            writer.close()
        await transport.close()
        shutil.rmtree(directory, ignore_errors=True)
