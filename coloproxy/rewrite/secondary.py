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

SYN replay at a takeover. A client that sent its SYN shortly before the PVM died may get no
SYN-ACK: the SVM answered the mirrored SYN, but while protected its SYN-ACK goes to host P
and is dropped there (I3), and the client's next SYN comes only after its 1 s initial RTO
(RFC 6298 section 2; the SVM's own SYN-ACK retransmission is as far away). So the client's
SYN of each connection still half-open on the SVM (its SYN-ACK seen, no client ACK yet) is
kept, with the time it arrived; right after the takeover moved the SVM's port into the LAN
the shell hands these SYNs to the SVM once more (:meth:`replay_syns`). Linux answers a
repeated SYN for a request in SYN-RECEIVED by sending its SYN-ACK again at once
(``tcp_check_req``), now straight to the client: one in SYN-SENT completes the handshake
with the SVM (its ACK then teaches offset 0), one already ESTABLISHED with the PVM's ISN
answers with a duplicate or challenge ACK acknowledging the PVM's ISN + 1, which teaches the
right offset. A kept SYN is forgotten at the client's next segment of that connection (its
handshake ACK, data, RST), at a new SYN (replaced), at a checkpoint, and after the replay.

Backoff revert at a takeover. Whatever the SVM sent while protected went to host P and was
dropped there (I3); the client only ever received the PVM's copy. Data the PVM had not released
when it died (held for comparison, or produced after the kill) exists only in the SVM's
retransmission queue, and the SVM resends it only at its retransmission timeout, which may have
backed off already (in the lab, a download the comparator had held for 1.4 s before the kill
had seen two timeouts of the SVM's, 0.21 and 0.42 s apart, the third 0.87 s later). So the
client's latest ACK of each connection is kept, with the time it arrived; right after the
takeover the shell hands the SVM, for each connection heard from in the last ``max_ack_age``
seconds, ICMP "destination unreachable" messages quoting a segment of the SVM's at the client's
latest ACK moved into the SVM's space (:meth:`backoff_reverts`). Linux takes each one whose
quoted sequence number is its oldest unacknowledged byte, while a retransmission timer has
fired, as RFC 6069's sign that the timeouts were due to a broken path, not congestion
(``tcp_ld_RTO_revert``): it undoes one backoff step and, when the undone timeout has passed,
retransmits at once, now straight to the client. A connection with nothing outstanding, or not
in backoff, ignores them (an ICMP error on an established connection is a soft error: reported
only if the connection later times out). ``REVERTS_PER_CONNECTION`` copies undo that many
steps. Duplicate ACKs would not do: after a timeout Linux is in its Loss state with a
congestion window of one segment, already taken by the lost retransmission.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from coloproxy import seq
from coloproxy.errors import UsageError
from coloproxy.packet.build import tcp_unreachable
from coloproxy.packet.options import timestamps
from coloproxy.packet.parse import (
    PROTO_TCP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Malformed,
    Packet,
    parse_ip,
)
from coloproxy.packet.shift import shift_tcp_seq
from coloproxy.rewrite.ingress import IngressRewriter, RewriteOutcome, RewriteStatus, shifted_copy

# A connection learnt and not yet closed costs one entry; 65 536 is far above what one guest
# opens between two checkpoints, and the oldest go first.
MAX_CONNECTIONS: Final = 65536
# Client SYNs kept for the replay: a listener on a small Linux guest holds at most
# tcp_max_syn_backlog (128 to 1024, by memory) half-open requests; the oldest go first.
MAX_KEPT_SYNS: Final = 1024
# Only SYNs this recent are replayed. The takeover follows the PVM's death within the
# engine's failover timeout (300 ms by default) plus its takeover (40-150 ms measured), and a
# client still trying resends its SYN every second at first (RFC 6298's 1 s initial RTO;
# Linux's tcp_syn_linear_timeouts), each copy that reaches host S refreshing the kept one: a
# connection half-open for longer was not cut by this takeover.
MAX_SYN_AGE: Final = 5.0

# Connections whose client's latest ACK is kept for the backoff revert: the most recently
# active ones, as many as MAX_CONNECTIONS offsets (a guest serving more at once is rare).
MAX_ACKED_CONNECTIONS: Final = 4096
# Only connections the client was heard on this recently get a revert: a sender in backoff
# since t seconds has timed out about log2(t / 0.2 s + 1) times (Linux's 200 ms minimum RTO,
# doubling), 7 times after 30 s; the client of a connection stalled longer is likely gone.
MAX_ACK_AGE: Final = 30.0
# ICMP messages per connection: each undoes one backoff step (tcp_ld_RTO_revert), enough for
# a connection MAX_ACK_AGE into its backoff; surplus ones find no backoff and are ignored.
REVERTS_PER_CONNECTION: Final = 8

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

    def __init__(
        self,
        max_connections: int = MAX_CONNECTIONS,
        max_kept_syns: int = MAX_KEPT_SYNS,
        max_syn_age: float = MAX_SYN_AGE,
        max_acked: int = MAX_ACKED_CONNECTIONS,
        max_ack_age: float = MAX_ACK_AGE,
    ) -> None:
        self._connections: dict[_Key, _Connection] = {}
        self._max = max_connections
        self._ingress = IngressRewriter(self.sequence_offsets)
        # The client's latest SYN per four-tuple, with its arrival time, oldest first.
        self._syns: dict[_Key, tuple[float, bytes]] = {}
        self._max_syns = max_kept_syns
        self._max_syn_age = max_syn_age
        self._syns_replayed = False  # replay_syns ran: keep no more SYNs
        # The client's latest ACK per connection (its own space, the PVM's), its arrival time
        # and the segment that carried it (None once the client sent a FIN), least recently
        # heard first; the offsets are applied when the reverts are built.
        self._acks: dict[_Key, tuple[float, int, bytes | None]] = {}
        self._max_acked = max_acked
        self._max_ack_age = max_ack_age
        self._reverted = False  # backoff_reverts ran: keep no more ACKs
        self.taken_over = False
        self.evicted = 0
        self.learnt = 0
        self.syns_evicted = 0

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
            self._syns.clear()  # the SVM's half-open requests are the PVM's now

    def take_over(self) -> None:
        """The SVM serves the client from now on: rewrite its output too."""
        self.taken_over = True

    @property
    def kept_syns(self) -> int:
        """Client SYNs kept for :meth:`replay_syns`."""
        return len(self._syns)

    def replay_syns(self, now: float) -> list[bytes]:
        """The client SYNs to hand the SVM once more, right after the takeover moved its port
        into the LAN: those of connections still half-open on the SVM (its SYN-ACK seen, no
        client segment since), no older than ``max_syn_age``, oldest first. Runs once: no SYN
        is kept afterwards (from then on the SVM's SYN-ACKs reach the client directly)."""
        if not self.taken_over:
            raise UsageError("replay_syns before take_over: the SYN-ACKs would go to host P")
        syns = []
        for key, (seen, data) in self._syns.items():
            connection = self._connections.get(key)
            half_open = connection is not None and connection.offset is None
            if half_open and now - seen <= self._max_syn_age:
                syns.append(data)
        self._syns.clear()
        self._syns_replayed = True
        return syns

    def to_guest(
        self, data: bytes, checksum_partial: bool = False, *, now: float
    ) -> RewriteOutcome:
        """A client packet on its way to the SVM (arrived at ``now``): learn from it, keep it
        if it is a SYN, then shift its ACK side."""
        packet = parse_ip(data)
        if isinstance(packet, Packet) and packet.proto == PROTO_TCP and not packet.fragment:
            key = (packet.dst, packet.dport, packet.src, packet.sport, packet.vlan)
            flags = packet.flags
            if flags & TCP_SYN and not flags & TCP_ACK:
                self._connections.pop(key, None)  # a new connection on this four-tuple
                self._keep_syn(key, data, now)
            else:
                # Any other segment: the client is past SYN-SENT (or gave up with an RST).
                self._syns.pop(key, None)
                if flags & TCP_RST:
                    self._acks.pop(key, None)
                elif flags & TCP_ACK:
                    self._keep_ack(key, packet.ack, data, bool(flags & TCP_FIN), now)
                if flags & TCP_ACK:
                    connection = self._connections.get(key)
                    if connection is not None and connection.offset is None:
                        self._learn(key, connection, packet)
        return self._ingress.rewrite_parsed(data, packet, checksum_partial)

    def _keep_syn(self, key: _Key, data: bytes, now: float) -> None:
        if self._syns_replayed:
            return
        if self._syns.pop(key, None) is None and len(self._syns) >= self._max_syns:
            del self._syns[next(iter(self._syns))]
            self.syns_evicted += 1
        self._syns[key] = (now, data)

    def _keep_ack(self, key: _Key, ack: int, data: bytes, fin: bool, now: float) -> None:
        if self._reverted:
            return
        previous = self._acks.pop(key, None)
        if previous is None and len(self._acks) >= self._max_acked:
            del self._acks[next(iter(self._acks))]
        # After its FIN the client's segments are not replayed: its last ACK may close the
        # connection on the SVM, which would answer a copy with a reset.
        closing = fin or (previous is not None and previous[2] is None)
        self._acks[key] = (now, ack, None if closing else data)

    def backoff_reverts(
        self, now: float, reverts: int = REVERTS_PER_CONNECTION
    ) -> list[list[bytes]]:
        """What to hand the SVM right after the takeover moved its port into the LAN, for each
        connection the client was heard on in the last ``max_ack_age`` seconds: the client's
        latest segment once more, shifted with the current offsets, unless the client had sent
        a FIN (the SVM may have missed its ACK: one shifted with a stale offset across a
        checkpoint is dropped by the SVM, and in a stall no later one comes; a duplicate is
        harmless), then ``reverts`` ICMP
        messages, each quoting a segment of the SVM's at that ACK in the SVM's space, reported
        by the client's own address (an address on the guest's link, which the guest's
        reverse-path check accepts). Runs once, like :meth:`replay_syns`."""
        if not self.taken_over:
            raise UsageError(
                "backoff_reverts before take_over: the retransmissions would go to host P"
            )
        connections = []
        for key, (seen, ack, latest) in self._acks.items():
            if now - seen > self._max_ack_age:
                continue
            guest, guest_port, peer, peer_port, _vlan = key
            offsets = self.sequence_offsets(*key)
            svm_ack = ack if offsets is None else seq.add(ack, offsets[0])
            message = tcp_unreachable(peer, guest, peer, guest_port, peer_port, svm_ack)
            replayed = [] if latest is None else [self._ingress.rewrite(latest).payload or latest]
            connections.append(replayed + [message] * reverts)
        self._acks.clear()
        self._reverted = True
        return connections

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
        return shifted_copy(
            data,
            checksum_partial,
            lambda buffer, mutable, form: shift_tcp_seq(
                buffer, mutable, -offset, checksum=form, tsval_delta=-ts_offset
            ),
            packet,
        )

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
