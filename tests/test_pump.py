"""The timer pump (coloproxy/pump.py): one loop timer at a pure object's deadline,
looked at again after each call into it, and a timer that fires early is no busy loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from coloproxy.pump import TimerPump


class Handle:
    def __init__(self, loop: FakeLoop, when: float | None, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The clock and the two calls the pump makes, run by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.soon: list[Handle] = []
        self.timers: list[Handle] = []

    def time(self) -> float:
        return self.now

    def call_soon(self, callback: Callable[[], None]) -> Handle:
        handle = Handle(self, None, callback)
        self.soon.append(handle)
        return handle

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(self, when, callback)
        self.timers.append(handle)
        return handle

    def run_soon(self) -> None:
        soon, self.soon = self.soon, []
        for handle in soon:
            if not handle.cancelled:
                handle.callback()

    def armed(self) -> list[float]:
        return [h.when for h in self.timers if not h.cancelled and h.when is not None]

    def fire(self, at: float) -> None:
        """Run the armed timer with the clock at ``at`` (which may be before its deadline)."""
        (handle,) = [h for h in self.timers if not h.cancelled]
        self.timers.remove(handle)
        self.now = at
        handle.callback()


class Deadlines:
    """A pure object: its deadlines, and the times it was handed."""

    def __init__(self, *deadlines: float) -> None:
        self.deadlines = sorted(deadlines)
        self.handled: list[float] = []
        self.asked = 0

    def get_timer(self) -> float | None:
        self.asked += 1
        return self.deadlines[0] if self.deadlines else None

    def handle_timer(self, now: float) -> None:
        self.handled.append(now)
        self.deadlines = [d for d in self.deadlines if d > now]


def pump(target: Deadlines) -> tuple[TimerPump, FakeLoop]:
    loop = FakeLoop()
    return TimerPump(cast(asyncio.AbstractEventLoop, cast(Any, loop)), target), loop


def test_many_calls_in_one_loop_iteration_ask_the_object_once() -> None:
    target = Deadlines(1.0)
    timers, loop = pump(target)
    for _ in range(100):
        timers.poke()
    loop.run_soon()
    assert target.asked == 1
    assert loop.armed() == [1.0]
    assert timers.due == 1.0


def test_a_timer_that_fires_early_counts_its_deadline_as_reached() -> None:
    # uvloop rounds a delay to whole milliseconds and may run a timer a fraction of a
    # millisecond before its deadline: handed that clock, the object finds nothing due and
    # the same deadline would be armed again and again until the clock passed it.
    target = Deadlines(1.0, 2.0)
    timers, loop = pump(target)
    timers.poke()
    loop.run_soon()
    loop.fire(1.0 - 50e-6)
    assert target.handled == [1.0]
    assert loop.armed() == [2.0]  # the next deadline, not the same one


def test_a_timer_that_fires_late_hands_the_clock() -> None:
    target = Deadlines(1.0)
    timers, loop = pump(target)
    timers.poke()
    loop.run_soon()
    loop.fire(1.25)
    assert target.handled == [1.25]
    assert loop.armed() == []


def test_an_earlier_deadline_rearms_a_later_one_keeps_the_timer_none_cancels() -> None:
    target = Deadlines(5.0)
    timers, loop = pump(target)
    timers.poke()
    loop.run_soon()
    target.deadlines = [3.0]
    timers.poke()
    loop.run_soon()
    assert loop.armed() == [3.0]
    target.deadlines = [4.0]  # later: the armed timer stays (it finds nothing and re-arms)
    timers.poke()
    loop.run_soon()
    assert loop.armed() == [3.0]
    target.deadlines = []
    timers.poke()
    loop.run_soon()
    assert loop.armed() == [] and timers.due is None


def test_another_target_takes_the_timer_over() -> None:
    old = Deadlines(1.0)
    timers, loop = pump(old)
    timers.poke()
    loop.run_soon()
    new = Deadlines(7.0)
    timers.target = new
    assert loop.armed() == []  # the old object's timer is gone at once
    loop.run_soon()
    assert loop.armed() == [7.0]
    loop.fire(7.0)
    assert (old.handled, new.handled) == ([], [7.0])
    timers.target = None
    loop.run_soon()
    assert loop.armed() == []


def test_settle_looks_at_the_deadline_at_once_without_a_loop_callback() -> None:
    # The netlink queues' WakeGroup calls settle() at the end of a wake-up: the timer is
    # armed before the wake-up returns, and no call_soon is spent on it.
    target = Deadlines(2.0)
    timers, loop = pump(target)
    target.deadlines = [1.0]
    timers.settle()
    assert loop.soon == []
    assert loop.armed() == [1.0]
    timers.settle()  # unchanged: the armed timer stays
    assert loop.armed() == [1.0] and timers.due == 1.0
