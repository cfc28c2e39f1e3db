"""An asyncio client of the control socket, for the CLI, monitors and test engines.

One reader task decodes every line the proxy sends: replies go to the request waiting for
them (matched by ``re``), pushes (``checkpoint-request``, ``set-period``) to a bounded queue
read by ``async for message in client``. :meth:`ControlClient.request` numbers the message,
sends it and waits (bounded) for its reply; an ``error`` reply raises
:class:`ControlRefusedError`.

The proxy closes a connection it has heard nothing on for the ``idle_timeout`` its welcome
names. With ``keepalive`` (the default for an engine, which must stay connected to be asked
for checkpoints) the client writes an empty line, the protocol's keep-alive, whenever it has
sent nothing for a third of that time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
from collections.abc import AsyncIterator
from typing import Final, overload

from coloproxy import __version__
from coloproxy.control.errors import ControlConnectionError, ControlError, ControlRefusedError
from coloproxy.protocol import (
    Ack,
    CheckpointRequest,
    ClientRole,
    Command,
    Decoder,
    ErrorReply,
    Hello,
    Message,
    ProtocolError,
    Push,
    Request,
    SetPeriod,
    Status,
    StatusRequest,
    Welcome,
    encode,
)

log = logging.getLogger(__name__)

READ_CHUNK: Final = 64 * 1024
# A keep-alive goes out after this fraction of the proxy's idle timeout without a write: two
# more chances before the proxy gives up on us, should the loop be slow once.
KEEPALIVE_FRACTION: Final = 1 / 3


class ControlClient:
    """A connection that has said hello. Build it with :meth:`connect`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout: float,
        push_queue: int,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        # Unbounded as a structure, bounded by _route (push_queue items) so that the end
        # marker (None) always fits.
        self._pushes: asyncio.Queue[Push | None] = asyncio.Queue()
        self._push_limit = push_queue
        self._task: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._last_write = 0.0  # loop time of the last line written
        self.closed_reason: str | None = None  # why the connection ended, once it did
        self.welcome: Welcome | None = None

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str],
        role: ClientRole,
        *,
        name: str = f"coloproxy {__version__}",
        timeout: float = 10.0,
        push_queue: int = 1024,
        keepalive: bool | None = None,
    ) -> ControlClient:
        """Connect to the socket at ``path`` and say hello; raises
        :class:`ControlConnectionError` or :class:`ControlRefusedError`. ``keepalive``
        (default: for an engine) keeps an idle connection open (module docstring)."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        except (OSError, TimeoutError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
            raise ControlConnectionError(f"cannot connect to {path}: {detail}") from exc
        client = cls(reader, writer, timeout=timeout, push_queue=push_queue)
        client._task = asyncio.create_task(client._read_loop(), name="control-client-reader")
        try:
            reply = await client._exchange(Hello(role, client=name))
            if not isinstance(reply, Welcome):
                raise ControlError(f"the proxy answered hello with {reply.kind}")
        except BaseException:
            await client.close()
            raise
        client.welcome = reply
        if keepalive is None:
            keepalive = role is ClientRole.ENGINE
        if keepalive and reply.idle_timeout > 0:
            client._keepalive = asyncio.create_task(
                client._keep_alive(reply.idle_timeout * KEEPALIVE_FRACTION),
                name="control-client-keepalive",
            )
        return client

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._end("closed by this client")
        for task in (self._keepalive, self._task):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task])
        self._writer.transport.abort()

    # -- requests --------------------------------------------------------------------------

    @overload
    async def request(self, message: StatusRequest, timeout: float | None = None) -> Status: ...

    @overload
    async def request(self, message: Command, timeout: float | None = None) -> Ack: ...

    async def request(self, message: Request, timeout: float | None = None) -> Ack | Status:
        """Send ``message`` (its id is assigned here) and return the reply."""
        reply = await self._exchange(message, timeout)
        expected = Status if isinstance(message, StatusRequest) else Ack
        if not isinstance(reply, expected):
            raise ControlError(f"the proxy answered {message.kind} with {reply.kind}")
        return reply

    async def _exchange(self, message: Request | Hello, timeout: float | None = None) -> Message:
        if self.closed_reason is not None:
            raise ControlConnectionError(f"the connection is closed: {self.closed_reason}")
        message = dataclasses.replace(message, id=next(self._ids))
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[message.id] = future
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                try:
                    self._last_write = asyncio.get_running_loop().time()
                    self._writer.write(encode(message))
                    await self._writer.drain()
                except ConnectionError as exc:
                    # The proxy may have closed after saying why (busy, forbidden): the reader
                    # delivers that line, or ends the future with the connection's end.
                    log.debug("sending %s failed: %s", message.kind, exc)
                reply = await future
        except TimeoutError as exc:
            raise ControlConnectionError(f"no reply to {message.kind} in time") from exc
        finally:
            self._pending.pop(message.id, None)
        if isinstance(reply, ErrorReply):
            raise ControlRefusedError(reply, message.kind)
        return reply

    async def _keep_alive(self, interval: float) -> None:
        """An empty line whenever nothing was written for ``interval`` seconds."""
        loop = asyncio.get_running_loop()
        why = "cancelled"
        try:
            while self.closed_reason is None:
                due = self._last_write + interval
                if loop.time() < due:
                    await asyncio.sleep(due - loop.time())
                    continue
                self._last_write = loop.time()
                self._writer.write(b"\n")
                await self._writer.drain()
            why = "the connection ended"
        except ConnectionError as exc:
            why = f"connection error: {exc}"  # the reader sees the end and says why
        finally:
            log.debug("control client keep-alive ended: %s", why)

    # -- pushes ----------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Push]:
        return self

    async def __anext__(self) -> Push:
        item = await self._pushes.get()
        if item is None:
            self._pushes.put_nowait(None)  # the next caller ends too
            raise StopAsyncIteration
        return item

    # -- reading ---------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        decoder = Decoder()
        why = "the proxy closed the connection"
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    break
                for item in decoder.feed(data):
                    if not self._route(item):
                        why = "the push queue overflowed: pushes are not being read"
                        return
        except asyncio.CancelledError:
            why = "cancelled"
            raise
        except ConnectionError as exc:
            why = f"connection error: {exc}"
        finally:
            log.debug("control client reader ended: %s", why)
            self._end(why)
            self._writer.transport.abort()

    def _route(self, item: Message | ProtocolError) -> bool:
        if isinstance(item, ProtocolError):
            log.warning("the proxy sent a bad line: %s: %s", item.code, item.detail)
            return True
        if isinstance(item, CheckpointRequest | SetPeriod):
            if self._pushes.qsize() >= self._push_limit:
                return False
            self._pushes.put_nowait(item)
            return True
        re = getattr(item, "re", None)
        if isinstance(item, ErrorReply) and re is None:
            # A connection-level refusal (credentials, busy, no hello): fails everything.
            for waiting in self._pending.values():
                if not waiting.done():
                    waiting.set_result(item)
            return True
        future = self._pending.get(re) if isinstance(re, int) else None
        if future is None or future.done():
            log.warning("unexpected %s from the proxy (re %s)", item.kind, re)
        else:
            future.set_result(item)
        return True

    def _end(self, why: str) -> None:
        if self.closed_reason is not None:
            return
        self.closed_reason = why
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ControlConnectionError(f"connection ended: {why}"))
        self._pushes.put_nowait(None)  # iteration ends after the pushes already queued
