"""The capture reader: pcap in both byte orders and timestamp units, pcapng, link types, and
what it does with files it cannot use."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcapng

from coloproxy.errors import CaptureError
from coloproxy.pcap import Capture, Record
from pcaps import LINKTYPE_ETHERNET, LINKTYPE_RAW, pcapng_bytes, write_records

EPOCH_NS = 1_700_000_000 * 10**9
PAYLOADS = [b"first record", b"second, a bit longer record", b"third record"]


def _records(path: Path, override: int | None = None) -> tuple[Capture, list[Record]]:
    with Capture(path, override) as capture:
        return capture, list(capture)


def _write_three(path: Path, *, link_type: int = LINKTYPE_ETHERNET, endianness: str = "<") -> Path:
    times = [1_700_000_000.0, 1_700_000_000.000123, 1_700_000_001.5]
    records = zip(times, PAYLOADS, strict=True)
    return write_records(path, records, link_type=link_type, endianness=endianness)


@pytest.mark.parametrize("endianness", ["<", ">"])
def test_pcap_microseconds_both_byte_orders(tmp_path: Path, endianness: str) -> None:
    path = _write_three(tmp_path / "us.pcap", endianness=endianness)
    capture, records = _records(path)
    assert capture.format == "pcap"
    assert capture.link_type == LINKTYPE_ETHERNET
    assert [record.data for record in records] == PAYLOADS
    assert [record.timestamp_ns - EPOCH_NS for record in records] == [0, 123_000, 1_500_000_000]
    assert [record.original_length for record in records] == [len(data) for data in PAYLOADS]
    assert records[1].timestamp == pytest.approx(1_700_000_000.000123)
    assert capture.truncated is None
    assert capture.records == 3


@pytest.mark.parametrize("endianness", ["<", ">"])
def test_pcap_nanoseconds_both_byte_orders(tmp_path: Path, endianness: str) -> None:
    path = write_records(
        tmp_path / "ns.pcap",
        [(1_700_000_000.000000123, b"a"), (1_700_000_002.999999999, b"b")],
        nano=True,
        endianness=endianness,
    )
    raw = path.read_bytes()
    assert raw[:4] == (b"\x4d\x3c\xb2\xa1" if endianness == "<" else b"\xa1\xb2\x3c\x4d")
    _, records = _records(path)
    # float time: what matters is that the nanosecond field is read as nanoseconds
    offsets = [record.timestamp_ns - EPOCH_NS for record in records]
    assert offsets[0] == pytest.approx(123, abs=300)
    assert offsets[1] == pytest.approx(2_999_999_999, abs=300)


def test_pcap_exact_nanoseconds(tmp_path: Path) -> None:
    header = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, LINKTYPE_RAW)
    record = struct.pack("<IIII", 1_700_000_000, 999_999_999, 2, 40) + b"\x45\x00"
    path = tmp_path / "exact.pcap"
    path.write_bytes(header + record)
    _, records = _records(path)
    assert records == [Record(EPOCH_NS + 999_999_999, LINKTYPE_RAW, b"\x45\x00", 40)]


@pytest.mark.parametrize("link_type", [1, 12, 14, 101, 113, 228, 229, 276])
def test_supported_link_types(tmp_path: Path, link_type: int) -> None:
    path = _write_three(tmp_path / f"{link_type}.pcap", link_type=link_type)
    capture, records = _records(path)
    assert capture.link_type == link_type
    assert capture.link_types == (link_type,)
    assert {record.link_type for record in records} == {link_type}


def test_link_type_field_upper_bits_are_fcs_information(tmp_path: Path) -> None:
    # draft-ietf-opsawg-pcap: the FCS length lives in the top bits of the link type field.
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 0x14000000 | 1)
    path = tmp_path / "fcs.pcap"
    path.write_bytes(header)
    capture, records = _records(path)
    assert capture.link_type == 1
    assert records == []


def test_unsupported_link_type(tmp_path: Path) -> None:
    path = _write_three(tmp_path / "wifi.pcap", link_type=105)
    with pytest.raises(CaptureError, match=r"wifi\.pcap: unsupported link type 105"):
        Capture(path)


def test_link_type_override(tmp_path: Path) -> None:
    path = _write_three(tmp_path / "wrong.pcap", link_type=105)
    capture, records = _records(path, override=LINKTYPE_RAW)
    assert capture.link_type == LINKTYPE_RAW
    assert {record.link_type for record in records} == {LINKTYPE_RAW}


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "text.pcap"
    path.write_text("this is not a capture at all\n")
    with pytest.raises(CaptureError, match=r"text\.pcap: not a pcap file \(magic 0x74686973\)"):
        Capture(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcap"
    path.write_bytes(b"")
    with pytest.raises(CaptureError, match=r"empty\.pcap: empty file"):
        Capture(path)


def test_truncated_file_header(tmp_path: Path) -> None:
    path = _write_three(tmp_path / "short.pcap")
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CaptureError, match=r"truncated pcap file header \(10 of 24 bytes\)"):
        Capture(path)


def test_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "v3.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 3, 0, 0, 0, 65535, 1))
    with pytest.raises(CaptureError, match=r"unsupported pcap version 3\.0"):
        Capture(path)


def test_kuznetzov_pcap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "modified.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2CD34, 2, 4, 0, 0, 65535, 1))
    with pytest.raises(CaptureError, match="modified pcap"):
        Capture(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"nothere\.pcap: No such file or directory"):
        Capture(tmp_path / "nothere.pcap")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=str(tmp_path)):
        Capture(tmp_path)


@pytest.mark.parametrize("cut", [1, 8, 15, 16, 20, 16 + len(PAYLOADS[2]) - 1])
def test_truncated_last_record_stops_reading_and_says_where(tmp_path: Path, cut: int) -> None:
    path = _write_three(tmp_path / "cut.pcap")
    whole = path.read_bytes()
    last_record_start = len(whole) - 16 - len(PAYLOADS[2])
    path.write_bytes(whole[: last_record_start + cut])
    capture, records = _records(path)
    assert [record.data for record in records] == PAYLOADS[:2]
    wanted = 16 if cut < 16 else 16 + len(PAYLOADS[2])
    assert capture.truncated == (
        f"record 3 at byte {last_record_start} is cut short ({cut} of {wanted} bytes);"
        " stopped reading there"
    )


def test_implausible_record_length_is_an_error(tmp_path: Path) -> None:
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    record = struct.pack("<IIII", 0, 0, 0xFFFFFF00, 0xFFFFFF00)
    path = tmp_path / "corrupt.pcap"
    path.write_bytes(header + record + b"x" * 64)
    with (
        Capture(path) as capture,
        pytest.raises(CaptureError, match=r"record 1 at byte 24: captured length \d+ is not"),
    ):
        list(capture)


# pcapng


def test_pcapng_from_scapy(tmp_path: Path) -> None:
    frames = []
    for index, payload in enumerate(PAYLOADS):
        packet = Ether() / IP(src="10.0.0.2", dst="10.0.0.1") / UDP() / Raw(payload)
        packet.time = 1_700_000_000 + index * 0.25
        frames.append(packet)
    path = tmp_path / "scapy.pcapng"
    wrpcapng(str(path), frames)
    capture, records = _records(path)
    assert capture.format == "pcapng"
    assert capture.link_type == LINKTYPE_ETHERNET
    assert [record.data for record in records] == [bytes(frame) for frame in frames]
    assert [record.timestamp_ns - EPOCH_NS for record in records] == [0, 250_000_000, 500_000_000]


@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize(
    ("tsresol", "ticks", "nanoseconds"),
    [
        (None, 1_700_000_000_000_001, EPOCH_NS + 1_000),  # default: microseconds
        (9, EPOCH_NS + 7, EPOCH_NS + 7),
        (3, 1_700_000_000_005, EPOCH_NS + 5_000_000),
        (12, 5_000_000_000_003_000, 5_000_000_000_003),  # picoseconds (fit in 64 bits)
        (0x80 | 10, (1_700_000_000 << 10) + 512, EPOCH_NS + 500_000_000),  # 2**-10 s
    ],
)
def test_pcapng_timestamp_resolution_and_byte_order(
    tmp_path: Path, byte_order: str, tsresol: int | None, ticks: int, nanoseconds: int
) -> None:
    path = tmp_path / "hand.pcapng"
    path.write_bytes(
        pcapng_bytes(
            [(ticks, b"\x45abc")], link_type=LINKTYPE_RAW, tsresol=tsresol, byte_order=byte_order
        )
    )
    capture, records = _records(path)
    assert capture.link_type == LINKTYPE_RAW
    assert records == [Record(nanoseconds, LINKTYPE_RAW, b"\x45abc", 4)]


def test_pcapng_simple_packet_blocks(tmp_path: Path) -> None:
    path = tmp_path / "simple.pcapng"
    path.write_bytes(pcapng_bytes([(0, b"\x45one"), (0, b"\x45second")], simple=True))
    _, records = _records(path)
    assert [record.data for record in records] == [b"\x45one", b"\x45second"]


def test_pcapng_truncated_block(tmp_path: Path) -> None:
    path = tmp_path / "cut.pcapng"
    whole = pcapng_bytes([(1, b"\x45first"), (2, b"\x45second")])
    path.write_bytes(whole[:-5])
    capture, records = _records(path)
    assert [record.data for record in records] == [b"\x45first"]
    assert capture.truncated is not None
    assert "is cut short" in capture.truncated


def test_pcapng_unsupported_link_type(tmp_path: Path) -> None:
    path = tmp_path / "usb.pcapng"
    path.write_bytes(pcapng_bytes([(1, b"x")], link_type=220))
    with pytest.raises(CaptureError, match=r"usb\.pcapng: unsupported link type 220"):
        Capture(path)


def test_pcapng_corrupt_block_length(tmp_path: Path) -> None:
    whole = bytearray(pcapng_bytes([(1, b"\x45first")]))
    whole[-4:] = struct.pack("<I", 0)  # the trailing length no longer matches
    path = tmp_path / "corrupt.pcapng"
    path.write_bytes(bytes(whole))
    with (
        Capture(path) as capture,
        pytest.raises(CaptureError, match="trailing length does not match"),
    ):
        list(capture)
