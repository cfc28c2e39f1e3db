"""The checkpoint engine against two real QEMUs: bring-up, requested and periodic
checkpoints, a live period change, and failover in both directions.

Theory of operation. Two QEMUs run the lab guest as in tests/test_qemu_colo.py (whose helpers
this module imports): the primary booted, the secondary waiting with ``-incoming``. Two
:class:`EngineRunner` run in this process, one per role, each a client of its own *proxy
double*: a real :class:`ControlServer` whose handler records what the engine tells it
(checkpoint-started/completed, failover) and lets the test push checkpoint requests and
``set-period`` like the proxy does. The engines heartbeat over UDP on loopback (127.0.0.1
and 127.0.0.2). No guest network: ``-nic none``; the secondary's engine has no
``attach_lan`` (the daemon gives it none without a network), which it says in its log; the
full network path is the lab's business.

Figures (request to STOP, pause p50/max, failover gaps) are printed with ``-s``; they are in
docs/engine.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from coloproxy.control.server import ClientInfo, ControlServer, HandlerReply, ProxyIdentity
from coloproxy.engine.decider import Watch
from coloproxy.engine.peer import HeartbeatPath
from coloproxy.engine.runner import EngineRunner
from coloproxy.engine.settings import EngineSettings
from coloproxy.lab import qemu as lab
from coloproxy.protocol import (
    Ack,
    CheckpointCompleted,
    CheckpointRequest,
    CheckpointStarted,
    ClientRole,
    ErrorCode,
    ErrorReply,
    Failover,
    Mode,
    Request,
    SetPeriod,
    Status,
    StatusRequest,
)
from coloproxy.role import Role
from test_qemu_colo import (
    BOOT_TIMEOUT_S,
    KERNEL_TROUBLE_RE,
    Vm,
    built,  # noqa: F401 (a fixture)
    memcheck_lines,
    percentile,
    start_vm,
    wait_for,
)

pytestmark = [pytest.mark.qemu]

TEST_TIMEOUT_S = 240.0
COLO_TIMEOUT_S = 60.0
STEP_TIMEOUT_S = 10.0
REQUESTS = 15
REQUEST_GAP_S = 0.2
# Targets: the 10 ms from request to the QMP command; a checkpoint starts 1-2 ms
# after the command (docs/invariants.md). Generous bounds: CI machines are loaded.
REQUEST_TO_COMMAND_P50_S = 0.010
REQUEST_TO_STOP_P50_S = 0.020
FAILOVER_BOUND_S = 2.0


@dataclass
class ProxyDouble:
    """The proxy's side of the control socket: records what the engine says."""

    role: Role
    mode: Mode = Mode.PROTECTED
    started: list[tuple[float, CheckpointStarted]] = field(default_factory=list)
    completed: list[tuple[float, CheckpointCompleted]] = field(default_factory=list)
    failovers: list[tuple[float, Failover]] = field(default_factory=list)
    engines: int = 0
    outstanding: CheckpointRequest | None = None
    sent: dict[int, float] = field(default_factory=dict)  # request id -> loop time sent
    server: ControlServer | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    next_id: int = 1

    def identity(self) -> ProxyIdentity:
        return ProxyIdentity("engine-test", self.role, self.mode)

    def client_connected(self, client: ClientInfo) -> None:
        if client.role is ClientRole.ENGINE:
            self.engines += 1
            if self.outstanding is not None and self.server is not None:
                self.server.send(client, self.outstanding)  # as the daemon does (I6)
        self.changed.set()

    def client_disconnected(self, client: ClientInfo, reason: str) -> None:
        if client.role is ClientRole.ENGINE:
            self.engines -= 1

    async def handle(self, client: ClientInfo, message: Request) -> HandlerReply:
        now = asyncio.get_running_loop().time()
        reply: HandlerReply = Ack()
        if isinstance(message, CheckpointStarted):
            self.started.append((now, message))
        elif isinstance(message, CheckpointCompleted):
            self.completed.append((now, message))
            self.outstanding = None
        elif isinstance(message, Failover):
            self.failovers.append((now, message))
            self.mode = message.mode
            self.role = message.role
        elif isinstance(message, StatusRequest):
            reply = Status(pair="engine-test", role=self.role, mode=self.mode)
        else:
            reply = ErrorReply(ErrorCode.UNAVAILABLE, "not in this double")
        self.changed.set()
        return reply

    def request(self, reason: str = "payload") -> int:
        """Push a checkpoint request as the proxy does (one outstanding at a time)."""
        request = CheckpointRequest(
            id=self.next_id, reason=reason, protocol="any", time=time.time()
        )
        self.next_id += 1
        self.outstanding = request
        self.sent[request.id] = asyncio.get_running_loop().time()
        if self.server is not None:
            self.server.broadcast(request)
        return request.id

    async def wait(self, predicate: Any, timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pytest.fail(f"{self.role.value} proxy double: no {what} within {timeout:.0f} s")

    def completed_for(self, request: int) -> float | None:
        return next((t for t, m in self.completed if m.request == request), None)


def free_udp_port() -> int:
    """A port free on both loopback addresses the engines use."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.bind(("127.0.0.2", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free UDP port")


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Pair:
    primary_vm: Vm
    secondary_vm: Vm
    primary: EngineRunner
    secondary: EngineRunner
    primary_proxy: ProxyDouble
    secondary_proxy: ProxyDouble
    bring_up_s: float
    primary_task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def engine_pair(images: dict[str, Any], tmp: Path, period_ms: int) -> AsyncIterator[Pair]:
    """Two QEMUs, two proxy doubles, two engines; returns once COLO is up (the restart
    request of the primary's proxy completed by the COLO entry, I6)."""
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    port = free_udp_port()
    cmdline = lab.guest_cmdline(memcheck_mib=32, memcheck_rate=1024)
    vms: list[Vm] = []
    servers: list[ControlServer] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        primary_vm = start_vm(images, tmp, "primary", cmdline, None)
        vms.append(primary_vm)
        secondary_vm = start_vm(images, tmp, "secondary", cmdline, uri)
        vms.append(secondary_vm)
        proxies = {}
        for role in (Role.PRIMARY, Role.SECONDARY):
            double = ProxyDouble(role)
            server = ControlServer(tmp / f"{role.value}.sock", double)
            double.server = server
            await server.start()
            servers.append(server)
            proxies[role] = double
        # The restarted primary proxy's first request (I6), sent to the engine on connect.
        primary_proxy = proxies[Role.PRIMARY]
        primary_proxy.outstanding = CheckpointRequest(
            id=primary_proxy.next_id, reason="restart", protocol="any", time=time.time()
        )
        primary_proxy.next_id += 1
        await wait_for(
            lambda: (
                b"coloproxy-guest: ready" in primary_vm.console()
                and len(memcheck_lines(primary_vm.console())) >= 3
            ),
            BOOT_TIMEOUT_S,
            "the primary guest to boot",
        )
        local, remote = ip_address("127.0.0.1"), ip_address("127.0.0.2")
        common = {
            "pair": "engine-test",
            "period_ms": period_ms,
            "min_gap_ms": 100,
            "heartbeat_key": b"engine-qemu-test-heartbeat-key!!",
        }
        primary = EngineRunner(
            EngineSettings(
                role=Role.PRIMARY,
                qmp=str(primary_vm.qmp_path),
                control_socket=tmp / "primary.sock",
                heartbeat_paths=(HeartbeatPath("replication", local, remote, port),),
                migrate_uri=uri,
                **common,  # type: ignore[arg-type]
            )
        )
        secondary = EngineRunner(
            EngineSettings(
                role=Role.SECONDARY,
                qmp=str(secondary_vm.qmp_path),
                control_socket=tmp / "secondary.sock",
                heartbeat_paths=(HeartbeatPath("replication", remote, local, port),),
                **common,  # type: ignore[arg-type]
            ),
            attach_lan=None,  # no network here: the takeover skips the LAN move and says so
        )
        started = time.monotonic()
        tasks.append(asyncio.create_task(secondary.run(), name="secondary-engine"))
        tasks.append(asyncio.create_task(primary.run(), name="primary-engine"))
        await primary_proxy.wait(
            lambda: primary_proxy.completed_for(1) is not None,
            COLO_TIMEOUT_S,
            "checkpoint-completed for the restart request (bring-up)",
        )
        bring_up = time.monotonic() - started
        yield Pair(
            primary_vm,
            secondary_vm,
            primary,
            secondary,
            primary_proxy,
            proxies[Role.SECONDARY],
            bring_up,
            tasks[1],
        )
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for vm in vms:
            await vm.close()
        for server in servers:
            await server.close()


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[engine-qemu] {text}")


def ms(values: list[float]) -> str:
    if not values:
        return "none"
    return (
        f"p50 {statistics.median(values) * 1000:.1f} ms, p90 {percentile(values, 0.9) * 1000:.1f}"
        f" ms, max {max(values) * 1000:.1f} ms (n={len(values)})"
    )


async def both_watching(pair: Pair) -> None:
    def watching() -> bool:
        return all(
            engine.decider is not None and engine.decider.state is Watch.WATCHING
            for engine in (pair.primary, pair.secondary)
        )

    await pair.secondary.wait_until(watching, STEP_TIMEOUT_S)


@pytest.mark.asyncio
async def test_engine_checkpoints_periods_and_takeover_after_the_primary_dies(
    built: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        async with engine_pair(built, tmp_path, period_ms=1000) as pair:
            primary, proxy = pair.primary, pair.primary_proxy
            assert proxy.started[0][1].request == 1  # the COLO entry served the restart
            assert primary.figures.checkpoints["colo-entry"] == 1
            assert primary.figures.colo_mode == "primary"
            await both_watching(pair)
            loop = asyncio.get_running_loop()

            # Periodic checkpoints at the configured period (1 s after the last ended).
            def periodic_ends() -> list[float]:
                return [t for t, m in proxy.completed if m.request is None]

            await proxy.wait(lambda: len(periodic_ends()) >= 3, 6.0, "3 periodic checkpoints")
            gaps = [b - a for a, b in itertools.pairwise(periodic_ends())]
            assert all(0.95 <= gap <= 1.3 for gap in gaps), gaps

            # set-period, live: 300 ms.
            assert proxy.server is not None
            proxy.server.broadcast(SetPeriod(period_ms=300))
            changed_at = loop.time()
            await proxy.wait(
                lambda: len([t for t in periodic_ends() if t > changed_at + 0.5]) >= 4,
                6.0,
                "periodic checkpoints at the new period",
            )
            fast = [t for t in periodic_ends() if t > changed_at + 0.5]
            fast_gaps = [b - a for a, b in itertools.pairwise(fast)]
            assert all(0.28 <= gap <= 0.5 for gap in fast_gaps), fast_gaps
            assert primary.figures.period_ms == 300
            # Out of the way of the requests below.
            proxy.server.broadcast(SetPeriod(period_ms=600000))
            await asyncio.sleep(0.5)

            # Requests: each leads to STOP/RESUME and started/completed naming it.
            stop_before = primary.figures.request_to_stop.count
            to_completed: list[float] = []
            for _ in range(REQUESTS):
                await asyncio.sleep(REQUEST_GAP_S)
                request = proxy.request("payload")
                await proxy.wait(
                    lambda r=request: proxy.completed_for(r) is not None,  # type: ignore[misc]
                    STEP_TIMEOUT_S,
                    f"checkpoint-completed for request {request}",
                )
                done = proxy.completed_for(request)
                assert done is not None
                to_completed.append(done - proxy.sent[request])
                assert any(m.request == request for _, m in proxy.started)
            assert primary.figures.request_to_stop.count - stop_before == REQUESTS
            to_stop = list(primary.figures.request_to_stop.recent)[-REQUESTS:]
            to_command = list(primary.figures.request_to_command.recent)[-REQUESTS:]
            pauses = list(primary.figures.pause.recent)
            assert statistics.median(to_command) < REQUEST_TO_COMMAND_P50_S, to_command
            assert statistics.median(to_stop) < REQUEST_TO_STOP_P50_S, to_stop
            assert primary.figures.stalled == 0 and primary.figures.aborted == 0
            assert primary.figures.checkpoints["payload"] == REQUESTS

            # The primary QEMU dies: the secondary's engine takes over.
            secondary_vm = pair.secondary_vm
            offset = len(secondary_vm.console())
            killed = loop.time()
            os.kill(pair.primary_vm.proc.pid, signal.SIGKILL)
            secondary_proxy = pair.secondary_proxy
            await secondary_proxy.wait(
                lambda: bool(secondary_proxy.failovers), STEP_TIMEOUT_S, "failover"
            )
            told, failover = secondary_proxy.failovers[0]
            assert failover.role is Role.PRIMARY and failover.mode is Mode.UNPROTECTED
            assert "primary lost (qemu-exited)" in failover.detail
            secondary = pair.secondary
            assert secondary.decider is not None
            assert secondary.decider.state is Watch.FAILED_OVER
            assert secondary.figures.failovers["primary-lost"] == 1
            status = await secondary.monitor.colo_status()
            assert (status.mode, status.last_mode) == ("none", "secondary")
            assert await secondary.monitor.run_state() == "running"
            steps = dict(secondary.figures.last_failover)
            gap = told - killed
            assert gap < FAILOVER_BOUND_S
            assert "lan" not in steps  # no network configured: skipped (and logged)

            # The guest goes on on the secondary, from the primary's state, without errors.
            def two_more_lines() -> bool:
                return len(memcheck_lines(secondary_vm.console()[offset:])) >= 3

            await wait_for(two_more_lines, 20, "the secondary guest's memory checker")
            lines = memcheck_lines(secondary_vm.console()[offset:])
            assert all(line.errors == 0 for line in lines), lines
            assert not KERNEL_TROUBLE_RE.search(secondary_vm.console())

            report(
                capsys,
                f"accel={built['accel']} bring-up (engines start -> restart request completed)"
                f" {pair.bring_up_s:.2f} s, migrate -> COLO {primary.figures.time_to_colo:.2f} s;"
                f" periodic gaps at 1000 ms: {', '.join(f'{g * 1000:.0f}' for g in gaps)} ms,"
                f" at 300 ms: {', '.join(f'{g * 1000:.0f}' for g in fast_gaps)} ms",
            )
            report(
                capsys,
                f"{REQUESTS} requests: request -> trigger answered {ms(to_command)}; "
                f"request -> primary STOP {ms(to_stop)}; proxy sent -> checkpoint-completed"
                f" received {ms(to_completed)}; pause STOP -> RESUME {ms(pauses)}",
            )
            report(
                capsys,
                f"SIGKILL primary QEMU -> secondary proxy told failover {gap * 1000:.1f} ms;"
                f" engine steps after the decision: "
                + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in steps.items()),
            )


@pytest.mark.asyncio
async def test_engine_primary_runs_unprotected_after_the_secondary_dies(
    built: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        async with engine_pair(built, tmp_path, period_ms=20000) as pair:
            primary, proxy = pair.primary, pair.primary_proxy
            await both_watching(pair)
            for _ in range(3):
                request = proxy.request("fate")
                await proxy.wait(
                    lambda r=request: proxy.completed_for(r) is not None,  # type: ignore[misc]
                    STEP_TIMEOUT_S,
                    f"checkpoint-completed for request {request}",
                )
            loop = asyncio.get_running_loop()
            killed = loop.time()
            os.kill(pair.secondary_vm.proc.pid, signal.SIGKILL)
            await proxy.wait(lambda: bool(proxy.failovers), STEP_TIMEOUT_S, "failover")
            told, failover = proxy.failovers[0]
            assert failover.role is Role.PRIMARY and failover.mode is Mode.UNPROTECTED
            assert "secondary lost" in failover.detail
            assert primary.figures.failovers["secondary-lost"] == 1
            status = await primary.monitor.colo_status()
            assert (status.mode, status.last_mode) == ("none", "primary")
            assert await primary.monitor.run_state() == "running"
            # The primary's guest keeps running, alone.
            offset = len(pair.primary_vm.console())
            await wait_for(
                lambda: len(memcheck_lines(pair.primary_vm.console()[offset:])) >= 2,
                10,
                "the primary guest after the failover",
            )
            # No checkpoint is attempted any more.
            triggers = primary.figures.triggers["first"]
            proxy.request("payload")
            await asyncio.sleep(0.3)
            assert primary.figures.triggers["first"] == triggers
            assert pair.secondary.decider is not None
            assert pair.secondary.decider.qemu.value == "exited"
            report(
                capsys,
                f"SIGKILL secondary QEMU -> primary proxy told unprotected"
                f" {(told - killed) * 1000:.1f} ms (reason: {failover.detail}); steps: "
                + ", ".join(
                    f"{k} {v * 1000:.1f} ms" for k, v in primary.figures.last_failover.items()
                ),
            )


@pytest.mark.asyncio
async def test_engine_takeover_when_host_p_is_gone(
    built: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Host P dies whole: its daemon stops heartbeating and its QEMU dies. The secondary
    hears nothing for failover_timeout_ms (300) and takes over."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        async with engine_pair(built, tmp_path, period_ms=20000) as pair:
            await both_watching(pair)
            loop = asyncio.get_running_loop()
            # The daemon goes silent (a clean stop would say "leaving": not a death) ...
            await pair.primary.peer.aclose()
            killed = loop.time()
            os.kill(pair.primary_vm.proc.pid, signal.SIGKILL)  # ... with its QEMU
            secondary_proxy = pair.secondary_proxy
            await secondary_proxy.wait(
                lambda: bool(secondary_proxy.failovers), STEP_TIMEOUT_S, "failover"
            )
            told, failover = secondary_proxy.failovers[0]
            assert "primary lost (silent)" in failover.detail
            gap = told - killed
            assert 0.3 <= gap < FAILOVER_BOUND_S
            status = await pair.secondary.monitor.colo_status()
            assert status.mode == "none"
            report(
                capsys,
                f"host P gone (engine stopped + SIGKILL QEMU) -> secondary proxy told failover"
                f" {gap * 1000:.1f} ms (timeout 300 ms); steps after the decision: "
                + ", ".join(
                    f"{k} {v * 1000:.1f} ms"
                    for k, v in pair.secondary.figures.last_failover.items()
                ),
            )
