"""The checkpoint scheduler (pure): when to checkpoint.

Theory of operation
-------------------
A state machine, an enum of states and one transition table, fed by the shell
(:mod:`coloproxy.engine.runner`) with what it saw and the time, returning the actions to
take as frozen dataclasses. Nothing here reads a clock or touches a socket: ``now`` is the
shell's monotonic clock (seconds), ``wall`` a Unix time in seconds (the proxy's request times
and QEMU's event timestamps are both wall clock of the same host).

:class:`CheckpointScheduler` turns checkpoint requests into COLO checkpoints on the primary.

- QEMU has no "checkpoint now" command: setting ``x-checkpoint-delay`` while in COLO starts
  one at once (docs/invariants.md). The scheduler's :class:`Trigger` action means exactly
  that. The value set is a *backstop* (:func:`backstop_ms`, twice the period plus a second),
  not the period: QEMU restarts its own timer at every trigger, so while the engine runs,
  QEMU's timer never fires and our period is the one in force (measured from the end of the
  last checkpoint, which QEMU's cannot do: it counts from the start); if the engine dies,
  QEMU still checkpoints at the backstop interval.
- One checkpoint at a time: QEMU merges a trigger that arrives while it is checkpointing
  (``colo_do_checkpoint_transaction`` resets the event only after the secondary received the
  state), so the next trigger is sent only after the primary's ``RESUME``.
- A request is served by the first checkpoint whose ``STOP`` is later than the request's
  time. The proxy stamps a request when it is sent, after the packets it is about were
  produced, so such a checkpoint began after those packets (I1). A request that arrives
  while a checkpoint is in flight therefore joins it when it is older than the ``STOP``,
  and otherwise waits for the next one, which is triggered right after the ``RESUME``,
  ``min_gap`` after the last completion at the earliest.
- A ``STOP`` the engine did not trigger (QEMU's backstop timer, another QMP client, the
  migration's last stop during bring-up) is a checkpoint all the same and serves what it can.
- Periodic: ``period`` after the last completion (after activation, before the first).
- Bounded waiting: no ``STOP`` within ``trigger_timeout`` after a trigger: trigger again, up
  to ``trigger_retries`` times, then :class:`CheckpointStalled`; no ``RESUME`` within
  ``checkpoint_timeout`` after the ``STOP``: :class:`CheckpointStalled` (the shell hands that
  to the failover decider: a checkpoint that never ends means the secondary is gone).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from coloproxy.errors import UsageError

UINT32_MAX: Final = 2**32 - 1
# QEMU's x-checkpoint-delay default (docs/invariants.md).
DEFAULT_PERIOD_MS: Final = 20000
# A forced checkpoint starts 1-2 ms after the QMP reply (docs/invariants.md); a second
# leaves room for a loaded host without letting a lost trigger hold output for long.
DEFAULT_TRIGGER_TIMEOUT: Final = 1.0
DEFAULT_TRIGGER_RETRIES: Final = 3
# Measured pauses are 2-30 ms with a 256 MiB guest (docs/invariants.md); a checkpoint that
# has not ended after 10 s is stuck (the secondary is gone), not slow.
DEFAULT_CHECKPOINT_TIMEOUT: Final = 10.0


def backstop_ms(period_ms: int) -> int:
    """The ``x-checkpoint-delay`` the engine sets: QEMU's own timer, restarted at every
    trigger, must never fire before ours (``period`` after the last completion, i.e. at most
    period + one pause after the last trigger), yet fire if the engine is gone."""
    return min(UINT32_MAX, 2 * period_ms + 1000)


# -- checkpoint scheduler --------------------------------------------------------------------


class Phase(Enum):
    OFF = "off"  # not in COLO (before bring-up, after failover): nothing is triggered
    ENTERING = "entering"  # bring-up: the migration runs; its last STOP is the first checkpoint
    IDLE = "idle"  # in COLO, no checkpoint in flight
    TRIGGERED = "triggered"  # a trigger was sent, the primary's STOP not seen yet
    RUNNING = "running"  # the primary's STOP was seen, its RESUME not yet


class Input(Enum):
    BRING_UP = "bring-up"
    ACTIVATE = "activate"  # COLO is in force (query-colo-status said so)
    TRIGGER = "trigger"
    STOP = "stop"  # the primary's STOP event
    RESUME = "resume"  # the primary's RESUME event, with COLO still in force
    ABORT = "abort"  # the checkpoint failed: COLO ended under it
    DEACTIVATE = "deactivate"  # COLO is over (failover)


_TRANSITIONS: Final[Mapping[tuple[Phase, Input], Phase]] = {
    (Phase.OFF, Input.BRING_UP): Phase.ENTERING,
    (Phase.OFF, Input.ACTIVATE): Phase.IDLE,  # an engine (re)started while QEMU is in COLO
    (Phase.OFF, Input.DEACTIVATE): Phase.OFF,
    (Phase.ENTERING, Input.STOP): Phase.RUNNING,
    (Phase.ENTERING, Input.ACTIVATE): Phase.IDLE,
    (Phase.ENTERING, Input.ABORT): Phase.OFF,
    (Phase.ENTERING, Input.DEACTIVATE): Phase.OFF,
    (Phase.IDLE, Input.ACTIVATE): Phase.IDLE,
    (Phase.IDLE, Input.TRIGGER): Phase.TRIGGERED,
    (Phase.IDLE, Input.STOP): Phase.RUNNING,  # QEMU's backstop timer or another client
    (Phase.IDLE, Input.DEACTIVATE): Phase.OFF,
    (Phase.TRIGGERED, Input.ACTIVATE): Phase.TRIGGERED,
    (Phase.TRIGGERED, Input.TRIGGER): Phase.TRIGGERED,  # again, after the trigger timeout
    (Phase.TRIGGERED, Input.STOP): Phase.RUNNING,
    (Phase.TRIGGERED, Input.ABORT): Phase.OFF,
    (Phase.TRIGGERED, Input.DEACTIVATE): Phase.OFF,
    (Phase.RUNNING, Input.ACTIVATE): Phase.RUNNING,
    (Phase.RUNNING, Input.RESUME): Phase.IDLE,
    (Phase.RUNNING, Input.ABORT): Phase.OFF,
    (Phase.RUNNING, Input.DEACTIVATE): Phase.OFF,
}

# Checkpoint reasons besides the requests' own (payload, restart, manual, ...): metric labels.
REASON_PERIODIC: Final = "periodic"  # our period elapsed
REASON_QEMU: Final = "qemu"  # a STOP we did not trigger (QEMU's backstop timer, another client)
REASON_COLO_ENTRY: Final = "colo-entry"  # the migration that entered COLO


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Seconds throughout (the shell's clock); the config file's milliseconds converted."""

    period: float = DEFAULT_PERIOD_MS / 1000
    min_gap: float = 0.1
    trigger_timeout: float = DEFAULT_TRIGGER_TIMEOUT
    trigger_retries: int = DEFAULT_TRIGGER_RETRIES
    checkpoint_timeout: float = DEFAULT_CHECKPOINT_TIMEOUT

    def __post_init__(self) -> None:
        if not self.period > 0 or self.min_gap < 0:
            raise UsageError("period must be positive and min_gap non-negative")
        if not self.trigger_timeout > 0 or not self.checkpoint_timeout > 0:
            raise UsageError("timeouts must be positive")
        if self.trigger_retries < 0:
            raise UsageError("trigger_retries must not be negative")


@dataclass(frozen=True, slots=True)
class Request:
    """A checkpoint request as the scheduler keeps it."""

    id: int
    reason: str
    wall: float  # the proxy's wall clock when it sent the request
    received: float  # the engine's clock when it arrived


@dataclass(frozen=True, slots=True)
class Trigger:
    """Start a checkpoint now: ``migrate-set-parameters x-checkpoint-delay=backstop_ms``."""

    checkpoint: int  # the engine's checkpoint number
    requests: tuple[int, ...]  # the requests that asked for it (none for a periodic one)
    reason: str
    backstop_ms: int
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class CheckpointBegan:
    """The primary stopped: tell the proxy ``checkpoint-started``."""

    checkpoint: int
    requests: tuple[int, ...]  # the requests this checkpoint serves so far
    reason: str
    wall: float  # QEMU's STOP timestamp


@dataclass(frozen=True, slots=True)
class CheckpointEnded:
    """The primary resumed in COLO: the secondary holds the state; ``checkpoint-completed``."""

    checkpoint: int
    requests: tuple[int, ...]  # every request this checkpoint served
    reason: str
    started_wall: float  # QEMU's STOP timestamp
    completed_wall: float  # QEMU's RESUME timestamp
    pause: float  # STOP -> RESUME as QEMU stamped them, seconds
    triggered: float | None  # our clock when the (last) trigger was sent; None if not ours
    stopped: float  # our clock when the STOP was seen
    # Engine clock from the arrival of the oldest request served to the STOP (None: none).
    request_to_stop: float | None


@dataclass(frozen=True, slots=True)
class CheckpointAborted:
    """COLO ended under a checkpoint; its requests are pending again (a later checkpoint
    or a failover serves them)."""

    checkpoint: int
    requests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CheckpointStalled:
    """A trigger found no STOP after every retry, or a checkpoint did not end in time."""

    checkpoint: int
    phase: Phase
    waited: float  # seconds since the trigger or the STOP


@dataclass(frozen=True, slots=True)
class RequestsAbandoned:
    """COLO is over (failover): these requests will get no checkpoint; the proxy, told it
    runs unprotected, releases what it held without one."""

    requests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unexpected:
    """An event that has no meaning in the current phase (a RESUME without a STOP, ...)."""

    event: Input
    phase: Phase


ScheduleAction = (
    Trigger
    | CheckpointBegan
    | CheckpointEnded
    | CheckpointAborted
    | CheckpointStalled
    | RequestsAbandoned
    | Unexpected
)


@dataclass(slots=True)
class _InFlight:
    number: int
    reason: str | None  # None until known: the first request served, or periodic/qemu/entry
    requests: list[Request] = field(default_factory=list)
    triggered: float | None = None  # our clock at the last trigger
    attempts: int = 0
    stopped: float | None = None  # our clock at STOP
    stop_wall: float = 0.0  # QEMU's STOP timestamp
    stalled: bool = False  # CheckpointStalled reported (once)


class CheckpointScheduler:
    """See the module docstring. Every method returns the actions to take, in order."""

    def __init__(self, config: SchedulerConfig, now: float) -> None:
        self.config = config
        self.phase = Phase.OFF
        self._period = config.period
        self._pending: list[Request] = []
        self._current: _InFlight | None = None
        self._numbers = itertools.count(1)
        self._active_since = now  # the periodic timer's base until the first completion
        self.last_completed: float | None = None

    # -- inspection ------------------------------------------------------------------------

    @property
    def period(self) -> float:
        return self._period

    @property
    def pending(self) -> tuple[int, ...]:
        """Requests not yet attached to a checkpoint."""
        return tuple(request.id for request in self._pending)

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Requests the checkpoint in flight serves."""
        current = self._current
        return () if current is None else tuple(r.id for r in current.requests)

    @property
    def backstop_ms(self) -> int:
        return backstop_ms(round(self._period * 1000))

    # -- inputs ----------------------------------------------------------------------------

    def _step(self, event: Input) -> bool:
        target = _TRANSITIONS.get((self.phase, event))
        if target is None:
            return False
        self.phase = target
        return True

    def request(
        self, request_id: int, reason: str, now: float, wall: float
    ) -> list[ScheduleAction]:
        """A checkpoint request from the proxy (``wall``: its ``time`` field)."""
        if request_id in self.pending or request_id in self.in_flight:
            return []  # the proxy re-sends its outstanding request to a reconnecting engine
        request = Request(request_id, reason, wall, now)
        current = self._current
        if (
            self.phase is Phase.RUNNING
            and current is not None
            and current.stopped is not None
            and wall < current.stop_wall
        ):
            current.requests.append(request)  # older than the STOP: the running one serves it
            return []
        self._pending.append(request)
        if self.phase is Phase.IDLE and now >= self._gap_deadline():
            return self._trigger(now)
        return []

    def bring_up(self, now: float) -> list[ScheduleAction]:
        """The shell starts the migration that enters COLO."""
        if not self._step(Input.BRING_UP):
            return [Unexpected(Input.BRING_UP, self.phase)]
        return []

    def activate(self, now: float) -> list[ScheduleAction]:
        """COLO is in force without a checkpoint of ours in flight (engine restarted, or the
        entry was missed): periodic checkpoints start, pending requests are triggered."""
        before = self.phase
        if not self._step(Input.ACTIVATE):
            return [Unexpected(Input.ACTIVATE, self.phase)]
        if before in (Phase.OFF, Phase.ENTERING):
            self._active_since = now
            self._current = None
        if self.phase is Phase.IDLE and self._pending and now >= self._gap_deadline():
            return self._trigger(now)
        return []

    def started(self, now: float, wall: float) -> list[ScheduleAction]:
        """The primary's STOP event (``wall``: QEMU's timestamp of it)."""
        before = self.phase
        if not self._step(Input.STOP):
            return [Unexpected(Input.STOP, self.phase)]
        current = self._current
        if current is None or before is not Phase.TRIGGERED:
            reason = REASON_COLO_ENTRY if before is Phase.ENTERING else None
            current = self._current = _InFlight(next(self._numbers), reason)
        current.stopped = now
        current.stop_wall = wall
        served = [r for r in self._pending if r.wall < wall]
        self._pending = [r for r in self._pending if r.wall >= wall]
        current.requests.extend(served)
        if current.reason is None:
            if current.requests:
                current.reason = current.requests[0].reason
            else:
                current.reason = REASON_PERIODIC if current.triggered is not None else REASON_QEMU
        return [
            CheckpointBegan(
                current.number, tuple(r.id for r in current.requests), current.reason, wall
            )
        ]

    def completed(self, now: float, wall: float) -> list[ScheduleAction]:
        """The primary's RESUME event with COLO still in force (``wall``: its timestamp)."""
        current = self._current
        if current is None or current.stopped is None or not self._step(Input.RESUME):
            return [Unexpected(Input.RESUME, self.phase)]
        self._current = None
        self.last_completed = now
        oldest = min((r.received for r in current.requests), default=None)
        actions: list[ScheduleAction] = [
            CheckpointEnded(
                checkpoint=current.number,
                requests=tuple(r.id for r in current.requests),
                reason=current.reason or REASON_QEMU,
                started_wall=current.stop_wall,
                completed_wall=wall,
                pause=max(0.0, wall - current.stop_wall),
                triggered=current.triggered,
                stopped=current.stopped,
                request_to_stop=None if oldest is None else max(0.0, current.stopped - oldest),
            )
        ]
        if self._pending and now >= self._gap_deadline():
            actions.extend(self._trigger(now))
        return actions

    def aborted(self, now: float) -> list[ScheduleAction]:
        """COLO ended under the checkpoint in flight (or the bring-up failed)."""
        current = self._current
        if not self._step(Input.ABORT):
            return [Unexpected(Input.ABORT, self.phase)]
        self._current = None
        if current is None:
            return []
        # Back to pending, oldest first: a later checkpoint or a failover serves them.
        self._pending = sorted([*current.requests, *self._pending], key=lambda r: r.received)
        return [CheckpointAborted(current.number, tuple(r.id for r in current.requests))]

    def deactivate(self, now: float) -> list[ScheduleAction]:
        """COLO is over (failover): nothing more is triggered; what waited is abandoned."""
        if not self._step(Input.DEACTIVATE):
            return [Unexpected(Input.DEACTIVATE, self.phase)]
        current = self._current
        waiting = [*(current.requests if current is not None else ()), *self._pending]
        self._current = None
        self._pending = []
        if not waiting:
            return []
        return [RequestsAbandoned(tuple(r.id for r in waiting))]

    def set_period(self, period: float, now: float) -> list[ScheduleAction]:
        """A new period, live. It counts from the last completion; nothing is triggered now
        (the new backstop reaches QEMU with the next trigger)."""
        if not period > 0:
            raise UsageError(f"period {period} s is not positive")
        self._period = period
        return []

    # -- timers ----------------------------------------------------------------------------

    def _gap_deadline(self) -> float:
        if self.last_completed is None:
            return float("-inf")
        return self.last_completed + self.config.min_gap

    def _periodic_deadline(self) -> float:
        base = self.last_completed if self.last_completed is not None else self._active_since
        return base + self._period

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` has something to do, or None."""
        current = self._current
        if self.phase is Phase.IDLE:
            deadline = self._periodic_deadline()
            if self._pending:
                deadline = min(deadline, self._gap_deadline())
            return deadline
        if current is None or current.stalled:
            return None
        if self.phase is Phase.TRIGGERED and current.triggered is not None:
            return current.triggered + self.config.trigger_timeout
        if self.phase is Phase.RUNNING and current.stopped is not None:
            return current.stopped + self.config.checkpoint_timeout
        return None

    def handle_timer(self, now: float) -> list[ScheduleAction]:
        current = self._current
        if self.phase is Phase.IDLE:
            if self._pending and now >= self._gap_deadline():
                return self._trigger(now)
            if now >= self._periodic_deadline():
                return self._trigger(now)
            return []
        if current is None or current.stalled:
            return []
        if self.phase is Phase.TRIGGERED and current.triggered is not None:
            waited = now - current.triggered
            if waited < self.config.trigger_timeout:
                return []
            if current.attempts <= self.config.trigger_retries:
                return self._trigger(now)
            current.stalled = True
            return [CheckpointStalled(current.number, self.phase, waited)]
        if self.phase is Phase.RUNNING and current.stopped is not None:
            waited = now - current.stopped
            if waited >= self.config.checkpoint_timeout:
                current.stalled = True
                return [CheckpointStalled(current.number, self.phase, waited)]
        return []

    def _trigger(self, now: float) -> list[ScheduleAction]:
        current = self._current
        if current is None:
            current = self._current = _InFlight(next(self._numbers), None)
        self._step(Input.TRIGGER)
        current.triggered = now
        current.attempts += 1
        return [
            Trigger(
                checkpoint=current.number,
                requests=tuple(r.id for r in self._pending),
                reason=self._pending[0].reason if self._pending else REASON_PERIODIC,
                backstop_ms=self.backstop_ms,
                attempt=current.attempts,
            )
        ]


__all__ = [
    "DEFAULT_CHECKPOINT_TIMEOUT",
    "DEFAULT_PERIOD_MS",
    "DEFAULT_TRIGGER_RETRIES",
    "DEFAULT_TRIGGER_TIMEOUT",
    "REASON_COLO_ENTRY",
    "REASON_PERIODIC",
    "REASON_QEMU",
    "UINT32_MAX",
    "CheckpointAborted",
    "CheckpointBegan",
    "CheckpointEnded",
    "CheckpointScheduler",
    "CheckpointStalled",
    "Input",
    "Phase",
    "Request",
    "RequestsAbandoned",
    "ScheduleAction",
    "SchedulerConfig",
    "Trigger",
    "Unexpected",
    "backstop_ms",
]
