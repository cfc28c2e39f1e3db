"""Checksums (RFC 1071, RFC 1624) and the in-place TCP ack/seq/SACK shift, against scapy.

The oracle for every rewritten packet is scapy computing the checksum from scratch: either by
deleting the checksum and rebuilding (then the whole packet must come out byte-identical), or,
where scapy cannot rebuild malformed options faithfully, with scapy's own pseudo-header
checksum over the raw segment.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR, fragment, in4_chksum
from scapy.layers.inet import in4_pseudoheader as scapy_in4_pseudoheader
from scapy.layers.inet6 import IPv6, in6_chksum
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.utils import checksum as scapy_checksum

from coloproxy import seq
from coloproxy.errors import UsageError
from coloproxy.packet import Packet, parse_ethernet, parse_ip, shift
from coloproxy.packet.checksum import (
    ChecksumForm,
    classify_checksum,
    fold,
    internet_checksum,
    ipv4_header_checksum,
    ones_sum,
    packet_pseudo_header_sum,
    pseudo_header_sum,
    tcp_udp_checksum,
    update16,
    update32,
)
from coloproxy.packet.shift import ShiftResult, ShiftStatus, shift_tcp_ack, shift_tcp_seq

V4_GUEST, V4_PEER = "192.0.2.10", "198.51.100.20"
V6_GUEST, V6_PEER = "2001:db8::10", "2001:db8:1::20"
MOD = 2**32
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NOP = ("NOP", None)
TIMESTAMP = ("Timestamp", (0x01020304, 0xA0B0C0D0))


def ip_layer(version: int, **fields: Any) -> IP | IPv6:
    if version == 4:
        return IP(src=V4_GUEST, dst=V4_PEER, **fields)
    return IPv6(src=V6_GUEST, dst=V6_PEER, **fields)


def build(
    version: int,
    *,
    ack: int = 1000,
    seqno: int = 5000,
    flags: str = "A",
    options: Sequence[tuple[str, Any]] = (),
    payload: bytes = b"hello, secondary",
    chksum: int | None = None,
) -> bytearray:
    segment = TCP(sport=80, dport=40000, seq=seqno, ack=ack, flags=flags, options=list(options))
    if chksum is not None:
        segment.chksum = chksum
    return bytearray(bytes(ip_layer(version) / segment / payload))


def parsed(buf: bytearray) -> Packet:
    packet = parse_ip(buf)
    assert isinstance(packet, Packet), packet
    return packet


def dissect(buf: bytearray | bytes) -> IP | IPv6:
    raw = bytes(buf)
    return IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)


def sack_of(buf: bytearray) -> tuple[int, ...]:
    for name, value in dissect(buf)[TCP].options:
        if name == "SAck":
            return tuple(value)
    return ()


def field(buf: bytearray | bytes, offset: int) -> int:
    return int.from_bytes(buf[offset : offset + 2], "big")


def l4_of(buf: bytearray | bytes) -> int:
    return (buf[0] & 0x0F) * 4 if buf[0] >> 4 == 4 else 40


def tcp_checksum_in(buf: bytearray | bytes) -> int:
    return field(buf, l4_of(buf) + 16)


def rebuilt_by_scapy(buf: bytearray) -> bytes:
    """scapy's from-scratch view: delete the TCP checksum and build again."""
    packet = dissect(buf)
    del packet[TCP].chksum
    return bytes(packet)


def reference_checksum(buf: bytearray | bytes) -> int:
    """scapy's pseudo-header checksum over the raw segment (field zeroed); no rebuild, so it
    works for options scapy cannot rebuild byte for byte."""
    raw = bytes(buf)
    l4 = l4_of(raw)
    end = int.from_bytes(raw[2:4], "big") if raw[0] >> 4 == 4 else 40 + field(raw, 4)
    segment = raw[l4 : l4 + 16] + b"\0\0" + raw[l4 + 18 : end]
    ip = dissect(raw)
    if isinstance(ip, IP):
        return int(in4_chksum(socket.IPPROTO_TCP, ip, segment))
    return int(in6_chksum(socket.IPPROTO_TCP, ip, segment))


def partial_value(buf: bytearray) -> int:
    """What a guest with checksum offload leaves in the field: the folded pseudo-header sum."""
    ip = dissect(buf)
    length = len(bytes(ip[TCP]))
    if isinstance(ip, IP):
        header = bytes(scapy_in4_pseudoheader(socket.IPPROTO_TCP, ip, length))
    else:
        header = (
            socket.inet_pton(socket.AF_INET6, ip.src)
            + socket.inet_pton(socket.AF_INET6, ip.dst)
            + length.to_bytes(4, "big")
            + bytes([0, 0, 0, socket.IPPROTO_TCP])
        )
    return ~scapy_checksum(header) & 0xFFFF


def complete_partial(buf: bytearray) -> int:
    """What offload hardware does with a partial field: sum the segment, field included."""
    raw = bytes(buf)
    return int(scapy_checksum(raw[l4_of(raw) :]))


def with_field(buf: bytearray, value: int) -> bytearray:
    patched = bytearray(buf)
    offset = l4_of(patched) + 16
    patched[offset : offset + 2] = value.to_bytes(2, "big")
    return patched


# --- checksum module -------------------------------------------------------------------------


def test_rfc1071_numerical_example() -> None:
    """RFC 1071 section 3: the sum of 00 01 f2 03 f4 f5 f6 f7 is ddf2."""
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D
    assert ones_sum(memoryview(b"xx" + data)[2:]) == 0xDDF2


def test_ones_sum_edges() -> None:
    assert ones_sum(b"") == 0
    assert ones_sum(bytes(9)) == 0
    assert ones_sum(b"\x01") == 0x0100  # odd byte padded on the right
    assert ones_sum(b"\xff\xff") == 0xFFFF
    assert ones_sum(b"\x80\x00\x80\x00") == 0x0001  # end-around carry
    assert ones_sum(b"\x12\x34\xed\xcb") == 0xFFFF  # -0, never +0 for non-zero data
    assert fold(0) == 0
    assert fold(0xFFFF) == 0xFFFF
    assert fold(0x1FFFE) == 0xFFFF
    assert fold(0x10000) == 1


@HYPOTHESIS
@given(data=st.binary(max_size=1600), start=st.integers(0, 3))
def test_internet_checksum_matches_scapy(data: bytes, start: int) -> None:
    expected = scapy_checksum(data[start:])
    assert internet_checksum(data[start:]) == expected
    assert internet_checksum(bytearray(data)[start:]) == expected
    assert internet_checksum(memoryview(data)[start:]) == expected


@pytest.mark.parametrize("version", [4, 6])
def test_pseudo_header_sum_matches_scapy(version: int) -> None:
    buf = build(version, payload=b"odd length!")
    assert packet_pseudo_header_sum(parsed(buf)) == partial_value(buf)
    ip = dissect(buf)
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    direct = pseudo_header_sum(
        socket.inet_pton(family, ip.src), socket.inet_pton(family, ip.dst), 6, len(ip[TCP])
    )
    assert direct == partial_value(buf)


def _samples_with_checksums() -> list[tuple[str, bytes]]:
    options = [("MSS", 1460), NOP, ("WScale", 7), ("SAckOK", b"")]
    return [
        ("v4-tcp", bytes(ip_layer(4) / TCP(flags="PA", options=options) / b"abc")),
        ("v4-tcp-ip-options", bytes(IP(options=[IPOption_RR()]) / TCP() / b"a")),
        ("v4-udp-odd", bytes(ip_layer(4) / UDP(sport=1, dport=2) / b"12345")),
        ("v6-tcp", bytes(ip_layer(6) / TCP(flags="S", options=options))),
        ("v6-udp", bytes(ip_layer(6) / UDP(sport=1, dport=2) / (b"z" * 1400))),
        ("eth-vlan-v4-tcp", bytes(Ether() / Dot1Q(vlan=3) / ip_layer(4) / TCP() / b"q")),
    ]


@pytest.mark.parametrize(
    ("name", "frame"), _samples_with_checksums(), ids=[n for n, _ in _samples_with_checksums()]
)
def test_full_checksums_match_scapy(name: str, frame: bytes) -> None:
    parse = parse_ethernet if name.startswith("eth") else parse_ip
    packet = parse(frame)
    assert isinstance(packet, Packet)
    l4_offset = packet.l4 + (16 if packet.proto == socket.IPPROTO_TCP else 6)
    assert tcp_udp_checksum(packet) == field(frame, l4_offset)
    if packet.version == 4:
        assert ipv4_header_checksum(packet) == field(frame, packet.l3 + 10)
    # The fields' own content does not matter: they are taken as zero.
    garbled = bytearray(frame)
    garbled[l4_offset : l4_offset + 2] = b"\xde\xad"
    if packet.version == 4:
        garbled[packet.l3 + 10 : packet.l3 + 12] = b"\xbe\xef"
    garbled_packet = parse(bytes(garbled))
    assert isinstance(garbled_packet, Packet)
    assert tcp_udp_checksum(garbled_packet) == field(frame, l4_offset)
    if packet.version == 4:
        assert ipv4_header_checksum(garbled_packet) == field(frame, packet.l3 + 10)


def _forcing_word(checksum_with_zero_word: int, target: int) -> int:
    """The value of one aligned zero word that turns the checksum into ``target``."""
    return fold((~target & 0xFFFF) + checksum_with_zero_word)


def test_udp_checksum_zero_is_sent_as_ffff() -> None:
    """RFC 768: a computed 0 goes on the wire as 0xFFFF (0 means "no checksum")."""
    base = ip_layer(4) / UDP(sport=1, dport=2)
    zero_word = int(IP(bytes(base / b"\0\0"))[UDP].chksum)
    word = _forcing_word(zero_word, 0)
    frame = bytes(base / word.to_bytes(2, "big"))
    assert IP(frame)[UDP].chksum == 0xFFFF  # scapy agrees
    packet = parse_ip(frame)
    assert isinstance(packet, Packet)
    assert tcp_udp_checksum(packet) == 0xFFFF


def test_tcp_checksum_can_be_zero_never_ffff() -> None:
    base = ip_layer(4) / TCP(flags="A")
    zero_word = int(IP(bytes(base / b"\0\0"))[TCP].chksum)
    frame = bytes(base / _forcing_word(zero_word, 0).to_bytes(2, "big"))
    assert IP(frame)[TCP].chksum == 0
    packet = parse_ip(frame)
    assert isinstance(packet, Packet)
    assert tcp_udp_checksum(packet) == 0


def test_rfc1624_worked_example() -> None:
    """RFC 1624 section 4: eqn. 3 gives 0x0000 where eqn. 2 gives the wrong 0xFFFF."""
    assert update16(0xDD2F, 0x5555, 0x3285) == 0x0000
    # Recomputation with "the other octets" 0xCD7A agrees.
    assert internet_checksum(bytes.fromhex("cd7a3285")) == 0x0000


@HYPOTHESIS
@given(
    data=st.binary(min_size=4, max_size=64),
    position=st.integers(0, 31),
    new=st.integers(0, MOD - 1),
)
def test_update32_equals_recomputation(data: bytes, position: int, new: int) -> None:
    # A fixed non-zero word stands for the pseudo-header's protocol, as in every TCP checksum.
    covered = bytearray(b"\x00\x06" + data)
    offset = 2 + (position * 2) % (len(data) - 3 if len(data) > 4 else 1)
    offset -= offset % 2
    old = int.from_bytes(covered[offset : offset + 4], "big")
    before = internet_checksum(covered)
    covered[offset : offset + 4] = new.to_bytes(4, "big")
    assert update32(before, old, new) == internet_checksum(covered)
    high_old, high_new = old >> 16, new >> 16
    low_old, low_new = old & 0xFFFF, new & 0xFFFF
    assert update16(update16(before, high_old, high_new), low_old, low_new) == internet_checksum(
        covered
    )


def test_checksum_functions_refuse_misuse() -> None:
    icmp = parse_ip(bytes(ip_layer(4) / ICMP()))
    arp = parse_ethernet(bytes(Ether() / ARP()))
    first_fragment = parse_ip(bytes(fragment(ip_layer(4) / TCP() / (b"x" * 64), 24)[0]))
    v6 = parse_ip(bytes(ip_layer(6) / TCP()))
    for packet in (icmp, arp, first_fragment):
        assert isinstance(packet, Packet)
        with pytest.raises(UsageError):
            tcp_udp_checksum(packet)
        with pytest.raises(UsageError):
            classify_checksum(packet)
    assert isinstance(v6, Packet)
    with pytest.raises(UsageError):
        ipv4_header_checksum(v6)


@pytest.mark.parametrize("version", [4, 6])
def test_classify_checksum(version: int) -> None:
    full = build(version)
    assert classify_checksum(parsed(full)) is ChecksumForm.FULL
    partial = with_field(full, partial_value(full))
    assert classify_checksum(parsed(partial)) is ChecksumForm.PARTIAL
    garbage = with_field(full, tcp_checksum_in(full) ^ 0x0101)
    assert classify_checksum(parsed(garbage)) is ChecksumForm.FULL


@pytest.mark.parametrize("version", [4, 6])
def test_full_checksum_that_equals_the_pseudo_header_sum_is_full(version: int) -> None:
    """The 1-in-65536 coincidence: the cheap test says "partial", verification says "full"."""
    probe = build(version, payload=b"\0\0")
    target = partial_value(probe)
    word = _forcing_word(tcp_checksum_in(probe), target)
    buf = build(version, payload=word.to_bytes(2, "big"))
    assert tcp_checksum_in(buf) == target == partial_value(buf)
    assert classify_checksum(parsed(buf)) is ChecksumForm.FULL
    result = shift_tcp_ack(buf, parsed(buf), 12345)
    assert result == ShiftResult(ShiftStatus.SHIFTED, 1)
    assert tcp_checksum_in(buf) == reference_checksum(buf)


# --- shifting acknowledgement numbers and SACK blocks -------------------------------------


def sack(*edges: int) -> tuple[str, tuple[int, ...]]:
    return ("SAck", edges)


NEAR_WRAP = MOD - 100
LAYOUTS: dict[str, list[tuple[str, Any]]] = {
    "no-options": [],
    "timestamps-only": [NOP, NOP, TIMESTAMP],
    "sack-1-aligned": [NOP, NOP, sack(NEAR_WRAP, 50)],
    "sack-2-odd-offset": [NOP, sack(1000, 2000, 3000, 4000)],
    "sack-3-after-timestamps": [NOP, NOP, TIMESTAMP, NOP, NOP, sack(10, 20, 30, 40, 50, 60)],
    "sack-3-odd-after-timestamps": [TIMESTAMP, NOP, sack(MOD - 1, 0, 7, 8, 9, 10)],
    "sack-4": [NOP, NOP, sack(1, 2, 3, 4, 5, 6, 7, 8)],
    "sack-4-odd": [NOP, sack(MOD - 4, MOD - 3, MOD - 2, MOD - 1, 0, 1, 2, 3)],
    "sack-1-then-timestamps": [sack(77, 88), NOP, NOP, TIMESTAMP],
}
DELTAS = [0, 1, -1, 1000, -1000, 0xFFFF, 0x10000, 2**31, MOD - 1, MOD + 5, -(MOD - 1), 3 * MOD]


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=str)
@pytest.mark.parametrize("delta", DELTAS, ids=lambda delta: f"delta{delta:+d}")
def test_shift_ack_and_sack(version: int, layout: str, delta: int) -> None:
    options = LAYOUTS[layout]
    ack = MOD - 7 if delta > 0 else 3  # cross the wrap in the direction of the shift
    buf = build(version, ack=ack, options=options, payload=b"odd payload")
    sack_before = sack_of(buf)
    packet = parsed(buf)
    result = shift_tcp_ack(buf, packet, delta)
    assert result == ShiftResult(ShiftStatus.SHIFTED, 1 + len(sack_before))
    assert result.complete
    after = dissect(buf)[TCP]
    assert after.ack == (ack + delta) % MOD == packet.ack
    assert sack_of(buf) == tuple((edge + delta) % MOD for edge in sack_before)
    assert after.seq == 5000
    assert bytes(buf) == rebuilt_by_scapy(buf)
    assert tcp_checksum_in(buf) == reference_checksum(buf)
    reparsed = parsed(buf)
    assert reparsed.ack == packet.ack


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("delta", [0x1234, -(2**31), MOD - 1])
def test_shift_seq_leaves_sack_and_ack(version: int, delta: int) -> None:
    options = LAYOUTS["sack-3-odd-after-timestamps"]
    buf = build(version, seqno=MOD - 1, ack=42, options=options)
    sack_before = sack_of(buf)
    packet = parsed(buf)
    assert shift_tcp_seq(buf, packet, delta) == ShiftResult(ShiftStatus.SHIFTED, 1)
    after = dissect(buf)[TCP]
    assert after.seq == (MOD - 1 + delta) % MOD == packet.seq
    assert after.ack == 42
    assert sack_of(buf) == sack_before
    assert bytes(buf) == rebuilt_by_scapy(buf)


@pytest.mark.parametrize("flags", ["S", "R", "", "F"])
def test_ack_field_untouched_without_ack_flag(flags: str) -> None:
    """Without ACK the field means nothing and is left; SACK blocks are shifted regardless."""
    bare = build(4, ack=77, flags=flags)
    assert shift_tcp_ack(bare, parsed(bare), 1000) == ShiftResult(ShiftStatus.NOTHING_TO_SHIFT, 0)
    assert bare == build(4, ack=77, flags=flags)
    with_sack = build(4, ack=77, flags=flags, options=[NOP, NOP, sack(100, 200)])
    assert shift_tcp_ack(with_sack, parsed(with_sack), 1000) == ShiftResult(ShiftStatus.SHIFTED, 2)
    assert dissect(with_sack)[TCP].ack == 77
    assert sack_of(with_sack) == (1100, 1200)
    assert bytes(with_sack) == rebuilt_by_scapy(with_sack)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("when", ["before", "after"])
def test_checksum_zero_before_or_after(version: int, when: str) -> None:
    """A checksum of 0x0000 on either side of the update (the RFC 1624 pitfall)."""
    delta = 0x01000100
    options = [NOP, sack(10, 20)]
    if when == "before":
        probe = build(version, options=options, payload=b"\0\0")
    else:  # force the zero onto the packet as it will be after the shift
        shifted = [NOP, sack(10 + delta, 20 + delta)]
        probe = build(version, ack=1000 + delta, options=shifted, payload=b"\0\0")
    word = _forcing_word(tcp_checksum_in(probe), 0).to_bytes(2, "big")
    buf = build(version, options=options, payload=word)
    if when == "before":
        assert tcp_checksum_in(buf) == 0
    shift_tcp_ack(buf, parsed(buf), delta, checksum=ChecksumForm.FULL)
    if when == "after":
        assert tcp_checksum_in(buf) == 0
    assert bytes(buf) == rebuilt_by_scapy(buf)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("declared", [None, ChecksumForm.PARTIAL])
def test_partial_checksum_stays_partial(version: int, declared: ChecksumForm | None) -> None:
    """An offloaded segment: the field holds the pseudo-header sum, which the shift does not
    change; once completed (as the NIC or the kernel would) it is the right full checksum."""
    options = LAYOUTS["sack-3-odd-after-timestamps"]
    full = build(version, ack=NEAR_WRAP, options=options, payload=b"offloaded")
    buf = with_field(full, partial_value(full))
    partial_before = tcp_checksum_in(buf)
    assert shift_tcp_ack(buf, parsed(buf), 5000, checksum=declared).fields == 7
    assert shift_tcp_seq(buf, parsed(buf), -5000, checksum=declared).fields == 1
    assert tcp_checksum_in(buf) == partial_before == partial_value(buf)
    assert complete_partial(buf) == reference_checksum(buf)
    assert complete_partial(buf) == dissect(rebuilt_by_scapy(buf))[TCP].chksum


def test_rfc1624_on_a_partial_checksum_would_be_wrong() -> None:
    """Why PARTIAL exists: updating the pseudo-header sum as if it were final leaves a field
    that completes to the checksum of the *old* segment."""
    full = build(4, ack=1000, options=[NOP, NOP, sack(1, 2)])
    buf = with_field(full, partial_value(full))
    shift_tcp_ack(buf, parsed(buf), 1000, checksum=ChecksumForm.FULL)
    assert complete_partial(buf) != reference_checksum(buf)
    assert complete_partial(buf) == tcp_checksum_in(full)


@pytest.mark.parametrize("version", [4, 6])
def test_wrong_checksum_stays_exactly_as_wrong(version: int) -> None:
    """A corrupted segment must still fail verification at the receiver after the shift."""
    buf = build(version, options=[NOP, sack(5, 6)])
    buf = with_field(buf, tcp_checksum_in(buf) ^ 0x00F0)
    error_before = (tcp_checksum_in(buf) - reference_checksum(buf)) % 0xFFFF
    shift_tcp_ack(buf, parsed(buf), 99999, checksum=ChecksumForm.FULL)
    error_after = (tcp_checksum_in(buf) - reference_checksum(buf)) % 0xFFFF
    assert error_after == error_before != 0


def test_ethernet_framed_packet_with_vlan() -> None:
    frame = bytearray(
        bytes(
            Ether()
            / Dot1Q(vlan=12)
            / ip_layer(6)
            / TCP(flags="A", ack=9, options=[NOP, sack(1, 2)])
            / b"x"
        )
    )
    packet = parse_ethernet(frame)
    assert isinstance(packet, Packet)
    assert shift_tcp_ack(frame, packet, 10) == ShiftResult(ShiftStatus.SHIFTED, 3)
    inner = bytearray(frame[18:])
    assert dissect(inner)[TCP].ack == 19
    assert sack_of(inner) == (11, 12)
    assert bytes(inner) == rebuilt_by_scapy(inner)


# --- malformed options: stop, report, keep the checksum right --------------------------------


def with_raw_options(version: int, options: bytes, *, flags: str = "A") -> bytearray:
    """A segment whose option bytes are exactly ``options`` and whose checksum is correct."""
    assert len(options) % 4 == 0
    buf = build(version, flags=flags, options=[NOP] * len(options), payload=b"data!")
    start = l4_of(buf) + 20
    buf[start : start + len(options)] = options
    return with_field(buf, reference_checksum(buf))


def raw_sack(*edges: int, length: int | None = None) -> bytes:
    body = b"".join(edge.to_bytes(4, "big") for edge in edges)
    return bytes([5, 2 + len(body) if length is None else length]) + body


MALFORMED: dict[str, tuple[bytes, ShiftStatus, int, list[int]]] = {
    # name: (options, status, fields shifted, option offsets of edges that must be shifted)
    "length-0-hides-later-sack": (
        b"\x08\x00\x01\x01" + raw_sack(100, 200) + b"\x01\x01",
        ShiftStatus.BAD_TCP_OPTIONS,
        1,
        [],
    ),
    "length-1": (
        b"\x05\x01" + raw_sack(100, 200) + b"\x01" * 4,
        ShiftStatus.BAD_TCP_OPTIONS,
        1,
        [],
    ),
    "sack-then-length-past-header": (
        b"\x01\x01" + raw_sack(100, 200) + b"\x03\xc8\x00\x00",
        ShiftStatus.BAD_TCP_OPTIONS,
        3,
        [4, 8],
    ),
    "sack-running-past-header": (
        b"\x01\x01" + raw_sack(100, 200, length=18),
        ShiftStatus.BAD_TCP_OPTIONS,
        1,
        [],
    ),
    "sack-length-not-2-plus-8n-then-good-sack": (
        raw_sack(100, 200, length=12) + b"\x00\x00" + b"\x01\x01" + raw_sack(300, 400),
        ShiftStatus.BAD_TCP_OPTIONS,
        3,
        [16, 20],
    ),
    "kind-without-length-byte": (b"\x01\x01\x01\x08", ShiftStatus.BAD_TCP_OPTIONS, 1, []),
    "eol-then-garbage-like-sack": (
        b"\x00" + raw_sack(100, 200) + b"\x00",
        ShiftStatus.SHIFTED,
        1,
        [],
    ),
}


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_options(version: int, name: str) -> None:
    options, status, fields, shifted_edges = MALFORMED[name]
    buf = with_raw_options(version, options)
    before = bytes(buf)
    start = l4_of(buf) + 20
    result = shift_tcp_ack(buf, parsed(buf), 0x100)
    assert result == ShiftResult(status, fields)
    assert result.complete is (status is ShiftStatus.SHIFTED)
    assert tcp_checksum_in(buf) == reference_checksum(buf)
    assert dissect(buf)[TCP].ack == 1000 + 0x100
    expected = bytearray(before)
    for edge in shifted_edges:
        value = int.from_bytes(before[start + edge : start + edge + 4], "big")
        expected[start + edge : start + edge + 4] = (value + 0x100).to_bytes(4, "big")
    # Nothing but the ack, the listed edges and the checksum changed.
    l4 = l4_of(buf)
    expected[l4 + 8 : l4 + 12] = buf[l4 + 8 : l4 + 12]
    expected[l4 + 16 : l4 + 18] = buf[l4 + 16 : l4 + 18]
    assert buf == expected


def test_malformed_options_without_ack_flag_touch_nothing() -> None:
    buf = with_raw_options(4, b"\x08\x00\x00\x00", flags="S")
    before = bytes(buf)
    assert shift_tcp_ack(buf, parsed(buf), 5) == ShiftResult(ShiftStatus.BAD_TCP_OPTIONS, 0)
    assert bytes(buf) == before


# --- misuse raises, fragments are data --------------------------------------------------------


def test_misuse_raises_usage_error() -> None:
    buf = build(4)
    packet = parsed(buf)
    with pytest.raises(UsageError):
        shift_tcp_ack(bytearray(buf), packet, 1)  # a copy, not the parsed buffer
    immutable = bytes(buf)
    # Compiled (coloproxy/variant.py), the annotation is checked at the call: TypeError.
    compiled = (shift.__file__ or "").endswith(".so")
    with pytest.raises(TypeError if compiled else UsageError, match="bytearray"):
        shift_tcp_seq(immutable, parse_ip(immutable), 1)  # type: ignore[arg-type]
    udp = bytearray(bytes(ip_layer(6) / UDP() / b"x"))
    with pytest.raises(UsageError):
        shift_tcp_ack(udp, parsed(udp), 1)
    arp = bytearray(bytes(Ether() / ARP()))
    arp_packet = parse_ethernet(arp)
    assert isinstance(arp_packet, Packet)
    with pytest.raises(UsageError):
        shift_tcp_seq(arp, arp_packet, 1)
    del buf[-3:]
    with pytest.raises(UsageError):
        shift_tcp_ack(buf, packet, 1)


def test_fragment_is_reported_not_rewritten() -> None:
    first = fragment(ip_layer(4) / TCP(flags="A", ack=5) / (b"y" * 64), 32)[0]
    buf = bytearray(bytes(first))
    assert shift_tcp_ack(buf, parsed(buf), 1) == ShiftResult(ShiftStatus.FRAGMENT, 0)
    assert shift_tcp_seq(buf, parsed(buf), 1) == ShiftResult(ShiftStatus.FRAGMENT, 0)
    assert bytes(buf) == bytes(first)


# --- property: incremental == from scratch ------------------------------------------------


@HYPOTHESIS
@given(
    version=st.sampled_from([4, 6]),
    ack=st.integers(0, MOD - 1),
    seqno=st.integers(0, MOD - 1),
    delta=st.integers(-(2**33), 2**33),
    payload=st.binary(max_size=64),
    edges=st.lists(st.integers(0, MOD - 1), max_size=3).map(lambda left: left * 2),
    nops=st.integers(0, 3),
    with_ack=st.booleans(),
)
def test_incremental_equals_full(
    version: int,
    ack: int,
    seqno: int,
    delta: int,
    payload: bytes,
    edges: list[int],
    nops: int,
    with_ack: bool,
) -> None:
    options: list[tuple[str, Any]] = [NOP] * nops
    if edges:
        options.append(sack(*edges))
    buf = build(
        version,
        ack=ack,
        seqno=seqno,
        flags="A" if with_ack else "S",
        options=options,
        payload=payload,
    )
    shift_tcp_ack(buf, parsed(buf), delta, checksum=ChecksumForm.FULL)
    assert tcp_checksum_in(buf) == reference_checksum(buf) == tcp_udp_checksum(parsed(buf))
    assert sack_of(buf) == tuple(seq.add(edge, delta) for edge in edges)
    assert dissect(buf)[TCP].ack == (seq.add(ack, delta) if with_ack else ack)
    shift_tcp_seq(buf, parsed(buf), delta)
    assert tcp_checksum_in(buf) == reference_checksum(buf)
    assert dissect(buf)[TCP].seq == seq.add(seqno, delta)
