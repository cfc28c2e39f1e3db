"""The checkpoint scheduler (coloproxy.engine.scheduler), on a fake clock.

``now`` is the engine's clock in seconds; ``wall`` the Unix time the proxy stamps on a request
and QEMU on its events. Every test feeds inputs and asserts the exact action list.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coloproxy.engine.scheduler import (
    UINT32_MAX,
    CheckpointAborted,
    CheckpointBegan,
    CheckpointEnded,
    CheckpointScheduler,
    CheckpointStalled,
    Input,
    Phase,
    RequestsAbandoned,
    ScheduleAction,
    SchedulerConfig,
    Trigger,
    Unexpected,
    backstop_ms,
)
from coloproxy.errors import UsageError

WALL = 1_764_120_000.0  # wall clock = WALL + engine clock, in these tests
BACKSTOP = backstop_ms(20000)


def scheduler(period: float = 20.0, min_gap: float = 0.1, now: float = 0.0) -> CheckpointScheduler:
    sched = CheckpointScheduler(SchedulerConfig(period=period, min_gap=min_gap), now)
    assert sched.activate(now) == []
    assert sched.phase is Phase.IDLE
    return sched


def ended(
    number: int,
    requests: tuple[int, ...],
    reason: str,
    stop: float,
    resume: float,
    triggered: float | None,
    request_to_stop: float | None,
) -> CheckpointEnded:
    return CheckpointEnded(
        checkpoint=number,
        requests=requests,
        reason=reason,
        started_wall=WALL + stop,
        completed_wall=WALL + resume,
        pause=pytest.approx(resume - stop, abs=1e-6),  # type: ignore[arg-type]
        triggered=triggered,
        stopped=stop,
        request_to_stop=None
        if request_to_stop is None
        else pytest.approx(request_to_stop, abs=1e-6),  # type: ignore[arg-type]
    )


# -- scheduler ---------------------------------------------------------------------------------


def test_backstop_outlasts_the_period_and_fits_qemus_uint32() -> None:
    assert backstop_ms(20000) == 41000
    assert backstop_ms(1) == 1002
    assert backstop_ms(UINT32_MAX) == UINT32_MAX


def test_a_request_triggers_at_once_and_is_served_by_that_checkpoint() -> None:
    sched = scheduler()
    assert sched.request(7, "payload", 1.0, WALL + 1.0) == [Trigger(1, (7,), "payload", BACKSTOP)]
    assert sched.phase is Phase.TRIGGERED
    assert sched.started(1.002, WALL + 1.002) == [CheckpointBegan(1, (7,), "payload", WALL + 1.002)]
    assert sched.phase is Phase.RUNNING
    assert sched.completed(1.005, WALL + 1.005) == [
        ended(1, (7,), "payload", 1.002, 1.005, 1.0, 0.002)
    ]
    assert sched.phase is Phase.IDLE
    assert sched.pending == () and sched.in_flight == ()


def test_a_request_older_than_the_stop_joins_the_checkpoint_in_flight() -> None:
    sched = scheduler()
    sched.request(1, "payload", 1.0, WALL + 1.0)
    # Arrives while triggered, stamped before the STOP: the coming checkpoint serves it.
    assert sched.request(2, "timeout", 1.001, WALL + 1.001) == []
    assert sched.started(1.002, WALL + 1.002) == [
        CheckpointBegan(1, (1, 2), "payload", WALL + 1.002)
    ]
    # Arrives while running but was sent before the STOP (a slow socket): served too.
    assert sched.request(3, "fate", 1.003, WALL + 1.0015) == []
    assert sched.in_flight == (1, 2, 3)
    assert sched.completed(1.004, WALL + 1.004) == [
        ended(1, (1, 2, 3), "payload", 1.002, 1.004, 1.0, 0.002)
    ]


def test_a_request_newer_than_the_stop_waits_for_the_next_checkpoint_and_min_gap() -> None:
    sched = scheduler(min_gap=0.1)
    sched.request(1, "payload", 1.0, WALL + 1.0)
    sched.started(1.002, WALL + 1.002)
    assert sched.request(2, "payload", 1.003, WALL + 1.003) == []
    assert sched.pending == (2,)
    assert sched.completed(1.005, WALL + 1.005) == [
        ended(1, (1,), "payload", 1.002, 1.005, 1.0, 0.002)
    ]
    # The next one waits for min_gap after the completion.
    assert sched.get_timer() == pytest.approx(1.105)
    assert sched.handle_timer(1.05) == []
    assert sched.handle_timer(1.105) == [Trigger(2, (2,), "payload", BACKSTOP)]
    assert sched.started(1.106, WALL + 1.106) == [CheckpointBegan(2, (2,), "payload", WALL + 1.106)]
    assert sched.completed(1.108, WALL + 1.108) == [
        ended(2, (2,), "payload", 1.106, 1.108, 1.105, 1.106 - 1.003)
    ]


def test_with_no_min_gap_the_next_checkpoint_is_triggered_right_after_the_resume() -> None:
    sched = scheduler(min_gap=0.0)
    sched.request(1, "payload", 1.0, WALL + 1.0)
    sched.started(1.002, WALL + 1.002)
    sched.request(2, "manual", 1.003, WALL + 1.003)
    assert sched.completed(1.005, WALL + 1.005) == [
        ended(1, (1,), "payload", 1.002, 1.005, 1.0, 0.002),
        Trigger(2, (2,), "manual", BACKSTOP),
    ]


def test_a_request_within_min_gap_of_the_last_completion_waits_until_the_gap_ends() -> None:
    sched = scheduler(min_gap=0.1)
    sched.request(1, "payload", 1.0, WALL + 1.0)
    sched.started(1.001, WALL + 1.001)
    sched.completed(1.003, WALL + 1.003)
    assert sched.request(2, "payload", 1.05, WALL + 1.05) == []
    assert sched.request(3, "fate", 1.06, WALL + 1.06) == []
    assert sched.get_timer() == pytest.approx(1.103)
    assert sched.handle_timer(1.103) == [Trigger(2, (2, 3), "payload", BACKSTOP)]
    assert sched.started(1.104, WALL + 1.104) == [
        CheckpointBegan(2, (2, 3), "payload", WALL + 1.104)
    ]


def test_periodic_checkpoints_come_period_after_the_last_completion() -> None:
    sched = scheduler(period=2.0, now=10.0)
    assert sched.get_timer() == 12.0
    assert sched.handle_timer(11.9) == []
    assert sched.handle_timer(12.0) == [Trigger(1, (), "periodic", backstop_ms(2000))]
    assert sched.started(12.001, WALL + 12.001) == [
        CheckpointBegan(1, (), "periodic", WALL + 12.001)
    ]
    assert sched.completed(12.004, WALL + 12.004) == [
        ended(1, (), "periodic", 12.001, 12.004, 12.0, None)
    ]
    assert sched.get_timer() == pytest.approx(14.004)
    # A requested checkpoint moves the periodic one too.
    sched.request(5, "payload", 13.0, WALL + 13.0)
    sched.started(13.001, WALL + 13.001)
    sched.completed(13.002, WALL + 13.002)
    assert sched.get_timer() == pytest.approx(15.002)


def test_set_period_takes_effect_live_from_the_last_completion() -> None:
    sched = scheduler(period=20.0, now=0.0)
    sched.handle_timer(20.0)
    sched.started(20.001, WALL + 20.001)
    sched.completed(20.002, WALL + 20.002)
    assert sched.set_period(5.0, 21.0) == []
    assert sched.get_timer() == pytest.approx(25.002)
    assert sched.backstop_ms == backstop_ms(5000)
    # Shorter than what already elapsed: due at once.
    assert sched.set_period(0.5, 22.0) == []
    assert sched.handle_timer(22.0) == [Trigger(2, (), "periodic", backstop_ms(500))]
    with pytest.raises(UsageError):
        sched.set_period(0.0, 22.0)


def test_a_stop_the_engine_did_not_trigger_is_a_checkpoint_and_serves_the_waiting() -> None:
    sched = scheduler(min_gap=0.1)
    sched.request(1, "payload", 1.0, WALL + 1.0)
    sched.started(1.001, WALL + 1.001)
    sched.completed(1.002, WALL + 1.002)
    sched.request(2, "timeout", 1.01, WALL + 1.01)  # waits for the gap
    # QEMU's backstop timer (or another QMP client) starts one meanwhile.
    assert sched.started(1.02, WALL + 1.02) == [CheckpointBegan(2, (2,), "timeout", WALL + 1.02)]
    assert sched.completed(1.03, WALL + 1.03) == [ended(2, (2,), "timeout", 1.02, 1.03, None, 0.01)]
    assert sched.started(5.0, WALL + 5.0) == [CheckpointBegan(3, (), "qemu", WALL + 5.0)]


def test_bring_up_the_migrations_stop_and_resume_are_the_first_checkpoint() -> None:
    sched = CheckpointScheduler(SchedulerConfig(period=20.0), 0.0)
    assert sched.phase is Phase.OFF
    # I6: the restarted proxy's request waits for COLO.
    assert sched.request(1, "restart", 0.5, WALL + 0.5) == []
    assert sched.get_timer() is None
    assert sched.bring_up(1.0) == []
    assert sched.phase is Phase.ENTERING
    assert sched.started(1.8, WALL + 1.8) == [CheckpointBegan(1, (1,), "colo-entry", WALL + 1.8)]
    assert sched.completed(2.0, WALL + 2.0) == [ended(1, (1,), "colo-entry", 1.8, 2.0, None, 1.3)]
    assert sched.phase is Phase.IDLE
    assert sched.get_timer() == 22.0


def test_a_failed_bring_up_puts_the_requests_back() -> None:
    sched = CheckpointScheduler(SchedulerConfig(), 0.0)
    sched.request(1, "restart", 0.5, WALL + 0.5)
    sched.bring_up(1.0)
    sched.started(1.8, WALL + 1.8)
    assert sched.aborted(2.0) == [CheckpointAborted(1, (1,))]
    assert sched.phase is Phase.OFF
    assert sched.pending == (1,)
    # An engine that later finds COLO in force triggers for them at once.
    assert sched.activate(3.0) == [Trigger(2, (1,), "restart", BACKSTOP)]


def test_failover_abandons_what_waits_and_nothing_is_triggered_afterwards() -> None:
    sched = scheduler()
    sched.request(1, "payload", 1.0, WALL + 1.0)
    sched.started(1.001, WALL + 1.001)
    sched.request(2, "payload", 1.002, WALL + 1.002)
    assert sched.deactivate(1.5) == [RequestsAbandoned((1, 2))]
    assert sched.phase is Phase.OFF
    assert sched.get_timer() is None
    assert sched.request(3, "payload", 2.0, WALL + 2.0) == []
    assert sched.completed(2.1, WALL + 2.1) == [Unexpected(Input.RESUME, Phase.OFF)]
    assert sched.started(2.2, WALL + 2.2) == [Unexpected(Input.STOP, Phase.OFF)]
    assert sched.deactivate(2.3) == [RequestsAbandoned((3,))]


def test_a_lost_trigger_is_retried_then_reported_stalled() -> None:
    sched = CheckpointScheduler(
        SchedulerConfig(period=20.0, trigger_timeout=1.0, trigger_retries=2), 0.0
    )
    sched.activate(0.0)
    assert sched.request(1, "payload", 1.0, WALL + 1.0) == [Trigger(1, (1,), "payload", BACKSTOP)]
    assert sched.get_timer() == 2.0
    assert sched.handle_timer(2.0) == [Trigger(1, (1,), "payload", BACKSTOP, attempt=2)]
    assert sched.handle_timer(3.0) == [Trigger(1, (1,), "payload", BACKSTOP, attempt=3)]
    assert sched.handle_timer(4.0) == [CheckpointStalled(1, Phase.TRIGGERED, 1.0)]
    assert sched.get_timer() is None
    assert sched.handle_timer(9.0) == []
    # The STOP comes after all: the checkpoint goes on as usual.
    assert sched.started(9.5, WALL + 9.5) == [CheckpointBegan(1, (1,), "payload", WALL + 9.5)]


def test_a_checkpoint_that_does_not_end_is_reported_stalled_once() -> None:
    sched = CheckpointScheduler(SchedulerConfig(checkpoint_timeout=10.0), 0.0)
    sched.activate(0.0)
    sched.request(1, "payload", 1.0, WALL + 1.0)
    sched.started(1.001, WALL + 1.001)
    assert sched.get_timer() == pytest.approx(11.001)
    assert sched.handle_timer(11.001) == [CheckpointStalled(1, Phase.RUNNING, 10.0)]
    assert sched.handle_timer(30.0) == []
    assert sched.aborted(30.0) == [CheckpointAborted(1, (1,))]
    assert sched.pending == (1,)


def test_a_request_sent_again_after_a_reconnect_is_not_counted_twice() -> None:
    sched = scheduler()
    sched.request(4, "restart", 1.0, WALL + 1.0)
    assert sched.request(4, "restart", 1.001, WALL + 1.001) == []
    sched.started(1.002, WALL + 1.002)
    assert sched.request(4, "restart", 1.003, WALL + 1.003) == []
    assert sched.completed(1.004, WALL + 1.004)[0].requests == (4,)  # type: ignore[union-attr]


def test_events_without_meaning_are_reported_not_raised() -> None:
    sched = scheduler()
    assert sched.completed(1.0, WALL + 1.0) == [Unexpected(Input.RESUME, Phase.IDLE)]
    assert sched.aborted(1.0) == [Unexpected(Input.ABORT, Phase.IDLE)]
    assert sched.bring_up(1.0) == [Unexpected(Input.BRING_UP, Phase.IDLE)]


def test_scheduler_config_is_checked() -> None:
    with pytest.raises(UsageError):
        SchedulerConfig(period=0)
    with pytest.raises(UsageError):
        SchedulerConfig(min_gap=-1)
    with pytest.raises(UsageError):
        SchedulerConfig(trigger_retries=-1)


# A random life of the scheduler: requests, QEMU's STOP/RESUME (ours or not), timers, aborts,
# re-activations and a failover, on a clock that only moves forward.
OP_NAMES = [
    *("request", "request", "request", "late-request"),
    *("stop", "resume", "resume", "timer", "abort", "activate", "period"),
]
OPS = st.lists(
    st.tuples(st.sampled_from(OP_NAMES), st.floats(min_value=0.0, max_value=0.5)),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, min_gap=st.sampled_from([0.0, 0.05, 0.2]), failover=st.booleans())
def test_every_request_is_served_by_exactly_one_later_checkpoint_or_abandoned(
    ops: list[tuple[str, float]], min_gap: float, failover: bool
) -> None:
    sched = CheckpointScheduler(
        SchedulerConfig(period=1.0, min_gap=min_gap, trigger_timeout=0.3, checkpoint_timeout=2.0),
        0.0,
    )
    sched.activate(0.0)
    now = 0.0
    ids = 0
    asked: dict[int, float] = {}  # request id -> its wall time
    stops: dict[int, float] = {}  # checkpoint number -> STOP wall time
    served: list[int] = []
    abandoned: list[int] = []
    before = sched.phase

    def take(actions: list[ScheduleAction]) -> None:
        for action in actions:
            if isinstance(action, CheckpointBegan):
                stops[action.checkpoint] = action.wall
            elif isinstance(action, CheckpointEnded):
                served.extend(action.requests)
                for request in action.requests:
                    # I1 for the engine: the checkpoint began after the request was sent.
                    assert asked[request] < stops[action.checkpoint]
            elif isinstance(action, RequestsAbandoned):
                abandoned.extend(action.requests)
            elif isinstance(action, Trigger) and action.attempt == 1:
                # Never a new trigger while a checkpoint is in flight (QEMU would merge it);
                # right after a RESUME is fine.
                assert before not in (Phase.TRIGGERED, Phase.RUNNING) or op == "resume"

    for op, step in ops:
        now += step
        before = sched.phase
        if op in ("request", "late-request"):
            ids += 1
            # A late request was sent a little earlier than it arrives.
            wall = WALL + now - (0.01 if op == "late-request" else 0.0)
            asked[ids] = wall
            take(sched.request(ids, "payload", now, wall))
        elif op == "stop":
            take(sched.started(now, WALL + now))
        elif op == "resume":
            take(sched.completed(now, WALL + now))
        elif op == "timer":
            deadline = sched.get_timer()
            if deadline is not None:
                now = max(now, deadline)
                take(sched.handle_timer(now))
        elif op == "abort":
            take(sched.aborted(now))
        elif op == "activate":
            take(sched.activate(now))
        else:
            take(sched.set_period(0.5 + step, now))
    if failover:
        take(sched.deactivate(now))
    outcome = served + abandoned
    assert len(outcome) == len(set(outcome)), "a request was served twice"
    waiting = set(sched.pending) | set(sched.in_flight)
    assert not waiting & set(outcome)
    assert waiting | set(outcome) == set(asked), "a request was lost"
    if failover:
        assert not waiting
    # Nothing is left waiting without a timer or a checkpoint in flight to end it.
    if sched.pending and sched.phase is Phase.IDLE:
        assert sched.get_timer() is not None
