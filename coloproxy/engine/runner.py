"""The checkpoint engine a daemon runs (shell): the pump between the local QEMU, the peer
daemon, the quorum service and its own proxy on one side and the pure machines on the other
(:mod:`coloproxy.engine.scheduler`, :mod:`coloproxy.engine.decider`,
:mod:`coloproxy.engine.leader`).

Theory of operation
-------------------
Everything that happens is an input to one of the pure state machines, on the event loop,
with ``now = loop.time()``: a ``checkpoint-request`` or ``set-period`` push from the proxy
(:mod:`coloproxy.engine.proxy_link`: the engine is a control-socket client of role
``engine``, exactly like an external engine, docs/control-protocol.md), a QMP event
(``STOP``, ``RESUME``, ``COLO_EXIT``, ``SHUTDOWN``; :mod:`coloproxy.engine.qmp`), the QMP
socket closing (QEMU exited), a heartbeat (:mod:`coloproxy.engine.peer`), an answer of the
quorum service (:mod:`coloproxy.engine.leadership`), a timer, the result of a
``query-colo-status``. Inputs are handled at once and synchronously; the actions returned
are carried out by two *lanes* (serial worker tasks, :mod:`coloproxy.engine.lane`: one for
QMP commands, one for control messages, so a slow QMP command never delays a release) or
by a task of their own for a bring-up or a failover, whose QMP sequences are
:mod:`coloproxy.engine.colo`'s. One loop timer stays armed at the earliest of the
machines' timers (:class:`coloproxy.pump.TimerPump`, the runner its target).

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
from collections.abc import Callable, Coroutine
from enum import Enum
from typing import Any, Final

from coloproxy.engine.colo import ColoSteps, FailoverSteps
from coloproxy.engine.decider import (
    DecideAction,
    DeciderConfig,
    FailoverDecider,
    LocalQemuLost,
    PeerRejected,
    PrimaryLost,
    SecondaryLost,
    SendHeartbeat,
    SplitBrain,
    StoodDown,
    Watch,
)
from coloproxy.engine.heartbeat import ColoMode, Heartbeat, QemuState
from coloproxy.engine.lane import Lane
from coloproxy.engine.leader import Fenced, KeyLost, KeyPhase, LeaderKey, Unfenced, Won
from coloproxy.engine.leadership import KeyOutcome, Leadership
from coloproxy.engine.peer import HeartbeatPeer
from coloproxy.engine.proxy_link import ProxyLink
from coloproxy.engine.qmp import ColoStatus, QemuMonitor, QmpError, QmpEvent
from coloproxy.engine.quorum import EtcdStore, LeaderStore
from coloproxy.engine.scheduler import (
    CheckpointAborted,
    CheckpointBegan,
    CheckpointEnded,
    CheckpointScheduler,
    CheckpointStalled,
    Phase,
    RequestsAbandoned,
    ScheduleAction,
    SchedulerConfig,
    Trigger,
    Unexpected,
)
from coloproxy.engine.settings import EngineSettings
from coloproxy.metrics import EngineFigures
from coloproxy.protocol import (
    CheckpointCompleted,
    CheckpointRequest,
    CheckpointStarted,
    Failover,
    Mode,
    Push,
    SetPeriod,
)
from coloproxy.pump import TimerPump
from coloproxy.role import Role

log = logging.getLogger(__name__)

# How often the COLO mode and the migration figures are read: slow while in COLO (the
# events carry what matters), fast while waiting for COLO to begin.
POLL_IN_COLO: Final = 1.0
POLL_WAITING: Final = 0.1
RESUME_WAIT: Final = 5.0
TWO_HOST_WARNING: Final = (
    "two-host mode (for labs only): no quorum service decides failover; a cut link can make"
    " both hosts serve (split brain). Set engine.quorum (docs/engine.md)"
)


class EngineRunstate(Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPED = "stopped"


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
        # Told the deadline (loop time) before which the local proxy may release output:
        # +inf without quorum, -inf while this host does not hold the leader key.
        self.fence = fence
        # Started by a reprotect: a primary QEMU that left COLO earlier is brought up again
        # instead of being reported as running alone.
        self.reprotect = reprotect
        self.role = settings.role
        self.figures = figures or EngineFigures()
        self.figures.role = settings.role.value
        self.figures.period_ms = settings.period_ms
        self.figures.quorum = "etcd" if settings.quorum is not None else "two-host"
        self.runstate = EngineRunstate.IDLE
        # Quorum: the leader key and the service it lives in; None: the two-host mode.
        self.store: LeaderStore | None = store
        self.leadership: Leadership | None = None
        self._contest: PrimaryLost | None = None  # quorum, secondary: why the key is wanted
        if settings.quorum is not None:
            if store is None:
                store = self.store = EtcdStore(settings.quorum.etcd)
            self.leadership = Leadership(
                settings.quorum,
                store,
                role=settings.role,
                figures=self.figures,
                clock=self._now,
                fence=self._fence,
                spawn=self._spawn_quick,
                on_outcome=self._on_key,
                changed=self._changed_by_key,
            )
        self.proxy_link = ProxyLink(settings.control_socket, self._on_push)
        self.monitor = QemuMonitor(
            settings.qmp, f"{settings.role.value}-qemu", self._on_event, self._on_gone
        )
        self.colo = ColoSteps(
            self.monitor,
            settings,
            self.figures,
            clock=self._now,
            tell_proxy=self.proxy_link.tell_failover,
            attach_lan=attach_lan,
        )
        self.peer = HeartbeatPeer(
            list(settings.heartbeat_paths), self._on_heartbeat, settings.heartbeat_key
        )
        self.scheduler: CheckpointScheduler | None = None
        self.decider: FailoverDecider | None = None
        self.failover_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._qmp_lane = Lane("qmp")
        self._changed = asyncio.Event()  # pulsed at every input: tests and waiters
        self._pump: TimerPump | None = None  # while running: the machines' one loop timer
        self._tasks: list[asyncio.Task[None]] = []
        self._requests_received: dict[int, float] = {}  # request id -> loop time (bounded)
        self._entry_checkpoint: int | None = None  # the checkpoint that enters COLO
        self._shutdown_seen = False
        self.events: list[QmpEvent] = []  # the last QMP events (bounded), for tests and logs

    @property
    def leader(self) -> LeaderKey | None:
        """The leader key's decisions (quorum mode), None in the two-host mode."""
        return self.leadership.key if self.leadership is not None else None

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
        boot = time.time_ns() // 1000  # grows across restarts: ReplayWindow
        self.decider = FailoverDecider(
            DeciderConfig(
                pair=settings.pair,
                role=settings.role,
                boot=boot,
                interval=settings.heartbeat_interval_ms / 1000,
                timeout=settings.failover_timeout_ms / 1000,
                quorum=self.leadership is not None,
            ),
            now,
        )
        self.runstate = EngineRunstate.RUNNING
        self._pump = TimerPump(loop, self)
        if self.leadership is None:
            log.warning("%s", TWO_HOST_WARNING)
            self._fence(float("inf"))
        else:
            self.leadership.start(now, f"{settings.pair} {self.role.value} boot {boot}")
            self._pulse()
        why = "cancelled"
        try:
            await self.peer.start()
            self._rearm()
            self._spawn(self._qmp_lane.work(), "engine-qmp-lane")
            self._spawn(self.proxy_link.deliver(), "engine-control-lane")
            self._spawn(self.proxy_link.run(), "engine-control")
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
        if self._pump is not None:
            self._pump.target = None  # no timer from here on
        if self.leadership is not None:
            await self.leadership.aclose(self._now())
        tasks = [*self._tasks]
        if self.failover_task is not None:
            tasks.append(self.failover_task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.monitor.close()
        await self.peer.aclose()
        await self.proxy_link.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(_log_failure)
        self._tasks.append(task)

    def _spawn_quick(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        """A short call (the quorum service's) as a task of its own (done ones are
        forgotten)."""
        self._tasks = [task for task in self._tasks if not task.done()]
        self._spawn(coroutine, name)

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

    def get_timer(self) -> float | None:
        """The earliest of the machines' deadlines (for the pump)."""
        deadlines = [
            machine.get_timer()
            for machine in (self.scheduler, self.decider, self.leader)
            if machine is not None
        ]
        return min((d for d in deadlines if d is not None), default=None)

    def handle_timer(self, now: float) -> None:
        """The pump's timer fired: each machine acts on what is due by ``now``."""
        if self.decider is not None:
            self._decide(self.decider.handle_timer(now), rearm=False)
        if self.scheduler is not None:
            self._schedule(self.scheduler.handle_timer(now), rearm=False)
        if self.leadership is not None:
            self.leadership.handle_timer(now)
            self._pulse()

    def _rearm(self) -> None:
        """An input reached the machines: their deadlines looked at again, now."""
        if self._pump is not None:
            self._pump.settle()

    # -- inputs ----------------------------------------------------------------------------

    def _on_push(self, push: Push) -> None:
        if isinstance(push, CheckpointRequest):
            self._on_request(push)
        else:
            self._on_set_period(push)
        self._pulse()

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
            self.colo.block_io_error(event)
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
                self.proxy_link.notify("svm-stopped", stopped)
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
                self.proxy_link.notify("svm-synced", message)
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
        if self.role is Role.PRIMARY and mode is ColoMode.PRIMARY and self.leadership is not None:
            self.leadership.clear_alone()
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
        self.proxy_link.notify("checkpoint-started", message)

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
        self.proxy_link.notify("checkpoint-completed", message)
        log.debug(
            "checkpoint %d (%s) done: pause %.1f ms, requests %s",
            action.checkpoint,
            action.reason,
            action.pause * 1000,
            action.requests,
        )

    def _decide(self, actions: list[DecideAction], *, rearm: bool = True) -> None:
        for action in actions:
            if isinstance(action, SendHeartbeat):
                self.peer.send(action.heartbeat)
            elif isinstance(action, PrimaryLost):
                if self.leadership is not None:
                    # The heartbeats only start the contest; the key decides.
                    log.warning(
                        "primary looks lost (%s, silent %.0f ms): contesting the leader key",
                        action.reason,
                        action.silent_for * 1000,
                    )
                    self._contest = action
                    self.figures.key_events["contest"] += 1
                    self.leadership.contend(self._now())
                    self._pulse()
                else:
                    self._start_failover(self._take_over(action), "primary-lost")
            elif isinstance(action, SecondaryLost):
                self._start_failover(self._leave_colo(action), "secondary-lost")
            elif isinstance(action, StoodDown):
                self.figures.failovers["stood-down"] += 1
                if self.leadership is not None:
                    now = self._now()
                    self.leadership.stop(now)
                    if self.role is Role.PRIMARY:
                        self.leadership.hand_over(now)
                    self._pulse()
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
                if self.leadership is not None:
                    # The fast path: the peer need not wait for the lease to run out.
                    self.leadership.hand_over(self._now())
                    self._pulse()
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

    def _on_key(self, outcome: KeyOutcome) -> None:
        """What the leader key decided, for the failover decider (quorum mode)."""
        if isinstance(outcome, Won):
            self._won()
            return
        decider = self.decider
        if decider is None:
            return
        now = self._now()
        if isinstance(outcome, Fenced | Unfenced):
            actions = decider.set_fenced(isinstance(outcome, Fenced), now)
        elif isinstance(outcome, KeyLost):
            if outcome.reason == "released":
                return
            actions = decider.key_lost("key-lost", now)
        else:
            actions = decider.refused("primary-alone", now)
        self._decide(actions, rearm=False)

    def _changed_by_key(self) -> None:
        """The quorum service answered (on its own, not inside one of our inputs)."""
        self._pulse()
        self._rearm()

    def _won(self) -> None:
        leadership, decider = self.leadership, self.decider
        assert leadership is not None
        if decider is None:
            return
        if self.role is Role.PRIMARY:
            if decider.colo is ColoMode.PRIMARY:
                leadership.clear_alone()
            return
        contest = self._contest
        actions = decider.won(self._now()) if contest is not None else []
        if contest is not None and actions:
            self._decide(actions, rearm=False)  # the heartbeat now says failed_over
            self._start_failover(self._take_over(contest), "primary-lost")
            return
        # Won a contest this side gave up meanwhile (it stood down): give the key back.
        log.warning("the contest was abandoned: handing the leader key back")
        leadership.hand_over(self._now())

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
            await self.proxy_link.tell_failover(
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
        scheduler, decider = self.scheduler, self.decider
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

        def aborted() -> None:
            self._schedule(scheduler.aborted(self._now()))
            self._entry_checkpoint = None

        await self.colo.bring_up(
            uri,
            scheduler.backstop_ms,
            migrating=lambda: self._schedule(scheduler.bring_up(self._now())),
            aborted=aborted,
        )

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
        steps = self._failover_begins(decision, "leaving COLO, running unprotected")
        if self.scheduler is not None:
            self._schedule(self.scheduler.deactivate(steps.started))
        if self.leadership is not None:
            # Before the guest runs past the secondary's state: a secondary that won the key
            # later would take over with a stale copy.
            if not await self.leadership.mark_alone():
                log.critical("cannot mark this pair alone (the key is lost): not leaving COLO")
                return
            steps.mark("marked-alone")
        await self.colo.leave_colo(steps, decision.reason)
        await self._failover_done(steps, "unprotected: failover done", total="proxy")

    # -- secondary -------------------------------------------------------------------------

    async def _start_secondary(self) -> None:
        decider = self.decider
        if decider is None:
            return
        status = await self.monitor.colo_status()
        self._colo_seen(status)
        ready = await self.colo.ready_secondary(status)
        self._decide(decider.set_ready(ready, self._now()))

    async def _take_over(self, decision: PrimaryLost) -> None:
        """Primary lost: the SVM runs alone, on the LAN, and the proxy is told."""
        steps = self._failover_begins(decision, "taking over")
        resumes = sum(1 for e in self.events if e.name == "RESUME")
        if not await self.colo.take_over(steps, decision.reason):
            return
        if self.leadership is not None:
            self.leadership.mark(True)  # runs alone now: no stale takeover back
            self._changed_by_key()

        def resumed() -> bool:
            return sum(1 for e in self.events if e.name == "RESUME") > resumes

        try:
            await self.wait_until(resumed, RESUME_WAIT)
            resume = next(e for e in reversed(self.events) if e.name == "RESUME")
            steps.mark("resume", at=resume.received)
        except TimeoutError:
            log.error("no RESUME within %.0f s after x-colo-lost-heartbeat", RESUME_WAIT)
        await self._failover_done(steps, "took over")

    # -- both ------------------------------------------------------------------------------

    def _failover_begins(self, decision: PrimaryLost | SecondaryLost, doing: str) -> FailoverSteps:
        """A failover's start: its steps timed from now, the decision logged."""
        steps = FailoverSteps(self.figures.last_failover, self._now)
        lost = "primary" if isinstance(decision, PrimaryLost) else "secondary"
        log.error(
            "%s lost (%s, silent %.0f ms): %s",
            lost,
            decision.reason,
            decision.silent_for * 1000,
            doing,
        )
        return steps

    async def _failover_done(
        self, steps: FailoverSteps, what: str, *, total: str | None = None
    ) -> None:
        """The failover's end: the COLO mode read again, the steps logged. ``total``: the
        step whose time is the failover's; None: a step ``done`` of its own, now."""
        with contextlib.suppress(QmpError):
            self._colo_seen(await self.monitor.colo_status())
        if total is None:
            total = "done"
            steps.mark(total)
        log.warning("%s in %.1f ms (%s)", what, steps.times[total] * 1000, steps.summary())
        self._pulse()

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
                        self.figures.migration = await self.colo.migration_figures()
                except QmpError as exc:
                    log.debug("poll: %s", exc)
        finally:
            log.debug("engine poll ended: %s", why)


def _log_failure(task: asyncio.Task[None]) -> None:
    """A background task of the engine ended by an error: say which and why."""
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, QmpError):
        log.error("engine task %s ended: %s", task.get_name(), exc)
    elif exc is not None:
        log.error("engine task %s failed", task.get_name(), exc_info=exc)


__all__ = ["EngineRunner", "EngineRunstate"]
