"""One long-lived QMP connection to the local QEMU (shell), through ``qemu.qmp``.

Theory of operation
-------------------
QEMU sends events only to connected clients and a monitor socket takes one client at a
time (docs/invariants.md), so :class:`QemuMonitor` connects once and keeps the connection
for the QEMU's life. Two background tasks run while connected:

- the *event pump* reads the events the engine cares about (``STOP``, ``RESUME``,
  ``COLO_EXIT``, ``SHUTDOWN``, ...) from a ``qemu.qmp`` listener and hands each to the
  ``on_event`` callback as a :class:`QmpEvent`, with QEMU's own timestamp (wall clock,
  microseconds) and the loop time it arrived;
- the *watcher* waits for the connection's runstate to leave RUNNING: QEMU closed the
  socket, which for a monitor we never disconnect from means the QEMU process is gone
  (or about to be). It collects the reader's error (``EOFError`` for a clean close), sets
  the runstate :attr:`MonitorState.GONE` and calls ``on_gone`` with the reason.

Both log why they end and re-raise ``CancelledError``. Every command goes through
:meth:`QemuMonitor.execute`: refused in a state other than CONNECTED, bounded by a timeout,
and every failure wrapped in a :class:`QmpError` (or :class:`QemuGoneError`) that keeps the
root cause and names the command.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import Runstate

from coloproxy.errors import ColoproxyError

log = logging.getLogger(__name__)

ENGINE_EVENTS: Final = (
    "STOP",
    "RESUME",
    "COLO_EXIT",
    "SHUTDOWN",
    "MIGRATION",
    "FAILOVER_NEGOTIATED",
    "BLOCK_IO_ERROR",
)
# A QMP command answers in well under a millisecond on an idle QEMU; a few seconds means
# the main loop is stuck (the BQL deadlock of docs/invariants.md).
DEFAULT_COMMAND_TIMEOUT: Final = 5.0


class EngineError(ColoproxyError):
    """The checkpoint engine cannot do its work (QMP, peer, configuration)."""


class QmpError(EngineError):
    """A QMP command failed, or the monitor cannot be used; ``command`` names it and
    ``error_class`` is QEMU's error class when QEMU refused it."""

    def __init__(self, message: str, command: str = "", error_class: str | None = None) -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class


class QemuGoneError(QmpError):
    """The monitor closed: the QEMU process exited."""


class MonitorState(Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    GONE = "gone"  # QEMU closed the monitor: the process is gone
    CLOSED = "closed"  # we closed it


@dataclass(frozen=True, slots=True)
class QmpEvent:
    name: str
    wall: float  # QEMU's timestamp (Unix seconds)
    received: float  # loop time when the pump handed it on
    data: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ColoStatus:
    mode: str  # none, primary, secondary
    last_mode: str | None
    reason: str  # none, request, error, processing


@dataclass(frozen=True, slots=True)
class MigrationStats:
    """``query-migrate`` in brief (the ``ram`` figures are cumulative since ``migrate``)."""

    status: str
    ram_transferred: int | None = None
    ram_total: int | None = None
    ram_normal_pages: int | None = None
    ram_duplicate_pages: int | None = None
    dirty_pages_rate: int | None = None  # pages per second
    dirty_sync_count: int | None = None


class QemuMonitor:
    """See the module docstring. ``on_event`` and ``on_gone`` run on the event loop and must
    not block."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str,
        on_event: Callable[[QmpEvent], None],
        on_gone: Callable[[str], None],
        *,
        events: Iterable[str] = ENGINE_EVENTS,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self.path = os.fspath(path)
        self.name = name
        self.on_event = on_event
        self.on_gone = on_gone
        self.events = tuple(events)
        self.command_timeout = command_timeout
        self.state = MonitorState.IDLE
        self.gone_reason: str | None = None
        self._client: QMPClient | None = None
        self._listener: EventListener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life cycle ------------------------------------------------------------------------

    async def connect(self, timeout: float | None = None, retry: float = 0.05) -> None:
        """Connect, retrying while the socket is missing or refuses (QEMU starting), for at
        most ``timeout`` seconds (None: until cancelled)."""
        if self.state is not MonitorState.IDLE:
            raise QmpError(f"{self.name}: cannot connect in state {self.state.value}")
        self.state = MonitorState.CONNECTING
        self._loop = asyncio.get_running_loop()
        deadline = None if timeout is None else self._loop.time() + timeout
        last: Exception | None = None
        while True:
            client = QMPClient(self.name)
            try:
                await client.connect(self.path)
                break
            except QMPError as exc:
                last = exc
            if deadline is not None and self._loop.time() >= deadline:
                self.state = MonitorState.IDLE
                raise QmpError(
                    f"{self.name}: cannot connect to QMP at {self.path}: {last}"
                ) from last
            await asyncio.sleep(retry)
        self._client = client
        self._listener = EventListener(self.events)
        client.register_listener(self._listener)
        self.state = MonitorState.CONNECTED
        self._tasks = [
            asyncio.create_task(self._pump(self._listener), name=f"qmp-events-{self.name}"),
            asyncio.create_task(self._watch(client), name=f"qmp-watch-{self.name}"),
        ]
        log.info("%s: QMP connected at %s", self.name, self.path)

    async def close(self) -> None:
        """Stop the tasks and disconnect. Idempotent."""
        if self.state is MonitorState.CLOSED:
            return
        was = self.state
        self.state = MonitorState.CLOSED
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        client = self._client
        if client is not None and was is not MonitorState.GONE:
            try:
                await client.disconnect()
            except (QMPError, OSError, EOFError) as exc:
                log.debug("%s: disconnect: %r", self.name, exc)

    # -- background ------------------------------------------------------------------------

    async def _pump(self, listener: EventListener) -> None:
        loop = asyncio.get_running_loop()
        why = "the listener ended"
        try:
            async for message in listener:
                stamp = message.get("timestamp")
                wall = 0.0
                if isinstance(stamp, dict):
                    wall = (
                        float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
                    )
                data = message.get("data", {})
                event = QmpEvent(
                    str(message["event"]), wall, loop.time(), data if isinstance(data, dict) else {}
                )
                try:
                    self.on_event(event)
                except Exception:
                    log.exception("%s: event handler failed on %s", self.name, event.name)
        except asyncio.CancelledError:
            why = "cancelled"
            raise
        finally:
            log.debug("%s: event pump ended: %s", self.name, why)

    async def _watch(self, client: QMPClient) -> None:
        why = "cancelled"
        try:
            while client.runstate is Runstate.RUNNING:
                await client.runstate_changed()
            # Gone from this moment: tell at once (the failover decider must not act on
            # behalf of a QEMU that is dying), then collect the reader's error for the log.
            why = "the monitor closed"
            self._gone(why)
            try:
                await client.disconnect()
            except EOFError:
                why = "QEMU closed the monitor (end of stream)"
            except (QMPError, OSError) as exc:
                why = f"the monitor broke: {exc!r}"
            self.gone_reason = why
        finally:
            log.debug("%s: watcher ended: %s", self.name, why)

    def _gone(self, why: str) -> None:
        if self.state is not MonitorState.CONNECTED:
            return
        self.state = MonitorState.GONE
        self.gone_reason = why
        log.warning("%s: QEMU is gone: %s", self.name, why)
        try:
            self.on_gone(why)
        except Exception:
            log.exception("%s: gone handler failed", self.name)

    # -- commands --------------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> object:
        """Run one command; its ``return`` value. Raises :class:`QmpError`."""
        client = self._client
        if self.state is not MonitorState.CONNECTED or client is None:
            error = QemuGoneError if self.state is MonitorState.GONE else QmpError
            raise error(f"{self.name}: {command}: monitor is {self.state.value}", command)
        try:
            async with asyncio.timeout(self.command_timeout if timeout is None else timeout):
                return await client.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as exc:
            raise QmpError(
                f"{self.name}: {command} refused: {exc.error_class}: {exc}",
                command,
                exc.error_class,
            ) from exc
        except ExecInterruptedError as exc:
            raise QemuGoneError(f"{self.name}: {command}: the monitor closed", command) from exc
        except TimeoutError as exc:
            raise QmpError(f"{self.name}: {command}: no reply in time", command) from exc
        except (QMPError, OSError) as exc:
            raise QmpError(f"{self.name}: {command} failed: {exc!r}", command) from exc

    async def version(self) -> tuple[int, int]:
        reply = _mapping(await self.execute("query-version"), "query-version")
        qemu = _mapping(reply.get("qemu"), "query-version")
        return int(str(qemu.get("major", 0))), int(str(qemu.get("minor", 0)))

    async def run_state(self) -> str:
        """``query-status``: running, paused, inmigrate, colo, finish-migrate, ..."""
        return str(_mapping(await self.execute("query-status"), "query-status").get("status"))

    async def enable_colo(self) -> None:
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-colo", "state": True}]},
        )

    async def set_checkpoint_delay(self, delay_ms: int) -> None:
        """The only external trigger: in COLO it starts a checkpoint at once
        (docs/invariants.md) and restarts QEMU's own timer with this delay."""
        await self.execute("migrate-set-parameters", {"x-checkpoint-delay": delay_ms})

    async def migrate(self, uri: str) -> None:
        await self.execute("migrate", {"uri": uri})

    async def colo_status(self) -> ColoStatus:
        reply = _mapping(await self.execute("query-colo-status"), "query-colo-status")
        last = reply.get("last-mode")
        return ColoStatus(
            mode=str(reply.get("mode", "none")),
            last_mode=None if last is None else str(last),
            reason=str(reply.get("reason", "none")),
        )

    async def migration_stats(self) -> MigrationStats:
        reply = _mapping(await self.execute("query-migrate"), "query-migrate")
        ram = reply.get("ram")
        figures = ram if isinstance(ram, dict) else {}

        def number(key: str) -> int | None:
            value = figures.get(key)
            return value if isinstance(value, int) else None

        return MigrationStats(
            status=str(reply.get("status", "none")),
            ram_transferred=number("transferred"),
            ram_total=number("total"),
            ram_normal_pages=number("normal"),
            ram_duplicate_pages=number("duplicate"),
            dirty_pages_rate=number("dirty-pages-rate"),
            dirty_sync_count=number("dirty-sync-count"),
        )

    async def stop_guest(self) -> None:
        """``stop``: pause the guest (a primary whose secondary took over)."""
        await self.execute("stop")

    async def lost_heartbeat(self) -> None:
        """``x-colo-lost-heartbeat``: this QEMU leaves COLO and runs alone."""
        await self.execute("x-colo-lost-heartbeat")

    async def announce_self(self) -> None:
        """Gratuitous RARP from every NIC: the network learns the guest's MAC at its new place."""
        await self.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})


def _mapping(value: object, command: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise QmpError(f"{command}: unexpected reply {value!r}", command)
    return value
