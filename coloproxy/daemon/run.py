"""``coloproxy run``: one daemon, one host, one role (shell).

Primary: set up host P's data path (unless told not to), serve the control socket and the
metrics, bind the three queues and pump them through ``PrimaryProxy``; the comparator's
timers run on one loop timer. Secondary: set up host S's side of the tunnel and serve the
control socket. With ``engine.qmp`` set, either role also runs the checkpoint engine
(:mod:`coloproxy.engine.runner`: checkpoints, heartbeat, failover, takeover) as a client of
its own control socket.

On SIGTERM/SIGINT the daemon closes its queues and sockets and exits. It leaves the network
set-up and the NFQUEUE rules in place on purpose: with no process bound, the kernel drops
whatever the rules queue, so PVM output stays stopped and SVM output stays off the LAN until
a daemon runs again (fail closed) or an operator runs ``coloproxy teardown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from coloproxy import __version__
from coloproxy.capture.chardev import ChardevTransport
from coloproxy.capture.netlink import NetlinkQueue
from coloproxy.capture.queue import PacketQueue, QueueConfig
from coloproxy.capture.stats import read_queue_stats
from coloproxy.capture.transports import open_queue
from coloproxy.compare import Comparator
from coloproxy.config import (
    ChardevConfig,
    Config,
    ConfigError,
    QueuesConfig,
    QuorumService,
    Transport,
    load_config,
)
from coloproxy.control.server import ClientInfo, ControlServer, HandlerReply, ProxyIdentity
from coloproxy.daemon import logs
from coloproxy.daemon import reload as reloading
from coloproxy.daemon.notify import Notifier
from coloproxy.daemon.primary import CheckpointRequest, PrimaryProxy
from coloproxy.daemon.record import Recorder
from coloproxy.daemon.rulewatch import RuleWatch
from coloproxy.daemon.secondary import SecondaryProxy
from coloproxy.engine.runner import EngineRunner
from coloproxy.engine.settings import EngineSettings
from coloproxy.errors import ColoproxyError
from coloproxy.metrics import Metrics, MetricsServer
from coloproxy.net import NetError
from coloproxy.net import host as hostnet
from coloproxy.net.leasegate import LeaseGate
from coloproxy.net.rules import QueueNumbers
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
from coloproxy.rewrite import SecondaryRewriter
from coloproxy.role import Role

log = logging.getLogger(__name__)

# The replay runs on the loop, which the engine or the control server awaits meanwhile: a
# few milliseconds. The bound only keeps a worker thread from outliving a stopping loop.
REPLAY_TIMEOUT = 5.0

# A receive batch of one side of the chardev transport: (tokens, frames, now).
_BatchFeed = Callable[[Sequence[object], list[bytes], float], None]


def host_net(config: Config) -> hostnet.HostNet:
    """The net layer's parameters from a config."""
    queues = config.queues
    numbers = (
        QueueNumbers(
            queues.primary_out, queues.secondary_out, queues.secondary_in, queues.secondary_egress
        )
        if queues is not None
        else QueueNumbers()
    )
    return hostnet.HostNet(
        prefix=config.net.prefix,
        pair=config.pair.name,
        role=config.pair.role,
        guest_port=config.net.guest_port,
        local_address=config.net.replication.local,
        remote_address=config.net.replication.remote,
        vxlan_id=config.net.vxlan_id,
        queues=numbers,
        lan_bridge=config.net.lan_bridge,
        vxlan_port=config.net.vxlan_port,
        underlay=config.net.underlay,
    )


class Daemon:
    """Everything one ``coloproxy run`` owns; ``ControlHandler`` for its control socket."""

    def __init__(
        self,
        config: Config,
        *,
        setup_net: bool = True,
        record: Path | None = None,
        notifier: Notifier | None = None,
        log_level: str | None = None,
    ) -> None:
        self.config = config
        # The file as last read and applied: a reload compares the file with this (self.config
        # moves away from it at a reprotect, which changes the role).
        self.file_config = config
        self.log_level = log_level  # --log-level: wins over log.level, also at a reload
        self.notifier = notifier if notifier is not None else Notifier(None)
        self._watchdog_timer: asyncio.TimerHandle | None = None
        self.rule_watch: RuleWatch | None = None
        self._running = False
        self._reload_task: asyncio.Task[reloading.ReloadPlan | None] | None = None
        self._reload_again = False
        self.setup_net = setup_net
        self.recorder = Recorder(record) if record is not None else None
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.role = config.pair.role
        self.mode = Mode.PROTECTED
        self.period_ms: int | None = config.engine.period_ms if config.engine.qmp else None
        self.proxy: PrimaryProxy | None = None
        self.secondary: SecondaryProxy | None = None  # host S: the SVM's sequence spaces
        self.comparator: Comparator | None = None
        self.queues: list[PacketQueue] = []
        self.chardev: ChardevTransport | None = None  # the chardev transport, when configured
        # A primary on the chardev transport gets its packets from QEMU's filters: no
        # netfilter, tc or tunnels, nothing to attach at failover (docs/chardev.md).
        self.chardev_primary = config.chardev is not None and self.role is Role.PRIMARY
        self.control = ControlServer(
            config.control.socket,
            self,
            config.control.group,
            engine_group=config.control.engine_group,
            group_role=config.control.group_role,
            max_clients=config.control.max_clients,
            client_queue=config.control.client_queue,
            idle_timeout=config.control.idle_timeout_ms / 1000,
        )
        self.metrics = Metrics(pair=config.pair.name, role=self.role.value, clock=self.loop.time)
        self.metrics_server: MetricsServer | None = None
        self._timer: asyncio.Handle | None = None
        self._timer_due = 0.0
        self._rearm_pending = False
        self._s_in_hold_timer: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()
        self.engine: EngineRunner | None = None  # engine.qmp set: the checkpoint engine
        self._engine_task: asyncio.Task[None] | None = None
        self._reprotecting = False
        # The leader key's deadline (quorum; +inf without): the primary proxy's gate, and
        # the kernel's for the PVM's non-IP frames (host P, quorum mode).
        self.release_until = math.inf
        self.lease_gate: LeaseGate | None = None

    # -- life cycle ------------------------------------------------------------------------

    async def run(self) -> None:
        config = self.config
        self._pet_watchdog()  # from the start: setting up the host may take seconds
        # From the start too: SIGHUP's default action would end the daemon (fail closed: an
        # outage), and operators send it out of habit.
        self.loop.add_signal_handler(signal.SIGHUP, self._hangup)
        if self.setup_net and not self.chardev_primary:
            # pyroute2 runs an event loop of its own inside IPRoute: keep it off ours.
            await asyncio.to_thread(hostnet.setup, host_net(config))
            log.info("host network set up for pair %s (%s)", config.pair.name, self.role.value)
        await self.control.start()
        try:
            if config.metrics.enabled:
                self.metrics_server = MetricsServer(
                    self.metrics, config.metrics.host, config.metrics.port
                )
                await self.metrics_server.start()
            self.metrics.control_clients = self._clients_by_role
            self.metrics.control_refusals = lambda: self.control.refusals
            if self.role is Role.PRIMARY:
                if config.chardev is not None:
                    await self._start_primary_chardev(config.chardev)
                else:
                    self._start_primary()
            else:
                self._start_secondary()
            self._start_engine()
            self._start_rule_watch()
            self.metrics.protected = self.mode is Mode.PROTECTED
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self._stopped.set)
            log.info(
                "coloproxy %s running: pair %s, role %s",
                __version__,
                config.pair.name,
                self.role.value,
            )
            # Rules, queues and the control socket are in place: systemd may start what
            # comes after this unit (host P's daemon after host S's, the engine's clients).
            self.notifier.ready(self._summary())
            self._running = True
            if self._reload_again:  # a SIGHUP during start-up
                self._hangup()
            await self._stopped.wait()
            log.info("stopping")
            self.notifier.stopping()
        finally:
            self._running = False
            self.loop.remove_signal_handler(signal.SIGHUP)
            if self._watchdog_timer is not None:
                self._watchdog_timer.cancel()
            if self._reload_task is not None:
                self._reload_task.cancel()
                await asyncio.wait([self._reload_task])
            if self.rule_watch is not None:
                await self.rule_watch.stop()
            await self._stop_engine()
            for queue in self.queues:
                queue.close()
            if self.chardev is not None:
                await self.chardev.close()
            if self._timer is not None:
                self._timer.cancel()
            if self.metrics_server is not None:
                await self.metrics_server.close()
            await self.control.close()
            if self.recorder is not None:
                self.recorder.close()

    def stop(self) -> None:
        self._stopped.set()

    def _pet_watchdog(self) -> None:
        """``WATCHDOG=1`` at half systemd's interval, from a timer of the event loop: a loop
        that stalls stops petting and systemd restarts the daemon (daemon/notify.py)."""
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        self.notifier.watchdog()
        self._watchdog_timer = self.loop.call_later(interval / 2, self._pet_watchdog)

    # -- reload (SIGHUP) --------------------------------------------------------------------

    def _hangup(self) -> None:
        if not self._running or (self._reload_task is not None and not self._reload_task.done()):
            self._reload_again = True  # once the daemon runs, or the reload under way ended
            return
        self._reload_again = False
        self._reload_task = asyncio.create_task(self.reload(), name="reload")

    async def reload(self) -> reloading.ReloadPlan | None:
        """Read the file again and change what can change live (daemon/reload.py); log what
        changed and what did not. The plan, or None when the file does not load."""
        self.notifier.reloading()
        path = self.config.path
        try:
            try:
                new = load_config(path)  # at most 1 MiB, read at once (config.py)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("reload: %s", problem)
                log.error("reload: %s does not load; the daemon goes on unchanged", path)
                return None
            plan = reloading.plan(self.file_config, new)
            for change in plan.live:
                detail = await self._change_live(change)
                log.info(
                    "reload: %s %s -> %s%s",
                    change.key,
                    reloading.shown(change.old),
                    reloading.shown(change.new),
                    f" ({detail})" if detail else "",
                )
            for change in plan.refused:
                log.warning(
                    "reload: %s %s -> %s not changed: it needs a restart of the daemon",
                    change.key,
                    reloading.shown(change.old),
                    reloading.shown(change.new),
                )
            if not plan.live and not plan.refused:
                log.info("reload: %s: nothing changed", path)
            self.file_config = reloading.apply(self.file_config, plan.live)
            self.config = reloading.apply(self.config, plan.live)
            return plan
        finally:
            self.notifier.ready(self._summary())
            if self._reload_again:
                self.loop.call_soon(self._hangup)

    async def _change_live(self, change: reloading.Change) -> str:
        """Apply one key of ``reload.LIVE``; a word on what it did, if anything."""
        key, value = change.key, change.new
        if key == "log.level":
            if self.log_level is not None:
                return f"--log-level {self.log_level} wins"
            logs.set_level(str(getattr(value, "value", value)))
            return ""
        if key == "engine.period_ms":
            assert isinstance(value, int)
            sent = self.control.broadcast(SetPeriod(period_ms=value), to_roles={ClientRole.ENGINE})
            if self.period_ms is not None or sent:
                self.period_ms = value
            return f"sent to {sent} engine(s)"
        if key == "net.rules_check_ms":
            assert isinstance(value, int)
            if self.rule_watch is not None:
                await self.rule_watch.set_interval(value / 1000)
            return ""
        if key.startswith("compare.") and self.comparator is not None:
            comparator = self.comparator
            # The running comparator's settings (the daemon adjusts a few at start) with this
            # one key of the file's.
            comparator.reconfigure(reloading.apply(comparator.config, (change,), prefix=1))
            self._rearm_soon()
        return ""

    # -- the rules' watch --------------------------------------------------------------------

    def _start_rule_watch(self) -> None:
        if not self.setup_net or self.chardev_primary:
            return  # no rules of ours on this host
        self.rule_watch = RuleWatch(
            lambda: host_net(self.config),
            self.config.net.rules_check_ms / 1000,
            self._rules_restored,
            active=lambda: not self._reprotecting,
        )
        self.metrics.rules = self.rule_watch
        self.rule_watch.start()

    def _rules_restored(self, missing: dict[str, tuple[str, ...]]) -> None:
        """Host P: output went out uncompared while the rules were gone (I1); a checkpoint
        makes the secondary equal to the primary again."""
        proxy = self.proxy
        if proxy is not None and self.mode is Mode.PROTECTED:
            proxy.request_manual(self.loop.time(), "rules-restored")
            self._rearm_soon()

    def _summary(self) -> str:
        """One line for systemctl status: pair, role, mode."""
        return f"pair {self.config.pair.name}: {self.role.value}, {self.mode.value}"

    def _start_primary(self) -> None:
        config = self.config
        queues = config.queues
        if queues is None:  # the config loader requires queues on a primary
            raise ValueError("primary without queues")
        netlink = queues.transport is Transport.NETLINK
        compare = config.compare
        if not netlink:  # netfilterqueue cannot send an NF_QUEUE verdict
            compare = dataclasses.replace(compare, split_after=None)
        mtu = _guest_mtu(config.net.guest_port)
        if mtu is not None and mtu > compare.gso_above:
            compare = dataclasses.replace(compare, gso_above=mtu)
        comparator = Comparator(compare)
        self.comparator = comparator
        proxy = PrimaryProxy(comparator, _Late(), _Late(), self, self.loop.time())
        proxy.release_until = self.release_until
        self.proxy = proxy
        quorum = config.engine.quorum
        if (
            self.setup_net
            and config.engine.qmp is not None
            and quorum is not None
            and quorum.service is QuorumService.ETCD
        ):
            # The PVM's non-IP frames bypass P-out: a kernel-side gate with the same deadline
            # (coloproxy/net/leasegate.py), closed until the key is won.
            self.lease_gate = LeaseGate(config.net.prefix, config.net.guest_port)
            self.lease_gate.install()
        self.metrics.counts = proxy.counters
        self.metrics.compare_stats = comparator.stats
        self.metrics.compare_bounds = lambda: (
            comparator.config.max_held_packets,
            comparator.config.max_held_bytes,
        )
        self._queue_metrics(
            {
                queues.primary_out: "primary-out",
                queues.secondary_out: "secondary-out",
                queues.primary_split: "primary-split",
            }
        )
        rearm = self._rearm_soon
        recorder = self.recorder

        def primary(handle: object, payload: bytes, now: float) -> None:
            proxy.on_primary(handle, payload, now)
            rearm()

        def secondary(handle: object, payload: bytes, now: float) -> None:
            proxy.on_secondary(handle, payload, now)
            rearm()

        if recorder is not None:

            def primary(handle: object, payload: bytes, now: float) -> None:
                recorder.write("primary", payload)
                proxy.on_primary(handle, payload, now)
                rearm()

            def secondary(handle: object, payload: bytes, now: float) -> None:
                recorder.write("secondary", payload)
                proxy.on_secondary(handle, payload, now)
                rearm()

        def split_segment(handle: object, payload: bytes, now: float) -> None:
            primary(_SplitSegment(handle), payload, now)

        # Whole GSO packets: these verdicts carry no new payload (bench/nfqueue_README.md).
        primary_out = self._open_queue(queues.primary_out, primary, gso=True)
        secondary_out = self._open_queue(queues.secondary_out, secondary, gso=True)
        if netlink:
            # No rule feeds this queue: only P-out's Split verdicts, whose GSO packets the
            # kernel cuts into segments on the way in (no GSO flag here).
            split = self._open_queue(queues.primary_split, split_segment, gso=False)
            proxy.bind(_SplittingOut(primary_out, split), secondary_out)
        else:
            proxy.bind(primary_out, secondary_out)
        self._rearm_soon()

    async def _start_primary_chardev(self, chardev: ChardevConfig) -> None:
        """The primary fed by QEMU's filters over colo-compare's sockets: the same proxy and
        comparator (Ethernet framing), no S-in (QEMU's filter-rewriter shifts the secondary's
        TCP numbers), verdicts that write released frames to outdev (docs/chardev.md)."""
        # The chardev transport cannot hand a frame back to be cut up: no Split.
        comparator = Comparator(dataclasses.replace(self.config.compare, split_after=None))
        self.comparator = comparator
        proxy = PrimaryProxy(comparator, _Late(), _Late(), self, self.loop.time())
        proxy.release_until = self.release_until
        self.proxy = proxy
        self.metrics.counts = proxy.counters
        self.metrics.compare_stats = comparator.stats
        self.metrics.compare_bounds = lambda: (
            comparator.config.max_held_packets,
            comparator.config.max_held_bytes,
        )
        rearm = self._rearm_soon
        recorder = self.recorder

        def batches(side: str, feed: _BatchFeed) -> _BatchFeed:
            def callback(tokens: Sequence[object], packets: list[bytes], now: float) -> None:
                if recorder is not None:
                    for packet in packets:
                        recorder.write(side, packet)
                feed(tokens, packets, now)
                rearm()

            return callback

        primary = batches("primary", proxy.on_primary_many)
        secondary = batches("secondary", proxy.on_secondary_many)

        def damaged(reason: str, now: float) -> None:
            # A frame was lost on an input: make the secondary equal to the primary again
            # now rather than at the comparator's timeout.
            proxy.request_manual(now, reason)

        def xen_checkpoint_done(now: float) -> None:
            # Xen's COLO frame checkpointed (COLO_CHECKPOINT): release and compare afresh,
            # as colo-compare's colo_flush_packets does.
            proxy.checkpoint_started(now)
            proxy.checkpoint_completed(now)
            rearm()

        transport = ChardevTransport(chardev, primary, secondary, damaged, xen_checkpoint_done)
        self.chardev = transport
        proxy.bind(transport.primary_verdicts, transport.secondary_verdicts)
        self.metrics.chardev = transport
        await transport.start()
        if proxy.outstanding is not None:  # the restart request (I6), for Xen too
            transport.request_checkpoint()
        self._rearm_soon()

    def _start_secondary(self) -> None:
        """Host S: the rewriter of the SVM's TCP sequence spaces on its two queues."""
        queues = self.config.queues
        if queues is None:  # the config loader fills in the defaults on a secondary
            raise ValueError("secondary without queues")
        proxy = SecondaryProxy(SecondaryRewriter(), _Late(), _Late())
        self.secondary = proxy
        self.metrics.counts = proxy.counters
        self._queue_metrics(
            {queues.secondary_in: "secondary-in", queues.secondary_egress: "secondary-egress"}
        )
        # Never GSO here: rewritten packets go back with complete checksums.
        to_guest = self._open_queue(queues.secondary_in, proxy.on_to_guest, gso=False)
        from_guest = self._open_queue(queues.secondary_egress, proxy.on_from_guest, gso=False)
        proxy.bind(to_guest, from_guest)

    def _open_queue(
        self, number: int, callback: Callable[[object, bytes, float], None], *, gso: bool
    ) -> PacketQueue:
        queues = self.config.queues
        assert queues is not None
        netlink = queues.transport is Transport.NETLINK
        queue_config = QueueConfig(
            number,
            max_len=queues.max_len,
            copy_range=queues.copy_range,
            rcvbuf=queues.rcvbuf,
            gso=netlink and gso,
        )
        queue = open_queue(queue_config, callback, queues.transport)
        self.queues.append(queue)
        return queue

    def _queue_metrics(self, numbers: dict[int, str]) -> None:
        self.metrics.queue_names = numbers
        self.metrics.queue_stats = lambda: [
            s for n, s in read_queue_stats().items() if n in numbers
        ]

    # -- the checkpoint engine -------------------------------------------------------------

    def _start_engine(self, *, reprotect: bool = False) -> None:
        """With ``engine.qmp`` set, the engine runs in this daemon as a client of its own
        control socket (docs/engine.md); without, the proxy waits for an external engine."""
        settings = EngineSettings.from_config(self.config)
        if settings is None:
            return
        attach_lan = None
        if self.setup_net and not self.chardev_primary and self.config.net.lan_bridge is not None:
            attach_lan = self._attach_guest_to_lan
        self.engine = EngineRunner(
            settings, attach_lan=attach_lan, reprotect=reprotect, fence=self._set_release_until
        )
        self.metrics.engine = self.engine.figures
        self._engine_task = asyncio.create_task(self.engine.run(), name="engine")
        self._engine_task.add_done_callback(_engine_ended)

    def _set_release_until(self, deadline: float) -> None:
        """The engine's leader key deadline (quorum): the primary proxy releases only before
        it (docs/engine.md, "Failover by quorum")."""
        self.release_until = deadline
        now = self.loop.time()
        if self.proxy is not None:
            self.proxy.set_release_until(deadline, now)
        gate = self.lease_gate
        if gate is not None:
            try:
                gate.hold_until(deadline, now)
            except NetError as exc:  # the gate stays as it was: closed at its last deadline
                log.error("the leader key's frame gate: %s", exc)

    def _quorum_status(self, now: float) -> tuple[str | None, bool]:
        engine = self.engine
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

    def _attach_guest_to_lan(self) -> int:
        """The takeover's step into the LAN (blocking: a worker thread runs it), then the SYN
        replay; the number of SYNs replayed. The engine calls it as its ``attach_lan`` after
        it told the proxy ``failover``; an ``attach-lan`` message runs it too (tests, external
        engines), so both paths are this one."""
        params = host_net(self.config)
        addresses: tuple[bytes, list[bytes]] | None = None
        if self.secondary is not None:
            try:  # before the move, which flushes the port's learnt FDB entries
                addresses = hostnet.guest_port_addresses(params)
            except NetError as exc:
                log.error("the guest's MAC address is unknown, no SYN replay: %s", exc)
        hostnet.attach_guest_to_lan(params)
        replay = asyncio.run_coroutine_threadsafe(
            self._replay_syns(params.guest_port, addresses), self.loop
        )
        try:
            return replay.result(timeout=REPLAY_TIMEOUT)
        except TimeoutError:
            replay.cancel()
            log.error("the SYN replay did not run within %.0f s", REPLAY_TIMEOUT)
            return 0

    async def _replay_syns(
        self, guest_port: str, addresses: tuple[bytes, list[bytes]] | None
    ) -> int:
        """On the loop (the rewriter's home), now that the SVM's output goes to the LAN: hand
        the SVM the client SYNs of connections still half-open on it, and the ICMP messages
        that revert the retransmission backoff of the connections the client was heard on
        (docs/data-path.md, "Host S"); the number of SYNs replayed."""
        secondary = self.secondary
        if secondary is None or addresses is None:
            return 0
        if not secondary.rewriter.taken_over:
            log.error("guest port in the LAN without a failover before: no SYN replay")
            return 0
        source, guests = addresses
        now = self.loop.time()
        syns, syn_frames = secondary.syn_replay_frames(now, source, guests)
        reverted, revert_frames = secondary.backoff_revert_frames(now, source, guests)
        if (syns or reverted) and not guests:
            log.warning(
                "no MAC learnt for the guest on %s: %d SYN(s) not replayed, %d connection(s)"
                " not told to retransmit",
                guest_port,
                syns,
                reverted,
            )
            return 0
        # The SYNs first: a half-open connection needs nothing else, and the ICMP messages
        # concern established ones only.
        frames = syn_frames + revert_frames
        if frames:
            try:
                hostnet.send_to_guest(guest_port, frames)
            except NetError as exc:
                log.error("SYN replay and backoff revert: %s", exc)
                return 0
            secondary.counters.syns_replayed += syns
            secondary.counters.backoff_reverts += reverted
        log.info(
            "replayed %d client SYN(s) of connections half-open on the SVM; reverted the"
            " retransmission backoff of %d connection(s)",
            syns,
            reverted,
        )
        return syns

    async def _stop_engine(self) -> None:
        task = self._engine_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    # -- comparator timers -----------------------------------------------------------------

    def _rearm_soon(self) -> None:
        if not self._rearm_pending:
            self._rearm_pending = True
            self.loop.call_soon(self._rearm)

    def _rearm(self) -> None:
        self._rearm_pending = False
        if self.comparator is None:
            return
        deadline = self.comparator.get_timer()
        timer = self._timer
        if deadline is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        if timer is not None:
            # Our own record of the deadline: uvloop's call_at returns a plain Handle without
            # when() for a deadline already in the past.
            if self._timer_due <= deadline:
                return
            timer.cancel()
        self._timer = self.loop.call_at(deadline, self._fire)
        self._timer_due = deadline

    def _fire(self) -> None:
        self._timer = None
        if self.proxy is not None:
            self.proxy.on_timer(self.loop.time())
        self._rearm()

    # -- host S: S-in held across the SVM's checkpoint --------------------------------------

    def _arm_s_in_hold(self) -> None:
        if self._s_in_hold_timer is not None:
            self._s_in_hold_timer.cancel()
        self._s_in_hold_timer = self.loop.call_later(S_IN_HOLD_LIMIT, self._s_in_hold_expired)

    def _s_in_hold_expired(self) -> None:
        self._s_in_hold_timer = None
        if self.secondary is not None and self.secondary.holding:
            released = self.secondary.release_held()
            log.warning(
                "S-in: no RESUME %.0f s after the SVM stopped; %d held segment(s) let go with"
                " the offsets they had (a checkpoint that did not load leaves them right)",
                S_IN_HOLD_LIMIT,
                released,
            )

    # -- requests to engines ---------------------------------------------------------------

    def checkpoint_requested(self, request: CheckpointRequest) -> None:
        if self.chardev is not None:
            self.chardev.request_checkpoint()  # Xen's notify channel, when configured
        sent = self.control.broadcast(_wire_request(request), to_roles={ClientRole.ENGINE})
        xen = self.config.chardev is not None and self.config.chardev.notify is not None
        if not sent and not xen:
            log.warning(
                "checkpoint request %d (%s): no engine connected; holding output",
                request.id,
                request.reason,
            )

    # -- ControlHandler --------------------------------------------------------------------

    def identity(self) -> ProxyIdentity:
        return ProxyIdentity(self.config.pair.name, self.role, self.mode)

    def client_connected(self, client: ClientInfo) -> None:
        log.info("%s connected", client)
        proxy = self.proxy
        if client.role is ClientRole.ENGINE and proxy is not None and proxy.outstanding is not None:
            self.control.send(client, _wire_request(proxy.outstanding))

    def client_disconnected(self, client: ClientInfo, reason: str) -> None:
        log.info("%s disconnected: %s", client, reason)
        proxy = self.proxy
        if client.role is ClientRole.ENGINE and proxy is not None:
            proxy.engine_gone(client.number, self.loop.time())

    def _ask_again(self, client: ClientInfo) -> None:
        """After a refused completion: the outstanding request once more to that engine, so
        that an engine that believes it served it checkpoints again (after our reply)."""
        proxy = self.proxy
        if proxy is not None and proxy.outstanding is not None:
            self.control.send(client, _wire_request(proxy.outstanding))

    async def handle(self, client: ClientInfo, message: Request) -> HandlerReply:
        now = self.loop.time()
        proxy = self.proxy
        if isinstance(message, StatusRequest):
            return self._status(now)
        if isinstance(message, CheckpointStarted):
            if self.secondary is not None:
                self.secondary.checkpoint_started()  # host S: the SVM stopped to load one
                self._arm_s_in_hold()
            # Only an engine (by its credentials) gets here: the control server checks.
            if proxy is not None:
                refused = proxy.report_started(now, message.request, client.number)
                if refused is not None:
                    return ErrorReply(ErrorCode.UNEXPECTED, refused.detail)
            return Ack(request=message.request)
        if isinstance(message, CheckpointCompleted):
            if self.secondary is not None and message.synced:
                self.secondary.checkpoint_applied()  # host S: the SVM loaded a checkpoint
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
                self._rearm_soon()
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
            sent = self.control.broadcast(message, to_roles={ClientRole.ENGINE})
            if not sent:
                return ErrorReply(ErrorCode.UNAVAILABLE, "no checkpoint engine connected")
            self.period_ms = message.period_ms
            return Ack(detail=f"sent to {sent} engine(s)")
        if isinstance(message, AttachLan):
            return await self._attach_lan_requested()
        if isinstance(message, Reprotect):
            return await self._reprotect(message)
        return self._failover(message, now)

    async def _attach_lan_requested(self) -> HandlerReply:
        lan = self.config.net.lan_bridge
        if self.secondary is None or self.mode is not Mode.UNPROTECTED:
            return ErrorReply(
                ErrorCode.UNAVAILABLE, "only a secondary that took over (failover) joins the LAN"
            )
        if not self.setup_net or lan is None:
            return ErrorReply(
                ErrorCode.UNAVAILABLE, "this daemon manages no LAN bridge (net.lan_bridge)"
            )
        try:
            replayed = await asyncio.to_thread(self._attach_guest_to_lan)
        except NetError as exc:
            return ErrorReply(ErrorCode.INTERNAL, str(exc))
        return Ack(detail=f"guest port in {lan}; {replayed} SYN(s) replayed")

    async def _reprotect(self, message: Reprotect) -> HandlerReply:
        """After a failover: this host becomes (or stays) the primary and its engine brings a
        new secondary into COLO (docs/control-protocol.md, "reprotect")."""
        if self.engine is None:
            return ErrorReply(
                ErrorCode.UNAVAILABLE, "reprotect needs this daemon's engine (engine.qmp)"
            )
        if self.mode is Mode.PROTECTED:
            return ErrorReply(ErrorCode.UNAVAILABLE, "the pair is protected already")
        if self.config.chardev is not None:
            return ErrorReply(
                ErrorCode.UNAVAILABLE,
                "reprotect drives the NFQUEUE data path; with the chardev transport QEMU's"
                " filters carry the traffic: re-create them and restart (docs/chardev.md)",
            )
        if self._reprotecting:
            return ErrorReply(ErrorCode.UNAVAILABLE, "a reprotect is in progress")
        self._reprotecting = True
        try:
            config = self.config
            log.warning("reprotect: becoming the primary; new secondary at %s", message.migrate_uri)
            # The engine's decisions belong to the old pair; its last heartbeat says "leaving".
            await self._stop_engine()
            for queue in self.queues:
                queue.close()
            self.queues = []
            self.proxy = self.comparator = self.secondary = None
            # Connections the takeover rewriter was shifting lose their shift here: host S's
            # queues go with its role (docs/engine.md, "Re-protection").
            config = dataclasses.replace(
                config,
                pair=dataclasses.replace(config.pair, role=Role.PRIMARY),
                engine=dataclasses.replace(
                    config.engine, migrate_uri=message.migrate_uri, bring_up=True
                ),
            )
            if config.queues is None:
                config = dataclasses.replace(config, queues=QueuesConfig())
            self.config = config
            if self.setup_net:
                await asyncio.to_thread(hostnet.setup, host_net(config))
                log.info("reprotect: host P's data path set up on this host")
            self.role = Role.PRIMARY
            self.mode = Mode.PROTECTED  # everything held until COLO's first checkpoint (I6)
            self.metrics.role = self.role.value
            self._start_primary()
            self._start_engine(reprotect=True)
            self.metrics.protected = True
            self.notifier.status(self._summary())
        finally:
            self._reprotecting = False
        return Ack(detail=f"reprotecting: primary, bringing up COLO via {message.migrate_uri}")

    def _failover(self, message: Failover, now: float) -> HandlerReply:
        if message.mode is Mode.UNPROTECTED:
            self.mode = Mode.UNPROTECTED
            self.role = message.role  # a secondary that took over is the primary now
            self.metrics.role = self.role.value
            self.metrics.protected = False
            if self.proxy is not None:
                self.proxy.set_unprotected(now)
            if self.secondary is not None:
                self.secondary.take_over()  # the SVM's output now goes to the client
            log.warning("now unprotected: %s", message.detail or "failover")
            self.notifier.status(self._summary())
            return Ack(detail="unprotected: output passes uncompared")
        return ErrorReply(
            ErrorCode.UNAVAILABLE, "failover only unprotects; protect again with reprotect"
        )

    def _status(self, now: float) -> Status:
        config = self.config
        clients = self.control.clients()
        engines = sum(1 for c in clients if c.role is ClientRole.ENGINE)
        proxy = self.proxy
        if proxy is None or self.comparator is None:
            host_s_counts: dict[str, int] = {}
            if self.secondary is not None:
                host_s = self.secondary.counters
                host_s_counts = {
                    "rewrites": host_s.rewrites["shifted"],
                    "takeover_rewrites": host_s.egress_rewrites["shifted"],
                    "offsets_learnt": self.secondary.rewriter.learnt,
                    "connections_shifted": len(self.secondary.rewriter),
                    "syns_replayed": host_s.syns_replayed,
                    "backoff_reverts": host_s.backoff_reverts,
                }
            quorum, fenced = self._quorum_status(now)
            return Status(
                pair=config.pair.name, role=self.role, mode=self.mode,
                engines=engines, clients=len(clients), uptime=now - self.started,
                counters=host_s_counts, quorum=quorum, fenced=fenced,
            )  # fmt: skip
        stats = self.comparator.stats()
        counters = proxy.counters
        last = counters.last_checkpoint
        quorum, fenced = self._quorum_status(now)
        return Status(
            quorum=quorum,
            fenced=fenced or now >= proxy.release_until,
            pair=config.pair.name,
            role=self.role,
            mode=self.mode,
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
            period_ms=self.period_ms,
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

    def _clients_by_role(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for client in self.control.clients():
            counts[client.role.value] = counts.get(client.role.value, 0) + 1
        return counts


def _engine_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the checkpoint engine stopped: %r", task.exception())


# Host S lets S-in's held segments go with the offsets they had when the SVM's RESUME has
# not come this long after its STOP: a checkpoint pauses the guests for 10-60 ms in the lab.
S_IN_HOLD_LIMIT = 2.0


class _SplitSegment:
    """The token of a packet from the split queue (a segment of a GSO packet that P-out
    handed back): its verdict goes to that queue."""

    __slots__ = ("handle",)

    def __init__(self, handle: object) -> None:
        self.handle = handle


class _SplittingOut:
    """P-out's verdicts with the split queue beside it (``Split``, docs/data-path.md)."""

    def __init__(self, primary_out: PacketQueue, split: PacketQueue) -> None:
        self._primary_out = primary_out
        self._split = split
        self._split_number = split.config.queue_num

    def accept(self, handle: object, payload: bytes | None = None) -> None:
        if type(handle) is _SplitSegment:
            self._split.accept(handle.handle, payload)
        else:
            self._primary_out.accept(handle, payload)

    def drop(self, handle: object) -> None:  # never for a primary packet; here for Verdicts
        if type(handle) is _SplitSegment:
            self._split.drop(handle.handle)
        else:
            self._primary_out.drop(handle)

    def split(self, handle: object) -> None:
        # Only P-out's own packets are longer than the MTU: a segment is never split again.
        cast(NetlinkQueue, self._primary_out).requeue(handle, self._split_number)


def _guest_mtu(guest_port: str) -> int | None:
    """The guest port's MTU in this namespace (sysfs), None when it cannot be read."""
    try:
        return int(Path(f"/sys/class/net/{guest_port}/mtu").read_text())
    except (OSError, ValueError):
        return None


class _Late:
    """Stands in for a queue until the queues are open (the proxy is built first)."""

    def accept(self, handle: object, payload: bytes | None = None) -> None:
        raise RuntimeError("queue not open yet")

    def drop(self, handle: object) -> None:
        raise RuntimeError("queue not open yet")


def _wire_request(request: CheckpointRequest) -> WireRequest:
    evidence = request.evidence
    wire_evidence = None if evidence is None else CheckpointEvidence.from_compare(evidence)
    return WireRequest(
        id=request.id,
        reason=request.reason,
        protocol=request.protocol,
        flow=request.flow,
        evidence=wire_evidence,
        time=time.time(),
    )


def run(
    config: Config,
    *,
    setup_net: bool = True,
    record: Path | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    log_level: str | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (SIGHUP reloads); the exit code. ``log_level``
    (``--log-level``) wins over the file's ``log.level``."""
    logs.configure(log_level or config.log.level.value)
    notifier = Notifier.from_environment()

    async def main() -> None:
        daemon = Daemon(
            config, setup_net=setup_net, record=record, notifier=notifier, log_level=log_level
        )
        await daemon.run()

    if loop_factory is None:
        with contextlib.suppress(ImportError):
            import uvloop

            loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())
    except ColoproxyError as exc:
        log.error("%s", exc)
        return 2
    return 0


def teardown(config: Config) -> None:
    """Remove this host's set-up: links, tc, rules. PVM output then flows uncompared."""
    hostnet.teardown(host_net(config))
    LeaseGate(config.net.prefix, config.net.guest_port).remove()


__all__ = ["Daemon", "host_net", "run", "teardown"]
