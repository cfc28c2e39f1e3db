"""The failover decider (pure): when to fail over.

Theory of operation
-------------------
A state machine, the enum :class:`Watch` and one transition table over
:class:`FailoverSignal`, fed by the shell (:mod:`coloproxy.engine.runner`) with what it saw
(the peer's heartbeats, :mod:`coloproxy.engine.heartbeat`; the local QEMU; the leader key)
and the time, returning the actions to take as frozen dataclasses. Nothing here reads a
clock or touches a socket: ``now`` is the shell's monotonic clock (seconds).

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
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final

from coloproxy.engine.heartbeat import ColoMode, Heartbeat, QemuState
from coloproxy.errors import UsageError
from coloproxy.role import Role


class Watch(Enum):
    STANDBY = "standby"  # not protected yet: the local QEMU is not in COLO
    WATCHING = "watching"  # protected: the peer and the local QEMU are watched
    CONTESTING = "contesting"  # quorum, secondary: the primary looks lost; wants the key
    FAILED_OVER = "failed-over"  # decided: primary runs alone / secondary took over
    STOOD_DOWN = "stood-down"  # secondary: the primary runs alone; never take over
    LOCAL_LOST = "local-lost"  # the local QEMU is gone: nothing left to decide


class FailoverSignal(Enum):
    """What moves the decider's :class:`Watch` state: one input of its transition table."""

    ARMED = "armed"  # the local QEMU is in COLO in this side's mode
    PEER_LOST = "peer-lost"
    PEER_ALONE = "peer-alone"  # secondary: the primary failed over or shut down
    LOCAL_GONE = "local-gone"
    LEFT_COLO = "left-colo"  # secondary: the local QEMU is no longer a COLO secondary
    CONTEST = "contest"  # quorum, secondary: the primary looks lost; the key decides
    WON = "won"  # quorum, secondary: the key is ours
    KEY_LOST = "key-lost"  # quorum: another host holds (or may hold) the key


_WATCH_TRANSITIONS: Final[Mapping[tuple[Watch, FailoverSignal], Watch]] = {
    (Watch.STANDBY, FailoverSignal.ARMED): Watch.WATCHING,
    (
        Watch.STANDBY,
        FailoverSignal.PEER_ALONE,
    ): Watch.STOOD_DOWN,  # primary: the secondary took over
    (Watch.STANDBY, FailoverSignal.LOCAL_GONE): Watch.LOCAL_LOST,
    (Watch.WATCHING, FailoverSignal.PEER_LOST): Watch.FAILED_OVER,
    (Watch.WATCHING, FailoverSignal.PEER_ALONE): Watch.STOOD_DOWN,
    (Watch.WATCHING, FailoverSignal.LEFT_COLO): Watch.STOOD_DOWN,
    (Watch.WATCHING, FailoverSignal.LOCAL_GONE): Watch.LOCAL_LOST,
    (Watch.FAILED_OVER, FailoverSignal.LOCAL_GONE): Watch.LOCAL_LOST,
    (Watch.STOOD_DOWN, FailoverSignal.LOCAL_GONE): Watch.LOCAL_LOST,
    (Watch.WATCHING, FailoverSignal.CONTEST): Watch.CONTESTING,
    (Watch.CONTESTING, FailoverSignal.WON): Watch.FAILED_OVER,
    (Watch.CONTESTING, FailoverSignal.PEER_ALONE): Watch.STOOD_DOWN,
    (Watch.CONTESTING, FailoverSignal.LEFT_COLO): Watch.STOOD_DOWN,
    (Watch.CONTESTING, FailoverSignal.LOCAL_GONE): Watch.LOCAL_LOST,
    (Watch.STANDBY, FailoverSignal.KEY_LOST): Watch.STOOD_DOWN,
    (Watch.WATCHING, FailoverSignal.KEY_LOST): Watch.STOOD_DOWN,
    (Watch.FAILED_OVER, FailoverSignal.KEY_LOST): Watch.STOOD_DOWN,
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
        if state in (QemuState.EXITED, QemuState.SHUTDOWN) and self._to(FailoverSignal.LOCAL_GONE):
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
            self._to(FailoverSignal.ARMED)
            self._armed_at = now
            self.colo_exit = False
        elif mode is ColoMode.NONE and self.state is Watch.WATCHING:
            if self.config.role is Role.PRIMARY:
                actions.extend(self._lose_peer("colo-exit", now))
            elif self._to(FailoverSignal.LEFT_COLO):
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
        if not self._to(FailoverSignal.WON):
            return []
        return [self._heartbeat(now)]

    def refused(self, reason: str, now: float) -> list[DecideAction]:
        """Quorum, secondary: the key can never be ours (the primary runs alone): stand
        down, as when the primary says so itself."""
        if not self._to(FailoverSignal.PEER_ALONE):
            return []
        return [StoodDown(reason), self._heartbeat(now)]

    def key_lost(self, reason: str, now: float) -> list[DecideAction]:
        """Quorum: the key is another host's (or may be): a primary stops serving for good."""
        if not self._to(FailoverSignal.KEY_LOST):
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
            self._to(FailoverSignal.PEER_ALONE)
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
                self._to(FailoverSignal.PEER_ALONE)
                return [StoodDown("primary-failed-over"), self._heartbeat(now)]
            if peer.qemu is QemuState.SHUTDOWN:
                self._to(FailoverSignal.PEER_ALONE)
                return [StoodDown("primary-shutdown"), self._heartbeat(now)]
            if peer.qemu is QemuState.EXITED:
                return self._lose_peer("qemu-exited", now)
            return []
        if peer.failed_over:
            # The secondary took over (we were silent too long: a stalled or restarted
            # daemon): it is the master now; this side stops serving.
            self._to(FailoverSignal.PEER_ALONE)
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
            self._to(FailoverSignal.CONTEST if self.config.quorum else FailoverSignal.PEER_LOST)
            return [PrimaryLost(reason, silent_for), self._heartbeat(now)]
        self._to(FailoverSignal.PEER_LOST)
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

    def _to(self, evidence: FailoverSignal) -> bool:
        target = _WATCH_TRANSITIONS.get((self.state, evidence))
        if target is None:
            return False
        self.state = target
        return True


__all__ = [
    "DecideAction",
    "DeciderConfig",
    "FailoverDecider",
    "FailoverSignal",
    "LocalQemuLost",
    "PeerRejected",
    "PrimaryLost",
    "SecondaryLost",
    "SendHeartbeat",
    "SplitBrain",
    "StoodDown",
    "Watch",
]
