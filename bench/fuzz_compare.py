#!/usr/bin/env python3
"""Fuzz the comparator and check output commit on every release.

    python3 bench/fuzz_compare.py [--frames N] [--seed S] [--quiet]

Rounds of generated guest output go to fresh comparators with random settings (small bounds
included): TCP connections (several incarnations of one four-tuple, each side cutting the
stream its own way, FIN, RST after FIN, urgent data, resends with the same and with other
bytes), UDP flows, ICMP and ICMPv6 echo sessions, IPv4 fragments; then each side's frames are
mutated (truncation, flipped bits in headers and payload, reordering, duplication, loss) and
the two sides interleaved with a random lag. Half the rounds feed every frame in place, as
the chardev transport does (``feed_many`` on a ``Frames`` with other bytes around the frames),
each side's in receives of up to 32 frames.
The harness plays the engine: it starts a checkpoint some frames after the comparator asks
for one (and now and then unasked, as a periodic checkpoint would), completes it some frames
later, and at the end of each round flushes with a last checkpoint.

What is checked, for every event (the output-commit property):

* a primary packet is never dropped, a secondary one never released, nothing released twice;
* a release by checkpoint comes only from ``checkpoint_completed``;
* a release as matched is justified by what the secondary sent in the same epoch, by a
  reference model independent of the comparator's alignment: its own parser, the ISNs the
  generator chose (not the ones the comparator learned), every TCP payload byte present at the
  same stream offset of the same connection incarnation, a FIN at the same offset, a RST, a
  SYN, an urgent pointer naming the same offset; a datagram equal to one the secondary sent
  and no other release consumed;
* at the end of each round every primary packet fed was released exactly once.

It prints, never asserts; the exit status is 1 if a check failed (the first violations are
printed with the frame), 0 otherwise. ``run`` is imported by tests/test_compare_fuzz.py for a
short run in the normal suite.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

BENCH_DIR: Final = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT: Final = os.path.dirname(BENCH_DIR)
if REPO_ROOT not in sys.path:  # run from anywhere, installed or not
    sys.path.insert(0, REPO_ROOT)

from coloproxy.compare import (  # noqa: E402
    CheckpointNeeded,
    Comparator,
    CompareConfig,
    Drop,
    Framing,
    Release,
    ReleaseReason,
    SecondarySeq,
    Side,
)
from coloproxy.protocol.colo_frames import Frames  # noqa: E402

DEFAULT_FRAMES: Final = 1_000_000
MAX_VIOLATIONS_SHOWN: Final = 10

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
MACS: Final = bytes.fromhex("525400000002525400000001")
GUEST4: Final = bytes([10, 0, 0, 1])
GUEST6: Final = bytes.fromhex("fd000000000000000000000000000001")
_IPV4: Final = struct.Struct("!BBHHHBBH4s4s")
_IPV6: Final = struct.Struct("!IHBB16s16s")
_TCP: Final = struct.Struct("!HHIIBBHHH")
_UDP: Final = struct.Struct("!HHHH")
_ICMP: Final = struct.Struct("!BBHHH")
ECHO_TYPES: Final = {1: (0, 8), 58: (128, 129)}


# -- frames ----------------------------------------------------------------------------------


def ip(src: bytes, dst: bytes, proto: int, body: bytes, ident: int = 0, frag: int = 0) -> bytes:
    if len(src) == 4:
        return _IPV4.pack(0x45, 0, 20 + len(body), ident, frag, 64, proto, 0, src, dst) + body
    return _IPV6.pack(6 << 28, len(body), proto, 64, src, dst) + body


def tcp_segment(
    src: bytes,
    dst: bytes,
    ports: tuple[int, int],
    number: int,
    flags: int,
    payload: bytes = b"",
    ack: int = 1000,
    urgent: int = 0,
) -> bytes:
    header = _TCP.pack(*ports, number & 0xFFFFFFFF, ack, 5 << 4, flags, 65535, 0, urgent)
    return ip(src, dst, 6, header + payload)


def fragments(packet: bytes, rng: random.Random) -> list[bytes]:
    """An IPv4 packet cut into fragments of random sizes (multiples of 8), all but the last
    with MF; the pieces in order."""
    header, body = packet[:20], packet[20:]
    ident = rng.randrange(1, 0x10000)
    out = []
    offset = 0
    while offset < len(body):
        size = min(len(body) - offset, 8 * rng.randint(1, 40))
        last = offset + size >= len(body)
        frag = (offset // 8) | (0 if last else 0x2000)
        piece = body[offset : offset + size]
        out.append(ip(header[12:16], header[16:20], header[9], piece, ident, frag))
        offset += size
    return out


# -- generation ------------------------------------------------------------------------------


@dataclass
class Incarnation:
    """One connection on a four-tuple: the ISNs each side chose, the peer's, the length."""

    isns: tuple[int, int]  # primary, secondary
    length: int
    client: int  # the peer's ISN: both sides' SYN-ACKs acknowledge client + 1


Key = tuple[bytes, bytes, int, int]
Tag = tuple[Key, int] | None


@dataclass
class Round:
    config: CompareConfig
    synced: bool  # both sides chose the same ISNs: checkpoints may say synced=True
    # four-tuple (guest, peer, guest port, peer port) -> its incarnations, oldest first
    connections: dict[tuple[bytes, bytes, int, int], list[Incarnation]]
    # when, whose, the frame, and (four-tuple, incarnation index) for a TCP segment: which
    # connection the generator made it for, whatever a mutation did to it
    frames: list[tuple[float, Side, bytes, Tag]]


def _config(rng: random.Random) -> CompareConfig:
    def pick(values: list[Any]) -> Any:
        return rng.choice(values)

    # Small bounds a fraction of the time: overflows and forgotten kept bytes happen, and so
    # do matches.
    return CompareConfig(
        framing=pick([Framing.IP, Framing.ETHERNET]),
        compare_timeout=pick([0.05, 0.3, 3.0]),
        secondary_timeout=pick([None, 0.05, 0.5, 3.0]),
        datagram_reorder_window=pick([0.001, 0.005, 0.05]),
        max_flows=pick([2, 8, 8] + [16384] * 7),
        max_held_packets=pick([2, 3, 5, 8, 64, 64, 64] + [4096] * 9),
        max_held_bytes=pick([64, 1000, 8000, 8000] + [64 << 20] * 6),
        retransmit_window=pick([1, 100, 3000, 3000] + [4 << 20] * 6),
        max_retransmit_bytes=pick([1, 500, 6000, 6000] + [64 << 20] * 6),
        max_fragment_datagrams=pick([1, 4, 4] + [256] * 7),
        max_fragment_bytes=pick([200, 5000, 5000] + [4 << 20] * 7),
        flow_idle_timeout=pick([0.2, 120.0]),
        secondary_seq=pick([SecondarySeq.OWN] * 4 + [SecondarySeq.REWRITTEN]),
        ack_lag_timeout=pick([None, 0.05, 0.1]),
        # Not fuzzed: the split hands a packet back to the kernel to be cut into segments,
        # which this harness does not model (tests/test_compare_tcp.py covers it).
        split_after=None,
    )


def _cuts(rng: random.Random, length: int) -> list[tuple[int, int]]:
    """[low, high) pieces of a stream, at least 8 bytes each (1-byte coincidences would make
    the reference model's verdict a matter of luck)."""
    out = []
    low = 0
    while low < length:
        high = min(length, low + rng.randint(8, 1500))
        if length - high < 8:
            high = length
        out.append((low, high))
        low = high
    return out


def _flip(data: bytes, rng: random.Random) -> bytes:
    changed = bytearray(data)
    index = rng.randrange(len(changed))
    changed[index] ^= 1 << rng.randrange(8)
    return bytes(changed)


def _tcp_side(
    rng: random.Random,
    key: tuple[bytes, bytes, int, int],
    number_base: int,
    syn_isn: int,
    stream: bytes,
    ending: tuple[bool, bool],
    urgent: int | None,
    client: int,
) -> list[bytes]:
    """One side's frames of one incarnation: SYN-ACK, data cut its own way (resends with the
    same or other bytes, pure ACKs between), FIN, maybe RST after it, a last ACK. The peer's
    ISN is ``client``: both sides acknowledge the same numbers."""
    guest, peer, guest_port, peer_port = key
    ports = (guest_port, peer_port)
    ack = (client + 1) & 0xFFFFFFFF
    frames = [tcp_segment(guest, peer, ports, syn_isn, SYN | ACK, ack=ack)]
    pieces = _cuts(rng, len(stream))
    fin, rst = ending
    sent: list[tuple[int, int]] = []
    for index, (low, high) in enumerate(pieces):
        flags = PSH | ACK
        pointer = 0
        if urgent is not None and low < urgent and urgent - low <= 0xFFFF:
            flags |= URG
            pointer = urgent - low
        if fin and index == len(pieces) - 1:
            flags |= FIN
        number = number_base + 1 + low
        frames.append(
            tcp_segment(guest, peer, ports, number, flags, stream[low:high], ack, pointer)
        )
        sent.append((low, high))
        if rng.random() < 0.1:
            frames.append(tcp_segment(guest, peer, ports, number_base + 1 + high, ACK, ack=ack))
        if rng.random() < 0.08 and sent:  # a resend of something sent earlier
            old_low, old_high = rng.choice(sent)
            payload = stream[old_low:old_high]
            if rng.random() < 0.3:  # with other bytes (sendfile, zero copy)
                payload = _flip(payload, rng)
            number = number_base + 1 + old_low
            frames.append(tcp_segment(guest, peer, ports, number, PSH | ACK, payload, ack))
    end = len(stream)
    if fin and not pieces:
        frames.append(tcp_segment(guest, peer, ports, number_base + 1, FIN | ACK, ack=ack))
    if rst:
        frames.append(tcp_segment(guest, peer, ports, number_base + 1 + end + fin, RST))
    elif fin and rng.random() < 0.5:
        frames.append(tcp_segment(guest, peer, ports, number_base + 2 + end, ACK, ack=ack + 1))
    return frames


def _tcp_connection(
    rng: random.Random,
    key: tuple[bytes, bytes, int, int],
    same_isns: bool,
    rewritten: bool,
) -> tuple[list[Incarnation], list[tuple[bytes, Tag]], list[tuple[bytes, Tag]]]:
    incarnations = []
    primary: list[tuple[bytes, Tag]] = []
    secondary: list[tuple[bytes, Tag]] = []
    for index in range(rng.choice([1, 1, 1, 2, 3])):
        tag = (key, index)
        primary_isn = rng.randrange(1 << 32)
        secondary_isn = primary_isn if same_isns else rng.randrange(1 << 32)
        stream = rng.randbytes(rng.choice([0, 50, 400, 3000, 9000]))
        fin = rng.random() < 0.8
        rst = fin and rng.random() < 0.15
        urgent = rng.randrange(1, len(stream) + 1) if stream and rng.random() < 0.15 else None
        # most of the time both sides end alike and mark the same urgent offset
        other_rst = rst if rng.random() < 0.85 else not rst and fin
        other_urgent = urgent if rng.random() < 0.85 else None
        client = rng.randrange(1 << 32)
        incarnations.append(Incarnation((primary_isn, secondary_isn), len(stream), client))
        primary += [
            (frame, tag)
            for frame in _tcp_side(
                rng, key, primary_isn, primary_isn, stream, (fin, rst), urgent, client
            )
        ]
        # QEMU's filter-rewriter numbers the secondary's segments from the primary's ISN, all
        # but its SYN-ACK
        base = primary_isn if rewritten else secondary_isn
        secondary += [
            (frame, tag)
            for frame in _tcp_side(
                rng, key, base, secondary_isn, stream, (fin, other_rst), other_urgent, client
            )
        ]
    return incarnations, primary, secondary


def _datagrams(rng: random.Random, peer: bytes, v6: bool) -> tuple[list[bytes], list[bytes]]:
    """A UDP flow or an echo session, or datagrams sent as IPv4 fragments."""
    guest = GUEST6 if v6 else GUEST4
    kind = rng.choice(["udp", "echo", "fragments"] if not v6 else ["udp", "echo"])
    frames: list[bytes] = []
    if kind == "echo":
        proto = 58 if v6 else 1
        echo_type = rng.choice(ECHO_TYPES[proto])
        ident = rng.randrange(1 << 16)
        for number in range(rng.randint(1, 8)):
            body = _ICMP.pack(echo_type, 0, 0, ident, number) + rng.randbytes(16)
            frames.append(ip(guest, peer, proto, body))
        return frames, list(frames)
    port = rng.randrange(1024, 65535)
    size = 2000 if kind == "fragments" else rng.choice([8, 100, 1400])
    for _ in range(rng.randint(1, 8)):
        payload = rng.randbytes(rng.randint(8, size))
        frames.append(ip(guest, peer, 17, _UDP.pack(53, port, 8 + len(payload), 0) + payload))
    if kind != "fragments":
        return frames, list(frames)
    # each side cuts each datagram its own way (the guests' MTU guesses may differ)
    return (
        [piece for frame in frames for piece in fragments(frame, rng)],
        [piece for frame in frames for piece in fragments(frame, rng)],
    )


def _mutate(
    frames: list[tuple[bytes, Tag]], rng: random.Random, rate: float
) -> list[tuple[bytes, Tag]]:
    """Loss, duplication, truncation, flipped bits in headers and payload, local reordering."""
    out: list[tuple[bytes, Tag]] = []
    for original, tag in frames:
        frame = original
        roll = rng.random()
        if roll < rate * 0.1:
            continue  # lost between the guest and the comparator
        if roll < rate * 0.3:
            frame = frame[: rng.randrange(len(frame))]  # truncated
        elif roll < rate * 0.6:
            index = rng.randrange(min(len(frame), 48))  # a header bit
            flipped = frame[index] ^ (1 << rng.randrange(8))
            frame = frame[:index] + bytes([flipped]) + frame[index + 1 :]
        elif roll < rate * 0.8 and len(frame) > 60:
            frame = frame[:60] + _flip(frame[60:], rng)  # a payload bit
        out.append((frame, tag))
        if rng.random() < rate * 0.5:
            out.append((frame, tag))  # duplicated
    for _ in range(int(len(out) * rate)):
        index = rng.randrange(max(1, len(out) - 1))
        if index + 1 < len(out):
            out[index], out[index + 1] = out[index + 1], out[index]
    return out


def make_round(rng: random.Random) -> Round:
    config = _config(rng)
    rewritten = config.secondary_seq is SecondarySeq.REWRITTEN
    same_isns = not rewritten and rng.random() < 0.3
    connections: dict[tuple[bytes, bytes, int, int], list[Incarnation]] = {}
    per_side: dict[Side, list[list[tuple[bytes, Tag]]]] = {Side.PRIMARY: [], Side.SECONDARY: []}
    for index in range(rng.randint(1, 4)):
        v6 = rng.random() < 0.2
        guest = GUEST6 if v6 else GUEST4
        peer = (bytes(15) + bytes([index + 2])) if v6 else bytes([10, 0, 0, index + 2])
        key = (guest, peer, rng.choice([80, 443]), 40000 + index)
        incarnations, primary, secondary = _tcp_connection(rng, key, same_isns, rewritten)
        connections[key] = incarnations
        per_side[Side.PRIMARY].append(primary)
        per_side[Side.SECONDARY].append(secondary)
    for index in range(rng.randint(0, 3)):
        v6 = rng.random() < 0.2
        peer = (bytes(15) + bytes([index + 20])) if v6 else bytes([10, 0, 0, index + 20])
        primary, secondary = _datagrams(rng, peer, v6)
        per_side[Side.PRIMARY].append([(frame, None) for frame in primary])
        per_side[Side.SECONDARY].append([(frame, None) for frame in secondary])
    rate = rng.choice([0.0, 0.002, 0.01, 0.05])
    lag = rng.choice([0.0, 0.001, 0.02, 0.2, 1.0]) * rng.choice([1, 1, -1])
    gap = rng.choice([0.0001, 0.001, 0.01])
    timeline: list[tuple[float, int, Side, tuple[bytes, Tag]]] = []
    serial = 0
    for side in Side:
        # each flow's frames in order, the flows interleaved at random
        flows = [_mutate(flow, rng, rate) for flow in per_side[side]]
        positions = [0] * len(flows)
        now = max(0.0, lag) if side is Side.SECONDARY else max(0.0, -lag)
        while True:
            live = [index for index, flow in enumerate(flows) if positions[index] < len(flow)]
            if not live:
                break
            index = rng.choice(live)
            now += rng.random() * gap
            timeline.append((now, serial, side, flows[index][positions[index]]))
            positions[index] += 1
            serial += 1
    timeline.sort(key=lambda item: (item[0], item[1]))
    wrap = _ethernet if config.framing is Framing.ETHERNET else _raw
    frames = [(at, side, wrap(frame), tag) for at, _, side, (frame, tag) in timeline]
    return Round(config, same_isns, connections, frames)


def _raw(packet: bytes) -> bytes:
    return packet


def _ethernet(packet: bytes) -> bytes:
    ethertype = b"\x86\xdd" if packet[:1] and packet[0] >> 4 == 6 else b"\x08\x00"
    return MACS + ethertype + packet


# -- the reference model ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tcp:
    key: tuple[bytes, bytes, int, int]
    number: int
    ack: int
    flags: int
    payload: bytes
    urgent: int


@dataclass(frozen=True, slots=True)
class Datagram:
    identity: tuple[object, ...]  # what must be equal for two datagrams to match


@dataclass(frozen=True, slots=True)
class Piece:
    """An IPv4 fragment."""

    key: tuple[object, ...]
    offset: int
    more: bool
    data: bytes
    header: bytes  # the addresses and protocol, for the reassembled datagram


Meaning = Tcp | Datagram | Piece


def meaning(frame: bytes, ethernet: bool) -> Meaning:
    """What a frame says, by a parser of our own. Anything it does not take apart is a
    datagram whose identity is all of its bytes: it matches only the very same frame."""
    data = frame
    if ethernet:
        if len(frame) < 14 or frame[12:14] not in (b"\x08\x00", b"\x86\xdd"):
            return Datagram(("frame", frame[:12], frame[12:]))
        data = frame[14:]
    if len(data) >= 20 and data[0] == 0x45 and (not ethernet or frame[12:14] == b"\x08\x00"):
        total = int.from_bytes(data[2:4], "big")
        if total < 20 or total > len(data):
            return Datagram(("whole", frame))
        proto, src, dst = data[9], data[12:16], data[16:20]
        frag = int.from_bytes(data[6:8], "big")
        body = data[20:total]
        if frag & 0x3FFF:
            ident = int.from_bytes(data[4:6], "big")
            header = bytes([proto]) + src + dst
            return Piece(
                (4, src, dst, proto, ident), (frag & 0x1FFF) * 8, bool(frag & 0x2000), body, header
            )
        return _transport(proto, src, dst, body, frame)
    if len(data) >= 40 and data[0] >> 4 == 6 and (not ethernet or frame[12:14] == b"\x86\xdd"):
        length = int.from_bytes(data[4:6], "big")
        if 40 + length > len(data):
            return Datagram(("whole", frame))
        return _transport(data[6], data[8:24], data[24:40], data[40 : 40 + length], frame)
    return Datagram(("whole", frame))


def _transport(proto: int, src: bytes, dst: bytes, body: bytes, frame: bytes) -> Meaning:
    if proto == 6:
        if len(body) < 20:
            return Datagram(("whole", frame))
        sport, dport, number, ack, offset, flags, _, _, urgent = _TCP.unpack_from(body)
        doff = (offset >> 4) * 4
        if doff < 20 or doff > len(body):
            return Datagram(("whole", frame))
        return Tcp((src, dst, sport, dport), number, ack, flags, body[doff:], urgent)
    if proto == 17:
        if len(body) < 8:
            return Datagram(("whole", frame))
        sport, dport, length, _ = _UDP.unpack_from(body)
        if length < 8 or length > len(body):
            return Datagram(("whole", frame))
        return Datagram((17, src, dst, sport, dport, body[8:length]))
    if proto in (1, 58) and len(body) < 4:
        return Datagram(("whole", frame))
    return Datagram((proto, src, dst, body))


def _diff(a: int, b: int) -> int:
    return ((a - b + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


class Reference:
    """What the secondary sent in the current epoch, and whether a release is justified."""

    def __init__(self, round_: Round) -> None:
        self.connections = round_.connections
        self.rewritten = round_.config.secondary_seq is SecondarySeq.REWRITTEN
        self.compare_timeout = round_.config.compare_timeout
        self.new_epoch()
        # IPv4 fragments being put together, as the comparator does (so that both group the
        # same fragments into one datagram): key -> [arrival, pieces, total, tokens]
        self.partials: dict[tuple[object, ...], list[Any]] = {}
        self.whole: dict[int, Meaning] = {}  # primary fragment token -> its datagram

    def new_epoch(self) -> None:
        # frames the secondary sent, as they were: the very same frame from the primary is
        # matched whatever it says (after a synced checkpoint the secondary sends copies)
        self.exact: set[bytes] = set()
        self.bytes: dict[tuple[object, ...], dict[int, set[int]]] = {}
        self.marks: set[tuple[object, ...]] = set()  # (conn, inc, "SYN"|"RST"|("FIN"|"URG", off))
        self.datagrams: Counter[tuple[object, ...]] = Counter()
        self.partials = {}

    def _place(self, tcp: Tcp, side: Side, tag: Tag) -> tuple[object, int, int] | None:
        """(connection, incarnation, stream offset of the sequence number) by the ISNs the
        generator chose, or None for a segment of no known incarnation. A segment the
        generator made for an incarnation belongs to it while its four-tuple is intact (a
        flipped sequence number makes its bytes land elsewhere; a RST or SYN stays its
        incarnation's); any other by its sequence number."""
        incarnations = self.connections.get(tcp.key)
        if incarnations is None:
            return None
        which = 0 if side is Side.PRIMARY or (self.rewritten and not tcp.flags & SYN) else 1
        if tag is not None and tag[0] == tcp.key:
            isn = incarnations[tag[1]].isns[which]
            return tcp.key, tag[1], _diff(tcp.number, isn) - 1
        for index, incarnation in enumerate(incarnations):
            isn = incarnation.isns[which]
            offset = _diff(tcp.number, isn) - 1
            if -1 <= offset <= incarnation.length + 2:
                return tcp.key, index, offset
        if tcp.flags & SYN and tcp.flags & ACK:
            # A SYN matches a SYN whatever ISN it names (the sides choose their own): one
            # with a flipped sequence number is still its incarnation's, which the peer's
            # ISN it acknowledges names.
            for index, incarnation in enumerate(incarnations):
                if tcp.ack == (incarnation.client + 1) & 0xFFFFFFFF:
                    return tcp.key, index, -1
        return None

    def secondary(self, meaning_: Meaning, tag: Tag, now: float, frame: bytes = b"") -> None:
        self.exact.add(frame)
        if type(meaning_) is Piece:
            whole = self._reassemble(meaning_, "secondary", None, now)
            if whole is not None:
                self.secondary(whole, None, now)
        elif type(meaning_) is Datagram:
            self.datagrams[meaning_.identity] += 1
        elif type(meaning_) is Tcp:
            place = self._place(meaning_, Side.SECONDARY, tag)
            if place is None:
                return
            key, incarnation, offset = place
            flags = meaning_.flags
            start = offset + 1 if flags & SYN else offset
            if flags & SYN:
                self.marks.add((key, incarnation, "SYN"))
            length = len(meaning_.payload)
            if flags & RST:
                self.marks.add((key, incarnation, "RST"))
                length = 0
            if flags & FIN:
                self.marks.add((key, incarnation, ("FIN", start + length)))
            if flags & URG and meaning_.urgent != 0xFFFF:
                self.marks.add((key, incarnation, ("URG", start + meaning_.urgent)))
            if length:
                table = self.bytes.setdefault((key, incarnation), {})
                for position, value in enumerate(meaning_.payload, start):
                    table.setdefault(position, set()).add(value)

    def primary_fed(self, meaning_: Meaning, token: int, now: float) -> None:
        if type(meaning_) is Piece:
            whole = self._reassemble(meaning_, "primary", token, now)
            del whole  # recorded per token in self.whole

    def justify(self, meaning_: Meaning, tag: Tag, token: int, frame: bytes = b"") -> str | None:
        """None if releasing the primary packet as matched is justified, else why not."""
        if type(meaning_) is Tcp and frame in self.exact:
            return None
        if type(meaning_) is Piece:
            whole = self.whole.get(token)
            if whole is None:
                return "a fragment of no complete datagram released as matched"
            if whole is _CONSUMED:
                return None  # another fragment of the same datagram was justified
            for other in [t for t, w in self.whole.items() if w is whole]:
                self.whole[other] = _CONSUMED
            return self.justify(whole, None, -1)
        if type(meaning_) is Datagram:
            if self.datagrams[meaning_.identity] <= 0:
                return "a datagram the secondary did not send (or only as often as matched)"
            self.datagrams[meaning_.identity] -= 1
            return None
        assert type(meaning_) is Tcp
        flags = meaning_.flags
        payload = b"" if flags & RST else meaning_.payload
        urgent = flags & URG and meaning_.urgent != 0xFFFF
        place = self._place(meaning_, Side.PRIMARY, tag)
        if place is None:
            if payload or flags & (SYN | FIN | RST) or urgent:
                return "a segment of no known connection with content released as matched"
            return None
        key, incarnation, offset = place
        start = offset + 1 if flags & SYN else offset
        if flags & SYN and (key, incarnation, "SYN") not in self.marks:
            return "a SYN released before the secondary's"
        if flags & RST and (key, incarnation, "RST") not in self.marks:
            return "a RST released before the secondary's"
        if flags & FIN and (key, incarnation, ("FIN", start + len(payload))) not in self.marks:
            return f"a FIN at {start + len(payload)} released without the secondary's there"
        if urgent and (key, incarnation, ("URG", start + meaning_.urgent)) not in self.marks:
            return f"an urgent pointer to {start + meaning_.urgent} the secondary did not send"
        if payload:
            table = self.bytes.get((key, incarnation), {})
            for position, value in enumerate(payload, start):
                if value not in table.get(position, ()):
                    return f"byte {position} of incarnation {incarnation} the secondary never sent"
        return None

    # -- fragments, grouped as coloproxy/compare/reassembly.py groups them ------------------

    def _reassemble(self, piece: Piece, side: str, token: int | None, now: float) -> Meaning | None:
        key = (side, *piece.key)
        partial = self.partials.get(key)
        if partial is None:
            partial = self.partials[key] = [now, {}, None, []]
        _, pieces, total, tokens = partial
        if token is not None:
            tokens.append(token)
        end = piece.offset + len(piece.data)
        if end > 65515 or (piece.more and len(piece.data) % 8):
            del self.partials[key]
            return None
        if not piece.more:
            if total is not None and total != end:
                del self.partials[key]
                return None
            partial[2] = total = end
        for other_offset, other in pieces.items():
            low, high = max(piece.offset, other_offset), min(end, other_offset + len(other))
            if (
                low < high
                and piece.data[low - piece.offset : high - piece.offset]
                != other[low - other_offset : high - other_offset]
            ):
                del self.partials[key]
                return None
        previous = pieces.get(piece.offset)
        if previous is None or len(previous) < len(piece.data):
            pieces[piece.offset] = piece.data
        if total is None:
            return None
        buffer = bytearray(total)
        covered = 0
        for offset in sorted(pieces):
            if offset > covered:
                return None
            buffer[offset : offset + len(pieces[offset])] = pieces[offset]
            covered = max(covered, offset + len(pieces[offset]))
        if covered < total:
            return None
        del self.partials[key]
        proto, src, dst = piece.header[0], piece.header[1:5], piece.header[5:9]
        whole = _transport(proto, src, dst, bytes(buffer), b"reassembled" + bytes(buffer))
        for other in tokens:
            self.whole[other] = whole
        return whole

    def expire(self, now: float) -> None:
        for key in [k for k, p in self.partials.items() if p[0] + self.compare_timeout <= now]:
            del self.partials[key]


_CONSUMED: Final = Datagram(("consumed",))


# -- the harness -----------------------------------------------------------------------------


@dataclass
class Result:
    frames: int = 0
    rounds: int = 0
    primary: int = 0
    matched: int = 0
    by_checkpoint: int = 0
    asked: Counter[str] = field(default_factory=Counter)
    checkpoints: int = 0
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _describe(frame: bytes) -> str:
    return frame[:80].hex()


def run_round(round_: Round, rng: random.Random, result: Result) -> None:
    comparator = Comparator(round_.config)
    epoch = comparator._book.epoch  # the saturation flag: fragments are not put together then
    ethernet = round_.config.framing is Framing.ETHERNET
    reference = Reference(round_)
    violations = result.violations
    fed: dict[int, tuple[bytes, Meaning, Tag]] = {}
    released: set[int] = set()
    base = result.primary
    state = "comparing"  # or "asked", "checkpointing"
    countdown = 0
    now = 0.0

    def check(events: list[Any], completing: bool) -> None:
        nonlocal state, countdown
        for event in events:
            kind = type(event)
            if kind is Release:
                token = event.token
                if not isinstance(token, int) or token not in fed:
                    violations.append(f"released a secondary packet or an unknown token {token!r}")
                    continue
                if token in released:
                    violations.append(f"primary packet {token} released twice")
                released.add(token)
                if event.reason is ReleaseReason.CHECKPOINT:
                    result.by_checkpoint += 1
                    if not completing:
                        violations.append(
                            f"primary packet {token} released by a checkpoint outside "
                            "checkpoint_completed"
                        )
                elif event.reason is ReleaseReason.MATCHED:
                    result.matched += 1
                    frame, meaning_, tag = fed[token]
                    why = reference.justify(meaning_, tag, token, frame)
                    if why is not None:
                        violations.append(
                            f"primary packet {token} released as matched: {why}; "
                            f"frame {_describe(frame)}"
                        )
                else:
                    violations.append(f"primary packet {token} released: {event.reason}")
            elif kind is Drop:
                if isinstance(event.token, int) and event.token in fed:
                    violations.append(f"primary packet {event.token} dropped ({event.reason})")
            elif kind is CheckpointNeeded and not event.coalesced:
                result.asked[str(event.reason)] += 1
                if state == "comparing":
                    state = "asked"
                    countdown = rng.randint(0, 40)

    def engine() -> None:
        nonlocal state, countdown
        if state == "comparing" and rng.random() < 0.0005:  # a periodic checkpoint
            state, countdown = "asked", rng.randint(0, 40)
        if state == "comparing" or countdown > 0:
            countdown -= 1
            return
        if state == "asked":
            check(comparator.checkpoint_started(now), False)
            state, countdown = "checkpointing", rng.randint(0, 40)
        else:
            events = comparator.checkpoint_completed(now, synced=round_.synced)
            result.checkpoints += 1
            reference.new_epoch()
            state = "comparing"
            check(events, True)
            if round_.synced:
                _secondary_copies_primary(pending, now, rng)

    # when, a serial (so that the heap never compares what follows), side, frame, tag
    pending = [
        (at, serial, side, frame, tag)
        for serial, (at, side, frame, tag) in enumerate(round_.frames)
    ]
    heapq.heapify(pending)
    fed_frames = 0
    # Half the rounds feed each frame in place, as the chardev transport does: a Frames
    # (offsets) into a buffer with other bytes before and after it.
    in_place = rng.random() < 0.5
    while pending:
        at, _, side, frame, tag = heapq.heappop(pending)
        fed_frames += 1
        now = max(now, at)
        batch = [(frame, meaning(frame, ethernet), tag)]
        if in_place:
            # A receive of one side's frames: those next in line, one to 32 (a batch's
            # consecutive segments of a connection are compared as one run), all at the time
            # of the last, for the comparator and the reference alike.
            limit = rng.choice([1, 2, 8, 32])
            while len(batch) < limit and pending and pending[0][2] is side:
                at, _, _, frame, tag = heapq.heappop(pending)
                fed_frames += 1
                now = max(now, at)
                batch.append((frame, meaning(frame, ethernet), tag))
        if side is Side.PRIMARY:
            token = base + len(fed)
            for index, (frame, meaning_, tag) in enumerate(batch):
                fed[token + index] = (frame, meaning_, tag)
                if state != "checkpointing" and not epoch.saturated:
                    reference.primary_fed(meaning_, token + index, now)
            if in_place:
                received = _in_buffer([frame for frame, _, _ in batch], rng)
                tokens = range(token, token + len(batch))
                check(comparator.feed_many(side, received, now, tokens), False)
            else:
                check(comparator.feed(side, frame, now, token), False)
        else:
            if state != "checkpointing":
                for frame, meaning_, tag in batch:
                    if type(meaning_) is not Piece or not epoch.saturated:
                        reference.secondary(meaning_, tag, now, frame)
            if in_place:
                received = _in_buffer([frame for frame, _, _ in batch], rng)
                check(comparator.feed_many(side, received, now, [None] * len(batch)), False)
            else:
                check(comparator.feed(side, frame, now, None), False)
        deadline = comparator.get_timer()
        if deadline is not None and deadline <= now:
            check(comparator.handle_timer(now), False)
            reference.expire(now)
        engine()
    # the end: every deadline passes, then a last checkpoint flushes what is held
    now += 1000.0
    check(comparator.handle_timer(now), False)
    if state != "checkpointing":
        check(comparator.checkpoint_started(now), False)
    check(comparator.checkpoint_completed(now, synced=round_.synced), True)
    missing = [token for token in fed if token not in released]
    for token in missing[:MAX_VIOLATIONS_SHOWN]:
        violations.append(
            f"primary packet {token} never released; frame {_describe(fed[token][0])}"
        )
    result.frames += fed_frames
    result.primary += len(fed)
    result.rounds += 1


def _in_buffer(frames: list[bytes], rng: random.Random) -> Frames:
    """``frames`` as a ``Frames``, each with random bytes before it in the buffer (what the
    comparator must not read: the framing of a receive) and some after the last."""
    data = b""
    bounds: list[int] = []
    starts: list[int] = []
    for frame in frames:
        bounds.append(len(data))
        data += rng.randbytes(rng.randint(0, 8))
        starts.append(len(data))
        data += frame
    bounds.append(len(data))
    return Frames(data + rng.randbytes(rng.randint(0, 64)), bounds, starts, False, [])


def _secondary_copies_primary(pending: list[Any], now: float, rng: random.Random) -> None:
    """After a synced checkpoint the secondary is a copy of the primary: what it sends from
    now on is what the primary sends from now on (a little later), not what it had been going
    to send. Only then does the comparator's synced=True hold (the secondary's TCP state is
    the primary's)."""
    lag = rng.choice([0.0, 0.0005, 0.005, 0.05])
    primary = [entry for entry in pending if entry[2] is Side.PRIMARY]
    serial = max((entry[1] for entry in pending), default=0)
    copies = []
    for at, _, _, frame, tag in primary:
        serial += 1
        copies.append((at + lag + rng.random() * 0.001, serial, Side.SECONDARY, frame, tag))
    pending[:] = primary + copies
    heapq.heapify(pending)


def run(frames: int, seed: int, progress: Callable[[Result], None] | None = None) -> Result:
    """Rounds until at least ``frames`` frames were fed."""
    rng = random.Random(seed)
    result = Result()
    started = time.perf_counter()
    next_report = 100_000
    while result.frames < frames:
        run_round(make_round(rng), rng, result)
        if progress is not None and result.frames >= next_report:
            result.seconds = time.perf_counter() - started
            progress(result)
            next_report += 100_000
    result.seconds = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--frames", type=int, default=DEFAULT_FRAMES, help="frames to feed, at least"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed (default: from the clock)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    load = os.getloadavg()
    print(f"fuzz_compare: seed {seed}, at least {args.frames:,} frames")
    print(f"load     {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (shared machine: times are noisy)")

    def progress(result: Result) -> None:
        if not args.quiet:
            print(
                f"  {result.frames:>10,} frames, {result.rounds:,} rounds, "
                f"{result.seconds:.0f} s, {len(result.violations)} violations",
                flush=True,
            )

    result = run(args.frames, seed, progress)
    rate = result.frames / result.seconds if result.seconds else 0.0
    seconds = result.seconds
    print(
        f"frames     {result.frames:,} in {result.rounds:,} rounds, {seconds:.1f} s ({rate:,.0f}/s)"
    )
    print(
        f"primary    {result.primary:,} packets: {result.matched:,} released as matched, "
        f"{result.by_checkpoint:,} by a checkpoint"
    )
    asked = ", ".join(f"{reason} {count:,}" for reason, count in result.asked.most_common())
    print(
        f"asked      {sum(result.asked.values()):,} checkpoints ({asked}); "
        f"{result.checkpoints:,} done mid-round"
    )
    if result.violations:
        print(f"VIOLATIONS {len(result.violations):,} (output commit broken); the first:")
        for line in result.violations[:MAX_VIOLATIONS_SHOWN]:
            print(f"  {line}")
        print(f"reproduce: python3 bench/fuzz_compare.py --frames {args.frames} --seed {seed}")
        return 1
    print("violations 0: every release was matched or by a checkpoint, nothing lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
