"""``Comparator.feed_many`` decides as ``feed`` called once per frame does.

One difference, by design: a side's consecutive plain segments of one connection in a batch
are compared as one segment (lanes.py, ``Lanes.run``), so the releases they bring come after
their drops rather than between them (the secondary's) or after the run's last segment (the
primary's), and where a connection diverges the evidence describes the run, not the
segment. Until a checkpoint is asked for, the releases (in order), the drops (in order), what
else happens (checkpoints with their reasons and flows, malformed packets) and the state are
the same. After a divergence inside a run, the bytes of the run before the difference may be
left unverified and their packets held for the checkpoint the divergence asked for; holding
more, the batch may then meet a bound or a timeout the loop does not, so until the
checkpoint only what reaches the client is compared: the same secondary packets dropped, the
loop's matched releases less some, and in the end every primary packet released once by both.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coloproxy.compare import (
    CheckpointNeeded,
    Comparator,
    CompareConfig,
    CompareStats,
    Drop,
    Event,
    Release,
    Side,
)
from coloproxy.compare.verdicts import ReleaseReason
from coloproxy.errors import UsageError
from craft import ACK, FIN, PSH, RST, SYN, stream, tcp, udp
from test_compare_lane import ISNS, STREAM, tcp_segment, udp_datagram

MATCHED = ReleaseReason.MATCHED
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[Side, list[bytes]]]:
    out = []
    for _ in range(draw(st.integers(0, 12))):
        side = draw(st.sampled_from(Side))
        frames = draw(st.lists(st.one_of(tcp_segment(side), udp_datagram()), max_size=8))
        out.append((side, frames))
    return out


def _decisions(events: list[Event]) -> tuple[list[Event], list[Event], list[object]]:
    """Releases, drops and the rest (checkpoints without their evidence), each in order."""
    releases = [event for event in events if type(event) is Release]
    drops = [event for event in events if type(event) is Drop]
    rest: list[object] = [
        (event.reason, event.flow, event.coalesced) if type(event) is CheckpointNeeded else event
        for event in events
        if type(event) not in (Release, Drop)
    ]
    return releases, drops, rest


def _diverged(events: list[Event]) -> bool:
    return any(type(event) is CheckpointNeeded for event in events)


def _comparable(stats: CompareStats, diverged: bool) -> CompareStats:
    """Once a connection diverged, the bytes of a run before its difference may be left
    unverified (and stored) where the segments' were verified, and their primary packets held
    for the checkpoint: what is held and stored may differ, and with it what the bounds and
    timeouts do until the checkpoint. Then only whether one was asked for is compared."""
    if not diverged:
        return stats
    return CompareStats(0, 0, 0, 0, 0, 0, None, None, stats.checkpoint_requested, False, False, 0)


def _same_decisions(batched: list[Event], single: list[Event], diverged: bool = False) -> None:
    """The same decisions. Once a checkpoint was asked for (``diverged``, or in ``single``),
    the batch may hold more (``_comparable``), and until the checkpoint what it decides may
    differ in reasons (a bound reached, a timeout) but not in what reaches the client: the
    same secondary packets dropped, in order; its matched releases the loop's less some, in
    order; its other releases (the checkpoint's) the loop's and perhaps those it did not
    match."""
    releases, drops, rest = _decisions(batched)
    expected_releases, expected_drops, expected_rest = _decisions(single)
    if not (diverged or _diverged(single)):
        assert drops == expected_drops
        assert rest == expected_rest
        assert releases == expected_releases
        return
    assert [drop.token for drop in drops] == [drop.token for drop in expected_drops]
    assert _diverged(batched) or not _diverged(single) or diverged
    matched = [release for release in releases if release.reason is MATCHED]
    remaining = iter([release for release in expected_releases if release.reason is MATCHED])
    assert all(release in remaining for release in matched), (releases, expected_releases)
    others = {release for release in releases if release.reason is not MATCHED}
    assert others >= {r for r in expected_releases if r.reason is not MATCHED}


def _step(
    batched: Comparator,
    single: Comparator,
    number: int,
    side: Side,
    frames: list[bytes],
    now: float,
    released: tuple[list[Event], list[Event]] = ([], []),
) -> bool:
    """``frames`` to ``batched`` in one ``feed_many`` and to ``single`` one by one, then the
    timer to both: the same decisions (their releases added to ``released``, the batch's
    first). Whether ``single`` has asked for a checkpoint."""
    diverged = single.stats().checkpoint_requested
    tokens = [(number, index) for index in range(len(frames))]
    expected: list[Event] = []
    for frame, token in zip(frames, tokens, strict=True):
        expected += single.feed(side, frame, now, token)
    for batch, loop in (
        (batched.feed_many(side, frames, now, tokens), expected),
        (batched.handle_timer(now), single.handle_timer(now)),
    ):
        _same_decisions(batch, loop, diverged)
        released[0].extend(event for event in batch if type(event) is Release)
        released[1].extend(event for event in loop if type(event) is Release)
    return single.stats().checkpoint_requested


@SETTINGS
@given(
    batches(),
    st.sampled_from([CompareConfig(), CompareConfig(max_held_packets=3, compare_timeout=0.05)]),
)
def test_feed_many_is_feed_in_a_loop(
    steps: list[tuple[Side, list[bytes]]], config: CompareConfig
) -> None:
    batched, single = Comparator(config), Comparator(config)
    handshake = [(side, tcp(ISNS[side], flags=SYN | ACK)) for side in Side]
    for comparator in (batched, single):
        for side, packet in handshake:
            comparator.feed(side, packet, 0.0, ("syn", side.value))
    now = 0.0
    diverged = False
    for number, (side, frames) in enumerate(steps):
        now += 0.03
        diverged = _step(batched, single, number, side, frames, now) or diverged
        assert _comparable(batched.stats(), diverged) == _comparable(single.stats(), diverged)


_PORTS = (40000, 40001)
_FLAGS = [PSH | ACK] * 6 + [ACK] * 3 + [FIN | ACK, RST | ACK, 0]


@st.composite
def runs(draw: st.DrawFn) -> list[tuple[Side, list[bytes]]]:
    """Batches of each side's stream of two connections cut anywhere, so that the secondary's
    batches hold runs (consecutive segments that continue each other), now and then broken: a
    resend of earlier bytes, other bytes, another acknowledgement number, a FIN or RST, the
    other connection's segment, an empty segment, a UDP datagram."""
    cursor = {(side, port): 0 for side in Side for port in _PORTS}
    out = []
    for _ in range(draw(st.integers(1, 10))):
        side = draw(st.sampled_from(Side))
        frames = []
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.integers(0, 12)) == 0:
                frames.append(draw(udp_datagram()))
                continue
            port = draw(st.sampled_from(_PORTS))
            low = cursor[side, port]
            if draw(st.integers(0, 6)) == 0:  # a resend of bytes sent before
                low = draw(st.integers(0, low))
            high = min(len(STREAM), low + draw(st.integers(0, 120)))
            cuts = draw(st.lists(st.integers(low, high), max_size=4))
            bounds = sorted({low, high, *cuts})
            ack = 1000 + draw(st.sampled_from([0, 0, 0, 100]))
            for start, end in itertools.pairwise(bounds if len(bounds) > 1 else [low, low]):
                payload = bytearray(STREAM[start:end])
                if payload and draw(st.integers(0, 20)) == 0:
                    payload[draw(st.integers(0, len(payload) - 1))] ^= 0x40
                flags = draw(st.sampled_from(_FLAGS))
                number = ISNS[side] + 1 + start
                frames.append(tcp(number, bytes(payload), flags, ack, dport=port))
            cursor[side, port] = max(cursor[side, port], high)
        out.append((side, frames))
    return out


@SETTINGS
@given(
    runs(),
    st.sampled_from(
        [
            CompareConfig(),
            CompareConfig(max_held_packets=4, max_held_bytes=150),
            CompareConfig(compare_timeout=0.05, secondary_timeout=0.05),
        ]
    ),
)
def test_each_sides_runs_decide_as_its_segments(
    steps: list[tuple[Side, list[bytes]]], config: CompareConfig
) -> None:
    """Seen failing, each alone, with the run's bytes left out of the bound on held bytes,
    with a segment taken into a run by its sequence number alone (another acknowledgement
    number) or by its acknowledgement number alone, with no run fed before a frame the lanes
    leave to the general path, and with runs gathered while a side had ended (a run's
    difference then found before the fate problem a segment of it met first); for the
    primary's runs, with a run started by bytes the primary sent before (1 seed of 3; the test
    below catches that always)."""
    batched, single = Comparator(config), Comparator(config)
    for comparator in (batched, single):
        for side in Side:
            for port in _PORTS:
                comparator.feed(side, tcp(ISNS[side], flags=SYN | ACK, dport=port), 0.0, "syn")
    now = 0.0
    diverged = False
    released: tuple[list[Event], list[Event]] = ([], [])
    for number, (side, frames) in enumerate(steps):
        now += 0.03
        diverged = _step(batched, single, number, side, frames, now, released) or diverged
        assert _comparable(batched.stats(), diverged) == _comparable(single.stats(), diverged)
    end = now + 10
    for batch, loop in (
        (batched.handle_timer(end), single.handle_timer(end)),
        (batched.checkpoint_completed(end), single.checkpoint_completed(end)),
    ):
        _same_decisions(batch, loop, diverged)
        released[0].extend(event for event in batch if type(event) is Release)
        released[1].extend(event for event in loop if type(event) is Release)
    assert _comparable(batched.stats(), diverged) == _comparable(single.stats(), diverged)
    assert batched.stats().stored_bytes == single.stats().stored_bytes == 0
    # in the end every primary packet was released once, by both
    tokens = [sorted(map(repr, (release.token for release in side))) for side in released]
    assert tokens[0] == tokens[1]
    assert len(set(tokens[0])) == len(tokens[0])


def test_a_run_counts_toward_the_bound_on_held_bytes() -> None:
    """The secondary's bytes gathered in a run are not yet stored: the bound counts them all
    the same, so the segment that would pass it goes to the general path as it would alone
    (and the bound asks for its checkpoint)."""
    config = CompareConfig(max_held_bytes=100)
    batched, single = Comparator(config), Comparator(config)
    for comparator in (batched, single):
        for side in Side:
            comparator.feed(side, tcp(ISNS[side], flags=SYN | ACK), 0.0, "syn")
    frames = stream(ISNS[Side.SECONDARY], STREAM[:120], [40, 80])
    expected: list[Event] = []
    for index, frame in enumerate(frames):
        expected += single.feed(Side.SECONDARY, frame, 1.0, index)
    assert any(type(event) is CheckpointNeeded for event in expected)
    _same_decisions(batched.feed_many(Side.SECONDARY, frames, 1.0, [0, 1, 2]), expected)


def test_a_primary_resend_with_other_bytes_starts_no_run() -> None:
    """A primary run holds only bytes the primary never sent: a resend of verified bytes with
    other bytes, then new bytes, in one batch, is compared as the segments are, and the resend
    is not released (seen failing, the resend released, with runs started by any segment)."""
    comparator = Comparator()
    comparator.feed(Side.PRIMARY, tcp(ISNS[Side.PRIMARY], flags=SYN | ACK), 0.0, "p-syn")
    comparator.feed(Side.SECONDARY, tcp(ISNS[Side.SECONDARY], flags=SYN | ACK), 0.0, "s-syn")
    first = stream(ISNS[Side.PRIMARY], STREAM[:100], [])
    assert comparator.feed_many(Side.PRIMARY, first, 1.0, ["p0"]) == []
    secondary = stream(ISNS[Side.SECONDARY], STREAM[:100], [])
    assert comparator.feed_many(Side.SECONDARY, secondary, 1.0, ["s0"]) == [
        Drop("s0"),
        Release("p0"),
    ]
    other = bytearray(STREAM[:100])
    other[50] ^= 0x40
    resend = stream(ISNS[Side.PRIMARY], bytes(other), [])
    more = stream(ISNS[Side.PRIMARY] + 100, STREAM[100:200], [])
    events = comparator.feed_many(Side.PRIMARY, resend + more, 2.0, ["resend", "p1"])
    assert [type(event) for event in events] == [CheckpointNeeded]
    assert comparator.stats().checkpoint_requested


def test_a_primary_run_is_compared_as_one_segment() -> None:
    """The primary's three segments in one batch are one run: compared at its end, against the
    secondary's bytes cut elsewhere, and released in order."""
    comparator = Comparator()
    comparator.feed(Side.PRIMARY, tcp(ISNS[Side.PRIMARY], flags=SYN | ACK), 0.0, "p-syn")
    comparator.feed(Side.SECONDARY, tcp(ISNS[Side.SECONDARY], flags=SYN | ACK), 0.0, "s-syn")
    secondary = stream(ISNS[Side.SECONDARY], STREAM[:300], [150])
    assert comparator.feed_many(Side.SECONDARY, secondary, 1.0, ["s0", "s1"]) == [
        Drop("s0"),
        Drop("s1"),
    ]
    primary = stream(ISNS[Side.PRIMARY], STREAM[:300], [100, 200])
    assert comparator.feed_many(Side.PRIMARY, primary, 1.0, ["p0", "p1", "p2"]) == [
        Release("p0"),
        Release("p1"),
        Release("p2"),
    ]
    stats = comparator.stats()
    assert (stats.bytes_compared, stats.stored_bytes, stats.held_packets) == (300, 0, 0)


def test_a_batch_of_a_stream_releases_in_order() -> None:
    comparator = Comparator()
    comparator.feed(Side.PRIMARY, tcp(ISNS[Side.PRIMARY], flags=SYN | ACK), 0.0, "p-syn")
    comparator.feed(Side.SECONDARY, tcp(ISNS[Side.SECONDARY], flags=SYN | ACK), 0.0, "s-syn")
    primary = stream(ISNS[Side.PRIMARY], STREAM[:300], [100, 200])
    secondary = stream(ISNS[Side.SECONDARY], STREAM[:300], [150])
    assert comparator.feed_many(Side.PRIMARY, primary, 1.0, ["p0", "p1", "p2"]) == []
    # the secondary's two segments are one run: compared as one, after both drops
    assert comparator.feed_many(Side.SECONDARY, secondary, 1.0, ["s0", "s1"]) == [
        Drop("s0"),
        Drop("s1"),
        Release("p0"),
        Release("p1"),
        Release("p2"),
    ]
    assert comparator.feed_many(Side.PRIMARY, [], 1.0, []) == []


def test_frames_and_tokens_must_pair_up() -> None:
    comparator = Comparator()
    with pytest.raises(UsageError, match="2 frames but 1 tokens"):
        comparator.feed_many(Side.PRIMARY, [udp(b"a"), udp(b"b")], 0.0, ["only one"])
    with pytest.raises(UsageError):
        comparator.feed_many(Side.SECONDARY, [], 0.0, [tcp(1, b"x", ACK)])
