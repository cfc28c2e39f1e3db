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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from coloproxy import __version__
from coloproxy.capture.chardev import ChardevTransport
from coloproxy.capture.netlink import NetlinkQueue
from coloproxy.capture.nfqueue import PacketQueue, QueueConfig, open_queue
from coloproxy.capture.stats import read_queue_stats
from coloproxy.compare import Comparator, CompareConfig
from coloproxy.config import (
    ChardevConfig,
    Config,
    ConfigError,
    QueuesConfig,
    QuorumService,
    Transport,
    load_config,
)
from coloproxy.daemon import logs
from coloproxy.daemon import reload as reloading
from coloproxy.daemon.control import DaemonControl
from coloproxy.daemon.notify import Notifier
from coloproxy.daemon.primary import PrimaryProxy
from coloproxy.daemon.pump import TimerPump
from coloproxy.daemon.record import Recorder
from coloproxy.daemon.rulewatch import RuleWatch
from coloproxy.daemon.secondary import SecondaryProxy
from coloproxy.daemon.state import DaemonState
from coloproxy.daemon.takeover import LanTakeover
from coloproxy.engine.runner import EngineRunner, EngineSettings
from coloproxy.errors import ColoproxyError
from coloproxy.metrics import Metrics, MetricsServer
from coloproxy.net import NetError
from coloproxy.net import host as hostnet
from coloproxy.net.leasegate import LeaseGate
from coloproxy.net.rules import QueueNumbers
from coloproxy.protocol import ClientRole, Mode, SetPeriod
from coloproxy.rewrite import SecondaryRewriter
from coloproxy.role import Role

log = logging.getLogger(__name__)

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
    """Everything one ``coloproxy run`` owns: builds the parts, starts and stops them."""

    def __init__(
        self,
        config: Config,
        *,
        setup_net: bool = True,
        record: Path | None = None,
        notifier: Notifier | None = None,
        log_level: str | None = None,
    ) -> None:
        # The file as last read and applied: a reload compares the file with this (the
        # config in force, state.config, moves away from it at a reprotect, which changes
        # the role).
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
        self.state = DaemonState(
            config,
            config.pair.role,
            period_ms=config.engine.period_ms if config.engine.qmp else None,
        )
        self.queues: list[PacketQueue] = []
        # A primary on the chardev transport gets its packets from QEMU's filters: no
        # netfilter, tc or tunnels, nothing to attach at failover (docs/chardev.md).
        self.chardev_primary = config.chardev is not None and config.pair.role is Role.PRIMARY
        # The proxy's timers (host P: the comparator's; host S: S-in's hold) on one loop timer.
        self.pump = TimerPump(self.loop)
        self.takeover = LanTakeover(self.state, lambda: host_net(self.state.config), self.loop)
        self.metrics = Metrics(
            pair=config.pair.name, role=config.pair.role.value, clock=self.loop.time
        )
        self.control = DaemonControl(
            self.state,
            loop=self.loop,
            pump=self.pump,
            metrics=self.metrics,
            notifier=self.notifier,
            attach_lan=self.takeover.attach_guest_to_lan if setup_net else None,
            become_primary=self.become_primary,
        )
        self.metrics_server: MetricsServer | None = None
        self._stopped = asyncio.Event()
        self._engine_task: asyncio.Task[None] | None = None
        # The leader key's deadline (quorum; +inf without): the primary proxy's gate, and
        # the kernel's for the PVM's non-IP frames (host P, quorum mode).
        self.release_until = math.inf
        self.lease_gate: LeaseGate | None = None

    # -- life cycle ------------------------------------------------------------------------

    async def run(self) -> None:
        state = self.state
        config = state.config
        self._pet_watchdog()  # from the start: setting up the host may take seconds
        # From the start too: SIGHUP's default action would end the daemon (fail closed: an
        # outage), and operators send it out of habit.
        self.loop.add_signal_handler(signal.SIGHUP, self._hangup)
        if self.setup_net and not self.chardev_primary:
            # pyroute2 runs an event loop of its own inside IPRoute: keep it off ours.
            await asyncio.to_thread(hostnet.setup, host_net(config))
            log.info("host network set up for pair %s (%s)", config.pair.name, state.role.value)
        server = self.control.server
        await server.start()
        try:
            if config.metrics.enabled:
                self.metrics_server = MetricsServer(
                    self.metrics, config.metrics.host, config.metrics.port
                )
                await self.metrics_server.start()
            self.metrics.control_clients = self.control.clients_by_role
            self.metrics.control_refusals = lambda: server.refusals
            if state.role is Role.PRIMARY:
                if config.chardev is not None:
                    await self._start_primary_chardev(config.chardev)
                else:
                    self._start_primary()
            else:
                self._start_secondary()
            self._start_engine()
            self._start_rule_watch()
            self.metrics.protected = state.mode is Mode.PROTECTED
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self._stopped.set)
            log.info(
                "coloproxy %s running: pair %s, role %s",
                __version__,
                config.pair.name,
                state.role.value,
            )
            # Rules, queues and the control socket are in place: systemd may start what
            # comes after this unit (host P's daemon after host S's, the engine's clients).
            self.notifier.ready(state.summary())
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
            if state.chardev is not None:
                await state.chardev.close()
            self.pump.close()
            if self.metrics_server is not None:
                await self.metrics_server.close()
            await server.close()
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
        path = self.state.config.path
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
            self.state.config = reloading.apply(self.state.config, plan.live)
            return plan
        finally:
            self.notifier.ready(self.state.summary())
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
            sent = self.control.server.broadcast(
                SetPeriod(period_ms=value), to_roles={ClientRole.ENGINE}
            )
            if self.state.period_ms is not None or sent:
                self.state.period_ms = value
            return f"sent to {sent} engine(s)"
        if key == "net.rules_check_ms":
            assert isinstance(value, int)
            if self.rule_watch is not None:
                await self.rule_watch.set_interval(value / 1000)
            return ""
        if key.startswith("compare.") and self.state.comparator is not None:
            comparator = self.state.comparator
            # The running comparator's settings (the daemon adjusts a few at start) with this
            # one key of the file's.
            comparator.reconfigure(reloading.apply(comparator.config, (change,), prefix=1))
            self.pump.poke()
        return ""

    # -- the rules' watch --------------------------------------------------------------------

    def _start_rule_watch(self) -> None:
        if not self.setup_net or self.chardev_primary:
            return  # no rules of ours on this host
        state = self.state
        self.rule_watch = RuleWatch(
            lambda: host_net(state.config),
            state.config.net.rules_check_ms / 1000,
            self._rules_restored,
            active=lambda: not state.reprotecting,
        )
        self.metrics.rules = self.rule_watch
        self.rule_watch.start()

    def _rules_restored(self, missing: dict[str, tuple[str, ...]]) -> None:
        """Host P: output went out uncompared while the rules were gone (I1); a checkpoint
        makes the secondary equal to the primary again."""
        proxy = self.state.proxy
        if proxy is not None and self.state.mode is Mode.PROTECTED:
            proxy.request_manual(self.loop.time(), "rules-restored")
            self.pump.poke()

    # -- the data path -----------------------------------------------------------------------

    def _new_primary(self, compare: CompareConfig) -> PrimaryProxy:
        """The comparator and its proxy, with no queues yet (both transports), pumped and
        counted; it asks for its restart checkpoint (I6) at once."""
        comparator = Comparator(compare)
        proxy = PrimaryProxy(comparator, _Late(), _Late(), self.control, self.loop.time())
        proxy.release_until = self.release_until
        self.state.comparator = comparator
        self.state.proxy = proxy
        self.pump.target = proxy
        self.metrics.counts = proxy.counters
        self.metrics.compare_stats = comparator.stats
        self.metrics.compare_bounds = lambda: (
            comparator.config.max_held_packets,
            comparator.config.max_held_bytes,
        )
        return proxy

    def _start_primary(self) -> None:
        """Host P on the NFQUEUE transport: P-out, S-out and the split queue."""
        config = self.state.config
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
        proxy = self._new_primary(compare)
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
        self._queue_metrics(
            {
                queues.primary_out: "primary-out",
                queues.secondary_out: "secondary-out",
                queues.primary_split: "primary-split",
            }
        )
        poke = self.pump.poke
        recorder = self.recorder

        def primary(handle: object, payload: bytes, now: float) -> None:
            proxy.on_primary(handle, payload, now)
            poke()

        def secondary(handle: object, payload: bytes, now: float) -> None:
            proxy.on_secondary(handle, payload, now)
            poke()

        if recorder is not None:

            def primary(handle: object, payload: bytes, now: float) -> None:
                recorder.write("primary", payload)
                proxy.on_primary(handle, payload, now)
                poke()

            def secondary(handle: object, payload: bytes, now: float) -> None:
                recorder.write("secondary", payload)
                proxy.on_secondary(handle, payload, now)
                poke()

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

    async def _start_primary_chardev(self, chardev: ChardevConfig) -> None:
        """The primary fed by QEMU's filters over colo-compare's sockets: the same proxy and
        comparator (Ethernet framing), no S-in (QEMU's filter-rewriter shifts the secondary's
        TCP numbers), verdicts that write released frames to outdev (docs/chardev.md)."""
        # The chardev transport cannot hand a frame back to be cut up: no Split.
        proxy = self._new_primary(dataclasses.replace(self.state.config.compare, split_after=None))
        poke = self.pump.poke
        recorder = self.recorder

        def batches(side: str, feed: _BatchFeed) -> _BatchFeed:
            def callback(tokens: Sequence[object], packets: list[bytes], now: float) -> None:
                if recorder is not None:
                    for packet in packets:
                        recorder.write(side, packet)
                feed(tokens, packets, now)
                poke()

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
            poke()

        transport = ChardevTransport(chardev, primary, secondary, damaged, xen_checkpoint_done)
        self.state.chardev = transport
        proxy.bind(transport.primary_verdicts, transport.secondary_verdicts)
        self.metrics.chardev = transport
        await transport.start()
        if proxy.outstanding is not None:  # the restart request (I6), for Xen too
            transport.request_checkpoint()

    def _start_secondary(self) -> None:
        """Host S: the rewriter of the SVM's TCP sequence spaces on its two queues."""
        queues = self.state.config.queues
        if queues is None:  # the config loader fills in the defaults on a secondary
            raise ValueError("secondary without queues")
        proxy = SecondaryProxy(SecondaryRewriter(), _Late(), _Late())
        self.state.secondary = proxy
        self.pump.target = proxy  # S-in's hold across the SVM's checkpoint
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
        queues = self.state.config.queues
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

    async def become_primary(self, migrate_uri: str) -> None:
        """Reprotect (checked by the control handler): this host becomes the primary, its
        engine brings a new secondary into COLO through ``migrate_uri``."""
        state = self.state
        log.warning("reprotect: becoming the primary; new secondary at %s", migrate_uri)
        # The engine's decisions belong to the old pair; its last heartbeat says "leaving".
        await self._stop_engine()
        for queue in self.queues:
            queue.close()
        self.queues = []
        state.proxy = state.comparator = state.secondary = None
        self.pump.target = None
        # Connections the takeover rewriter was shifting lose their shift here: host S's
        # queues go with its role (docs/engine.md, "Re-protection").
        config = state.config
        config = dataclasses.replace(
            config,
            pair=dataclasses.replace(config.pair, role=Role.PRIMARY),
            engine=dataclasses.replace(config.engine, migrate_uri=migrate_uri, bring_up=True),
        )
        if config.queues is None:
            config = dataclasses.replace(config, queues=QueuesConfig())
        state.config = config
        if self.setup_net:
            await asyncio.to_thread(hostnet.setup, host_net(config))
            log.info("reprotect: host P's data path set up on this host")
        state.role = Role.PRIMARY
        state.mode = Mode.PROTECTED  # everything held until COLO's first checkpoint (I6)
        self.metrics.role = state.role.value
        self._start_primary()
        self._start_engine(reprotect=True)
        self.metrics.protected = True
        self.notifier.status(state.summary())

    # -- the checkpoint engine -------------------------------------------------------------

    def _start_engine(self, *, reprotect: bool = False) -> None:
        """With ``engine.qmp`` set, the engine runs in this daemon as a client of its own
        control socket (docs/engine.md; docs/architecture.md says why the socket); without,
        the proxy waits for an external engine."""
        settings = EngineSettings.from_config(self.state.config)
        if settings is None:
            return
        attach_lan = None
        if (
            self.setup_net
            and not self.chardev_primary
            and self.state.config.net.lan_bridge is not None
        ):
            attach_lan = self.takeover.attach_guest_to_lan
        engine = EngineRunner(
            settings, attach_lan=attach_lan, reprotect=reprotect, fence=self._set_release_until
        )
        self.state.engine = engine
        self.metrics.engine = engine.figures
        self._engine_task = asyncio.create_task(engine.run(), name="engine")
        self._engine_task.add_done_callback(_engine_ended)

    def _set_release_until(self, deadline: float) -> None:
        """The engine's leader key deadline (quorum): the primary proxy releases only before
        it (docs/engine.md, "Failover by quorum")."""
        self.release_until = deadline
        now = self.loop.time()
        if self.state.proxy is not None:
            self.state.proxy.set_release_until(deadline, now)
        gate = self.lease_gate
        if gate is not None:
            try:
                gate.hold_until(deadline, now)
            except NetError as exc:  # the gate stays as it was: closed at its last deadline
                log.error("the leader key's frame gate: %s", exc)

    async def _stop_engine(self) -> None:
        task = self._engine_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])


def _engine_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the checkpoint engine stopped: %r", task.exception())


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
