"""QEMU's chardev framing and the Xen notify words: every cut point, vnet on and off, the
69 632-byte limit as a desynchronisation that keeps every frame received before it, and a
decoder that never raises."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coloproxy.errors import UsageError
from coloproxy.protocol.colo_frames import (
    MAX_FRAME,
    CheckpointDone,
    Desynchronised,
    FrameDecoder,
    FrameEvent,
    NotifyDecoder,
    ProxyInitRequested,
    Truncated,
    UnknownNotify,
    VnetHeaderTooLong,
    do_checkpoint,
    encode_frame,
    encode_frames,
    frame_header,
    proxy_init_reply,
)

VNET = bytes(range(12))  # a virtio-net header with mergeable buffers is 12 bytes
PACKETS = [bytes([n]) * size for n, size in enumerate((60, 1514, 1, 0, 9000, 64))]


def decode_all(
    decoder: FrameDecoder, pieces: list[bytes]
) -> tuple[list[bytes], list[bytes], list[FrameEvent]]:
    packets: list[bytes] = []
    headers: list[bytes] = []
    events: list[FrameEvent] = []
    for piece in pieces:
        decoded = decoder.feed(piece)
        packets += decoded.packets
        if decoded.vnet_headers is not None:
            headers += decoded.vnet_headers
            assert len(decoded.vnet_headers) == len(decoded.packets)
        events += decoded.events
    return packets, headers, events


def cuts(stream: bytes) -> list[list[bytes]]:
    """The stream in two pieces at every byte boundary, and byte by byte."""
    ways = [[stream[:cut], stream[cut:]] for cut in range(len(stream) + 1)]
    ways.append([stream[i : i + 1] for i in range(len(stream))])
    return ways


def test_the_wire_format_is_qemus() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"abc", b"VV") == b"\x00\x00\x00\x05\x00\x00\x00\x02VVabc"
    assert frame_header(5) == b"\x00\x00\x00\x05"
    assert frame_header(5, 2) == b"\x00\x00\x00\x05\x00\x00\x00\x02"
    assert encode_frames([b"a", b"bc"]) == encode_frame(b"a") + encode_frame(b"bc")
    assert encode_frames([b"a"], [b"H"]) == encode_frame(b"a", b"H")
    assert MAX_FRAME == 69632


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_every_cut_point_gives_the_same_frames(vnet: bool) -> None:
    small = [p[:100] for p in PACKETS]  # every cut of a 9000-byte stream is slow
    headers = [VNET] * len(small) if vnet else None
    stream = encode_frames(small, headers)
    for pieces in cuts(stream):
        decoder = FrameDecoder(vnet_hdr=vnet)
        packets, got_headers, events = decode_all(decoder, pieces)
        assert packets == small
        assert got_headers == (headers or [])
        assert events == []
        assert decoder.pending == 0
        assert decoder.frames == len(small)
        assert decoder.offset == len(stream)


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_large_frames_round_trip(vnet: bool) -> None:
    headers = [VNET] * len(PACKETS) if vnet else None
    stream = encode_frames(PACKETS, headers)
    for size in (1, 7, 1000, 65536):
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        packets, got_headers, events = decode_all(FrameDecoder(vnet_hdr=vnet), pieces)
        assert packets == PACKETS
        assert got_headers == (headers or [])
        assert events == []


def test_the_largest_frame_passes_and_one_more_byte_is_a_desync() -> None:
    largest = b"x" * MAX_FRAME
    packets, _, events = decode_all(FrameDecoder(), [encode_frame(largest)])
    assert packets == [largest] and events == []
    too_big = b"y" * (MAX_FRAME + 1)
    stream = encode_frame(b"first") + encode_frame(too_big) + encode_frame(b"next")
    packets, _, events = decode_all(FrameDecoder(), [stream])
    assert packets == [b"first"]  # received whole before the bad length: delivered
    assert events == [Desynchronised(MAX_FRAME + 1, MAX_FRAME, 9, len(stream) - 9)]


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_a_desync_keeps_what_came_before_at_every_cut(vnet: bool) -> None:
    limit = 20
    headers = [VNET[:4]] * 3 if vnet else None
    before, big, after = b"a" * 5, b"B" * 30, b"c" * 7
    stream = encode_frames([before, big, after], headers)
    big_offset = len(encode_frames([before], headers[:1] if headers else None))
    length = 30 + (4 if vnet else 0)
    for pieces in cuts(stream):
        decoder = FrameDecoder(vnet_hdr=vnet, max_frame=limit)
        packets, got_headers, events = decode_all(decoder, pieces)
        assert packets == [before], pieces
        if headers:
            assert got_headers == headers[:1]
        assert [(e.length, e.limit, e.offset) for e in events] == [  # type: ignore[union-attr]
            (length, limit, big_offset)
        ], pieces
        assert isinstance(events[0], Desynchronised)
        assert (8 if vnet else 4) <= events[0].discarded <= len(stream) - big_offset
        assert decoder.desynchronised and decoder.pending == 0


def test_nothing_is_decoded_or_stored_after_a_desync_until_the_stream_ends() -> None:
    decoder = FrameDecoder(max_frame=10)
    decoded = decoder.feed(frame_header(1 << 31))
    assert decoded.events == [Desynchronised(1 << 31, 10, 0, 4)]
    for _ in range(100):
        assert decoder.feed(encode_frame(b"later") * 1000) == ([], None, [])
    assert decoder.pending == 0  # not buffered either
    assert decoder.end() == []  # reported already: no truncation on top
    assert decoder.feed(encode_frame(b"fresh")).packets == [b"fresh"]


def test_vnet_header_longer_than_its_frame_is_reported_and_delivered() -> None:
    stream = b"\x00\x00\x00\x03\x00\x00\x00\x09abc" + encode_frame(b"ok", b"HH")
    for pieces in cuts(stream):
        packets, headers, events = decode_all(FrameDecoder(vnet_hdr=True), pieces)
        assert packets == [b"", b"ok"]
        assert headers == [b"abc", b"HH"]  # the frame comes back out as it came in
        assert events == [VnetHeaderTooLong(9, 3, 0)]


def test_a_connection_ending_inside_a_frame_is_reported_and_forgotten() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"whole") + encode_frame(b"cut short")[:6])
    assert decoder.end() == [Truncated(6, 9)]
    assert decoder.end() == []
    # The next connection starts with a length, whatever the old one left.
    assert decoder.feed(encode_frame(b"fresh")).packets == [b"fresh"]


def test_misuse_raises() -> None:
    with pytest.raises(UsageError):
        FrameDecoder(max_frame=-1)


@settings(max_examples=300, deadline=None)
@given(
    st.booleans(),
    st.lists(st.binary(max_size=40), max_size=6),
    st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_frames_survive_any_segmentation(
    vnet: bool, packets: list[bytes], sizes: list[int]
) -> None:
    headers = [VNET[: len(p) % 5] for p in packets] if vnet else None
    stream = encode_frames(packets, headers)
    pieces, position = [], 0
    for size in sizes:
        pieces.append(stream[position : position + size])
        position += size
    pieces.append(stream[position:])
    got, got_headers, events = decode_all(FrameDecoder(vnet_hdr=vnet), pieces)
    assert got == packets and events == []
    assert got_headers == (headers or [])


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(st.binary(max_size=200), max_size=10))
def test_garbage_never_raises(vnet: bool, pieces: list[bytes]) -> None:
    decoder = FrameDecoder(vnet_hdr=vnet, max_frame=64)
    total = 0
    for piece in pieces:
        decoded = decoder.feed(piece)
        total += len(decoded.packets)
        assert all(len(packet) <= 64 for packet in decoded.packets)
    decoder.end()
    assert decoder.pending == 0


# -- Xen notify ------------------------------------------------------------------------------


def test_notify_words_are_framed_like_packets() -> None:
    assert do_checkpoint() == struct.pack("!I", 13) + b"DO_CHECKPOINT"
    assert proxy_init_reply() == struct.pack("!I", 25) + b"COLO_COMPARE_GET_XEN_INIT"


def test_notify_messages_at_every_cut() -> None:
    stream = (
        encode_frame(b"COLO_USERSPACE_PROXY_INIT")
        + encode_frame(b"COLO_CHECKPOINT")
        + encode_frame(b"COLO_CHECKPOINT\x00")  # QEMU compares length and bytes: unknown
        + encode_frame(b"HELLO")
    )
    for pieces in cuts(stream):
        decoder = NotifyDecoder()
        events = [event for piece in pieces for event in decoder.feed(piece)]
        assert events == [
            ProxyInitRequested(),
            CheckpointDone(),
            UnknownNotify(b"COLO_CHECKPOINT\x00", 16),
            UnknownNotify(b"HELLO", 5),
        ]
        assert decoder.end() == []


def test_notify_desync_and_truncated() -> None:
    decoder = NotifyDecoder(max_frame=32)
    done = encode_frame(b"COLO_CHECKPOINT")
    events = decoder.feed(done + encode_frame(b"x" * 40) + done)
    assert events == [CheckpointDone(), Desynchronised(40, 32, 19, 44 + 19)]
    assert decoder.feed(done) == []
    assert decoder.end() == []
    decoder.feed(b"\x00\x00")
    assert decoder.end() == [Truncated(2, 0)]
