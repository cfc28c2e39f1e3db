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

Across a checkpoint: the daemon calls :meth:`checkpoint_started` when host S's engine sees
the SVM stop to load one (the secondary QEMU's STOP) and :meth:`checkpoint_applied` when it
resumed with it (its RESUME). In between S-in holds the client's segments: a segment shifted
with an offset of the old SVM and queued to the new one (a copy of the PVM, offset 0) would
carry a wrong ACK, which the SVM drops with a challenge ACK; when it was the client's last
(a FIN), the PVM's ACK of it waited, gated, for the client's retransmission timeout. At the
RESUME the offsets are forgotten first, then the held segments are shifted (with none) and
accepted, in order. If no RESUME comes within ``S_IN_HOLD_LIMIT``, the proxy's own timer
(``get_timer``/``handle_timer``, pumped by ``coloproxy/pump.py``) lets them go with
the old offsets (``release_held``: a checkpoint that did not load leaves the SVM and its
offsets as they were).

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

import logging
from collections.abc import Sequence

from coloproxy.daemon.primary import ProxyCounters, Verdicts
from coloproxy.rewrite import SecondaryRewriter

# S-in segments held across one checkpoint at most: a checkpoint pauses the SVM for 10-60 ms
# in the lab, about 600 segments at a gigabit; past this, segments pass shifted as they
# were (counted as rewrite status "held-overflow").
MAX_HELD_ACROSS_CHECKPOINT = 4096

# Host S lets S-in's held segments go with the offsets they had when the SVM's RESUME has
# not come this long after its STOP: a checkpoint pauses the guests for 10-60 ms in the lab.
S_IN_HOLD_LIMIT = 2.0

# The daemon's log name, as before this moved out of coloproxy/daemon/run.py: journal
# filters (and scripts/check-systemd-unit) match on it.
log = logging.getLogger("coloproxy.daemon.run")

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
        # S-in segments held while the SVM loads a checkpoint: (handle, packet, arrival).
        self._held: list[tuple[object, bytes, float]] = []
        self.holding = False
        self._hold_until = 0.0  # the last STOP's S_IN_HOLD_LIMIT: let the held go then

    def bind(self, to_guest: Verdicts, from_guest: Verdicts) -> None:
        """Attach the queues (they are opened after the proxy exists)."""
        self._to_guest = to_guest
        self._from_guest = from_guest

    def on_to_guest(self, handle: object, payload: bytes, now: float) -> None:
        if self.holding:
            if len(self._held) < MAX_HELD_ACROSS_CHECKPOINT:
                self._held.append((handle, payload, now))
                return
            self.counters.rewrites["held-overflow"] += 1  # shifted with the old offsets
        outcome = self.rewriter.to_guest(payload, now=now)
        self.counters.rewrites[outcome.status] += 1
        self._to_guest.accept(handle, outcome.payload)
        self.counters.packets["secondary-in", "accept"] += 1

    def on_from_guest(self, handle: object, payload: bytes, now: float) -> None:
        outcome = self.rewriter.from_guest(payload)
        self.counters.egress_rewrites[outcome.status] += 1
        self._from_guest.accept(handle, outcome.payload)
        self.counters.packets["secondary-egress", "accept"] += 1

    def checkpoint_started(self, now: float) -> None:
        """The SVM stopped to load a checkpoint: hold S-in until :meth:`checkpoint_applied`,
        at most ``S_IN_HOLD_LIMIT`` from ``now``."""
        self._hold_until = now + S_IN_HOLD_LIMIT
        if not self.rewriter.taken_over:
            self.holding = True

    def get_timer(self) -> float | None:
        """When the segments held across a checkpoint go without its RESUME, or None."""
        return self._hold_until if self.holding else None

    def handle_timer(self, now: float) -> None:
        if self.holding and now >= self._hold_until:
            released = self.release_held()
            log.warning(
                "S-in: no RESUME %.0f s after the SVM stopped; %d held segment(s) let go with"
                " the offsets they had (a checkpoint that did not load leaves them right)",
                S_IN_HOLD_LIMIT,
                released,
            )

    def checkpoint_applied(self) -> None:
        self.rewriter.checkpoint_applied()
        self.release_held()

    def release_held(self) -> int:
        """Shift and accept the held segments with the offsets of now; how many there were."""
        held, self._held = self._held, []
        self.holding = False
        for handle, payload, now in held:
            self.on_to_guest(handle, payload, now)
        return len(held)

    def take_over(self) -> None:
        self.release_held()  # no checkpoint loaded since the STOP: the offsets are right
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
