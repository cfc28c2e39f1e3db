"""Role primary: the two queues of host P, the comparator and the checkpoint requests.

Theory of operation
-------------------
``PrimaryProxy`` is the pump between the capture layer and the pure core. It owns no
sockets: verdicts go to the queue objects it is given, checkpoint requests to a
``RequestSink`` (the control server), counts to ``ProxyCounters`` (read by the metrics
collector at scrape time, so the per-packet cost is a dict increment).

- P-out (primary egress): ``comparator.feed(PRIMARY, ...)``; the packet is held in the kernel
  (no verdict) until a ``Release`` names it.
- S-out (secondary egress): ``comparator.feed(SECONDARY, ...)``; every packet is dropped.
- S-in (client -> secondary copies) is host S's (``coloproxy/daemon/secondary.py``): the
  offsets a takeover needs must live where the SVM runs. With the chardev transport there
  is no S-in at all: QEMU's filter-rewriter does that job.
- The chardev transport feeds whole receive batches (``on_primary_many``,
  ``on_secondary_many``: one ``feed_many`` call each).
- ``CheckpointNeeded`` that is not coalesced becomes one request with a fresh id (I4);
  later ones while it is outstanding are counted as coalesced.
- Checkpoint started/completed from the engine drive the comparator's epochs.

Restart safety (I6): a new ``PrimaryProxy`` starts *frozen*: it calls
``checkpoint_started`` on its comparator, so every PVM packet is held and every SVM packet
dropped, and asks for a checkpoint with reason ``restart``. Nothing is released before an
engine reports a completed checkpoint.

Timers: after any input the proxy asks the comparator for its next deadline (at most once
per event-loop iteration) and keeps one loop timer armed at the earliest.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from coloproxy.compare import (
    CheckpointNeeded,
    Comparator,
    Drop,
    DropReason,
    Event,
    Evidence,
    MalformedPacket,
    Release,
    ReleaseReason,
    Side,
    Split,
)

log = logging.getLogger(__name__)

# Verdict labels built once, not concatenated for every packet.
_ACCEPT: dict[str, str] = {reason: "accept-" + reason for reason in ReleaseReason}
_DROP: dict[str, str] = {reason: "drop-" + reason for reason in DropReason}

# Reasons the proxy itself adds to the comparator's vocabulary (coloproxy.compare.Reason).
REASON_RESTART = "restart"
REASON_MANUAL = "manual"


class Verdicts(Protocol):
    """What a capture queue offers the proxy."""

    def accept(self, handle: object, payload: bytes | None = None) -> None: ...

    def drop(self, handle: object) -> None: ...


class Splitting(Protocol):
    """P-out on the NFQUEUE transport: can hand a GSO packet back to be cut into segments."""

    def split(self, handle: object) -> None: ...


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    id: int
    reason: str
    protocol: str
    flow: str | None
    evidence: Evidence | None
    time: float


class RequestSink(Protocol):
    """Where checkpoint requests go (the control server broadcasts them to engines)."""

    def checkpoint_requested(self, request: CheckpointRequest) -> None: ...


@dataclass
class ProxyCounters:
    """Plain counters, bumped on the hot path and exposed at scrape time."""

    packets: Counter[tuple[str, str]] = field(default_factory=Counter)  # (queue, verdict)
    divergences: Counter[tuple[str, str]] = field(default_factory=Counter)  # (protocol, reason)
    requests: Counter[str] = field(default_factory=Counter)  # reason
    coalesced: Counter[str] = field(default_factory=Counter)  # reason
    malformed: Counter[tuple[str, str]] = field(default_factory=Counter)  # (side, reason)
    rewrites: Counter[str] = field(default_factory=Counter)  # host S, S-in: RewriteStatus
    egress_rewrites: Counter[str] = field(default_factory=Counter)  # host S, SVM output
    syns_replayed: int = 0  # host S: client SYNs handed to the SVM again after a takeover
    backoff_reverts: int = 0  # host S: connections whose SVM backoff was reverted at a takeover
    checkpoints_completed: int = 0
    last_checkpoint: float | None = None  # loop time of the last completed checkpoint


class PrimaryProxy:
    def __init__(
        self,
        comparator: Comparator,
        primary_out: Verdicts,
        secondary_out: Verdicts,
        requests: RequestSink,
        now: float,
        counters: ProxyCounters | None = None,
    ) -> None:
        self.comparator = comparator
        self._primary_out = primary_out
        self._secondary_out = secondary_out
        self._requests = requests
        self.counters = counters or ProxyCounters()
        self._ids = itertools.count(1)
        self.outstanding: CheckpointRequest | None = None
        self.checkpointing = False
        self.unprotected = False  # after the secondary was lost: release without comparing
        # I6: hold everything until a checkpoint made the secondary equal to the primary.
        comparator.checkpoint_started(now)
        self.checkpointing = True
        self._request(REASON_RESTART, "any", None, None, now)

    def bind(self, primary_out: Verdicts, secondary_out: Verdicts) -> None:
        """Attach the queues (they are opened after the proxy exists: packets may come at once)."""
        self._primary_out = primary_out
        self._secondary_out = secondary_out

    # -- packets ---------------------------------------------------------------------------

    def on_primary(self, handle: object, payload: bytes, now: float) -> None:
        if self.unprotected:
            self._primary_out.accept(handle)
            self.counters.packets["primary-out", "accept-unprotected"] += 1
            return
        self._act(self.comparator.feed(Side.PRIMARY, payload, now, handle), now)

    def on_secondary(self, handle: object, payload: bytes, now: float) -> None:
        if self.unprotected:
            self._secondary_out.drop(handle)
            self.counters.packets["secondary-out", "drop-unprotected"] += 1
            return
        self._act(self.comparator.feed(Side.SECONDARY, payload, now, handle), now)

    def on_primary_many(
        self, handles: Sequence[object], payloads: Sequence[bytes], now: float
    ) -> None:
        """``on_primary`` for a receive batch: one ``feed_many`` call (the chardev transport)."""
        if self.unprotected:
            for handle in handles:
                self._primary_out.accept(handle)
            self.counters.packets["primary-out", "accept-unprotected"] += len(handles)
            return
        self._act(self.comparator.feed_many(Side.PRIMARY, payloads, now, handles), now)

    def on_secondary_many(
        self, handles: Sequence[object], payloads: Sequence[bytes], now: float
    ) -> None:
        """``on_secondary`` for a receive batch."""
        if self.unprotected:
            for handle in handles:
                self._secondary_out.drop(handle)
            self.counters.packets["secondary-out", "drop-unprotected"] += len(handles)
            return
        self._act(self.comparator.feed_many(Side.SECONDARY, payloads, now, handles), now)

    def on_timer(self, now: float) -> None:
        self._act(self.comparator.handle_timer(now), now)

    def _act(self, events: list[Event], now: float) -> None:
        packets = self.counters.packets
        for event in events:
            if type(event) is Release:
                self._primary_out.accept(event.token)
                packets["primary-out", _ACCEPT[event.reason]] += 1
            elif type(event) is Drop:
                if event.token is not None:
                    self._secondary_out.drop(event.token)
                packets["secondary-out", _DROP[event.reason]] += 1
            elif type(event) is Split:
                # Only a P-out that can split gets one (CompareConfig.split_after is None
                # elsewhere).
                cast(Splitting, self._primary_out).split(event.token)
                packets["primary-out", "split"] += 1
            elif type(event) is CheckpointNeeded:
                self.counters.divergences[event.protocol, event.reason] += 1
                if event.coalesced or self.outstanding is not None:
                    self.counters.coalesced[event.reason] += 1
                else:
                    self._request(
                        event.reason,
                        event.protocol,
                        str(event.flow) if event.flow is not None else None,
                        event.evidence,
                        now,
                    )
            elif type(event) is MalformedPacket:
                self.counters.malformed[event.side.value, event.reason] += 1

    # -- checkpoints -----------------------------------------------------------------------

    def request_manual(self, now: float, reason: str = REASON_MANUAL) -> CheckpointRequest | None:
        """A checkpoint asked for by an operator; None when one is outstanding already."""
        if self.outstanding is not None:
            self.counters.coalesced[reason] += 1
            return None
        return self._request(reason, "any", None, None, now)

    def set_unprotected(self, now: float) -> None:
        """The secondary is gone: release what is held and compare nothing from now on."""
        self.unprotected = True
        self.outstanding = None
        for event in self.comparator.checkpoint_completed(now):
            if type(event) is Release:
                self._primary_out.accept(event.token)
                self.counters.packets["primary-out", "accept-unprotected"] += 1

    def _request(
        self, reason: str, protocol: str, flow: str | None, evidence: Evidence | None, now: float
    ) -> CheckpointRequest:
        request = CheckpointRequest(next(self._ids), reason, protocol, flow, evidence, now)
        self.outstanding = request
        self.counters.requests[reason] += 1
        log.info("checkpoint request %d: %s %s %s", request.id, reason, protocol, flow or "")
        self._requests.checkpoint_requested(request)
        return request

    def checkpoint_started(self, now: float) -> None:
        self.checkpointing = True
        self._act(self.comparator.checkpoint_started(now), now)

    def checkpoint_completed(
        self, now: float, synced: bool = True, resumed: float | None = None
    ) -> None:
        """The engine saw the primary's RESUME (at ``resumed``, on our clock, when known):
        the secondary holds the primary's state."""
        self.checkpointing = False
        self.outstanding = None
        self.counters.checkpoints_completed += 1
        self.counters.last_checkpoint = now
        self._act(self.comparator.checkpoint_completed(now, synced, resumed), now)
