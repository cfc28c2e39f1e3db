"""Checkpoint engine doubles: control-socket clients of role engine that answer the proxy's
checkpoint requests with ``checkpoint-started`` then ``checkpoint-completed`` carrying the
request's id, as the real engine does at the primary's QMP ``STOP`` and ``RESUME``.

``FakeEngine`` runs on the test's event loop; by default it answers every request at once
(after ``delay``). With ``hold`` set it answers nothing by itself: a request waits in
``pending`` until the test calls :meth:`FakeEngine.start` (``checkpoint-started``) and
:meth:`FakeEngine.complete` (``checkpoint-started`` first if not sent yet, then
``checkpoint-completed``), so a test can look at what the proxy lets through while a
checkpoint is asked for, or running, and not completed::

    async with FakeEngine(path) as engine:
        ...  # the proxy broadcasts checkpoint requests
        await engine.wait_for(3)  # three checkpoints completed
        engine.hold = True
        ...  # a divergence
        await engine.wait_for_requests(4)
        ...  # nothing may leave now
        await engine.complete()

``EngineThread`` is the same double on an event loop of its own in a thread, reconnecting
when the proxy restarts: for tests whose proxy is another process (tests/pairworld.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import TypeVar

from coloproxy.control import ControlClient, ControlError
from coloproxy.protocol import (
    CheckpointCompleted,
    CheckpointRequest,
    CheckpointStarted,
    ClientRole,
    SetPeriod,
)

T = TypeVar("T")

RECONNECT_INTERVAL = 0.05  # seconds between attempts while the proxy is away


class FakeEngine:
    def __init__(
        self,
        path: str | os.PathLike[str],
        delay: float = 0.0,
        synced: bool = True,
        *,
        hold: bool = False,
        reconnect: bool = False,
        name: str = "fake-engine",
    ) -> None:
        self.path = path
        self.synced = synced  # False: "guests" are namespaces, no state is copied
        self.delay = delay  # seconds between started and completed: the checkpoint's pause
        # True: requests wait in ``pending`` for start()/complete(). Read at each request.
        self.hold = hold
        self.reconnect = reconnect  # the proxy may restart: connect again, for good
        self.name = name
        self.requests: list[CheckpointRequest] = []  # every request received, in order
        self.pending: list[CheckpointRequest] = []  # held: received, not completed
        self.periods: list[int] = []
        self.completed = 0
        self.connections = 0
        self.client: ControlClient | None = None
        self._started: dict[int, float] = {}  # request id -> wall time of checkpoint-started
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Condition()

    @property
    def count(self) -> int:
        """Checkpoint requests received."""
        return len(self.requests)

    def reasons(self) -> list[str]:
        return [request.reason for request in self.requests]

    async def __aenter__(self) -> FakeEngine:
        if self.reconnect:
            self._task = asyncio.create_task(self._reconnecting(), name=self.name)
        else:
            client = await self._connect()
            self._task = asyncio.create_task(self._session(client), name=self.name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        if self.client is not None:
            await self.client.close()

    async def _connect(self) -> ControlClient:
        client = await ControlClient.connect(self.path, ClientRole.ENGINE, name=self.name)
        self.client = client
        async with self._progress:
            self.connections += 1
            self._progress.notify_all()
        return client

    async def _reconnecting(self) -> None:
        while True:
            try:
                client = await self._connect()
            except (ControlError, OSError):
                await asyncio.sleep(RECONNECT_INTERVAL)
                continue
            with contextlib.suppress(ControlError, OSError):
                await self._session(client)
            await client.close()
            # The proxy that asked is gone; a new one asks again (its restart request).
            self.pending.clear()
            self._started.clear()

    async def _session(self, client: ControlClient) -> None:
        async for push in client:
            if isinstance(push, SetPeriod):
                self.periods.append(push.period_ms)
                continue
            async with self._progress:
                self.requests.append(push)
                self.pending.append(push)
                self._progress.notify_all()
            if not self.hold:
                await self._start(push)
                if self.delay:
                    await asyncio.sleep(self.delay)
                await self._complete(push)

    # -- what the test triggers ------------------------------------------------------------

    def _find(self, request_id: int | None) -> CheckpointRequest:
        if not self.pending:
            raise AssertionError("no checkpoint request is pending")
        if request_id is None:
            return self.pending[0]
        for request in self.pending:
            if request.id == request_id:
                return request
        raise AssertionError(f"checkpoint request {request_id} is not pending")

    async def start(self, request_id: int | None = None) -> CheckpointRequest:
        """``checkpoint-started`` for a pending request (the oldest by default)."""
        request = self._find(request_id)
        await self._start(request)
        return request

    async def complete(self, request_id: int | None = None) -> CheckpointRequest:
        """Finish a pending request (the oldest by default): ``checkpoint-started`` unless it
        was sent already, then ``checkpoint-completed``."""
        request = self._find(request_id)
        await self._start(request)
        await self._complete(request)
        return request

    async def release(self) -> None:
        """Stop holding: complete every pending request; later ones are answered at once."""
        self.hold = False
        while self.pending:
            await self.complete()

    async def _start(self, request: CheckpointRequest) -> None:
        if request.id in self._started:
            return
        assert self.client is not None
        started = time.time()
        self._started[request.id] = started
        await self.client.request(CheckpointStarted(request=request.id, time=started))

    async def _complete(self, request: CheckpointRequest) -> None:
        assert self.client is not None
        started = self._started.pop(request.id)
        await self.client.request(
            CheckpointCompleted(
                request=request.id, started=started, completed=time.time(), synced=self.synced
            )
        )
        async with self._progress:
            self.pending.remove(request)
            self.completed += 1
            self._progress.notify_all()

    # -- waiting ---------------------------------------------------------------------------

    async def _until(self, condition: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(condition)

    async def wait_for(self, completed: int, timeout: float = 5.0) -> None:
        """Until ``completed`` checkpoints have been reported (bounded)."""
        await self._until(lambda: self.completed >= completed, timeout)

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> None:
        """Until ``count`` requests have been received (bounded)."""
        await self._until(lambda: len(self.requests) >= count, timeout)


class EngineThread:
    """A reconnecting :class:`FakeEngine` on an event loop of its own, in a daemon thread.

    Its methods block the calling thread (bounded); ``requests``, ``pending`` and
    ``completed`` are the double's own, read without locking (list appends are atomic).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        delay: float = 0.002,
        synced: bool = False,
        *,
        hold: bool = False,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._closing: asyncio.Event | None = None
        self.engine: FakeEngine | None = None
        self._args = (path, delay, synced, hold)
        self._thread = threading.Thread(target=self._run, daemon=True, name="engine-thread")
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("the engine double's thread did not start")

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        path, delay, synced, hold = self._args
        self._closing = asyncio.Event()
        engine = FakeEngine(path, delay, synced, hold=hold, reconnect=True, name="test-engine")
        async with engine:
            self.engine = engine
            self._ready.set()
            await self._closing.wait()

    def _call(self, make: Callable[[FakeEngine], Awaitable[T]], timeout: float) -> T:
        engine = self.engine
        assert engine is not None

        async def call() -> T:
            return await make(engine)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)

    # -- the double's record ---------------------------------------------------------------

    @property
    def requests(self) -> list[CheckpointRequest]:
        assert self.engine is not None
        return self.engine.requests

    @property
    def pending(self) -> list[CheckpointRequest]:
        assert self.engine is not None
        return self.engine.pending

    @property
    def completed(self) -> int:
        return 0 if self.engine is None else self.engine.completed

    def reasons(self) -> list[str]:
        assert self.engine is not None
        return self.engine.reasons()

    # -- what the test triggers ------------------------------------------------------------

    @property
    def hold(self) -> bool:
        return self.engine is not None and self.engine.hold

    @hold.setter
    def hold(self, value: bool) -> None:
        engine = self.engine
        assert engine is not None

        done = threading.Event()

        def set_hold() -> None:
            engine.hold = value
            done.set()

        # On the engine's loop, so that no request is half-way through the old setting.
        self._loop.call_soon_threadsafe(set_hold)
        if not done.wait(5):
            raise RuntimeError("the engine double's loop does not run")

    def start(self, request_id: int | None = None, timeout: float = 5.0) -> CheckpointRequest:
        return self._call(lambda engine: engine.start(request_id), timeout)

    def complete(self, request_id: int | None = None, timeout: float = 5.0) -> CheckpointRequest:
        return self._call(lambda engine: engine.complete(request_id), timeout)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> None:
        self._call(lambda engine: engine.wait_for_requests(count, timeout), timeout + 1)

    def wait_for(self, completed: int, timeout: float = 5.0) -> None:
        self._call(lambda engine: engine.wait_for(completed, timeout), timeout + 1)

    @contextlib.contextmanager
    def holding(self) -> Iterator[EngineThread]:
        """Requests wait for the test's start()/complete() inside; on the way out every one
        still pending is completed and later ones are answered at once again."""
        self.hold = True
        try:
            yield self
        finally:
            self._call(lambda engine: engine.release(), 10)

    def close(self) -> None:
        closing = self._closing
        if closing is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended already
                self._loop.call_soon_threadsafe(closing.set)
        self._thread.join(timeout=5)
