"""Compare layer (pure, sans-IO): align primary and secondary output and decide."""

from coloproxy.compare.comparator import Comparator, CompareStats, flow_label
from coloproxy.compare.config import (
    CompareConfig,
    Framing,
    MalformedPolicy,
    PassthroughRule,
    SecondarySeq,
)
from coloproxy.compare.events import (
    CheckpointNeeded,
    Drop,
    DropReason,
    Event,
    Evidence,
    Flow,
    MalformedPacket,
    Reason,
    Release,
    ReleaseReason,
    Side,
    Split,
)

__all__ = [
    "CheckpointNeeded",
    "Comparator",
    "CompareConfig",
    "CompareStats",
    "Drop",
    "DropReason",
    "Event",
    "Evidence",
    "Flow",
    "Framing",
    "MalformedPacket",
    "MalformedPolicy",
    "PassthroughRule",
    "Reason",
    "Release",
    "ReleaseReason",
    "SecondarySeq",
    "Side",
    "Split",
    "flow_label",
]
