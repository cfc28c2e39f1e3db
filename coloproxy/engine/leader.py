"""The leader key (pure): who may let its VM talk to the LAN, decided by a quorum service.

Theory of operation
-------------------
The Patroni way: one key per pair in a quorum service (etcd here), held by the host whose VM
may serve, attached to a lease with a TTL that the holder keeps renewing. The quorum service
decides who holds the key; each daemon decides, by its *own* clock, whether it may still act
as the holder. :class:`LeaderKey` is that decision, one per daemon; the shell
(:mod:`coloproxy.engine.leadership`) carries out its actions against a :class:`LeaderStore`
(:mod:`coloproxy.engine.quorum`: etcd) and feeds the outcomes back, with ``now`` from its
monotonic clock. Nothing here reads a clock or touches a socket.

- **Acquire.** A fresh lease, then a transaction that writes the key with that lease only if
  the key does not exist and the pair is not marked *alone* (a primary that runs unprotected
  wrote that mark: the secondary's state is stale, it must never take over). The
  transaction's revision is the holder's fence: every later write of the holder (release,
  marks) compares the key's ``mod_revision`` with it, so an old holder's writes fail once
  another host has won the key.
- **Hold by our own clock.** ``deadline = s + TTL - margin``, where ``s`` is the time the
  last *acknowledged* renewal (or the grant of the lease the key was won with) was *sent*.
  The service counts the TTL from when it received that request, later than ``s``, so our
  deadline falls before the lease can expire there, by at least ``margin`` (which covers
  clock-rate differences and the time from a release decision to the packet leaving). Past
  the deadline the holder must act as if it had lost the key: on host P the proxy holds
  every packet (:class:`Fenced`); a renewal that is acknowledged later, with the lease still
  alive, lifts it (:class:`Unfenced`); a lease the service says is gone is lost for good
  (:class:`KeyLost`).
- **Hand over.** A holder whose QEMU died deletes the key and revokes the lease at once
  (fenced by its revision): the peer wins on its next try instead of waiting for the TTL.
- **Contest.** A daemon that wants the key (host S once its heartbeats say host P is lost,
  or host P at start) tries again every ``retry`` until it wins, is refused for good (the
  pair is marked alone) or is told to stop.

The renewals are a lane of their own in the shell (one request at a time, each with a
timeout): a renewal that times out is simply not an acknowledgement, and the deadline is
what stops the holder, not the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from coloproxy.errors import UsageError

# etcd's smallest lease with --election-timeout 500 is 1 s (1.5 election timeouts, rounded up
# to whole seconds): the lab's figure and the default.
DEFAULT_TTL: Final = 1.0
DEFAULT_RENEW: Final = 0.1
DEFAULT_MARGIN: Final = 0.25
DEFAULT_RETRY: Final = 0.02  # a contest after a hand-over races the delete: try again soon


@dataclass(frozen=True, slots=True)
class LeaderConfig:
    """Seconds throughout."""

    ttl: float = DEFAULT_TTL  # the lease's TTL asked for (the service may grant more)
    renew: float = DEFAULT_RENEW  # time between renewals while holding
    margin: float = DEFAULT_MARGIN  # the deadline's distance from the lease's end
    retry: float = DEFAULT_RETRY  # time between two tries to acquire

    def __post_init__(self) -> None:
        if not 0 < self.margin < self.ttl:
            raise UsageError("the margin must be positive and shorter than the TTL")
        if not 0 < self.renew < self.ttl - self.margin:
            raise UsageError("renewals must come more often than the TTL less the margin")
        if not self.retry > 0:
            raise UsageError("the retry interval must be positive")


class KeyPhase(Enum):
    IDLE = "idle"  # not contending, holding nothing
    CONTENDING = "contending"  # trying to acquire
    HOLDING = "holding"  # won; renewing (fenced or not, by the deadline)
    RELEASED = "released"  # handed over on purpose
    LOST = "lost"  # the service says the lease is gone, or another host holds the key
    REFUSED = "refused"  # the pair is marked alone: this host must never acquire


# -- actions for the shell ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Acquire:
    """Grant a lease of ``ttl`` s, then write the key with it if absent and not marked."""

    ttl: float


@dataclass(frozen=True, slots=True)
class Renew:
    lease: int


@dataclass(frozen=True, slots=True)
class Release:
    """Delete the key if its mod_revision is still ``revision``; revoke ``lease``."""

    lease: int
    revision: int


@dataclass(frozen=True, slots=True)
class Mark:
    """Write (``alone`` true) or delete the pair's alone mark, fenced by ``revision``."""

    alone: bool
    revision: int


# -- what the shell is told -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Won:
    revision: int
    deadline: float


@dataclass(frozen=True, slots=True)
class Fenced:
    """Past the deadline: hold everything; the lease may already be gone."""

    since_ack: float  # seconds since the last acknowledged renewal was sent


@dataclass(frozen=True, slots=True)
class Unfenced:
    """A late renewal was acknowledged with the lease alive: release again."""

    deadline: float


@dataclass(frozen=True, slots=True)
class KeyLost:
    reason: str  # lease-gone, released


@dataclass(frozen=True, slots=True)
class Refused:
    """The key cannot be acquired for good (metric label)."""

    reason: str  # alone


@dataclass(frozen=True, slots=True)
class Marked:
    alone: bool


LeaderAction = (
    Acquire | Renew | Release | Mark | Won | Fenced | Unfenced | KeyLost | Refused | Marked
)


class LeaderKey:
    """See the module docstring. Every method returns the actions to take, in order; at
    most one acquire and one renewal are asked for at a time."""

    def __init__(self, config: LeaderConfig) -> None:
        self.config = config
        self.phase = KeyPhase.IDLE
        self.lease: int | None = None
        self.revision: int | None = None
        self.deadline = float("-inf")  # may release while now < deadline
        self.fenced = False  # Fenced reported and not lifted since
        self.acked: float | None = None  # send time of the last acknowledged renewal/grant
        self._asking = False  # an Acquire is out
        self._renewing = False  # a Renew is out
        self._next_try = 0.0
        self._next_renew = 0.0

    # -- inspection ------------------------------------------------------------------------

    def may_release(self, now: float) -> bool:
        return self.phase is KeyPhase.HOLDING and now < self.deadline

    def left(self, now: float) -> float | None:
        """Seconds until the deadline while holding; None otherwise."""
        return self.deadline - now if self.phase is KeyPhase.HOLDING else None

    # -- inputs ----------------------------------------------------------------------------

    def contend(self, now: float) -> list[LeaderAction]:
        """Start trying to acquire (again); nothing when holding or refused."""
        if self.phase not in (KeyPhase.IDLE, KeyPhase.LOST, KeyPhase.RELEASED):
            return []
        self.phase = KeyPhase.CONTENDING
        self._next_try = now
        return self._try(now)

    def stop(self, now: float) -> list[LeaderAction]:
        """Stop contending (the reason to want the key went away)."""
        if self.phase is KeyPhase.CONTENDING:
            self.phase = KeyPhase.IDLE
        return []

    def acquired(self, lease: int, ttl: float, revision: int, sent: float) -> list[LeaderAction]:
        """The transaction won: ``lease`` granted (``ttl`` s) by a request sent at ``sent``."""
        self._asking = False
        if self.phase is not KeyPhase.CONTENDING:
            # Told to stop meanwhile: the key is ours all the same, and only a release makes
            # it anyone else's. Hold it: the shell decides what to do with a win.
            pass
        self.phase = KeyPhase.HOLDING
        self.lease, self.revision = lease, revision
        self.acked = sent
        self.deadline = sent + ttl - self.config.margin
        self.fenced = False
        self._next_renew = sent + self.config.renew
        return [Won(revision, self.deadline)]

    def not_acquired(self, now: float, marked_alone: bool = False) -> list[LeaderAction]:
        """The key is held by another lease (or the call failed); ``marked_alone``: the pair
        runs alone, never try again."""
        self._asking = False
        if marked_alone:
            self.phase = KeyPhase.REFUSED
            return [Refused("alone")]
        if self.phase is KeyPhase.CONTENDING:
            self._next_try = now + self.config.retry
        return []

    def renewed(self, sent: float, ttl: float, now: float) -> list[LeaderAction]:
        """A renewal sent at ``sent`` came back: the lease lives ``ttl`` s more (0: gone)."""
        self._renewing = False
        if self.phase is not KeyPhase.HOLDING:
            return []
        if ttl <= 0:
            return self._lose("lease-gone")
        if self.acked is None or sent > self.acked:
            self.acked = sent
            self.deadline = sent + ttl - self.config.margin
        if self.fenced and now < self.deadline:
            self.fenced = False
            return [Unfenced(self.deadline)]
        return self._check(now)

    def renew_failed(self, now: float) -> list[LeaderAction]:
        """No answer in time, or the service refused: not an acknowledgement. The next
        renewal goes at once; the deadline decides."""
        self._renewing = False
        self._next_renew = now
        return self._check(now)

    def hand_over(self, now: float) -> list[LeaderAction]:
        """Give the key up at once (this host's QEMU died): fenced from now on."""
        if self.phase is KeyPhase.CONTENDING:
            self.phase = KeyPhase.IDLE
            return []
        if self.phase is not KeyPhase.HOLDING or self.lease is None or self.revision is None:
            return []
        self.phase = KeyPhase.RELEASED
        self.deadline = float("-inf")
        return [Release(self.lease, self.revision), KeyLost("released")]

    def mark(self, alone: bool) -> list[LeaderAction]:
        """Write or clear the alone mark (only a holder may: fenced by its revision)."""
        if self.phase is not KeyPhase.HOLDING or self.revision is None:
            return []
        return [Mark(alone, self.revision)]

    def marked(self, alone: bool, ok: bool, now: float) -> list[LeaderAction]:
        """The mark's outcome; ``ok`` false: the key is no longer ours (the revision moved)."""
        if ok:
            return [Marked(alone)]
        if self.phase is KeyPhase.HOLDING:
            return self._lose("lease-gone")
        return []

    # -- the timer -------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        if self.phase is KeyPhase.CONTENDING and not self._asking:
            return self._next_try
        if self.phase is KeyPhase.HOLDING:
            due = [] if self._renewing else [self._next_renew]
            if not self.fenced:
                due.append(self.deadline)
            return min(due, default=None)
        return None

    def handle_timer(self, now: float) -> list[LeaderAction]:
        if self.phase is KeyPhase.CONTENDING:
            return self._try(now)
        if self.phase is not KeyPhase.HOLDING:
            return []
        actions = self._check(now)
        if not self._renewing and now >= self._next_renew and self.lease is not None:
            self._renewing = True
            self._next_renew = now + self.config.renew
            actions.append(Renew(self.lease))
        return actions

    def _try(self, now: float) -> list[LeaderAction]:
        if self._asking or now < self._next_try:
            return []
        self._asking = True
        return [Acquire(self.config.ttl)]

    def _check(self, now: float) -> list[LeaderAction]:
        if self.phase is KeyPhase.HOLDING and not self.fenced and now >= self.deadline:
            self.fenced = True
            since = now - self.acked if self.acked is not None else 0.0
            return [Fenced(since)]
        return []

    def _lose(self, reason: str) -> list[LeaderAction]:
        self.phase = KeyPhase.LOST
        self.deadline = float("-inf")
        self.fenced = True
        return [KeyLost(reason)]


__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_RENEW",
    "DEFAULT_RETRY",
    "DEFAULT_TTL",
    "Acquire",
    "Fenced",
    "KeyLost",
    "KeyPhase",
    "LeaderAction",
    "LeaderConfig",
    "LeaderKey",
    "Mark",
    "Marked",
    "Refused",
    "Release",
    "Renew",
    "Unfenced",
    "Won",
]
