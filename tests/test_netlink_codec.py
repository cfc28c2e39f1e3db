"""The nfnetlink_queue codec (coloproxy/capture/netlink_codec.py), byte for byte against the
kernel's structures; no kernel needed."""

from __future__ import annotations

import struct

import pytest

from coloproxy.capture.netlink_codec import (
    NF_ACCEPT,
    NF_DROP,
    NFQA_CAP_LEN,
    NFQA_CFG_F_FAIL_OPEN,
    NFQA_CFG_F_GSO,
    NFQA_IFINDEX_INDEV,
    NFQA_IFINDEX_PHYSINDEV,
    NFQA_PACKET_HDR,
    NFQA_PAYLOAD,
    NFQA_SKB_INFO,
    NFQNL_CFG_CMD_BIND,
    NLMSG_ERROR,
    VerdictCodec,
    build_config,
    build_verdict,
    build_verdict_batch,
    iter_messages,
    parse_error,
    parse_packet,
)


def test_config_message_layout() -> None:
    message = build_config(
        0x1234, command=NFQNL_CFG_CMD_BIND, copy_range=0xFFFF, max_len=8192,
        flags=NFQA_CFG_F_GSO, mask=NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN, seq=7,
    )  # fmt: skip
    length, msg_type, flags, seq, portid = struct.unpack_from("=IHHII", message)
    assert (length, msg_type, flags, seq, portid) == (len(message), 0x0302, 0x05, 7, 0)
    assert message[16:20] == bytes([0, 0, 0x12, 0x34])  # AF_UNSPEC, v0, res_id big-endian
    attrs = message[20:]
    assert attrs[:8] == struct.pack("=HH", 8, 1) + bytes([1, 0, 0, 0])  # CMD BIND, pf 0
    # PARAMS: packed {be32 copy_range; u8 mode} = 5 bytes, padded to 8
    assert attrs[8:20] == struct.pack("=HH", 9, 2) + struct.pack(">IB", 0xFFFF, 2) + bytes(3)
    assert attrs[20:28] == struct.pack("=HH", 8, 3) + struct.pack(">I", 8192)
    assert attrs[28:36] == struct.pack("=HH", 8, 4) + struct.pack(">I", 5)  # mask
    assert attrs[36:44] == struct.pack("=HH", 8, 5) + struct.pack(">I", 4)  # flags
    assert len(attrs) == 44


def test_verdict_messages_layout() -> None:
    plain = build_verdict(3, 0xDEADBEEF, NF_DROP)
    assert struct.unpack_from("=IHH", plain) == (32, 0x0301, 0x01)
    assert plain[20:] == struct.pack("=HH", 12, 2) + struct.pack(">II", NF_DROP, 0xDEADBEEF)
    rewritten = build_verdict(3, 5, NF_ACCEPT, b"abcde")
    assert struct.unpack_from("=I", rewritten)[0] == len(rewritten) == 32 + 12
    assert rewritten[32:] == struct.pack("=HH", 9, 10) + b"abcde" + bytes(3)
    batch = build_verdict_batch(3, 99, NF_ACCEPT)
    assert struct.unpack_from("=IHH", batch) == (32, 0x0303, 0x01)
    assert batch[28:] == struct.pack(">I", 99)


@pytest.mark.parametrize("queue_num", [0, 3, 0x1234, 0xFFFF])
def test_the_queues_prebuilt_verdicts_are_the_codecs_byte_for_byte(queue_num: int) -> None:
    # NetlinkQueue encodes verdicts from prebuilt bytes on the hot path; they must be exactly
    # what build_verdict / build_verdict_batch (checked above against the kernel's layout) say.
    codec = VerdictCodec(queue_num)
    for verdict in (NF_ACCEPT, NF_DROP):
        for packet_id in (0, 1, 99, 0xDEADBEEF, 0xFFFFFFFF):
            id_bytes = struct.pack(">I", packet_id)
            assert codec.plain[verdict] + id_bytes == build_verdict(queue_num, packet_id, verdict)
            assert codec.batch[verdict] + id_bytes == build_verdict_batch(
                queue_num, packet_id, verdict
            )
    for length in range(0, 70):  # every padding: 0-3 bytes
        payload = bytes(range(length))
        for packet_id in (5, 0xFFFFFFFF):
            assert codec.accept_with_payload(packet_id, payload) == build_verdict(
                queue_num, packet_id, NF_ACCEPT, payload
            )
    payload = bytes(65531)  # the largest packet the kernel copies out (NFQNL_MAX_COPY_RANGE)
    assert codec.accept_with_payload(7, payload) == build_verdict(queue_num, 7, NF_ACCEPT, payload)


def packet_message(attrs: list[tuple[int, bytes]], seq: int = 0) -> bytes:
    body = bytes([2, 0, 0, 41])
    for attr_type, value in attrs:
        length = 4 + len(value)
        body += struct.pack("=HH", length, attr_type) + value + bytes(-length % 4)
    return struct.pack("=IHHII", 16 + len(body), 0x0300, 0, seq, 0) + body


def test_parse_packet_reads_every_field_we_use() -> None:
    payload = bytes(range(61))
    message = packet_message(
        [
            (NFQA_PACKET_HDR, struct.pack(">IHB", 77, 0x0800, 2) + b"\0"),
            (NFQA_IFINDEX_INDEV, struct.pack(">I", 3)),
            (NFQA_IFINDEX_PHYSINDEV, struct.pack(">I", 9)),
            (NFQA_CAP_LEN, struct.pack(">I", 1500)),
            (NFQA_SKB_INFO, struct.pack(">I", 3)),
            (NFQA_PAYLOAD, payload),
        ]
    )
    parsed = parse_packet(message)
    assert (parsed.packet_id, parsed.hw_protocol, parsed.hook) == (77, 0x0800, 2)
    assert (parsed.indev, parsed.physindev, parsed.cap_len, parsed.skb_info) == (3, 9, 1500, 3)
    assert parsed.payload == payload


def test_iter_messages_walks_a_datagram_and_stops_at_a_bad_header() -> None:
    first = packet_message([(NFQA_PAYLOAD, b"abc")], seq=1)
    second = packet_message([(NFQA_PAYLOAD, b"de")], seq=2)
    walked = list(iter_messages(first + second))
    assert [(seq, start, end) for _t, _f, seq, start, end in walked] == [
        (1, 0, len(first)),
        (2, len(first), len(first) + len(second)),
    ]
    assert list(iter_messages(first[:10])) == []
    assert len(list(iter_messages(first + second[:20]))) == 1


def test_parse_error_gives_errno_and_the_echoed_request() -> None:
    request = build_config(5, command=NFQNL_CFG_CMD_BIND, seq=42)
    error = struct.pack("=IHHII", 16 + 4 + len(request), NLMSG_ERROR, 0, 42, 0)
    error += struct.pack("=i", -16) + request
    assert parse_error(error) == (16, 0x0302, 42)
