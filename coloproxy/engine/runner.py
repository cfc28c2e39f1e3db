"""The checkpoint engine a daemon runs (shell): QMP to the local QEMU, the control socket to
its own proxy, heartbeats to the peer daemon; decisions by :mod:`coloproxy.engine.logic`.

Theory of operation
-------------------
Everything that happens is an input to one of the two pure state machines, on the event
loop, with ``now = loop.time()``: a ``checkpoint-request`` or ``set-period`` push from the
proxy (the engine is a control-socket client of role ``engine``, exactly like an external
engine, docs/control-protocol.md), a QMP event (``STOP``, ``RESUME``, ``COLO_EXIT``,
``SHUTDOWN``), the QMP socket closing (QEMU exited), a heartbeat, a timer, the result of a
``query-colo-status``. Inputs are handled at once and synchronously; the actions returned
are carried out by two *lanes* (serial worker tasks: one for QMP commands, one for
control messages, so a slow QMP command never delays a release) or by a task of their own
for a failover. One loop timer stays armed at the earliest of the two machines' timers.

Role primary: a request becomes an ``x-checkpoint-delay`` trigger; the primary's ``STOP``
becomes ``checkpoint-started``, its ``RESUME`` ``checkpoint-completed`` (QEMU emits it only
once the secondary holds the new state, docs/invariants.md), both with QEMU's own event
timestamps. Bring-up (``engine.bring_up``, the QEMUs not in COLO yet): once the secondary's
engine says its QEMU waits for the migration, enable ``x-colo``, set the backstop
``x-checkpoint-delay`` and ``migrate``; the migration's last stop and COLO's first resume
are the first checkpoint, which serves the restarted proxy's ``restart`` request (I6), once
``query-colo-status`` confirms COLO. Secondary lost: ``x-colo-lost-heartbeat`` on the
primary QEMU, then ``failover`` (mode unprotected) to the proxy, which then releases without
comparing.

Role secondary: watch the local QEMU and the primary's heartbeats. Primary lost:
``x-colo-lost-heartbeat`` on the secondary QEMU, ``failover`` (role primary, unprotected) to
the proxy, the guest port into the LAN bridge (``attach_lan``, which in the daemon also
replays the client SYNs of connections half-open on the SVM; skipped, with a warning, when
the daemon has no network configured), then ``announce-self``. Every step's
time after the decision is kept in the figures (the failover gap).

Task discipline as in qemu.qmp: an explicit runstate, background tasks that log why they
end, ``CancelledError`` always re-raised, every QMP error wrapped with its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Final

from coloproxy import __version__
from coloproxy.config import Config, ConfigError, QuorumService, read_key_file
from coloproxy.control.client import ControlClient
from coloproxy.control.errors import ControlConnectionError, ControlError
from coloproxy.engine.disk import DiskError, DiskReplication, DiskSettings
from coloproxy.engine.logic import (
    CheckpointAborted,
    CheckpointBegan,
    CheckpointEnded,
    CheckpointScheduler,
    CheckpointStalled,
    ColoMode,
    DecideAction,
    DeciderConfig,
    FailoverDecider,
    Heartbeat,
    LocalQemuLost,
    PeerRejected,
    Phase,
    PrimaryLost,
    QemuState,
    RequestsAbandoned,
    ScheduleAction,
    SchedulerConfig,
    SecondaryLost,
    SendHeartbeat,
    SplitBrain,
    StoodDown,
    Trigger,
    Unexpected,
    Watch,
)
from coloproxy.engine.logic_leader import (
    Acquire,
    Fenced,
    KeyLost,
    KeyPhase,
    LeaderAction,
    LeaderConfig,
    LeaderKey,
    Mark,
    Marked,
    Refused,
    Release,
    Renew,
    Unfenced,
    Won,
)
from coloproxy.engine.peer import HeartbeatPath, HeartbeatPeer
from coloproxy.engine.qmp import ColoStatus, MigrationStats, QemuMonitor, QmpError, QmpEvent
from coloproxy.engine.quorum import EtcdSettings, EtcdStore, LeaderStore, QuorumError
from coloproxy.metrics import EngineFigures
from coloproxy.protocol import (
    CheckpointCompleted,
    CheckpointRequest,
    CheckpointStarted,
    ClientRole,
    Failover,
    Mode,
    SetPeriod,
)
from coloproxy.role import Role

log = logging.getLogger(__name__)

# How often the COLO mode and the migration figures are read: slow while in COLO (the
# events carry what matters), fast while waiting for COLO to begin.
POLL_IN_COLO: Final = 1.0
POLL_WAITING: Final = 0.1
# The migration that enters COLO moves the guest's RAM once: 0.6-1.0 s for 256 MiB here
# (docs/invariants.md); a large guest on a slow link takes minutes.
BRING_UP_TIMEOUT: Final = 600.0
CONTROL_RETRY: Final = 0.2
# A failover message must reach the proxy: wait this long for the control connection.
FAILOVER_CONTROL_WAIT: Final = 10.0
RESUME_WAIT: Final = 5.0
# A planned stop hands the leader key over; it waits this long for the quorum service.
RELEASE_WAIT: Final = 1.0
TWO_HOST_WARNING: Final = (
    "two-host mode (for labs only): no quorum service decides failover; a cut link can make"
    " both hosts serve (split brain). Set engine.quorum (docs/engine.md)"
)


@dataclass(frozen=True, slots=True)
class QuorumSettings:
    """The leader key: its timings and where it lives."""

    leader: LeaderConfig
    etcd: EtcdSettings


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """What the engine needs from the config (``from_config``), or built by tests."""

    pair: str
    role: Role
    qmp: str
    control_socket: Path
    heartbeat_paths: tuple[HeartbeatPath, ...]
    heartbeat_key: bytes  # HMAC-SHA256 key of the heartbeats (engine.heartbeat_key's file)
    migrate_uri: str | None = None
    bring_up: bool = True
    period_ms: int = 20000
    min_gap_ms: int = 100
    checkpoint_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 50
    failover_timeout_ms: int = 300
    # QEMU objects deleted (object-del) when this host's QEMU leaves COLO to run alone: with
    # QEMU's own network filters, the redirectors to the lost host (QEMU's COLO-FT.txt).
    failover_object_del: tuple[str, ...] = ()
    quorum: QuorumSettings | None = None  # None: the two-host mode (labs only)
    disk: DiskSettings | None = None  # the guest's disk, replicated (engine/disk.py)

    @classmethod
    def from_config(cls, config: Config) -> EngineSettings | None:
        """None when the config names no QMP socket: no engine runs in the daemon."""
        engine = config.engine
        if engine.qmp is None:
            return None
        if engine.heartbeat_key is None:  # the config reader requires it with qmp
            raise ConfigError([f"{config.path}: engine.heartbeat_key is not set"])
        key = read_key_file(engine.heartbeat_key, "engine.heartbeat_key")
        paths = [
            HeartbeatPath(
                "replication",
                config.net.replication.local,
                config.net.replication.remote,
                engine.heartbeat_port,
            )
        ]
        if engine.lan_heartbeat is not None:
            paths.append(
                HeartbeatPath(
                    "lan",
                    engine.lan_heartbeat.local,
                    engine.lan_heartbeat.remote,
                    engine.heartbeat_port,
                )
            )
        return cls(
            pair=config.pair.name,
            role=config.pair.role,
            qmp=engine.qmp,
            control_socket=config.control.socket,
            heartbeat_paths=tuple(paths),
            heartbeat_key=key,
            migrate_uri=engine.migrate_uri,
            bring_up=engine.bring_up,
            period_ms=engine.period_ms,
            min_gap_ms=engine.min_gap_ms,
            checkpoint_timeout_ms=engine.checkpoint_timeout_ms,
            heartbeat_interval_ms=engine.heartbeat_interval_ms,
            failover_timeout_ms=engine.failover_timeout_ms,
            failover_object_del=engine.failover_object_del,
            quorum=_quorum_settings(config),
            disk=DiskSettings.from_config(config),
        )


def _quorum_settings(config: Config) -> QuorumSettings | None:
    quorum = config.engine.quorum
    if quorum is None or quorum.service is QuorumService.TWO_HOST:
        return None
    password = None
    if quorum.password_file is not None:
        secret = read_key_file(quorum.password_file, "engine.quorum.password_file", 1)
        password = secret.decode("utf-8", "replace")
    return QuorumSettings(
        leader=LeaderConfig(
            ttl=quorum.ttl_ms / 1000,
            renew=quorum.renew_ms / 1000,
            margin=quorum.margin_ms / 1000,
            retry=quorum.retry_ms / 1000,
        ),
        etcd=EtcdSettings(
            endpoints=tuple(
                f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                for host, port in quorum.endpoints
            ),
            prefix=quorum.prefix,
            pair=config.pair.name,
            timeout=quorum.timeout_ms / 1000,
            ca_file=Path(quorum.ca_file) if quorum.ca_file else None,
            cert_file=Path(quorum.cert_file) if quorum.cert_file else None,
            key_file=Path(quorum.key_file) if quorum.key_file else None,
            user=quorum.user,
            password=password,
        ),
    )


class EngineRunstate(Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPED = "stopped"


class _Lane:
    """A serial worker: jobs run one at a time, in order; a failing job is logged and the
    next one runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: asyncio.Queue[tuple[str, Callable[[], Awaitable[None]]]] = asyncio.Queue()

    def put(self, what: str, job: Callable[[], Awaitable[None]]) -> None:
        self._jobs.put_nowait((what, job))

    async def work(self) -> None:
        why = "cancelled"
        try:
            while True:
                what, job = await self._jobs.get()
                try:
                    await job()
                except asyncio.CancelledError:
                    raise
                except QmpError as exc:
                    log.error("engine %s lane: %s: %s", self.name, what, exc)
                except Exception:
                    log.exception("engine %s lane: %s failed", self.name, what)
        finally:
            log.debug("engine %s lane ended: %s", self.name, why)


class EngineRunner:
    """One engine; :meth:`run` until cancelled. ``attach_lan`` moves the guest port into the
    LAN bridge at takeover (blocking; run in a thread); None when the daemon manages no
    network."""

    def __init__(
        self,
        settings: EngineSettings,
        *,
        attach_lan: Callable[[], object] | None = None,
        figures: EngineFigures | None = None,
        reprotect: bool = False,
        store: LeaderStore | None = None,
        fence: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        # Quorum: the leader key's decisions and the service it lives in; None: two-host.
        self.leader: LeaderKey | None = None
        self.store: LeaderStore | None = store
        if settings.quorum is not None:
            self.leader = LeaderKey(settings.quorum.leader)
            if store is None:
                self.store = EtcdStore(settings.quorum.etcd)
        # Told the deadline (loop time) before which the local proxy may release output:
        # +inf without quorum, -inf while this host does not hold the leader key.
        self.fence = fence
        self._contest: PrimaryLost | None = None  # quorum, secondary: why the key is wanted
        self._alone_cleared = False  # quorum, primary: the alone mark cleared since COLO began
        self._marks: dict[bool, asyncio.Future[bool]] = {}
        # Started by a reprotect: a primary QEMU that left COLO earlier is brought up again
        # instead of being reported as running alone.
        self.reprotect = reprotect
        self.attach_lan = attach_lan
        self.role = settings.role
        self.figures = figures or EngineFigures()
        self.figures.role = settings.role.value
        self.figures.period_ms = settings.period_ms
        self.figures.quorum = "etcd" if settings.quorum is not None else "two-host"
        self.runstate = EngineRunstate.IDLE
        self.monitor = QemuMonitor(
            settings.qmp, f"{settings.role.value}-qemu", self._on_event, self._on_gone
        )
        self.peer = HeartbeatPeer(
            list(settings.heartbeat_paths), self._on_heartbeat, settings.heartbeat_key
        )
        self.disk = (
            DiskReplication(self.monitor, settings.disk) if settings.disk is not None else None
        )
        self.scheduler: CheckpointScheduler | None = None
        self.decider: FailoverDecider | None = None
        self.failover_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._qmp_lane = _Lane("qmp")
        self._control_lane = _Lane("control")
        self._control: ControlClient | None = None
        self._control_up = asyncio.Event()
        self._changed = asyncio.Event()  # pulsed at every input: tests and waiters
        self._timer: asyncio.Handle | None = None
        self._timer_due = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._requests_received: dict[int, float] = {}  # request id -> loop time (bounded)
        self._entry_checkpoint: int | None = None  # the checkpoint that enters COLO
        self._shutdown_seen = False
        self.events: list[QmpEvent] = []  # the last QMP events (bounded), for tests and logs
        self._io_errors: set[tuple[str, str]] = set()  # BLOCK_IO_ERRORs logged (drive, cause)

    # -- life cycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled. Waits for the QEMU's QMP socket and the control socket as
        long as it takes (either may start after the daemon)."""
        if self.runstate is not EngineRunstate.IDLE:
            raise QmpError(f"engine cannot run in state {self.runstate.value}")
        loop = self._loop = asyncio.get_running_loop()
        settings = self.settings
        now = loop.time()
        self.scheduler = CheckpointScheduler(
            SchedulerConfig(
                period=settings.period_ms / 1000,
                min_gap=settings.min_gap_ms / 1000,
                checkpoint_timeout=settings.checkpoint_timeout_ms / 1000,
            ),
            now,
        )
        self.decider = FailoverDecider(
            DeciderConfig(
                pair=settings.pair,
                role=settings.role,
                boot=time.time_ns() // 1000,  # grows across restarts: ReplayWindow
                interval=settings.heartbeat_interval_ms / 1000,
                timeout=settings.failover_timeout_ms / 1000,
                quorum=self.leader is not None,
            ),
            now,
        )
        self.runstate = EngineRunstate.RUNNING
        if self.leader is None:
            log.warning("%s", TWO_HOST_WARNING)
            self._fence(float("inf"))
        else:
            self._fence(float("-inf"))  # nothing leaves before the key is won
            quorum = self.settings.quorum
            assert quorum is not None
            log.info(
                "quorum: the leader key under %s/%s in etcd %s (TTL %.1f s, margin %.0f ms)",
                quorum.etcd.prefix.rstrip("/"),
                quorum.etcd.pair,
                ", ".join(quorum.etcd.endpoints),
                quorum.leader.ttl,
                quorum.leader.margin * 1000,
            )
            if self.role is Role.PRIMARY:
                self._lead(self.leader.contend(now))
        why = "cancelled"
        try:
            await self.peer.start()
            self._rearm()
            self._spawn(self._qmp_lane.work(), "engine-qmp-lane")
            self._spawn(self._control_lane.work(), "engine-control-lane")
            self._spawn(self._control_loop(), "engine-control")
            log.info("engine (%s) waiting for QEMU's QMP socket %s", self.role.value, settings.qmp)
            await self.monitor.connect()
            self._decide(self.decider.local_qemu(QemuState.RUNNING, loop.time()))
            try:
                if self.role is Role.PRIMARY:
                    await self._start_primary()
                else:
                    await self._start_secondary()
            except QmpError as exc:
                # Not fatal: heartbeats, events and the poll go on (the poll activates the
                # checkpoints once the QEMUs are in COLO); a QEMU that is gone says so.
                log.error("engine start (%s): %s", self.role.value, exc)
            self._spawn(self._poll(), "engine-poll")
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            why = f"failed: {exc!r}"
            raise
        finally:
            log.info("engine (%s) stopping: %s", self.role.value, why)
            if self.decider is not None:
                # A planned stop (the daemon restarts) is no death: the peer must not fail
                # over on the silence that follows.
                self._decide(self.decider.leave(self._now()), rearm=False)
            self.runstate = EngineRunstate.STOPPED
            await self._shutdown()

    async def _shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        leader, store = self.leader, self.store
        if leader is not None and store is not None:
            # A planned stop: hand the key over, so that the next engine (a restart, a
            # reprotect) need not wait for the lease to run out. Bounded: the lease expires
            # by itself anyway.
            for action in leader.hand_over(self._now()):
                if isinstance(action, Release):
                    with contextlib.suppress(QuorumError, TimeoutError):
                        async with asyncio.timeout(RELEASE_WAIT):
                            await store.release(action.lease, action.revision)
            self._fence(float("-inf"))
            await store.close()
        tasks = [*self._tasks]
        if self.failover_task is not None:
            tasks.append(self.failover_task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.monitor.close()
        await self.peer.aclose()
        if self._control is not None:
            await self._control.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(_log_failure)
        self._tasks.append(task)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Until ``predicate()`` holds, re-checked at every input (for tests and tools)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def _now(self) -> float:
        loop = self._loop
        return loop.time() if loop is not None else 0.0

    def _pulse(self) -> None:
        self._changed.set()
        scheduler, decider = self.scheduler, self.decider
        figures = self.figures
        if scheduler is not None:
            figures.phase = scheduler.phase.value
        if decider is not None:
            figures.watch = decider.state.value
            figures.qemu = decider.qemu.value
            figures.peer_heard = decider.heard()
        figures.heartbeats = dict(self.peer.counters)
        leader = self.leader
        if leader is not None:
            figures.key = leader.phase.value
            figures.key_deadline = leader.deadline if leader.phase is KeyPhase.HOLDING else None
            figures.fenced = leader.phase is KeyPhase.HOLDING and leader.fenced

    # -- the timer -------------------------------------------------------------------------

    def _rearm(self) -> None:
        loop = self._loop
        if loop is None or self.runstate is not EngineRunstate.RUNNING:
            return
        deadlines = [
            machine.get_timer()
            for machine in (self.scheduler, self.decider, self.leader)
            if machine is not None
        ]
        due = min((d for d in deadlines if d is not None), default=None)
        timer = self._timer
        if timer is not None:
            # Compare with the deadline we asked for, not timer.when(): uvloop returns a
            # plain Handle without when() for a deadline already in the past.
            if due is not None and self._timer_due == due:
                return
            timer.cancel()
            self._timer = None
        if due is not None:
            self._timer = loop.call_at(due, self._fire)
            self._timer_due = due

    def _fire(self) -> None:
        self._timer = None
        # The deadline counts as reached: a loop may run a timer a little early (uvloop
        # rounds a delay to whole milliseconds; asyncio runs what is due within its clock's
        # resolution). Handed the clock as it is, the machines found nothing due and the same
        # deadline was armed again and again until the clock passed it: about 25 fires per
        # heartbeat in the lab, a busy loop (tests/test_engine_runner.py, "early").
        now = max(self._now(), self._timer_due)
        if self.decider is not None:
            self._decide(self.decider.handle_timer(now), rearm=False)
        if self.scheduler is not None:
            self._schedule(self.scheduler.handle_timer(now), rearm=False)
        if self.leader is not None:
            self._lead(self.leader.handle_timer(now), rearm=False)
        self._rearm()

    # -- inputs ----------------------------------------------------------------------------

    def _on_request(self, push: CheckpointRequest) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        now = self._now()
        if len(self._requests_received) > 4096:  # bounded: the oldest are long served
            for key in sorted(self._requests_received)[:2048]:
                del self._requests_received[key]
        self._requests_received.setdefault(push.id, now)
        log.debug("checkpoint request %d (%s)", push.id, push.reason)
        # A request stamped 0 (an engine double, a hand-typed line) counts as sent now.
        wall = push.time if push.time > 0 else time.time()
        self._schedule(scheduler.request(push.id, push.reason, now, wall))

    def _on_set_period(self, push: SetPeriod) -> None:
        if self.scheduler is None:
            return
        log.info("checkpoint period now %d ms", push.period_ms)
        self.figures.period_ms = push.period_ms
        self._schedule(self.scheduler.set_period(push.period_ms / 1000, self._now()))

    def _on_event(self, event: QmpEvent) -> None:
        self.events.append(event)
        if len(self.events) > 4096:
            del self.events[:2048]
        if event.name == "BLOCK_IO_ERROR":
            self._block_io_error(event)
        scheduler, decider = self.scheduler, self.decider
        if scheduler is None or decider is None:
            return
        now = event.received
        if event.name == "STOP":
            if self.role is Role.PRIMARY:
                self._schedule(scheduler.started(now, event.wall))
            elif self.failover_task is None:
                # The SVM stops to load a checkpoint: host S's proxy holds the client's
                # segments until the RESUME, then shifts them with the offsets of the new
                # state (docs/data-path.md, "Host S across a checkpoint").
                stopped = CheckpointStarted(time=event.wall)
                self._control_lane.put("svm-stopped", lambda: self._notify(stopped))
        elif event.name == "RESUME":
            if self.role is Role.PRIMARY:
                if self._entry_checkpoint is not None and scheduler.phase is Phase.RUNNING:
                    self._qmp_lane.put("confirm COLO entry", self._confirm_entry)
                else:
                    self._schedule(scheduler.completed(now, event.wall))
            elif self.failover_task is None:
                # The SVM resumes after loading a checkpoint (or at COLO entry): it is a copy
                # of the PVM now, and host S's proxy forgets its sequence offsets. The RESUME
                # after a takeover is none of these: failover_task is set by then.
                message = CheckpointCompleted(completed=event.wall, synced=True)
                self._control_lane.put("svm-synced", lambda: self._notify(message))
        elif event.name == "COLO_EXIT":
            # The event's reason says "error" even for a requested failover (7.2): only a
            # hint; query-colo-status is asked for the truth.
            log.warning("COLO_EXIT: %s", dict(event.data))
            self._decide(decider.local_colo_exit(now))
            self._qmp_lane.put("query-colo-status", self._refresh_colo)
        elif event.name == "SHUTDOWN":
            self._shutdown_seen = True
            self._decide(decider.local_qemu(QemuState.SHUTDOWN, now))
        self._pulse()

    def _block_io_error(self, event: QmpEvent) -> None:
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

    def _on_gone(self, reason: str) -> None:
        decider, scheduler = self.decider, self.scheduler
        if decider is None or scheduler is None:
            return
        state = QemuState.SHUTDOWN if self._shutdown_seen else QemuState.EXITED
        log.error("local QEMU %s: %s", state.value, reason)
        self._decide(decider.local_qemu(state, self._now()))
        self._pulse()

    def _on_heartbeat(self, path: str, heartbeat: Heartbeat, now: float) -> None:
        if self.decider is not None:
            self._decide(self.decider.heartbeat(heartbeat, path, now))
            self._pulse()

    def _colo_seen(self, status: ColoStatus) -> None:
        """A query-colo-status answer: the truth about the local QEMU's COLO mode."""
        scheduler, decider = self.scheduler, self.decider
        if scheduler is None or decider is None:
            return
        now = self._now()
        self.figures.colo_mode = status.mode
        if status.reason not in ("none", "processing"):
            self.figures.last_colo_exit_reason = status.reason
        try:
            mode = ColoMode(status.mode)
        except ValueError:
            log.warning("query-colo-status: unknown mode %r", status.mode)
            return
        self._decide(decider.local_colo(mode, now))
        if (
            self.role is Role.PRIMARY
            and mode is ColoMode.PRIMARY
            and scheduler.phase in (Phase.OFF, Phase.ENTERING)
            and self._entry_checkpoint is None
            and decider.state in (Watch.STANDBY, Watch.WATCHING)
        ):
            log.info("the QEMUs are in COLO: checkpoints start")
            self._schedule(scheduler.activate(now))
        if self.role is Role.PRIMARY and mode is ColoMode.PRIMARY:
            self._clear_alone()
        self._pulse()

    # -- actions ---------------------------------------------------------------------------

    def _schedule(self, actions: list[ScheduleAction], *, rearm: bool = True) -> None:
        for action in actions:
            if isinstance(action, Trigger):
                self._trigger(action)
            elif isinstance(action, CheckpointBegan):
                self._began(action)
            elif isinstance(action, CheckpointEnded):
                self._ended(action)
            elif isinstance(action, CheckpointAborted):
                self.figures.aborted += 1
                log.warning(
                    "checkpoint %d aborted (COLO ended under it); requests %s wait again",
                    action.checkpoint,
                    action.requests,
                )
            elif isinstance(action, CheckpointStalled):
                self.figures.stalled += 1
                log.error(
                    "checkpoint %d stalled (%s for %.1f s)",
                    action.checkpoint,
                    action.phase.value,
                    action.waited,
                )
                if self.decider is not None:
                    self._decide(self.decider.checkpoint_stalled(self._now()), rearm=False)
            elif isinstance(action, RequestsAbandoned):
                log.info("requests %s abandoned: COLO is over", action.requests)
            elif isinstance(action, Unexpected):
                log.debug("QMP %s ignored in phase %s", action.event.value, action.phase.value)
        if rearm:
            self._rearm()

    def _trigger(self, action: Trigger) -> None:
        figures = self.figures
        figures.triggers["first" if action.attempt == 1 else "retry"] += 1
        received = [self._requests_received.get(r) for r in action.requests]
        arrived = min((r for r in received if r is not None), default=None)

        async def trigger() -> None:
            try:
                await self.monitor.set_checkpoint_delay(action.backstop_ms)
            except QmpError:
                figures.triggers["error"] += 1
                raise
            if arrived is not None and action.attempt == 1:
                figures.request_to_command.observe(self._now() - arrived)

        log.debug(
            "trigger checkpoint %d (%s, requests %s, attempt %d)",
            action.checkpoint,
            action.reason,
            action.requests,
            action.attempt,
        )
        self._qmp_lane.put(f"trigger checkpoint {action.checkpoint}", trigger)

    def _began(self, action: CheckpointBegan) -> None:
        if action.reason == "colo-entry":
            self._entry_checkpoint = action.checkpoint
        request = max(action.requests) if action.requests else None
        message = CheckpointStarted(request=request, time=action.wall)
        self._control_lane.put("checkpoint-started", lambda: self._notify(message))

    def _ended(self, action: CheckpointEnded) -> None:
        figures = self.figures
        figures.checkpoints[action.reason] += 1
        if action.reason != "colo-entry":  # that pause is the migration's downtime
            figures.pause.observe(action.pause)
        if action.request_to_stop is not None:
            figures.request_to_stop.observe(action.request_to_stop)
        request = max(action.requests) if action.requests else None
        message = CheckpointCompleted(
            request=request,
            started=action.started_wall,
            completed=action.completed_wall,
            synced=True,
        )
        self._control_lane.put("checkpoint-completed", lambda: self._notify(message))
        log.debug(
            "checkpoint %d (%s) done: pause %.1f ms, requests %s",
            action.checkpoint,
            action.reason,
            action.pause * 1000,
            action.requests,
        )

    async def _notify(self, message: CheckpointStarted | CheckpointCompleted) -> None:
        client = self._control
        if client is None:
            # The proxy re-sends its outstanding request when we reconnect: a checkpoint
            # then serves it again. Nothing is released without a checkpoint.
            log.warning("%s not sent: no control connection", message.kind)
            return
        try:
            await client.request(message)
        except ControlError as exc:
            log.warning("%s: %s", message.kind, exc)

    def _decide(self, actions: list[DecideAction], *, rearm: bool = True) -> None:
        for action in actions:
            if isinstance(action, SendHeartbeat):
                self.peer.send(action.heartbeat)
            elif isinstance(action, PrimaryLost):
                if self.leader is not None:
                    # The heartbeats only start the contest; the key decides.
                    log.warning(
                        "primary looks lost (%s, silent %.0f ms): contesting the leader key",
                        action.reason,
                        action.silent_for * 1000,
                    )
                    self._contest = action
                    self.figures.key_events["contest"] += 1
                    self._lead(self.leader.contend(self._now()), rearm=False)
                else:
                    self._start_failover(self._take_over(action), "primary-lost")
            elif isinstance(action, SecondaryLost):
                self._start_failover(self._leave_colo(action), "secondary-lost")
            elif isinstance(action, StoodDown):
                self.figures.failovers["stood-down"] += 1
                if self.leader is not None:
                    now = self._now()
                    self._lead(self.leader.stop(now), rearm=False)
                    if self.role is Role.PRIMARY:
                        self._lead(self.leader.hand_over(now), rearm=False)
                if self.role is Role.PRIMARY:
                    log.critical(
                        "standing down (%s): the secondary serves now; pausing this guest"
                        " (the proxy keeps holding its output)",
                        action.reason,
                    )
                    if self.scheduler is not None:
                        self._schedule(self.scheduler.deactivate(self._now()), rearm=False)
                    self._qmp_lane.put("stop the guest", self.monitor.stop_guest)
                else:
                    log.error(
                        "standing down (%s): the primary runs alone; this secondary will not"
                        " take over (re-protect with a new secondary)",
                        action.reason,
                    )
            elif isinstance(action, LocalQemuLost):
                log.error("the local QEMU is %s: nothing left to protect here", action.state)
                if self.leader is not None:
                    # The fast path: the peer need not wait for the lease to run out.
                    self._lead(self.leader.hand_over(self._now()), rearm=False)
                if self.scheduler is not None:
                    self._schedule(self.scheduler.deactivate(self._now()), rearm=False)
            elif isinstance(action, SplitBrain):
                self.figures.split_brain += 1
                log.critical(
                    "SPLIT BRAIN: both hosts serve the LAN (peer %s says serving); an operator"
                    " must stop one",
                    action.peer.role.value,
                )
            elif isinstance(action, PeerRejected):
                log.warning(
                    "heartbeat rejected (%s): pair %s role %s",
                    action.reason,
                    action.heartbeat.pair,
                    action.heartbeat.role.value,
                )
        if rearm:
            self._rearm()

    # -- the leader key -------------------------------------------------------------------

    def _fence(self, deadline: float) -> None:
        if self.fence is not None:
            try:
                self.fence(deadline)
            except Exception:  # the proxy's gate checks its own clock; the engine goes on
                log.exception("telling the proxy the leader key's deadline failed")

    def _lead(self, actions: list[LeaderAction], *, rearm: bool = True) -> None:
        """Carry out the leader key's actions (quorum mode)."""
        leader, store = self.leader, self.store
        if leader is None or store is None:
            return
        figures = self.figures
        for action in actions:
            if isinstance(action, Acquire):
                self._spawn_quick(self._acquire(store, action.ttl), "engine-acquire")
            elif isinstance(action, Renew):
                self._spawn_quick(self._renew(store, action.lease), "engine-renew")
            elif isinstance(action, Release):
                self._spawn_quick(
                    self._release(store, action.lease, action.revision), "engine-release"
                )
            elif isinstance(action, Mark):
                self._spawn_quick(self._mark(store, action.alone, action.revision), "engine-mark")
            elif isinstance(action, Won):
                figures.key_events["won"] += 1
                self._fence(action.deadline)
                self._won(action)
            elif isinstance(action, Fenced):
                figures.key_events["fenced"] += 1
                log.critical(
                    "FENCED: the leader key's deadline passed (last renewal acknowledged %.0f ms"
                    " ago): holding every packet until a renewal is acknowledged",
                    action.since_ack * 1000,
                )
                if self.decider is not None:
                    self._decide(self.decider.set_fenced(True, self._now()), rearm=False)
            elif isinstance(action, Unfenced):
                figures.key_events["unfenced"] += 1
                log.warning("the leader key is renewed again: releasing")
                self._fence(action.deadline)
                if self.decider is not None:
                    self._decide(self.decider.set_fenced(False, self._now()), rearm=False)
            elif isinstance(action, KeyLost):
                figures.key_events["lost-" + action.reason] += 1
                self._fence(float("-inf"))
                if action.reason == "released":
                    log.warning("leader key handed over")
                else:
                    log.critical(
                        "the leader key is lost (%s): this host must not serve", action.reason
                    )
                    if self.decider is not None:
                        self._decide(self.decider.key_lost("key-lost", self._now()), rearm=False)
            elif isinstance(action, Refused):
                figures.key_events["refused-" + action.reason] += 1
                log.error(
                    "the leader key is refused for good (%s): the primary runs alone", action.reason
                )
                if self.decider is not None:
                    self._decide(self.decider.refused("primary-alone", self._now()), rearm=False)
            elif isinstance(action, Marked):
                future = self._marks.pop(action.alone, None)
                if future is not None and not future.done():
                    future.set_result(True)
        self._pulse()
        if rearm:
            self._rearm()

    def _won(self, action: Won) -> None:
        leader, decider = self.leader, self.decider
        assert leader is not None
        log.warning("won the leader key (revision %d)", action.revision)
        if decider is None:
            return
        if self.role is Role.PRIMARY:
            if decider.colo is ColoMode.PRIMARY:
                self._clear_alone()
            return
        contest = self._contest
        actions = decider.won(self._now()) if contest is not None else []
        if contest is not None and actions:
            self._decide(actions, rearm=False)  # the heartbeat now says failed_over
            self._start_failover(self._take_over(contest), "primary-lost")
            return
        # Won a contest this side gave up meanwhile (it stood down): give the key back.
        log.warning("the contest was abandoned: handing the leader key back")
        self._lead(leader.hand_over(self._now()), rearm=False)

    def _clear_alone(self) -> None:
        """The pair is protected (this primary's QEMU is in COLO): clear the alone mark
        once, so that the secondary may take over again (after a reprotect, or a
        restarted daemon). Needs the key; tried again at the next COLO status if not held
        yet."""
        leader = self.leader
        if leader is None or self._alone_cleared or leader.phase is not KeyPhase.HOLDING:
            return
        self._alone_cleared = True
        self._lead(leader.mark(False), rearm=False)

    def _spawn_quick(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        """A short quorum call as a task of its own (done ones are forgotten)."""
        self._tasks = [task for task in self._tasks if not task.done()]
        self._spawn(coroutine, name)

    def _holder(self) -> str:
        decider = self.decider
        boot = decider.config.boot if decider is not None else 0
        return f"{self.settings.pair} {self.role.value} boot {boot}"

    async def _acquire(self, store: LeaderStore, ttl: float) -> None:
        leader = self.leader
        assert leader is not None
        sent = self._now()
        try:
            outcome = await store.acquire(ttl, self._holder(), self.role is Role.SECONDARY)
        except QuorumError as exc:
            log.debug("acquire: %s", exc)
            self._lead(leader.not_acquired(self._now()))
            return
        if outcome.grant is None:
            self._lead(leader.not_acquired(self._now(), outcome.alone))
            return
        grant = outcome.grant
        self._lead(leader.acquired(grant.lease, grant.ttl, grant.revision, sent))

    async def _renew(self, store: LeaderStore, lease: int) -> None:
        leader = self.leader
        assert leader is not None
        sent = self._now()
        try:
            ttl = await store.renew(lease)
        except QuorumError as exc:
            self.figures.key_events["renew-failed"] += 1
            log.debug("renew: %s", exc)
            self._lead(leader.renew_failed(self._now()))
            return
        except Exception as exc:  # not an answer: the deadline decides, renewals go on
            self.figures.key_events["renew-failed"] += 1
            log.error("renewing the leader key: unexpected %s: %s", type(exc).__name__, exc)
            self._lead(leader.renew_failed(self._now()))
            return
        actions = leader.renewed(sent, ttl, self._now())
        if leader.phase is KeyPhase.HOLDING and not leader.fenced:
            self._fence(leader.deadline)
        self._lead(actions)

    async def _release(self, store: LeaderStore, lease: int, revision: int) -> None:
        try:
            await store.release(lease, revision)
        except QuorumError as exc:  # the lease runs out by itself
            log.warning("handing the leader key over: %s (it expires by itself)", exc)

    async def _mark(self, store: LeaderStore, alone: bool, revision: int) -> None:
        leader = self.leader
        assert leader is not None
        try:
            ok = await store.mark(alone, revision)
        except QuorumError as exc:
            log.warning("the alone mark: %s", exc)
            if not alone:
                self._alone_cleared = False  # the next COLO status tries again
            future = self._marks.pop(alone, None)
            if future is not None and not future.done():
                future.set_result(False)
            return
        self._lead(leader.marked(alone, ok, self._now()))
        if not ok:
            future = self._marks.pop(alone, None)
            if future is not None and not future.done():
                future.set_result(False)

    async def _mark_alone(self) -> bool:
        """Quorum: record in the quorum service that this host runs alone (the peer must
        never take over with its stale state), before it does. Tried until it is written or
        the key is lost; True when written."""
        leader = self.leader
        if leader is None:
            return True
        self._alone_cleared = False
        while leader.phase is KeyPhase.HOLDING:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[bool] = loop.create_future()
            self._marks[True] = future
            self._lead(leader.mark(True))
            if await future:
                log.info("marked alone in the quorum service")
                return True
            await asyncio.sleep(leader.config.retry)
        return False

    def _start_failover(self, coroutine: Coroutine[Any, Any, None], kind: str) -> None:
        self.figures.failovers[kind] += 1
        if self.failover_task is not None:  # the decider decides once; belt and braces
            log.error("a second failover (%s) ignored", kind)
            coroutine.close()
            return
        self.failover_task = asyncio.create_task(coroutine, name=f"engine-failover-{kind}")
        self.failover_task.add_done_callback(_log_failure)

    # -- primary ---------------------------------------------------------------------------

    async def _start_primary(self) -> None:
        decider = self.decider
        if decider is None:
            return
        # Hear the secondary first (bounded): if it took over while this daemon was away,
        # this side must stand down before it triggers anything (a checkpoint would fail,
        # and a COLO_EXIT would read as "secondary lost": both would serve).
        with contextlib.suppress(TimeoutError):
            await self.wait_until(lambda: decider.heard() is not None, 2 * decider.config.timeout)
        if decider.state is Watch.STOOD_DOWN:
            return
        status = await self.monitor.colo_status()
        self._colo_seen(status)
        if status.mode == ColoMode.PRIMARY.value:
            return  # activated by _colo_seen: an engine (re)started while in COLO
        if status.last_mode == ColoMode.PRIMARY.value and not self.reprotect:
            # This QEMU failed over before the engine started: it runs alone.
            log.error("the primary QEMU left COLO earlier (reason %s): unprotected", status.reason)
            await self._tell_proxy(
                Failover(Role.PRIMARY, Mode.UNPROTECTED, "the QEMU left COLO earlier")
            )
            return
        if not self.settings.bring_up:
            log.info("bring_up is off: waiting for the QEMUs to enter COLO")
            return
        if self.settings.migrate_uri is None:
            log.warning("engine.migrate_uri is not set: waiting for the QEMUs to enter COLO")
            return
        self._spawn(self._bring_up(self.settings.migrate_uri), "engine-bring-up")

    async def _bring_up(self, uri: str) -> None:
        monitor, scheduler, decider = self.monitor, self.scheduler, self.decider
        if scheduler is None or decider is None:
            return
        log.info("bring-up: waiting for the secondary's engine to say its QEMU is ready")

        def peer_ready() -> bool:
            peer, heard = decider.peer, decider.heard()
            return (
                peer is not None
                and peer.ready
                and heard is not None
                and self._now() - heard < decider.config.timeout
            )

        while not peer_ready():
            with contextlib.suppress(TimeoutError):
                await self.wait_until(peer_ready, 10.0)
            if not peer_ready():
                log.warning("bring-up: the secondary is not ready yet (no heartbeat saying so)")
        version = await monitor.version()
        disk = self.disk
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
        await monitor.set_checkpoint_delay(scheduler.backstop_ms)
        self._schedule(scheduler.bring_up(self._now()))
        started = self._now()
        if disk is not None:
            # Stopped from here to COLO's first resume (this STOP is the entry checkpoint's):
            # no guest write may fall between the mirror's end and the replication's start,
            # which QEMU's COLO code does once the secondary is ready.
            await monitor.stop_guest()
            try:
                await disk.attach()
            except (DiskError, QmpError, TimeoutError) as exc:
                log.error("bring-up: adding the disk's replication child: %s", exc)
                self._schedule(scheduler.aborted(self._now()))
                self._entry_checkpoint = None
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
            self._schedule(scheduler.aborted(self._now()))
            self._entry_checkpoint = None
            if disk is not None and disk.attached:
                with contextlib.suppress(QmpError):
                    await disk.detach()
                if await monitor.run_state() != "running":
                    await monitor.execute("cont")
            return
        self.figures.time_to_colo = self._now() - started
        log.info("bring-up: COLO state %.2f s after migrate", self.figures.time_to_colo)

    async def _confirm_entry(self) -> None:
        """The primary resumed after the migration: in COLO, that is the first checkpoint."""
        scheduler = self.scheduler
        if scheduler is None:
            return
        status = await self.monitor.colo_status()
        now = self._now()
        resume = next((e for e in reversed(self.events) if e.name == "RESUME"), None)
        wall = resume.wall if resume is not None else time.time()
        self._entry_checkpoint = None
        if status.mode == ColoMode.PRIMARY.value:
            self._schedule(scheduler.completed(now, wall))
        else:
            log.error("the primary resumed without COLO (mode %s)", status.mode)
            self._schedule(scheduler.aborted(now))
        self._colo_seen(status)

    async def _leave_colo(self, decision: SecondaryLost) -> None:
        """Secondary lost: the primary QEMU leaves COLO and the proxy runs unprotected."""
        started = self._now()
        steps = self.figures.last_failover
        steps.clear()
        log.error(
            "secondary lost (%s, silent %.0f ms): leaving COLO, running unprotected",
            decision.reason,
            decision.silent_for * 1000,
        )
        if self.scheduler is not None:
            self._schedule(self.scheduler.deactivate(started))
        if self.leader is not None:
            # Before the guest runs past the secondary's state: a secondary that won the key
            # later would take over with a stale copy.
            if not await self._mark_alone():
                log.critical("cannot mark this pair alone (the key is lost): not leaving COLO")
                return
            steps["marked-alone"] = self._now() - started
        if self.disk is not None:
            # The replication child goes first (COLO-FT.txt): the guest's writes must not
            # wait for a secondary that is gone.
            try:
                await self.disk.detach_lost()
                steps["disk"] = self._now() - started
            except QmpError as exc:
                log.error("disk: removing the replication child: %s", exc)
        try:
            await self.monitor.lost_heartbeat()
            steps["lost-heartbeat"] = self._now() - started
        except QmpError as exc:
            log.error("x-colo-lost-heartbeat on the primary: %s", exc)
        if await self._delete_filters():
            steps["object-del"] = self._now() - started
        await self._tell_proxy(
            Failover(
                Role.PRIMARY,
                Mode.UNPROTECTED,
                f"secondary lost ({decision.reason}); running unprotected",
            )
        )
        steps["proxy"] = self._now() - started
        with contextlib.suppress(QmpError):
            self._colo_seen(await self.monitor.colo_status())
        log.warning(
            "unprotected: failover done in %.1f ms (%s)",
            steps["proxy"] * 1000,
            ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in steps.items()),
        )
        self._pulse()

    # -- secondary -------------------------------------------------------------------------

    async def _start_secondary(self) -> None:
        monitor, decider = self.monitor, self.decider
        if decider is None:
            return
        status = await monitor.colo_status()
        self._colo_seen(status)
        state = await monitor.run_state()
        ready = status.mode == ColoMode.SECONDARY.value
        if not ready and state == "inmigrate":
            version = await monitor.version()
            if self.settings.bring_up and version >= (8, 1):
                await monitor.enable_colo()  # QEMU 8.1+ wants x-colo on the secondary too
            ready = True
            if self.disk is not None:
                # The primary copies its disk into this export, then its replication child
                # writes there: not ready (the primary waits) until it is up.
                try:
                    await self.disk.check_layout("secondary")
                    await self.disk.serve()
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
        self._decide(decider.set_ready(ready, self._now()))

    async def _delete_filters(self) -> bool:
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

    async def _take_over(self, decision: PrimaryLost) -> None:
        """Primary lost: the SVM runs alone, on the LAN, and the proxy is told."""
        monitor = self.monitor
        started = self._now()
        steps = self.figures.last_failover
        steps.clear()
        log.error(
            "primary lost (%s, silent %.0f ms): taking over",
            decision.reason,
            decision.silent_for * 1000,
        )
        resumes = sum(1 for e in self.events if e.name == "RESUME")
        if self.disk is not None:
            # The NBD export goes first (COLO-FT.txt); at x-colo-lost-heartbeat the replication
            # driver commits the active disk into the base: this disk is the truth now.
            await self.disk.stop_serving()
            steps["disk"] = self._now() - started
        try:
            await monitor.lost_heartbeat()
        except QmpError as exc:
            log.error("cannot take over: x-colo-lost-heartbeat: %s", exc)
            return
        steps["lost-heartbeat"] = self._now() - started
        if await self._delete_filters():
            steps["object-del"] = self._now() - started
        # The proxy first: it must shift the SVM's output for the connections opened since
        # the last checkpoint before that output can reach the LAN.
        await self._tell_proxy(
            Failover(
                Role.PRIMARY,
                Mode.UNPROTECTED,
                f"primary lost ({decision.reason}); took over",
            )
        )
        steps["proxy"] = self._now() - started
        if self.attach_lan is None:
            log.warning(
                "no network configured in this daemon: the guest port is not moved to the"
                " LAN (attach_guest_to_lan skipped)"
            )
        else:
            try:
                await asyncio.to_thread(self.attach_lan)
                steps["lan"] = self._now() - started
            except Exception:
                log.exception("moving the guest port to the LAN failed")
        try:
            await monitor.announce_self()
            steps["announce"] = self._now() - started
        except QmpError as exc:
            log.error("announce-self: %s", exc)
        if self.leader is not None:
            self._lead(self.leader.mark(True))  # runs alone now: no stale takeover back

        def resumed() -> bool:
            return sum(1 for e in self.events if e.name == "RESUME") > resumes

        try:
            await self.wait_until(resumed, RESUME_WAIT)
            resume = next(e for e in reversed(self.events) if e.name == "RESUME")
            steps["resume"] = resume.received - started
        except TimeoutError:
            log.error("no RESUME within %.0f s after x-colo-lost-heartbeat", RESUME_WAIT)
        with contextlib.suppress(QmpError):
            self._colo_seen(await monitor.colo_status())
        steps["done"] = self._now() - started
        log.warning(
            "took over in %.1f ms (%s)",
            steps["done"] * 1000,
            ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in steps.items()),
        )
        self._pulse()

    # -- both ------------------------------------------------------------------------------

    async def _tell_proxy(self, message: Failover) -> None:
        try:
            async with asyncio.timeout(FAILOVER_CONTROL_WAIT):
                await self._control_up.wait()
        except TimeoutError:
            log.error("failover not told to the proxy: no control connection")
            return
        client = self._control
        if client is None:
            log.error("failover not told to the proxy: the control connection ended")
            return
        try:
            await client.request(message)
        except ControlError as exc:
            log.error("failover not accepted by the proxy: %s", exc)

    async def _refresh_colo(self) -> None:
        self._colo_seen(await self.monitor.colo_status())

    async def _poll(self) -> None:
        """COLO mode and migration figures, now and then."""
        why = "cancelled"
        try:
            while True:
                decider = self.decider
                waiting = decider is not None and decider.colo is ColoMode.NONE
                await asyncio.sleep(POLL_WAITING if waiting else POLL_IN_COLO)
                if self.monitor.state.value != "connected":
                    why = "the monitor is closed"
                    return
                try:
                    self._colo_seen(await self.monitor.colo_status())
                    if self.role is Role.PRIMARY and self.figures.colo_mode == "primary":
                        stats = await self.monitor.migration_stats()
                        self.figures.migration = {
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
                except QmpError as exc:
                    log.debug("poll: %s", exc)
        finally:
            log.debug("engine poll ended: %s", why)

    async def _control_loop(self) -> None:
        """Stay connected to the proxy's control socket as an engine; handle its pushes."""
        path = self.settings.control_socket
        why = "cancelled"
        complained = False
        try:
            while True:
                try:
                    client = await ControlClient.connect(
                        path, ClientRole.ENGINE, name=f"coloproxy-engine {__version__}"
                    )
                except ControlError as exc:
                    if not complained:
                        log.warning("engine: control socket %s: %s (retrying)", path, exc)
                        complained = True
                    await asyncio.sleep(CONTROL_RETRY)
                    continue
                complained = False
                self._control = client
                self._control_up.set()
                log.info("engine connected to the proxy at %s", path)
                try:
                    async for push in client:
                        if isinstance(push, CheckpointRequest):
                            self._on_request(push)
                        else:
                            self._on_set_period(push)
                        self._pulse()
                finally:
                    self._control_up.clear()
                    self._control = None
                    await client.close()
                log.warning("engine: control connection ended: %s", client.closed_reason)
                await asyncio.sleep(CONTROL_RETRY)
        except ControlConnectionError as exc:  # pragma: no cover - connect() wraps these
            why = f"control connection: {exc}"
            raise
        finally:
            log.debug("engine control loop ended: %s", why)


def _log_failure(task: asyncio.Task[None]) -> None:
    """A background task of the engine ended by an error: say which and why."""
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, QmpError):
        log.error("engine task %s ended: %s", task.get_name(), exc)
    elif exc is not None:
        log.error("engine task %s failed", task.get_name(), exc_info=exc)


__all__ = ["EngineRunner", "EngineRunstate", "EngineSettings"]
