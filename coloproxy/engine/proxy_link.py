"""The engine's connection to its own proxy (shell): a control-socket client of role
``engine`` (docs/control-protocol.md), exactly like an external engine.

Theory of operation
-------------------
:meth:`ProxyLink.run` connects, and reconnects, as long as it takes (the proxy may start
after the engine, or restart), and hands each push (``checkpoint-request``, ``set-period``)
to ``on_push``. What the engine tells the proxy about checkpoints goes out in order on a
lane of its own (:meth:`ProxyLink.notify`; :meth:`ProxyLink.deliver` works it off), so that
a slow QMP command never delays a release; a notice with no connection is dropped: the
proxy re-sends its outstanding request when the engine reconnects, and a checkpoint then
serves it again (nothing is released without one). A ``failover`` must reach the proxy: it
waits for the connection, bounded (:meth:`ProxyLink.tell_failover`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final

from coloproxy import __version__
from coloproxy.control.client import ControlClient
from coloproxy.control.errors import ControlConnectionError, ControlError
from coloproxy.engine.lane import Lane
from coloproxy.protocol import (
    CheckpointCompleted,
    CheckpointStarted,
    ClientRole,
    Failover,
    Push,
)

log = logging.getLogger(__name__)

CONTROL_RETRY: Final = 0.2
# A failover message must reach the proxy: wait this long for the control connection.
FAILOVER_CONTROL_WAIT: Final = 10.0


class ProxyLink:
    """One engine's control connection to the proxy at ``path``."""

    def __init__(self, path: Path, on_push: Callable[[Push], None]) -> None:
        self.path = path
        self._on_push = on_push
        self._client: ControlClient | None = None
        self._up = asyncio.Event()
        self._lane = Lane("control")

    def notify(self, what: str, message: CheckpointStarted | CheckpointCompleted) -> None:
        """``message`` to the proxy, after the ones before it."""
        self._lane.put(what, lambda: self._notify(message))

    async def deliver(self) -> None:
        """Send what :meth:`notify` queued, one at a time, until cancelled."""
        await self._lane.work()

    async def _notify(self, message: CheckpointStarted | CheckpointCompleted) -> None:
        client = self._client
        if client is None:
            # The proxy re-sends its outstanding request when we reconnect: a checkpoint
            # then serves it again. Nothing is released without a checkpoint.
            log.warning("%s not sent: no control connection", message.kind)
            return
        try:
            await client.request(message)
        except ControlError as exc:
            log.warning("%s: %s", message.kind, exc)

    async def tell_failover(self, message: Failover) -> None:
        try:
            async with asyncio.timeout(FAILOVER_CONTROL_WAIT):
                await self._up.wait()
        except TimeoutError:
            log.error("failover not told to the proxy: no control connection")
            return
        client = self._client
        if client is None:
            log.error("failover not told to the proxy: the control connection ended")
            return
        try:
            await client.request(message)
        except ControlError as exc:
            log.error("failover not accepted by the proxy: %s", exc)

    async def run(self) -> None:
        """Stay connected to the proxy's control socket as an engine; hand on its pushes."""
        path = self.path
        why = "cancelled"
        complained = False
        try:
            while True:
                try:
                    client = await ControlClient.connect(
                        path, ClientRole.ENGINE, name=f"coloproxy-engine {__version__}"
                    )
                except ControlError as exc:
                    if not complained:
                        log.warning("engine: control socket %s: %s (retrying)", path, exc)
                        complained = True
                    await asyncio.sleep(CONTROL_RETRY)
                    continue
                complained = False
                self._client = client
                self._up.set()
                log.info("engine connected to the proxy at %s", path)
                try:
                    async for push in client:
                        self._on_push(push)
                finally:
                    self._up.clear()
                    self._client = None
                    await client.close()
                log.warning("engine: control connection ended: %s", client.closed_reason)
                await asyncio.sleep(CONTROL_RETRY)
        except ControlConnectionError as exc:  # pragma: no cover - connect() wraps these
            why = f"control connection: {exc}"
            raise
        finally:
            log.debug("engine control loop ended: %s", why)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


__all__ = ["CONTROL_RETRY", "FAILOVER_CONTROL_WAIT", "ProxyLink"]
