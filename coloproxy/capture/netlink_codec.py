"""The nfnetlink_queue messages, byte for byte: build configs and verdicts, read packets (pure).

NFQUEUE is a small nfnetlink protocol (net/netfilter/nfnetlink_queue.c). A netlink message
is a ``struct nlmsghdr`` (host byte order), a ``struct nfgenmsg`` and attributes (``struct
nlattr``, host byte order, values big-endian). ``build_config`` makes the NFQNL_MSG_CONFIG
that binds a queue with its settings, ``build_verdict`` and ``build_verdict_batch`` the
verdicts, ``VerdictCodec`` the same verdicts from prebuilt bytes (the hot path of
``netlink.py``, the transport that sends them); ``iter_messages``, ``parse_packet`` and
``parse_error`` read what the kernel sends. Bytes in, bytes out (pure: no socket, no
clock), and the tests check every layout without a kernel.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "PacketMessage",
    "VerdictCodec",
    "build_config",
    "build_verdict",
    "build_verdict_batch",
    "iter_messages",
    "parse_error",
    "parse_packet",
]

# Constants from the kernel's UAPI headers (linux-libc-dev, Debian 12).
# linux/socket.h
AF_UNSPEC: Final = 0
# linux/netlink.h
NLM_F_REQUEST: Final = 0x01
NLM_F_ACK: Final = 0x04
NLMSG_ERROR: Final = 0x2
NLA_TYPE_MASK: Final = 0x3FFF  # ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
# linux/netfilter/nfnetlink.h
NFNL_SUBSYS_QUEUE: Final = 3
NFNETLINK_V0: Final = 0
# linux/netfilter/nfnetlink_queue.h: enum nfqnl_msg_types
NFQNL_MSG_PACKET: Final = 0
NFQNL_MSG_VERDICT: Final = 1
NFQNL_MSG_CONFIG: Final = 2
NFQNL_MSG_VERDICT_BATCH: Final = 3
# enum nfqnl_attr_type
NFQA_PACKET_HDR: Final = 1
NFQA_VERDICT_HDR: Final = 2
NFQA_IFINDEX_INDEV: Final = 5
NFQA_IFINDEX_PHYSINDEV: Final = 7
NFQA_PAYLOAD: Final = 10
NFQA_CAP_LEN: Final = 13
NFQA_SKB_INFO: Final = 14
# enum nfqnl_msg_config_cmds
NFQNL_CFG_CMD_BIND: Final = 1
NFQNL_CFG_CMD_UNBIND: Final = 2
# enum nfqnl_config_mode
NFQNL_COPY_PACKET: Final = 2
# enum nfqnl_attr_config
NFQA_CFG_CMD: Final = 1
NFQA_CFG_PARAMS: Final = 2
NFQA_CFG_QUEUE_MAXLEN: Final = 3
NFQA_CFG_MASK: Final = 4
NFQA_CFG_FLAGS: Final = 5
# NFQA_CFG_F_*
NFQA_CFG_F_FAIL_OPEN: Final = 1 << 0
NFQA_CFG_F_GSO: Final = 1 << 2
# NFQA_SKB_* (flags in NFQA_SKB_INFO)
NFQA_SKB_CSUMNOTREADY: Final = 1 << 0
NFQA_SKB_GSO: Final = 1 << 1
# linux/netfilter.h
NF_DROP: Final = 0
NF_ACCEPT: Final = 1
NF_QUEUE: Final = 3  # with the target queue number in the upper 16 bits (NF_QUEUE_NR)

TYPE_PACKET: Final = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
_TYPE_VERDICT: Final = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
_PADDING: Final = bytes(3)
NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, portid: host byte order
_NFGENMSG: Final = struct.Struct(">BBH")  # family, version, res_id (the queue number, big-endian)
NLMSG_LEN_TYPE: Final = struct.Struct("=IH")  # the first two fields of NLMSGHDR
NLATTR: Final = struct.Struct("=HH")  # len, type: host byte order; attribute values are big-endian
BE32: Final = struct.Struct(">I")
_PACKET_HDR: Final = struct.Struct(">IHB")  # struct nfqnl_msg_packet_hdr
_ERRNO: Final = struct.Struct("=i")
HEADER_LEN: Final = NLMSGHDR.size + _NFGENMSG.size  # 20: where the attributes start


def _attr(attr_type: int, value: bytes) -> bytes:
    length = NLATTR.size + len(value)
    return NLATTR.pack(length, attr_type) + value + bytes(-length % 4)


def _message(msg_type: int, flags: int, seq: int, queue_num: int, attrs: bytes) -> bytes:
    body = _NFGENMSG.pack(AF_UNSPEC, NFNETLINK_V0, queue_num) + attrs
    return (
        NLMSGHDR.pack(NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0)
        + body
    )


def build_config(
    queue_num: int,
    *,
    command: int | None = None,
    copy_range: int | None = None,
    max_len: int | None = None,
    flags: int | None = None,
    mask: int | None = None,
    seq: int = 0,
    ack: bool = True,
) -> bytes:
    """An NFQNL_MSG_CONFIG message: command, copy mode/range, queue length, flags.

    The kernel applies them in that order within the one message, so a bind and its
    settings are atomic (``nfqnl_recv_config``). ``copy_range`` implies NFQNL_COPY_PACKET.
    """
    attrs = b""
    if command is not None:
        attrs += _attr(NFQA_CFG_CMD, struct.pack(">BBH", command, 0, 0))
    if copy_range is not None:
        attrs += _attr(NFQA_CFG_PARAMS, struct.pack(">IB", copy_range, NFQNL_COPY_PACKET))
    if max_len is not None:
        attrs += _attr(NFQA_CFG_QUEUE_MAXLEN, BE32.pack(max_len))
    if flags is not None:
        # The kernel refuses flags without a mask (EINVAL): the mask says which to change.
        attrs += _attr(NFQA_CFG_MASK, BE32.pack(flags if mask is None else mask))
        attrs += _attr(NFQA_CFG_FLAGS, BE32.pack(flags))
    msg_flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return _message(NFQNL_MSG_CONFIG, msg_flags, seq, queue_num, attrs)


def build_verdict(
    queue_num: int, packet_id: int, verdict: int, payload: bytes | None = None, seq: int = 0
) -> bytes:
    """An NFQNL_MSG_VERDICT for one packet, with a replacement payload if given."""
    attrs = _attr(NFQA_VERDICT_HDR, struct.pack(">II", verdict, packet_id))
    if payload is not None:
        attrs += _attr(NFQA_PAYLOAD, payload)
    return _message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, seq, queue_num, attrs)


def build_verdict_batch(queue_num: int, max_id: int, verdict: int, seq: int = 0) -> bytes:
    """An NFQNL_MSG_VERDICT_BATCH: ``verdict`` for every queued packet with id <= ``max_id``."""
    attrs = _attr(NFQA_VERDICT_HDR, struct.pack(">II", verdict, max_id))
    return _message(NFQNL_MSG_VERDICT_BATCH, NLM_F_REQUEST, seq, queue_num, attrs)


def iter_messages(data: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield ``(type, flags, seq, start, end)`` of each netlink message in a datagram.

    ``start`` is where the message's header begins, ``end`` where it ends; a truncated or
    zero-length header ends the walk (nothing in the datagram can be trusted after it).
    """
    offset = 0
    size = len(data)
    while offset + NLMSGHDR.size <= size:
        length, msg_type, flags, seq, _portid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > size:
            return
        yield msg_type, flags, seq, offset, offset + length
        offset += (length + 3) & ~3


@dataclass(frozen=True, slots=True)
class PacketMessage:
    """An NFQNL_MSG_PACKET decoded in full (the slow path: tests and diagnostics)."""

    packet_id: int
    hw_protocol: int
    hook: int
    payload: bytes
    indev: int | None
    physindev: int | None
    cap_len: int | None  # original length, present only if the payload was truncated
    skb_info: int  # NFQA_SKB_* flags


def parse_packet(data: bytes | bytearray | memoryview, start: int = 0) -> PacketMessage:
    """Decode the NFQNL_MSG_PACKET whose netlink header is at ``start``."""
    length = NLMSGHDR.unpack_from(data, start)[0]
    end = start + length
    offset = start + HEADER_LEN
    packet_id = hw_protocol = hook = skb_info = 0
    payload = b""
    indev = physindev = cap_len = None
    while offset + NLATTR.size <= end:
        attr_len, attr_type = NLATTR.unpack_from(data, offset)
        if attr_len < NLATTR.size:
            break
        value = offset + NLATTR.size
        attr_type &= NLA_TYPE_MASK
        if attr_type == NFQA_PACKET_HDR:
            packet_id, hw_protocol, hook = _PACKET_HDR.unpack_from(data, value)
        elif attr_type == NFQA_PAYLOAD:
            payload = bytes(data[value : offset + attr_len])
        elif attr_type == NFQA_IFINDEX_INDEV:
            indev = BE32.unpack_from(data, value)[0]
        elif attr_type == NFQA_IFINDEX_PHYSINDEV:
            physindev = BE32.unpack_from(data, value)[0]
        elif attr_type == NFQA_CAP_LEN:
            cap_len = BE32.unpack_from(data, value)[0]
        elif attr_type == NFQA_SKB_INFO:
            skb_info = BE32.unpack_from(data, value)[0]
        offset += (attr_len + 3) & ~3
    return PacketMessage(packet_id, hw_protocol, hook, payload, indev, physindev, cap_len, skb_info)


def parse_error(data: bytes | bytearray | memoryview, start: int = 0) -> tuple[int, int, int]:
    """Decode an NLMSG_ERROR: ``(errno, echoed type, echoed seq)``; errno 0 is an ack."""
    body = start + NLMSGHDR.size
    error = -_ERRNO.unpack_from(data, body)[0]
    _length, echoed_type, _flags, echoed_seq, _portid = NLMSGHDR.unpack_from(data, body + 4)
    return error, echoed_type, echoed_seq


class VerdictCodec:
    """The verdict messages of one queue from prebuilt bytes: the same as ``build_verdict``
    and ``build_verdict_batch`` (seq 0), without building attributes for every packet."""

    __slots__ = ("_payload_middle", "batch", "plain")

    def __init__(self, queue_num: int) -> None:
        # A plain verdict is 28 constant bytes and the packet id (struct
        # nfqnl_msg_verdict_hdr ends with it): encoding one is two appends. Likewise a batch.
        cut = -2 * BE32.size
        plain = build_verdict(queue_num, 0, NF_ACCEPT)[:cut]
        batch = build_verdict_batch(queue_num, 0, NF_ACCEPT)[:cut]
        self.plain = {verdict: plain + BE32.pack(verdict) for verdict in (NF_ACCEPT, NF_DROP)}
        self.batch = {verdict: batch + BE32.pack(verdict) for verdict in (NF_ACCEPT, NF_DROP)}
        # An accept with a payload: the netlink header (its length varies), then these bytes
        # up to the packet id, then the payload attribute.
        self._payload_middle = plain[NLMSGHDR.size :] + BE32.pack(NF_ACCEPT)

    def accept_with_payload(self, packet_id: int, payload: bytes) -> bytes:
        """``build_verdict(queue_num, packet_id, NF_ACCEPT, payload)``."""
        attr_len = NLATTR.size + len(payload)
        pad = -attr_len % 4  # counted in the message's length, as build_verdict counts it
        length = NLMSGHDR.size + len(self._payload_middle) + BE32.size + attr_len + pad
        return b"".join(
            (
                NLMSGHDR.pack(length, _TYPE_VERDICT, NLM_F_REQUEST, 0, 0),
                self._payload_middle,
                BE32.pack(packet_id),
                NLATTR.pack(attr_len, NFQA_PAYLOAD),
                payload,
                _PADDING[:pad],
            )
        )
