"""Read pcap and pcapng captures (shell).

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

Comparing two captures is :mod:`coloproxy.replay`'s.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Final

from coloproxy.errors import CaptureError

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
