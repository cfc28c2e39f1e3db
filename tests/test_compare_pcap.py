"""``coloproxy compare-pcap``: two captures in, exit code and divergences out.

Each test writes a primary and a secondary capture of one guest behaviour with scapy (each on
its own clock), runs the command in-process with ``--json`` and asserts the exit code and the
divergences as (reason, flow) pairs. Equivalent cases keep the secondary's ACKs equal to the
primary's, as the S-in rewrite makes them in the live pair.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcapng

from coloproxy import __version__, variant
from coloproxy.cli import main
from pcaps import (
    GUEST,
    GUEST6,
    LINKTYPE_ETHERNET,
    LINKTYPE_RAW,
    LINKTYPE_SLL,
    LINKTYPE_SLL2,
    PEER,
    PEER_ISN,
    TcpOutput,
    Timed,
    arp_reply,
    echo_reply,
    ip_header,
    peer_segment,
    udp,
    write_capture,
    write_pair,
    write_records,
)

TCP_FLOW = f"tcp {GUEST}:80 -> {PEER}:40000"
TCP_CLIENT_FLOW = f"tcp {GUEST}:40000 -> {PEER}:80"
TCP6_FLOW = f"tcp [{GUEST6}]:80 -> [2001:db8::1]:40000"
UDP_FLOW = f"udp {GUEST}:53 -> {PEER}:5353"
UDP6_FLOW = f"udp [{GUEST6}]:53 -> [2001:db8::1]:5353"
ICMP_FLOW = f"icmp {GUEST} -> {PEER} echo id {0x1234}"  # the default identifier of pcaps.echo_reply

STREAM = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 200\r\n\r\n"
    + bytes(range(48, 123)) * 4
)[:300]
PRIMARY_ISN = 1_000_000
SECONDARY_ISN = 3_000_000_000
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    code: int
    report: dict[str, Any]
    stderr: str

    @property
    def divergences(self) -> list[tuple[str, str | None]]:
        return [(item["reason"], item["flow"]) for item in self.report["divergences"]]

    def counts(self, side: str) -> dict[str, Any]:
        counts: dict[str, Any] = self.report["counts"][side]
        return counts


class Compare:
    """Runs ``compare-pcap --json`` in-process and parses what it printed."""

    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp_path = tmp_path
        self.capsys = capsys

    def __call__(
        self,
        primary: Sequence[Timed],
        secondary: Sequence[Timed],
        *options: str,
        link_types: tuple[int, int] = (LINKTYPE_ETHERNET, LINKTYPE_ETHERNET),
    ) -> Outcome:
        """Write both sides' packets as captures, then compare them."""
        paths = write_pair(self.tmp_path, primary, secondary, link_types=link_types)
        return self.files(*paths, *options)

    def files(self, primary: Path, secondary: Path, *options: str) -> Outcome:
        code = main(["compare-pcap", "--json", *options, str(primary), str(secondary)])
        captured = self.capsys.readouterr()
        report = json.loads(captured.out) if captured.out else {}
        if report:
            assert report["equivalent"] is (code == 0)
        return Outcome(code, report, captured.err)


@pytest.fixture
def compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Compare:
    return Compare(tmp_path, capsys)


def server(
    isn: int,
    stream: bytes = STREAM,
    cuts: Sequence[int] = (),
    *,
    end: str = "fin",
    **options: Any,
) -> TcpOutput:
    """The guest as server: SYN-ACK, the response cut at ``cuts``, then FIN or RST."""
    out = TcpOutput(isn, **options)
    out.open(0.0)
    time = out.send(0.010, stream, cuts)
    if end == "fin":
        out.fin(time, len(stream))
    elif end == "rst":
        out.rst(time, len(stream))
    return out


def flip(stream: bytes, offset: int) -> bytes:
    return stream[:offset] + bytes([stream[offset] ^ 0x20]) + stream[offset + 1 :]


# -- equivalent output ------------------------------------------------------------------


def test_identical_captures(compare: Compare) -> None:
    packets = server(PRIMARY_ISN, cuts=[100, 200]).packets
    outcome = compare(packets, packets)
    assert (outcome.code, outcome.divergences) == (0, [])
    assert outcome.counts("primary") == {
        "read": 5,
        "compared": 5,
        "skipped": {},
        "malformed": {},
    }
    assert outcome.report["framing"] == "ethernet"


def test_tcp_guest_as_server_different_isns(compare: Compare) -> None:
    primary = server(PRIMARY_ISN, cuts=[100, 200])
    secondary = server(SECONDARY_ISN, cuts=[100, 200])
    assert compare(primary.packets, secondary.packets).divergences == []
    assert compare(primary.packets, secondary.packets).code == 0


def test_tcp_guest_as_client_different_isns(compare: Compare) -> None:
    sides = []
    for isn in (PRIMARY_ISN, SECONDARY_ISN):
        out = TcpOutput(isn, server=False)
        out.open(0.0)
        time = out.send(0.010, b"GET / HTTP/1.1\r\nHost: peer\r\n\r\n", [16])
        out.ack(time, 30)
        out.fin(time + 0.001, 30)
        sides.append(out.packets)
    outcome = compare(sides[0], sides[1])
    assert (outcome.code, outcome.divergences) == (0, [])


@pytest.mark.parametrize(
    ("primary_cuts", "secondary_cuts"),
    [
        ([], [1]),
        ([100, 200], [1, 2, 3, 150, 299]),
        ([], list(range(7, 300, 7))),
        (list(range(1, 300, 13)), list(range(5, 300, 17))),
        ([150], [149, 151]),
    ],
    ids=["one-vs-two", "mixed", "whole-vs-7", "13-vs-17", "around-one-cut"],
)
def test_tcp_same_bytes_segmented_differently(
    compare: Compare, primary_cuts: list[int], secondary_cuts: list[int]
) -> None:
    primary = server(PRIMARY_ISN, cuts=primary_cuts)
    secondary = server(SECONDARY_ISN, cuts=secondary_cuts)
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (0, [])


SHORT = b"hello, world"


@pytest.mark.parametrize("cut", range(1, len(SHORT)))
def test_tcp_short_stream_cut_at_every_byte_boundary(compare: Compare, cut: int) -> None:
    primary = server(PRIMARY_ISN, SHORT)
    secondary = server(SECONDARY_ISN, SHORT, [cut])
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (0, [])


def test_tcp_short_stream_byte_by_byte(compare: Compare) -> None:
    primary = server(PRIMARY_ISN, SHORT, [3, 9])
    secondary = server(SECONDARY_ISN, SHORT, range(1, len(SHORT)))
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (0, [])


def test_tcp_retransmissions(compare: Compare) -> None:
    primary = server(PRIMARY_ISN, cuts=[100, 200], end="")
    primary.data(0.014, 100, STREAM[100:200])  # retransmitted once, same bytes
    primary.data(0.015, 0, STREAM[0:100])
    primary.fin(0.016, len(STREAM))
    primary.fin(0.017, len(STREAM))  # and the FIN too
    secondary = server(SECONDARY_ISN, cuts=[100, 200])
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (0, [])


def test_tcp_overlapping_retransmissions(compare: Compare) -> None:
    primary = server(PRIMARY_ISN, cuts=[100, 200])
    secondary = server(SECONDARY_ISN, cuts=[60, 180], end="")
    secondary.data(0.014, 50, STREAM[50:190])  # spans three earlier segments
    secondary.data(0.015, 170, STREAM[170:300])
    secondary.fin(0.016, len(STREAM))
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (0, [])


def test_tcp_keepalives(compare: Compare) -> None:
    end = len(STREAM)
    primary = server(PRIMARY_ISN, cuts=[100], end="")
    primary.ack(1.0, end - 1)  # Linux keepalive: seq one below snd.nxt, no data
    primary.ack(1.5, end - 1)
    primary.data(2.0, end - 1, STREAM[-1:], flags="A")  # BSD style: one byte already sent
    primary.fin(2.1, end)
    secondary = server(SECONDARY_ISN, cuts=[200], end="")
    secondary.ack(1.2, end - 1)  # its timer fired at other times, and fewer times
    secondary.fin(2.1, end)
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (0, [])


def test_tcp_reordering(compare: Compare) -> None:
    primary = server(PRIMARY_ISN, cuts=[100, 200])
    secondary = TcpOutput(SECONDARY_ISN)
    secondary.open(0.0)
    for time, (start, end) in zip(
        (0.010, 0.011, 0.012, 0.013), [(200, 250), (0, 100), (250, 300), (100, 200)], strict=True
    ):
        secondary.data(time, start, STREAM[start:end])
    secondary.fin(0.014, len(STREAM))
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (0, [])


def test_tcp_windows_and_options_differ(compare: Compare) -> None:
    primary = TcpOutput(PRIMARY_ISN, window=64240, options=[("Timestamp", (1000, 77))])
    primary.open(0.0, options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)])
    time = primary.send(0.010, STREAM, [100, 200])
    primary.fin(time, len(STREAM))
    secondary = TcpOutput(
        SECONDARY_ISN, window=1024, options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 77))]
    )
    secondary.open(0.0, options=[("MSS", 1400)])
    time = secondary.send(0.010, STREAM, [100, 200])
    secondary.fin(time, len(STREAM))
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (0, [])


def test_tcp_sequence_wraparound(compare: Compare) -> None:
    primary = server((1 << 32) - 10, cuts=[100, 200])  # wraps inside the first segment
    secondary = server((1 << 32) - 150, cuts=[120, 160])  # wraps inside the second
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (0, [])


@pytest.mark.parametrize(
    "link_types",
    [
        (LINKTYPE_RAW, LINKTYPE_RAW),
        (LINKTYPE_SLL, LINKTYPE_SLL),
        (LINKTYPE_SLL2, LINKTYPE_SLL2),
        (LINKTYPE_ETHERNET, LINKTYPE_RAW),
        (LINKTYPE_SLL, LINKTYPE_ETHERNET),
    ],
    ids=["raw", "sll", "sll2", "ethernet-vs-raw", "sll-vs-ethernet"],
)
def test_link_types(compare: Compare, link_types: tuple[int, int]) -> None:
    primary = [*server(PRIMARY_ISN, cuts=[100, 200]).packets, udp(0.02, b"datagram")]
    secondary = [*server(SECONDARY_ISN, cuts=[50]).packets, udp(0.02, b"datagram")]
    outcome = compare(primary, secondary, link_types=link_types)
    assert (outcome.code, outcome.divergences) == (0, [])
    assert outcome.report["framing"] == "ip"


def test_link_types_mixed_and_diverging(compare: Compare) -> None:
    primary = server(PRIMARY_ISN, cuts=[100, 200])
    secondary = server(SECONDARY_ISN, flip(STREAM, 250), [50])
    outcome = compare(
        primary.packets, secondary.packets, link_types=(LINKTYPE_ETHERNET, LINKTYPE_SLL2)
    )
    assert (outcome.code, outcome.divergences) == (1, [("payload", TCP_FLOW)])
    assert outcome.report["divergences"][0]["offset"] == 250


def test_pcapng_captures(compare: Compare, tmp_path: Path) -> None:
    paths = []
    for name, isn, cuts in (("primary", PRIMARY_ISN, [100]), ("secondary", SECONDARY_ISN, [7])):
        frames = []
        for item in server(isn, cuts=cuts).packets:
            frame = Ether(src="52:54:00:00:00:02", dst="52:54:00:00:00:01") / item.packet
            frame.time = 1_700_000_000 + item.time
            frames.append(frame)
        path = tmp_path / f"{name}.pcapng"
        wrpcapng(str(path), frames)
        paths.append(path)
    outcome = compare.files(paths[0], paths[1])
    assert (outcome.code, outcome.divergences) == (0, [])
    assert outcome.report["captures"]["primary"]["format"] == "pcapng"


def test_link_type_override(compare: Compare, tmp_path: Path) -> None:
    paths = []
    for name, isn in (("primary", PRIMARY_ISN), ("secondary", SECONDARY_ISN)):
        records = [(1000 + item.time, bytes(item.packet)) for item in server(isn).packets]
        paths.append(write_records(tmp_path / f"{name}.pcap", records, link_type=147))
    assert compare.files(paths[0], paths[1]).code == 2
    outcome = compare.files(paths[0], paths[1], "--link-type", "raw")
    assert (outcome.code, outcome.divergences) == (0, [])


# -- divergent output -------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 99, 100, 101, 157, 299])
def test_tcp_one_byte_differs(compare: Compare, offset: int) -> None:
    primary = server(PRIMARY_ISN, cuts=[100, 200])
    secondary = server(SECONDARY_ISN, flip(STREAM, offset), [60, 160])
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (1, [("payload", TCP_FLOW)])
    divergence = outcome.report["divergences"][0]
    assert divergence["offset"] == offset
    assert divergence["protocol"] == "tcp"
    before = divergence["before"]
    assert bytes.fromhex(divergence["primary_hex"])[before] == STREAM[offset]
    assert bytes.fromhex(divergence["secondary_hex"])[before] == STREAM[offset] ^ 0x20


def test_tcp_fin_against_rst(compare: Compare) -> None:
    primary = server(PRIMARY_ISN, cuts=[100], end="fin")
    secondary = server(SECONDARY_ISN, cuts=[100], end="rst")
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (1, [("fate", TCP_FLOW)])


def test_tcp_difference_after_sequence_wrap_has_the_stream_offset(compare: Compare) -> None:
    primary = server((1 << 32) - 10, cuts=[100, 200])
    secondary = server((1 << 32) - 150, flip(STREAM, 170), [120, 160])
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (1, [("payload", TCP_FLOW)])
    assert outcome.report["divergences"][0]["offset"] == 170


def test_tcp_primary_output_without_secondary_counterpart(compare: Compare) -> None:
    primary = server(PRIMARY_ISN, cuts=[100, 200])
    secondary = server(SECONDARY_ISN, STREAM[:200], [100], end="")
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (1, [("timeout", TCP_FLOW)])


def test_compare_timeout_fires_while_reading(compare: Compare) -> None:
    primary = server(PRIMARY_ISN, cuts=[100, 200])
    secondary = TcpOutput(SECONDARY_ISN)
    secondary.open(0.0)
    time = secondary.send(2.0, STREAM, [100, 200])  # the secondary runs 2 s behind
    secondary.fin(time, len(STREAM))
    assert compare(primary.packets, secondary.packets).code == 0  # default: 3 s
    outcome = compare(primary.packets, secondary.packets, "--compare-timeout", "0.5")
    assert (outcome.code, outcome.divergences) == (1, [("timeout", TCP_FLOW)])
    assert outcome.report["divergences"][0]["time"] == pytest.approx(0.51)


def test_secondary_output_without_primary_counterpart(compare: Compare) -> None:
    primary = [udp(0.0, b"query answer")]
    secondary = [udp(0.0, b"query answer"), udp(0.01, b"extra", sport=123, dport=123)]
    outcome = compare(primary, secondary)
    assert (outcome.code, outcome.divergences) == (
        1,
        [("secondary-only", f"udp {GUEST}:123 -> {PEER}:123")],
    )


def test_secondary_only_is_reported_at_its_deadline(compare: Compare) -> None:
    primary = [udp(0.0, b"query answer")]
    secondary = [udp(0.0, b"query answer"), udp(0.01, b"extra", sport=123, dport=123)]
    outcome = compare(primary, secondary)
    assert outcome.report["divergences"][0]["time"] == pytest.approx(3.01)


def test_udp_same_datagrams_in_different_order(compare: Compare) -> None:
    payloads = [b"one", b"two", b"three", b"four"]
    primary = [udp(0.0001 * index, payload) for index, payload in enumerate(payloads)]
    secondary = [udp(0.0001 * index, payload) for index, payload in enumerate(payloads[::-1])]
    outcome = compare(primary, secondary)
    assert (outcome.code, outcome.divergences) == (0, [])


def test_udp_differing(compare: Compare) -> None:
    primary = [udp(0.0, b"answer 1"), udp(0.001, b"answer 2")]
    secondary = [udp(0.0, b"answer 1"), udp(0.001, b"answer 3")]
    outcome = compare(primary, secondary)
    assert (outcome.code, outcome.divergences) == (1, [("payload", UDP_FLOW)])


def test_icmp_echo_replies(compare: Compare) -> None:
    replies = [echo_reply(0.001 * seq, b"ping payload %d" % seq, seq=seq) for seq in range(3)]
    outcome = compare(replies, replies)
    assert (outcome.code, outcome.divergences) == (0, [])
    changed = [*replies[:2], echo_reply(0.002, b"ping payload X", seq=2)]
    outcome = compare(replies, changed)
    assert (outcome.code, outcome.divergences) == (1, [("payload", ICMP_FLOW)])


def test_ipv6_tcp_and_udp(compare: Compare) -> None:
    primary = [*server(PRIMARY_ISN, cuts=[100], v6=True).packets, udp(0.02, b"six", v6=True)]
    secondary = [*server(SECONDARY_ISN, cuts=[33], v6=True).packets, udp(0.02, b"six", v6=True)]
    outcome = compare(primary, secondary)
    assert (outcome.code, outcome.divergences) == (0, [])


def test_ipv6_diverging(compare: Compare) -> None:
    primary = [*server(PRIMARY_ISN, cuts=[100], v6=True).packets, udp(0.02, b"six", v6=True)]
    secondary = [
        *server(SECONDARY_ISN, flip(STREAM, 42), [33], v6=True).packets,
        udp(0.02, b"6ix", v6=True),
    ]
    outcome = compare(primary, secondary, "--guest", GUEST6)
    assert outcome.code == 1
    assert sorted(outcome.divergences) == [("payload", TCP6_FLOW), ("payload", UDP6_FLOW)]
    by_flow = {item["flow"]: item for item in outcome.report["divergences"]}
    assert by_flow[TCP6_FLOW]["offset"] == 42


def _fragments(payload: bytes, size: int, ident: int, time: float) -> list[Timed]:
    datagram = IP(src=GUEST, dst=PEER, id=ident) / UDP(sport=53, dport=5353) / Raw(payload)
    return [
        Timed(time + index * 0.0001, piece) for index, piece in enumerate(fragment(datagram, size))
    ]


BIG = bytes(range(256)) * 12


def test_ipv4_fragmented_differently(compare: Compare) -> None:
    primary = _fragments(BIG, 1480, ident=100, time=0.0)
    secondary = _fragments(BIG, 800, ident=31337, time=0.0)
    assert len(primary) != len(secondary)
    outcome = compare(primary, secondary)
    assert (outcome.code, outcome.divergences) == (0, [])


def test_ipv4_fragments_differing_content(compare: Compare) -> None:
    primary = _fragments(BIG, 1480, ident=100, time=0.0)
    secondary = _fragments(flip(BIG, 2000), 800, ident=31337, time=0.0)
    outcome = compare(primary, secondary)
    assert (outcome.code, outcome.divergences) == (1, [("payload", UDP_FLOW)])


@pytest.mark.parametrize("proto", [47, 132])
def test_other_ip_protocols(compare: Compare, proto: int) -> None:
    def opaque(payload: bytes) -> list[Timed]:
        return [Timed(0.0, ip_header(proto=proto) / Raw(payload))]

    outcome = compare(opaque(b"\x00\x00\x08\x00opaque"), opaque(b"\x00\x00\x08\x00opaque"))
    assert (outcome.code, outcome.divergences) == (0, [])
    outcome = compare(opaque(b"\x00\x00\x08\x00opaque"), opaque(b"\x00\x00\x08\x00OPAQUE"))
    assert (outcome.code, outcome.divergences) == (
        1,
        [("payload", f"ip-proto-{proto} {GUEST} -> {PEER}")],
    )


# -- which packets count -----------------------------------------------------------------


def _both_directions(isn: int) -> list[Timed]:
    """A capture on the guest's tap: the client's packets as the guest received them."""
    guest = TcpOutput(isn)
    client_acks = (isn + 1) % (1 << 32)  # what the client acknowledges, in this guest's numbers
    packets = [peer_segment(0.0, PEER_ISN, 0, flags="S")]
    packets.append(guest.open(0.001))
    packets.append(peer_segment(0.002, PEER_ISN + 1, client_acks, b"GET / HTTP/1.1\r\n\r\n"))
    packets.append(guest.data(0.010, 0, STREAM[:150]))
    packets.append(guest.data(0.011, 150, STREAM[150:]))
    packets.append(peer_segment(0.012, PEER_ISN + 19, (client_acks + 300) % (1 << 32), flags="A"))
    packets.append(guest.fin(0.013, len(STREAM)))
    packets.append(arp_reply(0.014, PEER if isn == PRIMARY_ISN else "10.0.0.77"))
    return packets


def test_guest_filter_ignores_the_client_side(compare: Compare) -> None:
    primary = _both_directions(PRIMARY_ISN)
    secondary = _both_directions(SECONDARY_ISN)
    outcome = compare(primary, secondary, "--guest", GUEST)
    assert (outcome.code, outcome.divergences) == (0, [])
    for side in ("primary", "secondary"):
        assert outcome.counts(side) == {
            "read": 8,
            "compared": 4,
            "skipped": {"not-guest": 3, "non-ip": 1},
            "malformed": {},
        }
    assert outcome.report["guests"] == [GUEST]


def test_without_guest_filter_every_packet_is_compared(compare: Compare) -> None:
    primary = _both_directions(PRIMARY_ISN)
    secondary = _both_directions(SECONDARY_ISN)
    outcome = compare(primary, secondary)
    assert outcome.code == 1
    assert outcome.counts("primary")["compared"] == 8
    # The ARP replies differ (non-IP frames are compared whole in Ethernet captures).
    assert ("payload", "ethertype-0x0806 52:54:00:00:00:02 -> 52:54:00:00:00:01") in (
        outcome.divergences
    )


def test_guest_filter_takes_several_addresses(compare: Compare) -> None:
    primary = [*server(PRIMARY_ISN).packets, udp(0.02, b"v6", v6=True)]
    secondary = [*server(SECONDARY_ISN).packets, udp(0.02, b"V6", v6=True)]
    assert compare(primary, secondary, "--guest", GUEST).code == 0
    outcome = compare(primary, secondary, "--guest", GUEST, "--guest", GUEST6)
    assert (outcome.code, outcome.divergences) == (1, [("payload", UDP6_FLOW)])


def test_malformed_primary_packet(compare: Compare) -> None:
    good = udp(0.0, b"fine")
    broken = IP(src=GUEST, dst=PEER, len=400) / UDP(sport=53, dport=5353) / Raw(b"short")
    outcome = compare([good, Timed(0.001, broken)], [good])
    assert outcome.code == 1
    assert [reason for reason, _flow in outcome.divergences] == ["malformed"]
    assert outcome.counts("primary")["malformed"] == {"truncated": 1}
    assert outcome.report["malformed"] == [
        {
            "side": "primary",
            "packet": {"side": "primary", "number": 2},
            "reason": "truncated",
            "detail": "IPv4 total length 400",
        }
    ]


def test_truncated_capture_is_compared_up_to_the_cut_and_reported(
    compare: Compare, tmp_path: Path
) -> None:
    packets = server(PRIMARY_ISN, cuts=[100, 200]).packets
    primary = write_capture(tmp_path / "primary.pcap", packets)
    secondary = write_capture(tmp_path / "secondary.pcap", packets)
    secondary.write_bytes(secondary.read_bytes()[:-30])  # the FIN record is cut
    outcome = compare.files(primary, secondary)
    assert (outcome.code, outcome.divergences) == (1, [("timeout", TCP_FLOW)])
    assert outcome.counts("secondary")["read"] == 4
    truncated = outcome.report["captures"]["secondary"]["truncated"]
    assert truncated.startswith("record 5 at byte ")
    assert outcome.report["warnings"] == [f"{secondary}: {truncated}"]


# -- unusable input ----------------------------------------------------------------------


def _exit_two(outcome: Outcome, message: str) -> None:
    assert outcome.code == 2
    assert outcome.report == {}
    assert outcome.stderr.count("\n") == 1
    assert outcome.stderr.startswith("compare-pcap: ")
    assert message in outcome.stderr


def test_missing_file(compare: Compare, tmp_path: Path) -> None:
    good = write_capture(tmp_path / "good.pcap", [udp(0.0, b"x")])
    outcome = compare.files(good, tmp_path / "missing.pcap")
    _exit_two(outcome, f"{tmp_path / 'missing.pcap'}: No such file or directory")


def test_not_a_pcap_file(compare: Compare, tmp_path: Path) -> None:
    good = write_capture(tmp_path / "good.pcap", [udp(0.0, b"x")])
    text = tmp_path / "notes.txt"
    text.write_text("GET / HTTP/1.1\r\n")
    outcome = compare.files(text, good)
    _exit_two(outcome, f"{text}: not a pcap file (magic 0x47455420)")


def test_truncated_file_header(compare: Compare, tmp_path: Path) -> None:
    good = write_capture(tmp_path / "good.pcap", [udp(0.0, b"x")])
    short = tmp_path / "short.pcap"
    short.write_bytes(good.read_bytes()[:20])
    outcome = compare.files(good, short)
    _exit_two(outcome, f"{short}: truncated pcap file header (20 of 24 bytes)")


def test_unsupported_link_type(compare: Compare, tmp_path: Path) -> None:
    good = write_capture(tmp_path / "good.pcap", [udp(0.0, b"x")])
    radio = write_records(tmp_path / "radio.pcap", [(0.0, b"\0" * 8)], link_type=127)
    outcome = compare.files(good, radio)
    _exit_two(outcome, f"{radio}: unsupported link type 127")


@pytest.mark.parametrize(
    "options",
    [["--guest", "10.0.0.256"], ["--compare-timeout", "0"], ["--compare-timeout", "nan"]],
)
def test_bad_options(compare: Compare, tmp_path: Path, options: list[str]) -> None:
    good = write_capture(tmp_path / "good.pcap", [udp(0.0, b"x")])
    outcome = compare.files(good, good, *options)
    assert outcome.code == 2
    assert "error:" in outcome.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out == f"coloproxy {__version__}, {variant.describe()}\n"
    assert ("comparator: compiled" in out) is (variant.variant() == "compiled")


def test_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "a command is required" in capsys.readouterr().err


# -- human output and the real command ---------------------------------------------------


def test_human_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    primary = server(PRIMARY_ISN, cuts=[100, 200])
    secondary = server(SECONDARY_ISN, flip(STREAM, 157), [60, 160])
    primary_path, secondary_path = write_pair(tmp_path, primary.packets, secondary.packets)
    assert main(["compare-pcap", str(primary_path), str(secondary_path)]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"divergence 1: payload: {TCP_FLOW}"
    assert lines[1].startswith("  stream offset 157;")
    # One caret line, under both sides' byte at offset 157 in the rows just above it.
    marked = [index for index, line in enumerate(lines) if line.strip().startswith("^^")]
    assert len(marked) == 1
    primary_row, secondary_row = lines[marked[0] - 2], lines[marked[0] - 1]
    row_offset = int(primary_row.split()[0])
    assert primary_row.split()[:2] == [str(row_offset), "primary"]
    assert secondary_row.split()[:2] == [str(row_offset), "secondary"]
    assert row_offset <= 157 < row_offset + 16
    column = lines[marked[0]].index("^^")
    hex_start = primary_row.index("primary") + len("secondary") + 2
    assert column == hex_start + 3 * (157 - row_offset)
    assert primary_row[column : column + 2] == f"{STREAM[157]:02x}"
    assert secondary_row[column : column + 2] == f"{STREAM[157] ^ 0x20:02x}"
    text_column = lines[marked[0]].rindex("^")
    assert primary_row[text_column] == chr(STREAM[157])
    assert secondary_row[text_column] == chr(STREAM[157] ^ 0x20)
    assert lines[-1].startswith("diverged: 1 divergence (payload 1); primary 5 read, 5 compared")


def test_human_output_equivalent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    packets = [udp(0.0, b"x")]
    primary_path, secondary_path = write_pair(tmp_path, packets, packets)
    assert main(["compare-pcap", str(primary_path), str(secondary_path)]) == 0
    assert capsys.readouterr().out == (
        "equivalent: primary 1 read, 1 compared; secondary 1 read, 1 compared\n"
    )


def test_human_output_one_sided_evidence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    primary = [udp(0.0, b"query answer")]
    secondary = [udp(0.0, b"query answer"), udp(0.01, b"extra", sport=123, dport=123)]
    primary_path, secondary_path = write_pair(tmp_path, primary, secondary)
    assert main(["compare-pcap", str(primary_path), str(secondary_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"divergence 1: secondary-only: udp {GUEST}:123 -> {PEER}:123"
    rows = [line for line in lines if line.endswith("|")]
    assert len(rows) == 1
    assert rows[0].split()[:3] == ["0", "secondary", "65"]
    assert rows[0].endswith("|extra|")
    assert not any(line.strip().startswith("^^") for line in lines)


def test_as_a_subprocess(tmp_path: Path) -> None:
    primary = server(PRIMARY_ISN, cuts=[100, 200])
    secondary = server(SECONDARY_ISN, flip(STREAM, 5), [60, 160])
    primary_path, secondary_path = write_pair(tmp_path, primary.packets, secondary.packets)
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "coloproxy",
            "compare-pcap",
            "--json",
            str(primary_path),
            str(secondary_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=environment,
        timeout=60,
    )
    assert completed.returncode == 1, completed.stderr
    report = json.loads(completed.stdout)
    assert [(item["reason"], item["flow"], item["offset"]) for item in report["divergences"]] == [
        ("payload", TCP_FLOW, 5)
    ]
    missing = subprocess.run(
        [sys.executable, "-m", "coloproxy", "compare-pcap", "nothere.pcap", str(secondary_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=environment,
        timeout=60,
    )
    assert missing.returncode == 2
    assert missing.stderr == "compare-pcap: nothere.pcap: No such file or directory\n"


def test_a_gso_sized_primary_segment_is_compared_whole_offline(compare: Compare) -> None:
    # Captures on a host with TSO hold segments longer than the MTU. The daemon hands such a
    # held packet back to the kernel to be cut (Split); offline there is no kernel: the
    # packet was neither released nor reported, and the primary's later output waited.
    stream = bytes(range(256)) * 16  # 4096 bytes
    primary = server(PRIMARY_ISN, stream=stream, cuts=[])  # one 4 KiB segment
    secondary = TcpOutput(SECONDARY_ISN)
    secondary.open(0.0)
    # The secondary's last piece comes 100 ms after the rest: past the daemon's split_after.
    time = secondary.send(0.010, stream, [1448, 2896], step=0.1)
    secondary.fin(time, len(stream))
    outcome = compare(primary.packets, secondary.packets)
    assert (outcome.code, outcome.divergences) == (0, [])
