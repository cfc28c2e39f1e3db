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
a checkpoint (the secondary QEMU's RESUME) and :meth:`take_over` before the SVM's port joins
the LAN. Nothing here ever drops a packet: a packet it cannot read passes unchanged, counted
by status (the SVM's own stack then judges it as the PVM's does).
"""

from __future__ import annotations

from coloproxy.daemon.primary import ProxyCounters, Verdicts
from coloproxy.rewrite import SecondaryRewriter


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
        outcome = self.rewriter.to_guest(payload)
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
