"""The control socket: a Unix stream socket where engines, the CLI and monitors talk to the
proxy in the control protocol (:mod:`coloproxy.protocol`, docs/control-protocol.md).

Theory of operation
-------------------
``ControlServer`` owns the socket file and every client connection; the daemon owns the
decisions and plugs them in as a :class:`ControlHandler`. Per connection there are two
tasks: the *reader* (the task asyncio starts for the connection) decodes lines, answers
protocol errors itself, performs the hello, checks what the client's role may send and
awaits the handler for everything else, one message at a time, so replies leave in the
order the requests came; the *writer* drains a bounded queue of encoded lines into the
socket (:class:`~coloproxy.control.connection.Connection`: the queue, the writer and the
close).

Nothing the proxy does waits for a client. :meth:`ControlServer.broadcast` (checkpoint
requests from the packet path) only puts the line on each client's queue; a client whose
queue is full has stopped reading and is dropped on the spot, with the reason logged, so
one stuck monitor can never stall the engine's requests or the packet path (the bound is
``client_queue`` lines plus the transport's 64 KiB write buffer).

Who may connect, and as what: the socket file is private before anyone can connect
(:mod:`coloproxy.control.socket_file`) and each peer's credentials decide the roles it may
claim (:class:`~coloproxy.control.access.AccessPolicy`); a peer that may claim none is
refused ``forbidden`` and disconnected. The role a hello names is only a claim: one the
credentials do not allow is refused ``forbidden`` and the connection closed. The kinds that
lift protection or steer the engine (``NEEDS_ENGINE_CREDENTIALS``) also need engine
credentials, whatever the role, so a member of the control group can read the status and ask
for a checkpoint, never more.

Bounds: ``max_clients`` connections (one more gets ``busy``), of which the last is kept for an
engine (a peer without engine credentials is refused it at connect, a hello of another role
at the hello), so that idle CLIs and monitors can never lock the engine out;
``hello_timeout`` to say hello; ``idle_timeout`` without a byte from a welcomed client (it is
told ``busy`` and closed: an engine keeps its connection with empty lines, see
:class:`~coloproxy.control.client.ControlClient`); ``handler_timeout`` per handled message;
``MAX_MESSAGE_BYTES`` per line (longer ones are answered ``oversized`` and skipped; the
connection stays). A client that pipelines requests faster than it reads the replies is not
read further while its replies fill half its queue (the other half stays free for pushes):
every request gets its reply, in order, and a client that reads none of them for
``idle_timeout`` is disconnected.

Task discipline (qemu.qmp style): the runstate is explicit, every background loop logs why it
ends, ``CancelledError`` is always re-raised, and child tasks are awaited with
``asyncio.wait`` so that a cancellation of the waiter is never mistaken for the child's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from coloproxy import __version__, variant
from coloproxy.control.access import AccessPolicy, PeerCredentials, peer_credentials, resolve_group
from coloproxy.control.connection import READ_CHUNK, Connection
from coloproxy.control.socket_file import SocketFile
from coloproxy.errors import UsageError
from coloproxy.protocol import (
    CLIENT_MAY_SEND,
    NEEDS_ENGINE_CREDENTIALS,
    PUSH_TO,
    Ack,
    ClientRole,
    Decoder,
    ErrorCode,
    ErrorReply,
    Hello,
    Message,
    Mode,
    ProtocolError,
    Push,
    Request,
    Status,
    Welcome,
    choose_version,
    encode,
)
from coloproxy.role import Role

log = logging.getLogger(__name__)

HandlerReply = Ack | Status | ErrorReply


class Runstate(Enum):
    IDLE = "idle"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """One connected client, as the handler sees it."""

    number: int  # connection number, unique for the server's life
    role: ClientRole  # claimed in the hello, and allowed by the credentials
    name: str  # what the client called itself in its hello
    credentials: PeerCredentials
    engine_credentials: bool = False  # root, the proxy's own user or the engine group

    def __str__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"client {self.number} ({self.role}{label}, pid {self.credentials.pid})"


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    """What the welcome tells a client about the proxy."""

    pair: str
    role: Role
    mode: Mode


class ControlHandler(Protocol):
    """What the daemon implements. Every method runs on the event loop.

    ``handle`` gets every message a client is allowed to send after its hello (roles and
    credentials are already checked: see ``CLIENT_MAY_SEND`` and
    ``NEEDS_ENGINE_CREDENTIALS``; what a checkpoint report may release is the handler's to
    check) and returns the reply; the server sets the reply's ``re``. An exception becomes an
    ``internal`` error reply (and is logged); the connection stays.
    ``client_connected``/``client_disconnected`` follow the welcome and the end of a welcomed
    connection; they must not block.
    """

    def identity(self) -> ProxyIdentity: ...

    async def handle(self, client: ClientInfo, message: Request) -> HandlerReply: ...

    def client_connected(self, client: ClientInfo) -> None: ...

    def client_disconnected(self, client: ClientInfo, reason: str) -> None: ...


class _Client(Connection):
    """One client connection: its stream and who the client is (the reader side owns it)."""

    def __init__(
        self,
        number: int,
        writer: asyncio.StreamWriter,
        credentials: PeerCredentials,
        queue_size: int,
    ) -> None:
        super().__init__(writer, queue_size)
        self.number = number
        self.credentials = credentials
        self.info: ClientInfo | None = None  # set by the welcome
        self.version = 0
        self.reader_task: asyncio.Task[None] | None = None

    def __str__(self) -> str:
        if self.info is not None:
            return str(self.info)
        return f"client {self.number} (pid {self.credentials.pid}, uid {self.credentials.uid})"


class ControlServer:
    """Serves the control socket at ``path`` for ``handler``; see the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: ControlHandler,
        group: str | int | None = None,
        *,
        engine_group: str | int | None = None,
        group_role: ClientRole = ClientRole.CLI,
        max_clients: int = 16,
        client_queue: int = 256,
        hello_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        handler_timeout: float = 30.0,
        software: str | None = None,
    ) -> None:
        if client_queue < 1 or hello_timeout <= 0 or handler_timeout <= 0 or idle_timeout < 0:
            raise UsageError("control server bounds must be positive")
        if max_clients < 2:
            raise UsageError("max_clients must be at least 2: the last slot is an engine's")
        if group_role is ClientRole.ENGINE:
            raise UsageError("control.group_role is cli or monitor, not engine")
        self.path = Path(path)
        self.handler = handler
        self.group = group
        self.engine_group = engine_group
        self.group_role = group_role
        self.max_clients = max_clients
        self.client_queue = client_queue
        self.hello_timeout = hello_timeout
        self.idle_timeout = idle_timeout  # 0: never
        self.handler_timeout = handler_timeout
        # The version and the comparator variant (compiled or pure): `coloproxy status`.
        self.software = software or f"coloproxy {__version__}, {variant.describe()}"
        self.runstate = Runstate.IDLE
        # Every error reply sent, by (what it answered, code): "connect", "hello", "idle",
        # "line" (not a readable message) or the kind refused. A metric source.
        self.refusals: Counter[tuple[str, str]] = Counter()
        self._server: asyncio.Server | None = None
        self._file = SocketFile(self.path)
        self._connections: dict[int, _Client] = {}
        self._numbers = 0
        self._policy = AccessPolicy(os.geteuid(), group_role=group_role)
        # Replies may fill half the queue; the rest is kept for pushes (checkpoint requests).
        self._reply_room = max(1, client_queue // 2)

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self.runstate is not Runstate.IDLE:
            raise UsageError(f"control server cannot start in state {self.runstate.value}")
        self._policy = dataclasses.replace(
            self._policy,
            group=resolve_group(self.group),
            engine_group=resolve_group(self.engine_group),
        )
        # Whoever is not root or us opens the file through its group: the control group, or
        # the engine group when that is the only one (docs/configuration.md).
        file_group = self._policy.group
        if file_group is None:
            file_group = self._policy.engine_group
        listener = self._file.listen(file_group, self.max_clients)
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=listener)
        except BaseException:
            listener.close()
            self._file.remove()
            raise
        self.runstate = Runstate.RUNNING
        log.info("control socket listening at %s", self.path)

    async def close(self) -> None:
        """Stop listening, disconnect every client, remove the socket file. Idempotent."""
        if self.runstate in (Runstate.CLOSING, Runstate.CLOSED):
            return
        self.runstate = Runstate.CLOSING
        if self._server is not None:
            self._server.close()
        self._file.remove()
        tasks = []
        for connection in list(self._connections.values()):
            connection.disconnect("the proxy is shutting down", abort=True)
            if connection.reader_task is not None:
                tasks.append(connection.reader_task)
        if tasks:
            # Readers end at their next read; one inside the handler gets handler_timeout.
            _, late = await asyncio.wait(tasks, timeout=self.handler_timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._server is not None:
            await self._server.wait_closed()
        self.runstate = Runstate.CLOSED
        log.info("control socket %s closed", self.path)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- sending ---------------------------------------------------------------------------

    def clients(self) -> list[ClientInfo]:
        """Welcomed clients, in connection order."""
        return [c.info for c in self._connections.values() if c.info is not None]

    def broadcast(self, message: Push, to_roles: Collection[str] | None = None) -> int:
        """Queue ``message`` for every welcomed client of the given roles (default: who
        receives that kind, i.e. engines) and return how many got it. Never waits: a client
        whose queue is full is dropped."""
        roles = PUSH_TO[message.kind] if to_roles is None else frozenset(to_roles)
        lines: dict[int, bytes] = {}
        sent = 0
        for connection in list(self._connections.values()):
            info = connection.info
            if info is None or info.role not in roles or connection.close_reason is not None:
                continue
            line = lines.get(connection.version)
            if line is None:
                line = lines[connection.version] = encode(message, connection.version)
            if connection.enqueue(line):
                sent += 1
        return sent

    def send(self, client: ClientInfo | int, message: Push) -> bool:
        """Queue a push for one welcomed client (e.g. the outstanding checkpoint request for
        an engine that just connected). False when it is gone or was dropped."""
        number = client if isinstance(client, int) else client.number
        connection = self._connections.get(number)
        if connection is None or connection.info is None:
            return False
        return connection.enqueue(encode(message, connection.version))

    def _reply(self, connection: _Client, message: Message) -> None:
        connection.enqueue(encode(message, connection.version or 1))

    def _refuse(self, connection: _Client, what: str, error: ErrorReply) -> None:
        """Send an error reply and count it (``what``: see ``refusals``)."""
        self.refusals[what, error.code.value] += 1
        self._reply(connection, error)

    def _close_refused(
        self,
        connection: _Client,
        what: str,
        error: ErrorReply,
        reason: str,
        *,
        level: int = logging.INFO,
    ) -> None:
        """Send an error reply, count it, and close the connection politely after it."""
        self._refuse(connection, what, error)
        connection.disconnect(reason, level=level)

    def _live(self) -> list[_Client]:
        """Connections that hold a slot: every one not being closed."""
        return [c for c in self._connections.values() if c.close_reason is None]

    def _slots_taken_by_others(self) -> int:
        """Slots held by connections that are not welcomed engines (the one asking included)."""
        return sum(
            1 for c in self._live() if c.info is None or c.info.role is not ClientRole.ENGINE
        )

    def _engine_slot_refusal(self) -> str | None:
        """Why a connection that is not an engine's may not hold a slot, or None when it may:
        the last of ``max_clients`` slots is an engine's."""
        if self._slots_taken_by_others() < self.max_clients:
            return None
        return f"the last of {self.max_clients} slots is kept for an engine"

    # -- one connection --------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._numbers += 1
        try:
            credentials = peer_credentials(writer.get_extra_info("socket"))
        except OSError as exc:
            log.warning("control client %d: cannot read its credentials: %s", self._numbers, exc)
            writer.transport.abort()
            return
        connection = _Client(self._numbers, writer, credentials, self.client_queue)
        connection.reader_task = asyncio.current_task()
        self._connections[connection.number] = connection
        connection.start_writer(f"control-writer-{connection.number}")
        log.debug("control %s connected", connection)
        try:
            await self._read_loop(connection, reader)
            await connection.linger(reader)
        except asyncio.CancelledError:
            if connection.close_reason is None:
                connection.close_reason = "cancelled"
            log.debug("control %s reader cancelled: %s", connection, connection.close_reason)
            raise
        except ConnectionError as exc:
            connection.disconnect(f"connection error: {exc}", abort=True, level=logging.WARNING)
        finally:
            await self._finish(connection)

    async def _read_loop(self, connection: _Client, reader: asyncio.StreamReader) -> None:
        policy = self._policy
        refused = policy.refusal(connection.credentials)
        if refused is not None:
            self._close_refused(
                connection,
                "connect",
                ErrorReply(ErrorCode.FORBIDDEN, f"not allowed: {refused}"),
                f"refused: {refused}",
                level=logging.WARNING,
            )
            return
        why = None
        if self.runstate is not Runstate.RUNNING:
            why = "the proxy is shutting down"
        elif len(self._live()) > self.max_clients:
            why = f"{self.max_clients} clients are connected already"
        elif not policy.engine_credentials(connection.credentials):
            # It can never be the engine: it may not take the engine's slot even for the
            # time it has to say hello.
            why = self._engine_slot_refusal()
        if why is not None:
            self._close_refused(
                connection, "connect", ErrorReply(ErrorCode.BUSY, why), f"refused: {why}"
            )
            return
        decoder = Decoder()
        loop = asyncio.get_running_loop()
        hello_deadline = loop.time() + self.hello_timeout
        while not connection.closing():
            try:
                async with asyncio.timeout_at(self._read_deadline(connection, hello_deadline)):
                    data = await reader.read(READ_CHUNK)
            except TimeoutError:
                self._timed_out(connection)
                return
            if not data:
                for error in decoder.close():
                    log.info("control %s: %s", connection, error.detail)
                connection.disconnect("it closed the connection")
                return
            for item in decoder.feed(data):
                if not await connection.wait_for_room(
                    self._reply_room, self._read_deadline(connection, hello_deadline)
                ):
                    return
                await self._dispatch(connection, item)
                if connection.closing():
                    return

    def _read_deadline(self, connection: _Client, hello_deadline: float) -> float | None:
        """By when (loop time) the client must send something: its hello, or any line."""
        if connection.info is None:
            return hello_deadline
        if not self.idle_timeout:
            return None
        return asyncio.get_running_loop().time() + self.idle_timeout

    def _timed_out(self, connection: _Client) -> None:
        if connection.info is None:
            why = f"no hello within {self.hello_timeout} s"
            self._close_refused(connection, "hello", ErrorReply(ErrorCode.HELLO_REQUIRED, why), why)
            return
        idle = f"{self.idle_timeout:g} s"
        self._close_refused(
            connection,
            "idle",
            ErrorReply(
                ErrorCode.BUSY,
                f"nothing received for {idle}: closed to free the slot (an empty line keeps a"
                " connection open)",
            ),
            f"idle for {idle}",
        )

    async def _dispatch(self, connection: _Client, item: Message | ProtocolError) -> None:
        if isinstance(item, ProtocolError):
            log.info("control %s sent a bad line: %s: %s", connection, item.code, item.detail)
            self._refuse(connection, "line", ErrorReply(item.code, item.detail, item.re))
            return
        info = connection.info
        if type(item) is Hello:
            if info is not None:
                self._refuse(
                    connection, "hello", ErrorReply(ErrorCode.UNEXPECTED, "hello again", item.id)
                )
            else:
                self._welcome(connection, item)
            return
        message_id = item.id if isinstance(item, Request) else None
        if info is None:
            self._refuse(
                connection,
                item.kind,
                ErrorReply(ErrorCode.HELLO_REQUIRED, "say hello first", message_id),
            )
            return
        if not isinstance(item, Request):  # a reply or a checkpoint request: the proxy's kinds
            self._refuse(
                connection,
                item.kind,
                ErrorReply(
                    ErrorCode.UNEXPECTED, f"{item.kind} is sent by the proxy, not to it", None
                ),
            )
            return
        if item.kind not in CLIENT_MAY_SEND[info.role]:
            self._refuse(
                connection,
                item.kind,
                ErrorReply(
                    ErrorCode.FORBIDDEN,
                    f"a client of role {info.role} may not send {item.kind}",
                    message_id,
                ),
            )
            return
        if item.kind in NEEDS_ENGINE_CREDENTIALS and not info.engine_credentials:
            log.warning(
                "control %s sent %s without engine credentials: refused", connection, item.kind
            )
            self._refuse(
                connection,
                item.kind,
                ErrorReply(
                    ErrorCode.FORBIDDEN,
                    f"{item.kind} needs engine credentials (root, the proxy's own user or a"
                    f" member of control.engine_group); uid {info.credentials.uid} has none",
                    message_id,
                ),
            )
            return
        reply = await self._call_handler(info, item)
        if isinstance(reply, ErrorReply):
            self.refusals[item.kind, reply.code.value] += 1
        self._reply(connection, dataclasses.replace(reply, re=item.id))

    def _welcome(self, connection: _Client, hello: Hello) -> None:
        credentials = connection.credentials
        claim = self._policy.claim_refusal(credentials, hello.role)
        if claim is not None:
            self._close_refused(
                connection,
                "hello",
                ErrorReply(ErrorCode.FORBIDDEN, claim, hello.id),
                f"refused: {claim}",
                level=logging.WARNING,
            )
            return
        why = None if hello.role is ClientRole.ENGINE else self._engine_slot_refusal()
        if why is not None:
            self._close_refused(
                connection, "hello", ErrorReply(ErrorCode.BUSY, why, hello.id), f"refused: {why}"
            )
            return
        version = choose_version(hello.versions)
        if version is None:
            offered = ", ".join(str(v) for v in hello.versions)
            self._close_refused(
                connection,
                "hello",
                ErrorReply(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"no common version: client speaks {offered}, proxy speaks 1",
                    hello.id,
                ),
                f"no common protocol version (it speaks {offered})",
            )
            return
        identity = self.handler.identity()
        connection.version = version
        connection.info = ClientInfo(
            connection.number,
            hello.role,
            hello.client[:80],
            credentials,
            self._policy.engine_credentials(credentials),
        )
        self._reply(
            connection,
            Welcome(
                version=version,
                pair=identity.pair,
                role=identity.role,
                mode=identity.mode,
                software=self.software,
                idle_timeout=self.idle_timeout,
                re=hello.id,
            ),
        )
        log.info("control %s said hello (protocol v%d)", connection, version)
        try:
            self.handler.client_connected(connection.info)
        except Exception:
            log.exception("control handler failed on the connection of %s", connection)

    async def _call_handler(self, info: ClientInfo, request: Request) -> HandlerReply:
        try:
            async with asyncio.timeout(self.handler_timeout):
                reply: object = await self.handler.handle(info, request)
        except TimeoutError:
            log.error(
                "control handler took over %s s on %s from %s",
                self.handler_timeout,
                request.kind,
                info,
            )
            return ErrorReply(ErrorCode.INTERNAL, f"no answer within {self.handler_timeout} s")
        except Exception as exc:
            log.exception("control handler failed on %s from %s", request.kind, info)
            return ErrorReply(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if not isinstance(reply, Ack | Status | ErrorReply):
            log.error("control handler answered %s with %r", request.kind, reply)
            return ErrorReply(ErrorCode.INTERNAL, "the proxy gave no valid answer")
        return reply

    async def _finish(self, connection: _Client) -> None:
        """The reader's last act: end the writer, forget the connection, tell the handler."""
        reason = await connection.end_writer()
        self._connections.pop(connection.number, None)
        if connection.info is not None:
            try:
                self.handler.client_disconnected(connection.info, reason)
            except Exception:
                log.exception("control handler failed on the disconnection of %s", connection)
