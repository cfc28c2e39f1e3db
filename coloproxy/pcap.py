"""Read pcap and pcapng captures, and compare two of them with the live comparator (shell).

Theory of operation
-------------------
:class:`Capture` reads a capture file record by record, without scapy or dpkt: classic pcap
in both byte orders with micro- or nanosecond timestamps, and pcapng (section header,
interface description, enhanced, simple and obsolete packet blocks; each interface has its
own link type and timestamp resolution). Link types: Ethernet, raw IP, Linux cooked (SLL and
SLL2). Anything that makes a file unusable (missing, bad magic, short header, unsupported link
type, a corrupt block) raises :class:`~coloproxy.errors.CaptureError` naming the file.

A record cut short at the end of the file is what a capture killed mid-write leaves behind:
reading stops there, ``Capture.truncated`` says where, and the comparison of everything before
it goes on (the report prints the warning). Refusing the whole file would throw away a good
capture for its last few bytes; carrying on silently would hide that the tail is missing.

:func:`compare_captures` replays two captures through one :class:`Comparator`, exactly as the
live proxy feeds it. The two files come from two hosts whose clocks are unrelated, so each
record's time is taken relative to its own capture's first record, and the two streams are
merged on that relative time (primary first on a tie; within one capture the file order is
kept even if the timestamps step back). ``now`` is that relative time; timers fire at their
own deadline before any packet that comes later, and ``handle_timer(math.inf)`` at the end
turns whatever is still unmatched into a timeout or secondary-only divergence.

Framing: when both captures are Ethernet, frames go to the comparator whole (ARP and VLANs
included); otherwise the link-layer header is stripped and IP packets are fed, and non-IP
records are skipped and counted. With ``guests`` given, only packets whose IP source is a guest
address are compared (non-IP frames are skipped, as their sender is unknown); a record whose IP
header is too damaged to read a source from is fed anyway, so it is reported as malformed
rather than silently dropped (invariant I5).
"""

from __future__ import annotations

import dataclasses
import heapq
import ipaddress
import math
import os
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Final

from coloproxy.compare import Comparator, CompareConfig, Framing, Side
from coloproxy.compare.events import CheckpointNeeded, Event, MalformedPacket
from coloproxy.errors import CaptureError
from coloproxy.report import (
    CaptureSummary,
    CompareResult,
    Divergence,
    MalformedInput,
    PacketRef,
    SkipReason,
)

LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = 101
LINKTYPE_LINUX_SLL: Final = 113
LINKTYPE_IPV4: Final = 228
LINKTYPE_IPV6: Final = 229
LINKTYPE_LINUX_SLL2: Final = 276
# DLT_RAW is 12 on most systems and 14 on OpenBSD, and old writers put the DLT in the file.
RAW_IP_LINK_TYPES: Final = frozenset({12, 14, LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6})
LINK_TYPE_NAMES: Final = {
    "ethernet": LINKTYPE_ETHERNET,
    "raw": LINKTYPE_RAW,
    "ipv4": LINKTYPE_IPV4,
    "ipv6": LINKTYPE_IPV6,
    "linux-sll": LINKTYPE_LINUX_SLL,
    "linux-sll2": LINKTYPE_LINUX_SLL2,
}
SUPPORTED_LINK_TYPES: Final = RAW_IP_LINK_TYPES | {
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
}

_PCAP_HEADER_LEN: Final = 24
_PCAP_MAGICS: Final = {  # magic read little-endian -> (byte order, nanoseconds per tick)
    0xA1B2C3D4: ("<", 1000),
    0xA1B23C4D: ("<", 1),
    0xD4C3B2A1: (">", 1000),
    0x4D3CB2A1: (">", 1),
}
_PCAP_MODIFIED_MAGICS: Final = frozenset({0xA1B2CD34, 0x34CDB2A1})  # Kuznetzov's patched libpcap
_PCAPNG_SHB: Final = 0x0A0D0D0A
_PCAPNG_BYTE_ORDER_MAGIC: Final = 0x1A2B3C4D
_PCAPNG_IDB: Final = 1
_PCAPNG_PB: Final = 2  # obsolete packet block, still written by old tools
_PCAPNG_SPB: Final = 3
_PCAPNG_EPB: Final = 6
_PCAPNG_OPT_TSRESOL: Final = 9
_PCAPNG_OPT_TSOFFSET: Final = 14
# libpcap's largest snapshot length is 262144; a length far beyond it is a corrupt header, and
# refusing it keeps a bad file from making us allocate gigabytes.
MAX_RECORD_BYTES: Final = 16 << 20

# Malformed packets listed one by one in the result; past this only the counts go on (a
# capture of garbage must not grow the report without bound).
MAX_MALFORMED_LISTED: Final = 100

_ETH_P_IP: Final = 0x0800
_ETH_P_IPV6: Final = 0x86DD
_VLAN_ETHERTYPES: Final = frozenset({0x8100, 0x88A8})
_MAX_VLAN_TAGS: Final = 2  # the same bound as the packet parser
_U16: Final = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Record:
    """One captured packet: link-layer bytes as captured and when (nanoseconds since the epoch)."""

    timestamp_ns: int
    link_type: int
    data: bytes
    original_length: int

    @property
    def timestamp(self) -> float:
        return self.timestamp_ns / 1e9


@dataclass(slots=True)
class _Interface:
    link_type: int
    snaplen: int
    tsresol: int = 6  # pcapng default: microseconds
    tsoffset: int = 0  # seconds


class Capture:
    """An open capture file. Iterate once for its records; close it (or use ``with``).

    ``link_type`` is the link type of the file header (pcap) or of the first interface
    (pcapng), or None for a pcapng file without interfaces. ``link_type_override`` replaces
    every link type in the file, for captures written with a wrong one.
    """

    def __init__(self, path: str | os.PathLike[str], link_type_override: int | None = None):
        self.name = os.fspath(path)
        self.format = "pcap"
        self.link_type: int | None = None
        self.truncated: str | None = None
        self.records = 0
        self._override = link_type_override
        self._byte_order = "<"
        self._tick_ns = 1000
        self._pcap_link_type = 0
        self._interfaces: list[_Interface] = []
        self._last_ns = 0
        self._offset = 0
        try:
            self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise CaptureError(f"{self.name}: {exc.strerror or exc}") from exc
        try:
            self._read_header()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> Capture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def link_types(self) -> tuple[int, ...]:
        """Every link type this capture declared so far (pcapng: one per interface)."""
        if self.format == "pcap":
            return () if self.link_type is None else (self.link_type,)
        return tuple(sorted({interface.link_type for interface in self._interfaces}))

    def __iter__(self) -> Iterator[Record]:
        records = self._pcap_records() if self.format == "pcap" else self._pcapng_records()
        for record in records:
            self.records += 1
            yield record

    def _error(self, what: str) -> CaptureError:
        return CaptureError(f"{self.name}: {what}")

    def _read(self, size: int) -> bytes:
        try:
            data = self._file.read(size)
        except OSError as exc:
            raise self._error(exc.strerror or str(exc)) from exc
        self._offset += len(data)
        return data

    def _check_link_type(self, link_type: int) -> int:
        if self._override is not None:
            return self._override
        if link_type not in SUPPORTED_LINK_TYPES:
            raise self._error(
                f"unsupported link type {link_type} (supported: Ethernet 1, raw IP 101/12/14/"
                "228/229, Linux cooked 113 and 276)"
            )
        return link_type

    def _read_header(self) -> None:
        head = self._read(_PCAP_HEADER_LEN)
        if len(head) < 4:
            raise self._error("empty file" if not head else f"not a pcap file ({len(head)} bytes)")
        magic = int.from_bytes(head[:4], "little")
        if magic == _PCAPNG_SHB:
            self.format = "pcapng"
            self._offset = 0
            self._file.seek(0)
            self._pcapng_start()
            return
        if magic in _PCAP_MODIFIED_MAGICS:
            raise self._error("modified pcap (Kuznetzov) is not supported; convert with editcap")
        if magic not in _PCAP_MAGICS:
            raise self._error(f"not a pcap file (magic 0x{int.from_bytes(head[:4], 'big'):08x})")
        if len(head) < _PCAP_HEADER_LEN:
            raise self._error(f"truncated pcap file header ({len(head)} of 24 bytes)")
        self._byte_order, self._tick_ns = _PCAP_MAGICS[magic]
        major, minor, _zone, _sigfigs, _snaplen, network = struct.unpack(
            self._byte_order + "HHiIII", head[4:]
        )
        if major != 2:
            raise self._error(f"unsupported pcap version {major}.{minor}")
        # The upper bits carry an FCS length (draft-ietf-opsawg-pcap); the link type is 16 bits.
        self._pcap_link_type = self._check_link_type(network & 0xFFFF)
        self.link_type = self._pcap_link_type

    def _stop(self, what: str, got: int, wanted: int) -> None:
        self.truncated = f"{what} is cut short ({got} of {wanted} bytes); stopped reading there"

    def _pcap_records(self) -> Iterator[Record]:
        link_type = self._pcap_link_type
        header = struct.Struct(self._byte_order + "IIII")
        index = 0
        while True:
            index += 1
            start = self._offset
            head = self._read(16)
            if not head:
                return
            if len(head) < 16:
                self._stop(f"record {index} at byte {start}", len(head), 16)
                return
            seconds, fraction, captured, original = header.unpack(head)
            if captured > MAX_RECORD_BYTES:
                raise self._error(
                    f"record {index} at byte {start}: captured length {captured} is not"
                    " plausible (corrupt file)"
                )
            data = self._read(captured)
            if len(data) < captured:
                self._stop(f"record {index} at byte {start}", 16 + len(data), 16 + captured)
                return
            timestamp = seconds * 1_000_000_000 + fraction * self._tick_ns
            yield Record(timestamp, link_type, data, original)

    # pcapng (draft-ietf-opsawg-pcapng): blocks of type, length, body, length again.

    def _pcapng_start(self) -> None:
        """Read the section header and every block up to the first interface description."""
        if self._pcapng_block() is None:
            raise self._error("truncated pcapng section header")
        while not self._interfaces:
            block = self._pcapng_block()
            if block is None:
                return
            block_type, body = block
            if block_type in (_PCAPNG_PB, _PCAPNG_SPB, _PCAPNG_EPB):
                raise self._error("pcapng packet block before any interface description")
            self._pcapng_meta(block_type, body)
        self.link_type = self._interfaces[0].link_type

    def _pcapng_block(self) -> tuple[int, bytes] | None:
        """The next block's type and body, or None at the end of the file (or a cut block)."""
        start = self._offset
        head = self._read(8)
        if not head:
            return None
        if len(head) < 8:
            self._stop(f"block at byte {start}", len(head), 8)
            return None
        # The section header's type reads the same in both byte orders; its byte-order magic
        # says how to read everything after it, its own length included.
        block_type = struct.unpack_from(self._byte_order + "I", head)[0]
        if block_type == _PCAPNG_SHB:
            magic = self._read(4)
            if magic == struct.pack("<I", _PCAPNG_BYTE_ORDER_MAGIC):
                self._byte_order = "<"
            elif magic == struct.pack(">I", _PCAPNG_BYTE_ORDER_MAGIC):
                self._byte_order = ">"
            else:
                raise self._error(f"pcapng section header at byte {start}: bad byte-order magic")
            head += magic
        length = struct.unpack_from(self._byte_order + "I", head, 4)[0]
        if length % 4 or length < len(head) + 4 or length > MAX_RECORD_BYTES:
            raise self._error(f"pcapng block at byte {start}: bad block length {length}")
        rest = self._read(length - len(head))
        if len(rest) < length - len(head):
            self._stop(f"block at byte {start}", len(head) + len(rest), length)
            return None
        if rest[-4:] != head[4:8]:
            raise self._error(f"pcapng block at byte {start}: trailing length does not match")
        return block_type, rest[:-4]

    def _pcapng_meta(self, block_type: int, body: bytes) -> None:
        """Take note of a non-packet block: a new section starts a new interface list."""
        if block_type == _PCAPNG_SHB:
            self._interfaces = []
        elif block_type == _PCAPNG_IDB:
            if len(body) < 8:
                raise self._error("pcapng interface description block too short")
            link_type, _reserved, snaplen = struct.unpack_from(self._byte_order + "HHI", body)
            interface = _Interface(self._check_link_type(link_type), snaplen)
            offset = 8
            while offset + 4 <= len(body):
                code, length = struct.unpack_from(self._byte_order + "HH", body, offset)
                value = body[offset + 4 : offset + 4 + length]
                if code == 0:  # opt_endofopt
                    break
                if code == _PCAPNG_OPT_TSRESOL and length >= 1:
                    interface.tsresol = value[0]
                elif code == _PCAPNG_OPT_TSOFFSET and length >= 8:
                    interface.tsoffset = struct.unpack_from(self._byte_order + "q", value)[0]
                offset += 4 + (length + 3) // 4 * 4
            self._interfaces.append(interface)
        # Statistics, name resolution, custom and unknown blocks say nothing we need.

    def _pcapng_records(self) -> Iterator[Record]:
        number = 0
        while (block := self._pcapng_block()) is not None:
            block_type, body = block
            if block_type not in (_PCAPNG_EPB, _PCAPNG_PB, _PCAPNG_SPB):
                self._pcapng_meta(block_type, body)
                continue
            number += 1
            if block_type == _PCAPNG_SPB:
                # No interface id (always the first), no captured length, no timestamp: keep
                # the previous packet's time so the merge order stays that of the file.
                header_len, interface_id, high, low = 4, 0, 0, 0
                original = struct.unpack_from(self._byte_order + "I", body)[0] if body else 0
                captured = min(original, len(body) - header_len)
            else:
                fields = "IIIII" if block_type == _PCAPNG_EPB else "HxxIIII"
                header_len = 20
                if len(body) < header_len:
                    raise self._error(f"pcapng packet {number} too short")
                interface_id, high, low, captured, original = struct.unpack_from(
                    self._byte_order + fields, body
                )
            if interface_id >= len(self._interfaces):
                raise self._error(f"pcapng packet {number}: no interface {interface_id}")
            interface = self._interfaces[interface_id]
            if block_type == _PCAPNG_SPB:
                if interface.snaplen:
                    captured = min(captured, interface.snaplen)
            else:
                self._last_ns = _pcapng_ns((high << 32) | low, interface)
            if captured < 0 or header_len + captured > len(body):
                raise self._error(f"pcapng packet {number}: captured length beyond its block")
            data = body[header_len : header_len + captured]
            yield Record(self._last_ns, interface.link_type, data, original)


def _pcapng_ns(ticks: int, interface: _Interface) -> int:
    """Nanoseconds since the epoch from an interface's timestamp units (if_tsresol)."""
    resolution = interface.tsresol
    if resolution & 0x80:
        nanoseconds = (ticks * 1_000_000_000) >> (resolution & 0x7F)
    elif resolution <= 9:
        nanoseconds = ticks * 10 ** (9 - resolution)
    else:
        nanoseconds = ticks // 10 ** (resolution - 9)
    return nanoseconds + interface.tsoffset * 1_000_000_000


# Turning records into what the comparator eats.


def _network_layer(record: Record) -> tuple[int, int] | None:
    """Where the network-layer packet starts and its ethertype; None if the L2 header is cut.

    Raw IP records claim to be IP whatever their version nibble says, so the comparator sees
    them and reports a bad version as malformed.
    """
    data = record.data
    link_type = record.link_type
    if link_type in RAW_IP_LINK_TYPES:
        return 0, _ETH_P_IPV6 if data[:1] and data[0] >> 4 == 6 else _ETH_P_IP
    if link_type == LINKTYPE_LINUX_SLL:
        return (16, _U16.unpack_from(data, 14)[0]) if len(data) >= 16 else None
    if link_type == LINKTYPE_LINUX_SLL2:
        return (20, _U16.unpack_from(data, 0)[0]) if len(data) >= 20 else None
    # Ethernet, with up to two VLAN tags (802.1Q, 802.1ad).
    if len(data) < 14:
        return None
    offset, ethertype = 14, _U16.unpack_from(data, 12)[0]
    for _ in range(_MAX_VLAN_TAGS):
        if ethertype not in _VLAN_ETHERTYPES:
            break
        if len(data) < offset + 4:
            return None
        ethertype = _U16.unpack_from(data, offset + 2)[0]
        offset += 4
    return offset, ethertype


def _ip_source(data: bytes, l3: int) -> bytes | None:
    """The IP source address, or None when the header is too damaged to hold one."""
    version = data[l3] >> 4 if len(data) > l3 else 0
    if version == 4 and len(data) >= l3 + 20:
        return data[l3 + 12 : l3 + 16]
    if version == 6 and len(data) >= l3 + 40:
        return data[l3 + 8 : l3 + 24]
    return None


def _comparator_input(
    record: Record, framing: Framing, guests: frozenset[bytes]
) -> bytes | SkipReason:
    """The bytes to feed for this record, or why it is not compared."""
    layer = _network_layer(record)
    if layer is None:
        return SkipReason.BAD_LINK_HEADER
    l3, ethertype = layer
    is_ip = ethertype in (_ETH_P_IP, _ETH_P_IPV6)
    if guests:
        if not is_ip:
            return SkipReason.NON_IP
        source = _ip_source(record.data, l3)
        if source is not None and source not in guests:
            return SkipReason.NOT_GUEST
    if framing is Framing.IP:
        return record.data[l3:] if is_ip else SkipReason.NON_IP
    if record.link_type == LINKTYPE_ETHERNET:
        return record.data
    # A pcapng interface of another link type among Ethernet ones: give the IP packet a
    # blank Ethernet header rather than switching framing halfway through.
    if not is_ip:
        return SkipReason.NON_IP
    return bytes(12) + _U16.pack(ethertype) + record.data[l3:]


def _relative(capture: Capture, rank: int) -> Iterator[tuple[int, int, int, Record]]:
    """(ns since the capture's first record, rank, record number, record), in file order."""
    first: int | None = None
    last = 0
    for number, record in enumerate(capture, 1):
        if first is None:
            first = record.timestamp_ns
        last = max(last, record.timestamp_ns - first)
        yield last, rank, number, record


def compare_captures(
    primary_path: str | os.PathLike[str],
    secondary_path: str | os.PathLike[str],
    *,
    guests: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    compare_timeout: float | None = None,
    link_type_override: int | None = None,
) -> CompareResult:
    """Replay both captures through one comparator; raises CaptureError on unusable files."""
    with (
        Capture(primary_path, link_type_override) as primary,
        Capture(secondary_path, link_type_override) as secondary,
    ):
        ethernet = all(c.link_types == (LINKTYPE_ETHERNET,) for c in (primary, secondary))
        framing = Framing.ETHERNET if ethernet else Framing.IP
        # Offline there is no kernel to cut a GSO packet (a capture on a TSO host has them)
        # and no engine to checkpoint: no split, no ack-lag request.
        config = CompareConfig(framing=framing, split_after=None, ack_lag_timeout=None)
        if compare_timeout is not None:
            config = dataclasses.replace(config, compare_timeout=compare_timeout)
        comparator = Comparator(config)
        guest_keys = frozenset(guest.packed for guest in guests)
        sides = (Side.PRIMARY, Side.SECONDARY)
        compared = dict.fromkeys(sides, 0)
        skipped: dict[Side, Counter[str]] = {side: Counter() for side in sides}
        malformed: dict[Side, Counter[str]] = {side: Counter() for side in sides}
        divergences: list[Divergence] = []
        malformed_inputs: list[MalformedInput] = []

        def take(events: Sequence[Event], time: float | None, trigger: PacketRef | None) -> None:
            for event in events:
                if isinstance(event, CheckpointNeeded):
                    divergences.append(Divergence(event, time, trigger))
                elif isinstance(event, MalformedPacket):
                    malformed[event.side][event.reason] += 1
                    if len(malformed_inputs) < MAX_MALFORMED_LISTED:
                        ref = event.token if isinstance(event.token, PacketRef) else None
                        malformed_inputs.append(
                            MalformedInput(event.side, ref, event.reason, event.detail)
                        )

        def run_timers(now: float) -> None:
            timer = comparator.get_timer()
            while timer is not None and timer <= now:
                take(comparator.handle_timer(timer), timer, None)
                following = comparator.get_timer()
                if following is not None and following <= timer:
                    # The comparator left this deadline pending (it tests arrival <= now -
                    # timeout, which float rounding can make false at now == arrival + timeout):
                    # rather than spin, let it fire at `now`.
                    take(comparator.handle_timer(now), now, None)
                    break
                timer = following

        now = 0.0
        merged = heapq.merge(_relative(primary, 0), _relative(secondary, 1))
        for relative_ns, rank, number, record in merged:
            side = sides[rank]
            data = _comparator_input(record, framing, guest_keys)
            if isinstance(data, SkipReason):
                skipped[side][data] += 1
                continue
            now = relative_ns / 1e9
            run_timers(now)
            compared[side] += 1
            ref = PacketRef(side, number)
            take(comparator.feed(side, data, now, ref), now, ref)
        # After the last packet time goes on for the live proxy too: every timer a packet
        # armed fires at its own deadline, in order (a datagram mismatch is found by the reorder
        # window long before its timeout), up to well past the last deadline any packet can
        # have armed (twice the longest timeout leaves room for the rounding noted above).
        # Then infinity flushes whatever is left.
        longest = max(
            config.compare_timeout,
            config.secondary_timeout or 0.0,
            config.datagram_reorder_window,
        )
        run_timers(now + 2 * longest)
        take(comparator.handle_timer(math.inf), None, None)

        def summary(capture: Capture, side: Side) -> CaptureSummary:
            return CaptureSummary(
                file=capture.name,
                format=capture.format,
                link_types=capture.link_types,
                packets=capture.records,
                compared=compared[side],
                skipped=dict(skipped[side]),
                malformed=dict(malformed[side]),
                truncated=capture.truncated,
            )

        return CompareResult(
            primary=summary(primary, Side.PRIMARY),
            secondary=summary(secondary, Side.SECONDARY),
            framing=framing,
            guests=tuple(str(guest) for guest in guests),
            divergences=tuple(divergences),
            malformed=tuple(malformed_inputs),
        )
