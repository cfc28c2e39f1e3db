"""The comparator: sans-IO, time injected. ``feed(side, data, now, token) -> events``.

Theory of operation
-------------------
Every packet fed is guest egress: the primary's (to be released or held) or the
secondary's (always dropped; its bytes are kept only as long as needed to compare). Packets
are parsed in place, IP fragments reassembled, and each one goes to its flow, keyed in the
guest's egress direction (ICMP and ICMPv6 echo requests and replies by their identifier too:
two ping sessions are two flows, each compared in its own order): TCP connections align byte
streams (``tcp.py``), everything else compares whole datagrams (``datagram.py``).

Output commit (I1): a primary packet is released only when the secondary matched it, or by
``checkpoint_completed`` (every held primary packet, in arrival order). Nothing is ever
dropped on the primary side (I2): at a bound the comparator asks for a checkpoint and holds
everything uncompared until it completes. Every divergence, timeout, overflow and malformed
primary packet yields a ``CheckpointNeeded``; while one is outstanding later ones come with
``coalesced=True`` (I4). Bad input becomes events (I5).

Epochs: ``checkpoint_started`` stops comparison (secondary packets are from the old epoch
and dropped; primary packets are held and released by the checkpoint, since it began after
they were produced); ``checkpoint_completed`` releases everything held and starts alignment
afresh with the secondary's TCP state equal to the primary's.

Timers: held primary packets time out after ``compare_timeout`` (one request per flow per
epoch), stored secondary output after ``secondary_timeout``, datagram mismatches after
``datagram_reorder_window``, incomplete fragments after ``compare_timeout``, and idle flows
are forgotten after ``flow_idle_timeout``. ``get_timer()`` gives the earliest deadline and
``handle_timer(now)`` acts on every deadline that passed; ``handle_timer(math.inf)`` expires
everything, which offline comparison uses at the end of its input.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from coloproxy.compare.config import (
    CompareConfig,
    Framing,
    MalformedPolicy,
    PassthroughRule,
    SecondarySeq,
)
from coloproxy.compare.datagram import DatagramFlow, ReorderTimers
from coloproxy.compare.epoch import START
from coloproxy.compare.events import (
    EVIDENCE_BYTES,
    Drop,
    DropReason,
    Event,
    Evidence,
    Flow,
    MalformedPacket,
    Reason,
    Release,
    ReleaseReason,
    Side,
)
from coloproxy.compare.lanes import Lanes
from coloproxy.compare.reassembly import Partial, Reassembler
from coloproxy.compare.state import NEED_URG, Book, FlowState, Held, Signal
from coloproxy.compare.tcp import TCP_URG, TcpConnection
from coloproxy.compare.verdicts import compared
from coloproxy.errors import UsageError
from coloproxy.packet.parse import (
    NOT_IP,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TCP_SYN,
    Malformed,
    MalformedReason,
    Packet,
    parse_ethernet,
    parse_ip,
)
from coloproxy.protocol.colo_frames import Frames

# ICMP and ICMPv6 echo request and reply types: such a flow is keyed by its identifier too.
_ECHO_TYPES: Final = {PROTO_ICMP: (0, 8), PROTO_ICMPV6: (128, 129)}
_ECHO: Final = 0x100  # set in the key's second port field for an echo flow (its ICMP type)

_PROTOCOL_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp", PROTO_ICMPV6: "icmpv6"}
# Enum members read once: ``Side.PRIMARY`` is an attribute lookup through the enum's
# metaclass, about 85 ns in CPython 3.11, on every packet otherwise.
_PRIMARY: Final = Side.PRIMARY


@dataclass(frozen=True, slots=True)
class CompareStats:
    """A snapshot for metrics and status."""

    flows: int
    tcp_connections: int
    held_packets: int
    stored_bytes: int
    bytes_compared: int
    fragments_pending: int
    oldest_primary: float | None  # arrival time of the oldest held primary packet
    oldest_secondary: float | None  # arrival time of the oldest stored secondary output
    checkpoint_requested: bool
    checkpointing: bool
    saturated: bool
    isn_offsets_learned: int
    kept_bytes: int = 0  # compared TCP bytes kept to compare retransmissions (retransmit_window)


def protocol_name(packet: Packet) -> str:
    if packet.proto == NOT_IP:
        return f"ethertype-{packet.ethertype:#06x}"
    return _PROTOCOL_NAMES.get(packet.proto) or f"ip-proto-{packet.proto}"


def flow_label(packet: Packet) -> Flow:
    protocol = protocol_name(packet)
    if packet.proto == NOT_IP:
        return Flow(protocol, packet.src.hex(":"), packet.dst.hex(":"), packet.vlan)
    guest = str(ipaddress.ip_address(packet.src))
    peer = str(ipaddress.ip_address(packet.dst))
    if packet.proto in (PROTO_TCP, PROTO_UDP):
        if packet.version == 6:
            guest, peer = f"[{guest}]", f"[{peer}]"
        guest = f"{guest}:{packet.sport}"
        peer = f"{peer}:{packet.dport}"
    echo = echo_identifier(packet)
    return Flow(protocol, guest, peer, packet.vlan, -1 if echo is None else echo[1])


def echo_identifier(packet: Packet) -> tuple[int, int] | None:
    """(ICMP type, identifier) of an ICMP or ICMPv6 echo request or reply, else None.

    Two ping sessions between the same hosts are two flows: each compares in its own order,
    and one session running ahead on one side is not a difference of the other."""
    types = _ECHO_TYPES.get(packet.proto)
    if types is None or packet.fragment or packet.l4 + 8 > packet.end:
        return None
    kind = packet.data[packet.l4]
    if kind not in types:
        return None
    return kind, int.from_bytes(packet.data[packet.l4 + 4 : packet.l4 + 6], "big")


def _data(packet: Packet) -> bytes:
    """``packet.data``, which is bytes here: the comparator parses what ``feed`` is given and
    reassembled datagrams, both bytes (the parser also reads the bytearrays host S rewrites)."""
    data = packet.data
    assert type(data) is bytes
    return data


def _urgent_pointer(packet: Packet) -> int:
    """The TCP urgent pointer (the general path reads it only for URG segments)."""
    return int.from_bytes(packet.data[packet.l4 + 18 : packet.l4 + 20], "big")


class _Rule:
    """A passthrough rule with its networks parsed once."""

    __slots__ = ("guest_network", "guest_port", "peer_network", "peer_port", "protocol")

    def __init__(self, rule: PassthroughRule) -> None:
        self.protocol = rule.protocol
        self.guest_port = rule.guest_port
        self.peer_port = rule.peer_port
        self.guest_network = (
            ipaddress.ip_network(rule.guest_network, strict=False) if rule.guest_network else None
        )
        self.peer_network = (
            ipaddress.ip_network(rule.peer_network, strict=False) if rule.peer_network else None
        )

    def matches(self, packet: Packet, protocol: str) -> bool:
        if self.protocol is not None and self.protocol != protocol:
            return False
        if self.guest_port is not None and self.guest_port != packet.sport:
            return False
        if self.peer_port is not None and self.peer_port != packet.dport:
            return False
        if packet.proto == NOT_IP:
            return self.guest_network is None and self.peer_network is None
        if (
            self.guest_network is not None
            and ipaddress.ip_address(packet.src) not in self.guest_network
        ):
            return False
        return self.peer_network is None or ipaddress.ip_address(packet.dst) in self.peer_network


# What Comparator.reconfigure may change while it runs.
LIVE_SETTINGS: Final = frozenset(
    {"compare_timeout", "secondary_timeout", "flow_idle_timeout", "malformed_policy", "passthrough"}
)


class Comparator:
    def __init__(self, config: CompareConfig | None = None) -> None:
        self.config = config = config or CompareConfig()
        ethernet = config.framing is Framing.ETHERNET
        self._rewritten = config.secondary_seq is SecondarySeq.REWRITTEN
        self._parse = parse_ethernet if ethernet else parse_ip
        self._max_held_packets = config.max_held_packets
        self._book = book = Book(config)
        self._epoch = book.epoch
        self._reorder = ReorderTimers()
        self._lanes = Lanes(config, ethernet, book, self._reorder)
        self._flows: dict[tuple[object, ...], FlowState] = {}
        self._rules = [_Rule(rule) for rule in config.passthrough]
        self._reassembly = Reassembler(config.max_fragment_datagrams, config.max_fragment_bytes)
        self._frozen: list[Held] = []  # held uncompared: checkpointing, overflow, malformed
        self._frozen_tokens: list[object] = []  # primary fragments of unfinished datagrams
        # Packets fed while a checkpoint runs, kept so that those the guests sent after it
        # ended (before the shell heard of the end) are compared, not released (I1).
        self._late_primary: list[tuple[Held, bytes]] = []
        self._late_secondary: list[tuple[bytes, float]] = []
        self._next_sweep: float | None = None

    # -- settings changed while running ---------------------------------------------------

    def reconfigure(self, config: CompareConfig) -> None:
        """Take ``config``, which may differ from the current one only in ``LIVE_SETTINGS``
        (the daemon's reload). Timeouts and the malformed policy are read at each use, so
        they apply from the next packet or timer; passthrough rules apply to flows seen from
        now on (a flow keeps what it was classified as)."""
        fixed = [
            name
            for name in CompareConfig.__dataclass_fields__
            if name not in LIVE_SETTINGS and getattr(config, name) != getattr(self.config, name)
        ]
        if fixed:
            raise UsageError(f"compare settings {', '.join(fixed)} cannot change while running")
        self.config = config
        self._rules = [_Rule(rule) for rule in config.passthrough]

    # -- input ---------------------------------------------------------------------------

    def feed(self, side: Side, data: bytes, now: float, token: object = None) -> list[Event]:
        """Feed one guest-egress packet of ``side``; ``token`` comes back in Release/Drop."""
        out: list[Event] = []
        self._feed_at(side, data, 0, len(data), now, token, out)
        return out

    def _feed_at(
        self,
        side: Side,
        data: bytes,
        begin: int,
        stop: int,
        now: float,
        token: object,
        out: list[Event],
    ) -> None:
        """``feed`` the packet ``data[begin:stop]``, events into ``out``."""
        self._book.now = now
        # The lanes (lanes.py) take most packets while comparing, in place; the rest, and
        # everything while a checkpoint runs or a bound holds everything, takes the general
        # path, which parses a copy of the packet alone.
        lanes = self._lanes
        if self._epoch.compares and lanes.feed(side, data, begin, stop, now, token, out):
            return
        if lanes.run is not None:
            lanes.flush(now, out)  # the general path sees a side's segments in order
        if begin or stop != len(data):
            data = data[begin:stop]
        packet = self._parse(data)
        if side is _PRIMARY:
            self._feed_primary(packet, data, token, now, out)
        else:
            self._feed_secondary(packet, token, now, out)

    def feed_many(
        self, side: Side, frames: Sequence[bytes], now: float, tokens: Sequence[object]
    ) -> list[Event]:
        """``feed`` each of ``frames`` in order with the token at the same index (there must be
        as many tokens as frames), all at ``now``: the events of every call, concatenated.

        For a shell that receives packets in batches: one call per batch instead of one per
        packet, and one event list to act on. ``frames`` may be a
        :class:`~coloproxy.protocol.colo_frames.Frames` (the chardev framing cut in place):
        its packets are then read where they lie in the receive buffer, not copied.
        """
        if len(frames) != len(tokens):
            raise UsageError(f"feed_many: {len(frames)} frames but {len(tokens)} tokens")
        out: list[Event] = []
        count: int = len(frames)
        lanes = self._lanes
        # Consecutive plain segments of one connection go in as one (lanes.py, ``Lanes.run``),
        # before any other frame and at the end.
        lanes.gathering = True
        try:
            if isinstance(frames, Frames):
                data = frames.data
                bounds = frames.bounds
                if isinstance(tokens, range) and tokens.step == 1:
                    first: int = tokens.start
                    for index in range(count):
                        start = frames.start(index)
                        self._feed_at(side, data, start, bounds[index + 1], now, first + index, out)
                else:
                    for index in range(count):
                        start = frames.start(index)
                        self._feed_at(side, data, start, bounds[index + 1], now, tokens[index], out)
            elif isinstance(frames, list) and isinstance(tokens, list):
                # The same loop as below, with both narrowed to lists: compiled, native indexing.
                for index in range(count):
                    packet = frames[index]
                    self._feed_at(side, packet, 0, len(packet), now, tokens[index], out)
            else:
                for index in range(count):
                    packet = frames[index]
                    self._feed_at(side, packet, 0, len(packet), now, tokens[index], out)
        finally:
            lanes.gathering = False
            lanes.drop_view()
        if lanes.run is not None:
            lanes.flush(now, out)
        return out

    def _feed_primary(
        self, packet: Packet | Malformed, data: bytes, token: object, now: float, out: list[Event]
    ) -> None:
        if type(packet) is Malformed:
            self._primary_malformed(packet.reason, packet.detail, data, token, now, out)
            return
        assert type(packet) is Packet
        epoch = self._epoch
        if not epoch.compares:
            self._freeze(token, now)
            self._learn_uncompared(packet, True, now, out)
            if epoch.checkpointing:
                if len(self._late_primary) < self._max_held_packets:
                    self._late_primary.append((self._frozen[-1], data))
            return
        if packet.fragment:
            self._primary_fragment(packet, token, now, out)
            return
        self._primary_packet(packet, token, None, now, out)

    def _learn_uncompared(
        self, packet: Packet, primary_side: bool, now: float, out: list[Event]
    ) -> None:
        """During a checkpoint, or at a bound until the checkpoint it asked for, nothing is
        compared, but SYNs still name ISNs: without that a connection opened meanwhile would
        have no alignment (a base taken mid-stream), and with
        ``checkpoint_completed(synced=False)`` none ever after."""
        if packet.proto == PROTO_TCP and packet.flags & TCP_SYN and not packet.fragment:
            flow = self._flow(packet, now, out)
            if type(flow) is TcpConnection:
                flow.learn(primary_side, packet.seq, packet.flags, packet.ack, self._book)

    def _primary_packet(
        self,
        packet: Packet,
        token: object,
        extra: list[object] | None,
        now: float,
        out: list[Event],
    ) -> None:
        book = self._book
        flow = self._flow(packet, now, out)
        if flow is None:
            self._freeze(token, now, extra)
            return
        flow.last_active = now
        if flow.passthrough:
            out.append(Release(token, ReleaseReason.PASSTHROUGH))
            if extra:
                out.extend(Release(more, ReleaseReason.PASSTHROUGH) for more in extra)
            return
        if book.over_bounds(packet.end - packet.payload):
            self._saturate(flow, out)
            self._freeze(token, now, extra)
            self._learn_uncompared(packet, True, now, out)
            return
        held = book.new_held(token, now, flow)
        held.extra = extra
        if type(flow) is TcpConnection:
            flow.feed_primary(
                packet.seq,
                packet.ack,
                packet.flags,
                _data(packet)[packet.payload : packet.end],
                held,
                now,
                book,
                out,
                _urgent_pointer(packet) if packet.flags & TCP_URG else 0,
            )
        elif type(flow) is DatagramFlow and flow.feed_primary(
            bytes(packet.data[packet.payload : packet.end]), held, now, book, out
        ):
            self._reorder.arm(flow)

    def _feed_secondary(
        self, packet: Packet | Malformed, token: object, now: float, out: list[Event]
    ) -> None:
        if type(packet) is Malformed:
            out.append(MalformedPacket(Side.SECONDARY, token, packet.reason, packet.detail))
            out.append(Drop(token, DropReason.MALFORMED))
            return
        assert type(packet) is Packet
        epoch = self._epoch
        if epoch.checkpointing:
            self._learn_uncompared(packet, False, now, out)
            if len(self._late_secondary) < self._max_held_packets:
                self._late_secondary.append((_data(packet), now))
            out.append(Drop(token, DropReason.CHECKPOINTING))
            return
        if epoch.saturated:
            self._learn_uncompared(packet, False, now, out)
            out.append(Drop(token, DropReason.OVERFLOW))
            return
        if packet.fragment:
            out.append(Drop(token, DropReason.COMPARED))
            self._secondary_fragment(packet, token, now, out)
            return
        self._secondary_packet(packet, token, True, now, out)

    def _secondary_packet(
        self, packet: Packet, token: object, drop: bool, now: float, out: list[Event]
    ) -> None:
        """Compare a secondary packet; with ``drop``, say first what becomes of it."""
        book = self._book
        flow = self._flow(packet, now, out)
        if flow is None:
            if drop:
                out.append(Drop(token, DropReason.OVERFLOW))
            return
        flow.last_active = now
        if flow.passthrough:
            if drop:
                out.append(Drop(token, DropReason.PASSTHROUGH))
            return
        if book.over_bounds(packet.end - packet.payload):
            self._saturate(flow, out)
            self._learn_uncompared(packet, False, now, out)
            if drop:
                out.append(Drop(token, DropReason.OVERFLOW))
            return
        if drop:
            out.append(compared(token))
        if type(flow) is TcpConnection:
            flow.feed_secondary(
                packet.seq,
                packet.ack,
                packet.flags,
                _data(packet)[packet.payload : packet.end],
                now,
                book,
                out,
                _urgent_pointer(packet) if packet.flags & TCP_URG else 0,
            )
        elif type(flow) is DatagramFlow and flow.feed_secondary(
            bytes(packet.data[packet.payload : packet.end]), now, book, out
        ):
            self._reorder.arm(flow)

    # -- special packets -----------------------------------------------------------------

    def _primary_malformed(
        self,
        reason: MalformedReason,
        detail: str,
        data: bytes,
        token: object,
        now: float,
        out: list[Event],
    ) -> None:
        out.append(MalformedPacket(_PRIMARY, token, reason, detail))
        if self.config.malformed_policy is MalformedPolicy.RELEASE:
            out.append(Release(token, ReleaseReason.MALFORMED))
            return
        self._freeze(token, now)
        evidence = Evidence(
            offset=None,
            primary=bytes(data[:EVIDENCE_BYTES]),
            secondary=b"",
            primary_length=len(data),
            secondary_length=0,
            detail=f"{reason}: {detail}" if detail else str(reason),
        )
        self._book.request(out, Reason.MALFORMED, "unknown", None, evidence)

    def _primary_fragment(
        self, packet: Packet, token: object, now: float, out: list[Event]
    ) -> None:
        result, partial = self._reassembly.add("primary", packet, token, now)
        if result.overflow:
            self._saturate(None, out)
            self._freeze(token, now)
            return
        if result.conflict:
            tokens = partial.tokens if partial is not None else [token]
            self._frozen_tokens.extend(tokens)
            out.append(
                MalformedPacket(
                    _PRIMARY,
                    token,
                    MalformedReason.REASSEMBLY_CONFLICT,
                    "overlapping fragments differ",
                )
            )
            self._book.request(out, Reason.MALFORMED, protocol_name(packet), None, None)
            return
        if result.complete is not None and partial is not None:
            whole = parse_ip(result.complete)
            tokens = partial.tokens
            if type(whole) is Malformed:
                self._frozen_tokens.extend(tokens)
                out.append(
                    MalformedPacket(_PRIMARY, token, whole.reason, "reassembled: " + whole.detail)
                )
                self._book.request(out, Reason.MALFORMED, protocol_name(packet), None, None)
                return
            assert type(whole) is Packet
            self._primary_packet(whole, tokens[0], tokens[1:] or None, partial.arrival, out)

    def _secondary_fragment(
        self, packet: Packet, token: object, now: float, out: list[Event]
    ) -> None:
        result, _ = self._reassembly.add("secondary", packet, token, now)
        if result.overflow:
            self._saturate(None, out)
            return
        if result.conflict:
            out.append(
                MalformedPacket(
                    Side.SECONDARY,
                    token,
                    MalformedReason.REASSEMBLY_CONFLICT,
                    "overlapping fragments differ",
                )
            )
            return
        if result.complete is not None:
            whole = parse_ip(result.complete)
            if type(whole) is Malformed:
                out.append(
                    MalformedPacket(
                        Side.SECONDARY, token, whole.reason, "reassembled: " + whole.detail
                    )
                )
                return
            assert type(whole) is Packet
            self._secondary_packet(whole, None, False, now, out)

    def _freeze(self, token: object, now: float, extra: list[object] | None = None) -> None:
        """Hold a primary packet uncompared until the next checkpoint completes."""
        self._frozen.append(self._book.freeze(token, now, extra))

    def _saturate(self, flow: FlowState | None, out: list[Event]) -> None:
        book = self._book
        if book.epoch.saturated:
            return
        evidence = Evidence.without_bytes(
            f"held {book.held_packets} packets (max {self.config.max_held_packets}), "
            f"stored {book.stored_bytes} bytes (max {self.config.max_held_bytes}), "
            f"{len(self._flows)} flows (max {self.config.max_flows}), "
            f"{len(self._reassembly.partials)} partial datagrams"
        )
        protocol = flow.label.protocol if flow is not None else "any"
        book.saturate(out, protocol, flow.label if flow is not None else None, evidence)

    # -- flows ---------------------------------------------------------------------------

    def _flow(self, packet: Packet, now: float, out: list[Event]) -> FlowState | None:
        if packet.proto == NOT_IP:
            key: tuple[object, ...] = (
                NOT_IP,
                packet.src,
                packet.dst,
                packet.ethertype,
                0,
                packet.vlan,
            )
        else:
            key = (packet.proto, packet.src, packet.dst, packet.sport, packet.dport, packet.vlan)
            echo = echo_identifier(packet)
            if echo is not None:
                kind, ident = echo
                key = (packet.proto, packet.src, packet.dst, ident, _ECHO | kind, packet.vlan)
        flow = self._flows.get(key)
        if flow is not None:
            return flow
        if len(self._flows) >= self.config.max_flows:
            self._evict(now, all_idle=True)
            if len(self._flows) >= self.config.max_flows:
                self._saturate(None, out)
                return None
        label = flow_label(packet)
        if packet.proto == PROTO_TCP:
            flow = TcpConnection(key, label, now, self._book.kept, self._rewritten)
        else:
            flow = DatagramFlow(key, label, now)
        if self._rules:
            flow.passthrough = any(rule.matches(packet, label.protocol) for rule in self._rules)
        self._flows[key] = flow
        self._lanes.add(key, flow, packet.proto)
        if self._next_sweep is None:
            self._next_sweep = now + self.config.flow_idle_timeout
        return flow

    def _evict(self, now: float, all_idle: bool = False) -> None:
        """Forget idle flows: those inactive for flow_idle_timeout, or every idle one."""
        limit = now - self.config.flow_idle_timeout
        stale = [
            key
            for key, flow in self._flows.items()
            if flow.idle() and (all_idle or flow.last_active <= limit)
        ]
        for key in stale:
            flow = self._flows.pop(key)
            if type(flow) is TcpConnection:
                flow.forget(self._book)
            self._lanes.remove(key)

    # -- timers --------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The earliest time at which ``handle_timer`` has something to do, or None."""
        book = self._book
        config = self.config
        deadline: float | None = self._next_sweep
        first = book.oldest_primary()
        if first is not None:
            candidate = first.arrival + config.compare_timeout
            if deadline is None or candidate < deadline:
                deadline = candidate
        secondary_timeout = config.secondary_timeout
        if secondary_timeout is not None:
            stored = book.secondary_fifo
            while stored and not stored[0].live:
                stored.popleft()
            if stored:
                candidate = stored[0].arrival + secondary_timeout
                if deadline is None or candidate < deadline:
                    deadline = candidate
        ack_lag = book.ack_lag
        if ack_lag is not None:
            gated = book.gated_fifo
            while gated and gated[0][1].released:
                gated.popleft()
            if gated:
                candidate = gated[0][0] + ack_lag
                if deadline is None or candidate < deadline:
                    deadline = candidate
        split_after = book.split_after
        if split_after is not None:
            splits = book.split_fifo
            while splits and splits[0].released:
                splits.popleft()
            if splits:
                candidate = splits[0].arrival + split_after
                if deadline is None or candidate < deadline:
                    deadline = candidate
        reorder = self._reorder.earliest()
        if reorder is not None and (deadline is None or reorder < deadline):
            deadline = reorder
        oldest = self._reassembly.oldest()
        if oldest is not None:
            candidate = oldest + config.compare_timeout
            if deadline is None or candidate < deadline:
                deadline = candidate
        return deadline

    def handle_timer(self, now: float) -> list[Event]:
        out: list[Event] = []
        book = self._book
        book.now = now
        config = self.config
        # Datagram mismatches first: the reorder window is the shortest deadline, and a
        # mismatch found there is a better reason (with evidence) than a later timeout.
        self._reorder.expire(now, book, out)
        ack_lag = book.ack_lag
        if ack_lag is not None:
            gated = book.gated_fifo
            while gated and (gated[0][1].released or gated[0][0] + ack_lag <= now):
                _, held = gated.popleft()
                flow = held.flow
                if held.released or flow is None or flow.diverged or flow.timed_out:
                    continue
                flow.timed_out = True  # one request per flow and epoch, like a timeout
                book.request(
                    out,
                    Reason.ACK_LAG,
                    flow.label.protocol,
                    flow.label,
                    Evidence.without_bytes(
                        (
                            f"primary segment [{held.start}, {held.end}) verified, its ACK not"
                            f" covered by the secondary's for {ack_lag:g} s"
                        ),
                        offset=held.start,
                        primary_length=held.end - held.start,
                    ),
                )
        split_after = book.split_after
        if split_after is not None:
            splits = book.split_fifo
            while splits and (splits[0].released or splits[0].arrival + split_after <= now):
                held = splits.popleft()
                connection = held.flow
                # Not while a checkpoint runs or is due: it releases everything anyway.
                epoch = self._epoch
                if held.released or epoch.checkpointing or epoch.requested:
                    continue
                if type(connection) is TcpConnection and not connection.diverged:
                    connection.split(held, book, out)
        # Deadlines are compared as ``arrival + timeout <= now``, the same sum get_timer()
        # returns, so that handle_timer(get_timer()) always fires (no float round-off).
        fifo = book.primary_fifo
        head = book.primary_head
        timeout = config.compare_timeout
        while head < len(fifo):
            held = fifo[head]
            if not (held.released or held.arrival + timeout <= now):
                break
            head += 1
            flow = held.flow
            if held.released or flow is None or flow.diverged or flow.timed_out:
                continue
            flow.timed_out = True
            book.request(
                out,
                Reason.TIMEOUT,
                flow.label.protocol,
                flow.label,
                _timeout_evidence(held, config.compare_timeout),
            )
        if head != book.primary_head:
            book.trim_primary(head)
        if config.secondary_timeout is not None:
            stored_fifo = book.secondary_fifo
            secondary_timeout = config.secondary_timeout
            while stored_fifo and (
                not stored_fifo[0].live or stored_fifo[0].arrival + secondary_timeout <= now
            ):
                stored = stored_fifo.popleft()
                flow = stored.flow
                if not stored.live or flow.diverged or flow.timed_out:
                    continue
                flow.timed_out = True
                reason = Reason.SECONDARY_ONLY
                detail = f"secondary output unmatched for {config.secondary_timeout:g} s"
                if type(stored) is Signal:
                    reason = Reason.URGENT if stored.kind == "URG" else Reason.FATE
                    what = "urgent pointer" if stored.kind == "URG" else stored.kind
                    detail = (
                        f"secondary {what} at stream offset {stored.start}, none from the primary"
                        f" within {config.secondary_timeout:g} s"
                    )
                evidence = Evidence(
                    offset=stored.start if type(flow) is TcpConnection else None,
                    primary=b"",
                    secondary=stored.span(
                        stored.start, min(stored.end, stored.start + EVIDENCE_BYTES)
                    ),
                    primary_length=0,
                    secondary_length=stored.end - stored.start,
                    detail=detail,
                )
                book.request(out, reason, flow.label.protocol, flow.label, evidence)
        for partial in self._reassembly.expire(now, config.compare_timeout):
            self._expired_fragments(partial, out)
        if self._next_sweep is not None and self._next_sweep <= now:
            self._evict(now)
            self._next_sweep = (now + config.flow_idle_timeout / 4) if self._flows else None
        return out

    def _expired_fragments(self, partial: Partial, out: list[Event]) -> None:
        if partial.key[0] != "primary":
            return
        self._frozen_tokens.extend(partial.tokens)
        evidence = Evidence.without_bytes(
            f"{len(partial.tokens)} fragments of an incomplete datagram",
            primary_length=partial.size,
        )
        self._book.request(out, Reason.TIMEOUT, "ip-fragments", None, evidence)

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoint_started(self, now: float) -> list[Event]:
        """Both VMs stopped for a checkpoint: stop comparing until it completes."""
        self._epoch.handle(START)
        self._late_primary = []
        self._late_secondary = []
        return []

    def checkpoint_completed(
        self, now: float, synced: bool = True, resumed: float | None = None
    ) -> list[Event]:
        """The secondary holds the primary's state: release everything, start afresh.

        ``synced=False`` says the secondary did *not* receive the primary's state (a test
        engine whose guests are namespaces): everything is released and compared afresh as
        usual, but each connection keeps its learned ISN offset and the secondary's ACKs.

        ``resumed`` is when (on the clock of ``now``) the guests ran again. The shell hears of
        the end of a checkpoint a little after it: packets that arrived after ``resumed`` were
        produced after the checkpoint, so they are not released by it but compared in the new
        epoch, fed again in arrival order (the secondary's too, which were dropped uncompared
        while the checkpoint ran). Without ``resumed`` every held packet is released.
        """
        out: list[Event] = []
        book = self._book
        late_primary: list[tuple[Held, bytes]] = []
        late_secondary: list[tuple[bytes, float]] = []
        if resumed is not None:
            late_primary = [
                (entry, data) for entry, data in self._late_primary if entry.arrival > resumed
            ]
            late_secondary = [
                (data, arrival) for data, arrival in self._late_secondary if arrival > resumed
            ]
            for entry, _ in late_primary:
                entry.released = True  # fed again below under a new Held
        self._late_primary = []
        self._late_secondary = []
        held = self._frozen
        for flow in self._flows.values():
            if type(flow) is TcpConnection:
                held.extend(flow.take_held())
                flow.reset_epoch(book, synced)
                continue
            held.extend(flow.drain())
            if type(flow) is DatagramFlow:
                flow.reset_epoch(book)
        held.sort(key=lambda entry: entry.serial)
        for entry in held:
            if not entry.released:
                book.release(entry, out, ReleaseReason.CHECKPOINT)
        tokens = self._frozen_tokens
        for partial in self._reassembly.clear():
            if partial.key[0] == "primary":
                tokens.extend(partial.tokens)
        out.extend(Release(token, ReleaseReason.CHECKPOINT) for token in tokens)
        self._frozen = []
        self._frozen_tokens = []
        self._reorder.clear()
        book.new_epoch()
        if late_primary or late_secondary:
            again: list[tuple[float, int, Side, bytes, object]] = [
                (entry.arrival, entry.serial, _PRIMARY, data, entry.token)
                for entry, data in late_primary
            ]
            again += [(arrival, 0, Side.SECONDARY, data, None) for data, arrival in late_secondary]
            again.sort(key=lambda item: (item[0], item[1]))
            for arrival, _, side, data, token in again:
                for event in self.feed(side, data, arrival, token):
                    # the secondary's packets got their Drop when they first came
                    if not (type(event) is Drop and event.token is None):
                        out.append(event)
        return out

    # -- introspection -------------------------------------------------------------------

    def stats(self) -> CompareStats:
        book = self._book
        waiting = book.oldest_primary()
        oldest_primary = waiting.arrival if waiting is not None else None
        if self._frozen:
            first = self._frozen[0].arrival
            oldest_primary = first if oldest_primary is None else min(first, oldest_primary)
        stored = book.secondary_fifo
        while stored and not stored[0].live:
            stored.popleft()
        tcp = [flow for flow in self._flows.values() if type(flow) is TcpConnection]
        return CompareStats(
            flows=len(self._flows),
            tcp_connections=len(tcp),
            held_packets=book.held_packets,
            stored_bytes=book.stored_bytes,
            bytes_compared=book.bytes_compared,
            fragments_pending=len(self._reassembly.partials),
            oldest_primary=oldest_primary,
            oldest_secondary=stored[0].arrival if stored else None,
            checkpoint_requested=self._epoch.requested,
            checkpointing=self._epoch.checkpointing,
            saturated=self._epoch.saturated,
            isn_offsets_learned=sum(1 for flow in tcp if flow.isn_offset() is not None),
            kept_bytes=book.kept.total,
        )

    def isn_offset(
        self, guest: bytes, guest_port: int, peer: bytes, peer_port: int, vlan: int = -1
    ) -> int | None:
        """secondary ISN - primary ISN for a TCP connection, or None while unknown."""
        flow = self._flows.get((PROTO_TCP, guest, peer, guest_port, peer_port, vlan))
        return flow.isn_offset() if type(flow) is TcpConnection else None


def _timeout_evidence(held: Held, timeout: float) -> Evidence:
    if held.payload:
        return Evidence(
            offset=None,
            primary=held.payload[:EVIDENCE_BYTES],
            secondary=b"",
            primary_length=len(held.payload),
            secondary_length=0,
            detail=f"primary datagram unmatched for {timeout:g} s",
        )
    detail = f"primary segment [{held.start}, {held.end}) unmatched for {timeout:g} s"
    if held.need & NEED_URG:
        detail += f" (its urgent pointer names stream offset {held.urgent})"
    return Evidence.without_bytes(detail, offset=held.start, primary_length=held.end - held.start)
