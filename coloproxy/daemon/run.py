"""``coloproxy run``: one daemon, one host, one role (shell).

Primary: set up host P's data path (unless told not to), serve the control socket and the
metrics, bind the three queues and pump them through ``PrimaryProxy``. Secondary: set up
host S's side of the tunnel and serve the control socket. With ``engine.qmp`` set, either
role also runs the checkpoint engine (:mod:`coloproxy.engine.runner`: checkpoints,
heartbeat, failover, takeover) as a client of its own control socket (docs/architecture.md
says why the socket).

``Daemon`` wires: it builds the parts, starts and stops them, and reloads. The parts are
their own modules: the queues or chardev sockets bound to the role's proxy
(``datapath.py``), the proxy's timers on one loop timer (``pump.py``), the control socket's
requests (``control.py``), the takeover's step into the LAN (``takeover.py``), and what they
share (``state.py``).

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
from collections.abc import Callable
from pathlib import Path

from coloproxy import __version__
from coloproxy.config import (
    Config,
    ConfigError,
    QueuesConfig,
    QuorumService,
    load_config,
)
from coloproxy.daemon import collector, heap, logs
from coloproxy.daemon import reload as reloading
from coloproxy.daemon.control import DaemonControl
from coloproxy.daemon.datapath import DataPath
from coloproxy.daemon.notify import Notifier
from coloproxy.daemon.record import Recorder
from coloproxy.daemon.rulewatch import RuleWatch
from coloproxy.daemon.state import DaemonState
from coloproxy.daemon.takeover import LanTakeover
from coloproxy.engine.runner import EngineRunner
from coloproxy.engine.settings import EngineSettings
from coloproxy.errors import ColoproxyError
from coloproxy.metrics import Metrics, MetricsServer
from coloproxy.net import NetError
from coloproxy.net import host as hostnet
from coloproxy.net.leasegate import LeaseGate
from coloproxy.net.rules import QueueNumbers
from coloproxy.protocol import ClientRole, Mode, SetPeriod
from coloproxy.pump import TimerPump
from coloproxy.role import Role

log = logging.getLogger(__name__)


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
            state=self.state,
            loop=self.loop,
            pump=self.pump,
            metrics=self.metrics,
            notifier=self.notifier,
            attach_lan=self.takeover.attach_guest_to_lan if setup_net else None,
            become_primary=self.become_primary,
        )
        self.data_path = DataPath(self.state, self.pump, self.metrics, self.control, self.recorder)
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
                    await self.data_path.start_chardev(config.chardev, self.release_until)
                else:
                    self._start_primary()
            else:
                self.data_path.start_secondary()
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
            self.data_path.close_queues()
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
                new = load_config(path)  # at most 1 MiB, read at once (config/reader.py)
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

    def _start_primary(self) -> None:
        """Host P on the NFQUEUE transport (daemon/datapath.py), behind the leader key's gate
        for the PVM's non-IP frames in quorum mode."""
        config = self.state.config
        proxy = self.data_path.new_primary(self.data_path.nfqueue_compare(), self.release_until)
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
        self.data_path.open_primary(proxy)

    async def become_primary(self, migrate_uri: str) -> None:
        """Reprotect (checked by the control handler): this host becomes the primary, its
        engine brings a new secondary into COLO through ``migrate_uri``."""
        state = self.state
        log.warning("reprotect: becoming the primary; new secondary at %s", migrate_uri)
        # The engine's decisions belong to the old pair; its last heartbeat says "leaving".
        await self._stop_engine()
        self.data_path.close_queues()
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

    collector.tune()
    if config.pair.role is Role.PRIMARY:
        heap.reserve(config.compare.max_retransmit_bytes)
    else:
        heap.keep(config.compare.max_retransmit_bytes)
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
