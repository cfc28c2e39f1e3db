"""HeldFrames: primary frames held by token, released ones framed as colo-compare frames them."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coloproxy.compare import Comparator, CompareConfig, Side, relay
from coloproxy.compare.events import CheckpointNeeded, Reason
from coloproxy.compare.relay import HeldFrames
from coloproxy.compare.verdicts import Drop, Release
from coloproxy.errors import UsageError
from coloproxy.protocol.colo_frames import FrameDecoder, Frames, encode_frame, encode_frames
from tests.craft import ACK, SYN, stream, tcp


def test_released_frames_come_out_framed_in_release_order() -> None:
    held = HeldFrames()
    tokens = held.hold([b"first", b"second", b"third"])
    assert list(tokens) == [0, 1, 2] and len(held) == 3
    assert held.release(2) and held.release(0)
    assert held.queued_frames == 2 and held.queued_bytes == 4 + 5 + 4 + 5
    assert held.take() == encode_frames([b"third", b"first"])
    assert held.take() == b"" and held.queued_frames == 0 and held.queued_bytes == 0
    assert len(held) == 1
    assert list(held.hold([b"fourth"])) == [3]  # tokens are never reused


def test_vnet_headers_go_out_with_their_frames() -> None:
    held = HeldFrames(vnet_hdr=True)
    held.hold([b"frame-a", b"frame-b"], [bytes(12), b"\x01" * 10])
    assert held.release(1) and held.release(0)
    data = held.take()
    assert data == encode_frames([b"frame-b", b"frame-a"], [b"\x01" * 10, bytes(12)])
    decoded = FrameDecoder(vnet_hdr=True).feed(data)
    assert decoded.packets == [b"frame-b", b"frame-a"]
    assert decoded.vnet_headers == [b"\x01" * 10, bytes(12)]


def test_a_token_not_held_is_not_released_and_is_counted() -> None:
    held = HeldFrames()
    held.hold([b"only"])
    assert held.release(0)
    assert not held.release(0)  # twice
    assert not held.release(None)  # a secondary's token
    assert not held.release(7)
    assert held.unknown == 3
    assert held.take() == encode_frames([b"only"])


def test_release_events_releases_and_counts_what_is_neither_release_nor_drop() -> None:
    held = HeldFrames()
    held.hold([b"a", b"b"])
    checkpoint = CheckpointNeeded(Reason.PAYLOAD, "tcp", None, None)
    others = held.release_events([Release(1), Drop(None), checkpoint, Release(0)])
    assert others == 1
    assert held.take() == encode_frames([b"b", b"a"])


def test_discard_held_forgets_everything_held() -> None:
    held = HeldFrames(vnet_hdr=True)
    held.hold([b"a", b"b"], [b"", b""])
    assert held.discard_held() == 2
    assert len(held) == 0 and not held.release(0)


def test_a_comparator_behind_held_frames_releases_each_matched_frame_once() -> None:
    """The relay loop of the chardev transport and the bench's socket server, in brief."""
    comparator = Comparator(CompareConfig())  # raw IP framing, as craft builds
    held = HeldFrames()
    data = bytes(range(256)) * 4
    primary = [tcp(5000, flags=SYN | ACK), *stream(5000, data, [100, 300, 700])]
    secondary = [tcp(9000, flags=SYN | ACK), *stream(9000, data, [50, 300, 900])]
    released = b""
    for index in range(len(primary)):
        tokens = held.hold(primary[index : index + 1])
        assert (
            held.release_events(
                comparator.feed_many(Side.PRIMARY, primary[index : index + 1], 1.0, tokens)
            )
            == 0
        )
        released += held.take()
    for index in range(len(secondary)):
        events = comparator.feed_many(Side.SECONDARY, secondary[index : index + 1], 1.0, [None])
        assert held.release_events(events) == 0
        released += held.take()
    assert FrameDecoder().feed(released).packets == primary
    assert len(held) == 0 and held.unknown == 0


def test_requeue_puts_unwritten_output_back_in_front() -> None:
    held = HeldFrames()
    held.hold([b"a", b"b"])
    held.release(0)
    data = held.take()
    held.release(1)
    held.requeue(data, 1)  # the write failed: it goes out first next time
    assert held.queued_frames == 2 and held.queued_bytes == 10
    assert held.take() == encode_frames([b"a", b"b"])


# -- frames held in place (hold_frames): what the chardev transport and the bench use ------


def _cut(data: bytes, vnet: bool = False) -> Frames:
    return FrameDecoder(vnet_hdr=vnet).cut(data)


@pytest.mark.parametrize("vnet", [False, True])
def test_frames_held_in_place_go_out_as_they_came_in_release_order(vnet: bool) -> None:
    packets = [bytes([n]) * (60 + n) for n in range(6)]
    headers = [bytes([n]) * 12 for n in range(6)] if vnet else None
    wire = encode_frames(packets, headers)
    held = HeldFrames(vnet_hdr=vnet)
    held.hold([b"before"], [b""] if vnet else None)  # one held one by one, token 0
    tokens = held.hold_frames(_cut(wire, vnet))
    assert list(tokens) == [1, 2, 3, 4, 5, 6] and len(held) == 7
    order = [2, 3, 1, 6, 0, 4]  # runs of consecutive tokens, and the one held apart
    for token in order:
        assert held.release(token)
    expected = [b"before" if t == 0 else packets[t - 1] for t in order]
    expected_headers = [b"" if t == 0 else headers[t - 1] for t in order] if headers else None
    assert held.queued_frames == 6
    data = held.take()
    assert data == encode_frames(expected, expected_headers)
    assert held.queued_bytes == 0 and len(held) == 1
    assert held.release(5) and held.take() == encode_frames(
        [packets[4]], [headers[4]] if headers else None
    )
    assert len(held) == 0 and not held.release(5) and held.unknown == 1
    assert list(held.hold_frames(_cut(wire, vnet))) == [7, 8, 9, 10, 11, 12]  # never reused


def test_a_whole_receive_released_in_order_is_written_as_it_came() -> None:
    wire = encode_frames([b"a" * 100, b"b" * 200, b"c" * 300])
    held = HeldFrames()
    tokens = held.hold_frames(_cut(wire))
    for token in tokens:
        held.release(token)
    assert held.take() == wire
    assert held.queued_bytes == 0 and len(held) == 0


def test_a_frame_cut_by_the_stream_is_held_whole() -> None:
    wire = encode_frames([b"x" * 50, b"y" * 70, b"z" * 30])
    decoder = FrameDecoder()
    held = HeldFrames()
    first = held.hold_frames(decoder.cut(wire[:60]))  # x whole, y cut
    second = held.hold_frames(decoder.cut(wire[60:]))
    assert list(first) == [0] and list(second) == [1, 2]
    for token in (2, 0, 1):
        assert held.release(token)
    assert held.take() == encode_frames([b"z" * 30, b"x" * 50, b"y" * 70])


def test_a_vnet_header_longer_than_its_frame_goes_out_as_hold_would_frame_it() -> None:
    bad = struct.pack("!II", 5, 9) + b"12345"  # vnet header length 9 > 5 bytes of data
    wire = encode_frame(b"ok-1", bytes(12)) + bad + encode_frame(b"ok-2", bytes(12))
    frames = _cut(wire, vnet=True)
    assert [event.problem.value for event in frames.events] == ["vnet-header-too-long"]
    held = HeldFrames(vnet_hdr=True)
    held.hold_frames(frames)
    assert len(held) == 3
    for token in (0, 1, 2):
        assert held.release(token)
    reference = HeldFrames(vnet_hdr=True)
    decoded = FrameDecoder(vnet_hdr=True).feed(wire)
    reference.hold(decoded.packets, decoded.vnet_headers)
    for token in (0, 1, 2):
        reference.release(token)
    assert held.take() == reference.take()


def test_held_receive_buffers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past PINNED_LIMIT bytes of receive buffers kept for held frames, the oldest ones'
    held frames are copied out: a frame held long does not keep its whole receive alive."""
    monkeypatch.setattr(relay, "PINNED_LIMIT", 1000)
    held = HeldFrames()
    receives = [encode_frames([bytes([n]) * 100] * 4) for n in range(6)]  # 416 bytes each
    for data in receives:
        held.hold_frames(_cut(data))
    assert len(held) == 24
    if relay.__file__ and relay.__file__.endswith(".py"):  # pure: the patched limit applies
        assert held._pinned <= 1000
    order = list(range(23, -1, -1))
    for token in order:
        assert held.release(token)
    assert held.take() == b"".join(encode_frame(bytes([t // 4]) * 100) for t in order)
    assert len(held) == 0 and held.unknown == 0


def test_output_not_taken_is_joined_before_it_keeps_many_receives_alive() -> None:
    held = HeldFrames()
    expected = []
    for n in range(relay.MAX_PARTS * 2):
        tokens = held.hold_frames(_cut(encode_frames([bytes([n % 256]) * 10] * 2)))
        held.release(tokens[1])  # one at a time, out of order: a run each
        expected.append(encode_frame(bytes([n % 256]) * 10))
    assert len(held._out) <= relay.MAX_PARTS + 1
    assert held.take() == b"".join(expected)


def test_feed_many_reads_frames_in_place_as_it_reads_a_list() -> None:
    data = bytes(range(256)) * 8
    primary = [tcp(5000, flags=SYN | ACK), *stream(5000, data, [100, 300, 700, 948])]
    secondary = [tcp(9000, flags=SYN | ACK), *stream(9000, data, [50, 300, 900, 798])]
    results = []
    for in_place in (False, True):
        comparator = Comparator(CompareConfig())
        events = []
        for side, frames in ((Side.PRIMARY, primary), (Side.SECONDARY, secondary)):
            if in_place:
                cut = _cut(encode_frames(frames))
                assert list(cut) == frames and cut[1:3] == frames[1:3] and cut[-1] == frames[-1]
                tokens = range(len(frames)) if side is Side.PRIMARY else [None] * len(frames)
                events += comparator.feed_many(side, cut, 1.0, tokens)
            else:
                tokens = list(range(len(frames))) if side is Side.PRIMARY else [None] * len(frames)
                events += comparator.feed_many(side, frames, 1.0, tokens)
        results.append(events)
    assert results[0] == results[1]
    assert [event.token for event in results[0] if isinstance(event, Release)] == list(
        range(len(primary))
    )


def test_held_frames_are_the_proxys_verdicts_and_say_when_output_waits() -> None:
    """accept queues like release but raises for a frame not held; drop always raises (a
    primary frame is never dropped); on_queued fires when the empty queue gets a frame."""
    held = HeldFrames()
    woken: list[int] = []
    held.on_queued = lambda: woken.append(held.queued_frames)
    tokens = held.hold_frames(_cut(encode_frames([b"a" * 10, b"b" * 20, b"c" * 30])))
    held.accept(tokens[0])
    held.accept(tokens[1])
    assert woken == [1]  # once for the batch, not per frame
    with pytest.raises(UsageError):
        held.accept(tokens[0])  # twice
    with pytest.raises(UsageError):
        held.drop(tokens[2])
    assert held.take() == encode_frames([b"a" * 10, b"b" * 20])
    held.accept(tokens[2])
    assert woken == [1, 1]


def _state(held: HeldFrames) -> tuple[int, int, int, int, bytes]:
    return held.queued_frames, held.queued_bytes, len(held), held.unknown, held.take()


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    single=st.integers(0, 3),
    order=st.randoms(use_true_random=False),
    runs=st.lists(st.integers(1, 8), min_size=1, max_size=10),
    bad=st.sampled_from([None, "again", "unknown", "secondary"]),
)
def test_accept_many_is_accept_one_at_a_time(
    sizes: list[int], single: int, order: random.Random, runs: list[int], bad: str | None
) -> None:
    """Batches of in-place frames, frames held one by one, tokens in stretches and out of
    order, a token twice or never held: ``accept_many`` leaves what ``accept`` one at a time
    leaves, raises where it raises, and what comes out is the same bytes."""
    receives = [
        encode_frames([bytes([n, i]) * (10 + i) for i in range(size)])
        for n, size in enumerate(sizes)
    ]
    tokens: list[object] = []
    pair = (HeldFrames(), HeldFrames())
    for held in pair:
        tokens = []
        for data in receives:
            tokens += held.hold_frames(_cut(data))
        tokens += held.hold([bytes([99, i]) * 7 for i in range(single)])
    # mostly in order, some stretches moved: what a comparator's releases look like
    handles: list[object] = sorted(tokens, key=lambda token: order.random() < 0.2)
    if bad == "again" and handles:
        handles.insert(order.randrange(len(handles)), handles[0])
    elif bad == "unknown":
        handles.insert(order.randrange(len(handles) + 1), 10_000)
    elif bad == "secondary":
        handles.insert(order.randrange(len(handles) + 1), None)
    many, one = pair
    position = 0
    raised = [False, False]
    for length in runs * (len(handles) // sum(runs) + 1):
        chunk = handles[position : position + length]
        position += length
        try:
            many.accept_many(chunk)
        except UsageError:
            raised[0] = True
        try:
            for handle in chunk:
                one.accept(handle)
        except UsageError:
            raised[1] = True
        assert raised[0] == raised[1]
        if raised[0] or position >= len(handles):
            break
    assert _state(many) == _state(one)


def test_accept_many_refuses_a_token_released_already_inside_a_stretch() -> None:
    held = HeldFrames()
    tokens = held.hold_frames(_cut(encode_frames([bytes([n]) * 20 for n in range(6)])))
    held.accept_many([tokens[4]])
    with pytest.raises(UsageError):
        held.accept_many([tokens[2], tokens[3], tokens[4], tokens[5]])
    assert len(held) == 3  # 0, 1 and 5: 2 and 3 went out before the refusal
    assert held.take() == encode_frames([bytes([n]) * 20 for n in (4, 2, 3)])


def test_take_parts_is_take_not_joined() -> None:
    pair = (HeldFrames(), HeldFrames())
    for held in pair:
        first = held.hold_frames(_cut(encode_frames([bytes([n]) * 30 for n in range(4)])))
        second = held.hold_frames(_cut(encode_frames([bytes([n]) * 40 for n in range(4, 8)])))
        held.accept_many([first[1], first[2], second[0], first[3], *second[1:], first[0]])
    parts_of, joined = pair
    queued = (parts_of.queued_frames, parts_of.queued_bytes)
    assert queued == (joined.queued_frames, joined.queued_bytes) == (8, 4 * 34 + 4 * 44)
    parts = parts_of.take_parts()
    assert len(parts) == 5  # the runs: first[1:3], second[0], first[3], second[1:], first[0]
    assert b"".join(parts) == joined.take()
    assert (parts_of.queued_frames, parts_of.queued_bytes, parts_of.take_parts()) == (0, 0, [])
