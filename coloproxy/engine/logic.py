"""The checkpoint engine's decisions (pure): when to checkpoint, and when to fail over.

Theory of operation
-------------------
Two state machines, each an enum of states and one transition table, fed by the shell
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

:class:`FailoverDecider` runs on both daemons. It watches the peer daemon's heartbeats (UDP,
on the replication link and optionally on the LAN) and the local QEMU, and decides:

- on the secondary, :class:`PrimaryLost` when the primary is silent for ``timeout`` on every
  path, or says its QEMU exited, *and* the local QEMU still runs in COLO secondary mode;
- on the primary, :class:`SecondaryLost` when the secondary is silent, says its QEMU exited,
  or the local QEMU left COLO (``COLO_EXIT``) or a checkpoint stalled. The primary keeps
  serving, unprotected. (The secondary's own ``COLO_EXIT`` is no evidence: the stream breaks
  just as well when the primary QEMU dies.)
- :class:`StoodDown` on the secondary when the primary says it failed over (runs alone) or
  its guest shut down: the secondary's state is then stale and it must never take over; on
  the primary when the secondary says it took over (this daemon was silent too long): the
  primary must stop serving.
- A daemon stopped on purpose says so in its last heartbeat (``leaving``); the peer does not
  take its silence for a death until it is heard again (a planned restart is no failover).

Split brain: with only the replication link, a cut link makes each side believe the other
is dead; the primary goes unprotected and the secondary takes over, and both serve.
A second heartbeat path over the LAN prevents that (a cut replication link then stalls the
primary's checkpoint, the primary fails over alone and tells the secondary over the LAN,
which stands down); a third-party witness would be needed against a cut LAN as well.
When both sides serve and hear each other again, :class:`SplitBrain` is reported.
docs/engine.md has the whole argument.

Heartbeats are sealed (:func:`seal_heartbeat`: HMAC-SHA256 with a key both daemons read from
a file) and each path keeps a :class:`ReplayWindow` over ``boot`` and ``seq``: a forged or
replayed datagram is counted and never reaches the decider.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Final

from coloproxy.errors import UsageError
from coloproxy.role import Role

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
HEARTBEAT_VERSION: Final = 2  # 2: sealed with an HMAC (seal_heartbeat)
MAX_HEARTBEAT_BYTES: Final = 1024
# A sealed heartbeat: this magic, HMAC-SHA256 over magic and body, the JSON body.
HEARTBEAT_MAGIC: Final = b"CPH2"
HEARTBEAT_TAG_BYTES: Final = 32
# A shorter shared secret is guessable offline from one captured datagram.
MIN_HEARTBEAT_KEY_BYTES: Final = 16


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


# -- failover ----------------------------------------------------------------------------------


class QemuState(StrEnum):
    """The local QEMU as its QMP connection shows it."""

    UNKNOWN = "unknown"  # not connected yet
    RUNNING = "running"  # connected (the guest may be paused; the process lives)
    SHUTDOWN = "shutdown"  # the guest powered off (QMP SHUTDOWN): a stop, not a crash
    EXITED = "exited"  # the QMP socket closed without a SHUTDOWN: the process is gone


class ColoMode(StrEnum):
    """``query-colo-status`` ``mode``."""

    NONE = "none"
    PRIMARY = "primary"
    SECONDARY = "secondary"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What one daemon tells the other, several times a second, over UDP."""

    pair: str
    role: Role
    boot: int  # the sender's start time (microseconds): a restart shows as a larger value
    sequence: int
    qemu: QemuState
    colo: ColoMode  # the sender's last query-colo-status mode
    ready: bool = False  # secondary: its QEMU waits for the migration, x-colo set where needed
    failed_over: bool = False  # primary: left COLO, runs alone; secondary: took over
    colo_exit: bool = False  # the sender's QEMU reported COLO_EXIT (its COLO stream broke)
    serving: bool = False  # the sender's guest serves the LAN
    leaving: bool = False  # the sender's engine stops on purpose (daemon restart): not a death
    fenced: bool = False  # quorum: the sender (a primary) is past its leader key's deadline

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": HEARTBEAT_VERSION,
                "pair": self.pair,
                "role": self.role.value,
                "boot": self.boot,
                "seq": self.sequence,
                "qemu": self.qemu.value,
                "colo": self.colo.value,
                "ready": self.ready,
                "failed_over": self.failed_over,
                "colo_exit": self.colo_exit,
                "serving": self.serving,
                "leaving": self.leaving,
                "fenced": self.fenced,
            },
            separators=(",", ":"),
        ).encode("ascii")


@dataclass(frozen=True, slots=True)
class BadHeartbeat:
    """A datagram that is not a heartbeat; ``reason`` is a metric label."""

    reason: str  # oversized, forged, replayed, not-json, not-object, version, field


def _tag(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def seal_heartbeat(heartbeat: Heartbeat, key: bytes) -> bytes:
    """The datagram: magic, HMAC-SHA256 (``key``) over magic and JSON body, the body."""
    if len(key) < MIN_HEARTBEAT_KEY_BYTES:
        raise UsageError(f"a heartbeat key has at least {MIN_HEARTBEAT_KEY_BYTES} bytes")
    body = heartbeat.encode()
    return HEARTBEAT_MAGIC + _tag(key, HEARTBEAT_MAGIC + body) + body


def open_heartbeat(data: bytes, key: bytes) -> Heartbeat | BadHeartbeat:
    """A sealed datagram's heartbeat, or why not (``forged``: no magic or a wrong tag, the
    body is not even read). Never raises."""
    if len(data) > MAX_HEARTBEAT_BYTES:
        return BadHeartbeat("oversized")
    head = len(HEARTBEAT_MAGIC) + HEARTBEAT_TAG_BYTES
    if len(data) < head or not data.startswith(HEARTBEAT_MAGIC):
        return BadHeartbeat("forged")
    body = data[head:]
    if not hmac.compare_digest(
        data[len(HEARTBEAT_MAGIC) : head], _tag(key, HEARTBEAT_MAGIC + body)
    ):
        return BadHeartbeat("forged")
    return decode_heartbeat(body)


class ReplayWindow:
    """Which authentic heartbeats are new, per path: a later ``boot`` (the sender restarted:
    boots grow, they are its start time) or, within the same boot, a higher ``seq``. Anything
    else was heard before (or is older than what was) and is a replay: a recorded datagram
    sent again keeps its tag, so the tag alone proves only who wrote it, not when.

    A receiver that starts afresh knows no boot yet and takes the first authentic one; a
    replay of an older boot is then refused as soon as the real sender is heard. The same
    heartbeat arrives once on each path, so each path has its own window."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}

    def fresh(self, path: str, boot: int, sequence: int) -> bool:
        """True (and remembered) when new; False for a replay."""
        last = self._last.get(path)
        if last is not None and (boot, sequence) <= last:
            return False
        self._last[path] = (boot, sequence)
        return True


def decode_heartbeat(data: bytes) -> Heartbeat | BadHeartbeat:
    """The JSON body of a heartbeat (``open_heartbeat`` checked its tag). Never raises: bad
    input is data."""
    if len(data) > MAX_HEARTBEAT_BYTES:
        return BadHeartbeat("oversized")
    try:
        wire = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return BadHeartbeat("not-json")
    if not isinstance(wire, dict):
        return BadHeartbeat("not-object")
    if wire.get("v") != HEARTBEAT_VERSION:
        return BadHeartbeat("version")
    try:
        pair, boot, sequence = wire["pair"], wire["boot"], wire["seq"]
        if not isinstance(pair, str) or not isinstance(boot, int) or not isinstance(sequence, int):
            return BadHeartbeat("field")
        names = ("ready", "failed_over", "colo_exit", "serving", "leaving", "fenced")
        flags = [wire.get(name, False) for name in names]
        if not all(isinstance(flag, bool) for flag in flags):
            return BadHeartbeat("field")
        return Heartbeat(
            pair=pair,
            role=Role(wire["role"]),
            boot=boot,
            sequence=sequence,
            qemu=QemuState(wire["qemu"]),
            colo=ColoMode(wire["colo"]),
            ready=flags[0],
            failed_over=flags[1],
            colo_exit=flags[2],
            serving=flags[3],
            leaving=flags[4],
            fenced=flags[5],
        )
    except (KeyError, ValueError, TypeError):
        return BadHeartbeat("field")


class Watch(Enum):
    STANDBY = "standby"  # not protected yet: the local QEMU is not in COLO
    WATCHING = "watching"  # protected: the peer and the local QEMU are watched
    CONTESTING = "contesting"  # quorum, secondary: the primary looks lost; wants the key
    FAILED_OVER = "failed-over"  # decided: primary runs alone / secondary took over
    STOOD_DOWN = "stood-down"  # secondary: the primary runs alone; never take over
    LOCAL_LOST = "local-lost"  # the local QEMU is gone: nothing left to decide


class Evidence(Enum):
    ARMED = "armed"  # the local QEMU is in COLO in this side's mode
    PEER_LOST = "peer-lost"
    PEER_ALONE = "peer-alone"  # secondary: the primary failed over or shut down
    LOCAL_GONE = "local-gone"
    LEFT_COLO = "left-colo"  # secondary: the local QEMU is no longer a COLO secondary
    CONTEST = "contest"  # quorum, secondary: the primary looks lost; the key decides
    WON = "won"  # quorum, secondary: the key is ours
    KEY_LOST = "key-lost"  # quorum: another host holds (or may hold) the key


_WATCH_TRANSITIONS: Final[Mapping[tuple[Watch, Evidence], Watch]] = {
    (Watch.STANDBY, Evidence.ARMED): Watch.WATCHING,
    (Watch.STANDBY, Evidence.PEER_ALONE): Watch.STOOD_DOWN,  # primary: the secondary took over
    (Watch.STANDBY, Evidence.LOCAL_GONE): Watch.LOCAL_LOST,
    (Watch.WATCHING, Evidence.PEER_LOST): Watch.FAILED_OVER,
    (Watch.WATCHING, Evidence.PEER_ALONE): Watch.STOOD_DOWN,
    (Watch.WATCHING, Evidence.LEFT_COLO): Watch.STOOD_DOWN,
    (Watch.WATCHING, Evidence.LOCAL_GONE): Watch.LOCAL_LOST,
    (Watch.FAILED_OVER, Evidence.LOCAL_GONE): Watch.LOCAL_LOST,
    (Watch.STOOD_DOWN, Evidence.LOCAL_GONE): Watch.LOCAL_LOST,
    (Watch.WATCHING, Evidence.CONTEST): Watch.CONTESTING,
    (Watch.CONTESTING, Evidence.WON): Watch.FAILED_OVER,
    (Watch.CONTESTING, Evidence.PEER_ALONE): Watch.STOOD_DOWN,
    (Watch.CONTESTING, Evidence.LEFT_COLO): Watch.STOOD_DOWN,
    (Watch.CONTESTING, Evidence.LOCAL_GONE): Watch.LOCAL_LOST,
    (Watch.STANDBY, Evidence.KEY_LOST): Watch.STOOD_DOWN,
    (Watch.WATCHING, Evidence.KEY_LOST): Watch.STOOD_DOWN,
    (Watch.FAILED_OVER, Evidence.KEY_LOST): Watch.STOOD_DOWN,
}


@dataclass(frozen=True, slots=True)
class DeciderConfig:
    pair: str
    role: Role
    boot: int
    interval: float = 0.05  # seconds between heartbeats
    timeout: float = 0.3  # peer silent this long on every path = lost
    # A quorum service holds the leader key: a lost primary only starts the contest for it
    # (PrimaryLost, state CONTESTING); the takeover waits for won().
    quorum: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.interval < self.timeout:
            raise UsageError("the heartbeat interval must be positive and below the timeout")


@dataclass(frozen=True, slots=True)
class SendHeartbeat:
    heartbeat: Heartbeat


@dataclass(frozen=True, slots=True)
class PrimaryLost:
    """Secondary: take over (x-colo-lost-heartbeat, guest port to the LAN, announce-self)."""

    reason: str  # silent, qemu-exited
    silent_for: float  # seconds since the last heartbeat on any path


@dataclass(frozen=True, slots=True)
class SecondaryLost:
    """Primary: leave COLO (x-colo-lost-heartbeat) and serve unprotected."""

    reason: str  # silent, qemu-exited, colo-exit, checkpoint-stalled
    silent_for: float


@dataclass(frozen=True, slots=True)
class StoodDown:
    """Secondary: the primary runs alone (or left): this side must never take over.
    Primary: the secondary took over: this side must stop serving (its guest is paused)."""

    reason: str  # primary-failed-over, primary-shutdown, left-colo, secondary-took-over


@dataclass(frozen=True, slots=True)
class LocalQemuLost:
    state: QemuState


@dataclass(frozen=True, slots=True)
class SplitBrain:
    """Both sides serve the LAN (a cut link made each believe the other dead)."""

    peer: Heartbeat


@dataclass(frozen=True, slots=True)
class PeerRejected:
    """A heartbeat from another pair or of our own role (a configuration mistake)."""

    reason: str  # other-pair, same-role
    heartbeat: Heartbeat


DecideAction = (
    SendHeartbeat
    | PrimaryLost
    | SecondaryLost
    | StoodDown
    | LocalQemuLost
    | SplitBrain
    | PeerRejected
)


class FailoverDecider:
    """See the module docstring; one per daemon. ``paths`` name the heartbeat paths."""

    def __init__(self, config: DeciderConfig, now: float) -> None:
        self.config = config
        self.state = Watch.STANDBY
        self.qemu = QemuState.UNKNOWN
        self.colo = ColoMode.NONE
        self.ready = False
        self.colo_exit = False
        self._sequence = itertools.count(1)
        self._next_send = now
        self._armed_at: float | None = None
        self.last_heard: dict[str, float] = {}
        self.peer: Heartbeat | None = None
        self._split_reported = False
        self._leaving = False  # this engine is stopping on purpose
        self.fenced = False  # quorum, primary: past the leader key's deadline (heartbeats say so)

    @property
    def expected_mode(self) -> ColoMode:
        return ColoMode.PRIMARY if self.config.role is Role.PRIMARY else ColoMode.SECONDARY

    @property
    def failed_over(self) -> bool:
        return self.state is Watch.FAILED_OVER

    @property
    def peer_leaving(self) -> bool:
        """The peer's engine said it stops on purpose and has not been heard since."""
        return self.peer is not None and self.peer.leaving

    @property
    def serving(self) -> bool:
        if self.qemu is not QemuState.RUNNING:
            return False
        if self.config.role is Role.PRIMARY:
            return self.state is not Watch.STOOD_DOWN  # stood down: its guest is paused
        return self.state is Watch.FAILED_OVER

    def heard(self) -> float | None:
        """Our clock at the last heartbeat on any path."""
        return max(self.last_heard.values(), default=None)

    # -- local inputs ----------------------------------------------------------------------

    def local_qemu(self, state: QemuState, now: float) -> list[DecideAction]:
        if state is self.qemu:
            return []
        self.qemu = state
        actions: list[DecideAction] = []
        if state in (QemuState.EXITED, QemuState.SHUTDOWN) and self._to(Evidence.LOCAL_GONE):
            actions.append(LocalQemuLost(state))
        actions.append(self._heartbeat(now))  # the peer learns at once
        return actions

    def set_ready(self, ready: bool, now: float) -> list[DecideAction]:
        if ready is self.ready:
            return []
        self.ready = ready
        return [self._heartbeat(now)]

    def local_colo(self, mode: ColoMode, now: float) -> list[DecideAction]:
        """``query-colo-status`` said ``mode`` (the truth, over COLO_EXIT's reason)."""
        changed = mode is not self.colo
        self.colo = mode
        actions: list[DecideAction] = []
        if mode is self.expected_mode and self.state is Watch.STANDBY:
            self._to(Evidence.ARMED)
            self._armed_at = now
            self.colo_exit = False
        elif mode is ColoMode.NONE and self.state is Watch.WATCHING:
            if self.config.role is Role.PRIMARY:
                actions.extend(self._lose_peer("colo-exit", now))
            elif self._to(Evidence.LEFT_COLO):
                actions.append(StoodDown("left-colo"))
        if changed or actions:
            actions.append(self._heartbeat(now))
        return actions

    def local_colo_exit(self, now: float) -> list[DecideAction]:
        """QMP ``COLO_EXIT``. On the primary the COLO thread broke and the guest stays stopped
        until failover: act at once. On the secondary the stream broke, which a primary that
        failed over alone causes too: only reported, never a reason to take over."""
        self.colo_exit = True
        actions: list[DecideAction] = []
        if self.config.role is Role.PRIMARY and self.state is Watch.WATCHING:
            actions.extend(self._lose_peer("colo-exit", now))
        actions.append(self._heartbeat(now))
        return actions

    def leave(self, now: float) -> list[DecideAction]:
        """This engine stops on purpose (the daemon restarts): the last heartbeat says so,
        and the peer does not take silence for death until it hears from us again."""
        self._leaving = True
        return [self._heartbeat(now)]

    def set_fenced(self, fenced: bool, now: float) -> list[DecideAction]:
        """Quorum, primary: past the leader key's deadline (or back before it). The
        secondary hears it at once and contests the key: the primary may be cut off from the
        quorum while its heartbeats still reach host S."""
        if fenced is self.fenced:
            return []
        self.fenced = fenced
        return [self._heartbeat(now)]

    def won(self, now: float) -> list[DecideAction]:
        """Quorum, secondary: the leader key is ours; True state FAILED_OVER. Outside a
        contest (stood down meanwhile) nothing changes: the shell gives the key back."""
        if not self._to(Evidence.WON):
            return []
        return [self._heartbeat(now)]

    def refused(self, reason: str, now: float) -> list[DecideAction]:
        """Quorum, secondary: the key can never be ours (the primary runs alone): stand
        down, as when the primary says so itself."""
        if not self._to(Evidence.PEER_ALONE):
            return []
        return [StoodDown(reason), self._heartbeat(now)]

    def key_lost(self, reason: str, now: float) -> list[DecideAction]:
        """Quorum: the key is another host's (or may be): a primary stops serving for good."""
        if not self._to(Evidence.KEY_LOST):
            return []
        return [StoodDown(reason), self._heartbeat(now)]

    def checkpoint_stalled(self, now: float) -> list[DecideAction]:
        if self.config.role is Role.PRIMARY and self.state is Watch.WATCHING:
            return [*self._lose_peer("checkpoint-stalled", now), self._heartbeat(now)]
        return []

    # -- the peer --------------------------------------------------------------------------

    def heartbeat(self, heartbeat: Heartbeat, path: str, now: float) -> list[DecideAction]:
        if heartbeat.pair != self.config.pair:
            return [PeerRejected("other-pair", heartbeat)]
        if heartbeat.role is self.config.role:
            return [PeerRejected("same-role", heartbeat)]
        self.last_heard[path] = now
        self.peer = heartbeat
        actions: list[DecideAction] = []
        if self.state is Watch.WATCHING or (
            self.state is Watch.CONTESTING
            and (heartbeat.failed_over or heartbeat.qemu is QemuState.SHUTDOWN)
        ):
            actions.extend(self._judge(heartbeat, now))
        elif (
            self.state is Watch.STANDBY
            and self.config.role is Role.PRIMARY
            and heartbeat.failed_over
        ):
            # A primary (re)started after its secondary took over: never serve again.
            self._to(Evidence.PEER_ALONE)
            actions += [StoodDown("secondary-took-over"), self._heartbeat(now)]
        if heartbeat.serving and self.serving and not self._split_reported:
            self._split_reported = True
            actions.append(SplitBrain(heartbeat))
        return actions

    def _judge(self, peer: Heartbeat, now: float) -> list[DecideAction]:
        if self.config.role is Role.SECONDARY:
            if self.config.quorum and peer.fenced:
                return self._lose_peer("primary-fenced", now)
            if peer.failed_over:
                self._to(Evidence.PEER_ALONE)
                return [StoodDown("primary-failed-over"), self._heartbeat(now)]
            if peer.qemu is QemuState.SHUTDOWN:
                self._to(Evidence.PEER_ALONE)
                return [StoodDown("primary-shutdown"), self._heartbeat(now)]
            if peer.qemu is QemuState.EXITED:
                return self._lose_peer("qemu-exited", now)
            return []
        if peer.failed_over:
            # The secondary took over (we were silent too long: a stalled or restarted
            # daemon): it is the master now; this side stops serving.
            self._to(Evidence.PEER_ALONE)
            return [StoodDown("secondary-took-over"), self._heartbeat(now)]
        if peer.qemu in (QemuState.EXITED, QemuState.SHUTDOWN):
            return self._lose_peer("qemu-exited", now)
        # peer.colo_exit is no reason: the secondary's COLO stream breaks just as well when
        # the *primary* QEMU dies, and this daemon may hear that before its own QMP socket
        # closes. A broken stream with both QEMUs alive shows here as a COLO_EXIT or a
        # stalled checkpoint of our own.
        return []

    def _lose_peer(self, reason: str, now: float) -> list[DecideAction]:
        """The peer is lost for ``reason``; act if this side may."""
        if self.state is not Watch.WATCHING or self.qemu is not QemuState.RUNNING:
            return []
        armed = self._armed_at if self._armed_at is not None else now
        heard = self.heard()
        silent_for = now - (armed if heard is None else max(heard, armed))
        if self.config.role is Role.SECONDARY:
            # Take over only while our own QEMU is still a COLO secondary: else there is
            # nothing consistent to take over with.
            if self.colo is not ColoMode.SECONDARY:
                return []
            self._to(Evidence.CONTEST if self.config.quorum else Evidence.PEER_LOST)
            return [PrimaryLost(reason, silent_for), self._heartbeat(now)]
        self._to(Evidence.PEER_LOST)
        return [SecondaryLost(reason, silent_for), self._heartbeat(now)]

    # -- timers ----------------------------------------------------------------------------

    def _silence_deadline(self) -> float | None:
        if self.state is not Watch.WATCHING or self._armed_at is None or self.peer_leaving:
            return None
        heard = self.heard()
        base = self._armed_at if heard is None else max(heard, self._armed_at)
        return base + self.config.timeout

    def get_timer(self) -> float | None:
        deadline = self._silence_deadline()
        return self._next_send if deadline is None else min(deadline, self._next_send)

    def handle_timer(self, now: float) -> list[DecideAction]:
        actions: list[DecideAction] = []
        deadline = self._silence_deadline()
        if deadline is not None and now >= deadline:
            actions.extend(self._lose_peer("silent", now))
        if now >= self._next_send and not any(isinstance(a, SendHeartbeat) for a in actions):
            actions.append(self._heartbeat(now))
        return actions

    def _heartbeat(self, now: float) -> SendHeartbeat:
        self._next_send = now + self.config.interval
        return SendHeartbeat(
            Heartbeat(
                pair=self.config.pair,
                role=self.config.role,
                boot=self.config.boot,
                sequence=next(self._sequence),
                qemu=self.qemu,
                colo=self.colo,
                ready=self.ready,
                failed_over=self.state is Watch.FAILED_OVER,
                colo_exit=self.colo_exit,
                serving=self.serving,
                leaving=self._leaving,
                fenced=self.fenced,
            )
        )

    def _to(self, evidence: Evidence) -> bool:
        target = _WATCH_TRANSITIONS.get((self.state, evidence))
        if target is None:
            return False
        self.state = target
        return True


__all__ = [
    "DEFAULT_PERIOD_MS",
    "UINT32_MAX",
    "BadHeartbeat",
    "CheckpointAborted",
    "CheckpointBegan",
    "CheckpointEnded",
    "CheckpointScheduler",
    "CheckpointStalled",
    "ColoMode",
    "DecideAction",
    "DeciderConfig",
    "FailoverDecider",
    "Heartbeat",
    "Input",
    "LocalQemuLost",
    "PeerRejected",
    "Phase",
    "PrimaryLost",
    "QemuState",
    "ReplayWindow",
    "Request",
    "RequestsAbandoned",
    "Role",
    "ScheduleAction",
    "SchedulerConfig",
    "SecondaryLost",
    "SendHeartbeat",
    "SplitBrain",
    "StoodDown",
    "Trigger",
    "Unexpected",
    "Watch",
    "backstop_ms",
    "decode_heartbeat",
    "open_heartbeat",
    "seal_heartbeat",
]
