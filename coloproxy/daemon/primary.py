"""Role primary: the two queues of host P, the comparator and the checkpoint requests.

Theory of operation
-------------------
``PrimaryProxy`` is the pump between the capture layer and the pure core. It owns no
sockets: verdicts go to the queue objects it is given, checkpoint requests to a
``RequestSink`` (the control server), counts to ``ProxyCounters`` (read by the metrics
collector at scrape time). Each answer of the comparator is carried out as a batch
(``_act``): its releases go to P-out in one call where P-out takes a batch
(``BatchVerdicts.accept_many``: the chardev transport's held frames; else one ``accept``
each, in order) and the counters are added once per run of one reason, not per packet.

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

What an engine reports is checked (``report_started``/``report_completed``): a completion
releases every held primary packet, so it is taken only for a checkpoint this proxy saw
start. A ``checkpoint-started`` names no request (a periodic checkpoint) or one this proxy
issued, and is taken when no other checkpoint is open; the ``checkpoint-completed`` after it
must come from the same engine connection, once. Anything else is refused with a
closed-vocabulary reason (``REFUSAL_REASONS``, counted in ``reports_refused``) and changes
nothing. A completion may name a request its start did not: the engine's scheduler lets a
request that is older than the primary's STOP join the running checkpoint. An engine that
goes away inside a checkpoint leaves it open for nobody: the next engine must start its own,
and a request (reason ``engine-lost``) asks it to at once.

Restart safety (I6): a new ``PrimaryProxy`` starts *frozen*: it calls
``checkpoint_started`` on its comparator, so every PVM packet is held and every SVM packet
dropped, and asks for a checkpoint with reason ``restart``. Nothing is released before an
engine reports a checkpoint that it started after this proxy was built: the freeze itself is
no start an engine can complete.

The leader key's gate (quorum mode, docs/engine.md): ``release_until`` is the deadline, on
the proxy's clock, before which this host holds the leader key by its own reckoning (+inf
without quorum). A release decided at ``now >= release_until`` does not happen: the packet
stays held, in order, until the engine moves the deadline again
(:meth:`PrimaryProxy.set_release_until`), for good if the key is lost. The comparator goes
on; only the verdicts wait. A primary that stops releasing is fenced off the LAN by
construction: its guest's frames leave only through P-out.

Timers: the proxy owns its deadlines (h11/aioquic style): ``get_timer()`` is the earliest
time at which ``handle_timer(now)`` has something to do (today the comparator's timeouts);
it never touches the event loop. ``coloproxy/pump.py`` keeps one loop timer at that
deadline, looked at again after every call into the proxy.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
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
REASON_ENGINE_LOST = "engine-lost"  # the engine went away inside a checkpoint

# Why an engine's report was refused: metric labels.
REFUSED_UNKNOWN_REQUEST = "unknown-request"  # names a request this proxy never issued
REFUSED_ALREADY_STARTED = "already-started"  # a checkpoint is open (its completion pending)
REFUSED_NOT_STARTED = "not-started"  # no start from this engine since the last completion
REFUSAL_REASONS = frozenset({REFUSED_UNKNOWN_REQUEST, REFUSED_ALREADY_STARTED, REFUSED_NOT_STARTED})


class Verdicts(Protocol):
    """What a capture queue offers the proxy."""

    def accept(self, handle: object, payload: bytes | None = None) -> None: ...

    def drop(self, handle: object) -> None: ...


class BatchVerdicts(Protocol):
    """A P-out that takes a batch's releases in one call (the chardev transport's held
    frames): ``accept(handle)`` for each of ``handles``, in order."""

    def accept_many(self, handles: list[object]) -> None: ...


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


@dataclass(frozen=True, slots=True)
class Refusal:
    """An engine's report the proxy did not take: ``reason`` (``REFUSAL_REASONS``) and a
    sentence for the engine and the log."""

    reason: str
    detail: str


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
    # Engine reports refused, by (report: started/completed, reason: REFUSAL_REASONS).
    reports_refused: Counter[tuple[str, str]] = field(default_factory=Counter)


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
        self._accept_many = _batch_accept(primary_out)
        self._secondary_out = secondary_out
        self._requests = requests
        self.counters = counters or ProxyCounters()
        self._ids = itertools.count(1)
        self.last_request_id = 0  # the highest request id issued (ids start at 1)
        # The engine connection whose checkpoint-started opened the checkpoint in progress;
        # None: no engine-reported checkpoint is open (the restart freeze is none).
        self.started_by: object | None = None
        self.outstanding: CheckpointRequest | None = None
        self.unprotected = False  # after the secondary was lost: release without comparing
        # Quorum: may release only while now < release_until (the leader key's deadline).
        self.release_until = math.inf
        self._gated: list[tuple[object, str]] = []  # (token, verdict label), in order
        # I6: hold everything until a checkpoint made the secondary equal to the primary.
        comparator.checkpoint_started(now)
        self._request(REASON_RESTART, "any", None, None, now)

    def bind(self, primary_out: Verdicts, secondary_out: Verdicts) -> None:
        """Attach the queues (they are opened after the proxy exists: packets may come at once)."""
        self._primary_out = primary_out
        self._accept_many = _batch_accept(primary_out)
        self._secondary_out = secondary_out

    # -- packets ---------------------------------------------------------------------------

    @property
    def fenced_packets(self) -> int:
        """Packets the comparator released that the leader key's gate holds."""
        return len(self._gated)

    def set_release_until(self, deadline: float, now: float) -> None:
        """The leader key's deadline moved (quorum): before it, held verdicts go out."""
        self.release_until = deadline
        if now < deadline and self._gated:
            gated, self._gated = self._gated, []
            self._release([token for token, _ in gated])
            packets = self.counters.packets
            for _, label in gated:
                packets["primary-out", label] += 1
            log.warning("the leader key is held again: %d fenced packets released", len(gated))

    def _accept(self, token: object, label: str, now: float) -> None:
        """P-out's accept, through the leader key's gate."""
        if now < self.release_until and not self._gated:
            self._primary_out.accept(token)
            self.counters.packets["primary-out", label] += 1
        else:
            self._gated.append((token, label))
            self.counters.packets["primary-out", "fenced"] += 1

    def on_primary(self, handle: object, payload: bytes, now: float) -> None:
        if self.unprotected:
            self._accept(handle, "accept-unprotected", now)
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
            self._accept_all(list(handles), "accept-unprotected", now)
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

    # -- timers ----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The earliest time at which :meth:`handle_timer` has something to do, or None."""
        return self.comparator.get_timer()

    def handle_timer(self, now: float) -> None:
        """Act on every deadline that passed by ``now``."""
        self._act(self.comparator.handle_timer(now), now)

    def _act(self, events: list[Event], now: float) -> None:
        """Carry out the comparator's events, in order, per batch: the releases go to P-out
        in one call (``_release``), the packet counters are added once per run of one reason.
        Anything else (a request, a split) may call out: the releases decided before it are
        handed over first, and the leader key's gate is looked at again after it."""
        if not events:
            return
        packets = self.counters.packets
        released: list[object] = []  # tokens for P-out, not yet handed over
        release_reason = ""  # the run of releases being counted: its reason and length
        releases = 0
        drop_reason = ""
        drops = 0
        fenced = 0
        gate_open = now < self.release_until and not self._gated
        for event in events:
            if type(event) is Release:
                if gate_open:
                    released.append(event.token)
                    reason: str = event.reason
                    if reason is not release_reason:
                        if releases:
                            packets["primary-out", _ACCEPT[release_reason]] += releases
                        release_reason = reason
                        releases = 0
                    releases += 1
                else:
                    self._gated.append((event.token, _ACCEPT[event.reason]))
                    fenced += 1
            elif type(event) is Drop:
                if event.token is not None:
                    self._secondary_out.drop(event.token)
                reason = event.reason
                if reason is not drop_reason:
                    if drops:
                        packets["secondary-out", _DROP[drop_reason]] += drops
                    drop_reason = reason
                    drops = 0
                drops += 1
            else:
                if released:
                    self._release(released)
                    released = []
                self._other(event, now)
                gate_open = now < self.release_until and not self._gated
        if released:
            self._release(released)
        if releases:
            packets["primary-out", _ACCEPT[release_reason]] += releases
        if drops:
            packets["secondary-out", _DROP[drop_reason]] += drops
        if fenced:
            packets["primary-out", "fenced"] += fenced

    def _other(self, event: Event, now: float) -> None:
        """An event that is neither ``Release`` nor ``Drop``."""
        if type(event) is Split:
            # Only a P-out that can split gets one (CompareConfig.split_after is None
            # elsewhere).
            cast(Splitting, self._primary_out).split(event.token)
            self.counters.packets["primary-out", "split"] += 1
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

    def _release(self, tokens: list[object]) -> None:
        """Hand P-out released tokens, in order: in one call where it takes a batch."""
        accept_many = self._accept_many
        if accept_many is not None:
            accept_many(tokens)
        else:
            primary_out = self._primary_out
            for token in tokens:
                primary_out.accept(token)

    def _accept_all(self, tokens: list[object], label: str, now: float) -> None:
        """P-out's accept of ``tokens``, in order, through the leader key's gate."""
        if now < self.release_until and not self._gated:
            self._release(tokens)
            self.counters.packets["primary-out", label] += len(tokens)
        else:
            for token in tokens:
                self._gated.append((token, label))
            self.counters.packets["primary-out", "fenced"] += len(tokens)

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
        tokens = [e.token for e in self.comparator.checkpoint_completed(now) if type(e) is Release]
        if tokens:
            self._accept_all(tokens, "accept-unprotected", now)

    def _request(
        self, reason: str, protocol: str, flow: str | None, evidence: Evidence | None, now: float
    ) -> CheckpointRequest:
        request = CheckpointRequest(next(self._ids), reason, protocol, flow, evidence, now)
        self.last_request_id = request.id
        self.outstanding = request
        self.counters.requests[reason] += 1
        log.info("checkpoint request %d: %s %s %s", request.id, reason, protocol, flow or "")
        self._requests.checkpoint_requested(request)
        return request

    # -- what an engine reports ------------------------------------------------------------

    def report_started(self, now: float, request: int | None, source: object) -> Refusal | None:
        """``checkpoint-started`` from the engine connection ``source``: taken (None), or why
        not (nothing changed)."""
        refusal = None
        if request is not None and not 1 <= request <= self.last_request_id:
            refusal = Refusal(
                REFUSED_UNKNOWN_REQUEST,
                f"checkpoint-started refused: request {request} was never issued by this proxy"
                f" (its requests so far: 1 to {self.last_request_id})",
            )
        elif self.started_by is not None:
            whose = "this engine's" if self.started_by == source else "another engine's"
            refusal = Refusal(
                REFUSED_ALREADY_STARTED,
                f"checkpoint-started refused: {whose} checkpoint is open; its"
                " checkpoint-completed comes first",
            )
        if refusal is not None:
            return self._refused("started", refusal)
        self.started_by = source
        self.checkpoint_started(now)
        return None

    def report_completed(
        self,
        now: float,
        request: int | None,
        source: object,
        synced: bool = True,
        resumed: float | None = None,
    ) -> Refusal | None:
        """``checkpoint-completed`` from ``source``: released (None), or why not (nothing was
        released and nothing changed)."""
        named = "" if request is None else f" (request {request})"
        refusal = None
        if self.started_by is None or self.started_by != source:
            refusal = Refusal(
                REFUSED_NOT_STARTED,
                f"checkpoint-completed{named} refused: this engine reported no"
                " checkpoint-started since the last completion; nothing released",
            )
        elif request is not None and not 1 <= request <= self.last_request_id:
            refusal = Refusal(
                REFUSED_UNKNOWN_REQUEST,
                f"checkpoint-completed refused: request {request} was never issued by this"
                f" proxy (its requests so far: 1 to {self.last_request_id}); nothing released",
            )
        if refusal is not None:
            return self._refused("completed", refusal)
        self.checkpoint_completed(now, synced, resumed)
        return None

    def engine_gone(self, source: object, now: float) -> None:
        """The engine connection ``source`` ended. Inside a checkpoint it opened, nobody can
        complete that one now: the next engine is asked for a checkpoint of its own."""
        if self.started_by is None or self.started_by != source:
            return
        self.started_by = None
        log.warning("the engine went away inside a checkpoint: holding until another one")
        if self.outstanding is None and not self.unprotected:
            self._request(REASON_ENGINE_LOST, "any", None, None, now)

    def _refused(self, report: str, refusal: Refusal) -> Refusal:
        self.counters.reports_refused[report, refusal.reason] += 1
        log.warning("%s", refusal.detail)
        return refusal

    # -- checkpoints, as they happen ---------------------------------------------------------

    def checkpoint_started(self, now: float) -> None:
        self._act(self.comparator.checkpoint_started(now), now)

    def checkpoint_completed(
        self, now: float, synced: bool = True, resumed: float | None = None
    ) -> None:
        """The engine saw the primary's RESUME (at ``resumed``, on our clock, when known):
        the secondary holds the primary's state. Unchecked: ``report_completed`` is what an
        engine's message goes through; Xen's COLO_CHECKPOINT and tests call this."""
        self.started_by = None  # whatever was open is consumed
        self.outstanding = None
        self.counters.checkpoints_completed += 1
        self.counters.last_checkpoint = now
        self._act(self.comparator.checkpoint_completed(now, synced, resumed), now)


def _batch_accept(primary_out: Verdicts) -> Callable[[list[object]], None] | None:
    """``primary_out``'s ``accept_many`` (``BatchVerdicts``), if it has one."""
    accept_many = getattr(primary_out, "accept_many", None)
    return cast(BatchVerdicts, primary_out).accept_many if callable(accept_many) else None
