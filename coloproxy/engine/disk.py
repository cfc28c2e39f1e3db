"""The guest's disk: QEMU's block replication, driven over QMP (shell).

Theory of operation
-------------------
QEMU replicates a COLO guest's disk itself (QEMU's docs/block-replication.txt): on the
primary the guest's drive is a *quorum* (``read-pattern=fifo, vote-threshold=1``) whose
first child is the local image; a second child, a ``replication`` node in ``mode=primary``
over an NBD client, is added before COLO starts, so that every guest write goes to both. On
the secondary the guest's drive is a quorum over a ``replication`` node in
``mode=secondary``: the SVM writes into an *active* disk (qcow2), whose backing *hidden*
disk (qcow2) keeps the base image's old contents while the primary's writes arrive in the
base (``disk.export``) through an NBD export. At each checkpoint QEMU's COLO code itself
calls ``replication_do_checkpoint_all`` (the secondary empties its active and hidden disks:
the base now holds the primary's state): **the engine does nothing per checkpoint**. The
engine does what QEMU leaves to its user (COLO-FT.txt), and this module holds those steps:

- secondary, before the migration: ``nbd-server-start`` on its replication address and
  ``nbd-server-add`` of the base drive, writable (:meth:`DiskReplication.serve`);
- primary, before the migration: bring the secondary's base up to date with the local
  disk (``drive-mirror sync=full mode=existing`` into the NBD export, until
  ``BLOCK_JOB_READY``: the guest has written since it booted), then, the guest stopped,
  cancel the mirror and add the replication child (``drive_add -n buddy
  driver=replication,mode=primary,...`` and ``x-blockdev-change``), then migrate
  (:meth:`DiskReplication.sync` and :meth:`DiskReplication.attach`); the guest runs again
  when COLO starts;
- failover on the secondary: ``nbd-server-stop`` before ``x-colo-lost-heartbeat`` (the
  replication driver then commits the active disk into the base: the SVM's disk is the
  truth from then on);
- failover on the primary: ``x-blockdev-change`` removes the replication child and
  ``drive_del`` deletes it before ``x-colo-lost-heartbeat``; when QEMU has not done it
  within a second the NBD link is taken for hung (QEMU 7.2's NBD client has no I/O
  timeout: a link that drops packets blocks the primary's block layer and main loop) and
  its connections are destroyed until the child is gone (:meth:`DiskReplication.detach_lost`);
- re-protection: the survivor runs the primary's steps again (its drive is the former
  secondary's quorum; the new child is ``children.1`` again).

:func:`drive_argv` gives the QEMU command line for the disk in each role, from the same
settings, so the layout the engine drives is the one QEMU was started with.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass, field
from typing import Final

from coloproxy.config import Config, DiskConfig
from coloproxy.engine.qmp import QemuMonitor, QmpError

log = logging.getLogger(__name__)

# The replication child's node name on the primary, and the mirror's job id.
REPLICATION_NODE: Final = "replication0"
SYNC_JOB: Final = "colo-sync"
# The secondary's replication node (between its quorum and the active disk).
SECONDARY_NODE: Final = "colo-childs0"
SYNC_POLL: Final = 0.1
# After a takeover the replication driver commits the active disk into the base (an internal
# job) and keeps the drive blocked meanwhile: the first drive-mirror may be refused.
MIRROR_RETRY_S: Final = 60.0
# Secondary lost: the replication child's removal is given this long before the engine takes
# the NBD link for hung and cuts it (QEMU 7.2's NBD client has no I/O timeout: a link that
# drops packets holds the guest's writes, a checkpoint's drain and the whole main loop, QMP
# included, until TCP gives up, about 15 minutes), then cuts again at this interval until
# the child is gone (each new request makes the NBD client try to reconnect, which hangs too).
CUT_GRACE_S: Final = 1.0
CUT_EVERY_S: Final = 0.5


class DiskError(QmpError):
    """A block replication step failed; the message says which and what QEMU said."""


@dataclass(frozen=True, slots=True)
class DiskSettings:
    """The disk section of the config, with the addresses of this host and its peer."""

    image: str
    active: str
    hidden: str
    format: str
    local: str  # this host's replication address: its NBD export listens here
    remote: str  # the peer's: the primary's NBD client connects there
    nbd_port: int = 8889
    drive: str = "colo-disk0"
    export: str = "parent0"
    sync_timeout: float = 600.0

    @classmethod
    def from_config(cls, config: Config) -> DiskSettings | None:
        disk: DiskConfig | None = config.disk
        if disk is None:
            return None
        return cls(
            image=disk.image,
            active=disk.active,
            hidden=disk.hidden,
            format=disk.format.value,
            local=str(config.net.replication.local),
            remote=str(config.net.replication.remote),
            nbd_port=disk.nbd_port,
            drive=disk.drive,
            export=disk.export,
            sync_timeout=disk.sync_timeout_ms / 1000,
        )


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def drive_argv(settings: DiskSettings, role: str, device: str = "virtio-blk-pci") -> list[str]:
    """The QEMU arguments of the guest's disk for a QEMU started as ``role`` (``primary``:
    a quorum over the image; ``secondary``: the base, the replication node over the active
    and hidden disks, a quorum over it), QEMU's COLO-FT.txt layout. The guest sees the same
    device either way (the migration needs the same devices on both sides)."""
    if role == "primary":
        drives = [
            f"if=none,id={settings.drive},driver=quorum,read-pattern=fifo,vote-threshold=1,"
            f"children.0.driver={settings.format},children.0.file.filename={settings.image}"
        ]
    elif role == "secondary":
        drives = [
            f"if=none,id={settings.export},driver={settings.format},file.filename={settings.image}",
            f"if=none,id={SECONDARY_NODE},driver=replication,mode=secondary,"
            f"top-id={settings.drive},file.driver=qcow2,file.file.filename={settings.active},"
            f"file.backing.driver=qcow2,file.backing.file.filename={settings.hidden},"
            f"file.backing.backing={settings.export}",
            f"if=none,id={settings.drive},driver=quorum,read-pattern=fifo,vote-threshold=1,"
            f"children.0={SECONDARY_NODE}",
        ]
    else:
        raise ValueError(f"role {role!r}: primary or secondary")
    argv: list[str] = []
    for drive in drives:
        argv += ["-drive", drive]
    argv += ["-device", f"{device},drive={settings.drive},id={settings.drive}-dev"]
    return argv


@dataclass
class SyncFigures:
    """The last full copy to the secondary (bring-up or reprotect)."""

    seconds: float = 0.0
    bytes: int = 0
    stopped_ms: float = 0.0  # guest stopped: the mirror's cancel and the child's addition
    history: list[tuple[float, int]] = field(default_factory=list)


class DiskReplication:
    """The block replication steps of one host's engine, on its QEMU monitor."""

    def __init__(self, monitor: QemuMonitor, settings: DiskSettings) -> None:
        self.monitor = monitor
        self.settings = settings
        self.figures = SyncFigures()
        self.attached = False  # the primary's replication child is in the quorum

    # -- both ------------------------------------------------------------------------------

    async def _hmp(self, command: str) -> None:
        """An HMP command (drive_add, drive_del have no QMP equivalent for this); HMP says
        failure in its output text, which is empty on success."""
        reply = await self.monitor.execute("human-monitor-command", {"command-line": command})
        text = str(reply or "").strip()
        if text and not text.startswith("OK"):
            raise DiskError(f"{command.split(maxsplit=1)[0]}: {text}", "human-monitor-command")

    async def check_layout(self, role: str) -> None:
        """The QEMU has the drives :func:`drive_argv` gives: a clear error otherwise (a QEMU
        started without them would enter COLO and leave the disk unprotected)."""
        reply = await self.monitor.execute("query-block")
        devices = {
            str(entry.get("device")): entry
            for entry in (reply if isinstance(reply, list) else [])
            if isinstance(entry, dict)
        }
        drive = devices.get(self.settings.drive)
        inserted = drive.get("inserted") if drive is not None else None
        if not isinstance(inserted, dict) or inserted.get("drv") != "quorum":
            raise DiskError(
                f"the QEMU has no quorum drive {self.settings.drive!r} (disk.drive): start it"
                f' with the disk\'s drives (docs/engine.md, "The disk"); drives: '
                + (", ".join(sorted(devices)) or "none")
            )
        if role == "secondary" and self.settings.export not in devices:
            raise DiskError(
                f"the secondary QEMU has no drive {self.settings.export!r} (disk.export, the"
                " base under the replication node)"
            )

    # -- secondary -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Export the base over NBD on this host's replication address (before migrate)."""
        settings = self.settings
        address = {
            "type": "inet",
            "data": {"host": settings.local, "port": str(settings.nbd_port)},
        }
        try:
            await self.monitor.execute("nbd-server-start", {"addr": address})
        except QmpError as exc:
            if "already" not in str(exc):  # an engine restarted: the server runs
                where = f"{settings.local}:{settings.nbd_port}"
                raise DiskError(f"nbd-server-start on {where}: {exc}") from exc
        try:
            await self.monitor.execute(
                "nbd-server-add", {"device": settings.export, "writable": True}
            )
        except QmpError as exc:
            if exc.error_class == "CommandNotFound":  # a QEMU without the legacy command
                await self._export(settings.export)
            elif "already" not in str(exc):
                raise DiskError(f"nbd-server-add {settings.export}: {exc}") from exc
        log.info(
            "disk: %s exported over NBD on %s:%d",
            settings.export,
            settings.local,
            settings.nbd_port,
        )

    async def _export(self, name: str) -> None:
        """``block-export-add`` (QEMU 5.2 and later), the same export as nbd-server-add's.
        It takes a node name, not a drive's id: the drive's top node (query-block)."""
        reply = await self.monitor.execute("query-block")
        node = name
        for entry in reply if isinstance(reply, list) else []:
            inserted = entry.get("inserted") if isinstance(entry, dict) else None
            if entry.get("device") == name and isinstance(inserted, dict):
                node = str(inserted.get("node-name", name))
        try:
            await self.monitor.execute(
                "block-export-add",
                {"type": "nbd", "id": name, "node-name": node, "name": name, "writable": True},
            )
        except QmpError as exc:
            if "already" not in str(exc):
                raise DiskError(f"block-export-add {name}: {exc}") from exc

    async def stop_serving(self) -> None:
        """Takeover: the NBD export goes before ``x-colo-lost-heartbeat`` (COLO-FT.txt)."""
        try:
            await self.monitor.execute("nbd-server-stop")
        except QmpError as exc:
            log.warning("disk: nbd-server-stop: %s", exc)

    # -- primary ---------------------------------------------------------------------------

    def _target(self) -> str:
        s = self.settings
        return f"nbd://{_host(s.remote)}:{s.nbd_port}/{s.export}"

    async def _jobs(self) -> dict[str, dict[str, object]]:
        reply = await self.monitor.execute("query-block-jobs")
        return {
            str(job.get("device")): job
            for job in (reply if isinstance(reply, list) else [])
            if isinstance(job, dict)
        }

    async def sync(self) -> None:
        """Copy the whole disk into the secondary's export and keep it mirrored until
        :meth:`attach` (``drive-mirror sync=full``, waiting for ``ready``)."""
        settings = self.settings
        started = time.monotonic()
        arguments: dict[str, object] = {
            "device": settings.drive,
            "job-id": SYNC_JOB,
            "target": self._target(),
            "mode": "existing",
            "format": "raw",  # the export shows the base's guest-visible contents
            "sync": "full",
        }
        while True:
            try:
                await self.monitor.execute("drive-mirror", arguments)
                break
            except QmpError as exc:
                if time.monotonic() - started > MIRROR_RETRY_S:
                    raise DiskError(f"drive-mirror to {self._target()}: {exc}") from exc
                log.info("disk: drive-mirror refused (%s); again in 1 s", exc)
                await asyncio.sleep(1.0)
        log.info("disk: copying %s to %s", settings.drive, self._target())
        deadline = started + settings.sync_timeout
        job: dict[str, object] | None = None
        while True:
            job = (await self._jobs()).get(SYNC_JOB)
            if job is None:
                raise DiskError(
                    f"the copy to {self._target()} ended before it was in sync (the NBD"
                    " link or the secondary's disk failed; see the QEMU's log)"
                )
            if job.get("ready") is True:
                break
            if time.monotonic() > deadline:
                await self.cancel_sync()
                raise DiskError(
                    f"the copy to {self._target()} was not in sync within"
                    f" {settings.sync_timeout:.0f} s (disk.sync_timeout_ms):"
                    f" {job.get('offset')} of {job.get('len')} bytes"
                )
            await asyncio.sleep(SYNC_POLL)
        took = time.monotonic() - started
        length = job.get("len")
        self.figures.seconds = took
        self.figures.bytes = length if isinstance(length, int) else 0
        self.figures.history.append((took, self.figures.bytes))
        log.info(
            "disk: %s in sync with the secondary after %.2f s (%d bytes)",
            settings.drive,
            took,
            self.figures.bytes,
        )

    async def cancel_sync(self) -> None:
        """End the mirror and wait until it is gone. On a job in sync QEMU's cancel leaves
        the target a copy of the source as of this moment."""
        try:
            await self.monitor.execute("block-job-cancel", {"device": SYNC_JOB})
        except QmpError as exc:
            log.warning("disk: block-job-cancel: %s", exc)
            return
        async with asyncio.timeout(30.0):
            while SYNC_JOB in await self._jobs():
                await asyncio.sleep(0.01)

    async def attach(self) -> None:
        """The guest is stopped: end the mirror, add the replication child to the quorum."""
        started = time.monotonic()
        s = self.settings
        await self.cancel_sync()
        # A child left by an earlier failover whose removal failed would clash by name.
        await self.detach()
        await self._hmp(
            f"drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,"
            f"file.host={s.remote},file.port={s.nbd_port},file.export={s.export},"
            f"node-name={REPLICATION_NODE}"
        )
        try:
            await self.monitor.execute(
                "x-blockdev-change", {"parent": s.drive, "node": REPLICATION_NODE}
            )
        except QmpError as exc:
            await self._hmp(f"drive_del {REPLICATION_NODE}")
            raise DiskError(f"x-blockdev-change: adding the replication child: {exc}") from exc
        self.attached = True
        self.figures.stopped_ms = (time.monotonic() - started) * 1000
        log.info(
            "disk: replication child %s added to %s (NBD %s), %.1f ms",
            REPLICATION_NODE,
            s.drive,
            self._target(),
            self.figures.stopped_ms,
        )

    async def detach(self) -> None:
        """Secondary lost: the replication child leaves the quorum and is deleted, before
        ``x-colo-lost-heartbeat`` (COLO-FT.txt, "Primary Failover")."""
        s = self.settings
        child = await self._replication_child()
        if child is None:
            log.info("disk: no replication child in %s", s.drive)
            self.attached = False
            return
        try:
            await self.monitor.execute("x-blockdev-change", {"parent": s.drive, "child": child})
        except QmpError as exc:
            log.error("disk: removing the replication child %s: %s", child, exc)
            return
        try:
            await self._hmp(f"drive_del {REPLICATION_NODE}")
        except QmpError as exc:
            log.warning("disk: drive_del %s: %s", REPLICATION_NODE, exc)
        self.attached = False
        log.info("disk: replication child %s removed from %s", child, s.drive)

    async def cut_link(self) -> int:
        """Destroy this host's TCP connections to the peer's NBD export (``ss -K``: the
        kernel's sock_destroy, CONFIG_INET_DIAG_DESTROY): the NBD client's requests fail at
        once instead of waiting for TCP to give up. The number of connections cut; 0 and an
        error logged when ``ss`` or the kernel cannot."""
        s = self.settings
        ss = shutil.which("ss") or shutil.which("/usr/sbin/ss") or shutil.which("/sbin/ss")
        if ss is None:
            log.error("disk: cannot cut the NBD link: no ss (iproute2) on this host")
            return 0
        family = "-6" if ":" in s.remote else "-4"
        argv = [
            ss,
            "-K",
            "-H",
            "-t",
            "-n",
            family,
            "dst",
            _host(s.remote),
            "dport",
            "=",
            str(s.nbd_port),
        ]
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            log.error(
                "disk: cannot cut the NBD link (%s, exit %s): %s",
                " ".join(argv),
                process.returncode,
                err.decode(errors="replace").strip(),
            )
            return 0
        return sum(1 for line in out.decode(errors="replace").splitlines() if line.strip())

    async def detach_lost(self, grace: float = CUT_GRACE_S, every: float = CUT_EVERY_S) -> None:
        """Secondary lost: :meth:`detach`; if QEMU has not done it within ``grace`` seconds,
        the NBD link is taken for hung and cut (:meth:`cut_link`) every ``every`` seconds
        until it has: the blocked block layer gets its error and QEMU answers again."""
        task = asyncio.ensure_future(self.detach())
        cut = tries = 0
        try:
            done, _ = await asyncio.wait({task}, timeout=grace)
            while not done:
                now = await self.cut_link()
                tries += 1
                if tries == 1 and not now:
                    log.error(
                        "disk: the replication child not removed after %.1f s and no NBD"
                        " connection to %s:%d could be cut (none, or a kernel without"
                        " CONFIG_INET_DIAG_DESTROY); waiting for QEMU",
                        grace,
                        self.settings.remote,
                        self.settings.nbd_port,
                    )
                if now and not cut:
                    log.error(
                        "disk: the replication child not removed after %.1f s: the NBD link to"
                        " %s:%d looks hung (QEMU's block layer and monitor wait on it);"
                        " cutting its connections (sock_destroy)",
                        grace,
                        self.settings.remote,
                        self.settings.nbd_port,
                    )
                cut += now
                done, _ = await asyncio.wait({task}, timeout=every)
        finally:
            if not task.done():
                task.cancel()
        task.result()
        if cut:
            log.warning("disk: %d NBD connection(s) cut; the replication child is gone", cut)

    async def _replication_child(self) -> str | None:
        """The quorum's child name (``children.N``) of the replication node, None if absent."""
        reply = await self.monitor.execute("query-named-block-nodes", {"flat": True})
        nodes = reply if isinstance(reply, list) else []
        names = {str(n.get("node-name")) for n in nodes if isinstance(n, dict)}
        if REPLICATION_NODE not in names:
            return None
        # Quorum names its children children.0, children.1, ... and removes only the last;
        # ours is added last. x-debug-query-block-graph would say it, but is x-debug.
        graph = await self.monitor.execute("x-debug-query-block-graph")
        if isinstance(graph, dict):
            ids = {
                node.get("id"): node.get("name")
                for node in graph.get("nodes", [])
                if isinstance(node, dict)
            }
            for edge in graph.get("edges", []):
                if isinstance(edge, dict) and ids.get(edge.get("child")) == REPLICATION_NODE:
                    return str(edge.get("name"))
        return "children.1"


__all__ = [
    "REPLICATION_NODE",
    "SYNC_JOB",
    "DiskError",
    "DiskReplication",
    "DiskSettings",
    "SyncFigures",
    "drive_argv",
]
