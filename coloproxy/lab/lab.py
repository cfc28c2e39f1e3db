"""``coloproxy lab up | down | demo``: a protected VM pair serving a client, on one machine.

Theory of operation
-------------------
The lab is the host pair of docs/invariants.md with every machine replaced by a network namespace
(:class:`~coloproxy.lab.topology.Topology` with ``guests="tap"``): a client, a LAN switch,
host P and host S joined by a replication link. Each host namespace runs what a real host
would: a QEMU (:mod:`coloproxy.lab.vms`, tap ``guest0``) and a ``coloproxy run`` daemon with
the lab's config (:mod:`coloproxy.lab.configs`). The client reaches the guest's address
through the LAN bridge and host P's bridge; host P's proxy compares the PVM's output with
the SVM's, which arrives over the VXLAN tunnel, and holds it until they match or a
checkpoint completes.

``up`` goes step by step, each with a timeout and a message naming what did not happen:
build or find QEMU and the guest image, build the namespaces, start the secondary QEMU
(``-incoming`` on host S's replication address) and the primary QEMU, wait for the primary
guest's services, start host S's daemon then host P's, bring the pair into COLO, and wait
until the client gets a page through the proxy. Its pids and paths go to ``state.json`` in
the run directory, so ``down`` (another process) can end them; ``down`` ends the daemons,
the QEMUs and anything else left in the namespaces, and deletes the namespaces.

Who drives COLO. The checkpoint engine (``coloproxy/engine/``, which ``coloproxy run`` starts
because the lab's configs set ``engine.qmp``) brings the pair into COLO (``engine.migrate_uri``,
``engine.bring_up``), answers the proxy's checkpoint requests, exchanges heartbeats over the
replication link and fails over; the lab only watches, on a second QMP monitor of each
QEMU. With ``--qemu-filters`` no daemon runs and QEMU's own colo-compare decides; a small
driver of the lab's, :class:`QemuFiltersDriver`, enters COLO (:func:`lab_bring_up_colo`) and
runs COLO-FT.txt's failover when a QEMU's monitor connection drops.

The demo's client runs in the client namespace: fresh HTTP connections, one request each,
no retry; a request succeeds only with status 200 and exactly the page's bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coloproxy.engine.runner import TWO_HOST_WARNING
from coloproxy.lab import etcd, partition, vms
from coloproxy.lab.configs import (
    DEFAULT_RUN_DIR,
    DISK_SIZE_MIB,
    PERIOD_MS,
    REPROTECT_FILE,
    LabPaths,
    chardev_config_text,
    config_text,
    migrate_uri,
    reprotect_config_text,
    reprotect_uri,
)
from coloproxy.lab.qemu import repo_root
from coloproxy.lab.topology import GUEST_IPV4, GUEST_PORT, LAN_BRIDGE, Topology
from coloproxy.lab.vms import LabError, Monitor

if TYPE_CHECKING:
    from coloproxy.protocol import Ack, Command

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "cplab"
# A guest reaches "ready" in about 5 s under TCG here (20 s with a louder console,
# docs/invariants.md); a loaded CI machine gets room.
BOOT_TIMEOUT_S = 120.0
DAEMON_TIMEOUT_S = 30.0
# migrate -> COLO on both sides took 0.8-1.2 s here (qemu/README.md).
COLO_TIMEOUT_S = 60.0
SERVE_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 10.0
BUILD_TIMEOUT_S = 1800.0
PAGES = ("/index.html", "/big.bin")
NONDETERMINISTIC_PAGE = "/cgi-bin/clock"
# While the nondeterministic page is asked for: no periodic checkpoint in between.
QUIET_PERIOD_MS = 30000

Say = Callable[[str], None]


def _print(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# state


@dataclass
class LabState:
    prefix: str
    run_dir: str
    qemu_filters: bool
    driver: str  # "engine" (coloproxy's, in the daemons) or "qemu-filters" (the lab's driver)
    accel: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    chardev: bool = False  # --chardev: QEMU's filters, coloproxy in place of colo-compare
    quorum: bool = False  # a witness and etcd members decide failover (not --two-host)
    disk: bool = False  # the guest has a replicated disk (not --no-disk, not --qemu-filters)
    disk_rate: int = 0  # its disk checker's bytes per second

    def save(self, paths: LabPaths) -> None:
        paths.state.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, paths: LabPaths) -> LabState | None:
        try:
            data = json.loads(paths.state.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


# --------------------------------------------------------------------------------------------
# the guest's pages, as the PVM serves them


def big_bin() -> bytes:
    """/big.bin: 384 KiB of SHA-256 counter bytes (guest/build.sh writes the same)."""
    return b"".join(
        hashlib.sha256(b"coloproxy big.bin %d" % i).digest() for i in range(384 * 1024 // 32)
    )


def index_html() -> bytes:
    """/index.html, read from guest/build.sh's heredoc."""
    script = (repo_root() / "guest" / "build.sh").read_text()
    match = re.search(r"www/index\.html\" <<'EOF'\n(.*?)\nEOF\n", script, re.DOTALL)
    if match is None:
        raise LabError("guest/build.sh no longer writes /index.html with a heredoc")
    return (match.group(1) + "\n").encode()


def expected_pages() -> dict[str, bytes]:
    return {"/index.html": index_html(), "/big.bin": big_bin()}


# --------------------------------------------------------------------------------------------
# the client (functions run inside the client namespace)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request: when it started and ended (monotonic), and whether it succeeded."""

    path: str
    started: float
    ended: float
    ok: bool
    detail: str = ""


def http_get(
    path: str, timeout: float = REQUEST_TIMEOUT_S, *, host: str = GUEST_IPV4, port: int = 80
) -> tuple[int, bytes]:
    """GET over a fresh connection to the guest (by default the lab's); (status, body)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def attempt(path: str, expected: bytes | None, timeout: float = REQUEST_TIMEOUT_S) -> Attempt:
    """One request, no retry: ok only with status 200 and (if given) exactly ``expected``."""
    started = time.monotonic()
    try:
        status, body = http_get(path, timeout)
    except (OSError, http.client.HTTPException) as exc:
        return Attempt(path, started, time.monotonic(), False, f"{type(exc).__name__}: {exc}")
    ended = time.monotonic()
    if status != 200:
        return Attempt(path, started, ended, False, f"status {status}")
    if expected is not None and body != expected:
        return Attempt(path, started, ended, False, f"{len(body)} bytes, not the page's")
    return Attempt(path, started, ended, True)


class ClientLoop:
    """Requests the deterministic pages in a loop from the client namespace, in a thread.

    :meth:`hold` lets the request in flight finish and starts no other until :meth:`resume`:
    the demo kills a QEMU between two requests, so that the failover gap it reports is a new
    request's; the SIGKILL test kills wherever the stream is (docs/lab.md, "Known limits").
    """

    def __init__(self, topology: Topology, pages: dict[str, bytes], pause: float = 0.05) -> None:
        self.topology = topology
        self.pages = pages
        self.pause = pause
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._held = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lab-client", daemon=True)

    def start(self) -> ClientLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        self.topology.run_in("client", self._loop)

    def _loop(self) -> None:
        paths = list(self.pages)
        index = 0
        while not self._stop.is_set():
            if self._held.is_set():
                self._idle.set()
                self._stop.wait(0.002)
                continue
            path = paths[index % len(paths)]
            index += 1
            self.attempts.append(attempt(path, self.pages[path]))
            self._stop.wait(self.pause)

    def hold(self) -> None:
        """Return once no request is in flight; start none until :meth:`resume`."""
        self._idle.clear()
        self._held.set()
        if not self._idle.wait(REQUEST_TIMEOUT_S + 5):
            raise LabError("the client's request in flight did not end")

    def resume(self) -> None:
        self._held.clear()

    def stop(self) -> list[Attempt]:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT_S + 5)
        return list(self.attempts)


class EchoSession:
    """One long-lived TCP connection to the guest's echo service, from the client namespace:
    opened before a checkpoint, it shows a connection surviving the failover."""

    def __init__(self, topology: Topology) -> None:
        self.sock = topology.run_in(
            "client", socket.create_connection, (GUEST_IPV4, 7), REQUEST_TIMEOUT_S
        )

    def exchange(self, line: bytes) -> float:
        """Send a line, read it back; the seconds it took. LabError if it did not come back."""
        started = time.monotonic()
        try:
            self.sock.sendall(line)
            received = b""
            while len(received) < len(line):
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise LabError("the echo connection was closed")
                received += chunk
        except OSError as exc:
            raise LabError(f"the echo connection broke: {exc}") from exc
        if received != line:
            raise LabError(f"the echo connection returned {received!r}, not {line!r}")
        return time.monotonic() - started

    def close(self) -> None:
        self.sock.close()


def failover_gap(attempts: list[Attempt], killed: float) -> tuple[float | None, float | None]:
    """(gap, worst latency): last success ending before ``killed`` to the first success ending
    after it, in seconds; None when there is no success on one side."""
    before = [a.ended for a in attempts if a.ok and a.ended <= killed]
    after = [a.ended for a in attempts if a.ok and a.ended > killed]
    gap = (min(after) - max(before)) if before and after else None
    around = [a.ended - a.started for a in attempts if a.ok and a.ended > killed - 1]
    return gap, (max(around) if around else None)


# --------------------------------------------------------------------------------------------
# the lab


class Lab:
    """One lab: its namespaces (``prefix``) and its run directory."""

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        run_dir: Path = DEFAULT_RUN_DIR,
        *,
        qemu_filters: bool = False,
        chardev: bool = False,
        two_host: bool = False,
        disk: bool = True,
        disk_rate: int = vms.DISK_RATE,
        disk_dir: Path | None = None,
        say: Say = _print,
    ) -> None:
        self.prefix = prefix
        # disk_dir: where host S's active and hidden disks go (default: the run directory)
        self.paths = LabPaths(Path(run_dir), disk_dir=disk_dir)
        # The quorum (a witness, three etcd members) goes with coloproxy's engines; QEMU's
        # own colo-compare (--qemu-filters) has no engine to use it.
        self.quorum = not two_host and not qemu_filters
        self.topology = Topology(prefix, guests="tap", witness=self.quorum)
        self.qemu_filters = qemu_filters
        # QEMU's filters with coloproxy's chardev transport in place of colo-compare; the
        # daemons and their engines run as in the default mode (docs/chardev.md).
        self.chardev = chardev and not qemu_filters
        # The guest's disk, replicated by the engines (QEMU's own filters mode has no engine).
        self.disk = disk and not qemu_filters
        self.disk_rate = disk_rate  # the guest's disk checker, bytes per second
        self.say = say
        self._t0 = time.monotonic()
        self.state: LabState | None = None

    def progress(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self._t0:6.1f}s] {text}")

    # -- build ---------------------------------------------------------------------------

    def build(self) -> None:
        self.progress(
            "building or finding QEMU and the guest image (qemu/build.sh, guest/build.sh: "
            "about 5 minutes the first time, seconds after)"
        )
        for script in ("qemu/build.sh", "guest/build.sh"):
            started = time.monotonic()
            try:
                # Its progress lines (stderr) go straight to ours: a first build is long.
                done = subprocess.run(
                    [str(repo_root() / script)],
                    check=False,
                    stdout=subprocess.PIPE,
                    text=True,
                    timeout=BUILD_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired as exc:
                raise LabError(f"{script} did not finish within {BUILD_TIMEOUT_S:.0f} s") from exc
            if done.returncode != 0:
                raise LabError(f"{script} failed (exit {done.returncode}); its messages are above")
            self.progress(f"{script}: {done.stdout.strip()} ({time.monotonic() - started:.1f} s)")

    # -- up ------------------------------------------------------------------------------

    def is_up(self) -> bool:
        state = LabState.load(self.paths)
        return state is not None and all(vms.alive(pid) for pid in state.pids.values())

    def up(self, *, build: bool = True) -> LabState:
        """Bring the lab up (or find it up); LabError naming what did not happen in time."""
        if self.is_up():
            state = LabState.load(self.paths)
            if state is None:
                raise LabError(f"{self.paths.state} went away while the lab was looked at")
            if (
                state.qemu_filters != self.qemu_filters
                or state.chardev != self.chardev
                or state.quorum != self.quorum
                or state.disk != self.disk
            ):
                wired = _wiring(state.qemu_filters, state.chardev)
                wired += "" if state.quorum else " in two-host mode"
                wired += " with a disk" if state.disk else " without a disk"
                raise LabError(
                    f"a lab wired with {wired} is up (namespaces {state.prefix}-*): "
                    "`coloproxy lab down` first"
                )
            self.state = state
            self.topology = Topology(state.prefix, guests="tap", witness=state.quorum)
            self.progress(f"the lab is already up (namespaces {state.prefix}-*); checking it")
            self.wait_serving(SERVE_TIMEOUT_S)
            return state
        if self.paths.state.exists():
            self.progress("a previous lab is partly down: taking it down first")
            self.down()
        if build:
            self.build()
        from coloproxy.lab import qemu as built

        accel = built.accelerator()
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        driver = "qemu-filters" if self.qemu_filters else "engine"
        state = LabState(
            self.prefix, str(self.paths.run_dir), self.qemu_filters, driver, accel,
            started=time.time(), chardev=self.chardev, quorum=self.quorum, disk=self.disk,
            disk_rate=self.disk_rate,
        )  # fmt: skip
        self.state = state
        state.save(self.paths)
        try:
            self._up(state)
        except BaseException:
            self.progress("lab up failed: taking down what was started")
            self.down()
            raise
        return state

    def _up(self, state: LabState) -> None:
        paths = self.paths
        _write_key(paths.heartbeat_key)
        two_host = not self.quorum
        for role in ("primary", "secondary"):
            if self.chardev:
                text = chardev_config_text(role, paths, two_host, self.disk)
            else:
                text = config_text(role, paths, two_host, self.disk)
            paths.config(role).write_text(text)
        self.progress(f"creating namespaces {', '.join(self.topology.namespaces())}")
        self.topology.up()
        if self.quorum:
            self._start_etcd(state)
        elif not self.qemu_filters:
            self.progress(f"WARNING: {TWO_HOST_WARNING}")

        mode = _wiring(self.qemu_filters, self.chardev)
        if self.disk:
            for role in ("primary", "secondary"):
                vms.make_disk(paths, role)
            self.progress(
                f"disks made: {paths.disk_image('primary')} and {paths.disk_image('secondary')}"
                f" ({DISK_SIZE_MIB} MiB raw), host S's active and hidden qcow2 disks"
            )
        self.progress(
            f"starting the secondary QEMU in {self.topology.ns('hs')} (accel {state.accel}, "
            f"-incoming {migrate_uri()}, network by {mode})"
        )
        secondary = vms.vm_spec(
            "secondary",
            paths,
            incoming=migrate_uri(),
            qemu_filters=self.qemu_filters,
            chardev=self.chardev,
            disk=self.disk,
            disk_rate=self.disk_rate,
        )
        state.pids["secondary_qemu"] = vms.start_vm(self.topology, secondary)
        state.save(paths)
        self.progress(f"starting the primary QEMU in {self.topology.ns('hp')}")
        primary = vms.vm_spec(
            "primary",
            paths,
            incoming=None,
            qemu_filters=self.qemu_filters,
            chardev=self.chardev,
            disk=self.disk,
            disk_rate=self.disk_rate,
        )
        state.pids["primary_qemu"] = vms.start_vm(self.topology, primary)
        state.save(paths)
        booted = vms.wait_ready(paths, "primary", state.pids["primary_qemu"], BOOT_TIMEOUT_S)
        state.timings["primary_boot_s"] = booted
        self.progress(f"primary guest ready after {booted:.1f} s (httpd, echo, memory checker)")

        if not self.qemu_filters:
            self._start_daemon(state, "secondary")
            self._start_daemon(state, "primary")
        if self.qemu_filters:
            self._start_filters_driver()
        else:
            self.progress("the checkpoint engine (in both daemons, engine.*) brings up COLO")
        state.timings["colo_s"] = self.wait_colo(COLO_TIMEOUT_S)
        self.progress(
            f"both QEMUs in COLO ({state.timings['colo_s']:.1f} s after the bring-up began)"
        )
        state.timings["serving_s"] = self.wait_serving(SERVE_TIMEOUT_S)
        state.save(paths)
        self.progress(
            f"the client gets {GUEST_IPV4}/index.html through the "
            f"{'colo-compare' if self.qemu_filters else 'proxy'}: the lab is up"
        )

    def _spawn(self, name: str, where: str | None, argv: list[str], log_path: Path) -> int:
        with log_path.open("wb") as output:  # one lab's story per file
            if where is None:
                process = subprocess.Popen(
                    argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
            else:
                process = self.topology.popen(
                    where, argv, stdout=output, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
        state = self._require_state()
        state.pids[name] = vms.adopt(process)
        state.save(self.paths)
        return int(process.pid)

    def _start_etcd(self, state: LabState) -> None:
        """One etcd member on host P, host S and the witness (docs/lab.md, "The quorum")."""
        self.progress(
            "starting etcd on "
            + ", ".join(
                f"{self.topology.ns(h)} ({etcd.endpoint(h)})" for h in self.topology.hosts()
            )
        )
        for host in self.topology.hosts():
            data = self.paths.run_dir / f"etcd-{host}"
            shutil.rmtree(data, ignore_errors=True)
            self._spawn(
                f"etcd_{host}",
                host,
                etcd.command(host, data, token=f"coloproxy-{self.prefix}"),
                self.paths.run_dir / f"etcd-{host}.log",
            )
        took = etcd.wait_healthy(self.topology)
        state.timings["etcd_s"] = took
        led = etcd.lead_from(self.topology, "wit")
        self.progress(
            f"etcd: 3 members healthy after {took:.1f} s"
            + (
                "; the witness's member leads"
                if led
                else "; could not move the lead to the witness"
            )
        )

    def partition(self, name: str, *, freeze: bool = False) -> str:
        """Cut ``name`` (coloproxy.lab.partition.CUTS); a sentence saying what."""
        state = self._require_state()
        topology = Topology(state.prefix, guests="tap", witness=state.quorum)
        return partition.cut(topology, name, self.paths.run_dir, freeze=freeze)

    def heal(self) -> str:
        state = self._require_state()
        topology = Topology(state.prefix, guests="tap", witness=state.quorum)
        return partition.heal(topology, self.paths.run_dir)

    def _start_daemon(self, state: LabState, role: str) -> None:
        host = vms.HOST_OF[role]
        socket_path = self.paths.control_socket(role)
        socket_path.unlink(missing_ok=True)
        self.progress(f"starting coloproxy run ({role}) in {self.topology.ns(host)}")
        pid = self._spawn(
            f"{role}_daemon",
            host,
            [sys.executable, "-m", "coloproxy", "run", "-c", str(self.paths.config(role))],
            self.paths.daemon_log(role),
        )
        self._wait(
            socket_path.exists,
            DAEMON_TIMEOUT_S,
            f"the {role} daemon's control socket {socket_path}",
            pid=pid,
            log_path=self.paths.daemon_log(role),
        )

    def _start_filters_driver(self) -> None:
        self.progress(
            "starting the lab's COLO driver (bring-up and failover; colo-compare decides)"
        )
        argv = [
            sys.executable,
            "-m",
            "coloproxy.lab.lab",
            "filters-driver",
            str(self.paths.run_dir),
        ]
        self._spawn("filters_driver", None, argv, self.paths.run_dir / "filters-driver.log")

    def _wait(
        self,
        predicate: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        pid: int | None = None,
        log_path: Path | None = None,
    ) -> float:
        started = time.monotonic()
        while not predicate():
            if pid is not None:
                if not vms.alive(pid):
                    shown = vms.tail(log_path) if log_path else ""
                    raise LabError(f"waiting for {what}: the process exited\n{shown}")
            if time.monotonic() - started > timeout:
                shown = f"\n{vms.tail(log_path)}" if log_path else ""
                raise LabError(f"{what} did not appear within {timeout:.0f} s{shown}")
            time.sleep(0.05)
        return time.monotonic() - started

    def wait_colo(self, timeout: float, *, reprotected: bool = False) -> float:
        """Poll query-colo-status on both lab monitors until host P's QEMU is the COLO primary
        and host S's the secondary (``reprotected``: the other way round)."""
        wanted = ["secondary", "primary"] if reprotected else ["primary", "secondary"]

        async def poll() -> float:
            started = time.monotonic()
            monitors = [
                await Monitor(role, self.paths.lab_qmp_socket(role)).connect()
                for role in ("primary", "secondary")
            ]
            try:
                modes: list[str] = []
                while True:
                    modes = [await vms.colo_mode(m) for m in monitors]
                    if modes == wanted:
                        return time.monotonic() - started
                    if time.monotonic() - started > timeout:
                        raise LabError(
                            f"the pair did not reach COLO within {timeout:.0f} s "
                            f"(modes host P={modes[0]}, host S={modes[1]}); see "
                            f"{self.paths.run_dir}/*-coloproxy.log (filters-driver.log)"
                        )
                    await asyncio.sleep(0.1)
            finally:
                for monitor in monitors:
                    await monitor.close()

        return asyncio.run(poll())

    def wait_serving(self, timeout: float) -> float:
        """Until one request for /index.html succeeds from the client namespace."""
        expected = index_html()
        started = time.monotonic()
        last: Attempt | None = None
        while time.monotonic() - started < timeout:
            last = self.topology.run_in("client", attempt, "/index.html", expected, 5.0)
            if last.ok:
                return time.monotonic() - started
            time.sleep(0.2)
        raise LabError(
            f"the client got no page from {GUEST_IPV4} within {timeout:.0f} s "
            f"(last try: {last.detail if last else 'none'})"
        )

    # -- reprotect -----------------------------------------------------------------------

    def reprotect(self) -> float:
        """After host P's QEMU died and host S took over: protect the guest again, host S
        the primary now. A new secondary QEMU (``-incoming``) and host P's daemon as the
        secondary start on host P, then host S's daemon is told ``reprotect`` (its engine
        migrates into the new QEMU: COLO again). Seconds until the client is served again
        through host S's proxy."""
        from coloproxy.protocol import Reprotect

        state = self.state or LabState.load(self.paths)
        if state is None:
            raise LabError("the lab is not up (no state): `coloproxy lab up` first")
        self.state = state
        if state.qemu_filters:
            raise LabError("reprotect is coloproxy's: this lab runs QEMU's own filters")
        old = state.pids.get("primary_qemu")
        if old is not None and vms.alive(old):
            raise LabError("host P's QEMU still runs: reprotect follows a failover of host S")
        started = time.monotonic()
        daemon = state.pids.get("primary_daemon")
        if daemon is not None and vms.alive(daemon) and _is_ours(daemon):
            self.progress("stopping host P's old daemon")
            vms.stop_process(daemon)
        config = self.paths.run_dir / REPROTECT_FILE
        config.write_text(reprotect_config_text(self.paths, not state.quorum, state.disk))
        uri = reprotect_uri()
        if state.disk:
            # Host P's image stays (stale; host S's engine copies its disk over it before
            # COLO); its active and hidden disks are made new.
            vms.make_disk(self.paths, "primary", image=False)
        self.progress(
            f"starting a new secondary QEMU in {self.topology.ns('hp')} (-incoming {uri})"
        )
        # host P's paths, see configs
        spec = vms.vm_spec(
            "primary", self.paths, incoming=uri, disk=state.disk, disk_rate=state.disk_rate
        )
        state.pids["primary_qemu"] = vms.start_vm(self.topology, spec)
        state.save(self.paths)
        socket_path = self.paths.control_socket("primary")
        socket_path.unlink(missing_ok=True)
        log_path = self.paths.run_dir / "primary-reprotected-coloproxy.log"
        self.progress(f"starting coloproxy run (secondary) in {self.topology.ns('hp')}")
        pid = self._spawn(
            "primary_daemon",
            "hp",
            [sys.executable, "-m", "coloproxy", "run", "-c", str(config)],
            log_path,
        )
        self._wait(
            socket_path.exists,
            DAEMON_TIMEOUT_S,
            f"host P's daemon's control socket {socket_path}",
            pid=pid,
            log_path=log_path,
        )

        ack = self._command("secondary", Reprotect(migrate_uri=uri), "host S's reprotect")
        self.progress(f"host S's daemon: {ack.detail}")
        state.timings["reprotect_colo_s"] = self.wait_colo(COLO_TIMEOUT_S, reprotected=True)
        self.progress(
            f"COLO again, host S primary ({state.timings['reprotect_colo_s']:.1f} s after the"
            " reprotect)"
        )
        self.wait_serving(SERVE_TIMEOUT_S)
        state.timings["reprotect_s"] = time.monotonic() - started
        state.save(self.paths)
        self.progress("the client is served through host S's proxy: protected again")
        return state.timings["reprotect_s"]

    # -- down ----------------------------------------------------------------------------

    def down(self) -> None:
        """Stop daemons and QEMUs, delete the namespaces; harmless when nothing is up."""
        state = LabState.load(self.paths)
        prefixes = {self.prefix} | ({state.prefix} if state else set())
        frozen = self.paths.run_dir / "frozen.json"
        if frozen.exists():  # a frozen process would not end on SIGTERM
            with contextlib.suppress(OSError, ValueError):
                for pid in json.loads(frozen.read_text()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            frozen.unlink(missing_ok=True)
        if state is not None:
            order = ["filters_driver", "primary_daemon", "secondary_daemon"]
            order += ["primary_qemu", "secondary_qemu"]
            for name in order + sorted(set(state.pids) - set(order)):
                pid = state.pids.get(name)
                if pid is not None and vms.alive(pid) and _is_ours(pid):
                    vms.stop_process(pid)
        for prefix in sorted(prefixes):
            Topology(prefix, guests="tap").down()
        for path in self.paths.run_dir.glob("*.sock"):
            path.unlink(missing_ok=True)
        self.paths.state.unlink(missing_ok=True)

    # -- looking at it -------------------------------------------------------------------

    def scrape(self, role: str = "primary") -> str:
        def fetch() -> str:
            with urllib.request.urlopen("http://127.0.0.1:9477/metrics", timeout=5) as reply:
                return str(reply.read().decode())

        return str(self.topology.run_in(vms.HOST_OF[role], fetch))

    def checkpoints(self, role: str = "primary") -> dict[str, int]:
        """Checkpoint requests by reason and checkpoints completed, from host P's metrics
        (``role="secondary"``: host S's, the primary after a reprotect)."""
        found: dict[str, int] = {}
        for line in self.scrape(role).splitlines():
            if line.startswith("coloproxy_checkpoint_requests_total{"):
                match = re.search(r'reason="([^"]+)"', line)
                if match:
                    found[match.group(1)] = found.get(match.group(1), 0) + int(
                        float(line.rsplit(" ", 1)[1])
                    )
            elif line.startswith("coloproxy_checkpoints_completed_total"):
                found["completed"] = int(float(line.rsplit(" ", 1)[1]))
        return found

    def engine_checkpoints(self) -> dict[str, int]:
        """Checkpoints the engine completed, by reason (periodic, payload, ...), from host P's
        metrics; empty without the engine."""
        found: dict[str, int] = {}
        for line in self.scrape().splitlines():
            if line.startswith("coloproxy_engine_checkpoints_total{"):
                match = re.search(r'reason="([^"]+)"', line)
                if match:
                    value = int(float(line.rsplit(" ", 1)[1]))
                    found[match.group(1)] = found.get(match.group(1), 0) + value
        return found

    def set_period(self, period_ms: int, role: str = "primary") -> None:
        """The engine's periodic checkpoint interval, live (set-period to host P's proxy, or
        with ``role="secondary"`` host S's)."""
        from coloproxy.protocol import SetPeriod

        self._command(role, SetPeriod(period_ms=period_ms), f"set-period {period_ms} ms")

    def _command(self, role: str, message: Command, what: str) -> Ack:
        """One command to the daemon on ``role``'s host (its first role's socket), as a CLI."""
        from coloproxy.control import ControlClient, ControlError
        from coloproxy.protocol import ClientRole

        async def send() -> Ack:
            client = await ControlClient.connect(
                self.paths.control_socket(role), ClientRole.CLI, name="coloproxy-lab"
            )
            async with client:
                return await client.request(message)

        try:
            return asyncio.run(send())
        except ControlError as exc:
            raise LabError(f"{what}: {exc}") from exc

    def _require_state(self) -> LabState:
        if self.state is None:
            self.state = LabState.load(self.paths)  # a command run after `lab up`
        if self.state is None:
            raise LabError("the lab is not up (no state): `coloproxy lab up` first")
        return self.state

    def kill_qemu(self, role: str) -> float:
        """SIGKILL one QEMU and wait until it is gone; the monotonic time of the kill.

        Waiting matters to the figures: a QEMU runs on for a moment after the signal is
        sent, and a request it still answered would shorten the failover gap.
        """
        pid = self._require_state().pids[f"{role}_qemu"]
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        deadline = killed + 10
        while vms.alive(pid):
            if time.monotonic() > deadline:
                raise LabError(f"the {role} QEMU (pid {pid}) did not die within 10 s of SIGKILL")
            time.sleep(0.001)
        return killed

    def checkpoint_now(self, role: str = "primary", timeout: float = 10.0) -> None:
        """Ask ``role``'s proxy for a checkpoint (``coloproxy checkpoint``) and wait until its
        metrics count one more completed."""
        from coloproxy.protocol import CheckpointNow

        before = self.checkpoints(role).get("completed", 0)
        self._command(role, CheckpointNow(reason="manual"), "checkpoint")
        deadline = time.monotonic() + timeout
        while self.checkpoints(role).get("completed", 0) <= before:
            if time.monotonic() > deadline:
                raise LabError(f"no checkpoint completed within {timeout:.0f} s of the request")
            time.sleep(0.05)

    def qemu_io(self, role: str, command: str) -> str:
        """HMP ``qemu-io`` on the guest's disk (the quorum drive) of ``role``'s QEMU: the
        guest's view of the disk on that host. QEMU prints what qemu-io says on its own
        stdout, the QEMU's log: that output is returned."""
        from coloproxy.lab.vms import disk_settings

        drive = disk_settings(self.paths, role).drive
        log_path = self.paths.qemu_log(role)
        start = log_path.stat().st_size

        async def run() -> None:
            monitor = await Monitor(role, self.paths.lab_qmp_socket(role)).connect()
            try:
                await monitor.execute(
                    "human-monitor-command", {"command-line": f'qemu-io {drive} "{command}"'}
                )
            finally:
                await monitor.close()

        asyncio.run(run())
        with log_path.open("rb") as output:
            output.seek(start)
            return output.read().decode(errors="replace")

    def colo_status(self, role: str) -> dict[str, Any]:
        async def ask() -> dict[str, Any]:
            monitor = await Monitor(role, self.paths.lab_qmp_socket(role)).connect()
            try:
                return dict(await monitor.execute("query-colo-status"))
            finally:
                await monitor.close()

        return asyncio.run(ask())


def _is_ours(pid: int) -> bool:
    """Only end processes the lab started: QEMU, coloproxy, python running our module."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"coloproxy" in cmdline or b"qemu-system" in cmdline


@contextlib.contextmanager
def running_lab(lab: Lab, *, keep: bool = False) -> Iterator[Lab]:
    """``lab.up()``, then ``lab.down()`` whatever happens (unless ``keep``)."""
    try:
        lab.up()
        yield lab
    finally:
        if not keep:
            lab.progress("taking the lab down")
            lab.down()


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


# --------------------------------------------------------------------------------------------
# the demo


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
            from coloproxy.lab import diskcheck

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
            from coloproxy.lab import diskcheck

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


_MEMCHECK = re.compile(rb"memcheck seq=(\d+) steps=\d+ writes=\d+ passes=(\d+) errors=(\d+)")


_TCPSTAT = re.compile(rb"tcpstat retrans=(\d+)")


def guest_retransmissions(paths: LabPaths, role: str) -> int | None:
    """The guest's TCP RetransSegs as it last printed it (once a second, guest/init), or None."""
    found = _TCPSTAT.findall(vms.console(paths, role))
    return int(found[-1]) if found else None


def memcheck_lines(console: bytes) -> list[tuple[int, int, int]]:
    """The memory checker's status lines (guest/README.md): (seq, passes, errors) each."""
    return [(int(m[1]), int(m[2]), int(m[3])) for m in _MEMCHECK.finditer(console)]


def memcheck_summary(console: bytes) -> str:
    """What the guest's memory checker printed: lines, passes, errors."""
    found = memcheck_lines(console)
    trouble = [word.decode() for word in vms.KERNEL_TROUBLE if word in console]
    if not found:
        return "no status line" + (f"; kernel: {', '.join(trouble)}" if trouble else "")
    errors = max(line[2] for line in found)
    text = (
        f"seq {found[0][0]}..{found[-1][0]}, {found[-1][1] - found[0][1]} more full passes, "
        f"{errors} errors"
    )
    return text + (f"; kernel: {', '.join(trouble)}" if trouble else "")


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


def _wiring(qemu_filters: bool, chardev: bool) -> str:
    if qemu_filters:
        return "QEMU's own filters and colo-compare"
    if chardev:
        return "QEMU's filters and coloproxy's chardev transport"
    return "coloproxy"


def format_summary(result: DemoResult, lab: Lab) -> str:
    state = lab.state
    lines = ["", "== coloproxy lab demo: summary"]
    if state is not None:
        lines.append(
            f"network by           {_wiring(state.qemu_filters, state.chardev)}"
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


# --------------------------------------------------------------------------------------------
# --qemu-filters: the lab drives COLO itself (no daemon, QEMU's colo-compare decides)


async def lab_bring_up_colo(
    primary: Monitor, secondary: Monitor, uri: str, period_ms: int, timeout: float
) -> float:
    """Enable x-colo, migrate, wait until both QEMUs are in COLO; seconds from migrate.

    The lab's own bring-up, for ``--qemu-filters`` (no coloproxy daemon, so no engine); with
    our proxy the engine does this (``engine.migrate_uri``, ``engine.bring_up``).
    """
    caps = [{"capability": "x-colo", "state": True}]
    await primary.execute("migrate-set-capabilities", {"capabilities": caps})
    if await vms.qemu_version(primary) >= (8, 1):  # QEMU 8.1 wants it on the secondary too
        await secondary.execute("migrate-set-capabilities", {"capabilities": caps})
    await primary.execute("migrate-set-parameters", {"x-checkpoint-delay": period_ms})
    started = time.monotonic()
    await primary.execute("migrate", {"uri": uri})
    while True:
        modes = (await vms.colo_mode(primary), await vms.colo_mode(secondary))
        if modes == ("primary", "secondary"):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            info = await primary.execute("query-migrate")
            raise LabError(
                f"no COLO within {timeout:.0f} s after migrate: modes {modes}, "
                f"migration {info.get('status')}"
            )
        await asyncio.sleep(0.05)


class QemuFiltersDriver:
    """Brings up and fails over a pair wired with QEMU's own filters (COLO-FT.txt).

    colo-compare asks for checkpoints inside QEMU, so this only enters COLO
    (:func:`lab_bring_up_colo`) and, when a QEMU's QMP connection drops (it exited or was
    killed), runs COLO-FT.txt's failover on the survivor. It sees local QEMUs only: no
    heartbeat, no lost host with a running QEMU; the engine does that for our proxy.
    """

    def __init__(self, paths: LabPaths, prefix: str) -> None:
        self.paths = paths
        self.topology = Topology(prefix, guests="tap")
        self.primary = Monitor("primary", paths.qmp_socket("primary"))
        self.secondary = Monitor("secondary", paths.qmp_socket("secondary"))
        self.failed_over = False

    async def run(self) -> None:
        await self.primary.connect()
        await self.secondary.connect()
        took = await lab_bring_up_colo(
            self.primary, self.secondary, migrate_uri(), PERIOD_MS, COLO_TIMEOUT_S
        )
        log.info("COLO reached %.2f s after migrate", took)
        await asyncio.gather(self._watch("primary"), self._watch("secondary"))

    async def _watch(self, role: str) -> None:
        monitor = self.primary if role == "primary" else self.secondary
        await monitor.closed.wait()
        if self.failed_over:
            return
        self.failed_over = True
        survivor = self.secondary if role == "primary" else self.primary
        log.warning("the %s QEMU is gone: failover to the %s", role, survivor.role)
        started = time.monotonic()
        if survivor is self.primary:
            for name in ("comp0", "iothread1", "m0", "redire0", "redire1"):
                with contextlib.suppress(LabError):
                    await survivor.execute("object-del", {"id": name})
            await survivor.execute("x-colo-lost-heartbeat")
        else:
            await survivor.execute("x-colo-lost-heartbeat")
            for name in ("f2", "f1"):  # the redirectors to a primary that is gone
                with contextlib.suppress(LabError):
                    await survivor.execute("object-del", {"id": name})
            await asyncio.to_thread(self._attach_secondary_to_lan)
            with contextlib.suppress(LabError):
                await survivor.execute(
                    "announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100}
                )
        log.info("failover done in %.3f s", time.monotonic() - started)

    def _attach_secondary_to_lan(self) -> None:
        """Host S's guest port into its LAN bridge (no daemon: the topology's names)."""
        self.topology.exec("hs", ["ip", "link", "set", GUEST_PORT, "master", LAN_BRIDGE, "up"])


def run_qemu_filters_driver(run_dir: Path) -> int:
    """The driver of a ``--qemu-filters`` lab, as a process of its own."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    paths = LabPaths(run_dir)
    state = LabState.load(paths)
    driver = QemuFiltersDriver(paths, state.prefix if state else DEFAULT_PREFIX)
    try:
        asyncio.run(driver.run())
    except LabError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":  # python3 -m coloproxy.lab.lab filters-driver RUN_DIR
    if len(sys.argv) == 3 and sys.argv[1] == "filters-driver":
        sys.exit(run_qemu_filters_driver(Path(sys.argv[2])))
    print("usage: python3 -m coloproxy.lab.lab filters-driver RUN_DIR")
    sys.exit(2)


def _write_key(path: Path) -> None:
    """A fresh random heartbeat key, created private (0600) before a byte is written."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(base64.b64encode(secrets.token_bytes(32)) + b"\n")
