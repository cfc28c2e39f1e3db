"""The lanes: the comparator's fast path for the packets most traffic is made of.

A TCP segment (neither SYN nor URG) or a UDP datagram of a known untagged IPv4 flow, with no
IP options and not a fragment, while the comparator compares normally: the fields needed are
read in place and the packet goes straight to its flow, with no ``Packet`` built. What the
lanes do is what the comparator's general path does for such a packet
(tests/test_compare_lane.py checks both give the same events); anything else they decline,
and the general path parses it from scratch.

The comparator tells the lanes of each flow it creates (``add``) and forgets (``remove``);
the lanes hold those of their kinds by guest address, peer address, guest port and peer port
as they stand in the headers.

In a batch of one side's (``Comparator.feed_many``) the TCP lane gathers consecutive plain
segments (ACK, perhaps PSH, with data) of one connection that continue each other with one
acknowledgement number into a *run* and compares it as one segment: before any other frame of
the batch, and at its end. A run starts only where the lanes' last TCP packet was the same
connection's (where connections take turns packet by packet a run would hold one segment).
What a run changes is how its bytes are compared: one comparison, one stored chunk, one kept
piece instead of one per segment (a guest that cuts its stream finely, or differently from
the other, costs a fraction per segment; docs/benchmarks.md, "Runs" and "The primary's
runs").

- The secondary's packets are never released: a run's segments are dropped as they come and
  its bytes compared at its end.
- The primary's segments of a run are held as they come (``TcpConnection.hold_in_run``), and
  released once the run's bytes are compared. A primary run holds only bytes the primary
  never sent before, so that no packet of it can be released by bytes verified earlier: a
  resend goes to ``feed_primary`` alone, as does any segment ``feed_primary`` treats apart
  (one to split as GSO, one past the rebase mark).

The decisions are the segments' (tests/test_compare_feed_many.py): the same releases and
drops, in order, the secondary's drops of a run ahead of the releases it brings; only where a
run holds a difference, the bytes of the run ahead of it (or of the other side's run it meets)
may stay unverified, their primary packets left to the checkpoint the difference asks for. A
connection gathers only with one incarnation and no FIN or RST seen
(``TcpConnection.gathers``), so that a run meets no check of the connection's fate before a
segment of it would have.
"""

from __future__ import annotations

import struct
from typing import Final

from mypy_extensions import i64

from coloproxy.compare.config import CompareConfig
from coloproxy.compare.datagram import DatagramFlow, ReorderTimers
from coloproxy.compare.events import Event, Side
from coloproxy.compare.state import Book, FlowState
from coloproxy.compare.tcp import TCP_URG, TcpConnection
from coloproxy.compare.verdicts import compared
from coloproxy.packet.parse import (
    ETH_P_IP,
    ETHERNET_HEADER_LEN,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_PSH,
    TCP_SYN,
    be32,
)

# The lanes read from the IP header: version and IHL, total length, the fragment field,
# protocol, then the 12 bytes from the source address to the destination port (the lane's flow
# key), then TCP's sequence and acknowledgement numbers, data offset and flags (for UDP the
# first 16 bits of "sequence" are the UDP length); with Ethernet framing the ethertype first.
_PORTS: Final = struct.Struct("!HH")
_ETHERTYPE_HIGH: Final = ETH_P_IP >> 8
_ETHERTYPE_LOW: Final = ETH_P_IP & 0xFF

# TCP segments the lane leaves to the general path: a SYN (it names an ISN) and URG (the urgent
# pointer is not among the fields the lane reads).
_TCP_FLAGS_OUT: Final = TCP_SYN | TCP_URG
# The TCP lane's table of recent flows: slots by the low bytes of the two ports (the peer's
# port differs between a guest's connections, and its low byte most). A power of two.
_RECENT_SLOTS: Final = 64
# Enum members read once: ``Side.PRIMARY`` is an attribute lookup through the enum's
# metaclass, about 85 ns in CPython 3.11, on every packet otherwise.
_PRIMARY: Final = Side.PRIMARY


def lane_key(key: tuple[object, ...]) -> bytes | None:
    """A lane's key for a flow key: untagged IPv4 TCP and UDP flows only, else None."""
    proto, src, dst, sport, dport, vlan = key
    if proto not in (PROTO_TCP, PROTO_UDP) or vlan != -1 or not isinstance(src, bytes):
        return None
    if len(src) != 4:
        return None
    assert isinstance(dst, bytes) and isinstance(sport, int) and isinstance(dport, int)
    return src + dst + _PORTS.pack(sport, dport)


def _slot(key: bytes) -> i64:
    """A lane key's slot in the TCP lane's table of recent flows: the low bytes of its two
    ports (the key ends with them)."""
    return (key[9] ^ key[11]) & (_RECENT_SLOTS - 1)


class Lanes:
    """The TCP and the UDP lane of one comparator; ``feed`` takes a packet or declines it."""

    def __init__(
        self, config: CompareConfig, ethernet: bool, book: Book, reorder: ReorderTimers
    ) -> None:
        # Where the IP header starts, and the shortest frame the lanes read (a test sets it
        # beyond any frame to see the general path alone).
        self.l3 = ETHERNET_HEADER_LEN if ethernet else 0
        self.min_length = self.l3 + 40
        self._book = book
        self._reorder = reorder
        self._max_held_packets = config.max_held_packets
        self._max_held_bytes = config.max_held_bytes
        self._tcp: dict[bytes, TcpConnection] = {}
        self._udp: dict[bytes, DatagramFlow] = {}
        # Flows found recently, so that a packet's flow is mostly found without a dict lookup
        # (hashing the key, a new bytes object each time, costs much more than comparing 12
        # bytes): the last flow first (mostly the one), then, for TCP, a small table by the
        # ports' low bytes, where connections interleave (docs/benchmarks.md, "Recent flows").
        # A key's entries go when its flow is added or removed. (Compared in place as three 32-bit
        # words instead, the slice saved on tcp-1 cost more where flows interleave:
        # docs/benchmarks.md, "Inlined and unboxed".)
        self._tcp_key = b""  # the last flow's, checked first
        self._tcp_last: TcpConnection | None = None
        self._tcp_keys: list[bytes] = [b""] * _RECENT_SLOTS
        self._tcp_recent: list[TcpConnection | None] = [None] * _RECENT_SLOTS
        self._udp_key = b""
        self._udp_last: DatagramFlow | None = None
        # The run (``TcpConnection.run_parts``): consecutive plain segments of one connection
        # in a batch of one side's, compared as one segment when another frame comes or the
        # batch ends (Comparator.feed_many turns ``gathering`` on and off); ``run_primary``:
        # the primary's. Its bytes are not yet among the book's stored bytes.
        self.gathering = False
        self.run: TcpConnection | None = None
        self.run_primary = False
        # A run's segments (of over 512 bytes) are views of the batch's buffer (``_add``),
        # copied once when the run is joined: a ``bytes`` slice of each (a 1.5 kB allocation
        # from malloc, a copy, a free) costs several times a view. The view of the buffer is
        # dropped when the batch ends (``drop_view``).
        self._view: memoryview | None = None
        self._viewed: bytes = b""

    def add(self, key: tuple[object, ...], flow: FlowState, proto: int) -> None:
        """A new flow of the comparator (``key`` as in its flow table): its lane takes it."""
        found = lane_key(key)
        if found is None or flow.passthrough:
            return
        self._forget(found)
        if type(flow) is TcpConnection:
            self._tcp[found] = flow
        elif type(flow) is DatagramFlow and proto == PROTO_UDP:
            self._udp[found] = flow

    def remove(self, key: tuple[object, ...]) -> None:
        """The comparator forgot the flow of ``key``."""
        found = lane_key(key)
        if found is not None:
            self._forget(found)
            lane = self._tcp if key[0] == PROTO_TCP else self._udp
            lane.pop(found, None)

    def _forget(self, found: bytes) -> None:
        """Whatever the recent flows hold for the lane key ``found``, whose flow was added or
        removed."""
        if found == self._tcp_key:
            self._tcp_key = b""
            self._tcp_last = None
        slot = _slot(found)
        if found == self._tcp_keys[slot]:
            self._tcp_keys[slot] = b""
            self._tcp_recent[slot] = None
        if found == self._udp_key:
            self._udp_key = b""
            self._udp_last = None

    def _start(self, connection: TcpConnection, number: int, ack: int, primary: bool) -> None:
        """A run of ``connection``'s starts, at sequence number ``number`` (with no bytes yet)."""
        connection.run_number = number
        connection.run_ack = ack
        self.run = connection
        self.run_primary = primary

    def _add(self, connection: TcpConnection, data: bytes, start: i64, end: i64) -> None:
        """``data[start:end]`` joins ``connection``'s run: a view, or a copy where that is as
        cheap (Python's own allocator serves objects up to 512 bytes, quickly; larger ones go
        to malloc)."""
        if end - start <= 512:
            connection.run_parts.append(data[start:end])
        else:
            view = self._view
            if view is None or data is not self._viewed:
                view = self._view = memoryview(data)
                self._viewed = data
            connection.run_parts.append(view[start:end])
        connection.run_length += end - start

    def drop_view(self) -> None:
        """The batch ended: the view of its buffer goes (a run's parts keep theirs)."""
        self._view = None
        self._viewed = b""

    def flush(self, now: float, out: list[Event]) -> None:
        """Compare the run, if there is one (events into ``out``)."""
        run = self.run
        if run is not None:
            self.run = None
            if self.run_primary:
                run.feed_primary_run(now, self._book, out)
            else:
                run.feed_run(now, self._book, out)

    def feed(
        self,
        side: Side,
        data: bytes,
        begin: int,
        stop: int,
        now: float,
        token: object,
        out: list[Event],
    ) -> bool:
        """Take the packet ``data[begin:stop]`` of ``side`` (events into ``out``) and say True,
        or say False and leave it to the general path. It is read in place: ``data`` may be a
        whole receive buffer. The comparator calls it only while it compares."""
        if stop - begin < self.min_length:
            return False
        # The header fields, read byte by byte into i64 locals: compiled (setup.py), machine
        # integers (no tag checks, no object but the key; a struct unpack would make eleven);
        # not compiled, plain ints.
        l3: i64 = begin + self.l3
        vhl: i64 = data[l3]
        total: i64 = (data[l3 + 2] << 8) | data[l3 + 3]
        frag: i64 = (data[l3 + 6] << 8) | data[l3 + 7]
        proto: i64 = data[l3 + 9]
        if not (
            vhl == 0x45
            and (
                l3 == begin
                or (data[begin + 12] == _ETHERTYPE_HIGH and data[begin + 13] == _ETHERTYPE_LOW)
            )
            and not frag & 0x3FFF  # neither MF nor a fragment offset
            and l3 + total <= stop
        ):
            return False
        book = self._book
        # The lane's flow key: source and destination address and port.
        key = data[l3 + 12 : l3 + 24]  # bytes, as annotated (compiled, feed insists)
        number = be32(data, l3 + 24)
        l4: i64 = l3 + 20
        if proto == PROTO_TCP:
            # ``again``: the lanes' last TCP packet was this connection's too. Only then may a
            # packet start a run: where connections take turns packet by packet, a run would
            # hold one segment and cost more than it saves.
            again = key == self._tcp_key
            if again:
                connection = self._tcp_last
            else:
                slot = _slot(key)
                if key == self._tcp_keys[slot]:
                    connection = self._tcp_recent[slot]
                else:
                    connection = self._tcp.get(key)
                    if connection is not None:
                        self._tcp_keys[slot] = key
                        self._tcp_recent[slot] = connection
                if connection is not None:
                    self._tcp_key = key
                    self._tcp_last = connection
            run = self.run
            offset: i64 = data[l3 + 32]
            flags: i64 = data[l3 + 33]
            end: i64 = l3 + total
            start: i64 = l4 + (offset >> 4) * 4
            if (
                connection is not None
                and offset >= 0x50  # a TCP data offset of at least 20 bytes
                and start <= end
                # SYNs name ISNs, URG needs the urgent pointer: the general path
                and not flags & _TCP_FLAGS_OUT
                # not book.over_bounds(end - start), without the call
                and book.held_packets < self._max_held_packets
                and book.stored_bytes + (end - start) + (run.run_length if run is not None else 0)
                <= self._max_held_bytes
            ):
                connection.last_active = now
                ack = be32(data, l3 + 28)
                length: i64 = end - start
                if side is _PRIMARY:
                    held = book.new_held(token, now, connection)
                    if self.gathering and length and flags | TCP_PSH == TCP_ACK | TCP_PSH:
                        if (
                            run is connection
                            and connection.run_continues(number, ack)
                            and connection.hold_in_run(number, ack, length, held, book, False)
                        ):
                            self._add(connection, data, start, end)
                            return True
                        if run is not None:
                            self.flush(now, out)
                            run = None
                        if again and connection.hold_in_run(number, ack, length, held, book, True):
                            self._start(connection, number, ack, True)
                            self._add(connection, data, start, end)
                            return True
                    if run is not None:
                        self.flush(now, out)
                    connection.feed_primary(
                        number, ack, flags, data[start:end], held, now, book, out
                    )
                else:
                    out.append(compared(token))
                    if (
                        self.gathering
                        and length
                        and flags | TCP_PSH == TCP_ACK | TCP_PSH
                        and again  # (so is a run of this connection's going on)
                        and connection.gathers()
                    ):
                        if not (run is connection and connection.run_continues(number, ack)):
                            if run is not None:
                                self.flush(now, out)
                            self._start(connection, number, ack, False)
                        self._add(connection, data, start, end)
                        return True
                    if run is not None:
                        self.flush(now, out)
                    connection.feed_secondary(number, ack, flags, data[start:end], now, book, out)
                return True
        elif proto == PROTO_UDP:
            if key == self._udp_key:
                datagrams = self._udp_last
            else:
                datagrams = self._udp.get(key)
                if datagrams is not None:
                    self._udp_key = key
                    self._udp_last = datagrams
            length = number >> 16  # the UDP length field, where TCP's seq would be
            if (
                datagrams is not None
                and 8 <= length <= total - 20
                and book.held_packets < self._max_held_packets
                and book.stored_bytes + (length - 8) <= self._max_held_bytes
            ):
                datagrams.last_active = now
                payload = bytes(data[l4 + 8 : l4 + length])
                if side is _PRIMARY:
                    held = book.new_held(token, now, datagrams)
                    if datagrams.feed_primary(payload, held, now, book, out):
                        self._reorder.arm(datagrams)
                else:
                    out.append(compared(token))
                    if self.run is not None:
                        self.flush(now, out)
                    if datagrams.feed_secondary(payload, now, book, out):
                        self._reorder.arm(datagrams)
                return True
        return False
