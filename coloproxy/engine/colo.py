"""The COLO steps on the local QEMU (shell): the QMP sequences that bring a pair into COLO and
take one host out of it, in their order and with the reasons for it (docs/engine.md,
docs/invariants.md, QEMU's COLO-FT.txt).

Theory of operation
-------------------
:class:`ColoSteps` knows which QMP commands to send, in which order, and what a failed one
means; it does not decide *when*: the runner (:mod:`coloproxy.engine.runner`) calls it when
its scheduler or failover decider says so, and is told, through the callbacks it passes, at
the points where the scheduler must hear of it (the migration that enters COLO began, or
failed).

- **Bring-up** (primary): the secondary's disk is made equal to this one and its
  replication child joins (the guest stopped in between: no write may fall between the
  copy's end and the replication's start), ``x-colo`` on, the backstop
  ``x-checkpoint-delay``, then ``migrate``; COLO's first resume is the first checkpoint.
- **Ready** (secondary): its QEMU waits for the migration, ``x-colo`` on where QEMU wants it,
  its disk exported for the primary's replication child.
- **Running alone** (both, :meth:`ColoSteps.leave_colo` on the primary when the secondary
  is lost, :meth:`ColoSteps.take_over` on the secondary when the primary is lost): the
  disk's replication step first, ``x-colo-lost-heartbeat``, the ``failover_object_del``
  objects deleted, then the proxy told it runs unprotected; a secondary that takes over then
  moves its guest port into the LAN and announces itself. Each step's time after the
  decision is kept (:class:`FailoverSteps`, the figures' failover gap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from coloproxy.engine.disk import DiskError, DiskReplication
from coloproxy.engine.heartbeat import ColoMode
from coloproxy.engine.qmp import ColoStatus, MigrationStats, QemuMonitor, QmpError, QmpEvent
from coloproxy.engine.settings import EngineSettings
from coloproxy.metrics import EngineFigures
from coloproxy.protocol import Failover, Mode
from coloproxy.role import Role

log = logging.getLogger(__name__)

# The migration that enters COLO moves the guest's RAM once: 0.6-1.0 s for 256 MiB here
# (docs/invariants.md); a large guest on a slow link takes minutes.
BRING_UP_TIMEOUT: Final = 600.0


class FailoverSteps:
    """A failover's steps, each as seconds after its decision, written into ``times`` (the
    figures' ``last_failover``, emptied here)."""

    def __init__(self, times: dict[str, float], clock: Callable[[], float]) -> None:
        times.clear()
        self.times = times
        self._clock = clock
        self.started = clock()

    def mark(self, step: str, at: float | None = None) -> None:
        """``step`` is done now (or was at ``at``, on the same clock)."""
        self.times[step] = (self._clock() if at is None else at) - self.started

    def summary(self) -> str:
        return ", ".join(f"{step} {took * 1000:.1f} ms" for step, took in self.times.items())


class ColoSteps:
    """The QMP sequences of one host's engine on its QEMU monitor (and its disk's
    replication). ``tell_proxy`` hands the proxy a ``failover`` message; ``attach_lan`` moves
    the guest port into the LAN bridge at takeover (blocking: run in a thread), None when the
    daemon manages no network."""

    def __init__(
        self,
        monitor: QemuMonitor,
        settings: EngineSettings,
        figures: EngineFigures,
        *,
        clock: Callable[[], float],
        tell_proxy: Callable[[Failover], Awaitable[None]],
        attach_lan: Callable[[], object] | None = None,
    ) -> None:
        self.monitor = monitor
        self.settings = settings
        self.figures = figures
        self.role = settings.role
        self.disk = DiskReplication(monitor, settings.disk) if settings.disk is not None else None
        self.attach_lan = attach_lan
        self._clock = clock
        self._tell_proxy = tell_proxy
        self._io_errors: set[tuple[str, str]] = set()  # BLOCK_IO_ERRORs logged (drive, cause)

    # -- into COLO -------------------------------------------------------------------------

    async def bring_up(
        self,
        uri: str,
        backstop_ms: int,
        *,
        migrating: Callable[[], None],
        aborted: Callable[[], None],
    ) -> None:
        """The primary enters COLO with a secondary that said it is ready. ``migrating`` is
        called once the migration is about to start (its last stop is the first
        checkpoint); ``aborted`` when it will not end in COLO after all."""
        monitor, disk = self.monitor, self.disk
        version = await monitor.version()
        if disk is not None:
            # The secondary's base must equal this disk before the replication child joins:
            # the guest has written since it booted (and, at a reprotect, since the
            # takeover). A failed copy leaves the pair out of COLO, said in the log.
            try:
                await disk.check_layout("primary")
                await disk.sync()
            except (QmpError, TimeoutError) as exc:
                log.error("bring-up: the disk cannot be replicated: %s", exc)
                return
            self.figures.disk_sync_s = disk.figures.seconds
        log.info("bring-up: QEMU %d.%d, x-colo on, migrating to %s", *version, uri)
        await monitor.enable_colo()
        await monitor.set_checkpoint_delay(backstop_ms)
        migrating()
        started = self._clock()
        if disk is not None:
            # Stopped from here to COLO's first resume (this STOP is the entry checkpoint's):
            # no guest write may fall between the mirror's end and the replication's start,
            # which QEMU's COLO code does once the secondary is ready.
            await monitor.stop_guest()
            try:
                await disk.attach()
            except (DiskError, QmpError, TimeoutError) as exc:
                log.error("bring-up: adding the disk's replication child: %s", exc)
                aborted()
                with contextlib.suppress(QmpError):
                    await monitor.execute("cont")
                return
        await monitor.migrate(uri)
        stats = MigrationStats("none")
        async with asyncio.timeout(BRING_UP_TIMEOUT):
            while True:
                stats = await monitor.migration_stats()
                if stats.status in ("colo", "failed", "cancelled", "completed"):
                    break
                await asyncio.sleep(0.02)
        if stats.status != "colo":
            log.error("bring-up failed: the migration ended %s, not in COLO", stats.status)
            aborted()
            if disk is not None and disk.attached:
                with contextlib.suppress(QmpError):
                    await disk.detach()
                if await monitor.run_state() != "running":
                    await monitor.execute("cont")
            return
        self.figures.time_to_colo = self._clock() - started
        log.info("bring-up: COLO state %.2f s after migrate", self.figures.time_to_colo)

    async def ready_secondary(self, status: ColoStatus) -> bool:
        """Whether the secondary QEMU (COLO mode per ``status``) waits for the migration,
        made ready where it needs to be."""
        monitor, disk = self.monitor, self.disk
        state = await monitor.run_state()
        ready = status.mode == ColoMode.SECONDARY.value
        if not ready and state == "inmigrate":
            version = await monitor.version()
            if self.settings.bring_up and version >= (8, 1):
                await monitor.enable_colo()  # QEMU 8.1+ wants x-colo on the secondary too
            ready = True
            if disk is not None:
                # The primary copies its disk into this export, then its replication child
                # writes there: not ready (the primary waits) until it is up.
                try:
                    await disk.check_layout("secondary")
                    await disk.serve()
                except QmpError as exc:
                    log.error("secondary not ready: the disk cannot be replicated: %s", exc)
                    ready = False
        if ready:
            log.info("secondary QEMU ready (status %s, COLO mode %s)", state, status.mode)
        else:
            log.warning(
                "secondary QEMU is not waiting for a migration (status %s, COLO mode %s)",
                state,
                status.mode,
            )
        return ready

    # -- out of COLO -----------------------------------------------------------------------

    async def leave_colo(self, steps: FailoverSteps, reason: str) -> None:
        """Secondary lost: the primary QEMU leaves COLO and the proxy runs unprotected."""
        if self.disk is not None:
            # The replication child goes first (COLO-FT.txt): the guest's writes must not
            # wait for a secondary that is gone.
            try:
                await self.disk.detach_lost()
                steps.mark("disk")
            except QmpError as exc:
                log.error("disk: removing the replication child: %s", exc)
        await self._run_alone(steps, f"secondary lost ({reason}); running unprotected")

    async def take_over(self, steps: FailoverSteps, reason: str) -> bool:
        """Primary lost: the SVM runs alone, on the LAN, and the proxy is told. False when
        QEMU refused to leave COLO (nothing else was done)."""
        if self.disk is not None:
            # The NBD export goes first (COLO-FT.txt); at x-colo-lost-heartbeat the replication
            # driver commits the active disk into the base: this disk is the truth now.
            await self.disk.stop_serving()
            steps.mark("disk")
        # The proxy is told before the guest reaches the LAN: it must shift the SVM's output
        # for the connections opened since the last checkpoint before that output leaves.
        if not await self._run_alone(steps, f"primary lost ({reason}); took over"):
            return False
        if self.attach_lan is None:
            log.warning(
                "no network configured in this daemon: the guest port is not moved to the"
                " LAN (attach_guest_to_lan skipped)"
            )
        else:
            try:
                await asyncio.to_thread(self.attach_lan)
                steps.mark("lan")
            except Exception:
                log.exception("moving the guest port to the LAN failed")
        try:
            await self.monitor.announce_self()
            steps.mark("announce")
        except QmpError as exc:
            log.error("announce-self: %s", exc)
        return True

    async def _run_alone(self, steps: FailoverSteps, why: str) -> bool:
        """The steps both roles take to run alone: ``x-colo-lost-heartbeat``, the filters
        deleted, the proxy told it runs unprotected. A secondary whose QEMU refuses the first
        takes none of the others (False): its guest is no consistent copy to serve; a
        primary's guest runs on all the same."""
        try:
            await self.monitor.lost_heartbeat()
            steps.mark("lost-heartbeat")
        except QmpError as exc:
            if self.role is Role.SECONDARY:
                log.error("cannot take over: x-colo-lost-heartbeat: %s", exc)
                return False
            log.error("x-colo-lost-heartbeat on the primary: %s", exc)
        if await self.delete_filters():
            steps.mark("object-del")
        await self._tell_proxy(Failover(Role.PRIMARY, Mode.UNPROTECTED, why))
        steps.mark("proxy")
        return True

    async def delete_filters(self) -> bool:
        """``object-del`` each of ``failover_object_del``; False when there are none. A
        failure is logged and the rest still go: a filter left in place is the operator's
        to remove, the failover itself goes on."""
        ids = self.settings.failover_object_del
        for object_id in ids:
            try:
                await self.monitor.execute("object-del", {"id": object_id})
                log.info("failover: object-del %s", object_id)
            except QmpError as exc:
                log.error("failover: object-del %s: %s", object_id, exc)
        return bool(ids)

    # -- what QEMU reports -----------------------------------------------------------------

    def block_io_error(self, event: QmpEvent) -> None:
        """A guest disk request failed in the local QEMU: say it once per drive and cause
        (QEMU's werror policy then stops the guest on ENOSPC; on a secondary the next
        checkpoint ends its COLO). The cause is the first thing a user needs."""
        data = event.data
        device = str(data.get("device") or data.get("node-name") or "?")
        reason = str(data.get("reason", "?"))
        if (device, reason) in self._io_errors:
            return
        self._io_errors.add((device, reason))
        where = ""
        if data.get("nospace") is True:
            where = ": the file system under it is full" + (
                " (a secondary's active and hidden disks, disk.active and disk.hidden,"
                " take the writes of a checkpoint period)"
                if self.role is Role.SECONDARY
                else ""
            )
        log.error(
            "disk: a guest %s on %s failed in this host's QEMU (%s, action %s)%s",
            data.get("operation", "request"),
            device,
            reason,
            data.get("action", "?"),
            where,
        )

    async def migration_figures(self) -> dict[str, int]:
        """The COLO migration's figures that QEMU reports (the primary's, in COLO)."""
        stats = await self.monitor.migration_stats()
        return {
            name: value
            for name, value in (
                ("ram_transferred", stats.ram_transferred),
                ("ram_total", stats.ram_total),
                ("ram_normal_pages", stats.ram_normal_pages),
                ("ram_duplicate_pages", stats.ram_duplicate_pages),
                ("dirty_pages_rate", stats.dirty_pages_rate),
                ("dirty_sync_count", stats.dirty_sync_count),
            )
            if value is not None
        }


__all__ = ["BRING_UP_TIMEOUT", "ColoSteps", "FailoverSteps"]
