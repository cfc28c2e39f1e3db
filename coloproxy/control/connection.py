"""One control client's stream (shell): the bounded queue of lines a writer task drains into
the socket, and how the connection ends.

Nothing the proxy does waits for a client: :meth:`Connection.enqueue` only puts a line on the
queue, and a client whose queue is full has stopped reading and is dropped on the spot. A
connection ends once (:meth:`Connection.disconnect`): politely, after the lines already
queued (an error reply saying why) have left, bounded by ``FINAL_FLUSH_TIMEOUT``, then a
bounded "lingering close" (:meth:`Connection.linger`); or at once (``abort``), queued lines
dropped. What a client may say, and the replies, are the server's
(:mod:`coloproxy.control.server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

log = logging.getLogger(__name__)

READ_CHUNK: Final = 64 * 1024
# The last lines to a client we are closing on (an error reply) get this long to leave.
FINAL_FLUSH_TIMEOUT: Final = 1.0
# After those lines, how long we keep reading (and dropping) what the client still sends,
# so that its writes do not fail (EPIPE) before it has read why it is being closed.
LINGER_TIMEOUT: Final = 1.0


class Connection:
    """The stream half of one client connection; ``str()`` names the client in the logs."""

    def __init__(self, writer: asyncio.StreamWriter, queue_size: int) -> None:
        self.writer = writer
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(queue_size)
        self.close_reason: str | None = None  # set once: why this connection ends
        self.aborted = False  # closed at once, queued lines dropped
        self.writer_task: asyncio.Task[None] | None = None
        self.room = asyncio.Event()  # set whenever the writer took a line off the queue

    def closing(self) -> bool:
        # A method, not a property: mypy would otherwise keep a narrowed value across awaits.
        return self.close_reason is not None

    def start_writer(self, name: str) -> None:
        self.writer_task = asyncio.create_task(self._write_loop(), name=name)

    def enqueue(self, line: bytes | None) -> bool:
        """Queue a line for the writer; never waits. False (and the connection dropped) when
        the queue is full, or the connection is ending."""
        if self.close_reason is not None:
            return False
        try:
            self.queue.put_nowait(line)
        except asyncio.QueueFull:
            self.disconnect(
                f"its outgoing queue is full ({self.queue.maxsize} lines): it stopped reading",
                abort=True,
                level=logging.WARNING,
            )
            return False
        return True

    def disconnect(self, reason: str, *, abort: bool = False, level: int = logging.INFO) -> None:
        """End the connection. With ``abort`` at once (queued lines are lost); without, after
        the queued lines have left (or FINAL_FLUSH_TIMEOUT)."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        log.log(level, "control %s disconnected: %s", self, reason)
        self.room.set()  # a reader waiting for room must see the end
        if abort:
            self.aborted = True
            self.writer.transport.abort()
            if self.writer_task is not None:
                self.writer_task.cancel()
        else:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)  # the writer closes after the queued lines
            if self.writer_task is None or self.queue.full():
                self.aborted = True
                self.writer.transport.abort()
        # The reader is not cancelled (it may be inside the handler, whose work must not be
        # cut in half): its next read returns EOF once the transport is closed.

    async def wait_for_room(self, limit: int, deadline: float | None) -> bool:
        """Wait until fewer than ``limit`` lines are queued (by loop time ``deadline``).

        False when the client read none of them in time (it is disconnected) or the
        connection ended meanwhile.
        """
        queue = self.queue
        if queue.qsize() < limit:
            return True
        try:
            async with asyncio.timeout_at(deadline):
                while queue.qsize() >= limit and not self.closing():
                    self.room.clear()
                    await self.room.wait()
        except TimeoutError:
            self.disconnect(
                f"it read none of its {queue.qsize()} pending replies in time",
                abort=True,
                level=logging.WARNING,
            )
            return False
        return not self.closing()

    async def _write_loop(self) -> None:
        writer = self.writer
        why = "the queue was closed"
        try:
            while True:
                line = await self.queue.get()
                self.room.set()
                if line is None:
                    break
                writer.write(line)
                await writer.drain()
            # A polite end: the last lines (an error reply) get a bounded time to leave, then
            # our side of the stream ends (the client reads EOF after them). The reader closes
            # the transport once the client has closed too (see linger).
            async with asyncio.timeout(FINAL_FLUSH_TIMEOUT):
                if writer.can_write_eof():
                    writer.write_eof()
                await writer.drain()
            why = "the last lines were sent"
        except asyncio.CancelledError:
            why = "cancelled"
            raise
        except TimeoutError:
            why = "the final lines did not leave in time"
            writer.transport.abort()
        except ConnectionError as exc:
            why = f"connection error: {exc}"
            self.disconnect(why, abort=True)
        finally:
            log.debug("control %s writer ended: %s", self, why)

    async def linger(self, reader: asyncio.StreamReader) -> None:
        """After a polite close, read and drop what the client still sends until it closes
        (bounded): closing at once would make its next write fail, and with it, in most
        clients, the read of the error line that says why ("lingering close")."""
        if self.aborted:
            return
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                while await reader.read(READ_CHUNK):
                    pass

    async def end_writer(self) -> str:
        """End the writer (a polite close gets its flush, bounded), close the transport and
        return why the connection ended."""
        reason = self.close_reason
        if reason is None:
            reason = self.close_reason = "ended"
        writer_task = self.writer_task
        if writer_task is not None:
            if not writer_task.done():
                # Give a polite close its flush; the writer bounds that itself.
                await asyncio.wait([writer_task], timeout=FINAL_FLUSH_TIMEOUT * 2)
            if not writer_task.done():
                writer_task.cancel()
                await asyncio.wait([writer_task])
        self.writer.transport.abort()
        return reason
