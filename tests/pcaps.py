"""Build primary/secondary capture pairs with scapy, for the pcap reader and compare-pcap tests.

A test describes each side's guest output as a list of :class:`Timed` IP packets (scapy
objects with a time relative to the capture's start) and writes it with :func:`write_capture`
in the link type it wants. :class:`TcpOutput` writes one guest's side of a TCP connection by
stream offset, so the two sides can have different ISNs, segmentation, windows and options
while carrying the same bytes.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Ether
from scapy.packet import Packet, Raw
from scapy.utils import RawPcapWriter

GUEST = "10.0.0.2"
PEER = "10.0.0.1"
GUEST6 = "2001:db8::2"
PEER6 = "2001:db8::1"
GUEST_MAC = "52:54:00:00:00:02"
PEER_MAC = "52:54:00:00:00:01"
GUEST_PORT = 80
PEER_PORT = 40000
PEER_ISN = 7000  # the peer's ISN: both guests see the same client, so they ACK the same
MOD = 1 << 32

# Unrelated clocks on the two hosts: every capture starts at its own epoch time.
PRIMARY_EPOCH = 1_700_000_000.25
SECONDARY_EPOCH = 1_600_000_123.5

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_SLL = 113
LINKTYPE_SLL2 = 276


@dataclass(frozen=True)
class Timed:
    """An IP packet (scapy) and its time in seconds after the capture's start."""

    time: float
    packet: Packet


def _mac_pair(packet: Packet) -> tuple[str, str]:
    """Guest frames go guest MAC -> peer MAC; anything else the other way."""
    source = packet[IPv6].src if IPv6 in packet else packet[IP].src
    if source in (GUEST, GUEST6):
        return GUEST_MAC, PEER_MAC
    return PEER_MAC, GUEST_MAC


def frame(packet: Packet, link_type: int) -> bytes:
    """The record bytes of an IP packet (or, for Ethernet, any frame) in a link type."""
    if link_type == LINKTYPE_ETHERNET:
        if Ether in packet:
            return bytes(packet)
        source, destination = _mac_pair(packet)
        return bytes(Ether(src=source, dst=destination) / packet)
    if link_type == LINKTYPE_SLL:
        proto = 0x86DD if IPv6 in packet else 0x0800
        header = CookedLinux(pkttype=4, lladdrtype=1, lladdrlen=6, src=b"\x52\x54\0\0\0\2\0\0")
        header.proto = proto
        return bytes(header / packet)
    if link_type == LINKTYPE_SLL2:
        proto = 0x86DD if IPv6 in packet else 0x0800
        header = CookedLinuxV2(proto=proto, ifindex=2, lladdrtype=1, pkttype=4, lladdrlen=6)
        header.src = b"\x52\x54\0\0\0\2\0\0"
        return bytes(header / packet)
    return bytes(packet)


def write_records(
    path: Path,
    records: Iterable[tuple[float, bytes]],
    *,
    link_type: int = LINKTYPE_ETHERNET,
    nano: bool = False,
    endianness: str = "<",
) -> Path:
    """Write (absolute time, bytes) records as classic pcap through scapy's writer."""
    writer = RawPcapWriter(str(path), linktype=link_type, nano=nano, endianness=endianness)
    try:
        writer.write_header(None)
        for timestamp, data in records:
            seconds = int(timestamp)
            fraction = round((timestamp - seconds) * (1e9 if nano else 1e6))
            writer.write_packet(data, sec=seconds, usec=fraction)
    finally:
        writer.close()
    return path


def write_capture(
    path: Path,
    packets: Sequence[Timed],
    *,
    link_type: int = LINKTYPE_ETHERNET,
    epoch: float = PRIMARY_EPOCH,
    nano: bool = False,
    endianness: str = "<",
) -> Path:
    records = [(epoch + item.time, frame(item.packet, link_type)) for item in packets]
    return write_records(path, records, link_type=link_type, nano=nano, endianness=endianness)


def write_pair(
    tmp_path: Path,
    primary: Sequence[Timed],
    secondary: Sequence[Timed],
    *,
    link_types: tuple[int, int] = (LINKTYPE_ETHERNET, LINKTYPE_ETHERNET),
) -> tuple[Path, Path]:
    """primary.pcap and secondary.pcap in ``tmp_path``, each on its own clock."""
    return (
        write_capture(
            tmp_path / "primary.pcap", primary, link_type=link_types[0], epoch=PRIMARY_EPOCH
        ),
        write_capture(
            tmp_path / "secondary.pcap",
            secondary,
            link_type=link_types[1],
            epoch=SECONDARY_EPOCH,
        ),
    )


def ip_header(*, v6: bool = False, source: str | None = None, **fields: Any) -> Packet:
    if v6:
        return IPv6(src=source or GUEST6, dst=PEER6 if source in (None, GUEST6) else GUEST6)
    return IP(src=source or GUEST, dst=PEER if source in (None, GUEST) else GUEST, **fields)


class TcpOutput:
    """One guest's output on one TCP connection, addressed by stream offset.

    As server the guest answers the peer's SYN (ISN ``PEER_ISN``) and a request of
    ``request_length`` bytes; as client it opens the connection and the peer's replies are
    what it acknowledges. Either way both guests acknowledge the same peer bytes, so the
    secondary's ACKs equal the primary's.
    """

    def __init__(
        self,
        isn: int,
        *,
        server: bool = True,
        v6: bool = False,
        window: int = 64240,
        options: list[tuple[str, Any]] | None = None,
        request_length: int = 18,
    ) -> None:
        self.isn = isn
        self.server = server
        self.v6 = v6
        self.window = window
        self.options = options or []
        self.request_length = request_length
        self.packets: list[Timed] = []
        self.sport, self.dport = (GUEST_PORT, PEER_PORT) if server else (PEER_PORT, GUEST_PORT)

    def seq(self, offset: int) -> int:
        return (self.isn + 1 + offset) % MOD

    def _segment(self, time: float, flags: str, seq: int, ack: int, payload: bytes) -> Timed:
        header = TCP(
            sport=self.sport,
            dport=self.dport,
            seq=seq,
            ack=ack,
            flags=flags,
            window=self.window,
            options=self.options,
        )
        packet = ip_header(v6=self.v6) / header
        if payload:
            packet = packet / Raw(payload)
        timed = Timed(time, packet)
        self.packets.append(timed)
        return timed

    @property
    def peer_ack(self) -> int:
        """What the guest acknowledges once the peer's request (or first reply) arrived."""
        return (PEER_ISN + 1 + self.request_length) % MOD

    def open(self, time: float, options: list[tuple[str, Any]] | None = None) -> Timed:
        """SYN-ACK (server) or SYN (client)."""
        saved = self.options
        self.options = options if options is not None else [("MSS", 1460), ("WScale", 7)]
        try:
            if self.server:
                return self._segment(time, "SA", self.isn, PEER_ISN + 1, b"")
            return self._segment(time, "S", self.isn, 0, b"")
        finally:
            self.options = saved

    def data(self, time: float, offset: int, payload: bytes, flags: str = "PA") -> Timed:
        return self._segment(time, flags, self.seq(offset), self.peer_ack, payload)

    def send(self, time: float, stream: bytes, cuts: Sequence[int], step: float = 0.001) -> float:
        """Send ``stream`` from offset 0 cut at ``cuts``; returns the time after the last."""
        bounds = [0, *sorted(set(cuts) - {0, len(stream)}), len(stream)]
        for start, end in itertools.pairwise(bounds):
            self.data(time, start, stream[start:end])
            time += step
        return time

    def ack(self, time: float, offset: int) -> Timed:
        return self._segment(time, "A", self.seq(offset), self.peer_ack, b"")

    def fin(self, time: float, offset: int) -> Timed:
        return self._segment(time, "FA", self.seq(offset), self.peer_ack, b"")

    def rst(self, time: float, offset: int) -> Timed:
        return self._segment(time, "RA", self.seq(offset), self.peer_ack, b"")


def peer_segment(time: float, seq: int, ack: int, payload: bytes = b"", flags: str = "PA") -> Timed:
    """A client -> guest segment (what a capture of both directions holds besides the guest's)."""
    packet = IP(src=PEER, dst=GUEST) / TCP(
        sport=PEER_PORT, dport=GUEST_PORT, seq=seq, ack=ack, flags=flags, window=502
    )
    if payload:
        packet = packet / Raw(payload)
    return Timed(time, packet)


def udp(
    time: float, payload: bytes, *, v6: bool = False, sport: int = 53, dport: int = 5353
) -> Timed:
    return Timed(time, ip_header(v6=v6) / UDP(sport=sport, dport=dport) / Raw(payload))


def echo_reply(time: float, payload: bytes, *, ident: int = 0x1234, seq: int = 1) -> Timed:
    return Timed(time, IP(src=GUEST, dst=PEER) / ICMP(type=0, id=ident, seq=seq) / Raw(payload))


def arp_reply(time: float, target: str) -> Timed:
    """A non-IP frame from the guest's MAC (its content chosen by the test)."""
    return Timed(
        time,
        Ether(src=GUEST_MAC, dst=PEER_MAC)
        / ARP(op=2, hwsrc=GUEST_MAC, psrc=GUEST, hwdst=PEER_MAC, pdst=target),
    )


def pcapng_bytes(
    packets: Sequence[tuple[int, bytes]],
    *,
    link_type: int = LINKTYPE_ETHERNET,
    tsresol: int | None = None,
    byte_order: str = "<",
    simple: bool = False,
) -> bytes:
    """A one-interface pcapng file, by hand: scapy cannot write big-endian or tsresol."""

    def block(block_type: int, body: bytes) -> bytes:
        body += bytes(-len(body) % 4)
        length = 12 + len(body)
        return (
            struct.pack(byte_order + "II", block_type, length)
            + body
            + struct.pack(byte_order + "I", length)
        )

    shb = block(0x0A0D0D0A, struct.pack(byte_order + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    options = b""
    if tsresol is not None:
        options = struct.pack(byte_order + "HHB3x", 9, 1, tsresol) + bytes(4)
    idb = block(1, struct.pack(byte_order + "HHI", link_type, 0, 0) + options)
    out = shb + idb
    for ticks, data in packets:
        if simple:
            out += block(3, struct.pack(byte_order + "I", len(data)) + data)
        else:
            header = struct.pack(
                byte_order + "IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data)
            )
            out += block(6, header + data)
    return out
