"""Synthetic guest egress for the comparator benchmark: primary and secondary Ethernet frames.

Theory of operation
-------------------
Every workload is what a guest at 10.0.0.1 sends to clients 10.0.0.x, once as the primary VM
produced it and once as the secondary did. Both sides carry the same payload bytes, so a
correct comparator releases every primary frame and asks for no checkpoint.

TCP connections start with the guest's SYN-ACK on each side, with a different ISN per side
(real replicas pick their own), followed by ACK|PSH data segments. The acknowledgement number
is the same constant on both sides: the client sends nothing after its handshake ACK.

Frames are built with ``struct`` and precomputed per-flow headers, not scapy (which is
orders of magnitude slower per packet; docs/invariants.md). Checksums are real: IPv4 header,
TCP and UDP (pseudo-header included), computed by the small helper below, so a parser that
verifies them, or a pcap viewer, sees valid frames.

Payload is a window into one seeded pseudo-random block, indexed by the flow's stream offset,
so it is deterministic, identical on both sides and different from segment to segment.

``secondary_in_primary_seq_space`` builds the secondary frames the way QEMU's colo-compare
receives them: QEMU's filter-rewriter on the secondary host shifts every secondary data
segment's sequence number into the primary's space (it leaves the SYN-ACK alone), and
colo-compare compares absolute sequence numbers. Our comparator learns the ISNs itself and
gets the secondary's own numbers.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

GUEST_MAC: Final = bytes.fromhex("525400000001")
CLIENT_MAC: Final = bytes.fromhex("525400000002")
GUEST_IP: Final = bytes([10, 0, 0, 1])
GUEST_TCP_PORT: Final = 5201
GUEST_UDP_PORT: Final = 5353
CLIENT_PORT_BASE: Final = 40000

FULL_PAYLOAD: Final = 1448  # an MSS of 1460 less the 12-byte timestamp option, as Linux sends
SMALL_PAYLOAD: Final = 64
TCP_CONNECTIONS_MANY: Final = 16
UDP_FLOWS: Final = 4
# Resegmented secondary: segment sizes drawn uniformly from this range (fixed seed), as a
# replica whose TSO/GSO or Nagle timing differs would cut the same stream.
RESEG_MIN: Final = 400
RESEG_MAX: Final = 1448

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10

_PROTO_TCP: Final = 6
_PROTO_UDP: Final = 17
_PATTERN_LEN: Final = 1 << 20  # not a multiple of 1448, so segments see shifting windows
_SEED: Final = 20240607

_ETH_IPV4: Final = b"\x08\x00"
_IPV4: Final = struct.Struct("!BBHHHBBH4s4s")
_TCP: Final = struct.Struct("!HHIIBBHHH")
_UDP: Final = struct.Struct("!HHHH")


def internet_checksum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 checksum of ``data`` (padded to even length) plus ``initial`` (a word sum).

    Summing 16-bit words modulo 0xFFFF equals reducing the whole big-endian integer modulo
    0xFFFF (2**16 is 1 modulo 0xFFFF), which CPython does in C: about 4 us for 1468 bytes
    here, against about 14 us for summing struct.unpack of the 16-bit words.
    """
    if len(data) & 1:
        data += b"\x00"
    total = int.from_bytes(data, "big") + initial
    if total == 0:
        return 0xFFFF
    remainder = total % 0xFFFF
    # A non-zero sum that is a multiple of 0xFFFF folds to 0xFFFF, whose complement is 0.
    return 0 if remainder == 0 else 0xFFFF - remainder


def _word_sum(data: bytes) -> int:
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


class _Payload:
    """Stream bytes at any offset: a seeded random block, repeated."""

    def __init__(self) -> None:
        block = random.Random(_SEED).randbytes(_PATTERN_LEN)
        self._doubled = block + block[: 2 * FULL_PAYLOAD]

    def at(self, offset: int, length: int) -> bytes:
        start = offset % _PATTERN_LEN
        return self._doubled[start : start + length]


_PAYLOAD: _Payload | None = None


def _payload() -> _Payload:
    global _PAYLOAD
    if _PAYLOAD is None:
        _PAYLOAD = _Payload()
    return _PAYLOAD


class _Flow:
    """One guest -> client flow with its precomputed header pieces."""

    def __init__(self, index: int, proto: int) -> None:
        self.index = index
        self.proto = proto
        self.client_ip = bytes([10, 0, 0, 2 + index % 250])
        self.guest_port = GUEST_TCP_PORT if proto == _PROTO_TCP else GUEST_UDP_PORT
        self.client_port = CLIENT_PORT_BASE + index
        self.eth = CLIENT_MAC + GUEST_MAC + _ETH_IPV4
        # Pseudo-header without the length: source, destination, protocol (RFC 793 / 768).
        self.pseudo_sum = _word_sum(GUEST_IP + self.client_ip) + proto
        # Each flow reads a different region of the payload block.
        self.payload_base = index * 104729
        self.ip_id = index * 1000

    def _ip_header(self, l4_length: int) -> bytes:
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        fields = (0x45, 0, 20 + l4_length, self.ip_id, 0x4000, 64, self.proto)
        header = _IPV4.pack(*fields, 0, GUEST_IP, self.client_ip)
        return _IPV4.pack(*fields, internet_checksum(header), GUEST_IP, self.client_ip)

    def tcp(self, seq: int, ack: int, flags: int, payload: bytes) -> bytes:
        length = 20 + len(payload)
        ports = (self.guest_port, self.client_port, seq & 0xFFFFFFFF, ack, 5 << 4, flags, 64240)
        header = _TCP.pack(*ports, 0, 0)
        checksum = internet_checksum(header + payload, self.pseudo_sum + length)
        return self.eth + self._ip_header(length) + _TCP.pack(*ports, checksum, 0) + payload

    def udp(self, payload: bytes) -> bytes:
        length = 8 + len(payload)
        header = _UDP.pack(self.guest_port, self.client_port, length, 0)
        checksum = internet_checksum(header + payload, self.pseudo_sum + length)
        udp = _UDP.pack(self.guest_port, self.client_port, length, checksum or 0xFFFF)
        return self.eth + self._ip_header(length) + udp + payload


@dataclass
class Workload:
    """Frames of both sides plus the payload length of each frame (for interleaving)."""

    name: str
    description: str
    primary_frames: list[bytes]
    secondary_frames: list[bytes]
    primary_payload_lengths: list[int]
    secondary_payload_lengths: list[int]
    payload_bytes_total: int  # primary payload bytes: the Gbit/s numerator

    def as_tuple(self) -> tuple[list[bytes], list[bytes], str, int]:
        return (
            self.primary_frames,
            self.secondary_frames,
            self.description,
            self.payload_bytes_total,
        )

    def schedule(self) -> list[tuple[bool, int]]:
        """(is_primary, index) in feeding order: both sides advance by stream position.

        The side whose next frame ends at the lower cumulative payload offset goes next; the
        primary wins ties. Identical workloads come out as P, S, P, S, ...
        """
        order: list[tuple[bool, int]] = []
        # Cumulative end offset of each frame, with an end-of-list sentinel no frame reaches.
        done = float("inf")
        primary_ends = [*itertools.accumulate(self.primary_payload_lengths), done]
        secondary_ends = [*itertools.accumulate(self.secondary_payload_lengths), done]
        primary_index = secondary_index = 0
        primary_count = len(self.primary_payload_lengths)
        secondary_count = len(self.secondary_payload_lengths)
        while primary_index < primary_count or secondary_index < secondary_count:
            if primary_ends[primary_index] <= secondary_ends[secondary_index]:
                order.append((True, primary_index))
                primary_index += 1
            else:
                order.append((False, secondary_index))
                secondary_index += 1
        return order


class _TcpSide:
    """One side's view of one TCP connection: its ISN and how far it has sent."""

    def __init__(self, flow: _Flow, isn: int, wire_isn: int) -> None:
        self.flow = flow
        self.isn = isn  # the ISN in the SYN-ACK
        self.wire_isn = wire_isn  # the ISN data segments are numbered from (rewritten or not)
        self.ack = 0x10000001 + flow.index * 7
        self.offset = 0

    def syn_ack(self) -> bytes:
        return self.flow.tcp(self.isn, self.ack, TCP_SYN | TCP_ACK, b"")

    def segment(self, length: int) -> bytes:
        data = _payload().at(self.flow.payload_base + self.offset, length)
        frame = self.flow.tcp(self.wire_isn + 1 + self.offset, self.ack, TCP_ACK | TCP_PSH, data)
        self.offset += length
        return frame


def _isns(index: int) -> tuple[int, int]:
    # Far apart and on both sides of 2**31 so modular arithmetic is exercised.
    primary_isn = (0x1234_5678 + index * 0x0101_0101) & 0xFFFFFFFF
    secondary_isn = (0xF00D_0000 + index * 0x0301_0203) & 0xFFFFFFFF
    return primary_isn, secondary_isn


def _tcp_workload(
    name: str,
    description: str,
    segments: int,
    connections: int,
    payload: int,
    rewritten: bool,
    secondary_cuts: Callable[[int], list[int]] | None = None,
) -> Workload:
    primary_frames: list[bytes] = []
    secondary_frames: list[bytes] = []
    primary_lengths: list[int] = []
    secondary_lengths: list[int] = []
    sides: list[tuple[_TcpSide, _TcpSide]] = []
    for index in range(connections):
        primary_isn, secondary_isn = _isns(index)
        # Separate flow objects per side: each side numbers its own IP ids.
        primary = _TcpSide(_Flow(index, _PROTO_TCP), primary_isn, primary_isn)
        secondary_wire = primary_isn if rewritten else secondary_isn
        secondary = _TcpSide(_Flow(index, _PROTO_TCP), secondary_isn, secondary_wire)
        sides.append((primary, secondary))
        primary_frames.append(primary.syn_ack())
        secondary_frames.append(secondary.syn_ack())
        primary_lengths.append(0)
        secondary_lengths.append(0)
    if secondary_cuts is None:
        for number in range(segments):
            primary, secondary = sides[number % connections]
            primary_frames.append(primary.segment(payload))
            secondary_frames.append(secondary.segment(payload))
        primary_lengths.extend([payload] * segments)
        secondary_lengths.extend([payload] * segments)
    else:
        for number in range(segments):
            primary, _ = sides[number % connections]
            primary_frames.append(primary.segment(payload))
        primary_lengths.extend([payload] * segments)
        for index, (_, secondary) in enumerate(sides):
            stream_length = sides[index][0].offset
            for length in secondary_cuts(stream_length):
                secondary_frames.append(secondary.segment(length))
                secondary_lengths.append(length)
    return Workload(
        name,
        description,
        primary_frames,
        secondary_frames,
        primary_lengths,
        secondary_lengths,
        payload * segments,
    )


def _random_cuts(total: int) -> list[int]:
    chooser = random.Random(_SEED + 1)
    cuts: list[int] = []
    remaining = total
    while remaining > 0:
        length = min(chooser.randint(RESEG_MIN, RESEG_MAX), remaining)
        cuts.append(length)
        remaining -= length
    return cuts


def _udp_workload(name: str, description: str, datagrams: int, flows: int) -> Workload:
    primary_flows = [_Flow(index, _PROTO_UDP) for index in range(flows)]
    secondary_flows = [_Flow(index, _PROTO_UDP) for index in range(flows)]
    offsets = [0] * flows
    primary_frames: list[bytes] = []
    secondary_frames: list[bytes] = []
    for number in range(datagrams):
        index = number % flows
        data = _payload().at(primary_flows[index].payload_base + offsets[index], FULL_PAYLOAD)
        offsets[index] += FULL_PAYLOAD
        primary_frames.append(primary_flows[index].udp(data))
        secondary_frames.append(secondary_flows[index].udp(data))
    lengths = [FULL_PAYLOAD] * datagrams
    return Workload(
        name,
        description,
        primary_frames,
        secondary_frames,
        lengths,
        list(lengths),
        FULL_PAYLOAD * datagrams,
    )


DESCRIPTIONS: Final = {
    "tcp-1": f"1 TCP connection, {FULL_PAYLOAD} B segments, secondary identical",
    "tcp-16": f"{TCP_CONNECTIONS_MANY} TCP connections round-robin, {FULL_PAYLOAD} B segments",
    "tcp-1-reseg": (
        f"1 TCP connection, primary {FULL_PAYLOAD} B segments, secondary same bytes cut "
        f"at random sizes {RESEG_MIN}-{RESEG_MAX} B"
    ),
    "udp": f"{UDP_FLOWS} UDP flows round-robin, {FULL_PAYLOAD} B datagrams",
    "tcp-64": f"1 TCP connection, {SMALL_PAYLOAD} B segments",
}
NAMES: Final = tuple(DESCRIPTIONS)


def make_workload(
    name: str, packets: int, *, secondary_in_primary_seq_space: bool = False
) -> Workload:
    """Build workload ``name`` with ``packets`` primary data frames (plus SYN-ACKs for TCP).

    ``secondary_in_primary_seq_space``: number the secondary's data segments from the
    primary's ISN, as QEMU's filter-rewriter does before colo-compare sees them.
    """
    if packets <= 0:
        raise ValueError(f"packets must be positive, got {packets}")
    rewritten = secondary_in_primary_seq_space
    description = DESCRIPTIONS.get(name)
    if description is None:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(NAMES)}")
    if name == "tcp-1":
        return _tcp_workload(name, description, packets, 1, FULL_PAYLOAD, rewritten)
    if name == "tcp-16":
        connections = TCP_CONNECTIONS_MANY
        return _tcp_workload(name, description, packets, connections, FULL_PAYLOAD, rewritten)
    if name == "tcp-1-reseg":
        return _tcp_workload(
            name, description, packets, 1, FULL_PAYLOAD, rewritten, secondary_cuts=_random_cuts
        )
    if name == "udp":
        return _udp_workload(name, description, packets, UDP_FLOWS)
    return _tcp_workload(name, description, packets, 1, SMALL_PAYLOAD, rewritten)


def build(name: str, packets: int) -> tuple[list[bytes], list[bytes], str, int]:
    """(primary_frames, secondary_frames, description, payload_bytes_total) for ``name``."""
    return make_workload(name, packets).as_tuple()
