"""Host S: the secondary's TCP sequence spaces, learnt on its own host (pure).

Theory of operation
-------------------
Each guest picks its own initial sequence number (ISN) and timestamp clock for a connection
it accepts, so between two checkpoints the SVM's connections differ from the PVM's by two
offsets: ``SVM ISN - PVM ISN`` and ``SVM TSval - PVM TSval``. The client only ever sees the
PVM's numbers. Two things need the offsets:

- While protected, the client's packets mirrored to the SVM must have their ACK, SACK edges
  and timestamp echo moved into the SVM's space (:class:`IngressRewriter`), or the SVM would
  answer with challenge ACKs or resets.
- After a takeover the SVM serves the client itself: its sequence numbers and TSvals must be
  moved back into the PVM's space for every connection it inherited from the current epoch,
  or the client drops its segments and the connection dies. This is why the offsets live on
  host S (like QEMU's filter-rewriter, which is also there): host P is gone by then.

How they are learnt, on host S alone (QEMU's filter-rewriter does the same): the SVM's
SYN-ACK (seen on its way out) gives the SVM's ISN and TSval; the client's first ACK of the
handshake (seen on its way in, whether mirrored by host P or, after a takeover, straight from
the LAN) acknowledges the PVM's ISN + 1 and echoes the PVM's TSval. Until that ACK, a server
in SYN-RECEIVED cannot have sent data, so the first client ACK seen is that one.

When they reset: the SVM loading a checkpoint makes it a copy of the PVM, so every offset
is 0 from then on (:meth:`checkpoint_applied`, on the secondary QEMU's RESUME). After a
takeover there are no checkpoints any more: the table is kept for the rest of each
connection's life (bounded, oldest evicted first), and connections opened since learn 0.

A new SYN from the client for the same four-tuple forgets the old connection (port reuse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from coloproxy import seq
from coloproxy.packet.checksum import ChecksumForm, checksum_field_offset, tcp_udp_checksum
from coloproxy.packet.options import timestamps
from coloproxy.packet.parse import PROTO_TCP, TCP_ACK, TCP_SYN, Malformed, Packet, parse_ip
from coloproxy.packet.rewrite import shift_tcp_seq
from coloproxy.rewrite.ingress import IngressRewriter, RewriteOutcome, RewriteStatus

# A connection learnt and not yet closed costs one entry; 65 536 is far above what one guest
# opens between two checkpoints, and the oldest go first.
MAX_CONNECTIONS: Final = 65536

_Key = tuple[bytes, int, bytes, int, int]  # guest, guest port, peer, peer port, vlan


@dataclass(slots=True)
class _Connection:
    isn: int  # the SVM's ISN, from its SYN-ACK
    tsval: int | None  # the TSval of the SVM's latest SYN-ACK, None without timestamps
    offset: int | None = None  # SVM ISN - PVM ISN (signed), once the client's ACK came
    ts_offset: int = 0  # SVM TSval - PVM TSval (signed)


class SecondaryRewriter:
    """Offsets per connection, learnt from both directions; rewrites for queue S-in and, after
    :meth:`take_over`, for the SVM's own output."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS) -> None:
        self._connections: dict[_Key, _Connection] = {}
        self._max = max_connections
        self._ingress = IngressRewriter(self.sequence_offsets)
        self.taken_over = False
        self.evicted = 0
        self.learnt = 0

    def __len__(self) -> int:
        return len(self._connections)

    def sequence_offsets(
        self, guest: bytes, guest_port: int, peer: bytes, peer_port: int, vlan: int = -1
    ) -> tuple[int, int] | None:
        """(ISN offset, TSval offset), SVM minus PVM; None while unknown (then 0 is right:
        nothing learnt means the connection predates the last checkpoint, or is new)."""
        connection = self._connections.get((guest, guest_port, peer, peer_port, vlan))
        if connection is None or connection.offset is None:
            return None
        return connection.offset, connection.ts_offset

    def checkpoint_applied(self) -> None:
        """The SVM now holds the PVM's state: every connection's offsets are 0."""
        if not self.taken_over:
            self._connections.clear()

    def take_over(self) -> None:
        """The SVM serves the client from now on: rewrite its output too."""
        self.taken_over = True

    def to_guest(self, data: bytes, checksum_partial: bool = False) -> RewriteOutcome:
        """A client packet on its way to the SVM: learn from it, then shift its ACK side."""
        packet = parse_ip(data)
        if isinstance(packet, Packet) and packet.proto == PROTO_TCP and not packet.fragment:
            key = (packet.dst, packet.dport, packet.src, packet.sport, packet.vlan)
            flags = packet.flags
            if flags & TCP_SYN and not flags & TCP_ACK:
                self._connections.pop(key, None)  # a new connection on this four-tuple
            elif flags & TCP_ACK:
                connection = self._connections.get(key)
                if connection is not None and connection.offset is None:
                    self._learn(key, connection, packet)
        return self._ingress.rewrite(data, checksum_partial)

    def from_guest(self, data: bytes, checksum_partial: bool = False) -> RewriteOutcome:
        """A packet of the SVM's on its way out: learn from a SYN-ACK; after a takeover,
        shift its sequence number and TSval into the PVM's space."""
        packet = parse_ip(data)
        if isinstance(packet, Malformed):
            return RewriteOutcome(RewriteStatus.MALFORMED)
        if packet.proto != PROTO_TCP:
            return RewriteOutcome(RewriteStatus.NOT_TCP)
        if packet.fragment:
            return RewriteOutcome(RewriteStatus.FRAGMENT)
        key = (packet.src, packet.sport, packet.dst, packet.dport, packet.vlan)
        if packet.flags & TCP_SYN and packet.flags & TCP_ACK:
            self._saw_syn_ack(key, packet)
        if not self.taken_over:
            return RewriteOutcome(RewriteStatus.NO_OFFSET)
        offsets = self.sequence_offsets(*key)
        if offsets is None:
            return RewriteOutcome(RewriteStatus.NO_OFFSET)
        offset, ts_offset = offsets
        if offset == 0 and ts_offset == 0:
            return RewriteOutcome(RewriteStatus.ZERO_OFFSET)
        buffer = bytearray(data)
        mutable = parse_ip(buffer)  # type: ignore[arg-type]  # the parser reads bytearrays alike
        if not isinstance(mutable, Packet):  # parsed once already: cannot differ
            return RewriteOutcome(RewriteStatus.MALFORMED)
        form = ChecksumForm.PARTIAL if checksum_partial else ChecksumForm.FULL
        shift_tcp_seq(buffer, mutable, -offset, checksum=form, tsval_delta=-ts_offset)
        if checksum_partial:
            field = checksum_field_offset(mutable)
            buffer[field : field + 2] = tcp_udp_checksum(mutable).to_bytes(2, "big")
        return RewriteOutcome(RewriteStatus.SHIFTED, bytes(buffer))

    def _saw_syn_ack(self, key: _Key, packet: Packet) -> None:
        stamps = timestamps(packet)
        tsval = None if stamps is None else stamps[0]
        connection = self._connections.get(key)
        if connection is not None and connection.isn == packet.seq:
            # A retransmitted SYN-ACK: the client may echo this one's TSval.
            if connection.offset is None:
                connection.tsval = tsval
            return
        if key in self._connections:
            del self._connections[key]  # an older connection on the four-tuple: forgotten
        elif len(self._connections) >= self._max:
            del self._connections[next(iter(self._connections))]
            self.evicted += 1
        self._connections[key] = _Connection(packet.seq, tsval)

    def _learn(self, key: _Key, connection: _Connection, packet: Packet) -> None:
        offset = seq.diff(connection.isn, seq.add(packet.ack, -1))
        ts_offset = 0
        stamps = timestamps(packet)
        if connection.tsval is not None and stamps is not None:
            ts_offset = seq.diff(connection.tsval, stamps[1])
        self.learnt += 1
        if offset == 0 and ts_offset == 0:
            del self._connections[key]  # nothing to shift, ever: keep the table small
            return
        connection.offset = offset
        connection.ts_offset = ts_offset
