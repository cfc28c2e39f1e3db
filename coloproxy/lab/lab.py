"""``coloproxy lab up | down | reprotect``: a protected VM pair serving a client, on one machine.

Theory of operation
-------------------
The lab is the host pair of docs/invariants.md with every machine replaced by a network namespace
(:class:`~coloproxy.lab.topology.Topology` with ``guests="tap"``): a client, a LAN switch,
host P and host S joined by a replication link. Each host namespace runs what a real host
would: a QEMU (:mod:`coloproxy.lab.vms`, tap ``guest0``) and a ``coloproxy run`` daemon with
the lab's config (:mod:`coloproxy.lab.configs`). The client (:mod:`coloproxy.lab.client`)
reaches the guest's address through the LAN bridge and host P's bridge; host P's proxy
compares the PVM's output with the SVM's, which arrives over the VXLAN tunnel, and holds it
until they match or a checkpoint completes.

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
QEMU. With ``--qemu-filters`` no daemon runs and QEMU's own colo-compare decides; the lab
starts its own driver instead (:mod:`coloproxy.lab.filters`). The demo that runs on a lab
that is up: :mod:`coloproxy.lab.demo`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coloproxy.engine.runner import TWO_HOST_WARNING
from coloproxy.lab import etcd, partition, qemu, vms
from coloproxy.lab.client import Attempt, attempt, index_html
from coloproxy.lab.configs import (
    DEFAULT_RUN_DIR,
    DISK_SIZE_MIB,
    REPROTECT_FILE,
    LabPaths,
    chardev_config_text,
    config_text,
    migrate_uri,
    reprotect_config_text,
    reprotect_uri,
)
from coloproxy.lab.topology import GUEST_IPV4, Topology
from coloproxy.lab.vms import LabError, Monitor

if TYPE_CHECKING:
    from coloproxy.protocol import Ack, Command

DEFAULT_PREFIX = "cplab"
# A guest reaches "ready" in about 5 s under TCG here (20 s with a louder console,
# docs/invariants.md); a loaded CI machine gets room.
BOOT_TIMEOUT_S = 120.0
DAEMON_TIMEOUT_S = 30.0
# migrate -> COLO on both sides took 0.8-1.2 s here (qemu/README.md).
COLO_TIMEOUT_S = 60.0
SERVE_TIMEOUT_S = 60.0
BUILD_TIMEOUT_S = 1800.0

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

    @property
    def wiring(self) -> str:
        """What carries the guest's network: coloproxy, or QEMU's filters (with or without it)."""
        if self.qemu_filters:
            return "QEMU's own filters and colo-compare"
        if self.chardev:
            return "QEMU's filters and coloproxy's chardev transport"
        return "coloproxy"

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
                    [str(qemu.repo_root() / script)],
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
                wired = state.wiring
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
        accel = qemu.accelerator()
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

        mode = state.wiring
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
        self._start_qemu(state, "secondary", migrate_uri())
        self.progress(f"starting the primary QEMU in {self.topology.ns('hp')}")
        self._start_qemu(state, "primary", None)
        booted = vms.wait_ready(paths, "primary", state.pids["primary_qemu"], BOOT_TIMEOUT_S)
        state.timings["primary_boot_s"] = booted
        self.progress(f"primary guest ready after {booted:.1f} s (httpd, echo, memory checker)")

        if not self.qemu_filters:
            for role in ("secondary", "primary"):
                self._start_daemon(
                    role,
                    paths.config(role),
                    paths.daemon_log(role),
                    runs_as=role,
                    whose=f"the {role} daemon's",
                )
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

    def _start_qemu(self, state: LabState, role: str, incoming: str | None) -> None:
        """Start ``role``'s QEMU in its host's namespace, wired as this lab is."""
        spec = vms.vm_spec(
            role,
            self.paths,
            incoming=incoming,
            qemu_filters=self.qemu_filters,
            chardev=self.chardev,
            disk=self.disk,
            disk_rate=self.disk_rate,
        )
        state.pids[f"{role}_qemu"] = vms.start_vm(self.topology, spec)
        state.save(self.paths)

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

    def _start_daemon(
        self, role: str, config: Path, log_path: Path, *, runs_as: str, whose: str
    ) -> None:
        """``coloproxy run -c config`` in the namespace of ``role``'s host (the host's first
        role names its socket and pid), as ``runs_as``; returns once its socket is there."""
        host = vms.HOST_OF[role]
        socket_path = self.paths.control_socket(role)
        socket_path.unlink(missing_ok=True)
        self.progress(f"starting coloproxy run ({runs_as}) in {self.topology.ns(host)}")
        pid = self._spawn(
            f"{role}_daemon",
            host,
            [sys.executable, "-m", "coloproxy", "run", "-c", str(config)],
            log_path,
        )
        self._wait(
            socket_path.exists,
            DAEMON_TIMEOUT_S,
            f"{whose} control socket {socket_path}",
            pid=pid,
            log_path=log_path,
        )

    def _start_filters_driver(self) -> None:
        self.progress(
            "starting the lab's COLO driver (bring-up and failover; colo-compare decides)"
        )
        argv = [
            sys.executable,
            "-m",
            "coloproxy.lab.filters",
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
        self._start_daemon(
            "primary",
            config,
            self.paths.run_dir / "primary-reprotected-coloproxy.log",
            runs_as="secondary",
            whose="host P's daemon's",
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
        drive = vms.disk_settings(self.paths, role).drive
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


def _write_key(path: Path) -> None:
    """A fresh random heartbeat key, created private (0600) before a byte is written."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(base64.b64encode(secrets.token_bytes(32)) + b"\n")
