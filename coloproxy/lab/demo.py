"""``coloproxy lab demo``: traffic, a divergence and a failover on a lab that is up.

The client (:mod:`coloproxy.lab.client`) asks for the deterministic pages in a loop and keeps
an echo connection open; the demo asks once for the page that differs between the PVM and
the SVM (a checkpoint with reason payload, with our proxy), writes disk records the guest
acknowledges, then SIGKILLs the primary QEMU between two requests and reports the failover
gap, the echo connections, the guest's memory and disk checkers on the SVM and the records
read back. :class:`CheckpointWatch` counts the primary QEMU's checkpoints as QEMU sees them,
whoever asked for them; :func:`format_summary` is the table ``coloproxy lab demo`` prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import threading
import time
from dataclasses import dataclass, field

from coloproxy.lab import diskcheck, vms
from coloproxy.lab.client import (
    NONDETERMINISTIC_PAGE,
    PAGES,
    ClientLoop,
    EchoSession,
    expected_pages,
    failover_gap,
    http_get,
)
from coloproxy.lab.configs import PERIOD_MS, LabPaths
from coloproxy.lab.console import memcheck_summary
from coloproxy.lab.lab import Lab
from coloproxy.lab.topology import GUEST_IPV4
from coloproxy.lab.vms import LabError, Monitor

# While the nondeterministic page is asked for: no periodic checkpoint in between.
QUIET_PERIOD_MS = 30000


class CheckpointWatch:
    """The primary QEMU's checkpoints as QEMU sees them (STOP -> RESUME on the lab's monitor),
    whoever asked for them: works the same with our proxy and with QEMU's colo-compare."""

    def __init__(self, paths: LabPaths) -> None:
        self.monitor = Monitor("primary", paths.lab_qmp_socket("primary"))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lab-qmp-watch", daemon=True)

    def start(self) -> CheckpointWatch:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise LabError(f"cannot watch the primary's checkpoints: {self._error}")
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._done = asyncio.Event()
            try:
                await self.monitor.connect()
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._ready.set()
            try:
                await self._done.wait()
            finally:
                await self.monitor.close()

        with contextlib.suppress(Exception):
            asyncio.run(main())

    def pauses_ms(self) -> list[float]:
        """One pause per completed checkpoint: STOP to the next RESUME, QEMU's timestamps."""
        pauses: list[float] = []
        stopped: float | None = None
        for name, when, _ in list(self.monitor.events):
            if name == "STOP":
                stopped = when
            elif name == "RESUME" and stopped is not None:
                pauses.append((when - stopped) * 1000)
                stopped = None
        return pauses

    def stop(self) -> list[float]:
        if self._loop is not None and self._done is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(timeout=10)
        return self.pauses_ms()


@dataclass
class DemoResult:
    served: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    checkpoints_before: dict[str, int] = field(default_factory=dict)
    checkpoints: dict[str, int] = field(default_factory=dict)
    engine_checkpoints: dict[str, int] = field(default_factory=dict)
    clock_page: str = ""
    gap_s: float | None = None
    worst_latency_s: float | None = None
    pauses_ms: list[float] = field(default_factory=list)
    echo: str = ""
    echo_fresh: str = ""  # the echo connection opened after the last checkpoint
    memcheck: str = ""
    diskcheck: str = ""  # the guest's disk checker on the SVM since the kill
    disk: str = ""  # the records the client saw acknowledged, read back after the failover

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not any(
            e.startswith("FAILED") for e in (self.echo, self.echo_fresh, self.disk)
        )


def demo(lab: Lab, *, traffic_s: float = 20.0, after_failover_s: float = 10.0) -> DemoResult:
    """Traffic, a divergence, a failover; prints as it goes. The lab must be up."""
    say = lab.progress
    result = DemoResult()
    pages = expected_pages()
    proxy = not lab.qemu_filters

    if proxy:
        result.checkpoints_before = lab.checkpoints()
        say(f"checkpoints so far (host P's metrics): {_reasons(result.checkpoints_before)}")
    watch = CheckpointWatch(lab.paths).start()
    echo: EchoSession | None = None
    fresh: EchoSession | None = None
    loop: ClientLoop | None = None
    try:
        say("client: a TCP connection to the echo service, kept open across the failover")
        echo = EchoSession(lab.topology)
        echo.exchange(b"before the failover\n")
        say(f"client: GET {', '.join(PAGES)} in a loop for {traffic_s:.0f} s (no retries)")
        loop = ClientLoop(lab.topology, pages).start()
        _progress_while(lab, loop, traffic_s)

        say(f"client: GET {NONDETERMINISTIC_PAGE} (differs between PVM and SVM)")
        payload_before = lab.checkpoints().get("payload", 0) if proxy else 0
        if proxy:
            # The CGI takes a second or two under TCG: with the 2 s period a periodic checkpoint
            # would often release the PVM's answer before the SVM's was compared.
            say(f"  (periodic checkpoints every {QUIET_PERIOD_MS // 1000} s meanwhile, not 2 s)")
            lab.set_period(QUIET_PERIOD_MS)
        asked = time.monotonic()
        try:
            status, body = lab.topology.run_in("client", http_get, NONDETERMINISTIC_PAGE)
        except (OSError, http.client.HTTPException) as exc:
            status, body = 0, f"{type(exc).__name__}: {exc}".encode()
        took = time.monotonic() - asked
        if proxy:
            lab.set_period(PERIOD_MS)
        result.clock_page = body.decode(errors="replace").strip().replace("\n", " ")
        complete = all(word in result.clock_page for word in ("realtime_ns=", "random="))
        shown = "complete" if complete else "INCOMPLETE"
        say(f"  answer {status} in {took:.2f} s, {shown}: {result.clock_page[:80]}")
        if proxy:
            time.sleep(0.5)
            now = lab.checkpoints()
            say(f"checkpoints now: {_reasons(now)}")
            if now.get("payload", 0) > payload_before:
                say(
                    "  the divergence was a checkpoint with reason payload;"
                    " the client got the PVM's page"
                )
            else:
                say("  no new payload request (merged into an outstanding one)")

        result.pauses_ms = watch.stop()
        if proxy:
            with contextlib.suppress(OSError, LabError):
                result.engine_checkpoints = lab.engine_checkpoints()
        say(
            f"the primary QEMU checkpointed {len(result.pauses_ms)} times so far "
            f"(pause {_pause_figures(result.pauses_ms)})"
        )
        if proxy:
            completed = lab.checkpoints().get("completed", 0)
            deadline = time.monotonic() + 10
            while lab.checkpoints().get("completed", 0) <= completed:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        say(
            "client: a second echo connection, opened after the last checkpoint (the SVM's"
            " side has its own ISN: host S shifts it after a takeover)"
        )
        fresh = EchoSession(lab.topology)
        fresh.exchange(b"just after a checkpoint\n")
        acked = 0
        if lab.disk:
            client = lab.topology.ns("client")
            try:
                for _ in range(5):
                    acked = diskcheck.disk_write(GUEST_IPV4, 20, netns=client)
                say(f"client: the guest acknowledged disk records 1..{acked} (synced to its disk)")
            except LabError as exc:
                result.disk = f"FAILED: writing records: {exc}"
                say(f"  {result.disk}")
        say(
            "SIGKILL of the primary QEMU while the client goes on (between two of its"
            " requests, docs/lab.md)"
        )
        loop.hold()
        console_mark = len(vms.console(lab.paths, "secondary"))
        killed = lab.kill_qemu("primary")
        loop.resume()
        for session, label in ((echo, "opened before the traffic"), (fresh, "opened last")):
            try:
                session.exchange(b"after the failover\n")
                text = f"answered {(time.monotonic() - killed) * 1000:.0f} ms after the kill"
            except LabError as exc:
                text = f"FAILED: {exc}"
            finally:
                session.close()
            if session is echo:
                result.echo = text
            else:
                result.echo_fresh = text
            say(f"  the echo connection {label}: {text}")
        _progress_while(lab, loop, after_failover_s)
        attempts = loop.stop()
        result.gap_s, result.worst_latency_s = failover_gap(attempts, killed)
        result.served = sum(1 for a in attempts if a.ok)
        result.failed = sum(1 for a in attempts if not a.ok)
        result.failures = [f"{a.path}: {a.detail}" for a in attempts if not a.ok][:5]
        with contextlib.suppress(LabError, OSError):
            status_s = lab.colo_status("secondary")
            say(f"secondary QEMU after failover: {status_s}")
        result.memcheck = memcheck_summary(vms.console(lab.paths, "secondary")[console_mark:])
        say(f"the guest's memory checker on the SVM since the kill: {result.memcheck}")
        if lab.disk:
            since = vms.console(lab.paths, "secondary")[console_mark:]
            result.diskcheck = diskcheck.diskcheck_summary(since)
            say(f"the guest's disk checker on the SVM since the kill: {result.diskcheck}")
            if acked and not result.disk:
                try:
                    check = diskcheck.disk_verify(GUEST_IPV4, netns=lab.topology.ns("client"))
                    if check.records >= acked and check.corrupt == 0:
                        result.disk = (
                            f"all {acked} acknowledged records read back intact"
                            f" ({check.records} in the file)"
                        )
                    else:
                        result.disk = (
                            f"FAILED: {check.records} records ({acked} acknowledged),"
                            f" {check.corrupt} corrupt, first bad {check.first_bad}"
                        )
                except LabError as exc:
                    result.disk = f"FAILED: reading the records back: {exc}"
                say(f"the records the client saw acknowledged, on the SVM: {result.disk}")
    finally:  # whatever failed: no thread or connection of ours outlives the demo
        if loop is not None:
            loop.stop()
        for opened in (echo, fresh):
            if opened is not None:
                opened.close()
        watch.stop()
    if proxy:
        with contextlib.suppress(OSError, LabError):
            result.checkpoints = lab.checkpoints()
    return result


def _progress_while(lab: Lab, loop: ClientLoop, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(5.0, max(0.0, end - time.monotonic())))
        attempts = list(loop.attempts)
        ok = sum(1 for a in attempts if a.ok)
        bad = len(attempts) - ok
        lab.progress(f"  client: {ok} requests served, {bad} failed")


def _pause_figures(pauses: list[float]) -> str:
    if not pauses:
        return "none"
    ordered = sorted(pauses)
    p50 = ordered[len(ordered) // 2]
    return f"p50 {p50:.1f} ms, max {ordered[-1]:.1f} ms"


def _reasons(counts: dict[str, int]) -> str:
    reasons = {k: v for k, v in counts.items() if k != "completed"}
    shown = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none requested"
    return f"requested: {shown}; completed: {counts.get('completed', 0)}"


def format_summary(result: DemoResult, lab: Lab) -> str:
    state = lab.state
    lines = ["", "== coloproxy lab demo: summary"]
    if state is not None:
        lines.append(
            f"network by           {state.wiring}"
            f" (COLO driven by {state.driver}), accel {state.accel}"
        )
        for name, value in state.timings.items():
            lines.append(f"{name:<20} {value:.1f} s")
    lines.append(f"requests served      {result.served}")
    lines.append(f"requests failed      {result.failed}")
    lines.extend(f"  failed: {failure}" for failure in result.failures)
    if result.checkpoints:
        lines.append(f"checkpoints (proxy)  {_reasons(result.checkpoints)}")
    if result.engine_checkpoints:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(result.engine_checkpoints.items()))
        lines.append(f"checkpoints (engine) {shown} (before the kill)")
    lines.append(
        f"checkpoints (QEMU)   {len(result.pauses_ms)} before the kill, "
        f"pause {_pause_figures(result.pauses_ms)}"
    )
    gap = "not measured" if result.gap_s is None else f"{result.gap_s * 1000:.0f} ms"
    lines.append(f"failover gap         {gap} (last success before the kill -> first after)")
    if result.echo:
        lines.append(f"echo connection      {result.echo}")
    if result.echo_fresh:
        lines.append(f"echo, newest         {result.echo_fresh} (opened after the last checkpoint)")
    if result.memcheck:
        lines.append(f"SVM memory checker   {result.memcheck}")
    if result.diskcheck:
        lines.append(f"SVM disk checker     {result.diskcheck}")
    if result.disk:
        lines.append(f"acknowledged records {result.disk}")
    if result.worst_latency_s is not None:
        lines.append(f"slowest request      {result.worst_latency_s * 1000:.0f} ms around the kill")
    return "\n".join(lines) + "\n"
