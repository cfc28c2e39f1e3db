"""The engine runner without QEMU: QMP doubles that behave like COLO's two monitors, the
real control socket, real UDP heartbeats on loopback, and a real secondary ``Daemon`` running
its engine from the config file. Fast; tests/test_engine_qemu.py does the same against real
QEMUs. Each test runs in a network namespace of its own (root): the secondary daemon binds
its NFQUEUEs (12, 13) and both engines their heartbeat ports there, so concurrent runs never
meet ("already bound").

The double speaks QMP (greeting, ``qmp_capabilities``, ``execute``/``return``/``error``, events
with timestamps). ``migrate`` moves both doubles into COLO with the primary's STOP/RESUME;
``migrate-set-parameters`` in COLO makes a checkpoint: STOP, then RESUME ``pause`` later, on
both monitors; ``x-colo-lost-heartbeat`` leaves COLO (COLO_EXIT, then STOP/RESUME as 7.2
does); :meth:`QmpDouble.die` closes the monitor as an exiting QEMU does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from coloproxy.config import parse_config
from coloproxy.control import ControlClient
from coloproxy.control.errors import ControlRefusedError
from coloproxy.control.server import ControlServer
from coloproxy.daemon.run import Daemon
from coloproxy.engine import runner as runner_module
from coloproxy.engine.decider import Watch
from coloproxy.engine.disk import DiskSettings
from coloproxy.engine.peer import HeartbeatPath
from coloproxy.engine.quorum import Grant, Outcome, QuorumError
from coloproxy.engine.runner import EngineRunner
from coloproxy.engine.settings import EngineSettings
from coloproxy.protocol import (
    CheckpointRequest,
    ClientRole,
    Mode,
    Reprotect,
    SetPeriod,
    StatusRequest,
)
from coloproxy.role import Role
from netfixtures import own_netns
from test_engine_qemu import ProxyDouble, free_udp_port

PAUSE = 0.003
LOOPBACK = (ip_address("127.0.0.1"), ip_address("127.0.0.2"))


@pytest.fixture(autouse=True)
def netns_of_its_own() -> Iterator[None]:
    with own_netns():
        yield


@dataclass
class QmpDouble:
    name: str
    path: Path
    mode: str = "none"  # COLO mode
    last_mode: str | None = None
    status: str = "running"
    peer: QmpDouble | None = None  # the other monitor (checkpoints show on both)
    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    server: asyncio.Server | None = None
    lost_heartbeat_fails: bool = False
    disk: bool = False  # a guest disk: the block replication commands answer as QEMU's
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    replication_node: bool = False  # the primary's replication node exists (drive_add)
    replication_child: bool = False  # and is in the quorum (x-blockdev-change)
    log: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # global order

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def die(self) -> None:
        """QEMU exits: the monitor socket closes."""
        await self.close()
        self.writers.clear()

    def _send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message).encode() + b"\r\n"
        for writer in self.writers:
            if not writer.is_closing():
                writer.write(line)

    def event(self, name: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()
        message: dict[str, Any] = {
            "event": name,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
        }
        if data is not None:
            message["data"] = data
        self._send(message)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(
            json.dumps(
                {
                    "QMP": {
                        "version": {
                            "qemu": {"major": 7, "minor": 2, "micro": 0},
                            "package": "double",
                        },
                        "capabilities": [],
                    }
                }
            ).encode()
            + b"\r\n"
        )
        decoder = json.JSONDecoder()
        buffer = ""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                buffer += data.decode()
                while buffer.strip():  # QMP is a stream of JSON objects, no framing
                    try:
                        message, end = decoder.raw_decode(buffer.lstrip())
                    except json.JSONDecodeError:
                        break
                    buffer = buffer.lstrip()[end:]
                    command = message["execute"]
                    arguments = message.get("arguments") or {}
                    self.commands.append((command, arguments))
                    self.log.append((next(_ORDER), command, arguments))
                    reply = await self._execute(command, arguments)
                    if "id" in message:
                        reply["id"] = message["id"]
                    if not writer.is_closing():
                        writer.write(json.dumps(reply).encode() + b"\r\n")

    async def _execute(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if command == "query-colo-status":
            reply = {"mode": self.mode, "reason": "none"}
            if self.last_mode is not None:
                reply["last-mode"] = self.last_mode
            return {"return": reply}
        if command == "query-status":
            return {"return": {"status": self.status, "running": self.status == "running"}}
        if command == "query-version":
            return {"return": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}}
        if command == "query-migrate":
            status = "colo" if self.mode != "none" else "active"
            return {"return": {"status": status, "ram": {"transferred": 1 << 20, "total": 1}}}
        if command == "migrate":
            loop.call_later(0.01, self._enter_colo)
            return {"return": {}}
        if command == "stop":
            self.status = "paused"
            self.event("STOP")
            return {"return": {}}
        if self.disk:
            reply = self._disk(command, arguments)
            if reply is not None:
                return reply
        if command == "migrate-set-parameters":
            if self.mode == "primary":
                loop.call_soon(self._checkpoint)
            return {"return": {}}
        if command == "x-colo-lost-heartbeat":
            if self.lost_heartbeat_fails or self.mode == "none":
                return {"error": {"class": "GenericError", "desc": "COLO is disabled"}}
            self.last_mode, self.mode = self.mode, "none"
            self.event("COLO_EXIT", {"mode": self.last_mode, "reason": "error"})
            self.event("STOP")
            self.event("RESUME")
            return {"return": {}}
        return {"return": {}}  # capabilities, announce-self, ...

    def _disk(self, command: str, arguments: dict[str, Any]) -> dict[str, Any] | None:
        """The block replication commands of engine/disk.py, answered as QEMU 7.2 does."""
        if command == "query-block":
            devices = [{"device": "colo-disk0", "inserted": {"drv": "quorum"}}]
            if self.name == "secondary":
                devices.append({"device": "parent0", "inserted": {"drv": "raw"}})
            return {"return": devices}
        if command == "drive-mirror":
            job = {"device": arguments["job-id"], "ready": True, "len": 1 << 26, "offset": 1 << 26}
            self.jobs[arguments["job-id"]] = job
            return {"return": {}}
        if command == "query-block-jobs":
            return {"return": list(self.jobs.values())}
        if command == "block-job-cancel":
            self.jobs.pop(arguments["device"], None)
            return {"return": {}}
        if command == "human-monitor-command":
            line = arguments["command-line"]
            if line.startswith("drive_del") and self.replication_child:
                return {"return": "Node replication0 is in use\r\n"}
            if line.startswith("drive_add") and self.replication_node:
                return {"return": "Duplicate nodes with node-name='replication0'\r\n"}
            self.replication_node = line.startswith("drive_add")
            return {"return": ""}
        if command == "x-blockdev-change":
            self.replication_child = "node" in arguments
            return {"return": {}}
        if command == "query-named-block-nodes":
            return {"return": [{"node-name": "replication0"}] if self.replication_node else []}
        if command == "x-debug-query-block-graph":
            nodes = [{"id": 1, "name": "colo-disk0"}, {"id": 2, "name": "replication0"}]
            edges = [{"parent": 1, "child": 2, "name": "children.1"}]
            return {"return": {"nodes": nodes, "edges": edges}}
        return None

    def _enter_colo(self) -> None:
        secondary = self.peer
        assert secondary is not None
        if self.status == "running":  # a guest stopped already (the disk's attach) stays so
            self.event("STOP")
        self.status = "running"
        self.mode = "primary"
        secondary.mode, secondary.status = "secondary", "running"
        asyncio.get_running_loop().call_later(PAUSE, self.event, "RESUME")
        secondary.event("RESUME")

    def _checkpoint(self) -> None:
        loop = asyncio.get_running_loop()
        for monitor in (self, self.peer):
            if monitor is not None and monitor.mode != "none":
                monitor.event("STOP")
                loop.call_later(PAUSE, monitor.event, "RESUME")


_ORDER = itertools.count()

SECONDARY_CONFIG = """\
pair: {{name: engine-test, role: secondary}}
net:
  guest_port: guest0
  replication: {{local: 127.0.0.2, remote: 127.0.0.1}}
control: {{socket: {socket}}}
metrics: {{enabled: false}}
engine:
  qmp: {qmp}
  heartbeat_port: {port}
  heartbeat_interval_ms: 20
  failover_timeout_ms: 1000
  failover_object_del: [f2, f1]
  heartbeat_key: {key}
"""
KEY = b"engine-test-heartbeat-key-0123456789"
DISK_SECTION = """\
disk:
  image: {tmp}/s.img
  active: {tmp}/sa.qcow2
  hidden: {tmp}/sh.qcow2
  nbd_port: 1
"""


class FakeEtcd:
    """The leader key as etcd keeps it, in memory, on the loop's clock: leases that expire,
    transactions by revision. ``store(name)`` is one daemon's LeaderStore."""

    def __init__(self) -> None:
        self.leases: dict[int, float] = {}  # lease -> expiry (loop time)
        self.key: tuple[str, int, int] | None = None  # holder, lease, mod revision
        self.alone = False
        self.revision = 1
        self.reachable: dict[str, bool] = {}

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _expire(self) -> None:
        now = self._now()
        for lease, until in list(self.leases.items()):
            if until <= now:
                del self.leases[lease]
                if self.key is not None and self.key[1] == lease:
                    self.key = None

    def store(self, name: str) -> FakeStore:
        self.reachable[name] = True
        return FakeStore(self, name)


class FakeStore:
    def __init__(self, etcd: FakeEtcd, name: str) -> None:
        self.etcd, self.name = etcd, name

    def _reach(self) -> FakeEtcd:
        if not self.etcd.reachable[self.name]:
            raise QuorumError(f"{self.name}: cut off")
        self.etcd._expire()
        return self.etcd

    async def acquire(self, ttl: float, holder: str, unless_alone: bool) -> Outcome:
        etcd = self._reach()
        if etcd.key is not None or (unless_alone and etcd.alone):
            return Outcome(None, alone=unless_alone and etcd.alone)
        etcd.revision += 1
        lease = etcd.revision * 10
        etcd.leases[lease] = etcd._now() + ttl
        etcd.key = (self.name, lease, etcd.revision)
        return Outcome(Grant(lease, ttl, etcd.revision))

    async def renew(self, lease: int) -> float:
        etcd = self._reach()
        if lease not in etcd.leases:
            return 0.0
        etcd.leases[lease] = etcd._now() + 1.0
        return 1.0

    async def release(self, lease: int, revision: int) -> None:
        etcd = self._reach()
        if etcd.key is not None and etcd.key[2] == revision:
            etcd.key = None
        etcd.leases.pop(lease, None)

    async def mark(self, alone: bool, revision: int) -> bool:
        etcd = self._reach()
        if etcd.key is None or etcd.key[2] != revision:
            return False
        etcd.alone = alone
        return True

    async def close(self) -> None:
        pass


@dataclass
class World:
    primary_qemu: QmpDouble
    secondary_qemu: QmpDouble
    primary: EngineRunner
    proxy: ProxyDouble
    daemon: Daemon
    secondary_socket: Path
    primary_task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def world(
    tmp: Path, quorum: FakeEtcd | None = None, disk: bool = False
) -> AsyncIterator[World]:
    port = free_udp_port()
    primary_qemu = QmpDouble("primary", tmp / "p.qmp", disk=disk)
    secondary_qemu = QmpDouble("secondary", tmp / "s.qmp", status="inmigrate", disk=disk)
    primary_qemu.peer = secondary_qemu
    await primary_qemu.start()
    await secondary_qemu.start()
    proxy = ProxyDouble(Role.PRIMARY)
    server = ControlServer(tmp / "p.sock", proxy)
    proxy.server = server
    proxy.outstanding = CheckpointRequest(id=1, reason="restart", protocol="any", time=time.time())
    proxy.next_id = 2
    await server.start()
    key = tmp / "hb.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    text = SECONDARY_CONFIG.format(socket=tmp / "s.sock", qmp=tmp / "s.qmp", port=port, key=key)
    if quorum is not None:
        text += "  quorum: {service: etcd, endpoints: ['127.0.0.1:1']}\n"
    if disk:
        text += DISK_SECTION.format(tmp=tmp)
    config = parse_config(text)
    daemon = Daemon(config, setup_net=False)
    daemon_task = asyncio.create_task(daemon.run())
    primary = EngineRunner(
        EngineSettings(
            pair="engine-test",
            role=Role.PRIMARY,
            qmp=str(tmp / "p.qmp"),
            control_socket=tmp / "p.sock",
            heartbeat_paths=(
                HeartbeatPath(
                    "replication", ip_address("127.0.0.1"), ip_address("127.0.0.2"), port
                ),
            ),
            heartbeat_key=KEY,
            migrate_uri="tcp:127.0.0.2:1",
            period_ms=60000,
            min_gap_ms=0,
            heartbeat_interval_ms=20,
            failover_timeout_ms=1000,
            quorum=None if quorum is None else EngineSettings.from_config(config).quorum,  # type: ignore[union-attr]
            disk=None
            if not disk
            else DiskSettings(
                image=str(tmp / "p.img"),
                active=str(tmp / "pa.qcow2"),
                hidden=str(tmp / "ph.qcow2"),
                format="raw",
                local="127.0.0.1",
                remote="127.0.0.2",
                nbd_port=1,
            ),
        ),
        store=None if quorum is None else quorum.store("primary"),
    )
    primary_task = asyncio.create_task(primary.run())
    try:
        yield World(
            primary_qemu, secondary_qemu, primary, proxy, daemon, tmp / "s.sock", primary_task
        )
    finally:
        primary_task.cancel()
        await asyncio.wait([primary_task])
        daemon.stop()
        await asyncio.wait_for(daemon_task, 10)
        await server.close()
        await primary_qemu.close()
        await secondary_qemu.close()


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Until ``condition()`` holds (bounded): for conditions on clocks, not on messages."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"no {what} within {timeout:.0f} s")


async def holds(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """``condition()`` holds all along the next ``seconds`` (watched, failing at once)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        assert condition(), f"{what}: no longer true"
        await asyncio.sleep(0.01)
    assert condition(), f"{what}: no longer true"


async def in_colo(w: World) -> None:
    await w.proxy.wait(lambda: w.proxy.completed_for(1) is not None, 5, "the restart request")
    engine = w.daemon.state.engine
    assert engine is not None

    def watching() -> bool:
        return all(
            e.decider is not None and e.decider.state is Watch.WATCHING for e in (w.primary, engine)
        )

    await engine.wait_until(watching, 5)


@pytest.mark.asyncio
async def test_bring_up_requests_and_takeover_through_the_secondary_daemon(
    tmp_path: Path,
) -> None:
    async with asyncio.timeout(30), world(tmp_path) as w:
        await in_colo(w)
        # Bring-up: x-colo on, the backstop delay, migrate; the entry served the restart.
        commands = [c for c, _ in w.primary_qemu.commands]
        assert commands.index("migrate-set-capabilities") < commands.index("migrate")
        assert ("migrate-set-parameters", {"x-checkpoint-delay": 121000}) in (
            w.primary_qemu.commands
        )
        assert w.proxy.started[0][1].request == 1
        assert w.primary.figures.checkpoints["colo-entry"] == 1
        # A request: one trigger, started and completed naming it.
        request = w.proxy.request()
        await w.proxy.wait(lambda: w.proxy.completed_for(request) is not None, 5, "request")
        assert [m.request for _, m in w.proxy.started] == [1, request]
        assert w.primary.figures.checkpoints["payload"] == 1
        # The secondary daemon's engine and its status.
        engine = w.daemon.state.engine
        assert engine is not None
        async with await ControlClient.connect(w.secondary_socket, ClientRole.MONITOR) as cli:
            status = await cli.request(StatusRequest())
            assert (status.role, status.mode) == (Role.SECONDARY, Mode.PROTECTED)
            assert status.engines == 1
        async with await ControlClient.connect(w.secondary_socket, ClientRole.CLI) as cli:
            with pytest.raises(ControlRefusedError, match="protected already"):
                await cli.request(Reprotect(migrate_uri="tcp:127.0.0.1:1"))
        # The primary QEMU exits: the secondary daemon takes over.
        await w.primary_qemu.die()
        await engine.wait_until(lambda: "done" in engine.figures.last_failover, 5)
        assert engine.figures.failovers["primary-lost"] == 1
        acted = [(c, a) for c, a in w.secondary_qemu.commands if not c.startswith("query-")]
        assert acted[-4:] == [
            ("x-colo-lost-heartbeat", {}),
            ("object-del", {"id": "f2"}),  # engine.failover_object_del, in order
            ("object-del", {"id": "f1"}),
            ("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100}),
        ]
        assert (w.daemon.state.role, w.daemon.state.mode) == (Role.PRIMARY, Mode.UNPROTECTED)
        assert w.daemon.metrics.engine is engine.figures


@pytest.mark.asyncio
async def test_set_period_and_the_primary_going_unprotected(tmp_path: Path) -> None:
    async with asyncio.timeout(30), world(tmp_path) as w:
        await in_colo(w)
        assert w.proxy.server is not None
        w.proxy.server.broadcast(SetPeriod(period_ms=50))
        await w.proxy.wait(
            lambda: sum(1 for _, m in w.proxy.completed if m.request is None) >= 3,
            5,
            "periodic checkpoints",
        )
        assert w.primary.figures.checkpoints["periodic"] >= 3
        # The secondary QEMU exits: its daemon says so; the primary leaves COLO.
        await w.secondary_qemu.die()
        await w.proxy.wait(lambda: bool(w.proxy.failovers), 5, "failover")
        _, failover = w.proxy.failovers[0]
        assert failover.mode is Mode.UNPROTECTED
        assert failover.detail == "secondary lost (qemu-exited); running unprotected"
        assert ("x-colo-lost-heartbeat", {}) in w.primary_qemu.commands
        # Nothing more is triggered: watched for four periods.
        triggers = w.primary.figures.triggers["first"]
        await holds(lambda: w.primary.figures.triggers["first"] == triggers, 0.2, "no trigger")


@pytest.mark.asyncio
async def test_a_planned_daemon_restart_is_no_failover(tmp_path: Path) -> None:
    """The secondary daemon stops cleanly: its last heartbeat says "leaving"; the primary
    stays protected through the silence (COLO itself needs only the secondary QEMU)."""
    async with asyncio.timeout(30), world(tmp_path) as w:
        await in_colo(w)
        w.daemon.stop()
        decider = w.primary.decider
        assert decider is not None
        loop = asyncio.get_running_loop()
        timeout = decider.config.timeout

        def silent_past_the_timeout() -> bool:
            heard = decider.heard()
            return heard is not None and loop.time() - heard > 1.5 * timeout

        await until(silent_past_the_timeout, 10, "silence past the failover timeout")
        assert decider.state is Watch.WATCHING
        assert decider.peer_leaving
        assert not w.proxy.failovers
        request = w.proxy.request()
        await w.proxy.wait(lambda: w.proxy.completed_for(request) is not None, 5, "request")


@pytest.mark.asyncio
async def test_a_primary_whose_secondary_took_over_pauses_its_guest(tmp_path: Path) -> None:
    """The primary's heartbeats stop reaching the secondary (a stalled daemon, one-way
    loss): the secondary takes over; the primary, hearing it, stands down and pauses."""
    async with asyncio.timeout(30), world(tmp_path) as w:
        await in_colo(w)
        w.primary.peer.send = lambda heartbeat: None  # type: ignore[method-assign]
        engine = w.daemon.state.engine
        assert engine is not None
        await engine.wait_until(lambda: "done" in engine.figures.last_failover, 5)
        assert engine.figures.failovers["primary-lost"] == 1
        await w.primary.wait_until(lambda: ("stop", {}) in w.primary_qemu.commands, 5)
        decider = w.primary.decider
        assert decider is not None and decider.state is Watch.STOOD_DOWN
        assert not w.proxy.failovers  # the proxy keeps holding: fail closed


@pytest.mark.asyncio
async def test_a_primary_daemon_back_after_a_crash_stands_down(tmp_path: Path) -> None:
    """The primary daemon dies (no "leaving"): the secondary takes over. The daemon comes
    back with its QEMU still in COLO mode: its new engine hears the secondary first and
    stands down instead of checkpointing (which would fail and read as "secondary lost")."""
    async with asyncio.timeout(30), world(tmp_path) as w:
        await in_colo(w)
        w.primary.peer.send = lambda heartbeat: None  # type: ignore[method-assign]
        w.primary_task.cancel()
        await asyncio.wait([w.primary_task])
        engine = w.daemon.state.engine
        assert engine is not None
        await engine.wait_until(lambda: "done" in engine.figures.last_failover, 5)
        triggers = sum(1 for c, _ in w.primary_qemu.commands if c == "migrate-set-parameters")
        again = EngineRunner(w.primary.settings)
        task = asyncio.create_task(again.run())
        try:
            await again.wait_until(lambda: ("stop", {}) in w.primary_qemu.commands, 5)
            assert again.decider is not None and again.decider.state is Watch.STOOD_DOWN
            assert (
                sum(1 for c, _ in w.primary_qemu.commands if c == "migrate-set-parameters")
                == triggers
            )
        finally:
            task.cancel()
            await asyncio.wait([task])


def _spoof(source: tuple[str, int], destination: tuple[str, int], data: bytes) -> None:
    """One datagram from ``source`` (the peer's own address and port, as a host on the link
    could forge it) to ``destination``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(source)
        sock.sendto(data, destination)
    finally:
        sock.close()


@pytest.mark.asyncio
async def test_forged_and_replayed_heartbeats_are_counted_and_ignored(tmp_path: Path) -> None:
    """A datagram from the primary's address saying its QEMU exited (issue 10: it made host S
    take over while host P lived), and a real heartbeat of the primary's sent again: both
    counted by reason, neither heard."""
    async with asyncio.timeout(30), world(tmp_path) as w:
        await in_colo(w)
        engine = w.daemon.state.engine
        assert engine is not None
        path = w.primary.settings.heartbeat_paths[0]
        source, destination = (str(path.local), path.port), (str(path.remote), path.port)
        captured: list[bytes] = []
        transport: Any = w.primary.peer._endpoints[0].transport
        sendto = transport.sendto

        def record(data: bytes, *args: Any) -> None:
            captured.append(bytes(data))
            sendto(data, *args)

        transport.sendto = record
        await engine.wait_until(lambda: len(captured) >= 2, 5)
        forged = {
            "v": 1, "pair": "engine-test", "role": "primary", "boot": 1, "seq": 1 << 40,
            "qemu": "exited", "colo": "primary",
        }  # fmt: skip
        _spoof(source, destination, json.dumps(forged).encode())
        _spoof(source, destination, captured[0])  # heard already: a replay
        counters = engine.peer.counters
        await engine.wait_until(lambda: counters["bad-forged"] >= 1, 5)
        await engine.wait_until(lambda: counters["bad-replayed"] >= 1, 5)
        await asyncio.sleep(0.3)  # a takeover would have begun by now
        assert engine.figures.failovers["primary-lost"] == 0
        assert engine.decider is not None and engine.decider.state is Watch.WATCHING


@pytest.fixture
def fake_etcd(monkeypatch: pytest.MonkeyPatch) -> FakeEtcd:
    """The secondary daemon's engine gets its store from the fake too."""
    etcd = FakeEtcd()
    monkeypatch.setattr(runner_module, "EtcdStore", lambda settings: etcd.store("secondary"))
    return etcd


@pytest.mark.asyncio
async def test_with_a_quorum_silence_only_starts_the_contest(
    tmp_path: Path, fake_etcd: FakeEtcd
) -> None:
    """The primary's heartbeats stop reaching host S while the primary keeps its key (a loop
    stall, a one-way loss): host S contends and never takes over (in the two-host mode it
    does: test_a_primary_whose_secondary_took_over_pauses_its_guest)."""
    async with asyncio.timeout(30), world(tmp_path, fake_etcd) as w:
        await in_colo(w)
        assert fake_etcd.key is not None and fake_etcd.key[0] == "primary"
        engine = w.daemon.state.engine
        assert engine is not None
        w.primary.peer.send = lambda heartbeat: None  # type: ignore[method-assign]
        await engine.wait_until(lambda: engine.figures.key_events["contest"] >= 1, 5)
        await asyncio.sleep(1.5)  # a lease's TTL and more: the key is renewed all along
        assert engine.figures.failovers["primary-lost"] == 0
        assert engine.decider is not None and engine.decider.state is Watch.CONTESTING
        assert fake_etcd.key[0] == "primary"
        assert w.daemon.state.mode is Mode.PROTECTED


@pytest.mark.asyncio
async def test_with_a_quorum_a_dead_qemu_hands_the_key_over_and_host_s_takes_over(
    tmp_path: Path, fake_etcd: FakeEtcd
) -> None:
    async with asyncio.timeout(30), world(tmp_path, fake_etcd) as w:
        await in_colo(w)
        engine = w.daemon.state.engine
        assert engine is not None
        await w.primary_qemu.die()
        await engine.wait_until(lambda: "done" in engine.figures.last_failover, 5)
        assert fake_etcd.key is not None and fake_etcd.key[0] == "secondary"
        assert w.primary.figures.key_events["lost-released"] == 1
        assert (w.daemon.state.role, w.daemon.state.mode) == (Role.PRIMARY, Mode.UNPROTECTED)
        assert fake_etcd.alone  # host S runs alone: no stale takeover back


@pytest.mark.asyncio
async def test_with_a_quorum_a_primary_cut_from_it_fences_and_host_s_takes_over(
    tmp_path: Path, fake_etcd: FakeEtcd
) -> None:
    """Host P cannot reach the quorum but is still heard: past its deadline it tells the
    proxy (release_until in the past), says fenced; host S wins once the lease ran out."""
    fences: list[float] = []
    async with asyncio.timeout(30), world(tmp_path, fake_etcd) as w:
        w.primary.fence = fences.append
        await in_colo(w)
        engine = w.daemon.state.engine
        assert engine is not None
        fake_etcd.reachable["primary"] = False
        cut = asyncio.get_running_loop().time()
        await w.primary.wait_until(lambda: w.primary.figures.key_events["fenced"] == 1, 5)
        assert cut < fences[-1] <= asyncio.get_running_loop().time()  # the last deadline
        await engine.wait_until(lambda: "done" in engine.figures.last_failover, 5)
        assert fake_etcd.key is not None and fake_etcd.key[0] == "secondary"
        fake_etcd.reachable["primary"] = True
        await w.primary.wait_until(lambda: ("stop", {}) in w.primary_qemu.commands, 5)
        assert fences[-1] == float("-inf")


@pytest.mark.asyncio
async def test_with_a_quorum_entering_colo_clears_the_alone_mark(
    tmp_path: Path, fake_etcd: FakeEtcd
) -> None:
    """A pair marked alone (the survivor of a failover) that enters COLO again (a reprotect,
    or here a bring-up) is protected: the mark goes, or host S could never take over (the
    lab's reprotect test found that)."""
    fake_etcd.alone = True
    async with asyncio.timeout(30), world(tmp_path, fake_etcd) as w:
        await in_colo(w)
        await w.primary.wait_until(lambda: not fake_etcd.alone, 5)
        engine = w.daemon.state.engine
        assert engine is not None
        await w.primary_qemu.die()
        await engine.wait_until(lambda: "done" in engine.figures.last_failover, 5)
        assert fake_etcd.key is not None and fake_etcd.key[0] == "secondary"


# -- the disk (engine/disk.py) ---------------------------------------------------------------


def _order(*monitors: QmpDouble) -> list[str]:
    """The commands of these doubles in the order they arrived, queries left out."""
    merged = sorted(entry for monitor in monitors for entry in monitor.log)
    return [f"{command} {args.get('command-line', '')}".strip() for _, command, args in merged
            if not command.startswith("query-") and command != "qmp_capabilities"]  # fmt: skip


def _before(order: list[str], *steps: str) -> None:
    where = [
        next((i for i, c in enumerate(order) if c == step or c.startswith(f"{step} ")), -1)
        for step in steps
    ]
    assert -1 not in where and where == sorted(where), (steps, order)


@pytest.mark.asyncio
async def test_with_a_disk_bring_up_and_the_secondary_lost(tmp_path: Path) -> None:
    """Host S exports its base before it says ready; host P copies its disk, stops the
    guest, ends the copy and adds the replication child before it migrates; the entry's
    RESUME still serves the restart request. Host S lost: the child goes before
    x-colo-lost-heartbeat."""
    async with asyncio.timeout(30), world(tmp_path, disk=True) as w:
        await in_colo(w)
        order = _order(w.primary_qemu, w.secondary_qemu)
        _before(order, "nbd-server-start", "nbd-server-add", "drive-mirror", "stop",
                "block-job-cancel", "human-monitor-command drive_add",
                "x-blockdev-change", "migrate")  # fmt: skip
        add = next(a for c, a in w.primary_qemu.commands if c == "human-monitor-command")
        assert "file.host=127.0.0.2,file.port=1,file.export=parent0" in add["command-line"]
        mirror = next(a for c, a in w.primary_qemu.commands if c == "drive-mirror")
        assert (mirror["target"], mirror["sync"], mirror["mode"]) == (
            "nbd://127.0.0.2:1/parent0",
            "full",
            "existing",
        )
        assert w.primary.figures.disk_sync_s is not None
        await w.secondary_qemu.die()
        await w.primary.wait_until(
            lambda: ("x-colo-lost-heartbeat", {}) in w.primary_qemu.commands, 5
        )
        order = _order(w.primary_qemu)
        _before(order, "x-blockdev-change", "human-monitor-command drive_del",
                "x-colo-lost-heartbeat")  # fmt: skip
        assert ("x-blockdev-change", {"parent": "colo-disk0", "child": "children.1"}) in (
            w.primary_qemu.commands
        )


@pytest.mark.asyncio
async def test_with_a_disk_the_takeover_stops_the_export_first(tmp_path: Path) -> None:
    async with asyncio.timeout(30), world(tmp_path, disk=True) as w:
        await in_colo(w)
        engine = w.daemon.state.engine
        assert engine is not None
        await w.primary_qemu.die()
        await engine.wait_until(lambda: "done" in engine.figures.last_failover, 5)
        _before(_order(w.secondary_qemu), "nbd-server-stop", "x-colo-lost-heartbeat")
        assert "disk" in engine.figures.last_failover


@pytest.mark.asyncio
async def test_a_timer_run_a_little_early_acts_instead_of_firing_again_and_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvloop rounds a timer's delay to whole milliseconds and may run it a fraction of a
    # millisecond before its deadline. The runner's pump must take the deadline as reached: finding
    # nothing due and arming the same deadline again made it fire ~25 times per heartbeat in
    # the lab (a busy loop until the clock passed the deadline).
    async with asyncio.timeout(30), world(tmp_path) as w:
        await in_colo(w)
        runner = w.primary
        decider = runner.decider
        assert decider is not None
        due = decider.get_timer()
        assert due is not None
        pump = runner._pump
        assert pump is not None and pump.target is runner
        pump.close()
        pump._timer_due = due
        sent = runner.peer.counters["sent"]
        with monkeypatch.context() as patch:
            patch.setattr(asyncio.get_running_loop(), "time", lambda: due - 50e-6)  # 50 us early
            pump._fire()
        assert runner.peer.counters["sent"] == sent + 1  # the heartbeat went out
        assert pump.due is not None and pump.due > due  # the next deadline, not the same one


@pytest.mark.asyncio
async def test_with_a_quorum_an_unexpected_renewal_error_is_a_failed_renewal(
    tmp_path: Path, fake_etcd: FakeEtcd
) -> None:
    """A renewal that ends with an error the store did not turn into a QuorumError (a gRPC
    client's own exception) is a failed renewal like any other: the next goes at once.
    Before, it ended the renewal's task unseen, the engine waited for its answer for ever,
    renewed no more, fenced itself at the deadline and lost the key to host S."""
    async with asyncio.timeout(30), world(tmp_path, fake_etcd) as w:
        await in_colo(w)
        store: Any = w.primary.store
        real = store.renew
        failures = [0]

        async def renew(lease: int) -> float:
            if failures[0] < 3:
                failures[0] += 1
                raise RuntimeError("a client error the store does not know")
            result: float = await real(lease)
            return result

        store.renew = renew
        await asyncio.sleep(1.5)  # a lease's TTL and more
        assert failures[0] == 3
        assert w.primary.figures.key_events["renew-failed"] == 3
        assert w.primary.figures.key_events["fenced"] == 0
        assert fake_etcd.key is not None and fake_etcd.key[0] == "primary"
