"""The daemon's side of its control socket (shell): what each request does, the status reply,
and the checkpoint requests' way out to the engines.

``DaemonControl`` is the :class:`coloproxy.control.server.ControlHandler` of one daemon (the
server checks roles and credentials; this checks what an engine reports, through the primary
proxy's ``report_started``/``report_completed``) and the proxy's ``RequestSink``: a request
goes to every engine as a ``checkpoint-request`` (:func:`wire_request`, the one conversion
from the comparator's evidence to the wire's), and again to an engine that connects while it
is outstanding. It works on the parts in :class:`DaemonState`; a reprotect, which rebuilds
them, is the daemon's (``become_primary``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from coloproxy.compare import Evidence
from coloproxy.control.server import ClientInfo, ControlServer, HandlerReply, ProxyIdentity
from coloproxy.daemon.notify import Notifier
from coloproxy.daemon.primary import CheckpointRequest
from coloproxy.daemon.state import DaemonState
from coloproxy.metrics import Metrics
from coloproxy.net import NetError
from coloproxy.protocol import (
    Ack,
    AttachLan,
    CheckpointCompleted,
    CheckpointEvidence,
    CheckpointNow,
    CheckpointStarted,
    ClientRole,
    ErrorCode,
    ErrorReply,
    Failover,
    Mode,
    Reprotect,
    Request,
    SetPeriod,
    Status,
    StatusRequest,
)
from coloproxy.protocol import CheckpointRequest as WireRequest
from coloproxy.protocol.messages import MAX_DETAIL, MAX_EVIDENCE_BYTES, StreamOffset
from coloproxy.pump import TimerPump

# The daemon's log name, as before this moved out of coloproxy/daemon/run.py: journal
# filters (and scripts/check-systemd-unit) match on it.
log = logging.getLogger("coloproxy.daemon.run")


def wire_evidence(evidence: Evidence) -> CheckpointEvidence:
    """The comparator's evidence as the wire carries it: windows and detail cut to fit."""
    return CheckpointEvidence(
        offset=None if evidence.offset is None else StreamOffset(evidence.offset),
        before=evidence.before,
        primary=evidence.primary[:MAX_EVIDENCE_BYTES],
        secondary=evidence.secondary[:MAX_EVIDENCE_BYTES],
        primary_length=evidence.primary_length,
        secondary_length=evidence.secondary_length,
        detail=evidence.detail[:MAX_DETAIL],
    )


def wire_request(request: CheckpointRequest, sent: float) -> WireRequest:
    """The proxy's checkpoint request as a ``checkpoint-request`` sent at ``sent`` (wall
    clock)."""
    evidence = request.evidence
    return WireRequest(
        id=request.id,
        reason=request.reason,
        protocol=request.protocol,
        flow=request.flow,
        evidence=None if evidence is None else wire_evidence(evidence),
        time=sent,
    )


@dataclass(eq=False, kw_only=True)
class DaemonControl:
    """``ControlHandler`` of the daemon's control socket, ``RequestSink`` of its proxy."""

    state: DaemonState
    loop: asyncio.AbstractEventLoop
    pump: TimerPump
    metrics: Metrics
    notifier: Notifier
    # The takeover's step into the LAN (blocking), None when this daemon manages no LAN.
    attach_lan: Callable[[], int] | None
    become_primary: Callable[[str], Awaitable[None]]  # reprotect's rebuild, the daemon's
    started: float = field(init=False)
    server: ControlServer = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.loop.time()
        control = self.state.config.control
        self.server = ControlServer(
            control.socket,
            self,
            control.group,
            engine_group=control.engine_group,
            group_role=control.group_role,
            max_clients=control.max_clients,
            client_queue=control.client_queue,
            idle_timeout=control.idle_timeout_ms / 1000,
        )

    # -- requests to engines (RequestSink) ---------------------------------------------------

    def checkpoint_requested(self, request: CheckpointRequest) -> None:
        config = self.state.config
        if self.state.chardev is not None:
            self.state.chardev.request_checkpoint()  # Xen's notify channel, when configured
        sent = self.server.broadcast(
            wire_request(request, time.time()), to_roles={ClientRole.ENGINE}
        )
        xen = config.chardev is not None and config.chardev.notify is not None
        if not sent and not xen:
            log.warning(
                "checkpoint request %d (%s): no engine connected; holding output",
                request.id,
                request.reason,
            )

    # -- ControlHandler --------------------------------------------------------------------

    def identity(self) -> ProxyIdentity:
        state = self.state
        return ProxyIdentity(state.config.pair.name, state.role, state.mode)

    def client_connected(self, client: ClientInfo) -> None:
        log.info("%s connected", client)
        proxy = self.state.proxy
        if client.role is ClientRole.ENGINE and proxy is not None and proxy.outstanding is not None:
            self.server.send(client, wire_request(proxy.outstanding, time.time()))

    def client_disconnected(self, client: ClientInfo, reason: str) -> None:
        log.info("%s disconnected: %s", client, reason)
        proxy = self.state.proxy
        if client.role is ClientRole.ENGINE and proxy is not None:
            proxy.engine_gone(client.number, self.loop.time())
            self.pump.poke()

    def _ask_again(self, client: ClientInfo) -> None:
        """After a refused completion: the outstanding request once more to that engine, so
        that an engine that believes it served it checkpoints again (after our reply)."""
        proxy = self.state.proxy
        if proxy is not None and proxy.outstanding is not None:
            self.server.send(client, wire_request(proxy.outstanding, time.time()))

    async def handle(self, client: ClientInfo, message: Request) -> HandlerReply:
        now = self.loop.time()
        state = self.state
        proxy = state.proxy
        if isinstance(message, StatusRequest):
            return self._status(now)
        if isinstance(message, CheckpointStarted):
            if state.secondary is not None:
                # Host S: the SVM stopped to load one; S-in holds until it resumed.
                state.secondary.checkpoint_started(now)
                self.pump.poke()
            # Only an engine (by its credentials) gets here: the control server checks.
            if proxy is not None:
                refused = proxy.report_started(now, message.request, client.number)
                self.pump.poke()
                if refused is not None:
                    return ErrorReply(ErrorCode.UNEXPECTED, refused.detail)
            return Ack(request=message.request)
        if isinstance(message, CheckpointCompleted):
            if state.secondary is not None and message.synced:
                state.secondary.checkpoint_applied()  # host S: the SVM loaded a checkpoint
                self.pump.poke()
            if proxy is not None:
                # The guests resumed at the engine's RESUME stamp (wall clock, this host):
                # on our loop's clock, so that packets sent since are compared, not released.
                resumed = None
                if message.completed > 0:
                    resumed = min(now, now - (time.time() - message.completed))
                refused = proxy.report_completed(
                    now, message.request, client.number, message.synced, resumed
                )
                if refused is not None:
                    self.loop.call_soon(self._ask_again, client)
                    return ErrorReply(ErrorCode.UNEXPECTED, refused.detail)
                self.pump.poke()
            return Ack(request=message.request)
        if isinstance(message, CheckpointNow):
            if proxy is None:
                return ErrorReply(
                    ErrorCode.UNAVAILABLE, "only a primary proxy asks for checkpoints"
                )
            request = proxy.request_manual(now, message.reason)
            if request is None:
                outstanding = proxy.outstanding
                number = outstanding.id if outstanding is not None else None
                return Ack(request=number, detail="coalesced with the outstanding request")
            return Ack(request=request.id)
        if isinstance(message, SetPeriod):
            sent = self.server.broadcast(message, to_roles={ClientRole.ENGINE})
            if not sent:
                return ErrorReply(ErrorCode.UNAVAILABLE, "no checkpoint engine connected")
            state.period_ms = message.period_ms
            return Ack(detail=f"sent to {sent} engine(s)")
        if isinstance(message, AttachLan):
            return await self._attach_lan_requested()
        if isinstance(message, Reprotect):
            return await self._reprotect(message)
        return self._failover(message, now)

    async def _attach_lan_requested(self) -> HandlerReply:
        state = self.state
        lan = state.config.net.lan_bridge
        if state.secondary is None or state.mode is not Mode.UNPROTECTED:
            return ErrorReply(
                ErrorCode.UNAVAILABLE, "only a secondary that took over (failover) joins the LAN"
            )
        if self.attach_lan is None or lan is None:
            return ErrorReply(
                ErrorCode.UNAVAILABLE, "this daemon manages no LAN bridge (net.lan_bridge)"
            )
        try:
            replayed = await asyncio.to_thread(self.attach_lan)
        except NetError as exc:
            return ErrorReply(ErrorCode.INTERNAL, str(exc))
        return Ack(detail=f"guest port in {lan}; {replayed} SYN(s) replayed")

    async def _reprotect(self, message: Reprotect) -> HandlerReply:
        """After a failover: this host becomes (or stays) the primary and its engine brings a
        new secondary into COLO (docs/control-protocol.md, "reprotect")."""
        state = self.state
        if state.engine is None:
            return ErrorReply(
                ErrorCode.UNAVAILABLE, "reprotect needs this daemon's engine (engine.qmp)"
            )
        if state.mode is Mode.PROTECTED:
            return ErrorReply(ErrorCode.UNAVAILABLE, "the pair is protected already")
        if state.config.chardev is not None:
            return ErrorReply(
                ErrorCode.UNAVAILABLE,
                "reprotect drives the NFQUEUE data path; with the chardev transport QEMU's"
                " filters carry the traffic: re-create them and restart (docs/chardev.md)",
            )
        if state.reprotecting:
            return ErrorReply(ErrorCode.UNAVAILABLE, "a reprotect is in progress")
        state.reprotecting = True
        try:
            await self.become_primary(message.migrate_uri)
        finally:
            state.reprotecting = False
        return Ack(detail=f"reprotecting: primary, bringing up COLO via {message.migrate_uri}")

    def _failover(self, message: Failover, now: float) -> HandlerReply:
        state = self.state
        if message.mode is Mode.UNPROTECTED:
            state.mode = Mode.UNPROTECTED
            state.role = message.role  # a secondary that took over is the primary now
            self.metrics.role = state.role.value
            self.metrics.protected = False
            if state.proxy is not None:
                state.proxy.set_unprotected(now)
                self.pump.poke()
            if state.secondary is not None:
                state.secondary.take_over()  # the SVM's output now goes to the client
                self.pump.poke()
            log.warning("now unprotected: %s", message.detail or "failover")
            self.notifier.status(state.summary())
            return Ack(detail="unprotected: output passes uncompared")
        return ErrorReply(
            ErrorCode.UNAVAILABLE, "failover only unprotects; protect again with reprotect"
        )

    # -- the status reply --------------------------------------------------------------------

    def _status(self, now: float) -> Status:
        state = self.state
        config = state.config
        clients = self.server.clients()
        engines = sum(1 for c in clients if c.role is ClientRole.ENGINE)
        proxy = state.proxy
        if proxy is None or state.comparator is None:
            host_s_counts: dict[str, int] = {}
            if state.secondary is not None:
                host_s = state.secondary.counters
                host_s_counts = {
                    "rewrites": host_s.rewrites["shifted"],
                    "takeover_rewrites": host_s.egress_rewrites["shifted"],
                    "offsets_learnt": state.secondary.rewriter.learnt,
                    "connections_shifted": len(state.secondary.rewriter),
                    "syns_replayed": host_s.syns_replayed,
                    "backoff_reverts": host_s.backoff_reverts,
                }
            quorum, fenced = self._quorum_status(now)
            return Status(
                pair=config.pair.name, role=state.role, mode=state.mode,
                engines=engines, clients=len(clients), uptime=now - self.started,
                counters=host_s_counts, quorum=quorum, fenced=fenced,
            )  # fmt: skip
        stats = state.comparator.stats()
        counters = proxy.counters
        last = counters.last_checkpoint
        quorum, fenced = self._quorum_status(now)
        return Status(
            quorum=quorum,
            fenced=fenced or now >= proxy.release_until,
            pair=config.pair.name,
            role=state.role,
            mode=state.mode,
            epoch=counters.checkpoints_completed,
            held_packets=stats.held_packets,
            oldest_held_age=None if stats.oldest_primary is None else now - stats.oldest_primary,
            stored_bytes=stats.stored_bytes,
            oldest_secondary_age=None
            if stats.oldest_secondary is None
            else now - stats.oldest_secondary,
            flows=stats.flows,
            checkpoint_requested=proxy.outstanding is not None,
            checkpointing=stats.checkpointing,
            saturated=stats.saturated,
            period_ms=state.period_ms,
            last_checkpoint_age=None if last is None else now - last,
            engines=engines,
            clients=len(clients),
            uptime=now - self.started,
            counters={
                "requests": sum(counters.requests.values()),
                "coalesced": sum(counters.coalesced.values()),
                "released": sum(
                    v
                    for (q, verdict), v in counters.packets.items()
                    if q == "primary-out" and verdict != "split"
                ),
                "secondary_dropped": sum(
                    v for (q, _), v in counters.packets.items() if q == "secondary-out"
                ),
                "rewrites": counters.rewrites["shifted"],
                "checkpoints": counters.checkpoints_completed,
                "reports_refused": sum(counters.reports_refused.values()),
                "fenced_packets": proxy.fenced_packets,
            },
        )

    def _quorum_status(self, now: float) -> tuple[str | None, bool]:
        engine = self.state.engine
        if engine is None:
            return None, False
        leader = engine.leader
        if leader is None:
            return (
                "two-host (labs only: no quorum service; a cut link can make both hosts serve)",
                False,
            )
        left = leader.left(now)
        if left is None:
            return f"etcd: leader key {leader.phase.value}", False
        if left <= 0:
            return (
                f"etcd: FENCED, the leader key's deadline passed {-left:.2f} s ago: holding"
                " everything",
                True,
            )
        return f"etcd: holding the leader key ({left:.2f} s left)", False

    def clients_by_role(self) -> dict[str, int]:
        """Connected clients by role (a metric)."""
        counts: dict[str, int] = {}
        for client in self.server.clients():
            counts[client.role.value] = counts.get(client.role.value, 0) + 1
        return counts
