"""A checkpoint engine double: connects as role engine and answers every checkpoint request
with ``checkpoint-started`` then ``checkpoint-completed``, as the real engine does at the
primary's QMP ``STOP`` and ``RESUME``.

Use::

    async with FakeEngine(path, delay=0.01) as engine:
        ...  # the proxy broadcasts checkpoint requests
        await engine.wait_for(3)  # three checkpoints completed
"""

from __future__ import annotations

import asyncio
import os
import time
from types import TracebackType

from coloproxy.control import ControlClient
from coloproxy.protocol import (
    CheckpointCompleted,
    CheckpointRequest,
    CheckpointStarted,
    ClientRole,
    SetPeriod,
)


class FakeEngine:
    def __init__(
        self, path: str | os.PathLike[str], delay: float = 0.0, synced: bool = True
    ) -> None:
        self.path = path
        self.synced = synced  # False: "guests" are namespaces, no state is copied
        self.delay = delay  # seconds between started and completed: the checkpoint's pause
        self.requests: list[CheckpointRequest] = []
        self.periods: list[int] = []
        self.completed = 0
        self.client: ControlClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Condition()

    @property
    def count(self) -> int:
        """Checkpoint requests received."""
        return len(self.requests)

    async def __aenter__(self) -> FakeEngine:
        self.client = await ControlClient.connect(self.path, ClientRole.ENGINE, name="fake-engine")
        self._task = asyncio.create_task(self._run(self.client), name="fake-engine")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.client is not None:
            await self.client.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    async def _run(self, client: ControlClient) -> None:
        async for push in client:
            if isinstance(push, SetPeriod):
                self.periods.append(push.period_ms)
                continue
            self.requests.append(push)
            started = time.time()
            await client.request(CheckpointStarted(request=push.id, time=started))
            if self.delay:
                await asyncio.sleep(self.delay)
            await client.request(
                CheckpointCompleted(
                    request=push.id, started=started, completed=time.time(), synced=self.synced
                )
            )
            async with self._progress:
                self.completed += 1
                self._progress.notify_all()

    async def wait_for(self, completed: int, timeout: float = 5.0) -> None:
        """Until ``completed`` checkpoints have been reported (bounded)."""
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: self.completed >= completed)
