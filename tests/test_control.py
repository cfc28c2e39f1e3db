"""The control socket: a real Unix socket, real clients, the exact lines the proxy answers.

Sockets live in a fresh directory under /tmp with mode 0755 rather than in ``tmp_path``:
pytest's base directory is mode 0700, which would stop the unprivileged children of the
credential tests at the directory instead of at the check under test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from coloproxy import variant
from coloproxy.cli import main
from coloproxy.control import (
    ClientInfo,
    ControlClient,
    ControlError,
    ControlRefusedError,
    ControlServer,
    ProxyIdentity,
    Runstate,
)
from coloproxy.control.access import AccessPolicy, PeerCredentials
from coloproxy.control.server import HandlerReply
from coloproxy.errors import UsageError
from coloproxy.protocol import (
    Ack,
    AttachLan,
    CheckpointCompleted,
    CheckpointEvidence,
    CheckpointNow,
    CheckpointRequest,
    CheckpointStarted,
    ClientRole,
    ErrorCode,
    ErrorReply,
    Failover,
    Hello,
    Message,
    Mode,
    ProtocolError,
    Reprotect,
    Request,
    SetPeriod,
    Status,
    StatusRequest,
    Welcome,
    decode_line,
    encode,
)
from coloproxy.role import Role
from engine_double import FakeEngine
from peers import NOBODY, NOGROUP, STAFF_GID, USERS_GID, PeerResult, needs_root, talk_as

WELCOME = Welcome(
    version=1,
    pair="lab",
    role=Role.PRIMARY,
    mode=Mode.PROTECTED,
    software=f"coloproxy 0.1.0, {variant.describe()}",
    idle_timeout=60.0,
    re=1,
)


class RecordingHandler:
    """The daemon's side, reduced to recording what it is told."""

    def __init__(self) -> None:
        self.messages: list[tuple[ClientRole, Request]] = []
        self.connected: list[ClientInfo] = []
        self.disconnected: list[tuple[ClientInfo, str]] = []
        self.reply: HandlerReply | None = None  # answer every message with this
        self.delay = 0.0
        self.fail: Exception | None = None

    def identity(self) -> ProxyIdentity:
        return ProxyIdentity("lab", Role.PRIMARY, Mode.PROTECTED)

    async def handle(self, client: ClientInfo, message: Request) -> HandlerReply:
        self.messages.append((client.role, message))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if self.reply is not None:
            return self.reply
        if isinstance(message, StatusRequest):
            return Status(
                pair="lab",
                role=Role.PRIMARY,
                mode=Mode.PROTECTED,
                epoch=3,
                held_packets=2,
                oldest_held_age=0.5,
                period_ms=20000,
                engines=sum(1 for c in self.connected if c.role is ClientRole.ENGINE),
                clients=len(self.connected),
                counters={"divergences": 4},
            )
        if isinstance(message, CheckpointNow):
            return Ack(request=77)
        return Ack()

    def client_connected(self, client: ClientInfo) -> None:
        self.connected.append(client)

    def client_disconnected(self, client: ClientInfo, reason: str) -> None:
        self.connected.remove(client)
        self.disconnected.append((client, reason))


class RawClient:
    """Lines in and out, nothing checked: for what a well-behaved client would not send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: Message | bytes) -> None:
        self.writer.write(data if isinstance(data, bytes) else encode(data))
        await self.writer.drain()

    async def receive(self, timeout: float = 5.0) -> Message | ProtocolError:
        async with asyncio.timeout(timeout):
            line = await self.reader.readline()
        assert line.endswith(b"\n"), f"connection ended: {line!r}"
        return decode_line(line[:-1])

    async def at_eof(self, timeout: float = 5.0) -> bool:
        async with asyncio.timeout(timeout):
            return await self.reader.read(1) == b""

    async def hello(self, role: ClientRole = ClientRole.CLI) -> None:
        await self.send(Hello(role, id=1))
        assert await self.receive() == WELCOME

    def close(self) -> None:
        self.writer.transport.abort()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cp-ctl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest_asyncio.fixture
async def server(socket_dir: Path, handler: RecordingHandler) -> AsyncIterator[ControlServer]:
    async with ControlServer(socket_dir / "ctl.sock", handler) as running:
        yield running


async def settle(predicate: object, timeout: float = 5.0) -> None:
    """Until ``predicate()`` holds (bounded): for effects that happen on other tasks."""
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.005)


# -- the conversation ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_hello_welcome_and_status(server: ControlServer, handler: RecordingHandler) -> None:
    async with await ControlClient.connect(server.path, ClientRole.MONITOR, name="probe") as c:
        assert c.welcome == WELCOME
        status = await c.request(StatusRequest())
        assert (status.epoch, status.held_packets, status.clients, status.re) == (3, 2, 1, 2)
        (info,) = handler.connected
        assert (info.role, info.name, info.credentials.uid) == (ClientRole.MONITOR, "probe", 0)
        assert info.credentials.pid == os.getpid()
    await settle(lambda: handler.disconnected)
    assert handler.disconnected[0][1] == "it closed the connection"


@pytest.mark.asyncio
async def test_hello_is_required_first_and_the_connection_stays(server: ControlServer) -> None:
    raw = await RawClient.open(server.path)
    await raw.send(StatusRequest(id=5))
    assert await raw.receive() == ErrorReply(ErrorCode.HELLO_REQUIRED, "say hello first", 5)
    await raw.hello()
    await raw.send(StatusRequest(id=7))
    reply = await raw.receive()
    assert isinstance(reply, Status) and reply.re == 7
    raw.close()


@pytest.mark.asyncio
async def test_no_hello_in_time_is_an_error_and_closes(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    async with ControlServer(socket_dir / "s", handler, hello_timeout=0.2) as server:
        raw = await RawClient.open(server.path)
        assert await raw.receive() == ErrorReply(ErrorCode.HELLO_REQUIRED, "no hello within 0.2 s")
        assert await raw.at_eof()
        raw.close()
    assert handler.disconnected == []  # never welcomed: the handler never knew it


@pytest.mark.asyncio
async def test_bad_lines_get_error_replies_and_the_connection_survives(
    server: ControlServer, handler: RecordingHandler
) -> None:
    raw = await RawClient.open(server.path)
    await raw.hello()
    await raw.send(b"garbage\n")
    assert await raw.receive() == ErrorReply(
        ErrorCode.MALFORMED, "not JSON: Expecting value: line 1 column 1 (char 0)"
    )
    await raw.send(b'{"v":1,"kind":"status-request","id":' + b"9" * 70000 + b"}\n")
    assert await raw.receive() == ErrorReply(
        ErrorCode.OVERSIZED, "line longer than 65536 bytes; skipped to the next newline"
    )
    await raw.send(b'{"v":1,"kind":"reboot","id":3}\n')
    assert await raw.receive() == ErrorReply(
        ErrorCode.UNKNOWN_KIND, 'unknown kind the string "reboot"', 3
    )
    await raw.send(b'{"v":1,"kind":"set-period","period_ms":0,"id":4}\n')
    assert await raw.receive() == ErrorReply(
        ErrorCode.INVALID, "set-period: period 0 ms is not 1 to 4294967295", 4
    )
    await raw.send(StatusRequest(id=5))
    reply = await raw.receive()
    assert isinstance(reply, Status) and reply.re == 5
    assert [message for _, message in handler.messages] == [StatusRequest(id=5)]
    raw.close()


@pytest.mark.asyncio
async def test_what_a_role_may_send(server: ControlServer, handler: RecordingHandler) -> None:
    monitor = await RawClient.open(server.path)
    await monitor.hello(ClientRole.MONITOR)
    await monitor.send(CheckpointNow(id=2))
    assert await monitor.receive() == ErrorReply(
        ErrorCode.FORBIDDEN, "a client of role monitor may not send checkpoint", 2
    )
    await monitor.send(Ack(re=1))
    assert await monitor.receive() == ErrorReply(
        ErrorCode.UNEXPECTED, "ack is sent by the proxy, not to it"
    )
    await monitor.send(CheckpointRequest(id=1, reason="payload", protocol="tcp"))
    assert await monitor.receive() == ErrorReply(
        ErrorCode.UNEXPECTED, "checkpoint-request is sent by the proxy, not to it"
    )
    await monitor.send(Hello(ClientRole.ENGINE, id=3))
    assert await monitor.receive() == ErrorReply(ErrorCode.UNEXPECTED, "hello again", 3)

    engine = await RawClient.open(server.path)
    await engine.hello(ClientRole.ENGINE)
    await engine.send(SetPeriod(period_ms=100, id=2))
    assert await engine.receive() == ErrorReply(
        ErrorCode.FORBIDDEN, "a client of role engine may not send set-period", 2
    )
    await engine.send(CheckpointStarted(request=1, time=5.0, id=3))
    assert await engine.receive() == Ack(re=3)
    assert handler.messages == [(ClientRole.ENGINE, CheckpointStarted(request=1, time=5.0, id=3))]
    monitor.close()
    engine.close()


@pytest.mark.asyncio
async def test_no_common_version_is_an_error_and_closes(server: ControlServer) -> None:
    raw = await RawClient.open(server.path)
    await raw.send(Hello(ClientRole.CLI, versions=(2, 3), id=1))
    assert await raw.receive() == ErrorReply(
        ErrorCode.UNSUPPORTED_VERSION, "no common version: client speaks 2, 3, proxy speaks 1", 1
    )
    assert await raw.at_eof()
    raw.close()


# -- several clients, broadcasts and slow readers --------------------------------------------


async def collect(client: ControlClient, into: list[CheckpointRequest | SetPeriod]) -> None:
    async for push in client:
        into.append(push)


@pytest.mark.asyncio
async def test_several_clients_and_broadcasts_reach_engines_only(
    server: ControlServer, handler: RecordingHandler
) -> None:
    clients = [
        await ControlClient.connect(server.path, role)
        for role in (ClientRole.ENGINE, ClientRole.CLI, ClientRole.ENGINE, ClientRole.MONITOR)
    ]
    received: list[list[CheckpointRequest | SetPeriod]] = [[] for _ in clients]
    tasks = [
        asyncio.create_task(collect(c, into)) for c, into in zip(clients, received, strict=True)
    ]
    statuses = await asyncio.gather(*(c.request(StatusRequest()) for c in clients))
    assert all(status.clients == 4 and status.engines == 2 for status in statuses)

    request = CheckpointRequest(id=1, reason="payload", protocol="tcp", time=1.0)
    assert server.broadcast(request) == 2
    assert server.broadcast(SetPeriod(period_ms=500, id=2), to_roles={"engine", "monitor"}) == 3
    assert server.send(handler.connected[1], SetPeriod(period_ms=9, id=3))  # the cli
    await settle(lambda: len(received[0]) == 2 and len(received[2]) == 2 and received[3])
    await settle(lambda: received[1])
    assert received[0] == received[2] == [request, SetPeriod(period_ms=500, id=2)]
    assert received[1] == [SetPeriod(period_ms=9, id=3)]
    assert received[3] == [SetPeriod(period_ms=500, id=2)]
    assert [info.number for info in server.clients()] == [1, 2, 3, 4]
    for c in clients:
        await c.close()
    await asyncio.wait(tasks)


@pytest.mark.asyncio
async def test_a_client_that_stops_reading_is_dropped_and_stalls_nobody(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    """The slow engine says hello and never reads again. Each request is ~2.3 kB, so 1000
    of them overflow its socket buffer, the proxy's transport buffer and its 16-line queue; the
    fast engine must still get every one, in order, and no broadcast may wait."""
    async with ControlServer(socket_dir / "s", handler, client_queue=16) as server:
        # A plain blocking socket that never calls recv(): asyncio's reader would keep
        # pulling lines into its own buffer and hide the stall.
        slow = socket.socket(socket.AF_UNIX)
        slow.connect(os.fspath(server.path))
        slow.sendall(encode(Hello(ClientRole.ENGINE, id=1)))
        await settle(lambda: handler.connected)
        fast = await ControlClient.connect(server.path, ClientRole.ENGINE, name="fast")
        received: list[CheckpointRequest | SetPeriod] = []
        task = asyncio.create_task(collect(fast, received))
        evidence = CheckpointEvidence(0, 0, b"p" * 48, b"s" * 48, 48, 48, "x" * 2000)
        requests = [
            CheckpointRequest(id=n, reason="payload", protocol="tcp", evidence=evidence)
            for n in range(1, 1001)
        ]
        delivered = []
        for start in range(0, len(requests), 8):  # bursts smaller than the queue
            for request in requests[start : start + 8]:
                # Synchronous: it cannot wait for the stalled client.
                delivered.append(server.broadcast(request))
            await settle(lambda start=start: len(received) >= min(start + 8, len(requests)))
        assert received == requests
        assert delivered[0] == 2 and delivered[-1] == 1
        ((dropped, reason),) = handler.disconnected
        assert dropped.number == 1
        assert reason == "its outgoing queue is full (16 lines): it stopped reading"
        assert [info.name for info in server.clients()] == ["fast"]
        slow.close()
        await fast.close()
        await asyncio.wait([task])


@pytest.mark.asyncio
async def test_one_client_too_many_is_busy(socket_dir: Path, handler: RecordingHandler) -> None:
    async with ControlServer(socket_dir / "s", handler, max_clients=3) as server:
        engine = await ControlClient.connect(server.path, ClientRole.ENGINE)
        first = await ControlClient.connect(server.path, ClientRole.CLI)
        second = await ControlClient.connect(server.path, ClientRole.CLI)
        with pytest.raises(ControlRefusedError, match=r"refused \(busy\): 3 clients are"):
            await ControlClient.connect(server.path, ClientRole.CLI)
        await first.close()
        await settle(lambda: len(server.clients()) == 2)
        third = await ControlClient.connect(server.path, ClientRole.CLI)
        for client in (engine, second, third):
            await client.close()


@pytest.mark.asyncio
async def test_the_last_slot_is_kept_for_an_engine(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    """Idle CLIs and monitors can never take every slot: an engine that (re)connects gets in."""
    async with ControlServer(socket_dir / "s", handler, max_clients=3) as server:
        others = [await ControlClient.connect(server.path, ClientRole.CLI) for _ in range(2)]
        with pytest.raises(ControlRefusedError) as refused:
            await ControlClient.connect(server.path, ClientRole.MONITOR)
        assert refused.value.reply == ErrorReply(
            ErrorCode.BUSY, "the last of 3 slots is kept for an engine", 1
        )
        engine = await ControlClient.connect(server.path, ClientRole.ENGINE)
        assert engine.welcome is not None
        with pytest.raises(ControlRefusedError, match=r"refused \(busy\): 3 clients are"):
            await ControlClient.connect(server.path, ClientRole.ENGINE)
        assert server.refusals["hello", "busy"] == 1
        for client in [*others, engine]:
            await client.close()


@pytest.mark.asyncio
async def test_idle_clients_are_closed_and_a_keepalive_keeps_an_engine(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    async with ControlServer(socket_dir / "s", handler, idle_timeout=1.0) as server:
        engine = await ControlClient.connect(server.path, ClientRole.ENGINE)
        assert engine.welcome is not None and engine.welcome.idle_timeout == 1.0
        for _ in range(2):  # two idle periods after another, the engine quiet but alive
            idle = await RawClient.open(server.path)
            await idle.send(Hello(ClientRole.MONITOR, id=1))
            welcome = await idle.receive()
            assert isinstance(welcome, Welcome) and welcome.idle_timeout == 1.0
            assert await idle.receive() == ErrorReply(
                ErrorCode.BUSY,
                "nothing received for 1 s: closed to free the slot (an empty line keeps a"
                " connection open)",
            )
            assert await idle.at_eof()
            idle.close()
        assert engine.closed_reason is None
        status = await engine.request(StatusRequest())
        assert status.re is not None
        reasons = [
            reason for info, reason in handler.disconnected if info.role is ClientRole.MONITOR
        ]
        assert reasons == ["idle for 1 s"] * 2
        await engine.close()


@pytest.mark.asyncio
async def test_pipelined_requests_are_all_answered_in_order_without_a_disconnect(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    """Far more requests in one write than the client's queue holds: each gets its reply."""
    async with ControlServer(socket_dir / "s", handler, client_queue=16) as server:
        raw = await RawClient.open(server.path)
        await raw.hello(ClientRole.MONITOR)
        await raw.send(b"".join(encode(StatusRequest(id=n)) for n in range(2, 1002)))
        for n in range(2, 1002):
            reply = await raw.receive()
            assert isinstance(reply, Status) and reply.re == n
        await raw.send(CheckpointNow(id=1002))
        assert await raw.receive() == ErrorReply(
            ErrorCode.FORBIDDEN, "a client of role monitor may not send checkpoint", 1002
        )
        assert handler.disconnected == []
        raw.close()


# -- the handler -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_failing_handler_is_an_internal_error_and_the_connection_stays(
    server: ControlServer, handler: RecordingHandler
) -> None:
    async with await ControlClient.connect(server.path, ClientRole.CLI) as client:
        handler.fail = RuntimeError("the QMP socket is gone")
        with pytest.raises(ControlRefusedError) as refused:
            await client.request(Failover(role=Role.PRIMARY))
        assert refused.value.reply == ErrorReply(
            ErrorCode.INTERNAL, "RuntimeError: the QMP socket is gone", 2
        )
        handler.fail = None
        assert await client.request(Failover(role=Role.PRIMARY)) == Ack(re=3)


@pytest.mark.asyncio
async def test_a_slow_handler_is_bounded(socket_dir: Path, handler: RecordingHandler) -> None:
    async with (
        ControlServer(socket_dir / "s", handler, handler_timeout=0.1) as server,
        await ControlClient.connect(server.path, ClientRole.CLI) as client,
    ):
        handler.delay = 1.0
        with pytest.raises(ControlRefusedError, match=r"\(internal\): no answer within 0.1 s"):
            await client.request(CheckpointNow())


@pytest.mark.asyncio
async def test_the_handler_refusal_reaches_the_client(
    server: ControlServer, handler: RecordingHandler
) -> None:
    handler.reply = ErrorReply(ErrorCode.UNAVAILABLE, "no engine is connected")
    async with await ControlClient.connect(server.path, ClientRole.CLI) as client:
        with pytest.raises(ControlRefusedError) as refused:
            await client.request(CheckpointNow())
        assert str(refused.value) == "checkpoint: refused (unavailable): no engine is connected"
        assert refused.value.reply.re == 2


@pytest.mark.asyncio
async def test_the_fake_engine_completes_each_request(
    server: ControlServer, handler: RecordingHandler
) -> None:
    async with FakeEngine(server.path, delay=0.01) as engine:
        await settle(lambda: handler.connected)
        for number in (1, 2):
            server.broadcast(CheckpointRequest(id=number, reason="timeout", protocol="udp"))
            await engine.wait_for(number)
        assert engine.count == 2
        kinds = [(type(m).__name__, getattr(m, "request", None)) for _, m in handler.messages]
        assert kinds == [
            ("CheckpointStarted", 1),
            ("CheckpointCompleted", 1),
            ("CheckpointStarted", 2),
            ("CheckpointCompleted", 2),
        ]
        completed = handler.messages[1][1]
        assert isinstance(completed, CheckpointCompleted)
        assert completed.completed - completed.started >= 0.009


@pytest.mark.asyncio
async def test_the_fake_engine_holds_a_request_open_until_the_test_completes_it(
    server: ControlServer, handler: RecordingHandler
) -> None:
    async with FakeEngine(server.path, hold=True) as engine:
        await settle(lambda: handler.connected)
        server.broadcast(CheckpointRequest(id=7, reason="payload", protocol="tcp"))
        await engine.wait_for_requests(1)
        assert [r.id for r in engine.pending] == [7] and handler.messages == []
        assert (await engine.start()).id == 7
        assert [type(m).__name__ for _, m in handler.messages] == ["CheckpointStarted"]
        assert (await engine.complete()).id == 7  # started was sent already: not again
        server.broadcast(CheckpointRequest(id=8, reason="timeout", protocol="udp"))
        await engine.wait_for_requests(2)
        await engine.release()  # completes 8, started first
        await engine.wait_for(2)
        kinds = [(type(m).__name__, getattr(m, "request", None)) for _, m in handler.messages]
        assert kinds == [
            ("CheckpointStarted", 7),
            ("CheckpointCompleted", 7),
            ("CheckpointStarted", 8),
            ("CheckpointCompleted", 8),
        ]
        assert engine.pending == [] and not engine.hold


# -- the socket file -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_socket_is_0660_and_in_the_group(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    async with ControlServer(socket_dir / "run" / "s", handler, group="users") as server:
        info = os.stat(server.path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert (info.st_uid, info.st_gid) == (0, USERS_GID)
        assert stat.S_IMODE(os.stat(socket_dir / "run").st_mode) == 0o755


@pytest.mark.asyncio
async def test_a_stale_socket_is_removed(socket_dir: Path, handler: RecordingHandler) -> None:
    path = socket_dir / "s"
    with socket.socket(socket.AF_UNIX) as crashed:  # bound, then gone without unlink
        crashed.bind(os.fspath(path))
    assert path.exists()
    async with (
        ControlServer(path, handler) as server,
        await ControlClient.connect(server.path, ClientRole.CLI),
    ):
        pass
    assert not path.exists()


@pytest.mark.asyncio
async def test_a_live_socket_and_a_regular_file_are_left_alone(
    server: ControlServer, handler: RecordingHandler, socket_dir: Path
) -> None:
    with pytest.raises(ControlError, match="another process is listening on"):
        await ControlServer(server.path, handler).start()
    async with await ControlClient.connect(server.path, ClientRole.CLI):
        pass  # the first server still serves
    regular = socket_dir / "file"
    regular.write_text("keep me")
    with pytest.raises(ControlError, match="exists and is not a socket; not removing it"):
        await ControlServer(regular, handler).start()
    assert regular.read_text() == "keep me"


@pytest.mark.asyncio
async def test_bad_paths_and_groups(socket_dir: Path, handler: RecordingHandler) -> None:
    with pytest.raises(ControlError, match="at most 107 fit in a Unix socket address"):
        await ControlServer(socket_dir / ("x" * 120), handler).start()
    with pytest.raises(ControlError, match="control group 'no-such-group' does not exist"):
        await ControlServer(socket_dir / "s", handler, group="no-such-group").start()


@pytest.mark.asyncio
async def test_close_ends_clients_and_removes_the_socket(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    server = ControlServer(socket_dir / "s", handler)
    await server.start()
    assert server.runstate is Runstate.RUNNING
    engine = await ControlClient.connect(server.path, ClientRole.ENGINE)
    received: list[CheckpointRequest | SetPeriod] = []
    task = asyncio.create_task(collect(engine, received))
    await settle(lambda: handler.connected)
    await server.close()
    assert server.runstate is Runstate.CLOSED
    assert not server.path.exists()
    async with asyncio.timeout(5):
        await task  # the iteration ended
    assert engine.closed_reason == "the proxy closed the connection"
    assert handler.disconnected[0][1] == "the proxy is shutting down"
    await server.close()  # idempotent


# -- peer credentials ------------------------------------------------------------------------


def test_credentials_decide_the_roles() -> None:
    """Who may claim which role: from SO_PEERCRED/SO_PEERGROUPS, never from the hello."""
    everything = frozenset(ClientRole)
    operator = frozenset({ClientRole.CLI, ClientRole.MONITOR})
    policy = AccessPolicy(own_uid=1000, group=100, engine_group=50)
    assert policy.roles(PeerCredentials(1, 0, 0, ())) == everything  # root
    assert policy.roles(PeerCredentials(1, 1000, 1000, ())) == everything  # the proxy's user
    assert policy.roles(PeerCredentials(1, 2000, 2000, (50,))) == everything  # engine group
    assert policy.roles(PeerCredentials(1, 2000, 50, ())) == everything  # ... as primary group
    assert policy.roles(PeerCredentials(1, 2000, 2000, (100,))) == operator  # control.group
    assert policy.roles(PeerCredentials(1, 2000, 100, ())) == operator
    assert policy.roles(PeerCredentials(1, 2000, 2000, (7, 8))) == frozenset()
    read_only = AccessPolicy(own_uid=1000, group=100, group_role=ClientRole.MONITOR)
    assert read_only.roles(PeerCredentials(1, 2000, 2000, (100,))) == {ClientRole.MONITOR}
    assert read_only.roles(PeerCredentials(1, 2000, 2000, (50,))) == frozenset()
    with pytest.raises(UsageError, match=r"control\.group_role is cli or monitor"):
        AccessPolicy(own_uid=0, group_role=ClientRole.ENGINE)


@needs_root
@pytest.mark.asyncio
async def test_root_is_accepted(server: ControlServer) -> None:
    result = await talk_as(server.path, 0, 0, [], [Hello(ClientRole.ENGINE, id=1)])
    assert result == PeerResult([WELCOME], closed=False)


@needs_root
@pytest.mark.asyncio
async def test_the_file_mode_stops_others(server: ControlServer) -> None:
    result = await talk_as(server.path, NOBODY, NOGROUP, [], [Hello(ClientRole.MONITOR, id=1)])
    assert result.errno == 13  # EACCES


@needs_root
@pytest.mark.asyncio
async def test_others_are_refused_even_with_a_loosened_mode(server: ControlServer) -> None:
    os.chmod(server.path, 0o666)  # an operator's mistake: the credential check still holds
    result = await talk_as(server.path, NOBODY, NOGROUP, [], [Hello(ClientRole.MONITOR, id=1)])
    assert result == PeerResult(
        [
            ErrorReply(
                ErrorCode.FORBIDDEN,
                "not allowed: uid 65534 is not root and in no control group",
            )
        ],
        closed=True,
    )
    assert server.refusals["connect", "forbidden"] == 1


@needs_root
@pytest.mark.asyncio
async def test_members_of_the_group_are_accepted(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    async with ControlServer(socket_dir / "s", handler, group="users") as server:
        hello = [Hello(ClientRole.MONITOR, id=1)]
        # a supplementary group (SO_PEERGROUPS), then the primary group
        for gid, groups in ((NOGROUP, [USERS_GID]), (USERS_GID, [])):
            result = await talk_as(server.path, NOBODY, gid, groups, hello)
            assert result == PeerResult([WELCOME], closed=False)
        os.chmod(server.path, 0o666)
        assert await talk_as(server.path, NOBODY, NOGROUP, [], hello) == PeerResult(
            [
                ErrorReply(
                    ErrorCode.FORBIDDEN,
                    "not allowed: uid 65534 is not root and in no control group",
                )
            ],
            closed=True,
        )


@needs_root
@pytest.mark.asyncio
async def test_a_group_member_cannot_claim_the_engine_role(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    """The attack: a member of control.group says hello as an engine and reports a
    checkpoint that never happened. The hello is refused; the handler hears nothing."""
    async with ControlServer(socket_dir / "s", handler, group="users") as server:
        result = await talk_as(
            server.path,
            NOBODY,
            NOGROUP,
            [USERS_GID],
            [Hello(ClientRole.ENGINE, id=1), CheckpointCompleted(request=987654, id=2)],
            replies=1,
        )
        assert result == PeerResult(
            [
                ErrorReply(
                    ErrorCode.FORBIDDEN,
                    "uid 65534 may not claim role engine: it is for root, the proxy's own user"
                    " (uid 0) and members of control.engine_group (none is configured); this"
                    " peer may be cli or monitor",
                    1,
                )
            ],
            closed=True,
        )
        assert handler.messages == [] and handler.connected == []
        assert server.refusals["hello", "forbidden"] == 1


@needs_root
@pytest.mark.asyncio
async def test_a_group_member_cannot_lift_protection_or_steer_the_engine(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    async with ControlServer(socket_dir / "s", handler, group="users") as server:
        result = await talk_as(
            server.path,
            NOBODY,
            NOGROUP,
            [USERS_GID],
            [
                Hello(ClientRole.CLI, id=1),
                Failover(Role.PRIMARY, Mode.UNPROTECTED, id=2),
                SetPeriod(period_ms=1, id=3),
                AttachLan(id=4),
                Reprotect(migrate_uri="tcp:10.0.0.1:1", id=5),
                CheckpointNow(id=6),
                StatusRequest(id=7),
            ],
        )
        welcome, *replies, ack, status = result.replies
        assert welcome == WELCOME and not result.closed
        assert replies == [
            ErrorReply(
                ErrorCode.FORBIDDEN,
                f"{kind} needs engine credentials (root, the proxy's own user or a member of"
                " control.engine_group); uid 65534 has none",
                number,
            )
            for number, kind in enumerate(("failover", "set-period", "attach-lan", "reprotect"), 2)
        ]
        assert ack == Ack(request=77, re=6)
        assert isinstance(status, Status) and status.re == 7
        assert [message.kind for _, message in handler.messages] == ["checkpoint", "status-request"]
        assert server.refusals["failover", "forbidden"] == 1


@needs_root
@pytest.mark.asyncio
async def test_members_of_the_engine_group_may_be_the_engine(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    async with ControlServer(
        socket_dir / "s", handler, group="users", engine_group="staff"
    ) as server:
        result = await talk_as(
            server.path,
            NOBODY,
            NOGROUP,
            [USERS_GID, STAFF_GID],
            [
                Hello(ClientRole.ENGINE, id=1),
                CheckpointStarted(request=None, id=2),
                Failover(Role.PRIMARY, id=3),
            ],
        )
        assert result == PeerResult([WELCOME, Ack(re=2), Ack(re=3)], closed=False)


@needs_root
@pytest.mark.asyncio
async def test_a_read_only_group_may_only_monitor(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    async with ControlServer(
        socket_dir / "s", handler, group="users", group_role=ClientRole.MONITOR
    ) as server:
        result = await talk_as(
            server.path, NOBODY, NOGROUP, [USERS_GID], [Hello(ClientRole.CLI, id=1)]
        )
        assert result == PeerResult(
            [
                ErrorReply(
                    ErrorCode.FORBIDDEN,
                    "uid 65534 may not claim role cli: it is for root, the proxy's own user"
                    " (uid 0), members of control.engine_group (none is configured) and of"
                    f" control.group ({USERS_GID}) when control.group_role is cli; this peer"
                    " may be monitor",
                    1,
                )
            ],
            closed=True,
        )
        monitor = await talk_as(
            server.path, NOBODY, NOGROUP, [USERS_GID], [Hello(ClientRole.MONITOR, id=1)]
        )
        assert monitor == PeerResult([WELCOME], closed=False)


@needs_root
@pytest.mark.asyncio
async def test_a_non_engine_peer_cannot_take_the_last_slot_even_before_its_hello(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    async with ControlServer(socket_dir / "s", handler, group="users", max_clients=2) as server:
        first = await ControlClient.connect(server.path, ClientRole.CLI)
        result = await talk_as(
            server.path, NOBODY, NOGROUP, [USERS_GID], [Hello(ClientRole.CLI, id=1)]
        )
        assert result == PeerResult(
            [ErrorReply(ErrorCode.BUSY, "the last of 2 slots is kept for an engine")],
            closed=True,
        )
        await first.close()


# -- the command line ------------------------------------------------------------------------


async def run_cli(*argv: str) -> int:
    """``coloproxy ARGV`` in a thread (it runs its own event loop) while the server serves."""
    return await asyncio.to_thread(main, list(argv))


@pytest.mark.asyncio
async def test_cli_status(server: ControlServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("status", "--socket", os.fspath(server.path)) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"pair lab: primary, protected (coloproxy 0.1.0, {variant.describe()}, protocol v1)"
    )
    assert ("comparator: compiled" in out) is (variant.variant() == "compiled")
    assert "held packets         2 (oldest 0.500 s)" in out
    assert "divergences          4" in out
    assert await run_cli("status", "--socket", os.fspath(server.path), "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["kind"], status["pair"], status["held_packets"]) == ("status", "lab", 2)


@pytest.mark.asyncio
async def test_cli_checkpoint(
    server: ControlServer, handler: RecordingHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.fspath(server.path)
    assert await run_cli("checkpoint", "--socket", path, "--reason", "maintenance") == 0
    assert capsys.readouterr().out == "checkpoint requested: request 77\n"
    assert handler.messages[-1] == (ClientRole.CLI, CheckpointNow(reason="maintenance", id=2))
    handler.reply = ErrorReply(ErrorCode.UNAVAILABLE, "no engine is connected")
    assert await run_cli("checkpoint", "--socket", path) == 2
    assert capsys.readouterr().err == (
        "checkpoint: the proxy refused (unavailable): no engine is connected\n"
    )


@pytest.mark.asyncio
async def test_cli_without_a_proxy(socket_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = os.fspath(socket_dir / "none.sock")
    assert await run_cli("status", "--socket", missing) == 2
    assert capsys.readouterr().err == (
        f"status: cannot connect to {missing}: No such file or directory\n"
    )


@pytest.mark.asyncio
async def test_cli_takes_the_socket_from_the_config(
    server: ControlServer, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = socket_dir / "pair.yaml"
    config.write_text(
        "pair: {name: lab, role: primary}\n"
        "net:\n"
        "  guest_port: hp-guest\n"
        "  replication: {local: 10.77.0.1, remote: 10.77.0.2}\n"
        f"control: {{socket: {server.path}}}\n"
    )
    assert await run_cli("status", "-c", os.fspath(config), "--json") == 0
    assert json.loads(capsys.readouterr().out)["pair"] == "lab"
