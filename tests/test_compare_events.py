"""Release and Drop are immutable values that behave like frozen dataclasses."""

from __future__ import annotations

import copy
import pickle

import pytest

from coloproxy.compare import Drop, DropReason, Release, ReleaseReason


def test_defaults_and_fields() -> None:
    assert Release(7).token == 7
    assert Release(7).reason is ReleaseReason.MATCHED
    assert Drop("s").reason is DropReason.COMPARED
    assert Release(token=1, reason=ReleaseReason.CHECKPOINT).reason is ReleaseReason.CHECKPOINT
    assert Drop(token=1, reason=DropReason.OVERFLOW).reason is DropReason.OVERFLOW


def test_equality_and_hash_are_by_class_and_fields() -> None:
    assert Release(1) == Release(1, ReleaseReason.MATCHED)
    assert hash(Release(1)) == hash(Release(1, ReleaseReason.MATCHED))
    assert Release(1) != Release(2)
    assert Release(1) != Release(1, ReleaseReason.CHECKPOINT)
    # The reasons are StrEnums and "passthrough" is in both vocabularies: the class decides.
    assert Release(1, ReleaseReason.PASSTHROUGH) != Drop(1, DropReason.PASSTHROUGH)
    assert Release(1) != (1, ReleaseReason.MATCHED)
    assert len({Release(1), Release(1), Drop(1)}) == 2


def test_repr_reads_like_a_dataclass() -> None:
    assert repr(Release("p1")) == "Release(token='p1', reason=<ReleaseReason.MATCHED: 'matched'>)"
    assert repr(Drop(3, DropReason.OVERFLOW)) == (
        "Drop(token=3, reason=<DropReason.OVERFLOW: 'overflow'>)"
    )


def test_immutable() -> None:
    release = Release(1)
    with pytest.raises(AttributeError):
        release.token = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        release.reason = ReleaseReason.CHECKPOINT  # type: ignore[misc]
    with pytest.raises(AttributeError):
        release.other = 1  # type: ignore[attr-defined]
    assert release == Release(1)


def test_copy_pickle_and_match() -> None:
    for event in (Release(("a", 1), ReleaseReason.MALFORMED), Drop(None, DropReason.MALFORMED)):
        assert copy.copy(event) == event
        assert copy.deepcopy(event) == event
        assert pickle.loads(pickle.dumps(event)) == event
    match Drop(5, DropReason.CHECKPOINTING):
        case Drop(token, reason):
            assert (token, reason) == (5, DropReason.CHECKPOINTING)
        case _:
            pytest.fail("Drop did not match its class pattern")
