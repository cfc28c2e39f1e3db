"""A serial worker of the engine (shell): jobs run one at a time, in order.

The engine carries out its actions on two lanes: one for QMP commands
(:mod:`coloproxy.engine.runner`), one for the messages to the proxy
(:mod:`coloproxy.engine.proxy_link`), so that a slow QMP command never delays a release.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from coloproxy.engine.qmp import QmpError

log = logging.getLogger(__name__)


class Lane:
    """Jobs run one at a time, in order; a failing job is logged and the next one runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: asyncio.Queue[tuple[str, Callable[[], Awaitable[None]]]] = asyncio.Queue()

    def put(self, what: str, job: Callable[[], Awaitable[None]]) -> None:
        self._jobs.put_nowait((what, job))

    async def work(self) -> None:
        why = "cancelled"
        try:
            while True:
                what, job = await self._jobs.get()
                try:
                    await job()
                except asyncio.CancelledError:
                    raise
                except QmpError as exc:
                    log.error("engine %s lane: %s: %s", self.name, what, exc)
                except Exception:
                    log.exception("engine %s lane: %s failed", self.name, what)
        finally:
            log.debug("engine %s lane ended: %s", self.name, why)


__all__ = ["Lane"]
