"""What the comparator tells its shell: immutable values, no callbacks (decisions are data).

The shell turns ``Release`` into an NF_ACCEPT verdict (or a frame written to outdev),
``Drop`` into NF_DROP, ``CheckpointNeeded`` into a control-socket request (unless
``coalesced``), and counts every event under its reason label. ``Release`` and ``Drop``, with
their reasons, live in ``verdicts.py`` (made for every packet, kept compilable) and are
imported from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from coloproxy.compare.verdicts import Drop, DropReason, Release, ReleaseReason, Split
from coloproxy.packet.parse import MalformedReason

__all__ = [
    "EVIDENCE_BEFORE",
    "EVIDENCE_BYTES",
    "CheckpointNeeded",
    "Drop",
    "DropReason",
    "Event",
    "Evidence",
    "Flow",
    "MalformedPacket",
    "Reason",
    "Release",
    "ReleaseReason",
    "Side",
    "Split",
]

EVIDENCE_BYTES = 48
EVIDENCE_BEFORE = 16


class Side(Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class Reason(StrEnum):
    """Why a checkpoint is needed; the closed vocabulary that is also the metric label."""

    PAYLOAD = "payload"  # bytes differ at the same stream offset, or datagrams differ
    # a side resent TCP bytes with other bytes than it sent there before (compared or not)
    RETRANSMISSION = "retransmission-differs"
    # the primary resent compared bytes no longer kept (retransmit_window): not comparable
    RETRANSMISSION_UNKEPT = "retransmission-unkept"
    URGENT = "urgent"  # TCP urgent data (URG and its pointer) at different stream offsets
    # the connection ends differently: FIN vs RST, FIN offsets, SYN vs RST, a FIN or a RST
    # (a RST after a FIN too) the primary does not send
    FATE = "fate"
    TIMEOUT = "timeout"  # a primary packet stayed unmatched for compare_timeout
    # a verified primary segment waited ack_lag_timeout for the secondary's ACK to cover it
    ACK_LAG = "ack-lag"
    SECONDARY_ONLY = "secondary-only"  # secondary output with no primary counterpart in time
    OVERFLOW = "overflow"  # a configured bound (packets, bytes, flows, fragments) was reached
    MALFORMED = "malformed"  # a primary packet could not be parsed (policy "checkpoint")


@dataclass(frozen=True, slots=True)
class Flow:
    """A flow as seen in the guest's egress direction (guest -> peer)."""

    protocol: str  # "tcp", "udp", "icmp", "icmpv6", "ip-proto-N", "ethertype-0xNNNN"
    guest: str  # address, with ":port" for TCP and UDP
    peer: str
    vlan: int = -1
    echo_id: int = -1  # ICMP/ICMPv6 echo request or reply: the identifier (a flow each)

    def __str__(self) -> str:
        vlan = f" vlan {self.vlan}" if self.vlan >= 0 else ""
        echo = f" echo id {self.echo_id}" if self.echo_id >= 0 else ""
        return f"{self.protocol} {self.guest} -> {self.peer}{echo}{vlan}"


@dataclass(frozen=True, slots=True)
class Evidence:
    """Where and how the two outputs differ.

    ``offset`` is the TCP stream offset (bytes after the SYN) of the first difference, or the
    byte index of the first difference within the datagram. ``primary``/``secondary`` hold a
    window of each side's bytes (at most ``EVIDENCE_BYTES``) that starts ``before`` bytes
    ahead of the first difference. The lengths are of the whole segment or datagram compared.
    ``detail`` is one line for humans.
    """

    offset: int | None
    primary: bytes
    secondary: bytes
    primary_length: int
    secondary_length: int
    before: int = 0
    detail: str = ""

    @classmethod
    def without_bytes(
        cls, detail: str, offset: int | None = None, primary_length: int = 0
    ) -> Evidence:
        """Evidence that shows no bytes (a timeout, a bound, the connection's fate): where,
        how long the primary's segment or datagram was, and what happened."""
        return cls(
            offset=offset,
            primary=b"",
            secondary=b"",
            primary_length=primary_length,
            secondary_length=0,
            detail=detail,
        )


@dataclass(frozen=True, slots=True)
class CheckpointNeeded:
    """A checkpoint is needed. ``coalesced`` is true when one is already requested (I4)."""

    reason: Reason
    protocol: str
    flow: Flow | None
    evidence: Evidence | None
    coalesced: bool = False


@dataclass(frozen=True, slots=True)
class MalformedPacket:
    """A packet that did not parse; what happened to it follows as a Release/Drop event."""

    side: Side
    token: object
    reason: MalformedReason
    detail: str


Event = Release | Drop | Split | CheckpointNeeded | MalformedPacket
