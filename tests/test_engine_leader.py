"""The leader key's decisions (coloproxy.engine.leader) with a fake clock, and the
failover decider in quorum mode. Pure: no etcd here (tests/test_quorum_etcd.py has a real
three-member cluster)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coloproxy.engine.decider import (
    DeciderConfig,
    FailoverDecider,
    PrimaryLost,
    SendHeartbeat,
    StoodDown,
    Watch,
)
from coloproxy.engine.heartbeat import (
    ColoMode,
    Heartbeat,
    QemuState,
)
from coloproxy.engine.leader import (
    Acquire,
    Fenced,
    KeyLost,
    KeyPhase,
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
from coloproxy.errors import UsageError
from coloproxy.role import Role

CONFIG = LeaderConfig(ttl=1.0, renew=0.1, margin=0.25, retry=0.05)


def holding(at: float = 0.0) -> LeaderKey:
    key = LeaderKey(CONFIG)
    assert key.contend(at) == [Acquire(1.0)]
    assert key.acquired(lease=7, ttl=1.0, revision=42, sent=at) == [Won(42, at + 0.75)]
    return key


def test_the_winner_may_release_until_its_own_deadline_only() -> None:
    key = holding(10.0)
    assert key.phase is KeyPhase.HOLDING
    # The deadline counts from when the grant was *sent*: the lease began later at etcd.
    assert key.may_release(10.0) and key.may_release(10.749)
    assert not key.may_release(10.75)
    assert key.left(10.5) == pytest.approx(0.25)


def test_renewals_go_out_every_interval_and_move_the_deadline_by_their_send_time() -> None:
    key = holding(0.0)
    assert key.get_timer() == pytest.approx(0.1)
    assert key.handle_timer(0.05) == []
    assert key.handle_timer(0.1) == [Renew(7)]
    assert key.handle_timer(0.15) == []  # one renewal at a time
    # Sent at 0.1, answered at 0.6: the lease was renewed no earlier than 0.1.
    assert key.renewed(sent=0.1, ttl=1.0, now=0.6) == []
    assert key.deadline == pytest.approx(0.85)
    # An older renewal answered late does not move the deadline back.
    assert key.renewed(sent=0.05, ttl=1.0, now=0.61) == []
    assert key.deadline == pytest.approx(0.85)


def test_no_acknowledgement_fences_at_the_deadline_and_a_late_one_lifts_it() -> None:
    key = holding(0.0)
    assert key.handle_timer(0.1) == [Renew(7)]
    assert key.renew_failed(0.35) == []  # timed out: the next one goes at once
    assert key.get_timer() == pytest.approx(0.35)
    assert key.handle_timer(0.35) == [Renew(7)]
    assert key.get_timer() == pytest.approx(0.75)  # the deadline
    assert key.handle_timer(0.75) == [Fenced(0.75)]
    assert key.fenced and not key.may_release(0.76)
    assert key.handle_timer(0.8) == []  # said once
    # The renewal sent at 0.35 comes back with the lease alive: held again.
    assert key.renewed(sent=0.35, ttl=1.0, now=0.9) == [Unfenced(pytest.approx(1.1))]
    assert key.may_release(0.9)


def test_a_lease_the_service_says_is_gone_is_lost_for_good() -> None:
    key = holding(0.0)
    key.handle_timer(0.1)
    assert key.renewed(sent=0.1, ttl=0, now=0.2) == [KeyLost("lease-gone")]
    assert key.phase is KeyPhase.LOST
    assert not key.may_release(0.2)
    assert key.renewed(sent=0.3, ttl=1.0, now=0.4) == []  # nothing brings it back
    assert not key.may_release(0.4)


def test_a_contest_retries_until_it_wins_one_try_at_a_time() -> None:
    key = LeaderKey(CONFIG)
    assert key.contend(1.0) == [Acquire(1.0)]
    assert key.contend(1.0) == []
    assert key.handle_timer(1.2) == []  # the first try is still out
    assert key.not_acquired(1.01) == []
    assert key.get_timer() == pytest.approx(1.06)
    assert key.handle_timer(1.03) == []
    assert key.handle_timer(1.06) == [Acquire(1.0)]
    assert key.acquired(lease=3, ttl=2.0, revision=9, sent=1.06) == [Won(9, pytest.approx(2.81))]


def test_a_pair_marked_alone_is_never_acquired() -> None:
    key = LeaderKey(CONFIG)
    key.contend(0.0)
    assert key.not_acquired(0.01, marked_alone=True) == [Refused("alone")]
    assert key.phase is KeyPhase.REFUSED
    assert key.get_timer() is None
    assert key.contend(1.0) == []


def test_a_stopped_contest_tries_no_more() -> None:
    key = LeaderKey(CONFIG)
    key.contend(0.0)
    key.not_acquired(0.01)
    key.stop(0.02)
    assert key.get_timer() is None
    assert key.handle_timer(1.0) == []


def test_handing_over_fences_at_once_and_deletes_the_key_by_revision() -> None:
    key = holding(0.0)
    assert key.hand_over(0.2) == [Release(7, 42), KeyLost("released")]
    assert not key.may_release(0.2)
    assert key.hand_over(0.3) == []
    assert key.get_timer() is None


def test_marks_need_the_key_and_a_failed_one_means_it_is_lost() -> None:
    assert LeaderKey(CONFIG).mark(True) == []
    key = holding(0.0)
    assert key.mark(True) == [Mark(True, 42)]
    assert key.marked(True, ok=True, now=0.1) == [Marked(True)]
    assert key.marked(True, ok=False, now=0.2) == [KeyLost("lease-gone")]


def test_the_config_is_checked() -> None:
    for ttl, renew, margin in ((1.0, 0.1, 1.0), (1.0, 0.8, 0.25), (1.0, 0.1, 0.0)):
        with pytest.raises(UsageError):
            LeaderConfig(ttl=ttl, renew=renew, margin=margin)
    with pytest.raises(UsageError):
        LeaderConfig(retry=0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["tick", "ack", "late-ack", "fail", "gone", "contend"]),
            st.floats(min_value=0.0, max_value=0.4),
        ),
        max_size=60,
    )
)
def test_it_never_releases_past_an_acknowledged_send_plus_ttl_less_margin(
    steps: list[tuple[str, float]],
) -> None:
    """Whatever the renewals do, ``may_release(now)`` implies that a renewal (or the grant)
    sent at ``s`` was acknowledged with ``now < s + TTL - margin``: the lease at etcd, which
    began after ``s``, outlives the last release by at least the margin."""
    now = 0.0
    key = holding(now)
    acknowledged = [0.0]
    out: list[float] = []  # send times of renewals in flight
    for what, step in steps:
        now += step
        if what == "tick":
            for action in key.handle_timer(now):
                if isinstance(action, Renew):
                    out.append(now)
        elif what in ("ack", "late-ack") and out:
            sent = out.pop(0 if what == "late-ack" else -1)
            key.renewed(sent, CONFIG.ttl, now)
            acknowledged.append(sent)
        elif what == "fail" and out:
            out.pop()
            key.renew_failed(now)
        elif what == "gone" and out:
            key.renewed(out.pop(), 0, now)
        elif what == "contend":
            key.contend(now)
        if key.may_release(now):
            assert now < max(acknowledged) + CONFIG.ttl - CONFIG.margin


# -- the decider in quorum mode ----------------------------------------------------------------


def beat(role: Role, sequence: int = 1, **fields: object) -> Heartbeat:
    base = Heartbeat(
        "web1",
        role,
        1,
        sequence,
        QemuState.RUNNING,
        ColoMode.PRIMARY if role is Role.PRIMARY else ColoMode.SECONDARY,
    )
    return base.__class__(**{**{f: getattr(base, f) for f in base.__slots__}, **fields})


def secondary(quorum: bool = True) -> FailoverDecider:
    decide = FailoverDecider(DeciderConfig("web1", Role.SECONDARY, 2, quorum=quorum), 0.0)
    decide.local_qemu(QemuState.RUNNING, 0.0)
    decide.local_colo(ColoMode.SECONDARY, 0.0)
    decide.heartbeat(beat(Role.PRIMARY), "replication", 0.01)
    return decide


def decisions(actions: list[object]) -> list[object]:
    return [a for a in actions if not isinstance(a, SendHeartbeat)]


def last_sent(actions: list[object]) -> Heartbeat:
    return [a.heartbeat for a in actions if isinstance(a, SendHeartbeat)][-1]


def test_silence_only_starts_the_contest_and_winning_it_is_the_takeover() -> None:
    decide = secondary()
    actions = decide.handle_timer(0.31)
    assert decisions(actions) == [PrimaryLost("silent", pytest.approx(0.3))]
    assert decide.state is Watch.CONTESTING
    sent = last_sent(actions)
    assert not sent.failed_over and not sent.serving  # not yet: the key decides
    actions = decide.won(1.2)
    assert decide.state is Watch.FAILED_OVER
    assert last_sent(actions).failed_over
    assert decide.won(1.3) == []


def test_a_fenced_primary_starts_the_contest_though_it_is_heard() -> None:
    decide = secondary()
    actions = decide.heartbeat(beat(Role.PRIMARY, 2, fenced=True), "replication", 0.1)
    assert decisions(actions) == [PrimaryLost("primary-fenced", pytest.approx(0.0))]
    assert decide.state is Watch.CONTESTING
    # Without quorum a fenced flag means nothing.
    plain = secondary(quorum=False)
    assert decisions(plain.heartbeat(beat(Role.PRIMARY, 2, fenced=True), "r", 0.1)) == []


def test_a_contest_ends_when_the_primary_says_it_runs_alone_or_the_key_is_refused() -> None:
    decide = secondary()
    decide.handle_timer(0.31)
    alone = beat(Role.PRIMARY, 2, failed_over=True, colo=ColoMode.NONE)
    assert decisions(decide.heartbeat(alone, "lan", 0.5)) == [StoodDown("primary-failed-over")]
    assert decide.state is Watch.STOOD_DOWN
    assert decide.won(0.6) == []  # a late win changes nothing: the shell gives it back
    refused = secondary()
    refused.handle_timer(0.31)
    assert decisions(refused.refused("primary-alone", 0.4)) == [StoodDown("primary-alone")]


def test_a_primary_that_loses_the_key_stands_down_and_says_fenced_before() -> None:
    decide = FailoverDecider(DeciderConfig("web1", Role.PRIMARY, 2, quorum=True), 0.0)
    decide.local_qemu(QemuState.RUNNING, 0.0)
    decide.local_colo(ColoMode.PRIMARY, 0.0)
    assert last_sent(decide.set_fenced(True, 0.5)).fenced
    assert decide.set_fenced(True, 0.6) == []
    actions = decide.key_lost("key-lost", 1.0)
    assert decisions(actions) == [StoodDown("key-lost")]
    assert decide.state is Watch.STOOD_DOWN and not decide.serving
