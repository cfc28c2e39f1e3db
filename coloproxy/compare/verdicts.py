"""The per-packet verdicts ``Release`` and ``Drop`` and their closed vocabularies.

Importable from ``coloproxy.compare`` and ``coloproxy.compare.events`` like every event. They
live here, apart from the other events, because one of them is made for every packet fed: so
they are plain classes, not frozen dataclasses (whose ``__init__`` goes through
``object.__setattr__``: about 280 ns per event against 75 ns here, CPython 3.11, timeit), and
this module compiles with mypyc (setup.py), which events.py's dataclasses do not.

They behave as ``@dataclass(frozen=True)`` would: fields ``token`` and ``reason`` (read-only),
equal only to the same class with equal fields, hashable, the same ``repr``, ``match``
patterns, copy and pickle.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, Final, cast


class ReleaseReason(StrEnum):
    MATCHED = "matched"  # the secondary produced the same output
    CHECKPOINT = "checkpoint"  # flushed by a completed checkpoint
    PASSTHROUGH = "passthrough"  # a passthrough rule: released uncompared, counted unprotected
    MALFORMED = "malformed"  # unparseable and the malformed policy is "release"


class DropReason(StrEnum):
    COMPARED = "compared"  # absorbed by the comparator (its bytes are kept as needed)
    CHECKPOINTING = "checkpointing"  # arrived while a checkpoint runs: stale epoch
    PASSTHROUGH = "passthrough"
    MALFORMED = "malformed"
    OVERFLOW = "overflow"  # not stored because a bound was reached


class _Verdict:
    """What becomes of one packet: an immutable (token, reason)."""

    __slots__ = ("_reason", "_token")
    __match_args__: ClassVar[tuple[str, ...]] = ("token", "reason")
    _token: object
    _reason: ReleaseReason | DropReason

    def __init__(self, token: object, reason: ReleaseReason | DropReason) -> None:
        self._token = token
        self._reason = reason

    @property
    def token(self) -> object:
        return self._token

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Verdict) or other.__class__ is not self.__class__:
            return NotImplemented
        return bool(self._token == other._token and self._reason == other._reason)

    def __hash__(self) -> int:
        return hash((self._token, self._reason))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(token={self._token!r}, reason={self._reason!r})"

    def __reduce__(self) -> tuple[type[_Verdict], tuple[object, ReleaseReason | DropReason]]:
        return type(self), (self._token, self._reason)


class Release(_Verdict):
    """Let the primary packet ``token`` go out."""

    __slots__ = ()

    def __init__(self, token: object, reason: ReleaseReason = ReleaseReason.MATCHED) -> None:
        self._token = token
        self._reason = reason

    @property
    def reason(self) -> ReleaseReason:
        return cast(ReleaseReason, self._reason)  # only ever set from a ReleaseReason


class Split(_Verdict):
    """Hand the held primary GSO packet ``token`` back to the kernel to be cut into segments,
    each of which comes back as a primary packet of its own (NFQUEUE: an NF_QUEUE verdict to
    a queue without the GSO flag). Nothing leaves: the segments are compared and released
    like any packet. Only the NFQUEUE transport gets it (``CompareConfig.split_after``)."""

    __slots__ = ()

    def __init__(self, token: object, reason: ReleaseReason = ReleaseReason.MATCHED) -> None:
        self._token = token
        self._reason = reason


class Drop(_Verdict):
    """Drop the packet ``token`` (always a secondary packet: a primary one is never dropped)."""

    __slots__ = ()

    def __init__(self, token: object, reason: DropReason = DropReason.COMPARED) -> None:
        self._token = token
        self._reason = reason

    @property
    def reason(self) -> DropReason:
        return cast(DropReason, self._reason)  # only ever set from a DropReason


# Read once: an enum member is an attribute lookup through the enum's metaclass, about 85 ns
# in CPython 3.11, on every packet otherwise.
_COMPARED: Final = DropReason.COMPARED
# The verdict of every compared secondary packet without a token (the chardev transport's:
# nothing of it is kept, so there is nothing to drop). Verdicts are immutable: one object
# serves them all, instead of an allocation (and the collector's share of it) per packet.
_COMPARED_UNTOKENED: Final = Drop(None, _COMPARED)


def compared(token: object) -> Drop:
    """The verdict of the compared secondary packet ``token``."""
    return _COMPARED_UNTOKENED if token is None else Drop(token, _COMPARED)
