"""One event-loop timer around an object that owns its timers (shell).

The object (``Timed``: the daemon's primary proxy or host S's proxy; the engine's runner,
which names the earliest of its pure machines' deadlines and feeds them the timer) says when
it next has something to do (``get_timer() -> float | None``, on the loop's clock) and does
it when told (``handle_timer(now)``); it never touches the loop. ``TimerPump`` keeps one
``loop.call_at`` armed at that deadline: whoever calls into the object calls
:meth:`TimerPump.poke` after it, and the pump asks the object again once per loop iteration
(a receive batch of many packets costs one ``get_timer``), or :meth:`TimerPump.settle` to
have it asked at once, re-arming only when the deadline moved earlier or went away (a
deadline that moved later is found not yet due when the old one fires, and armed then).

A loop may run a timer a little early: uvloop rounds a delay to whole milliseconds, asyncio
runs what is due within its clock's resolution. The pump takes the deadline it armed as
reached (``now = max(clock, deadline)``): handed the clock as it is, the object finds nothing
due, the same deadline is armed again, and the loop spins until its clock passes it (the
engine's heartbeat timer did that, ~25 fires per heartbeat in the lab).
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Timed(Protocol):
    """An object with deadlines of its own (h11/aioquic style), or one that speaks for
    several (the engine's runner)."""

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


class TimerPump:
    """Keeps one loop timer at ``target``'s earliest deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target: Timed | None = None) -> None:
        self._loop = loop
        self._target = target
        self._timer: asyncio.Handle | None = None
        # The deadline armed, our own record: uvloop's call_at returns a plain Handle without
        # when() for a deadline already in the past.
        self._timer_due = 0.0
        self._rearm_pending = False

    @property
    def target(self) -> Timed | None:
        return self._target

    @target.setter
    def target(self, target: Timed | None) -> None:
        """Pump another object (a reprotect replaces the proxy): the old one's timer goes."""
        self.close()
        self._target = target
        self.poke()

    @property
    def due(self) -> float | None:
        """The deadline armed now, if any."""
        return self._timer_due if self._timer is not None else None

    def now(self) -> float:
        """The loop's clock, the one the target's deadlines are on."""
        return self._loop.time()

    def poke(self) -> None:
        """Something called into the target: look at its deadline again, once per loop
        iteration however many calls come."""
        if not self._rearm_pending:
            self._rearm_pending = True
            self._loop.call_soon(self._rearm)

    def settle(self) -> None:
        """Look at the target's deadline now: at the end of a queue's wake-up, in place of a
        poke per packet (the netlink queues' ``WakeGroup.after_wakeup``); after each of the
        engine's inputs."""
        self._rearm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _rearm(self) -> None:
        self._rearm_pending = False
        if self._target is None:
            return
        deadline = self._target.get_timer()
        timer = self._timer
        if deadline is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        if timer is not None:
            if self._timer_due <= deadline:
                return
            timer.cancel()
        self._timer = self._loop.call_at(deadline, self._fire)
        self._timer_due = deadline

    def _fire(self) -> None:
        self._timer = None
        if self._target is not None:
            self._target.handle_timer(max(self._loop.time(), self._timer_due))
        self._rearm()
