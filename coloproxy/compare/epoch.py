"""The comparator's epoch: whether it compares, has asked for a checkpoint, holds everything
at a bound, or waits for a running checkpoint. A state machine as data (``TRANSITIONS``).

An epoch runs from one completed checkpoint to the next. Within it the comparator is in one
of six states, the product of two facts: whether a checkpoint is running
(``checkpoint_started`` came, ``checkpoint_completed`` not yet) and how far the comparator's
own request went (none; a checkpoint asked for; a bound hit, so everything is held
uncompared until the checkpoint, which was asked for at the same moment):

================================  ==============  ============  =========
state                             checkpointing   requested     saturated
================================  ==============  ============  =========
``COMPARING``                     no              no            no
``REQUESTED``                     no              yes           no
``SATURATED``                     no              yes           yes
``CHECKPOINTING``                 yes             no            no
``CHECKPOINTING_REQUESTED``       yes             yes           no
``CHECKPOINTING_SATURATED``       yes             yes           yes
================================  ==============  ============  =========

Events: ``REQUEST`` (a ``CheckpointNeeded`` went out; while one is outstanding, later ones
are coalesced: I4), ``SATURATE`` (a bound was hit: the request that goes with it), ``START``
and ``COMPLETE`` (the shell's ``checkpoint_started`` and ``checkpoint_completed``). A pair
missing from ``TRANSITIONS`` is a bug in the comparator: ``Epoch`` raises ``UsageError``.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from coloproxy.errors import UsageError


class EpochState(Enum):
    COMPARING = "comparing"
    REQUESTED = "requested"
    SATURATED = "saturated"
    CHECKPOINTING = "checkpointing"
    CHECKPOINTING_REQUESTED = "checkpointing-requested"
    CHECKPOINTING_SATURATED = "checkpointing-saturated"


class EpochEvent(Enum):
    REQUEST = "request"
    SATURATE = "saturate"
    START = "start"
    COMPLETE = "complete"


COMPARING: Final = EpochState.COMPARING
REQUESTED: Final = EpochState.REQUESTED
SATURATED: Final = EpochState.SATURATED
CHECKPOINTING: Final = EpochState.CHECKPOINTING
CHECKPOINTING_REQUESTED: Final = EpochState.CHECKPOINTING_REQUESTED
CHECKPOINTING_SATURATED: Final = EpochState.CHECKPOINTING_SATURATED

REQUEST: Final = EpochEvent.REQUEST
SATURATE: Final = EpochEvent.SATURATE
START: Final = EpochEvent.START
COMPLETE: Final = EpochEvent.COMPLETE

# (state, event) -> next state. Not here, so illegal: SATURATE when saturated already (the
# comparator asks once per bound and epoch). A second START while a checkpoint runs is legal
# (the shell may say so twice; the later one counts).
TRANSITIONS: Final[dict[tuple[EpochState, EpochEvent], EpochState]] = {
    (COMPARING, REQUEST): REQUESTED,
    (COMPARING, SATURATE): SATURATED,
    (COMPARING, START): CHECKPOINTING,
    (COMPARING, COMPLETE): COMPARING,
    (REQUESTED, REQUEST): REQUESTED,
    (REQUESTED, SATURATE): SATURATED,
    (REQUESTED, START): CHECKPOINTING_REQUESTED,
    (REQUESTED, COMPLETE): COMPARING,
    (SATURATED, REQUEST): SATURATED,
    (SATURATED, START): CHECKPOINTING_SATURATED,
    (SATURATED, COMPLETE): COMPARING,
    (CHECKPOINTING, REQUEST): CHECKPOINTING_REQUESTED,
    (CHECKPOINTING, SATURATE): CHECKPOINTING_SATURATED,
    (CHECKPOINTING, START): CHECKPOINTING,
    (CHECKPOINTING, COMPLETE): COMPARING,
    (CHECKPOINTING_REQUESTED, REQUEST): CHECKPOINTING_REQUESTED,
    (CHECKPOINTING_REQUESTED, SATURATE): CHECKPOINTING_SATURATED,
    (CHECKPOINTING_REQUESTED, START): CHECKPOINTING_REQUESTED,
    (CHECKPOINTING_REQUESTED, COMPLETE): COMPARING,
    (CHECKPOINTING_SATURATED, REQUEST): CHECKPOINTING_SATURATED,
    (CHECKPOINTING_SATURATED, START): CHECKPOINTING_SATURATED,
    (CHECKPOINTING_SATURATED, COMPLETE): COMPARING,
}

# What each state says: (checkpointing, requested, saturated), the table in the module doc.
FLAGS: Final[dict[EpochState, tuple[bool, bool, bool]]] = {
    COMPARING: (False, False, False),
    REQUESTED: (False, True, False),
    SATURATED: (False, True, True),
    CHECKPOINTING: (True, False, False),
    CHECKPOINTING_REQUESTED: (True, True, False),
    CHECKPOINTING_SATURATED: (True, True, True),
}


class Epoch:
    """The current state and its flags, read per packet as plain attributes:
    ``compares`` (neither a checkpoint running nor a bound hit: packets are compared),
    ``checkpointing``, ``requested`` and ``saturated``."""

    def __init__(self) -> None:
        self.state = COMPARING
        self.compares = True
        self.checkpointing = False
        self.requested = False
        self.saturated = False

    def handle(self, event: EpochEvent) -> EpochState:
        """Take ``event``: the next state, or ``UsageError`` if the table has none."""
        state = TRANSITIONS.get((self.state, event))
        if state is None:
            raise UsageError(f"comparator epoch: {event.value} is illegal in {self.state.value}")
        self.state = state
        checkpointing, requested, saturated = FLAGS[state]
        self.checkpointing = checkpointing
        self.requested = requested
        self.saturated = saturated
        self.compares = not (checkpointing or saturated)
        return state
