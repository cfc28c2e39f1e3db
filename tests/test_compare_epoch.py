"""The comparator's epoch as a state machine (coloproxy/compare/epoch.py): its table, the
flags each state reads as, and illegal transitions raising."""

from __future__ import annotations

import pytest

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
