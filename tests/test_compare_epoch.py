"""The comparator's epoch as a state machine (coloproxy/compare/epoch.py): its table, the
flags each state reads as, illegal transitions raising, and the comparator walking it."""

from __future__ import annotations

import pytest

from coloproxy.compare import CheckpointNeeded, Comparator, CompareConfig, Reason, Side
from coloproxy.compare.epoch import (
    CHECKPOINTING,
    CHECKPOINTING_REQUESTED,
    CHECKPOINTING_SATURATED,
    COMPARING,
    COMPLETE,
    REQUEST,
    REQUESTED,
    SATURATE,
    SATURATED,
    START,
    TRANSITIONS,
    Epoch,
    EpochEvent,
    EpochState,
)
from coloproxy.errors import UsageError
from craft import SYN, tcp, udp

# The path to each state from a fresh epoch.
PATHS: dict[EpochState, list[EpochEvent]] = {
    COMPARING: [],
    REQUESTED: [REQUEST],
    SATURATED: [SATURATE],
    CHECKPOINTING: [START],
    CHECKPOINTING_REQUESTED: [REQUEST, START],
    CHECKPOINTING_SATURATED: [SATURATE, START],
}


def epoch_in(state: EpochState) -> Epoch:
    epoch = Epoch()
    for event in PATHS[state]:
        epoch.handle(event)
    assert epoch.state is state
    return epoch


def test_a_fresh_epoch_compares() -> None:
    epoch = Epoch()
    assert epoch.state is COMPARING
    assert (epoch.compares, epoch.checkpointing, epoch.requested, epoch.saturated) == (
        True,
        False,
        False,
        False,
    )


@pytest.mark.parametrize(
    ("state", "event", "after"),
    [
        (COMPARING, REQUEST, REQUESTED),
        (COMPARING, SATURATE, SATURATED),
        (COMPARING, START, CHECKPOINTING),
        (REQUESTED, REQUEST, REQUESTED),
        (REQUESTED, SATURATE, SATURATED),
        (REQUESTED, START, CHECKPOINTING_REQUESTED),
        (SATURATED, REQUEST, SATURATED),
        (SATURATED, START, CHECKPOINTING_SATURATED),
        (CHECKPOINTING, REQUEST, CHECKPOINTING_REQUESTED),
        (CHECKPOINTING, SATURATE, CHECKPOINTING_SATURATED),
        (CHECKPOINTING, START, CHECKPOINTING),
        (CHECKPOINTING_REQUESTED, SATURATE, CHECKPOINTING_SATURATED),
        (CHECKPOINTING_SATURATED, REQUEST, CHECKPOINTING_SATURATED),
    ],
)
def test_legal_transitions(state: EpochState, event: EpochEvent, after: EpochState) -> None:
    epoch = epoch_in(state)
    assert epoch.handle(event) is after
    assert epoch.state is after


@pytest.mark.parametrize("state", list(EpochState))
def test_a_completed_checkpoint_starts_a_fresh_epoch_from_any_state(state: EpochState) -> None:
    epoch = epoch_in(state)
    assert epoch.handle(COMPLETE) is COMPARING
    assert (epoch.compares, epoch.checkpointing, epoch.requested, epoch.saturated) == (
        True,
        False,
        False,
        False,
    )


@pytest.mark.parametrize("state", [SATURATED, CHECKPOINTING_SATURATED])
def test_saturating_twice_is_illegal(state: EpochState) -> None:
    epoch = epoch_in(state)
    with pytest.raises(UsageError, match="saturate is illegal in"):
        epoch.handle(SATURATE)
    assert epoch.state is state  # unchanged


def test_the_table_has_every_pair_but_saturating_twice() -> None:
    missing = {
        (state, event)
        for state in EpochState
        for event in EpochEvent
        if (state, event) not in TRANSITIONS
    }
    assert missing == {(SATURATED, SATURATE), (CHECKPOINTING_SATURATED, SATURATE)}


@pytest.mark.parametrize(
    ("state", "flags"),
    [
        (COMPARING, (True, False, False, False)),
        (REQUESTED, (True, False, True, False)),
        (SATURATED, (False, False, True, True)),
        (CHECKPOINTING, (False, True, False, False)),
        (CHECKPOINTING_REQUESTED, (False, True, True, False)),
        (CHECKPOINTING_SATURATED, (False, True, True, True)),
    ],
)
def test_each_state_reads_as_its_flags(
    state: EpochState, flags: tuple[bool, bool, bool, bool]
) -> None:
    """(compares, checkpointing, requested, saturated): packets are compared only while
    neither a checkpoint runs nor a bound holds everything."""
    epoch = epoch_in(state)
    assert (epoch.compares, epoch.checkpointing, epoch.requested, epoch.saturated) == flags


# -- the comparator in each state ---------------------------------------------------------


def _flags(comparator: Comparator) -> tuple[bool, bool, bool]:
    stats = comparator.stats()
    return stats.checkpointing, stats.checkpoint_requested, stats.saturated


def test_the_comparator_walks_the_table() -> None:
    """A difference asks (REQUESTED), a checkpoint runs (CHECKPOINTING_REQUESTED) and a
    request during it is coalesced, a bound then saturates, completion starts afresh."""
    comparator = Comparator(CompareConfig(datagram_reorder_window=0.01, max_flows=1))
    assert _flags(comparator) == (False, False, False)
    comparator.feed(Side.PRIMARY, udp(b"one"), 0.0, "p1")
    comparator.feed(Side.SECONDARY, udp(b"two"), 0.0, "s1")
    asked = [e for e in comparator.handle_timer(1.0) if isinstance(e, CheckpointNeeded)]
    assert [e.coalesced for e in asked] == [False]
    assert _flags(comparator) == (False, True, False)
    assert comparator.checkpoint_started(1.0) == []
    assert _flags(comparator) == (True, True, False)
    # a second flow is one past max_flows: a bound, while the checkpoint runs (its SYN is
    # still learned, so the flow table is consulted)
    events = comparator.feed(Side.PRIMARY, tcp(5, flags=SYN, sport=4000), 1.0, "p2")
    assert [(e.reason, e.coalesced) for e in events if isinstance(e, CheckpointNeeded)] == [
        (Reason.OVERFLOW, True)
    ]
    assert _flags(comparator) == (True, True, True)
    comparator.checkpoint_completed(2.0)
    assert _flags(comparator) == (False, False, False)
