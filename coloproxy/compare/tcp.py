"""TCP: align the primary's and the secondary's byte streams and compare them.

Theory of operation
-------------------
Each side's stream is addressed by *stream offset*: bytes after the side's SYN, so offset 0
is the first data byte whatever the side's ISN (``seq.diff(seq, isn) - 1``; the SYN itself
sits at -1). Segmentation, retransmissions, overlaps and reordering then vanish: what is
compared is bytes at offsets, not segments.

Each side keeps the bytes it sent that the other side has not sent yet (``chunks``, sorted
and disjoint). When new bytes arrive they are cut against the *verified* range set (both
sides sent them and they were equal: retransmissions are released without storing), then
against the side's own chunks (a retransmission of bytes still waiting), and what is left is
compared with the other side's chunks where they overlap; the overlap becomes verified and is
removed from both, the rest is stored. Bytes that differ are a divergence at the exact offset.

A held primary segment is released when, in stream order per connection (a segment carrying
earlier bytes than held ones, a retransmission or a piece of a split GSO packet, goes before
them; bytes after a split packet wait until its pieces are back: ``split_end``):
- its data range is verified,
- its SYN/FIN/RST is matched by the secondary (same FIN offset; a RST against a RST), and
- its ACK is covered by the secondary's highest ACK (ACK gating: releasing an ACK the
  secondary has not sent would let the client discard bytes the secondary never received;
  pure ACKs obey the same rule).
The connection's fate is compared too: FIN against RST, FINs at different offsets, data sent
past the other side's FIN or RST, SYN against RST. QEMU's colo-compare releases every
zero-payload segment uncompared and so misses all of these.

ISNs: a side's ISN is learned from its SYN (guest as client) or SYN-ACK (guest as server).
A connection first seen without a SYN uses one shared base for both sides: after a checkpoint
both guests hold the same TCP state, ISNs included, so equal sequence numbers mean equal
positions. ``reset_epoch`` (after a checkpoint) makes the secondary's ISN and highest ACK
equal to the primary's for the same reason, and moves both sides' base of offsets up to the
primary's position, so that offsets of an epoch stay far below 2**31 (``REBASE_AT``).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Final

from coloproxy import seq
from coloproxy.compare.events import (
    Event,
    Evidence,
    Flow,
    Reason,
    Release,
    ReleaseReason,
    Split,
)
from coloproxy.compare.ranges import RangeSet
from coloproxy.compare.state import (
    NEED_ACK,
    NEED_FIN,
    NEED_RST,
    NEED_SYN,
    Book,
    FlowState,
    Held,
    Stored,
    difference,
)
from coloproxy.packet.parse import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

PROTOCOL: Final = "tcp"
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
        "rst",
        "syn",
        "syn_seq",
    )

    def __init__(self) -> None:
        # ``isn`` is the base of stream offsets: the ISN at first, moved forward at each
        # checkpoint (see ``reset_epoch``); ``syn_seq`` is the ISN the side's SYN named.
        self.isn: int | None = None
        self.isn_from_syn = False
        self.syn_seq: int | None = None
        self.max_ack: int | None = None
        self.chunks: list[Stored] = []
        self.syn = False  # a SYN was seen in this epoch
        self.fin: int | None = None  # stream offset of the FIN, in this epoch
        self.rst: int | None = None  # stream offset of the RST, in this epoch
        self.high: int | None = None  # end of the highest data sent, in this epoch
        self.ending: str | None = None  # "FIN" or "RST", whichever came first in this epoch

    def reset(self) -> None:
        self.chunks = []
        self.ending = None
        self.syn = False
        self.fin = None
        self.rst = None
        self.high = None


# Stream offsets are signed 32-bit distances from the base (RFC 1982 arithmetic holds within
# 2**31). Past this many bytes in one epoch the connection asks for a checkpoint, whose
# completion moves the base up to the current position; the verified ranges of one epoch then
# never meet offsets that wrapped around to them (which would release bytes unchecked, I1).
REBASE_AT: Final = 1 << 30


class TcpConnection(FlowState):
    __slots__ = ("primary", "rebase_asked", "rewritten", "secondary", "split_end", "verified")

    def __init__(
        self, key: tuple[object, ...], label: Flow, now: float, rewritten: bool = False
    ) -> None:
        super().__init__(key, label, now)
        self.primary = TcpSide()
        self.secondary = TcpSide()
        self.verified = RangeSet()
        self.rebase_asked = False
        # A split packet's segments are on their way back up to this stream offset (-1:
        # none): nothing held past it is released before them, or the client would see the
        # stream out of order and the PVM might retransmit (a SACK hole).
        self.split_end = -1
        # The secondary's segments are in the primary's sequence space, all but its SYN
        # (QEMU's filter-rewriter: CompareConfig.secondary_seq "rewritten").
        self.rewritten = rewritten

    def idle(self) -> bool:
        # Forgetting a connection whose sides have different ISNs would make its next
        # segments compare at wrong offsets; keep it until a checkpoint equalises them.
        return (
            not self.held
            and not self.primary.chunks
            and not self.secondary.chunks
            and self.primary.isn == self.secondary.isn
        )

    def isn_offset(self) -> int | None:
        """secondary ISN - primary ISN (mod 2**32)."""
        if self.primary.isn is None or self.secondary.isn is None:
            return None
        return (self.secondary.isn - self.primary.isn) & 0xFFFFFFFF

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
        if shift is not None and shift > 0:
            if primary.isn is not None:
                primary.isn = seq.add(primary.isn, shift)
            if secondary.isn is not None:
                secondary.isn = seq.add(secondary.isn, shift)
        primary.reset()
        secondary.reset()
        self.verified.clear()
        if synced:
            if primary.isn is not None:
                secondary.isn = primary.isn
                secondary.isn_from_syn = primary.isn_from_syn
                secondary.syn_seq = primary.syn_seq
            secondary.max_ack = primary.max_ack
        self.diverged = False
        self.timed_out = False
        self.rebase_asked = False

    # -- input ---------------------------------------------------------------------------

    def _learn_isn(self, side: TcpSide, other: TcpSide, number: int, flags: int, book: Book) -> int:
        """The side's ISN, learned from this segment if it is not known yet."""
        isn = side.isn
        if flags & TCP_SYN and self.rewritten:
            return self._learn_rewritten_isn(side, other, number, book)
        if flags & TCP_SYN:
            if isn is None or not side.isn_from_syn:
                side.isn = isn = number
                side.isn_from_syn = True
                side.syn_seq = number
            elif number != side.syn_seq:
                # A new connection on the same four-tuple (the old one is gone): nothing of
                # the old alignment may carry over, or bytes verified for the old connection
                # would release the new one's unchecked (I1).
                self._forget_alignment(book)
                other.isn_from_syn = False  # its next SYN names its new ISN
                side.isn = isn = number
                side.syn_seq = number
            return isn
        if isn is None:
            isn = other.isn
            if isn is None:
                # First seen mid-stream: one shared base for both sides (see module doc).
                other.isn = isn = seq.add(number, -1)
            side.isn = isn
        return isn

    def _learn_rewritten_isn(self, side: TcpSide, other: TcpSide, number: int, book: Book) -> int:
        """``_learn_isn`` for a SYN when the secondary's numbers were rewritten into the
        primary's space except in its SYN: both sides count offsets from the primary's ISN.
        Returns the base for this SYN's own position, which is its own ISN on either side
        (the secondary's SYN names the secondary's ISN)."""
        if side.isn_from_syn and number != side.syn_seq:
            # A new connection on the same four-tuple, as in _learn_isn.
            self._forget_alignment(book)
            other.isn_from_syn = False
        side.isn_from_syn = True
        side.syn_seq = number
        primary, secondary = self.primary, self.secondary
        if side is primary:
            primary.isn = secondary.isn = number
        elif primary.isn_from_syn and primary.isn is not None:
            secondary.isn = primary.isn
        # else: the primary's SYN is still to come, and with it the base; secondary data
        # before it (already in the primary's space) takes the shared mid-stream base.
        return number

    def _ask_rebase(self, end: int, book: Book, out: list[Event]) -> None:
        self.rebase_asked = True
        evidence = Evidence(
            offset=end,
            primary=b"",
            secondary=b"",
            primary_length=0,
            secondary_length=0,
            detail=f"{end} bytes on one connection since the last checkpoint: a checkpoint"
            " moves the stream offsets' base before they could wrap",
        )
        book.request(out, Reason.OVERFLOW, PROTOCOL, self.label, evidence)

    def _forget_alignment(self, book: Book) -> None:
        for side in (self.primary, self.secondary):
            for stored in side.chunks:
                stored.live = False
                book.stored_bytes -= stored.end - stored.start
            side.reset()
        self.verified.clear()

    def learn(self, primary_side: bool, number: int, flags: int, book: Book) -> None:
        """Learn an ISN from a SYN that is not compared (it came during a checkpoint)."""
        if flags & TCP_SYN:
            mine, other = (
                (self.primary, self.secondary) if primary_side else (self.secondary, self.primary)
            )
            self._learn_isn(mine, other, number, flags, book)

    # Both feeds take the header fields the comparator read (``number`` is the sequence
    # number) and the payload bytes, not a parsed Packet: the comparator's TCP lane reads
    # those fields with one unpack and never builds a Packet.

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
    ) -> None:
        primary = self.primary
        isn = primary.isn
        if isn is None or flags & TCP_SYN:
            isn = self._learn_isn(primary, self.secondary, number, flags, book)
        if flags & TCP_ACK:
            held.need = NEED_ACK
            held.ack = ack
            max_ack = primary.max_ack
            # equal numbers are equal mod 2**32 too: skip the modular test in the common case
            if max_ack is None or (max_ack != ack and seq.gt(ack, max_ack)):
                primary.max_ack = ack
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
        split_end = self.split_end
        if split_end >= 0 and start < split_end <= end:
            self.split_end = -1  # the last segment of the split packet is back
        queue = self.held
        if queue and start < queue[-1].start:
            # Earlier bytes than the newest held (a retransmission, or a segment of a split GSO
            # packet): in stream order, so that a held packet behind it in the stream, still
            # waiting for the secondary, does not hold it back (release goes in this order).
            index = len(queue) - 1
            while index > 0 and start < queue[index - 1].start:
                index -= 1
            queue.insert(index, held)
        else:
            queue.append(held)
        if self.diverged:
            return
        if length:
            if primary.high is None or end > primary.high:
                primary.high = end
            self._absorb(True, start, payload, now, book, out)
        # _check_fate has nothing to say unless a side ended (``ending`` is set whenever
        # ``fin`` or ``rst`` is) or only one side sent a SYN; test that here, without a call.
        secondary = self.secondary
        if (
            primary.ending is not None
            or secondary.ending is not None
            or primary.syn is not secondary.syn
        ) and not self.diverged:
            self._check_fate(book, out)
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
    ) -> None:
        secondary = self.secondary
        isn = secondary.isn
        if isn is None or flags & TCP_SYN:
            isn = self._learn_isn(secondary, self.primary, number, flags, book)
        if flags & TCP_ACK:
            max_ack = secondary.max_ack
            if max_ack is None or (max_ack != ack and seq.gt(ack, max_ack)):
                secondary.max_ack = ack
        if self.diverged:
            return
        start = seq.diff(number, isn) - 1
        if flags & TCP_SYN:
            start += 1
            secondary.syn = True
        length = len(payload)
        if flags & TCP_RST:
            secondary.rst = start
            secondary.ending = secondary.ending or "RST"
            length = 0
        end = start + length
        if flags & TCP_FIN:
            secondary.fin = end
            secondary.ending = secondary.ending or "FIN"
        if length:
            if secondary.high is None or end > secondary.high:
                secondary.high = end
            self._absorb(False, start, payload, now, book, out)
        primary = self.primary
        if (
            primary.ending is not None
            or secondary.ending is not None
            or primary.syn is not secondary.syn
        ) and not self.diverged:
            self._check_fate(book, out)
        if self.held:
            self.release_ready(book, out)

    # -- comparison ----------------------------------------------------------------------

    def _absorb(
        self, primary_side: bool, start: int, data: bytes, now: float, book: Book, out: list[Event]
    ) -> None:
        mine = self.primary if primary_side else self.secondary
        end = start + len(data)
        verified = self.verified
        if start >= verified.high and (not mine.chunks or start >= mine.chunks[-1].end):
            # Fast path, the common case: new bytes past everything verified and past all of
            # ours that waits (in order, whichever side runs ahead). Nothing to cut away (the
            # loop below gives [(start, end)] here): if the other side has nothing, store; if
            # it has exactly this range, match it at once; otherwise compare with its chunks.
            other = self.secondary if primary_side else self.primary
            chunks = other.chunks
            if not chunks:
                self._store(mine, primary_side, start, data, now, book)
                return
            first = chunks[0]
            if first.start == start and first.end == end and first.data == data:
                first.live = False
                del chunks[0]
                verified.add(start, end)
                book.bytes_compared += end - start
                book.stored_bytes -= end - start
                return
            self._match(primary_side, start, data, now, book, out)
            return
        for low, high in verified.subtract(start, end):
            for new_low, new_high in _uncovered(mine.chunks, low, high):
                piece = (
                    data
                    if (new_low == start and new_high == end)
                    else data[new_low - start : new_high - start]
                )
                if not self._match(primary_side, new_low, piece, now, book, out):
                    return

    def _match(
        self, primary_side: bool, start: int, piece: bytes, now: float, book: Book, out: list[Event]
    ) -> bool:
        """Compare new bytes [start, start+len) of one side with the other side's chunks."""
        mine = self.primary if primary_side else self.secondary
        other = self.secondary if primary_side else self.primary
        chunks = other.chunks
        end = start + len(piece)
        pos = start
        index = _first_ending_after(chunks, start)
        while pos < end:
            if index < len(chunks) and chunks[index].start < end:
                chunk = chunks[index]
                if chunk.start > pos:
                    self._store(
                        mine, primary_side, pos, piece[pos - start : chunk.start - start], now, book
                    )
                    pos = chunk.start
                stop = min(end, chunk.end)
                ours = piece[pos - start : stop - start]
                theirs = chunk.data[pos - chunk.start : stop - chunk.start]
                if ours != theirs:
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
                self.verified.add(pos, stop)
                book.bytes_compared += stop - pos
                book.stored_bytes -= stop - pos
                # remove [pos, stop) from the other side's chunk
                if pos == chunk.start and stop == chunk.end:
                    chunk.live = False
                    del chunks[index]
                elif pos == chunk.start:
                    chunk.data = chunk.data[stop - chunk.start :]
                    chunk.start = stop
                elif stop == chunk.end:
                    chunk.data = chunk.data[: pos - chunk.start]
                    chunk.end = pos
                    index += 1
                else:
                    tail = Stored(stop, chunk.data[stop - chunk.start :], chunk.arrival, chunk.flow)
                    chunk.data = chunk.data[: pos - chunk.start]
                    chunk.end = pos
                    chunks.insert(index + 1, tail)
                    if primary_side and book.secondary_timeout is not None:
                        # the tail is the secondary's: it keeps its arrival time, but joins
                        # the timeout queue at its end (detected late by at most one timeout)
                        book.secondary_fifo.append(tail)
                    index += 1
                pos = stop
            else:
                self._store(
                    mine,
                    primary_side,
                    pos,
                    piece[pos - start :] if pos > start else piece,
                    now,
                    book,
                )
                pos = end
        return True

    def _store(
        self, side: TcpSide, primary_side: bool, start: int, data: bytes, now: float, book: Book
    ) -> None:
        stored = Stored(start, data, now, self)
        chunks = side.chunks
        if not chunks or chunks[-1].start < start:
            chunks.append(stored)
        else:
            chunks.insert(bisect_right([c.start for c in chunks], start), stored)
        if primary_side:
            book.stored_bytes += len(data)
        else:
            book.store_secondary(stored)

    def _diverge(self, reason: Reason, evidence: Evidence, book: Book, out: list[Event]) -> None:
        self.diverged = True
        for side in (self.primary, self.secondary):
            for stored in side.chunks:
                stored.live = False
                book.stored_bytes -= stored.end - stored.start
            side.chunks = []
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
                Evidence(
                    offset=problem[0],
                    primary=b"",
                    secondary=b"",
                    primary_length=0,
                    secondary_length=0,
                    detail=problem[1],
                ),
                book,
                out,
            )

    # -- release -------------------------------------------------------------------------

    def split(self, held: Held, book: Book, out: list[Event]) -> None:
        """Hand ``held`` back to be cut into segments: they come back as new primary packets
        (their bytes are this packet's, already verified or waiting in ``chunks``)."""
        self.held.remove(held)
        self.split_end = max(self.split_end, held.end)
        held.released = True
        book.held_packets -= 1
        out.append(Split(held.token))
        self.release_ready(book, out)

    def release_ready(self, book: Book, out: list[Event]) -> None:
        held = self.held
        secondary = self.secondary
        verified = self.verified
        while held:
            segment = held[0]
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
                        return
                if need != NEED_ACK:  # a SYN, FIN or RST waits for the secondary's too
                    if need & NEED_SYN and not secondary.syn:
                        return
                    if need & NEED_FIN and secondary.fin != segment.end:
                        return
                    if need & NEED_RST and secondary.rst is None:
                        return
            if segment.end > segment.start and not verified.contains(segment.start, segment.end):
                return
            if self.split_end >= 0 and segment.start >= self.split_end:
                return
            held.popleft()
            # book.release(segment, out, ReleaseReason.MATCHED), without the call
            segment.released = True
            book.held_packets -= 1
            out.append(Release(segment.token, _MATCHED))
            if segment.extra:
                for token in segment.extra:
                    out.append(Release(token, _MATCHED))


def _fate_problem(primary: TcpSide, secondary: TcpSide) -> tuple[int | None, str] | None:
    if primary.fin is not None and secondary.fin is not None and primary.fin != secondary.fin:
        return primary.fin, f"FIN at stream offset {primary.fin} vs {secondary.fin}"
    # A FIN then a RST on both sides is fine; what counts is how each side ended first.
    if primary.ending and secondary.ending and primary.ending != secondary.ending:
        offset = primary.fin if primary.ending == "FIN" else primary.rst
        return offset, f"primary {primary.ending} vs secondary {secondary.ending}"
    for name, this, that in (("primary", primary, secondary), ("secondary", secondary, primary)):
        other = "secondary" if name == "primary" else "primary"
        if this.fin is not None and that.high is not None and that.high > this.fin:
            return this.fin, f"{other} sent data past the {name}'s FIN"
        if this.rst is not None and that.high is not None and that.high > this.rst:
            return this.rst, f"{other} sent data past the {name}'s RST"
        if this.rst is not None and that.syn and not this.syn:
            return -1, f"{other} SYN vs {name} RST"
    return None


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


def _uncovered(chunks: list[Stored], start: int, end: int) -> list[tuple[int, int]]:
    """Parts of [start, end) not already stored by the same side (retransmissions)."""
    if not chunks or start >= chunks[-1].end or end <= chunks[0].start:
        return [(start, end)]
    out: list[tuple[int, int]] = []
    pos = start
    for chunk in chunks[_first_ending_after(chunks, start) :]:
        if chunk.start >= end:
            break
        if chunk.start > pos:
            out.append((pos, chunk.start))
        pos = max(pos, chunk.end)
        if pos >= end:
            break
    if pos < end:
        out.append((pos, end))
    return out
