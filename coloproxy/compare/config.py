"""Comparator settings: every bound and timeout, with the reason for its default.

Pure data; the YAML loader (shell) builds one of these and the core never reads files.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

from coloproxy.errors import UsageError


class Framing(StrEnum):
    IP = "ip"  # NFQUEUE hands us IP packets
    ETHERNET = "ethernet"  # QEMU's chardevs and most captures carry Ethernet frames


class MalformedPolicy(StrEnum):
    CHECKPOINT = "checkpoint"  # hold the primary packet and ask for a checkpoint (I2, safe)
    RELEASE = "release"  # release at once, counted as unprotected


class SecondarySeq(StrEnum):
    """Which space the secondary's TCP sequence numbers are in when the comparator sees them."""

    OWN = "own"  # the secondary guest's own (NFQUEUE: we align by each side's ISN)
    # QEMU's filter-rewriter (on the secondary host, in front of the chardev transport) shifts
    # every secondary segment into the primary's space except the SYN-ACK, which keeps the
    # secondary's own ISN (handle_secondary_tcp_pkt rewrites only segments without SYN): the
    # secondary's stream offsets are then counted from the primary's ISN.
    REWRITTEN = "rewritten"


@dataclass(frozen=True, slots=True)
class PassthroughRule:
    """Traffic that can never match (the guest's clock, a nonce): released uncompared.

    Every field that is set must match; ``None`` matches anything. Ports apply to TCP and UDP.
    Networks are CIDR strings, matched against the guest's and the peer's address.
    """

    protocol: str | None = None  # "tcp", "udp", "icmp", "icmpv6" or "ip-proto-N"
    guest_port: int | None = None
    peer_port: int | None = None
    guest_network: str | None = None
    peer_network: str | None = None

    def __post_init__(self) -> None:
        for name in ("guest_port", "peer_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 0xFFFF:
                raise UsageError(f"passthrough rule {name} {port} is not a port (0-65535)")
        for name in ("guest_network", "peer_network"):
            network = getattr(self, name)
            if network is not None:
                try:
                    ipaddress.ip_network(network, strict=False)
                except ValueError as exc:
                    raise UsageError(f"passthrough rule {name} {network!r}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class CompareConfig:
    framing: Framing = Framing.IP
    # QEMU's colo-compare waits 3000 ms (compare_timeout) before it checkpoints on an unmatched
    # primary packet; the SVM runs up to that much behind right after a checkpoint under TCG.
    compare_timeout: float = 3.0
    # Secondary output the primary has not produced within this time is a divergence too;
    # None turns the check off (QEMU never checks it).
    secondary_timeout: float | None = 3.0
    # Datagrams may be reordered within a flow; when both sides hold unmatched datagrams for
    # this long, they differ. Reordering on a host-local path settles in microseconds.
    datagram_reorder_window: float = 0.005
    # QEMU colo-compare wipes every queue above 16 384 connections; we evict idle flows and
    # otherwise ask for a checkpoint.
    max_flows: int = 16384
    # NFQUEUE's default queue length is 1024 per queue; 4096 held primary packets leaves
    # room for several queues' worth in flight.
    max_held_packets: int = 4096
    # Payload bytes kept for comparison (both sides): 64 MiB is about 45k full-size segments.
    max_held_bytes: int = 64 << 20
    # Compared TCP bytes kept to compare retransmissions of them (compare/kept.py). A guest
    # resends only bytes its peer has not acknowledged, at most its send buffer: Linux caps
    # that at net.ipv4.tcp_wmem's maximum, 4 MiB by default. Per connection, the last this many
    # bytes by stream offset; a resend of older compared bytes from the primary is held and
    # asks for a checkpoint (reason retransmission-unkept).
    retransmit_window: int = 4 << 20
    # The same bytes over all connections (as much as max_held_bytes): the longest-kept are
    # forgotten first.
    max_retransmit_bytes: int = 64 << 20
    max_fragment_datagrams: int = 256
    max_fragment_bytes: int = 4 << 20
    # A flow with nothing held or pending is forgotten after this long.
    flow_idle_timeout: float = 120.0
    malformed_policy: MalformedPolicy = MalformedPolicy.CHECKPOINT
    passthrough: tuple[PassthroughRule, ...] = field(default=())
    secondary_seq: SecondarySeq = SecondarySeq.OWN
    # A held primary TCP packet longer than ``gso_above`` bytes (the guest port's MTU: only a
    # GSO packet is longer) still held ``split_after`` seconds after it came is handed back
    # to the kernel to be cut into segments (``Split``), which come back one by one: its
    # verified part leaves at once. Without it a 64 KiB GSO packet waits for SVM bytes that
    # the SVM sends only after the client's ACK of that very packet (docs/data-path.md,
    # "Release granularity"). None: never (the chardev transport cannot split). 20 ms: the
    # SVM's next burst after an ACK is out by then (16 ms under TCG in the lab), and it is
    # a tenth of Linux's minimum RTO.
    split_after: float | None = 0.02
    # A primary segment that is verified (or carries no data) but still held because the
    # secondary's ACK does not cover its ACK (ACK gating) asks for a checkpoint after this
    # long (reason ``ack-lag``). The secondary lags when it dropped client data the PVM took
    # (its receive window closed first, docs/data-path.md): the client will resend that data
    # only at its retransmission timeout (200 ms or more), so the bound is half of that. None:
    # wait for compare_timeout.
    ack_lag_timeout: float | None = 0.1
    gso_above: int = 1500

    def __post_init__(self) -> None:
        positive = (
            "compare_timeout",
            "datagram_reorder_window",
            "max_flows",
            "max_held_packets",
            "max_held_bytes",
            "retransmit_window",
            "max_retransmit_bytes",
            "max_fragment_datagrams",
            "max_fragment_bytes",
            "flow_idle_timeout",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"compare setting {name} must be positive")
        if self.ack_lag_timeout is not None and self.ack_lag_timeout <= 0:
            raise UsageError("compare setting ack_lag_timeout must be positive or None")
        if self.split_after is not None and self.split_after <= 0:
            raise UsageError("compare setting split_after must be positive or None")
        if self.gso_above < 68:
            raise UsageError("compare setting gso_above must be an MTU (at least 68)")
        if self.secondary_timeout is not None and self.secondary_timeout <= 0:
            raise UsageError("compare setting secondary_timeout must be positive or None")
