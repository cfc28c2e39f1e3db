"""The real daemon's control socket, attacked: what a peer says can release nothing that the
comparator holds unless its credentials make it an engine and the checkpoint it reports is
one this proxy saw start.

The daemon runs the chardev transport on unix sockets (no namespaces, no netfilter); the test
plays QEMU on those sockets as tests/test_chardev.py does, and an engine on the control
socket line by line. Unprivileged peers are forked children with another uid
(tests/peers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coloproxy.compare import Evidence
from coloproxy.config import parse_config
from coloproxy.daemon import primary
from coloproxy.daemon.control import wire_evidence, wire_request
from coloproxy.daemon.run import Daemon
from coloproxy.protocol import (
    Ack,
    CheckpointCompleted,
    CheckpointEvidence,
    CheckpointRequest,
    CheckpointStarted,
    ClientRole,
    Decoder,
    ErrorCode,
    ErrorReply,
    Failover,
    Hello,
    Message,
    Mode,
    ProtocolError,
    Welcome,
    encode,
)
from coloproxy.protocol.colo_frames import encode_frames
from coloproxy.role import Role
from craft import ACK, SYN, tcp
from peers import NOBODY, NOGROUP, USERS_GID, needs_root, talk_as

P_ISN, S_ISN = 1000, 700_000
ETH = bytes.fromhex("5254000000095254000000010800")

CONFIG = """\
pair: {{name: ctltest, role: primary}}
net:
  guest_port: ct-guest
  replication: {{local: 10.255.6.1, remote: 10.255.6.2}}
control: {{socket: {dir}/ctl.sock, group: users}}
metrics: {{enabled: false}}
log: {{level: debug}}
chardev:
  primary_in: {{unix: {dir}/pin, server: true}}
  secondary_in: {{unix: {dir}/sin, server: false}}
  outdev: {{unix: {dir}/out, server: true}}
  reconnect_ms: 20
"""


def frames(packets: list[bytes]) -> bytes:
    return encode_frames([ETH + packet for packet in packets], None)


async def connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    for _ in range(250):
        with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
            return await asyncio.open_unix_connection(path)
        await asyncio.sleep(0.02)
    raise AssertionError(f"nobody listens on {path}")


class Line:
    """A control connection driven line by line: what an engine (or an attacker) sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = Decoder()
        self.received: list[Message | ProtocolError] = []

    async def send(self, message: Message) -> None:
        self.writer.write(encode(message))
        await self.writer.drain()

    async def next(self, timeout: float = 5.0) -> Message | ProtocolError:
        async with asyncio.timeout(timeout):
            while not self.received:
                data = await self.reader.read(65536)
                assert data, "the proxy closed the connection"
                self.received.extend(self.decoder.feed(data))
        return self.received.pop(0)

    async def reply_to(self, message: Message) -> Message | ProtocolError:
        """Send a request and return its reply, skipping pushes that come first."""
        await self.send(message)
        while True:
            item = await self.next()
            if not isinstance(item, CheckpointRequest):
                return item

    def close(self) -> None:
        self.writer.transport.abort()


@dataclass
class World:
    daemon: Daemon
    directory: Path
    pin: asyncio.StreamWriter
    sin: asyncio.StreamWriter
    out: asyncio.StreamReader

    @property
    def socket(self) -> Path:
        return self.directory / "ctl.sock"

    async def engine(self) -> tuple[Line, CheckpointRequest]:
        """An engine (root) that said hello, and the restart request (I6) it was sent."""
        line = Line(*await connect(self.socket))
        await line.send(Hello(ClientRole.ENGINE, id=1))
        assert isinstance(await line.next(), Welcome)
        request = await line.next()
        assert isinstance(request, CheckpointRequest) and request.reason == "restart"
        return line, request

    async def nothing_out(self, wait: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.out.read(1), wait)

    async def read_out(self, size: int) -> bytes:
        return await asyncio.wait_for(self.out.readexactly(size), 5)

    def metric(self, prefix: str) -> float:
        body, _ = self.daemon.metrics.exposition()
        for text in body.decode().splitlines():
            if text.startswith(prefix):
                return float(text.rsplit(" ", 1)[1])
        return 0.0

    def refused(self, report: str, reason: str) -> float:
        return self.metric(
            f'coloproxy_checkpoint_reports_refused_total{{reason="{reason}",report="{report}"}}'
        )


@contextlib.asynccontextmanager
async def world() -> AsyncIterator[World]:
    directory = Path(tempfile.mkdtemp(prefix="ct-"))  # short: unix socket paths
    directory.chmod(0o755)  # the unprivileged children must reach the socket
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []
    secondary: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await secondary.put(writer)

    daemon = Daemon(parse_config(CONFIG.format(dir=directory), "ct.yaml"), setup_net=False)
    task: asyncio.Task[None] | None = None
    try:
        servers.append(await asyncio.start_unix_server(accept, directory / "sin"))
        task = asyncio.create_task(daemon.run())
        _, pin = await connect(directory / "pin")
        out, out_writer = await connect(directory / "out")
        sin = await asyncio.wait_for(secondary.get(), 5)
        writers += [pin, out_writer, sin]
        yield World(daemon, directory, pin, sin, out)
    finally:
        for writer in writers:
            writer.close()
        for server in servers:
            server.close()
        if task is not None:
            daemon.stop()
            await asyncio.wait_for(task, 10)
        shutil.rmtree(directory, ignore_errors=True)


async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def handshake(w: World) -> None:
    """Both SYN-ACKs of the test connection: they match, the primary's goes out. (The
    secondary's data segments are numbered in the primary's space, as QEMU's filter-rewriter
    hands them over.)"""
    syn_ack = frames([tcp(P_ISN, flags=SYN | ACK)])
    await send(w.pin, syn_ack)
    await send(w.sin, frames([tcp(S_ISN, flags=SYN | ACK)]))
    assert await w.read_out(len(syn_ack)) == syn_ack


@pytest.mark.asyncio
async def test_the_restart_hold_is_lifted_by_no_made_up_completion() -> None:
    async with world() as w:
        held = frames([tcp(P_ISN + 1, b"produced before any checkpoint")])
        await send(w.pin, held)
        engine, restart = await w.engine()
        for request in (987654, None, restart.id):
            reply = await engine.reply_to(CheckpointCompleted(request=request, id=2))
            assert isinstance(reply, ErrorReply)
            assert reply.code is ErrorCode.UNEXPECTED and reply.re == 2
            assert "no checkpoint-started since the last completion" in reply.message
        await w.nothing_out()
        assert w.refused("completed", "not-started") == 3
        # A checkpoint the proxy saw start lifts it.
        assert await engine.reply_to(CheckpointStarted(request=restart.id, id=3)) == Ack(
            request=restart.id, re=3
        )
        assert await engine.reply_to(CheckpointCompleted(request=restart.id, id=4)) == Ack(
            request=restart.id, re=4
        )
        assert await w.read_out(len(held)) == held
        engine.close()


@pytest.mark.asyncio
async def test_a_spurious_second_completion_releases_nothing() -> None:
    async with world() as w:
        engine, restart = await w.engine()
        await engine.reply_to(CheckpointStarted(request=restart.id, id=2))
        await engine.reply_to(CheckpointCompleted(request=restart.id, id=3))
        # A segment the secondary never sent, and one where the two differ.
        alone = frames([tcp(P_ISN + 1, b"the secondary never sent this", sport=81)])
        await send(w.pin, alone)
        await handshake(w)
        diverged = frames([tcp(P_ISN + 1, b"abc")])
        await send(w.pin, diverged)
        await send(w.sin, frames([tcp(P_ISN + 1, b"abd")]))
        payload = await engine.next()
        assert isinstance(payload, CheckpointRequest) and payload.reason == "payload"
        for request in (restart.id, payload.id, 987654, None):
            reply = await engine.reply_to(CheckpointCompleted(request=request, id=4))
            assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.UNEXPECTED
        await w.nothing_out()
        # The refusal re-sent the outstanding request: the engine is asked again.
        again = await engine.next()
        assert isinstance(again, CheckpointRequest) and again.id == payload.id
        engine.close()


@pytest.mark.asyncio
async def test_a_start_for_a_request_never_issued_is_refused() -> None:
    async with world() as w:
        held = frames([tcp(P_ISN + 1, b"held")])
        await send(w.pin, held)
        engine, _ = await w.engine()
        reply = await engine.reply_to(CheckpointStarted(request=987654, id=2))
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.UNEXPECTED
        assert "request 987654 was never issued by this proxy" in reply.message
        reply = await engine.reply_to(CheckpointCompleted(request=987654, id=3))
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.UNEXPECTED
        await w.nothing_out()
        assert w.refused("started", "unknown-request") == 1
        engine.close()


@needs_root
@pytest.mark.asyncio
async def test_a_member_of_the_control_group_can_release_nothing() -> None:
    """The attacks of a peer in control.group: claim the engine role and report a checkpoint
    that never happened; as a CLI, tell the proxy to fail over (run unprotected)."""
    async with world() as w:
        engine, restart = await w.engine()
        await engine.reply_to(CheckpointStarted(request=restart.id, id=2))
        await engine.reply_to(CheckpointCompleted(request=restart.id, id=3))
        await handshake(w)
        held = frames([tcp(P_ISN + 1, b"the secondary said otherwise")])
        await send(w.pin, held)
        await send(w.sin, frames([tcp(P_ISN + 1, b"the secondary said other")]))
        as_engine = await talk_as(
            w.socket,
            NOBODY,
            NOGROUP,
            [USERS_GID],
            [
                Hello(ClientRole.ENGINE, id=1),
                CheckpointStarted(request=None, id=2),
                CheckpointCompleted(request=987654, id=3),
            ],
            replies=1,
        )
        (refusal,) = as_engine.replies
        assert isinstance(refusal, ErrorReply) and refusal.code is ErrorCode.FORBIDDEN
        assert refusal.message.startswith("uid 65534 may not claim role engine")
        assert as_engine.closed
        as_cli = await talk_as(
            w.socket,
            NOBODY,
            NOGROUP,
            [USERS_GID],
            [
                Hello(ClientRole.CLI, id=1),
                Failover(Role.PRIMARY, Mode.UNPROTECTED, "host S lost", id=2),
            ],
        )
        welcome, refusal = as_cli.replies
        assert isinstance(welcome, Welcome) and welcome.mode is Mode.PROTECTED
        assert isinstance(refusal, ErrorReply) and refusal.code is ErrorCode.FORBIDDEN
        await w.nothing_out()
        assert w.daemon.state.mode is Mode.PROTECTED
        for kind in ("hello", "failover"):
            refusals = f'coloproxy_control_refusals_total{{code="forbidden",kind="{kind}"}}'
            assert w.metric(refusals) == 1
        later = frames([tcp(P_ISN + 100, b"and nothing after it goes out uncompared", sport=82)])
        await send(w.pin, later)
        await w.nothing_out()
        engine.close()


# -- the wire form of the proxy's checkpoint requests -------------------------------------------


def test_evidence_from_the_comparator() -> None:
    evidence = Evidence(1460, b"abc", b"abd", 1448, 1448, before=2, detail="byte 1462 differs")
    wire = wire_evidence(evidence)
    assert wire == CheckpointEvidence(1460, 2, b"abc", b"abd", 1448, 1448, "byte 1462 differs")
    request = CheckpointRequest(id=7, reason="payload", protocol="tcp", evidence=wire)
    assert json.loads(encode(request))["evidence"] == {
        "offset": 1460,
        "before": 2,
        "primary": "616263",
        "secondary": "616264",
        "primary_length": 1448,
        "secondary_length": 1448,
        "detail": "byte 1462 differs",
    }


def test_evidence_from_the_comparator_always_fits_a_line() -> None:
    """The packet path broadcasts requests: encode must never refuse one."""
    evidence = Evidence(0, b"p" * 4096, b"s" * 4096, 4096, 4096, detail="d" * 100_000)
    request = CheckpointRequest(
        id=1,
        reason="payload",
        protocol="tcp",
        flow="f" * 200,
        evidence=wire_evidence(evidence),
    )
    assert len(encode(request)) < 4096


@pytest.mark.parametrize("offset", [-1, -2_435_536, 0, 1460])
def test_an_evidence_offset_before_the_epoch_base_reaches_the_engine(offset: int) -> None:
    # The SYN sits at stream offset -1, and a resend of bytes released before the last
    # checkpoint is below 0: an engine that refused such a request never checkpointed, and
    # the proxy held the flow (seen in bench/proxy_bench.py, after an overflow checkpoint).
    evidence = Evidence(offset, b"", b"", 1448, 0, detail="primary segment unmatched")
    request = CheckpointRequest(
        id=3, reason="timeout", protocol="tcp", evidence=wire_evidence(evidence)
    )
    decoder = Decoder()
    (decoded,) = decoder.feed(encode(request))
    assert decoded == request


def test_the_proxy_request_goes_out_as_it_was_made() -> None:
    evidence = Evidence(10, b"a", b"b", 100, 100, detail="byte 10 differs")
    made = primary.CheckpointRequest(4, "payload", "tcp", "10.0.0.1:80", evidence, 12.5)
    sent = wire_request(made, 1_700_000_000.25)
    assert sent == CheckpointRequest(
        id=4,
        reason="payload",
        protocol="tcp",
        flow="10.0.0.1:80",
        evidence=wire_evidence(evidence),
        time=1_700_000_000.25,
    )
    restart = primary.CheckpointRequest(1, "restart", "any", None, None, 0.0)
    assert wire_request(restart, 5.0).evidence is None
