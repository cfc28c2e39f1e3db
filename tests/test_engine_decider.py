"""The failover decider (coloproxy.engine.decider), on a fake clock.

``now`` is the engine's clock in seconds. Every test feeds inputs (heartbeats, the local QEMU)
and asserts the exact action list.
"""

from __future__ import annotations

import dataclasses

import pytest

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
from coloproxy.engine.heartbeat import (
    ColoMode,
    Heartbeat,
    QemuState,
)
from coloproxy.errors import UsageError
from coloproxy.role import Role

# -- failover decider ------------------------------------------------------------------------


def beat(role: Role, sequence: int = 1, **fields: object) -> Heartbeat:
    base = Heartbeat(
        pair="web1",
        role=role,
        boot=99,
        sequence=sequence,
        qemu=QemuState.RUNNING,
        colo=ColoMode.PRIMARY if role is Role.PRIMARY else ColoMode.SECONDARY,
        serving=role is Role.PRIMARY,
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def decider(role: Role, *, armed: bool = True, now: float = 0.0) -> FailoverDecider:
    decide = FailoverDecider(
        DeciderConfig(pair="web1", role=role, boot=7, interval=0.05, timeout=0.3), now
    )
    decide.local_qemu(QemuState.RUNNING, now)
    if armed:
        mode = ColoMode.PRIMARY if role is Role.PRIMARY else ColoMode.SECONDARY
        decide.local_colo(mode, now)
        assert decide.state is Watch.WATCHING
    return decide


def decisions(actions: list[DecideAction]) -> list[DecideAction]:
    """The actions without the heartbeats to send (checked in tests of their own)."""
    return [action for action in actions if not isinstance(action, SendHeartbeat)]


def sent(actions: list[DecideAction]) -> list[Heartbeat]:
    return [action.heartbeat for action in actions if isinstance(action, SendHeartbeat)]


def test_heartbeats_go_out_every_interval_and_at_once_on_a_change() -> None:
    decide = FailoverDecider(DeciderConfig("web1", Role.SECONDARY, boot=7, interval=0.05), 0.0)
    assert decide.get_timer() == 0.0
    first = decide.handle_timer(0.0)
    assert first == [
        SendHeartbeat(Heartbeat("web1", Role.SECONDARY, 7, 1, QemuState.UNKNOWN, ColoMode.NONE))
    ]
    assert decide.get_timer() == 0.05
    assert decide.handle_timer(0.03) == []
    assert sent(decide.set_ready(True, 0.04)) == [
        Heartbeat("web1", Role.SECONDARY, 7, 2, QemuState.UNKNOWN, ColoMode.NONE, ready=True)
    ]
    assert decide.get_timer() == pytest.approx(0.09)
    assert sent(decide.local_qemu(QemuState.RUNNING, 0.05))[0].qemu is QemuState.RUNNING


def test_secondary_takes_over_when_the_primary_is_silent_for_the_timeout() -> None:
    decide = decider(Role.SECONDARY)
    decide.heartbeat(beat(Role.PRIMARY), "replication", 0.1)
    assert decide.get_timer() == pytest.approx(0.05)  # the next heartbeat to send
    assert decisions(decide.handle_timer(0.39)) == []
    actions = decide.handle_timer(0.4)
    assert decisions(actions) == [PrimaryLost("silent", pytest.approx(0.3))]  # type: ignore[arg-type]
    heartbeat = sent(actions)[-1]
    assert heartbeat.failed_over and heartbeat.serving
    assert decide.state is Watch.FAILED_OVER
    assert decisions(decide.handle_timer(5.0)) == []  # decided once


def test_secondary_takes_over_at_once_when_the_primary_says_its_qemu_exited() -> None:
    decide = decider(Role.SECONDARY)
    decide.heartbeat(beat(Role.PRIMARY, 1), "replication", 0.1)
    exited = beat(Role.PRIMARY, 2, qemu=QemuState.EXITED, serving=False)
    actions = decide.heartbeat(exited, "replication", 0.12)
    assert decisions(actions) == [PrimaryLost("qemu-exited", 0.0)]


def test_secondary_never_takes_over_unless_its_qemu_is_a_colo_secondary() -> None:
    decide = decider(Role.SECONDARY, armed=False)
    decide.heartbeat(beat(Role.PRIMARY), "replication", 0.1)
    assert decisions(decide.handle_timer(10.0)) == []  # not in COLO yet: nothing to take over
    decide.local_colo(ColoMode.SECONDARY, 10.0)
    # Its COLO stream broke (COLO_EXIT): reported, but not a reason by itself.
    actions = decide.local_colo_exit(10.1)
    assert decisions(actions) == [] and sent(actions)[-1].colo_exit
    # The QEMU left COLO secondary mode (someone failed it over): stand down.
    assert decisions(decide.local_colo(ColoMode.NONE, 10.2)) == [StoodDown("left-colo")]
    assert decisions(decide.handle_timer(20.0)) == []


def test_secondary_stands_down_when_the_primary_runs_alone() -> None:
    decide = decider(Role.SECONDARY)
    actions = decide.heartbeat(beat(Role.PRIMARY, failed_over=True, colo=ColoMode.NONE), "r", 0.1)
    assert decisions(actions) == [StoodDown("primary-failed-over")]
    assert decide.state is Watch.STOOD_DOWN
    # The primary's host then dies: the secondary's state is stale; it stays down.
    assert decisions(decide.handle_timer(5.0)) == []


def test_secondary_stands_down_when_the_primary_guest_shut_down() -> None:
    decide = decider(Role.SECONDARY)
    actions = decide.heartbeat(beat(Role.PRIMARY, qemu=QemuState.SHUTDOWN), "r", 0.1)
    assert decisions(actions) == [StoodDown("primary-shutdown")]


def test_the_silence_clock_starts_when_colo_starts() -> None:
    decide = decider(Role.SECONDARY, armed=False)
    decide.local_colo(ColoMode.SECONDARY, 5.0)  # no heartbeat ever heard
    assert decisions(decide.handle_timer(5.29)) == []
    assert decisions(decide.handle_timer(5.3)) == [PrimaryLost("silent", pytest.approx(0.3))]  # type: ignore[arg-type]


def test_the_peer_is_silent_only_when_silent_on_every_path() -> None:
    decide = decider(Role.SECONDARY)
    decide.heartbeat(beat(Role.PRIMARY, 1), "replication", 0.1)
    decide.heartbeat(beat(Role.PRIMARY, 2), "lan", 0.35)  # the replication link is cut
    assert decisions(decide.handle_timer(0.5)) == []
    assert decisions(decide.handle_timer(0.65)) == [PrimaryLost("silent", pytest.approx(0.3))]  # type: ignore[arg-type]


def test_primary_fails_over_alone_on_silence_exit_report_colo_exit_or_a_stall() -> None:
    decide = decider(Role.PRIMARY)
    decide.heartbeat(beat(Role.SECONDARY), "replication", 0.1)
    actions = decide.handle_timer(0.4)
    assert decisions(actions) == [SecondaryLost("silent", pytest.approx(0.3))]  # type: ignore[arg-type]
    beat_out = sent(actions)[-1]
    assert beat_out.failed_over and beat_out.serving and beat_out.colo is ColoMode.PRIMARY

    # Reported by the peer (just heard: silent for 0 s) or seen locally (0.1 s after it).
    exited = beat(Role.SECONDARY, qemu=QemuState.EXITED)
    for reason, silent_for, feed in (
        ("qemu-exited", 0.0, lambda d: d.heartbeat(exited, "r", 1)),
        ("colo-exit", 0.1, lambda d: d.local_colo_exit(1)),
        ("colo-exit", 0.1, lambda d: d.local_colo(ColoMode.NONE, 1)),
        ("checkpoint-stalled", 0.1, lambda d: d.checkpoint_stalled(1)),
    ):  # fmt: skip
        decide = decider(Role.PRIMARY)
        decide.heartbeat(beat(Role.SECONDARY), "replication", 0.9)
        expected = [SecondaryLost(reason, pytest.approx(silent_for, abs=1e-9))]  # type: ignore[arg-type]
        assert decisions(feed(decide)) == expected, reason


def test_the_secondarys_colo_exit_alone_is_no_reason_for_the_primary() -> None:
    """The stream breaks on the secondary when the *primary* QEMU dies, too; the primary's
    daemon may hear that before its own QMP socket closes."""
    decide = decider(Role.PRIMARY)
    assert decisions(decide.heartbeat(beat(Role.SECONDARY, colo_exit=True), "r", 0.1)) == []
    assert decide.state is Watch.WATCHING


def test_the_primary_stands_down_when_the_secondary_took_over() -> None:
    """This daemon was silent too long (stalled, or restarted): the secondary is the master."""
    took_over = beat(Role.SECONDARY, failed_over=True, serving=True, colo=ColoMode.NONE)
    for armed in (True, False):  # in COLO, or an engine (re)started outside it
        decide = decider(Role.PRIMARY, armed=armed)
        actions = decide.heartbeat(took_over, "replication", 1.0)
        assert decisions(actions) == [StoodDown("secondary-took-over")]
        assert decide.state is Watch.STOOD_DOWN
        assert decisions(decide.handle_timer(9.0)) == []


def test_a_peer_leaving_on_purpose_is_not_lost_until_heard_again() -> None:
    decide = decider(Role.SECONDARY)
    decide.heartbeat(beat(Role.PRIMARY, 1), "replication", 0.1)
    decide.heartbeat(beat(Role.PRIMARY, 2, leaving=True), "replication", 0.2)
    assert decide.peer_leaving
    assert decisions(decide.handle_timer(60.0)) == []  # a planned restart is no failover
    decide.heartbeat(beat(Role.PRIMARY, 1), "replication", 61.0)  # back (a new engine)
    assert decisions(decide.handle_timer(61.29)) == []
    assert decisions(decide.handle_timer(61.3)) == [PrimaryLost("silent", pytest.approx(0.3))]  # type: ignore[arg-type]


def test_leaving_says_so_in_the_last_heartbeat() -> None:
    decide = decider(Role.PRIMARY)
    assert sent(decide.leave(1.0))[0].leaving
    assert sent(decide.handle_timer(2.0))[0].leaving


def test_a_daemon_whose_qemu_died_decides_nothing_but_says_so() -> None:
    decide = decider(Role.PRIMARY)
    actions = decide.local_qemu(QemuState.EXITED, 1.0)
    assert decisions(actions) == [LocalQemuLost(QemuState.EXITED)]
    assert sent(actions)[-1].qemu is QemuState.EXITED and not sent(actions)[-1].serving
    assert decide.state is Watch.LOCAL_LOST
    assert decisions(decide.handle_timer(5.0)) == []
    assert sent(decide.handle_timer(5.1))[0].qemu is QemuState.EXITED  # still heard


def test_split_brain_is_reported_once_when_both_serve() -> None:
    decide = decider(Role.PRIMARY)
    decide.handle_timer(1.0)  # silence: the primary runs alone
    peer = beat(Role.SECONDARY, failed_over=True, serving=True, colo=ColoMode.NONE)
    assert decisions(decide.heartbeat(peer, "replication", 2.0)) == [SplitBrain(peer)]
    assert decisions(decide.heartbeat(peer, "replication", 2.1)) == []


def test_heartbeats_from_another_pair_or_of_our_role_are_rejected() -> None:
    decide = decider(Role.SECONDARY)
    other = dataclasses.replace(beat(Role.PRIMARY), pair="web2")
    same = beat(Role.SECONDARY)
    assert decide.heartbeat(other, "r", 0.1) == [PeerRejected("other-pair", other)]
    assert decide.heartbeat(same, "r", 0.1) == [PeerRejected("same-role", same)]
    assert decide.heard() is None


def test_decider_config_is_checked() -> None:
    with pytest.raises(UsageError):
        DeciderConfig("web1", Role.PRIMARY, 1, interval=0.5, timeout=0.3)
