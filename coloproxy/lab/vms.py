"""The lab's two QEMUs: started inside host P's and host S's namespaces (shell).

Theory of operation
-------------------
Each QEMU runs the lab guest (guest/build.sh: Debian's cloud kernel and a busybox initramfs)
with ``-machine pc -m 256`` under the
accelerator :func:`coloproxy.lab.qemu.accelerator` picks: KVM where it boots Linux, else TCG
(docs/invariants.md: nested KVM on these machines does not). The process is started with
``ip netns exec <host namespace>``, so its tap netdev opens ``guest0``, the tap the topology
created in that namespace (``Topology(guests="tap")``), and its migration socket lives on
that host's addresses: the secondary's ``-incoming`` listens on host S's replication address,
and the primary migrates across the replication link as it would between two machines.

Both guests have the same MAC and addresses, as COLO's two VMs do (the secondary must be
an exact copy). Each QEMU has two QMP monitors: one for the checkpoint engine
(``engine.qmp`` in the daemon's config) and one for the lab, because a monitor socket takes
one client and events are seen only while connected (docs/invariants.md); QEMU sends every
event to every monitor.

The serial console goes to a file per VM; the guest prints ``coloproxy-guest: ready`` once
its services listen. The processes run in their own sessions so that ``coloproxy lab up``
can return and leave them running; their pids go into the lab's state file and
``coloproxy lab down`` ends them (and ``Topology.down`` ends anything left in the
namespaces).

With a disk (``VmSpec.disk``, the lab's default) each QEMU also gets the guest's disk: a
64 MiB raw image per host (:func:`make_disk`: an ext4 file system on its first 60 MiB)
behind a quorum drive, in the primary's or the secondary's layout
(:func:`coloproxy.engine.disk.drive_argv`: a QEMU started with ``-incoming`` is a secondary),
and the guest mounts it at /data and runs its disk checker (``coloproxy.disk=vda``). The
engines replicate it (docs/engine.md, "The disk").

With ``qemu_filters=True`` the pair is wired the way QEMU's docs/COLO-FT.txt does it, for
comparison with our proxy: the primary mirrors the client's packets to the secondary
(filter-mirror), its own output goes through colo-compare (filter-redirector), and the
secondary's filter-redirectors and filter-rewriter carry its traffic over sockets on the
replication link; the tap runs without a vnet header (QEMU's filters default to none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coloproxy.engine.disk import DiskSettings, drive_argv
from coloproxy.errors import ColoproxyError
from coloproxy.lab import qemu as build
from coloproxy.lab.configs import DISK_FS_MIB, DISK_SIZE_MIB, FILTER_PORTS, NBD_PORT, LabPaths
from coloproxy.lab.topology import (
    GUEST_IPV4,
    GUEST_IPV6,
    GUEST_MAC,
    GUEST_PORT,
    REPLICATION_IPV4,
    Topology,
)

log = logging.getLogger(__name__)

ROLES = ("primary", "secondary")
HOST_OF = {"primary": "hp", "secondary": "hs"}
READY_LINE = b"coloproxy-guest: ready"
# The guest's disk checker writes this many bytes per second (guest/init's default).
DISK_RATE = 65536
# What a guest kernel prints when its memory went bad (with `quiet` only these get through).
KERNEL_TROUBLE = (b"Kernel panic", b"BUG: ", b"Oops", b"general protection fault")


class LabError(ColoproxyError):
    """Something the lab started did not do what it should, in time; the message says what."""


@dataclass(frozen=True, slots=True)
class VmSpec:
    """Everything that makes one lab QEMU's command line."""

    role: str  # "primary" or "secondary"
    binary: Path
    firmware: Path
    kernel: Path
    initrd: Path
    accel: str
    paths: LabPaths
    incoming: str | None = None
    qemu_filters: bool = False
    memcheck_mib: int = 32
    # QEMU's filters as with qemu_filters, but host P's colo-compare replaced by coloproxy's
    # chardev transport (docs/chardev.md): the lab's ``--chardev`` mode.
    chardev: bool = False
    # The guest's disk (docs/lab.md, "The disk"): a QEMU started with ``incoming`` gets the
    # secondary's drives (base, replication node, quorum), else the primary's quorum.
    disk: DiskSettings | None = None
    # The guest's disk checker (guest/init): bytes per second it writes, 0 for none.
    disk_rate: int = DISK_RATE


def disk_settings(paths: LabPaths, role: str) -> DiskSettings:
    """The disk of ``role``'s host (host P: "primary"), as its config's disk section says
    (configs.disk_text; tests/test_disk_replication.py checks that they agree)."""
    host, peer = ("hp", "hs") if role == "primary" else ("hs", "hp")
    return DiskSettings(
        image=str(paths.disk_image(role)),
        active=str(paths.disk_active(role)),
        hidden=str(paths.disk_hidden(role)),
        format="raw",
        local=REPLICATION_IPV4[host],
        remote=REPLICATION_IPV4[peer],
        nbd_port=NBD_PORT,
    )


def make_disk(paths: LabPaths, role: str, *, image: bool = True) -> None:
    """``role``'s host's disk files: a blank raw image (``image``; with an ext4 file system
    on its first DISK_FS_MIB when mkfs.ext4 is there: the rest stays zero, for the tests'
    own blocks) and the empty qcow2 active and hidden disks of the same size
    that a secondary needs (qemu-img, Debian's qemu-utils)."""
    size = f"{DISK_SIZE_MIB}M"
    if image:
        path = paths.disk_image(role)
        path.unlink(missing_ok=True)
        with path.open("wb") as blank:
            blank.truncate(DISK_SIZE_MIB << 20)
        mkfs = shutil.which("mkfs.ext4")
        if mkfs is not None:
            argv = [mkfs, "-q", "-F", "-L", "coloproxy", str(path), f"{DISK_FS_MIB}M"]
            _run(argv, "mkfs.ext4")
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise LabError("qemu-img is missing (Debian's qemu-utils): run scripts/setup lab")
    for overlay in (paths.disk_active(role), paths.disk_hidden(role)):
        overlay.unlink(missing_ok=True)
        _run([qemu_img, "create", "-q", "-f", "qcow2", str(overlay), size], "qemu-img create")


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise LabError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()}")


def guest_cmdline(memcheck_mib: int = 32, disk: bool = False, disk_rate: int = 0) -> str:
    """The guest's kernel command line: the LAN's guest addresses on eth0; with ``disk``
    the guest mounts its virtio disk (vda) and runs the disk checker at ``disk_rate``."""
    return build.guest_cmdline(
        ip=f"{GUEST_IPV4}/24",
        ip6=f"{GUEST_IPV6}/64",
        memcheck_mib=memcheck_mib,
        memcheck_rate=1024,
        # Status lines on the console: after a failover they show the secondary going on
        # from the primary's memory (tests/test_qemu_colo.py reads them the same way).
        memcheck_console=True,
        disk="vda" if disk else None,
        disk_rate=disk_rate,
        disk_console=True,  # the same for the disk checker (lab.diskcheck_summary)
    )


def qemu_argv(spec: VmSpec) -> list[str]:
    """The QEMU command line of one lab VM (without the ``ip netns exec`` in front)."""
    paths = spec.paths
    netdev = f"tap,id=hn0,ifname={GUEST_PORT},script=no,downscript=no,vhost=off"
    if spec.qemu_filters or spec.chardev:
        netdev += ",vnet_hdr=off"
    argv = [
        str(spec.binary),
        *("-name", f"coloproxy-lab-{spec.role}", "-machine", "pc", "-accel", spec.accel),
        *("-m", "256", "-smp", "1", "-nodefaults", "-display", "none", "-vga", "none"),
        *("-L", str(spec.firmware)),
        *("-kernel", str(spec.kernel), "-initrd", str(spec.initrd)),
        *("-append", guest_cmdline(spec.memcheck_mib, spec.disk is not None, spec.disk_rate)),
        *("-netdev", netdev),
        # No option ROM: the kernel is loaded directly, nothing boots from the network.
        *("-device", f"virtio-net-pci,netdev=hn0,mac={GUEST_MAC},romfile="),
        *(drive_argv(spec.disk, "secondary" if spec.incoming else "primary") if spec.disk else ()),
        *("-serial", f"file:{paths.serial_log(spec.role)}"),
        *("-qmp", f"unix:{paths.qmp_socket(spec.role)},server=on,wait=off"),
        *("-qmp", f"unix:{paths.lab_qmp_socket(spec.role)},server=on,wait=off"),
    ]
    if spec.qemu_filters:
        argv += _filter_argv(spec.role)
    elif spec.chardev:
        argv += _chardev_filter_argv(spec.role)
    if spec.incoming is not None:
        argv += ["-incoming", spec.incoming]
    return argv


def _filter_argv(role: str) -> list[str]:
    """QEMU's own COLO network filters, as in QEMU's docs/COLO-FT.txt."""
    host_p = REPLICATION_IPV4["hp"]
    ports = FILTER_PORTS
    if role == "primary":
        chardevs = [
            f"socket,id=mirror0,host={host_p},port={ports['mirror']},server=on,wait=off",
            f"socket,id=compare1,host={host_p},port={ports['compare_secondary']},server=on,wait=off",
            f"socket,id=compare0,host=127.0.0.1,port={ports['compare_primary']},server=on,wait=off",
            f"socket,id=compare0-0,host=127.0.0.1,port={ports['compare_primary']}",
            f"socket,id=compare_out,host=127.0.0.1,port={ports['out']},server=on,wait=off",
            f"socket,id=compare_out0,host=127.0.0.1,port={ports['out']}",
        ]
        objects = [
            "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
            "filter-redirector,id=redire0,netdev=hn0,queue=rx,indev=compare_out",
            "filter-redirector,id=redire1,netdev=hn0,queue=rx,outdev=compare0",
            "iothread,id=iothread1",
            "colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1,"
            "outdev=compare_out0,iothread=iothread1",
        ]
    else:
        chardevs = [
            f"socket,id=red0,host={host_p},port={ports['mirror']},reconnect=1",
            f"socket,id=red1,host={host_p},port={ports['compare_secondary']},reconnect=1",
        ]
        objects = [
            "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0",
            "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1",
            "filter-rewriter,id=rew0,netdev=hn0,queue=all",
        ]
    return _as_argv(chardevs, objects)


def _as_argv(chardevs: list[str], objects: list[str]) -> list[str]:
    argv: list[str] = []
    for chardev in chardevs:
        argv += ["-chardev", chardev]
    for obj in objects:
        argv += ["-object", obj]
    return argv


def _chardev_filter_argv(role: str) -> list[str]:
    """QEMU's filters with coloproxy in place of colo-compare (docs/chardev.md): host P keeps
    its mirror and its two redirectors, whose chardevs coloproxy connects to (compare0: the
    PVM's output, compare_out: what coloproxy releases); colo-compare, its iothread and its
    three chardevs go. Host S's filters are unchanged: its red1 reaches coloproxy, which
    listens on host P's replication address."""
    if role != "primary":
        return _filter_argv(role)
    host_p = REPLICATION_IPV4["hp"]
    ports = FILTER_PORTS
    chardevs = [
        f"socket,id=mirror0,host={host_p},port={ports['mirror']},server=on,wait=off",
        f"socket,id=compare0,host=127.0.0.1,port={ports['compare_primary']},server=on,wait=off",
        f"socket,id=compare_out,host=127.0.0.1,port={ports['out']},server=on,wait=off",
    ]
    objects = [
        "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
        "filter-redirector,id=redire0,netdev=hn0,queue=rx,indev=compare_out",
        "filter-redirector,id=redire1,netdev=hn0,queue=rx,outdev=compare0",
    ]
    return _as_argv(chardevs, objects)


def vm_spec(
    role: str,
    paths: LabPaths,
    *,
    incoming: str | None,
    qemu_filters: bool = False,
    chardev: bool = False,
    disk: bool = False,
    disk_rate: int = DISK_RATE,
) -> VmSpec:
    """A spec with the built QEMU and guest image (LabNotBuiltError when they are missing);
    ``disk``: with the disk of ``role``'s host (:func:`disk_settings`)."""
    return VmSpec(
        role=role,
        binary=build.qemu_binary(),
        firmware=build.qemu_firmware_dir(),
        kernel=build.guest_kernel(),
        initrd=build.guest_initrd(),
        accel=build.accelerator(),
        paths=paths,
        incoming=incoming,
        qemu_filters=qemu_filters,
        chardev=chardev,
        disk=disk_settings(paths, role) if disk else None,
        disk_rate=disk_rate,
    )


def start_vm(topology: Topology, spec: VmSpec) -> int:
    """Start one QEMU inside its host's namespace; its pid (QEMU itself: ip execs it)."""
    paths = spec.paths
    for stale in (
        paths.qmp_socket(spec.role),
        paths.lab_qmp_socket(spec.role),
        paths.serial_log(spec.role),
    ):
        stale.unlink(missing_ok=True)
    with paths.qemu_log(spec.role).open("wb") as output:
        process = topology.popen(
            HOST_OF[spec.role],
            qemu_argv(spec),
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return adopt(process)


# Children of this process, by pid: polled to collect them once they exit, so that neither a
# zombie looks alive nor a Popen object complains it was dropped while its process ran.
_children: dict[int, subprocess.Popen[Any]] = {}


def adopt(process: subprocess.Popen[Any]) -> int:
    _children[process.pid] = process
    return int(process.pid)


def reap(pid: int) -> None:
    """Collect ``pid`` if it is our child and has exited."""
    process = _children.get(pid)
    if process is not None and process.poll() is not None:
        del _children[pid]


def alive(pid: int) -> bool:
    reap(pid)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie: not ours, or not collected yet; dead either way


def stop_process(pid: int, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; harmless if it is gone."""
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(250):
        if not alive(pid):
            return
        time.sleep(0.02)


def console(paths: LabPaths, role: str) -> bytes:
    try:
        return paths.serial_log(role).read_bytes()
    except FileNotFoundError:
        return b""


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(paths: LabPaths, role: str, pid: int, timeout: float) -> float:
    """Wait for the guest's ready line; the seconds it took. LabError on timeout or exit."""
    started = time.monotonic()
    deadline = started + timeout
    while READY_LINE not in console(paths, role):
        if not alive(pid):
            raise LabError(
                f"the {role} QEMU exited before its guest was ready; its output:\n"
                + tail(paths.qemu_log(role))
            )
        if time.monotonic() > deadline:
            raise LabError(
                f"the {role} guest did not print 'coloproxy-guest: ready' within "
                f"{timeout:.0f} s; its console ends with:\n" + tail(paths.serial_log(role))
            )
        time.sleep(0.1)
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------
# the lab's own QMP monitor


@dataclass
class Monitor:
    """One QMP connection (the lab's monitor) with the events it saw, timestamped by QEMU."""

    role: str
    path: Path
    client: Any = None
    events: list[tuple[str, float, dict[str, Any]]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _pump: asyncio.Task[None] | None = None
    _watch: asyncio.Task[None] | None = None

    async def connect(self, timeout: float = 20.0) -> Monitor:
        from qemu.qmp import QMPClient

        deadline = time.monotonic() + timeout
        while not self.path.exists():
            if time.monotonic() > deadline:
                raise LabError(f"the {self.role} QEMU made no QMP socket {self.path}")
            await asyncio.sleep(0.05)
        # QMPClient logs every failure at ERROR; the lab says what failed itself.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        self.client = QMPClient(f"lab-{self.role}")
        try:
            await self.client.connect(str(self.path))
        except Exception as exc:  # qemu.qmp raises ConnectError wrapping the OSError
            raise LabError(
                f"cannot connect to the {self.role} QMP socket {self.path}: {exc}"
            ) from exc
        self._pump = asyncio.create_task(self._collect(), name=f"qmp-events-{self.role}")
        self._watch = asyncio.create_task(self._watch_runstate(), name=f"qmp-state-{self.role}")
        return self

    async def _watch_runstate(self) -> None:
        """Set ``closed`` when the connection drops (the QEMU exited or was killed): an event
        listener just stops receiving, it does not end."""
        from qemu.qmp.protocol import Runstate

        try:
            while self.client.runstate is Runstate.RUNNING:
                await self.client.runstate_changed()
        finally:
            self.closed.set()
            self.arrived.set()

    async def _collect(self) -> None:
        from qemu.qmp import EventListener

        listener = EventListener()
        try:
            with self.client.listen(listener):
                async for event in listener:
                    message: dict[str, Any] = dict(event)
                    stamp = message["timestamp"]
                    when = stamp["seconds"] + stamp["microseconds"] / 1e6
                    self.events.append((str(message["event"]), when, message.get("data", {})))
                    self.arrived.set()
        finally:
            self.closed.set()
            self.arrived.set()

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        try:
            return await self.client.execute(command, arguments)
        except Exception as exc:  # ExecuteError, a dropped connection: both say what
            raise LabError(f"{self.role} QEMU: {command}: {exc}") from exc

    async def wait_event(self, name: str, after: int, timeout: float) -> int:
        """The index of the first ``name`` event at index >= ``after``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for index in range(after, len(self.events)):
                        if self.events[index][0] == name:
                            return index
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            raise LabError(
                f"the {self.role} QEMU sent no {name} event within {timeout:g} s"
            ) from None

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
        for task in (self._pump, self._watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def colo_mode(monitor: Monitor) -> str:
    status = await monitor.execute("query-colo-status")
    return str(status["mode"])


async def qemu_version(monitor: Monitor) -> tuple[int, int]:
    version = (await monitor.execute("query-version"))["qemu"]
    return int(version["major"]), int(version["minor"])


__all__ = [
    "HOST_OF",
    "KERNEL_TROUBLE",
    "ROLES",
    "LabError",
    "Monitor",
    "VmSpec",
    "adopt",
    "alive",
    "colo_mode",
    "console",
    "disk_settings",
    "guest_cmdline",
    "make_disk",
    "qemu_argv",
    "qemu_version",
    "start_vm",
    "stop_process",
    "tail",
    "vm_spec",
    "wait_ready",
]
