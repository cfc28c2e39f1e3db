"""HeldFrames: primary frames held by token, released ones framed as colo-compare frames them."""

from __future__ import annotations

from coloproxy.compare import Comparator, CompareConfig, Side
from coloproxy.compare.events import CheckpointNeeded, Reason
from coloproxy.compare.relay import HeldFrames
from coloproxy.compare.verdicts import Drop, Release
from coloproxy.protocol.colo_frames import FrameDecoder, encode_frames
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
