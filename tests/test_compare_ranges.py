"""The set of half-open ranges behind a TCP connection's verified bytes (compare/ranges.py),
against a set of integers: the in-order fast path (which moves the last end alone) and the
general path must agree wherever they meet."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from coloproxy.compare.ranges import EMPTY_HIGH, RangeSet

_RANGE = st.tuples(st.integers(-20, 200), st.integers(0, 40))


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("add"), _RANGE),
            st.tuples(st.just("append"), st.integers(0, 30)),  # continues the last range
            st.tuples(st.just("clear"), st.just((0, 0))),
            st.tuples(st.just("look"), st.just((0, 0))),  # the general path's readers
        ),
        max_size=40,
    ),
    probes=st.lists(_RANGE, min_size=1, max_size=8),
)
def test_a_range_set_holds_what_was_added(
    steps: list[tuple[str, object]], probes: list[tuple[int, int]]
) -> None:
    ranges = RangeSet()
    model: set[int] = set()
    for kind, value in [*steps, ("look", (0, 0))]:
        if kind == "clear":
            ranges.clear()
            model.clear()
        elif kind == "append":
            assert isinstance(value, int)
            low = ranges.high if ranges else 0
            ranges.add(low, low + value)
            model.update(range(low, low + value))
        elif kind == "add":
            assert isinstance(value, tuple)
            low, length = value
            ranges.add(low, low + length)
            model.update(range(low, low + length))
        # What the hot path reads after every step: ``contains`` and ``high``.
        for low, length in probes:
            wanted = set(range(low, low + length))
            assert ranges.contains(low, low + length) == (wanted <= model)
        assert ranges.high == (max(model) + 1 if model else EMPTY_HIGH)
        assert bool(ranges) == bool(model)
        if kind != "look":
            continue
        for low, length in probes:
            high = low + length
            wanted = set(range(low, high))
            missing = [offset for gap in ranges.subtract(low, high) for offset in range(*gap)]
            assert missing == sorted(wanted - model)
            pieces = ranges.pieces(low, high)
            assert [offset for a, b, _ in pieces for offset in range(a, b)] == sorted(wanted)
            assert all((a in model) == inside for a, b, inside in pieces)
        intervals = ranges.intervals()
        assert [offset for a, b in intervals for offset in range(a, b)] == sorted(model)
        assert all(b < c for (_, b), (c, _) in itertools.pairwise(intervals))
