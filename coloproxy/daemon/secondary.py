"""Role secondary: host S's two queues and the SVM's TCP sequence spaces.

Theory of operation
-------------------
``SecondaryProxy`` is the pump between host S's queues and :class:`SecondaryRewriter` (pure,
``coloproxy/rewrite/secondary.py`` says how offsets are learnt):

- S-in (TCP on its way into the SVM): learn from the client's handshake ACK, shift the ACK,
  SACK edges and TSecr into the SVM's space; always accepted.
- Egress (the SVM's TCP output): learn the SVM's ISN from its SYN-ACKs; after a takeover shift
  the sequence number and TSval into the PVM's space; always accepted. While protected the
  kernel queues only SYN-ACKs here (coloproxy/net/rules.py); host P compares the rest.

The daemon calls :meth:`checkpoint_applied` when host S's engine reports that the SVM loaded
a checkpoint (the secondary QEMU's RESUME), :meth:`take_over` before the SVM's port joins
the LAN, and :meth:`syn_replay_frames` right after it joined: the client SYNs of connections
still half-open on the SVM, as Ethernet frames to the guest's MAC, which the daemon sends on
the guest port (a packet socket) so that the SVM sends its SYN-ACKs again at once; and
:meth:`backoff_revert_frames`, ICMP messages that make the SVM retransmit at once what it
sent towards host P before the takeover.

Nothing here ever drops a packet: a packet it cannot read passes unchanged, counted by status
(the SVM's own stack then judges it as the PVM's does).
"""

from __future__ import annotations

from collections.abc import Sequence

from coloproxy.daemon.primary import ProxyCounters, Verdicts
from coloproxy.rewrite import SecondaryRewriter

ETHERTYPE_IPV4 = b"\x08\x00"
ETHERTYPE_IPV6 = b"\x86\xdd"


class SecondaryProxy:
    def __init__(
        self,
        rewriter: SecondaryRewriter,
        to_guest: Verdicts,
        from_guest: Verdicts,
        counters: ProxyCounters | None = None,
    ) -> None:
        self.rewriter = rewriter
        self._to_guest = to_guest
        self._from_guest = from_guest
        self.counters = counters or ProxyCounters()

    def bind(self, to_guest: Verdicts, from_guest: Verdicts) -> None:
        """Attach the queues (they are opened after the proxy exists)."""
        self._to_guest = to_guest
        self._from_guest = from_guest

    def on_to_guest(self, handle: object, payload: bytes, now: float) -> None:
        outcome = self.rewriter.to_guest(payload, now=now)
        self.counters.rewrites[outcome.status] += 1
        self._to_guest.accept(handle, outcome.payload)
        self.counters.packets["secondary-in", "accept"] += 1

    def on_from_guest(self, handle: object, payload: bytes, now: float) -> None:
        outcome = self.rewriter.from_guest(payload)
        self.counters.egress_rewrites[outcome.status] += 1
        self._from_guest.accept(handle, outcome.payload)
        self.counters.packets["secondary-egress", "accept"] += 1

    def checkpoint_applied(self) -> None:
        self.rewriter.checkpoint_applied()

    def take_over(self) -> None:
        self.rewriter.take_over()

    def syn_replay_frames(
        self, now: float, source: bytes, destinations: Sequence[bytes]
    ) -> tuple[int, list[bytes]]:
        """The SYNs to replay (:meth:`SecondaryRewriter.replay_syns`, once) and their Ethernet
        frames from ``source`` to each of ``destinations`` (the guest's MACs): none without a
        destination (a TCP stack drops frames not addressed to it). The caller counts the
        SYNs in ``counters.syns_replayed`` once the frames are sent."""
        syns = self.rewriter.replay_syns(now)
        return len(syns), _frames(syns, source, destinations)

    def backoff_revert_frames(
        self, now: float, source: bytes, destinations: Sequence[bytes]
    ) -> tuple[int, list[bytes]]:
        """The client's latest segments and the ICMP messages that make the SVM retransmit at
        once (:meth:`SecondaryRewriter.backoff_reverts`, once) as Ethernet frames, like
        :meth:`syn_replay_frames`; the number of connections they concern first."""
        connections = self.rewriter.backoff_reverts(now)
        packets = [packet for connection in connections for packet in connection]
        return len(connections), _frames(packets, source, destinations)


def _frames(packets: Sequence[bytes], source: bytes, destinations: Sequence[bytes]) -> list[bytes]:
    return [
        destination + source + (ETHERTYPE_IPV6 if packet[0] >> 4 == 6 else ETHERTYPE_IPV4) + packet
        for packet in packets
        for destination in destinations
    ]
