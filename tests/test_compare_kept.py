"""The verified bytes kept for comparing resends (compare/kept.py), against a model.

What ``KeptBytes`` promises the TCP comparison: every byte it gives back is the byte that was
kept at that offset; of a connection's pieces kept in order, the newest that make up
``window`` bytes stay (unless the bound over all connections cuts them); what it holds is
counted exactly, in the connection and in the budget. The pieces here are large enough, and
come in order often enough, that the pieces joined at ``_JOIN_AT`` bytes (kept.py's module
doc) are among what is checked.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coloproxy.compare.kept import KeptBudget, KeptBytes

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# One step: ("add", gap before the piece or -1 for a piece in an earlier gap, length, fill
# byte) or ("clear",).
_ADD = st.tuples(
    st.just("add"),
    st.sampled_from([0] * 12 + [7, -1]),
    st.one_of(st.integers(1, 100), st.sampled_from([1448, 1448, 4000, 9000, 12_000])),
    st.integers(0, 255),
)
_STEP = st.one_of(*[_ADD] * 15, st.tuples(st.just("clear")))


def _bytes_at(start: int, length: int, fill: int) -> bytes:
    """A piece whose every byte tells its offset (and the fill), so that a byte given back
    from the wrong place shows."""
    return bytes(
        (fill + offset * 7 + (offset >> 8)) & 0xFF for offset in range(start, start + length)
    )


@SETTINGS
@given(
    window=st.sampled_from([1, 5000, 40_000, 100_000, 4 << 20, 4 << 20, 4 << 20]),
    limit=st.sampled_from([2000, 60_000, 64 << 20]),
    steps=st.lists(_STEP, min_size=30, max_size=120),
)
def test_kept_bytes_give_back_what_was_kept_and_keep_the_window(
    window: int, limit: int, steps: list[tuple[object, ...]]
) -> None:
    budget = KeptBudget(window, limit)
    kept = KeptBytes(budget)
    other = KeptBytes(budget)  # a second connection, so the bound over both is shared
    other.add(0, b"x" * 10)
    model: dict[int, int] = {}  # offset -> byte, every byte ever kept (since the last clear)
    pieces: list[tuple[int, int]] = []  # (start, length) kept, by offset
    holes: list[int] = []  # offsets of 7-byte gaps left between pieces, not filled yet
    pos = 0
    for step in steps:
        if step[0] == "clear":
            kept.clear()
            model.clear()
            pieces.clear()
            holes.clear()
            continue
        _, gap, length, fill = step
        assert isinstance(gap, int) and isinstance(length, int) and isinstance(fill, int)
        if gap < 0:  # into an earlier gap: below the newest piece (an insertion)
            if not holes:
                continue
            start = holes.pop()
            length = min(length, 7)
        else:
            if gap:
                holes.append(pos)
            start = pos + gap
            pos = start + length
        pieces.append((start, length))
        pieces.sort()
        data = _bytes_at(start, length, fill)
        kept.add(start, data)
        for index, byte in enumerate(data):
            model[start + index] = byte

        # Every byte given back is the one kept there; a range not kept is said so.
        low = max(0, pos - 2 * window - 5000)
        for part_low, part_high, got in kept.lookup(low, pos):
            assert low <= part_low < part_high <= pos
            if got is not None:
                assert len(got) == part_high - part_low
                assert got == bytes(model[offset] for offset in range(part_low, part_high))

        # The size is the live pieces' bytes, and the budget counts both connections.
        live = sum(high - low for low, high, got in kept.lookup(0, pos) if got is not None)
        assert kept.size == live
        assert budget.total == kept.size + other.size

        # Unless the bound over all connections cut them, the newest pieces that make up
        # the window are all kept.
        if limit > 1 << 20:  # (the steps keep far less than that)
            newest = 0
            for piece_start, piece_length in reversed(pieces):
                if newest >= window:
                    break
                parts = kept.lookup(piece_start, piece_start + piece_length)
                assert all(got is not None for _, _, got in parts), (piece_start, piece_length)
                newest += piece_length


def _kept_bytes(kept: KeptBytes, low: int, high: int) -> bytes | None:
    parts = kept.lookup(low, high)
    if any(got is None for _, _, got in parts):
        return None
    return b"".join(got for _, _, got in parts if got is not None)


def test_pieces_that_continue_each_other_are_joined() -> None:
    """A connection's full-size segments kept one by one end up in few pieces (one per
    ``_JOIN_AT`` bytes), also after the lists were cut from the front."""
    kept = KeptBytes(KeptBudget(200_000, 64 << 20))
    pos = 0
    for _ in range(3000):  # pieces with gaps between them: none joined, the oldest cut
        kept.add(pos, _bytes_at(pos, 100, 1))
        pos += 107
    first = pos
    for count in range(400):  # 579 200 bytes that continue each other
        kept.add(pos, _bytes_at(pos, 1448, 2))
        pos += 1448
        if count >= 200:  # the pieces with gaps are all cut by now
            # joined pieces within the window and a quarter, and the newest not yet joined
            # (one per segment, the window would hold 138 to 173)
            assert len(kept.starts) - kept.head <= 250_000 // (16 << 10) + 2 + 12
    assert (
        _kept_bytes(kept, pos - 200_000, pos)
        == b"".join(_bytes_at(start, 1448, 2) for start in range(first, pos, 1448))[-200_000:]
    )


def test_a_piece_kept_in_an_earlier_gap_is_not_joined_with_later_ones() -> None:
    """A piece inserted below the newest (a gap filled late) does not take the place of the
    newest pieces when those are joined."""
    kept = KeptBytes(KeptBudget(4 << 20, 64 << 20))
    kept.add(0, _bytes_at(0, 100, 3))
    kept.add(107, _bytes_at(107, 100, 3))  # a gap of 7 bytes before it
    kept.add(100, _bytes_at(100, 3, 3))  # part of the gap, late
    pos = 207
    while pos < 207 + 40_000:  # continues the piece at 107: joined with it
        kept.add(pos, _bytes_at(pos, 1448, 3))
        pos += 1448
    assert _kept_bytes(kept, 107, pos) == b"".join(
        [_bytes_at(107, 100, 3)] + [_bytes_at(start, 1448, 3) for start in range(207, pos, 1448)]
    )
    assert _kept_bytes(kept, 100, 103) == _bytes_at(100, 3, 3)
    assert _kept_bytes(kept, 103, 107) is None
