"""The metrics' HTTP endpoint: ``GET /metrics`` served by asyncio on the event loop (shell).

Not prometheus_client's thread: collecting then runs on the loop thread, the only one
allowed to read the comparator and the counters (no locks, no torn reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Final

from coloproxy.errors import ColoproxyError, UsageError
from coloproxy.metrics.collector import Metrics

log = logging.getLogger("coloproxy.metrics")  # the package's, as log lines have named it

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 9477
LINGER_TIMEOUT: Final = 1.0  # a closing connection waits this long for the client's end
READ_CHUNK: Final = 64 * 1024


class MetricsError(ColoproxyError):
    """The metrics endpoint cannot be served (address in use, bad address)."""


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on asyncio, one request per connection.

    Bounded: ``max_connections`` at once (more get 503), a request head of at most
    ``MAX_HEAD`` bytes (431), ``request_timeout`` seconds per connection. Scrapes run on the
    event loop (see the module docstring).
    """

    MAX_HEAD: Final = 8192

    def __init__(
        self,
        metrics: Metrics,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        max_connections: int = 8,
        request_timeout: float = 5.0,
    ) -> None:
        if max_connections < 1 or request_timeout <= 0:
            raise UsageError("metrics server bounds must be positive")
        self.metrics = metrics
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._server: asyncio.Server | None = None
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when ``port`` was 0)."""
        if self._server is None or not self._server.sockets:
            raise UsageError("the metrics server is not running")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        if self._server is not None:
            raise UsageError("the metrics server runs already")
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=self.MAX_HEAD, reuse_address=True
            )
        except OSError as exc:
            raise MetricsError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        log.info("metrics at http://%s:%d/metrics", *self.address)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._active += 1
        try:
            try:
                async with asyncio.timeout(self.request_timeout):
                    if self._active > self.max_connections:
                        await self._respond(writer, 503, b"too many scrapes at once\n")
                    else:
                        await self._handle(reader, writer)
            except TimeoutError:
                log.info("metrics request timed out")
                with contextlib.suppress(ConnectionError):
                    await self._respond(writer, 408, b"request timed out\n")
            except ConnectionError as exc:
                log.debug("metrics connection ended: %s", exc)
            await self._linger(reader, writer)
        except asyncio.CancelledError:
            log.debug("metrics connection cancelled")
            raise
        finally:
            self._active -= 1
            writer.transport.abort()
            if task is not None:
                self._tasks.discard(task)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Close politely: end our side, then read (and drop) what the client still sends
        until it closes, briefly. Closing a TCP socket with unread input sends a reset, which
        can destroy the response before the client has read it."""
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                if writer.can_write_eof():
                    writer.write_eof()
                await writer.drain()
                while await reader.read(READ_CHUNK):
                    pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._respond(writer, 431, b"request head too large\n")
            return
        except asyncio.IncompleteReadError:
            return  # the client went away before finishing its request
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._respond(writer, 400, b"not an HTTP/1.x request line\n")
            return
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        if target.split("?", 1)[0] != "/metrics":
            await self._respond(writer, 404, b"try /metrics\n")
            return
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"GET or HEAD only\n", extra={"Allow": "GET, HEAD"})
            return
        try:
            body, content_type = self.metrics.exposition(headers.get("accept"))
        except Exception:
            log.exception("collecting metrics failed")
            await self._respond(writer, 500, b"collecting metrics failed; see the log\n")
            return
        await self._respond(writer, 200, body, content_type, head_only=method == "HEAD")

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        *,
        head_only: bool = False,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        fields = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Connection": "close",
            **(extra or {}),
        }
        head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in fields.items()
        )
        writer.write(head.encode("latin-1") + b"\r\n" + (b"" if head_only else body))
        await writer.drain()
