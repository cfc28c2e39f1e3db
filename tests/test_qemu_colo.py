"""QEMU's COLO works here: a primary and a secondary QEMU reach COLO state, take forced
checkpoints while the guest dirties memory, and the secondary takes over after the primary
is killed with the guest's memory intact.

Theory of operation. Both QEMUs run the lab guest (guest/build.sh: Debian cloud kernel,
busybox initramfs, diskless) with `-machine pc` under the accelerator `accelerator()` picks
(TCG on the CI machines). The guest's memory checker rewrites about 1000 pages per second of
a 32 MiB region and prints one status line every 100 ms on the serial console, which goes to
a file per QEMU. The primary gets x-colo (and the secondary too on QEMU >= 8.1) and migrates
to the secondary started with `-incoming`. A checkpoint is forced with
`migrate-set-parameters x-checkpoint-delay` (docs/invariants.md); its pause is the time
between the primary's STOP and RESUME events, from QEMU's own event timestamps. After
SIGKILL of the primary, `x-colo-lost-heartbeat` on the secondary makes it run alone; the
checker's lines on the secondary's console must go on from where the primary was, with no
error, for at least two more full verification passes over the region.

No network: `-nic none`; networking comes from the proxy (other tests). Each test is bounded
by a timeout and kills every QEMU it started in a `finally`.

The figures (time to COLO state, pause p50/max, failover time) are printed to the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from coloproxy.lab import qemu as lab

pytestmark = [pytest.mark.qemu]

CHECKPOINTS = 25
# Time between forced checkpoints: the checker dirties ~200 pages (0.8 MB) in it.
CHECKPOINT_GAP_S = 0.2
BOOT_TIMEOUT_S = 90.0
COLO_TIMEOUT_S = 30.0
CHECKPOINT_TIMEOUT_S = 10.0
TEST_TIMEOUT_S = 300.0
# What a guest kernel prints when its memory went bad (with `quiet`, only these get through).
KERNEL_TROUBLE_RE = re.compile(rb"Kernel panic|BUG: |Oops|general protection fault|Call Trace")
MEMCHECK_RE = re.compile(
    rb"memcheck seq=(\d+) steps=(\d+) writes=(\d+) passes=(\d+) errors=(\d+) sum=([0-9a-f]+)"
)


@dataclass(frozen=True)
class MemcheckLine:
    seq: int
    steps: int
    writes: int
    passes: int
    errors: int
    checksum: str


def memcheck_lines(data: bytes) -> list[MemcheckLine]:
    return [
        MemcheckLine(*(int(g) for g in m.groups()[:5]), m.group(6).decode())
        for m in MEMCHECK_RE.finditer(data)
    ]


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    """The lab's QEMU and guest image, built (or found in the cache) by the project's scripts."""
    if os.geteuid() != 0:
        pytest.skip("needs root: builds QEMU and the guest image with apt and /boot")
    root = lab.repo_root()
    for script in ("qemu/build.sh", "guest/build.sh"):
        # Seconds when cached; the first QEMU build on a fresh machine takes ~5 minutes.
        subprocess.run([str(root / script)], check=True, stdout=subprocess.DEVNULL)
    return {
        "binary": lab.qemu_binary(),
        "firmware": lab.qemu_firmware_dir(),
        "kernel": lab.guest_kernel(),
        "initrd": lab.guest_initrd(),
        "accel": lab.accelerator(),
    }


@dataclass
class Vm:
    """One QEMU process with its QMP connection and the STOP/RESUME events it reported."""

    name: str
    proc: subprocess.Popen[bytes]
    serial: Path
    qmp_path: Path
    client: Any = None
    events: list[tuple[str, float]] = field(default_factory=list)
    event_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _pump: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        from qemu.qmp import QMPClient

        deadline = time.monotonic() + 20
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: QEMU exited or made no QMP socket")
            await asyncio.sleep(0.02)
        self.client = QMPClient(self.name)
        await self.client.connect(str(self.qmp_path))
        self._pump = asyncio.create_task(self._collect_events())

    async def _collect_events(self) -> None:
        from qemu.qmp import EventListener

        listener = EventListener(("STOP", "RESUME"))
        with self.client.listen(listener):
            async for event in listener:
                ts = event["timestamp"]
                self.events.append((event["event"], ts["seconds"] + ts["microseconds"] / 1e6))
                self.event_arrived.set()

    async def execute(self, cmd: str, args: dict[str, object] | None = None) -> Any:
        return await self.client.execute(cmd, args)

    async def wait_event(self, name: str, after: int, timeout: float) -> tuple[int, float]:
        """Index and timestamp of the first `name` event at index >= after."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for index in range(after, len(self.events)):
                        if self.events[index][0] == name:
                            return index, self.events[index][1]
                    self.event_arrived.clear()
                    await self.event_arrived.wait()
        except TimeoutError:
            pytest.fail(f"{self.name}: no {name} event within {timeout:.0f} s")

    def console(self) -> bytes:
        try:
            return self.serial.read_bytes()
        except FileNotFoundError:
            return b""

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def start_vm(built: dict[str, Any], tmp: Path, name: str, cmdline: str, incoming: str | None) -> Vm:
    serial = tmp / f"{name}.serial"
    qmp_path = tmp / f"{name}.qmp"
    argv = [
        str(built["binary"]),
        *("-name", name, "-machine", "pc", "-accel", built["accel"]),
        *("-m", "256", "-smp", "1", "-nodefaults", "-display", "none", "-vga", "none"),
        *("-nic", "none", "-L", str(built["firmware"])),
        *("-kernel", str(built["kernel"]), "-initrd", str(built["initrd"])),
        *("-append", cmdline),
        *("-serial", f"file:{serial}"),
        *("-qmp", f"unix:{qmp_path},server=on,wait=off"),
    ]
    if incoming:
        argv += ["-incoming", incoming]
    with (tmp / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Vm(name, proc, serial, qmp_path)


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until predicate() holds; return when (monotonic). Fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic()


async def colo_mode(vm: Vm) -> str:
    status = await vm.execute("query-colo-status")
    return str(status["mode"])


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ColoRun:
    primary: Vm
    secondary: Vm
    time_to_colo_s: float
    pauses_ms: list[float]


@contextlib.asynccontextmanager
async def colo_pair(
    built: dict[str, Any], tmp: Path, transport: str, checkpoints: int
) -> AsyncIterator[ColoRun]:
    """Boot the primary, start the secondary, enter COLO, force `checkpoints` checkpoints."""
    if transport == "unix":
        uri = f"unix:{tmp / 'migration.sock'}"
    else:
        uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    cmdline = lab.guest_cmdline(memcheck_mib=32, memcheck_rate=1024)
    vms: list[Vm] = []
    try:
        primary = start_vm(built, tmp, "primary", cmdline, None)
        vms.append(primary)
        secondary = start_vm(built, tmp, "secondary", cmdline, uri)
        vms.append(secondary)
        await primary.connect()
        await secondary.connect()

        await wait_for(
            lambda: (
                b"coloproxy-guest: ready" in primary.console()
                and len(memcheck_lines(primary.console())) >= 3
            ),
            BOOT_TIMEOUT_S,
            "the primary guest to boot and its memory checker to run",
        )
        version = (await primary.execute("query-version"))["qemu"]
        caps = [{"capability": "x-colo", "state": True}]
        await primary.execute("migrate-set-capabilities", {"capabilities": caps})
        if (version["major"], version["minor"]) >= (8, 1):
            await secondary.execute("migrate-set-capabilities", {"capabilities": caps})
        # No periodic checkpoint during the test: every one is forced and measured.
        await primary.execute("migrate-set-parameters", {"x-checkpoint-delay": 600000})

        started = time.monotonic()
        await primary.execute("migrate", {"uri": uri})
        modes: dict[str, str] = {}

        async def both_in_colo() -> bool:
            modes["primary"] = await colo_mode(primary)
            modes["secondary"] = await colo_mode(secondary)
            return modes == {"primary": "primary", "secondary": "secondary"}

        async with asyncio.timeout(COLO_TIMEOUT_S):
            while not await both_in_colo():
                if primary.proc.poll() is not None or secondary.proc.poll() is not None:
                    pytest.fail(f"a QEMU exited before COLO state: {modes}")
                await asyncio.sleep(0.02)
        time_to_colo = time.monotonic() - started
        # The primary resumes the guest once the secondary holds the first state.
        await primary.wait_event("RESUME", 0, CHECKPOINT_TIMEOUT_S)

        pauses: list[float] = []
        for _ in range(checkpoints):
            await asyncio.sleep(CHECKPOINT_GAP_S)
            mark = len(primary.events)
            await primary.execute("migrate-set-parameters", {"x-checkpoint-delay": 600000})
            stop_at, stop_ts = await primary.wait_event("STOP", mark, CHECKPOINT_TIMEOUT_S)
            _, resume_ts = await primary.wait_event("RESUME", stop_at, CHECKPOINT_TIMEOUT_S)
            pauses.append((resume_ts - stop_ts) * 1000)
        yield ColoRun(primary, secondary, time_to_colo, pauses)
    finally:
        for vm in vms:
            await vm.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[qemu-colo] {text}")


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_colo_checkpoints_and_failover(
    built: dict[str, Any],
    tmp_path: Path,
    transport: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        async with colo_pair(built, tmp_path, transport, CHECKPOINTS) as run:
            primary, secondary = run.primary, run.secondary
            assert len(run.pauses_ms) == CHECKPOINTS
            # Both monitors saw every checkpoint.
            assert sum(1 for e, _ in secondary.events if e == "RESUME") >= CHECKPOINTS
            assert await colo_mode(primary) == "primary"
            assert await colo_mode(secondary) == "secondary"
            # The primary's guest kept running correctly through the checkpoints.
            pvm_lines = memcheck_lines(primary.console())
            assert pvm_lines and all(line.errors == 0 for line in pvm_lines)
            assert not KERNEL_TROUBLE_RE.search(secondary.console()), secondary.console()[-2000:]

            # Failover: the primary dies; the secondary is told the heartbeat is lost.
            offset = len(secondary.console())
            last_pvm = memcheck_lines(primary.console())[-1]
            mark = len(secondary.events)
            killed = time.monotonic()
            os.kill(primary.proc.pid, signal.SIGKILL)
            await secondary.execute("x-colo-lost-heartbeat")
            replied = time.monotonic()
            await secondary.wait_event("RESUME", mark, CHECKPOINT_TIMEOUT_S)
            resumed = time.monotonic()
            status = await secondary.execute("query-colo-status")
            assert status["mode"] == "none"
            assert status["last-mode"] == "secondary"
            assert (await secondary.execute("query-status"))["status"] == "running"

            # The guest goes on on the secondary: the checker continues from the primary's
            # state and verifies every page at least twice more without an error.
            def after_failover() -> list[MemcheckLine]:
                return memcheck_lines(secondary.console()[offset:])

            def two_more_passes() -> bool:
                if KERNEL_TROUBLE_RE.search(secondary.console()):
                    pytest.fail(f"secondary guest kernel: {secondary.console()[-2000:]!r}")
                lines = after_failover()
                return len(lines) >= 2 and lines[-1].passes >= lines[0].passes + 2

            await wait_for(two_more_passes, 60, "two full memory passes on the secondary")
            lines = after_failover()
            assert all(line.errors == 0 for line in lines), lines
            assert all(b.seq == a.seq + 1 for a, b in itertools.pairwise(lines))
            # It resumed from the last checkpoint: not ahead of what the primary printed.
            assert lines[0].seq <= last_pvm.seq + 1
            assert lines[0].writes > 0
            assert not KERNEL_TROUBLE_RE.search(secondary.console())

            pauses = run.pauses_ms
            report(
                capsys,
                f"transport={transport} accel={built['accel']} "
                f"time_to_colo={run.time_to_colo_s:.2f}s checkpoints={len(pauses)} "
                f"pause_ms p50={statistics.median(pauses):.1f} "
                f"p90={percentile(pauses, 0.9):.1f} max={max(pauses):.1f} "
                f"failover: lost-heartbeat reply {1000 * (replied - killed):.0f} ms, "
                f"secondary RESUME seen {1000 * (resumed - killed):.0f} ms after SIGKILL; "
                f"memcheck after failover: seq {lines[0].seq}..{lines[-1].seq} "
                f"(primary last printed {last_pvm.seq}), passes "
                f"{lines[0].passes}->{lines[-1].passes}, errors 0",
            )
