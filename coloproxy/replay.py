"""Compare two captures as the live proxy would: replay them through one comparator (shell).

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

The result is a :class:`~coloproxy.report.CompareResult`; :mod:`coloproxy.report` renders it.
Reading the files is :mod:`coloproxy.pcap`'s.
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
from typing import Final

from coloproxy.compare import Comparator, CompareConfig, Framing, Side
from coloproxy.compare.events import CheckpointNeeded, Event, MalformedPacket
from coloproxy.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    RAW_IP_LINK_TYPES,
    Capture,
    Record,
)
from coloproxy.report import (
    CaptureSummary,
    CompareResult,
    Divergence,
    MalformedInput,
    PacketRef,
    SkipReason,
)

# Malformed packets listed one by one in the result; past this only the counts go on (a
# capture of garbage must not grow the report without bound).
MAX_MALFORMED_LISTED: Final = 100

_ETH_P_IP: Final = 0x0800
_ETH_P_IPV6: Final = 0x86DD
_VLAN_ETHERTYPES: Final = frozenset({0x8100, 0x88A8})
_MAX_VLAN_TAGS: Final = 2  # the same bound as the packet parser
_U16: Final = struct.Struct("!H")


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
