"""The leader key in the quorum service (shell): :class:`Leadership` carries out the pure
:class:`~coloproxy.engine.leader.LeaderKey`'s actions against a
:class:`~coloproxy.engine.quorum.LeaderStore` and feeds the outcomes back.

Theory of operation
-------------------
Every call to the store (acquire, renew, release, mark) is a short task of its own, started
by the engine's ``spawn``; its answer goes back into the key with the time its request was
sent (the holder's deadline counts from there, docs/engine.md "Failover by quorum"). What the
key decides that concerns the rest of the engine (:class:`~coloproxy.engine.leader.Won`,
``Fenced``, ``Unfenced``, ``KeyLost``, ``Refused``) is counted, logged and handed to
``on_outcome``: the runner feeds it to the failover decider. The proxy is told, through
``fence``, the deadline before which it may release output (``-inf``: hold everything).
After an answer came back on its own (not inside a call of the runner's), ``changed`` tells
the runner to look at its machines again (its figures and its timer).

The alone mark: a primary that leaves COLO writes it (:meth:`Leadership.mark_alone`) before
its guest runs past the secondary's state, so that a secondary that wins the key later never
takes over with a stale copy; a primary back in COLO clears it once
(:meth:`Leadership.clear_alone`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

from coloproxy.engine.leader import (
    Acquire,
    Fenced,
    KeyLost,
    KeyPhase,
    LeaderAction,
    LeaderKey,
    Mark,
    Marked,
    Refused,
    Release,
    Renew,
    Unfenced,
    Won,
)
from coloproxy.engine.quorum import LeaderStore, QuorumError
from coloproxy.engine.settings import QuorumSettings
from coloproxy.metrics import EngineFigures
from coloproxy.role import Role

log = logging.getLogger(__name__)

# A planned stop hands the leader key over; it waits this long for the quorum service.
RELEASE_WAIT: Final = 1.0

KeyOutcome = Won | Fenced | Unfenced | KeyLost | Refused


class Leadership:
    """One per engine in quorum mode. ``clock`` is the engine's (loop) clock."""

    def __init__(
        self,
        settings: QuorumSettings,
        store: LeaderStore,
        *,
        role: Role,
        figures: EngineFigures,
        clock: Callable[[], float],
        fence: Callable[[float], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
        on_outcome: Callable[[KeyOutcome], None],
        changed: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.key = LeaderKey(settings.leader)
        self.store = store
        self.role = role
        self.figures = figures
        self.holder = role.value  # what the key's value says; start() names the pair and boot
        self._clock = clock
        self._fence = fence
        self._spawn = spawn
        self._on_outcome = on_outcome
        self._changed = changed
        self._alone_cleared = False  # primary: the alone mark cleared since COLO began
        self._marks: dict[bool, asyncio.Future[bool]] = {}

    def start(self, now: float, holder: str) -> None:
        """Nothing leaves before the key is won; a primary contends at once."""
        self.holder = holder
        self._fence(float("-inf"))
        etcd, leader = self.settings.etcd, self.settings.leader
        log.info(
            "quorum: the leader key under %s/%s in etcd %s (TTL %.1f s, margin %.0f ms)",
            etcd.prefix.rstrip("/"),
            etcd.pair,
            ", ".join(etcd.endpoints),
            leader.ttl,
            leader.margin * 1000,
        )
        if self.role is Role.PRIMARY:
            self.lead(self.key.contend(now))

    async def aclose(self, now: float) -> None:
        """A planned stop: hand the key over, so that the next engine (a restart, a
        reprotect) need not wait for the lease to run out. Bounded: the lease expires by
        itself anyway."""
        for action in self.key.hand_over(now):
            if isinstance(action, Release):
                with contextlib.suppress(QuorumError, TimeoutError):
                    async with asyncio.timeout(RELEASE_WAIT):
                        await self.store.release(action.lease, action.revision)
        self._fence(float("-inf"))
        await self.store.close()

    # -- the key's actions -----------------------------------------------------------------

    def lead(self, actions: list[LeaderAction]) -> None:
        """Carry out the key's actions, in order."""
        store, figures = self.store, self.figures
        for action in actions:
            if isinstance(action, Acquire):
                self._spawn(self._acquire(store, action.ttl), "engine-acquire")
            elif isinstance(action, Renew):
                self._spawn(self._renew(store, action.lease), "engine-renew")
            elif isinstance(action, Release):
                self._spawn(self._release(store, action.lease, action.revision), "engine-release")
            elif isinstance(action, Mark):
                self._spawn(self._mark(store, action.alone, action.revision), "engine-mark")
            elif isinstance(action, Won):
                figures.key_events["won"] += 1
                self._fence(action.deadline)
                log.warning("won the leader key (revision %d)", action.revision)
                self._on_outcome(action)
            elif isinstance(action, Fenced):
                figures.key_events["fenced"] += 1
                log.critical(
                    "FENCED: the leader key's deadline passed (last renewal acknowledged %.0f ms"
                    " ago): holding every packet until a renewal is acknowledged",
                    action.since_ack * 1000,
                )
                self._on_outcome(action)
            elif isinstance(action, Unfenced):
                figures.key_events["unfenced"] += 1
                log.warning("the leader key is renewed again: releasing")
                self._fence(action.deadline)
                self._on_outcome(action)
            elif isinstance(action, KeyLost):
                figures.key_events["lost-" + action.reason] += 1
                self._fence(float("-inf"))
                if action.reason == "released":
                    log.warning("leader key handed over")
                else:
                    log.critical(
                        "the leader key is lost (%s): this host must not serve", action.reason
                    )
                self._on_outcome(action)
            elif isinstance(action, Refused):
                figures.key_events["refused-" + action.reason] += 1
                log.error(
                    "the leader key is refused for good (%s): the primary runs alone", action.reason
                )
                self._on_outcome(action)
            elif isinstance(action, Marked):
                self._settle_mark(action.alone, True)

    def _answered(self, actions: list[LeaderAction]) -> None:
        """A store call's answer, back on the loop on its own."""
        self.lead(actions)
        self._changed()

    def contend(self, now: float) -> None:
        self.lead(self.key.contend(now))

    def stop(self, now: float) -> None:
        self.lead(self.key.stop(now))

    def hand_over(self, now: float) -> None:
        self.lead(self.key.hand_over(now))

    def handle_timer(self, now: float) -> None:
        self.lead(self.key.handle_timer(now))

    def mark(self, alone: bool) -> None:
        self.lead(self.key.mark(alone))

    # -- the alone mark --------------------------------------------------------------------

    def clear_alone(self) -> None:
        """The pair is protected (this primary's QEMU is in COLO): clear the alone mark
        once, so that the secondary may take over again (after a reprotect, or a
        restarted daemon). Needs the key; tried again at the next COLO status if not held
        yet."""
        if self._alone_cleared or self.key.phase is not KeyPhase.HOLDING:
            return
        self._alone_cleared = True
        self.mark(False)

    async def mark_alone(self) -> bool:
        """Record in the quorum service that this host runs alone (the peer must never take
        over with its stale state), before it does. Tried until it is written or the key is
        lost; True when written."""
        key = self.key
        self._alone_cleared = False
        while key.phase is KeyPhase.HOLDING:
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._marks[True] = future
            self._answered(key.mark(True))
            if await future:
                log.info("marked alone in the quorum service")
                return True
            await asyncio.sleep(key.config.retry)
        return False

    def _settle_mark(self, alone: bool, written: bool) -> None:
        future = self._marks.pop(alone, None)
        if future is not None and not future.done():
            future.set_result(written)

    # -- the store's calls -----------------------------------------------------------------

    async def _acquire(self, store: LeaderStore, ttl: float) -> None:
        key = self.key
        sent = self._clock()
        try:
            outcome = await store.acquire(ttl, self.holder, self.role is Role.SECONDARY)
        except QuorumError as exc:
            log.debug("acquire: %s", exc)
            self._answered(key.not_acquired(self._clock()))
            return
        if outcome.grant is None:
            self._answered(key.not_acquired(self._clock(), outcome.alone))
            return
        grant = outcome.grant
        self._answered(key.acquired(grant.lease, grant.ttl, grant.revision, sent))

    async def _renew(self, store: LeaderStore, lease: int) -> None:
        key = self.key
        sent = self._clock()
        try:
            ttl = await store.renew(lease)
        except QuorumError as exc:
            self.figures.key_events["renew-failed"] += 1
            log.debug("renew: %s", exc)
            self._answered(key.renew_failed(self._clock()))
            return
        except Exception as exc:  # not an answer: the deadline decides, renewals go on
            self.figures.key_events["renew-failed"] += 1
            log.error("renewing the leader key: unexpected %s: %s", type(exc).__name__, exc)
            self._answered(key.renew_failed(self._clock()))
            return
        actions = key.renewed(sent, ttl, self._clock())
        if key.phase is KeyPhase.HOLDING and not key.fenced:
            self._fence(key.deadline)
        self._answered(actions)

    async def _release(self, store: LeaderStore, lease: int, revision: int) -> None:
        try:
            await store.release(lease, revision)
        except QuorumError as exc:  # the lease runs out by itself
            log.warning("handing the leader key over: %s (it expires by itself)", exc)

    async def _mark(self, store: LeaderStore, alone: bool, revision: int) -> None:
        try:
            ok = await store.mark(alone, revision)
        except QuorumError as exc:
            log.warning("the alone mark: %s", exc)
            if not alone:
                self._alone_cleared = False  # the next COLO status tries again
            self._settle_mark(alone, False)
            return
        self._answered(self.key.marked(alone, ok, self._clock()))
        if not ok:
            self._settle_mark(alone, False)


__all__ = ["RELEASE_WAIT", "KeyOutcome", "Leadership"]
