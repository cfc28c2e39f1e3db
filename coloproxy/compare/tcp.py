"""TCP: align the primary's and the secondary's byte streams and compare them.

Theory of operation
-------------------
Each side's stream is addressed by *stream offset*: bytes after the side's SYN, so offset 0
is the first data byte whatever the side's ISN (``seq.diff(seq, isn) - 1``; the SYN itself
sits at -1). Segmentation, retransmissions, overlaps and reordering then vanish: what is
compared is bytes at offsets, not segments.

Each side keeps the bytes it sent that the other side has not sent yet (``chunks``, sorted
and disjoint). New bytes are cut against the *verified* range set (both sides sent them and
they were equal), then against the side's own chunks, and what is left is compared with the
other side's chunks where they overlap; the overlap becomes verified and is removed from
both, the rest is stored. Bytes that differ are a divergence at the exact offset (reason
``payload``).

Retransmissions are compared too: a resend normally carries the same bytes, but a page given
to sendfile or a zero-copy send can change before the resend reads it. Bytes at verified
offsets are compared with a copy of the verified bytes kept for that (``kept.py``: the last
``retransmit_window`` bytes per connection, ``max_retransmit_bytes`` in all), bytes this side
sent before and that still wait with what it sent then; other bytes are a divergence of its
own, ``retransmission-differs``, whichever side resent them. Verified bytes no longer kept
cannot be compared: a primary resend of them is held for the checkpoint it asks for
(``retransmission-unkept``), never released; a secondary resend of them is not compared (the
secondary's output is never released, so nothing leaves unchecked; only a difference in it
would go unseen).

A held primary segment is released when, in stream order per connection (a segment carrying
earlier bytes than held ones, a retransmission or a piece of a split GSO packet, goes before
them; bytes after a split packet wait until its pieces are back: ``split_end``):
- its data range is verified,
- its SYN/FIN/RST is matched by the secondary (same FIN offset; a RST against a RST),
- its urgent pointer (URG) names a stream offset the secondary's named too, and
- its ACK is covered by the secondary's highest ACK (ACK gating: releasing an ACK the
  secondary has not sent would let the client discard bytes the secondary never received;
  pure ACKs obey the same rule).
The connection's fate is compared too: FIN against RST, FINs at different offsets, data sent
past the other side's FIN or RST, SYN against RST. And the secondary's FIN, RST (a RST after
its FIN too: one client would see a clean close, the other an abort) and urgent pointers
wait for the primary's as its bytes do (``Signal``, ``secondary_timeout``): one the primary
does not send in that time is a divergence (``fate``, ``urgent``). QEMU's colo-compare
releases every zero-payload segment uncompared and compares no urgent pointer, so it misses
all of these.

Urgent data: a client without SO_OOBINLINE reads the byte before the urgent pointer out of
band and gets SIGURG, so URG and its pointer are output. The pointer is compared as the stream
offset it names (segment offset + pointer), which is the same whatever the segmentation;
0xFFFF (Linux: "more than 64 KiB ahead") names none and is not compared. The comparator's
lane leaves URG segments to the general path, which reads the pointer.

ISNs: a side's ISN is learned from its SYN (guest as client) or SYN-ACK (guest as server).
A connection first seen without a SYN uses one shared base for both sides: after a checkpoint
both guests hold the same TCP state, ISNs included, so equal sequence numbers mean equal
positions. Such a base is a guess (``provisional``): if the side's SYN comes after all (it
was reordered) and names another ISN while data, a FIN or a RST was placed by the guess,
those were compared at offsets not theirs, and the connection diverges (``fate``) rather
than release anything on that comparison. ``reset_epoch`` (after a checkpoint) makes the
secondary's ISN and highest ACK equal to the primary's, and moves both sides' base of offsets
up to the primary's position, so that offsets of an epoch stay far below 2**31
(``REBASE_AT``).

Incarnations: a four-tuple is reused with new ISNs, and the side that runs behind still sends
the end of the old connection after the other side's new SYN-ACK. A SYN that names another
ISN than the side's SYN did, or a SYN-ACK that acknowledges another peer ISN than the other
side's SYN-ACK did (the peer's SYN reaches both guests, so both SYN-ACKs of one connection
acknowledge the same number), opens a new incarnation: what was compared so far moves into
an earlier one (``older``, at most ``MAX_INCARNATIONS`` kept), with its held packets,
chunks, verified and kept bytes, and the new one starts afresh. Each side has its place in
that chain (``at_primary``, ``at_secondary``): the incarnation its last SYN opened. A SYN is
placed by the ISN it names if the side's SYN named it before, else by the peer ISN it
acknowledges, else in the next incarnation the side has not opened (past the newest: a new
one). Any other segment belongs to its side's place, unless its sequence number lies where
that side's segments of an earlier incarnation lay (``span``: a late retransmission, an ACK
from TIME-WAIT). A side placed in an incarnation no longer kept cannot be compared: its
primary packets are held until a checkpoint releases them (their timeout asks for one), its
secondary packets are ignored. After a synced checkpoint the secondary is where the primary
is.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Final

from coloproxy import seq
from coloproxy.compare.events import (
    EVIDENCE_BYTES,
    Event,
    Evidence,
    Flow,
    Reason,
    Release,
    ReleaseReason,
    Split,
)
from coloproxy.compare.kept import KeptBudget, KeptBytes
from coloproxy.compare.ranges import RangeSet
from coloproxy.compare.state import (
    NEED_ACK,
    NEED_CHECKPOINT,
    NEED_FIN,
    NEED_RST,
    NEED_SYN,
    NEED_URG,
    Book,
    FlowState,
    Held,
    Signal,
    Stored,
    difference,
)
from coloproxy.packet.parse import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

PROTOCOL: Final = "tcp"
TCP_URG: Final = 0x20
# An urgent pointer of 0xFFFF says "beyond what this segment's 16 bits can reach" (Linux sends
# it while the real pointer is more than 64 KiB ahead): no stream offset, so not compared.
URGENT_BEYOND: Final = 0xFFFF
# ``TcpSide.high`` of a side that has sent no data (in this epoch): below every offset.
NOTHING_SENT: Final = -(1 << 60)
# Urgent offsets remembered per side and epoch: a retransmission names a recent one again.
URGENT_MARKS: Final = 64
# Incarnations of one four-tuple kept apart, the newest included (``_route``).
MAX_INCARNATIONS: Final = 4
# Signal kinds (Signal.kind).
FIN: Final = "FIN"
RST: Final = "RST"
URG: Final = "URG"
# Read once: an enum member is an attribute lookup through the enum's metaclass (about 85 ns).
_MATCHED: Final = ReleaseReason.MATCHED


class TcpSide:
    __slots__ = (
        "chunks",
        "ending",
        "fin",
        "high",
        "isn",
        "isn_from_syn",
        "max_ack",
        "provisional",
        "rst",
        "signals",
        "syn",
        "syn_ack",
        "syn_seq",
        "urgent",
    )

    def __init__(self) -> None:
        # ``isn`` is the base of stream offsets: the ISN at first, moved forward at each
        # checkpoint (see ``reset_epoch``); ``syn_seq`` is the ISN the side's SYN named.
        self.isn: int | None = None
        self.provisional = False  # ``isn`` is a guess taken mid-stream (see ``_base``)
        self.isn_from_syn = False
        self.syn_seq: int | None = None
        # The acknowledgement number of that SYN-ACK (-1: none): the peer's ISN + 1, the same
        # on both sides for one incarnation, so it tells incarnations apart (``_route``).
        self.syn_ack = -1
        self.max_ack: int | None = None
        self.chunks: list[Stored] = []
        self.syn = False  # a SYN was seen in this epoch
        self.fin: int | None = None  # stream offset of the FIN, in this epoch
        self.rst: int | None = None  # stream offset of the RST, in this epoch
        # End of the highest data sent, in this epoch; NOTHING_SENT before any (an int, not
        # None: compiled, an optional int is an object, made anew for every segment).
        self.high = NOTHING_SENT
        self.ending: str | None = None  # "FIN" or "RST", whichever came first in this epoch
        self.urgent: list[int] = []  # stream offsets urgent pointers named, in this epoch
        self.signals: list[Signal] = []  # the secondary's: FIN/RST/URG awaiting the primary's

    def reset(self) -> None:
        self.chunks = []
        self.ending = None
        self.syn = False
        self.fin = None
        self.rst = None
        self.high = NOTHING_SENT
        self.urgent = []
        for signal in self.signals:
            signal.live = False
        self.signals = []


# Stream offsets are signed 32-bit distances from the base (RFC 1982 arithmetic holds within
# 2**31). Past this many bytes in one epoch the connection asks for a checkpoint, whose
# completion moves the base up to the current position; the verified ranges of one epoch then
# never meet offsets that wrapped around to them (which would release bytes unchecked, I1).
REBASE_AT: Final = 1 << 30


class TcpConnection(FlowState):
    __slots__ = (
        "at_primary",
        "at_secondary",
        "earlier",
        "kept",
        "older",
        "primary",
        "rebase_asked",
        "rewritten",
        "run_ack",
        "run_length",
        "run_number",
        "run_parts",
        "secondary",
        "span",
        "split_end",
        "stranded",
        "verified",
    )

    def __init__(
        self,
        key: tuple[object, ...],
        label: Flow,
        now: float,
        budget: KeptBudget,
        rewritten: bool = False,
    ) -> None:
        super().__init__(key, label, now)
        self.primary = TcpSide()
        self.secondary = TcpSide()
        self.verified = RangeSet()
        self.kept = KeptBytes(budget)
        self.rebase_asked = False
        # A split packet's segments are on their way back up to this stream offset (-1:
        # none): nothing held past it is released before them, or the client would see the
        # stream out of order and the PVM might retransmit (a SACK hole).
        self.split_end = -1
        # The secondary's segments are in the primary's sequence space, all but its SYN
        # (QEMU's filter-rewriter: CompareConfig.secondary_seq "rewritten").
        self.rewritten = rewritten
        # Earlier connections on the same four-tuple, oldest first, while their last packets
        # may still come (see "Incarnations" in the module doc); ``self`` is the newest. The
        # incarnation each side is in (its last SYN's): an earlier one for a side that runs
        # behind, None for a side in one no longer kept (its packets cannot be compared).
        self.older: list[TcpConnection] = []
        self.earlier = False  # this is one of another connection's ``older``
        self.at_primary: TcpConnection | None = self
        self.at_secondary: TcpConnection | None = self
        # On an earlier incarnation: the sequence numbers each side used, [primary low,
        # primary high, secondary low, secondary high] (absolute; -1 where unknown).
        self.span: list[int] = [-1, -1, -1, -1]
        # Held primary packets that no incarnation kept can match: a checkpoint releases them.
        self.stranded: list[Held] = []
        # A run: consecutive plain segments of one side in a batch, gathered by the lanes
        # (lanes.py, ``Lanes.run``), compared as one segment before any other frame is fed
        # and when the batch ends. ``run_length`` 0: no run. The primary's segments of a run
        # are held one by one as they come (``hold_in_run``); only their bytes wait here.
        self.run_parts: list[bytes | memoryview] = []  # (Lanes._add)
        self.run_length = 0
        self.run_number = 0  # the first segment's sequence number
        self.run_ack = 0

    def idle(self) -> bool:
        # Forgetting a connection whose sides have different ISNs would make its next
        # segments compare at wrong offsets; keep it until a checkpoint equalises them.
        return (
            not self.held
            and not self.primary.chunks
            and not self.secondary.chunks
            and not self.secondary.signals
            and self.primary.isn == self.secondary.isn
            and not self.stranded
            and all(earlier.idle() for earlier in self.older)
        )

    def isn_offset(self) -> int | None:
        """secondary ISN - primary ISN (mod 2**32)."""
        if self.primary.isn is None or self.secondary.isn is None:
            return None
        return (self.secondary.isn - self.primary.isn) & 0xFFFFFFFF

    def take_held(self) -> list[Held]:
        """Every held primary packet of every incarnation, taken away (for a checkpoint)."""
        held = self.drain()
        held.extend(self.stranded)
        self.stranded = []
        for earlier in self.older:
            held.extend(earlier.drain())
        return held

    def forget(self, book: Book) -> None:
        """The connection leaves the flow table: give back what it keeps."""
        self.kept.clear()
        for earlier in self.older:
            earlier.kept.clear()

    # -- epoch ---------------------------------------------------------------------------

    def reset_epoch(self, book: Book, synced: bool = True) -> None:
        """After a checkpoint: the secondary holds the primary's state (when ``synced``)."""
        self.split_end = -1
        primary, secondary = self.primary, self.secondary
        for stored in primary.chunks:
            book.stored_bytes -= stored.end - stored.start
        for stored in secondary.chunks:
            stored.live = False
            book.stored_bytes -= stored.end - stored.start
        # Move both bases up to where the primary's stream stands, so that offsets of the new
        # epoch start near 0 (REBASE_AT). Both move by the same amount: the ISN offset the
        # S-in rewrite uses (secondary base - primary base) does not change.
        shift = primary.high
        if shift > 0:
            if primary.isn is not None:
                primary.isn = seq.add(primary.isn, shift)
            if secondary.isn is not None:
                secondary.isn = seq.add(secondary.isn, shift)
        primary.reset()
        secondary.reset()
        self.verified.clear()
        # Retransmissions of bytes sent before the checkpoint come from both guests alike
        # (the secondary is a copy of the primary now): they are compared with each other.
        self.kept.clear()
        if synced:
            if primary.isn is not None:
                secondary.isn = primary.isn
                secondary.provisional = primary.provisional
                secondary.isn_from_syn = primary.isn_from_syn
                secondary.syn_seq = primary.syn_seq
            secondary.max_ack = primary.max_ack
        self.diverged = False
        self.timed_out = False
        self.rebase_asked = False
        for earlier in self.older:
            earlier.reset_epoch(book, synced)
        if synced:  # the secondary is where the primary is now, in the same incarnation
            self.at_secondary = self.at_primary

    # -- input ---------------------------------------------------------------------------

    def _learn_isn(
        self,
        primary_side: bool,
        number: int,
        flags: int,
        ack: int,
        book: Book,
        out: list[Event] | None = None,
    ) -> int:
        """The base of the side's offsets, learned from this segment if it is not known yet.
        A SYN of another connection on the same four-tuple starts a new incarnation
        (``_renew``). Returns the base for this segment's own position (for a SYN, its own
        ISN: the secondary's SYN names the secondary's even when its other segments were
        rewritten into the primary's space)."""
        side = self.primary if primary_side else self.secondary
        if not flags & TCP_SYN:
            isn = side.isn
            if isn is None:
                other = self.secondary if primary_side else self.primary
                isn = other.isn
                if isn is None:
                    # First seen mid-stream: one shared base for both sides (see module doc).
                    other.isn = isn = seq.add(number, -1)
                    other.provisional = True
                side.isn = isn
                # a guess, but for a rewritten secondary taking the primary's SYN's ISN
                side.provisional = (
                    not (self.rewritten and not primary_side and other.isn_from_syn)
                    or other.provisional
                )
            return isn
        if not self.earlier and self._opens_another(primary_side, number, flags, ack):
            # A new connection on the same four-tuple: nothing of the old alignment may carry
            # over, or bytes verified for the old connection would release the new one's
            # unchecked (I1). (``_route`` gives an earlier incarnation only its own SYNs.)
            self._renew(primary_side, book)
            side = self.primary if primary_side else self.secondary
        side.syn_ack = ack if flags & TCP_ACK else -1
        if side.isn_from_syn and side.isn is not None:
            return number if self.rewritten else side.isn  # its SYN again
        side.isn_from_syn = True
        side.syn_seq = number
        if not self.rewritten:
            self._base(side, primary_side, number, book, out)
            return number
        # Rewritten: both sides count offsets from the primary's ISN.
        primary, secondary = self.primary, self.secondary
        if primary_side:
            self._base(primary, True, number, book, out)
            self._base(secondary, False, number, book, out)
        elif primary.isn_from_syn and primary.isn is not None:
            self._base(secondary, False, primary.isn, book, out)
        # else: the primary's SYN is still to come, and with it the base; secondary data
        # before it (already in the primary's space) takes the shared mid-stream base.
        return number

    def _base(
        self, side: TcpSide, primary_side: bool, base: int, book: Book, out: list[Event] | None
    ) -> None:
        """Set a side's base of offsets from a SYN. If the side had placed data, a FIN or a RST
        by a base guessed mid-stream (its SYN came late, reordered) and this one differs,
        those were compared at offsets that are not theirs: nothing of that comparison may
        release anything, so the connection diverges (the checkpoint releases it)."""
        if (
            out is not None
            and side.provisional
            and side.isn is not None
            and side.isn != base
            and (side.high != NOTHING_SENT or side.ending is not None)
            and not self.diverged
        ):
            evidence = Evidence.without_bytes(
                f"the {'primary' if primary_side else 'secondary'}'s SYN came after"
                " segments placed by a base it contradicts",
                offset=-1,
            )
            self._diverge(Reason.FATE, evidence, book, out)
        side.isn = base
        side.provisional = False

    def _opens_another(self, primary_side: bool, number: int, flags: int, ack: int) -> bool:
        """Whether a SYN belongs to another connection than this incarnation's: the side's
        SYN named another ISN, or (the side's first) it is a SYN-ACK answering another SYN of
        the peer than the other side's SYN-ACK did."""
        side, other = (
            (self.primary, self.secondary) if primary_side else (self.secondary, self.primary)
        )
        if side.isn_from_syn:
            return number != side.syn_seq
        return bool(flags & TCP_ACK) and other.syn_ack >= 0 and ack != other.syn_ack

    def _renew(self, primary_side: bool, book: Book) -> None:
        """A new incarnation of the four-tuple, opened by one side's SYN: what was compared so
        far moves into an earlier incarnation, which takes the old connection's late packets
        (``_route``); this one starts afresh."""
        if len(self.older) >= MAX_INCARNATIONS - 1:
            # The oldest is forgotten: nothing can match its held packets any more; they time
            # out and a checkpoint releases them. A side still in it is in none now.
            oldest = self.older.pop(0)
            self.stranded.extend(oldest.drain())
            oldest._forget_alignment(book)
            if self.at_primary is oldest:
                self.at_primary = None
            if self.at_secondary is oldest:
                self.at_secondary = None
        moved = TcpConnection(self.key, self.label, self.last_active, self.kept.budget)
        moved.earlier = True
        moved.rewritten = self.rewritten
        moved.primary, moved.secondary = self.primary, self.secondary
        moved.verified, moved.kept = self.verified, self.kept
        moved.held, moved.head = self.held, self.head
        moved.diverged, moved.timed_out = self.diverged, self.timed_out
        moved.rebase_asked = self.rebase_asked
        for held in moved.held[moved.head :]:
            held.flow = moved
        for side in (moved.primary, moved.secondary):
            for stored in side.chunks:
                stored.flow = moved
            for signal in side.signals:
                signal.flow = moved
        span = moved.span
        for index, side in enumerate((moved.primary, moved.secondary)):
            # Only a side whose offsets count from its SYN's ISN (moved up by checkpoints) has
            # a span to tell: a base taken mid-stream may lie anywhere.
            if side.isn is not None and side.syn_seq is not None and side.isn_from_syn:
                top = max(side.high, 0, (side.fin or 0) + 1, side.rst or 0)
                high = seq.add(side.isn, top + 1)
                if 0 <= seq.diff(high, side.syn_seq) <= REBASE_AT:
                    span[2 * index] = side.syn_seq
                    span[2 * index + 1] = high
        self.older.append(moved)
        if self.at_primary is self:
            self.at_primary = moved
        if self.at_secondary is self:
            self.at_secondary = moved
        if primary_side:
            self.at_primary = self
        else:
            self.at_secondary = self
        self.primary = TcpSide()
        self.secondary = TcpSide()
        self.verified = RangeSet()
        self.kept = KeptBytes(moved.kept.budget)
        self.held = []
        self.head = 0
        self.diverged = False
        self.timed_out = False
        self.rebase_asked = False

    def _route(
        self, primary_side: bool, number: int, flags: int, ack: int, length: int
    ) -> TcpConnection | None:
        """The incarnation a segment belongs to (``older`` is not empty): ``self``, an earlier
        one, or None for one no longer kept. Each side goes through the incarnations in order;
        a SYN names its incarnation (by its own ISN if seen before, else by the peer's ISN
        that a SYN-ACK acknowledges), and any other segment belongs to its side's current
        incarnation, unless its sequence number lies where the side's segments of an earlier
        incarnation lay (a late retransmission, an ACK from TIME-WAIT)."""
        chain = [*self.older, self]
        at = self.at_primary if primary_side else self.at_secondary
        if flags & TCP_SYN:
            target: TcpConnection | None = None
            for incarnation in chain:
                mine = incarnation.primary if primary_side else incarnation.secondary
                if mine.syn_seq is not None and mine.syn_seq == number:
                    target = incarnation
                    break
            if target is None and flags & TCP_ACK:
                for incarnation in chain:
                    mine = incarnation.primary if primary_side else incarnation.secondary
                    other = incarnation.secondary if primary_side else incarnation.primary
                    if mine.syn_seq is None and other.syn_ack == ack:
                        target = incarnation
                        break
            if target is None:
                # The next incarnation this side has not opened, whose peer ISN (if known)
                # this SYN does not contradict; past the newest, a new incarnation (``self``
                # renews when it learns the ISN).
                start = chain.index(at) + 1 if at is not None else len(chain)
                for incarnation in chain[start:]:
                    mine = incarnation.primary if primary_side else incarnation.secondary
                    other = incarnation.secondary if primary_side else incarnation.primary
                    if mine.syn_seq is None and not (flags & TCP_ACK and other.syn_ack >= 0):
                        target = incarnation
                        break
                if target is None and at is self:
                    target = self
            if primary_side:
                self.at_primary = target
            else:
                self.at_secondary = target
            return target
        if at is None:
            return None
        index = 0 if primary_side else 2
        for incarnation in chain:
            if incarnation is at:
                break
            span = incarnation.span
            low, high = span[index], span[index + 1]
            if low >= 0 and seq.leq(low, number) and seq.leq(number, high):
                return incarnation
        if at is not self:
            span = at.span
            if (
                flags & TCP_RST
                and span[index] >= 0
                and not (seq.leq(span[index], number) and seq.leq(number, span[index + 1]))
            ):
                # A RST past all the side sent in the incarnation it runs behind in may be a
                # newer one's whose SYN is still to come (any RST matches a RST): compared
                # with none (the primary's waits for a checkpoint, the secondary's is dropped).
                return None
            # the side runs behind: what it sends widens its span in that incarnation
            end = seq.add(number, length + (1 if flags & TCP_FIN else 0))
            if span[index] < 0 or seq.lt(number, span[index]):
                span[index] = number
            if span[index + 1] < 0 or seq.gt(end, span[index + 1]):
                span[index + 1] = end
        return at

    def _ask_rebase(self, end: int, book: Book, out: list[Event]) -> None:
        self.rebase_asked = True
        evidence = Evidence.without_bytes(
            f"{end} bytes on one connection since the last checkpoint: a checkpoint"
            " moves the stream offsets' base before they could wrap",
            offset=end,
        )
        book.request(out, Reason.OVERFLOW, PROTOCOL, self.label, evidence)

    def _forget_alignment(self, book: Book) -> None:
        for side in (self.primary, self.secondary):
            for stored in side.chunks:
                stored.live = False
                book.stored_bytes -= stored.end - stored.start
            side.reset()
        self.verified.clear()
        self.kept.clear()

    def learn(self, primary_side: bool, number: int, flags: int, ack: int, book: Book) -> None:
        """Learn an ISN from a SYN that is not compared (it came during a checkpoint)."""
        if flags & TCP_SYN:
            target = self._route(primary_side, number, flags, ack, 0) if self.older else self
            if target is self:
                self._learn_isn(primary_side, number, flags, ack, book)
            elif target is not None:
                target.learn(primary_side, number, flags, ack, book)

    # Both feeds take the header fields the comparator read (``number`` is the sequence
    # number, ``urgent`` the urgent pointer, read only with URG) and the payload bytes, not
    # a parsed Packet: the comparator's TCP lane reads those fields with one unpack and never
    # builds a Packet (it leaves SYN and URG segments to the general path).

    def feed_primary(
        self,
        number: int,
        ack: int,
        flags: int,
        payload: bytes,
        held: Held,
        now: float,
        book: Book,
        out: list[Event],
        urgent: int = 0,
    ) -> None:
        if self.older:
            target = self._route(True, number, flags, ack, len(payload))
            if target is not self:
                if target is None:  # no incarnation kept can match it
                    held.need |= NEED_CHECKPOINT
                    self.stranded.append(held)
                    return
                held.flow = target
                target.feed_primary(number, ack, flags, payload, held, now, book, out, urgent)
                return
        isn = self._side_base(True, number, flags, ack, book, out)
        primary = self.primary  # a SYN may have started a new incarnation
        if flags & TCP_ACK:
            held.need = NEED_ACK
            held.ack = ack
        start = seq.diff(number, isn) - 1
        if flags & TCP_SYN:
            start += 1
            held.need |= NEED_SYN
            primary.syn = True
        length = len(payload)
        if flags & TCP_RST:
            held.need |= NEED_RST
            primary.rst = start
            primary.ending = primary.ending or "RST"
            length = 0  # data on a RST is diagnostic text (RFC 9293 3.5.3), not stream data
            if self.secondary.signals:
                self._answer(RST, start)
        end = start + length
        held.start = start
        held.end = end
        if length > book.gso_payload and book.split_after is not None:
            book.split_fifo.append(held)
        if end > REBASE_AT and not self.rebase_asked:
            self._ask_rebase(end, book, out)
        if flags & TCP_FIN:
            held.need |= NEED_FIN
            primary.fin = end
            primary.ending = primary.ending or "FIN"
            if self.secondary.signals:
                self._answer(FIN, end)
        if flags & TCP_URG and urgent != URGENT_BEYOND:
            mark = start + urgent
            held.need |= NEED_URG
            held.urgent = mark
            _note_urgent(primary, mark)
            if self.secondary.signals:
                self._answer(URG, mark)
        split_end = self.split_end
        if split_end >= 0 and start < split_end <= end:
            self.split_end = -1  # the last segment of the split packet is back
        queue = self.held
        if queue and start < queue[-1].start:
            # Earlier bytes than the newest held (a retransmission, or a segment of a split GSO
            # packet): in stream order, so that a held packet behind it in the stream, still
            # waiting for the secondary, does not hold it back (release goes in this order).
            index = len(queue) - 1
            head = self.head
            while index > head and start < queue[index - 1].start:
                index -= 1
            queue.insert(index, held)
        else:
            queue.append(held)
        if self.diverged:
            return
        if length:
            self._absorb(True, start, payload, now, book, out)
        secondary = self.secondary
        # _check_fate has nothing to say unless a side ended (``ending`` is set whenever
        # ``fin`` or ``rst`` is) or only one side sent a SYN: tested here, without a call
        ended = primary.ending is not None or secondary.ending is not None
        if (ended or primary.syn != secondary.syn) and not self.diverged:
            self._check_fate(book, out)
        state: FlowState = self  # ``diverged`` read anew (mypy keeps it narrowed to False)
        if state.diverged:
            # Diverged by this very packet (its bytes may lie in a verified range, say a
            # resend with other bytes): only the checkpoint just asked for may release it.
            held.need |= NEED_CHECKPOINT
        self.release_ready(book, out)

    def gathers(self) -> bool:
        """Whether the secondary's plain segments may be gathered into a run: one incarnation,
        neither side ended, the SYNs alike (so that a run's bytes meet no check of the
        connection's fate a segment of it would have met first)."""
        primary, secondary = self.primary, self.secondary
        return (
            not self.older
            and primary.ending is None
            and secondary.ending is None
            and primary.syn == secondary.syn
        )

    def run_continues(self, number: int, ack: int) -> bool:
        """Whether a segment at sequence number ``number`` acknowledging ``ack`` continues
        this connection's run."""
        follows = (self.run_number + self.run_length) & 0xFFFFFFFF
        return ack == self.run_ack and number == follows

    def _take_run(self) -> bytes:
        """The run's bytes, joined (one copy); the run is empty after."""
        parts = self.run_parts
        payload = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self.run_length = 0
        return payload

    def feed_run(self, now: float, book: Book, out: list[Event]) -> None:
        """Feed the secondary's gathered run (``run_length`` > 0) as one segment."""
        payload = self._take_run()
        self.feed_secondary(self.run_number, self.run_ack, TCP_ACK, payload, now, book, out)

    def hold_in_run(
        self, number: int, ack: int, length: int, held: Held, book: Book, first: bool
    ) -> bool:
        """Hold a plain primary segment (ACK, perhaps PSH, ``length`` > 0 bytes of data) of the
        primary's run as ``feed_primary`` holds it, its bytes left for ``feed_primary_run`` to
        compare; ``first``: it would start the run. False, with nothing done, where it must go
        to ``feed_primary`` instead.

        A run holds only bytes the primary never sent before (past everything it sent and
        everything verified), in one incarnation with neither side ended and not diverged, and
        no segment that ``feed_primary`` would treat apart (one to split as GSO, one past the
        rebase mark, one while a split packet is coming back): compared as one segment, its
        bytes then meet exactly the checks the segments' would, and a packet of it is released
        only once all of its own bytes are verified."""
        isn = self.primary.isn
        if isn is None:
            return False
        start = seq.diff(number, isn) - 1
        end = start + length
        if end > REBASE_AT or (length > book.gso_payload and book.split_after is not None):
            return False
        queue = self.held
        if first:
            primary = self.primary
            high = primary.high
            if (
                start < 0
                or start < high
                or start < self.verified.high
                or (queue and start < queue[-1].start)
                or self.diverged
                or self.split_end >= 0
                or not self.gathers()
            ):
                return False
            # _side_base's note of the highest ACK: one ACK number for the whole run
            max_ack = primary.max_ack
            if max_ack is None or (max_ack != ack and seq.gt(ack, max_ack)):
                primary.max_ack = ack
        held.need = NEED_ACK
        held.ack = ack
        held.start = start
        held.end = end
        queue.append(held)
        return True

    def feed_primary_run(self, now: float, book: Book, out: list[Event]) -> None:
        """Compare the primary's gathered run (``run_length`` > 0; its packets are held) as one
        segment, and release what it verified."""
        payload = self._take_run()
        isn = self.primary.isn
        assert isn is not None  # hold_in_run took the run's segments only with one
        self._absorb(True, seq.diff(self.run_number, isn) - 1, payload, now, book, out)
        # Neither side ended and the SYNs alike (``gathers``): _check_fate has nothing to say.
        # A difference in the run leaves the bytes from it on unverified, so that their
        # packets wait for the checkpoint it asked for (none of them was verified before).
        self.release_ready(book, out)

    def feed_secondary(
        self,
        number: int,
        ack: int,
        flags: int,
        payload: bytes,
        now: float,
        book: Book,
        out: list[Event],
        urgent: int = 0,
    ) -> None:
        if self.older:
            target = self._route(False, number, flags, ack, len(payload))
            if target is not self:
                if target is not None:  # else: never released, so nothing lost uncompared
                    target.feed_secondary(number, ack, flags, payload, now, book, out, urgent)
                return
        isn = self._side_base(False, number, flags, ack, book, out)
        secondary = self.secondary  # a SYN may have started a new incarnation
        if self.diverged:
            return
        start = seq.diff(number, isn) - 1
        if flags & TCP_SYN:
            start += 1
            secondary.syn = True
        length = len(payload)
        primary = self.primary
        if flags & TCP_RST:
            secondary.rst = start
            secondary.ending = secondary.ending or "RST"
            length = 0
            if primary.rst is None:
                self._signal(RST, start, now, book)
        end = start + length
        if flags & TCP_FIN:
            secondary.fin = end
            secondary.ending = secondary.ending or "FIN"
            if primary.fin != end:
                self._signal(FIN, end, now, book)
        if flags & TCP_URG and urgent != URGENT_BEYOND:
            mark = start + urgent
            if mark not in secondary.urgent:
                _note_urgent(secondary, mark)
                if mark not in primary.urgent:
                    self._signal(URG, mark, now, book)
        if length:
            self._absorb(False, start, payload, now, book, out)
        ended = primary.ending is not None or secondary.ending is not None  # as above
        if (ended or primary.syn != secondary.syn) and not self.diverged:
            self._check_fate(book, out)
        if self.held:
            self.release_ready(book, out)

    def _side_base(
        self,
        primary_side: bool,
        number: int,
        flags: int,
        ack: int,
        book: Book,
        out: list[Event],
    ) -> int:
        """A segment of one side arrived: the side's base of offsets, learned from the segment
        if need be (a SYN may start a new incarnation), and the side's highest ACK noted."""
        side = self.primary if primary_side else self.secondary
        isn = side.isn
        if isn is None or flags & TCP_SYN:
            isn = self._learn_isn(primary_side, number, flags, ack, book, out)
            side = self.primary if primary_side else self.secondary
        if flags & TCP_ACK:
            max_ack = side.max_ack
            # equal numbers are equal mod 2**32 too: skip the modular test in the common case
            if max_ack is None or (max_ack != ack and seq.gt(ack, max_ack)):
                side.max_ack = ack
        return isn

    def _signal(self, kind: str, offset: int, now: float, book: Book) -> None:
        """The secondary sent a FIN, RST or urgent pointer the primary has not sent (yet):
        like its bytes, it waits for the primary's for secondary_timeout."""
        if book.secondary_timeout is None:
            return
        signals = self.secondary.signals
        for signal in signals:
            if signal.kind == kind and signal.start == offset:
                return
        signal = Signal(kind, offset, now, self)
        signals.append(signal)
        book.store_secondary(signal)

    def _answer(self, kind: str, offset: int) -> None:
        """The primary sent a FIN, RST or urgent pointer: the secondary's waits no more."""
        signals = self.secondary.signals
        for index, signal in enumerate(signals):
            if signal.kind == kind and (kind == RST or signal.start == offset):
                signal.live = False
                del signals[index]
                return

    # -- comparison ----------------------------------------------------------------------

    def _absorb(
        self, primary_side: bool, start: int, data: bytes, now: float, book: Book, out: list[Event]
    ) -> None:
        mine = self.primary if primary_side else self.secondary
        end = start + len(data)
        if end > mine.high:  # noqa: PLR1730  (compiled, max() would be a generic call)
            mine.high = end
        verified = self.verified
        if start >= verified.high and (not mine.chunks or start >= mine.chunks[-1].end):
            # Fast path, the common case: new bytes past everything verified and past all of
            # ours that waits (in order, whichever side runs ahead). Nothing to cut away (the
            # loop below gives [(start, end)] here): if the other side has nothing, store; if
            # it has exactly this range, match it at once; otherwise compare with its chunks.
            other = self.secondary if primary_side else self.primary
            chunks = other.chunks
            if not chunks:
                self._store(mine, primary_side, start, end, start, data, now, book)
                return
            first = chunks[0]
            if first.start == start and first.end == end and first.span(start, end) == data:
                first.live = False
                chunks.pop(0)  # (a native call compiled; del is a generic one)
                verified.add(start, end)
                self.kept.add(start, data)
                book.bytes_compared += end - start
                book.stored_bytes -= end - start
                return
            self._match(primary_side, start, data, now, book, out)
            return
        # Bytes at offsets already seen: a retransmission, an overlap, or out of order. Bytes
        # in the verified ranges are compared with the kept copy, bytes this side sent before
        # with what it sent, the rest with the other side's.
        for low, high, done in verified.pieces(start, end):
            piece = data if (low == start and high == end) else data[low - start : high - start]
            if done:
                if not self._recompare(primary_side, low, piece, book, out):
                    return
                continue
            for new_low, new_high, chunk in _own(mine.chunks, low, high):
                part = (
                    piece
                    if (new_low == low and new_high == high)
                    else piece[new_low - low : new_high - low]
                )
                if chunk is not None:
                    first_sent = chunk.span(new_low, new_high)
                    if part != first_sent:
                        self._resent_differently(primary_side, new_low, part, first_sent, book, out)
                        return
                elif not self._match(primary_side, new_low, part, now, book, out):
                    return

    def _recompare(
        self, primary_side: bool, start: int, piece: bytes, book: Book, out: list[Event]
    ) -> bool:
        """A resend of verified bytes: compare it with the kept copy (both sides sent those)."""
        name = "primary" if primary_side else "secondary"
        for low, high, kept in self.kept.lookup(start, start + len(piece)):
            ours = piece[low - start : high - start]
            if kept is None:
                if not primary_side:
                    continue  # never released: not comparing it risks no output (module doc)
                evidence = Evidence(
                    offset=low,
                    primary=ours[:EVIDENCE_BYTES],
                    secondary=b"",
                    primary_length=len(piece),
                    secondary_length=0,
                    detail=f"the primary resent compared bytes [{low}, {high}) no longer kept"
                    " (compare.retransmit_window, compare.max_retransmit_bytes)",
                )
                self._diverge(Reason.RETRANSMISSION_UNKEPT, evidence, book, out)
                return False
            if ours != kept:
                detail = f"the {name} resent compared bytes with other bytes"
                if primary_side:
                    evidence = difference(ours, kept, low, len(piece), len(kept), detail)
                else:
                    evidence = difference(kept, ours, low, len(kept), len(piece), detail)
                self._diverge(Reason.RETRANSMISSION, evidence, book, out)
                return False
        return True

    def _resent_differently(
        self,
        primary_side: bool,
        start: int,
        resent: bytes,
        first_sent: bytes,
        book: Book,
        out: list[Event],
    ) -> None:
        """A side resent bytes still waiting for the other side with other bytes: at most one
        of its versions can match, and the client may get either."""
        name = "primary" if primary_side else "secondary"
        # Evidence shows the side's two versions, the first sent in the other side's place.
        other = "secondary" if primary_side else "primary"
        detail = f"the {name} resent bytes with other bytes; {other} shows its first send"
        if primary_side:
            evidence = difference(resent, first_sent, start, len(resent), len(first_sent), detail)
        else:
            evidence = difference(first_sent, resent, start, len(first_sent), len(resent), detail)
        self._diverge(Reason.RETRANSMISSION, evidence, book, out)

    def _match(
        self, primary_side: bool, start: int, piece: bytes, now: float, book: Book, out: list[Event]
    ) -> bool:
        """Compare new bytes [start, start+len) of one side with the other side's chunks.

        Compiled, every slice is a copy: the other side's chunks keep their buffers as they
        are matched away (``Stored.base``), and a run of matched bytes is verified and kept in
        one piece (the whole of ``piece`` in the common case: no copy at all).
        """
        mine = self.primary if primary_side else self.secondary
        other = self.secondary if primary_side else self.primary
        chunks = other.chunks
        end = start + len(piece)
        pos = start
        matched = start  # [matched, pos) compared equal, not yet verified and kept
        index = _first_ending_after(chunks, start)
        while pos < end:
            if index < len(chunks) and chunks[index].start < end:
                chunk = chunks[index]
                if chunk.start > pos:
                    self._verify(matched, pos, start, piece, book)
                    self._store(mine, primary_side, pos, chunk.start, start, piece, now, book)
                    pos = matched = chunk.start
                stop = min(end, chunk.end)
                if not _same(piece, pos - start, stop - start, chunk.data, pos - chunk.base):
                    ours = piece[pos - start : stop - start]
                    theirs = chunk.span(pos, stop)
                    self._verify(matched, pos, start, piece, book)
                    if primary_side:
                        evidence = difference(
                            ours, theirs, pos, len(piece), chunk.end - chunk.start, ""
                        )
                    else:
                        evidence = difference(
                            theirs, ours, pos, chunk.end - chunk.start, len(piece), ""
                        )
                    self._diverge(Reason.PAYLOAD, evidence, book, out)
                    return False
                # remove [pos, stop) from the other side's chunk (its buffer stays as it is)
                if pos == chunk.start and stop == chunk.end:
                    chunk.live = False
                    chunks.pop(index)
                elif pos == chunk.start:
                    chunk.start = stop
                elif stop == chunk.end:
                    chunk.end = pos
                    index += 1
                else:
                    tail = Stored(chunk.base, chunk.data, chunk.arrival, chunk.flow)
                    tail.start = stop
                    tail.end = chunk.end
                    chunk.end = pos
                    chunks.insert(index + 1, tail)
                    if primary_side and book.secondary_timeout is not None:
                        # the tail is the secondary's: it keeps its arrival time, but joins
                        # the timeout queue at its end (detected late by at most one timeout)
                        book.secondary_fifo.append(tail)
                    index += 1
                pos = stop
            else:
                self._verify(matched, pos, start, piece, book)
                self._store(mine, primary_side, pos, end, start, piece, now, book)
                pos = matched = end
        self._verify(matched, pos, start, piece, book)
        return True

    def _verify(self, low: int, high: int, start: int, piece: bytes, book: Book) -> None:
        """[low, high) of ``piece`` (which starts at ``start``) compared equal: verified, kept."""
        if high > low:
            self.verified.add(low, high)
            whole = low == start and high - low == len(piece)
            self.kept.add(low, piece if whole else piece[low - start : high - start])
            book.bytes_compared += high - low
            book.stored_bytes -= high - low

    def _store(
        self,
        side: TcpSide,
        primary_side: bool,
        start: int,
        end: int,
        base: int,
        data: bytes,
        now: float,
        book: Book,
    ) -> None:
        """Store [start, end) of one side, which ``data`` (starting at ``base``) holds: the
        chunk keeps ``data`` as it is (compiled, a slice is a copy)."""
        stored = Stored(base, data, now, self)
        stored.start = start
        stored.end = end
        chunks = side.chunks
        if not chunks or chunks[-1].start < start:
            chunks.append(stored)
        else:
            chunks.insert(bisect_right([c.start for c in chunks], start), stored)
        if primary_side:
            book.stored_bytes += end - start
        else:
            book.store_secondary(stored)

    def _diverge(self, reason: Reason, evidence: Evidence, book: Book, out: list[Event]) -> None:
        self.diverged = True
        for side in (self.primary, self.secondary):
            for stored in side.chunks:
                stored.live = False
                book.stored_bytes -= stored.end - stored.start
            side.chunks = []
            for signal in side.signals:
                signal.live = False
            side.signals = []
        self.kept.clear()  # nothing is compared until the checkpoint, which forgets them
        book.request(out, reason, PROTOCOL, self.label, evidence)

    def _check_fate(self, book: Book, out: list[Event]) -> None:
        primary, secondary = self.primary, self.secondary
        if (
            primary.fin is None
            and primary.rst is None
            and secondary.fin is None
            and secondary.rst is None
        ):
            if not (primary.syn ^ secondary.syn):
                return
        problem = _fate_problem(primary, secondary)
        if problem is not None:
            self._diverge(
                Reason.FATE,
                Evidence.without_bytes(problem[1], offset=problem[0]),
                book,
                out,
            )

    # -- release -------------------------------------------------------------------------

    def split(self, held: Held, book: Book, out: list[Event]) -> None:
        """Hand ``held`` back to be cut into segments: they come back as new primary packets
        (their bytes are this packet's, already verified or waiting in ``chunks``)."""
        self.held.remove(held)  # never in the part before ``head``: it is not released
        self.trim(self.head)  # empty when only released ones were left before it
        self.split_end = max(self.split_end, held.end)
        held.released = True
        book.held_packets -= 1
        out.append(Split(held.token))
        self.release_ready(book, out)

    def release_ready(self, book: Book, out: list[Event]) -> None:
        held = self.held
        first = self.head
        head = first
        count = len(held)
        secondary = self.secondary
        verified = self.verified
        # ``break`` where the oldest held segment must wait: the head is stored after the loop.
        while head < count:
            segment = held[head]
            need = segment.need
            if need:
                if need & NEED_ACK:
                    max_ack = secondary.max_ack
                    if max_ack is None or (max_ack != segment.ack and seq.lt(max_ack, segment.ack)):
                        if (
                            not segment.gated
                            and book.ack_lag is not None
                            and need == NEED_ACK
                            and (
                                segment.end == segment.start
                                or verified.contains(segment.start, segment.end)
                            )
                        ):
                            segment.gated = True
                            book.gated_fifo.append((book.now, segment))
                        break
                if need != NEED_ACK:  # a SYN, FIN, RST or URG waits for the secondary's too
                    if self.diverged:
                        # Not after a divergence: the secondary's mark may be the one that
                        # diverged (a RST is matched by any RST, and a RST of another fate
                        # is only found to be one by _check_fate). Bytes compared equal are
                        # still released; the rest waits for the checkpoint.
                        break
                    if need & NEED_SYN and not secondary.syn:
                        break
                    if need & NEED_FIN and secondary.fin != segment.end:
                        break
                    if need & NEED_RST and secondary.rst is None:
                        break
                    if need & NEED_URG and segment.urgent not in secondary.urgent:
                        break
                    if need & NEED_CHECKPOINT:
                        break
            if segment.end > segment.start and not verified.contains(segment.start, segment.end):
                break
            if self.split_end >= 0 and segment.start >= self.split_end:
                break
            head += 1
            # book.release(segment, out, ReleaseReason.MATCHED), without the call
            segment.released = True
            book.held_packets -= 1
            out.append(Release(segment.token, _MATCHED))
            if segment.extra:
                for token in segment.extra:
                    out.append(Release(token, _MATCHED))
        if head != first:
            # self.trim(head), without the call when the queue ran empty (the usual case)
            if head == count:
                held.clear()
                self.head = 0
            else:
                self.trim(head)


def _fate_problem(primary: TcpSide, secondary: TcpSide) -> tuple[int | None, str] | None:
    if primary.fin is not None and secondary.fin is not None and primary.fin != secondary.fin:
        return primary.fin, f"FIN at stream offset {primary.fin} vs {secondary.fin}"
    # A FIN then a RST on both sides is fine; what counts is how each side ended first.
    if primary.ending and secondary.ending and primary.ending != secondary.ending:
        offset = primary.fin if primary.ending == "FIN" else primary.rst
        return offset, f"primary {primary.ending} vs secondary {secondary.ending}"
    for name, this, that in (("primary", primary, secondary), ("secondary", secondary, primary)):
        other = "secondary" if name == "primary" else "primary"
        if this.fin is not None and that.high > this.fin:
            return this.fin, f"{other} sent data past the {name}'s FIN"
        if this.rst is not None and that.high > this.rst:
            return this.rst, f"{other} sent data past the {name}'s RST"
        if this.rst is not None and that.syn and not this.syn:
            return -1, f"{other} SYN vs {name} RST"
    return None


def _same(ours: bytes, low: int, high: int, theirs: bytes, at: int) -> bool:
    """``ours[low:high] == theirs[at:at + high - low]``, both ranges within their buffers,
    with at most one copy and mostly none: compiled, a slice is a copy, while ``startswith``
    and ``endswith`` without offsets are native calls that compare in place. A range that is
    a whole buffer is compared with the other where that one begins or ends its buffer."""
    length = high - low
    stop = at + length
    if not (low == 0 and high == len(ours)) and not (at == 0 and stop == len(theirs)):
        # neither is a whole buffer: copy one range, the other one if this one is anchored
        if low == 0 or high == len(ours):
            theirs, at, stop = theirs[at:stop], 0, length
        else:
            ours, low, high = ours[low:high], 0, length
    if low == 0 and high == len(ours):
        whole, other, first, last = ours, theirs, at, stop
    else:
        whole, other, first, last = theirs, ours, low, high
    if first == 0:
        return other.startswith(whole)
    if last == len(other):
        return other.endswith(whole)
    return other[first:last] == whole


def _first_ending_after(chunks: list[Stored], pos: int) -> int:
    """Index of the first chunk whose end is beyond ``pos`` (chunks are sorted, disjoint)."""
    if not chunks or chunks[0].end > pos:
        return 0
    low, high = 0, len(chunks)
    while low < high:
        mid = (low + high) // 2
        if chunks[mid].end <= pos:
            low = mid + 1
        else:
            high = mid
    return low


def _own(chunks: list[Stored], start: int, end: int) -> list[tuple[int, int, Stored | None]]:
    """[start, end) cut into (low, high, the same side's chunk holding [low, high) or None)."""
    if not chunks or start >= chunks[-1].end or end <= chunks[0].start:
        return [(start, end, None)]
    out: list[tuple[int, int, Stored | None]] = []
    pos = start
    for chunk in chunks[_first_ending_after(chunks, start) :]:
        if chunk.start >= end:
            break
        if chunk.start > pos:
            out.append((pos, chunk.start, None))
            pos = chunk.start
        stop = min(end, chunk.end)
        out.append((pos, stop, chunk))
        pos = stop
        if pos >= end:
            break
    if pos < end:
        out.append((pos, end, None))
    return out


def _note_urgent(side: TcpSide, mark: int) -> None:
    """Remember an urgent pointer's stream offset (the last URGENT_MARKS of them)."""
    urgent = side.urgent
    if mark not in urgent:
        urgent.append(mark)
        if len(urgent) > URGENT_MARKS:
            del urgent[0]
