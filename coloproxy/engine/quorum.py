"""The quorum service the leader key lives in (shell): a small interface and its etcd adapter.

Theory of operation
-------------------
:class:`LeaderStore` is all the engine needs from a quorum service; the decisions are
:mod:`coloproxy.engine.leader`'s. Another service (Consul, ZooKeeper, a pacemaker
resource agent) is another class with these five coroutines.

:class:`EtcdStore` speaks etcd's v3 gRPC API with the stubs of the ``aetcd`` package over a
``grpc.aio`` channel of its own (``aetcd.Client`` has no TLS and a single endpoint). Keys, under
``prefix``: ``<prefix>/<pair>/leader`` (the leader key, attached to the holder's lease, its
value naming the holder) and ``<prefix>/<pair>/alone`` (no lease: the primary runs
unprotected, the secondary must not take over). Many pairs can share one cluster.

- ``acquire``: a linearizable read of the leader key first (held: no lease is granted for
  nothing), then ``LeaseGrant`` and one transaction: *if* the leader key does not exist
  (``create_revision == 0``) and the alone mark does not (``version == 0``) *then* put the
  leader key with the lease, *else* read the alone mark. A lost transaction revokes its lease.
- ``renew``: one ``LeaseKeepAlive`` request on the channel's one long-lived keep-alive stream
  (opened at the first renewal, again after any failure); the answer's TTL (0: the lease is
  gone). At most one request is ever outstanding on a stream, and a renewal that fails or
  times out closes the stream, so a reply is always the answer to the request the caller
  timed (its send time is what the deadline is measured from: a late answer to an older
  request must never count for a newer one). A new gRPC stream per renewal cost about
  twice the CPU (docs/benchmarks.md, section 4).
- ``release`` and ``mark``: transactions that compare the leader key's ``mod_revision`` with
  the holder's: an old holder's writes fail once another host won the key.

Every call has its own deadline (``timeout``); a call that fails or times out moves to the
next endpoint for the next call (a member cut off from the others answers nothing useful,
and another may be reachable). Failures are :class:`QuorumError`; the caller's deadline
logic, not the error, decides what it means. TLS with client certificates, and etcd's own
users (``Authenticate``, then the token in every call's metadata; a refused token is fetched
again) come from the config.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from coloproxy.errors import ColoproxyError

log = logging.getLogger(__name__)


class QuorumError(ColoproxyError):
    """The quorum service did not answer, or refused."""


@dataclass(frozen=True, slots=True)
class Grant:
    lease: int
    ttl: float  # seconds granted
    revision: int  # the leader key's mod_revision after our put


@dataclass(frozen=True, slots=True)
class Outcome:
    """An acquire's result: ``grant`` when won; ``alone`` when refused for good."""

    grant: Grant | None
    alone: bool = False


class LeaderStore(Protocol):
    async def acquire(self, ttl: float, holder: str, unless_alone: bool) -> Outcome: ...

    async def renew(self, lease: int) -> float: ...

    async def release(self, lease: int, revision: int) -> None: ...

    async def mark(self, alone: bool, revision: int) -> bool: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    endpoints: tuple[str, ...]  # host:port
    prefix: str
    pair: str
    timeout: float = 0.25  # one call
    ca_file: Path | None = None  # TLS when set
    cert_file: Path | None = None  # client certificate (with key_file)
    key_file: Path | None = None
    user: str | None = None  # etcd's own authentication (with password)
    password: str | None = None


class EtcdStore:
    """:class:`LeaderStore` on etcd v3 (see the module docstring)."""

    def __init__(self, settings: EtcdSettings) -> None:
        from aetcd import rpc  # the gRPC stubs; imported here so that only an engine needs them

        self._rpc: Any = rpc
        self.settings = settings
        base = settings.prefix.rstrip("/") + "/" + settings.pair
        self.leader_key = (base + "/leader").encode()
        self.alone_key = (base + "/alone").encode()
        self._index = 0
        self._channel: Any = None
        self._stubs: tuple[Any, Any] | None = None  # KV, Lease
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._keepalive: Any = None  # the channel's keep-alive stream (a grpc.aio call)
        self._credentials: Any = None
        if settings.ca_file is not None:
            import grpc

            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=settings.ca_file.read_bytes(),
                private_key=settings.key_file.read_bytes() if settings.key_file else None,
                certificate_chain=settings.cert_file.read_bytes() if settings.cert_file else None,
            )

    @property
    def endpoint(self) -> str:
        return self.settings.endpoints[self._index]

    # -- connection ------------------------------------------------------------------------

    async def _connect(self) -> tuple[Any, Any]:
        if self._stubs is not None:
            return self._stubs
        rpc = self._rpc
        target = self.endpoint
        if self._credentials is not None:
            self._channel = rpc.secure_channel(target, self._credentials)
        else:
            self._channel = rpc.insecure_channel(target)
        if self.settings.user is not None:
            auth = rpc.AuthStub(self._channel)
            reply = await auth.Authenticate(
                rpc.AuthenticateRequest(name=self.settings.user, password=self.settings.password),
                timeout=self.settings.timeout,
            )
            self._metadata = (("token", reply.token),)
        self._stubs = (rpc.KVStub(self._channel), rpc.LeaseStub(self._channel))
        return self._stubs

    async def _drop(self) -> None:
        """Forget the channel and move to the next endpoint."""
        self._end_keepalive()
        channel, self._channel, self._stubs, self._metadata = self._channel, None, None, None
        self._index = (self._index + 1) % len(self.settings.endpoints)
        if channel is not None:
            await channel.close(grace=None)

    async def _call(self, what: str, call: Any) -> Any:
        """``call(kv, lease, metadata)`` with the deadline; errors become QuorumError."""
        rpc = self._rpc
        endpoint = self.endpoint
        try:
            async with asyncio.timeout(self.settings.timeout):
                kv, lease = await self._connect()
                return await call(kv, lease, self._metadata)
        except TimeoutError as exc:
            await self._drop()
            raise QuorumError(f"etcd {endpoint}: {what}: no answer in time") from exc
        except rpc.AioRpcError as exc:
            await self._drop()
            raise QuorumError(
                f"etcd {endpoint}: {what}: {exc.code().name} {exc.details()}"
            ) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task is being cancelled: not the call's failure
            # grpc.aio raises CancelledError from a call that another task cancelled: another
            # call's failure dropped the connection under this one. Not an answer, a failure
            # (a bare CancelledError would leave the engine waiting for it for ever).
            raise QuorumError(
                f"etcd {endpoint}: {what}: the connection was dropped (another call failed)"
            ) from None

    def _end_keepalive(self) -> None:
        stream, self._keepalive = self._keepalive, None
        if stream is not None:
            stream.cancel()

    async def close(self) -> None:
        self._end_keepalive()
        channel, self._channel, self._stubs = self._channel, None, None
        if channel is not None:
            await channel.close(grace=None)

    # -- LeaderStore -----------------------------------------------------------------------

    async def acquire(self, ttl: float, holder: str, unless_alone: bool) -> Outcome:
        """Win the key for ``holder`` with a fresh lease of ``ttl`` s; ``unless_alone``
        (a secondary): never while the pair is marked alone."""
        rpc = self._rpc
        timeout = self.settings.timeout

        async def held(kv: Any, _lease: Any, metadata: Any) -> bool:
            reply = await kv.Range(
                rpc.RangeRequest(key=self.leader_key, count_only=True),
                timeout=timeout,
                metadata=metadata,
            )
            return bool(reply.count)

        if await self._call("read the leader key", held):
            return Outcome(None)

        async def grant(_kv: Any, lease: Any, metadata: Any) -> Any:
            return await lease.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=max(1, round(ttl))), timeout=timeout, metadata=metadata
            )

        granted = await self._call("grant a lease", grant)
        if granted.error:
            raise QuorumError(f"etcd {self.endpoint}: lease grant: {granted.error}")

        async def transaction(kv: Any, _lease: Any, metadata: Any) -> Any:
            compare = [
                rpc.Compare(
                    key=self.leader_key,
                    target=rpc.Compare.CREATE,
                    result=rpc.Compare.EQUAL,
                    create_revision=0,
                ),
            ]
            if unless_alone:
                compare.append(
                    rpc.Compare(
                        key=self.alone_key,
                        target=rpc.Compare.VERSION,
                        result=rpc.Compare.EQUAL,
                        version=0,
                    )
                )
            success = [
                rpc.RequestOp(
                    request_put=rpc.PutRequest(
                        key=self.leader_key, value=holder.encode(), lease=granted.ID
                    )
                )
            ]
            failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=self.alone_key))]
            return await kv.Txn(
                rpc.TxnRequest(compare=compare, success=success, failure=failure),
                timeout=timeout,
                metadata=metadata,
            )

        try:
            reply = await self._call("write the leader key", transaction)
        except QuorumError:
            await self._revoke(granted.ID)
            raise
        if reply.succeeded:
            return Outcome(Grant(granted.ID, float(granted.TTL), reply.header.revision))
        await self._revoke(granted.ID)
        alone = unless_alone and bool(reply.responses and reply.responses[0].response_range.kvs)
        return Outcome(None, alone=alone)

    async def _revoke(self, lease: int) -> None:
        rpc = self._rpc

        async def revoke(_kv: Any, stub: Any, metadata: Any) -> None:
            await stub.LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease), timeout=self.settings.timeout, metadata=metadata
            )

        try:
            await self._call("revoke a lease", revoke)
        except QuorumError as exc:  # it expires by itself within its TTL
            log.debug("%s", exc)

    async def renew(self, lease: int) -> float:
        import grpc.aio

        rpc = self._rpc

        async def keep_alive(_kv: Any, stub: Any, metadata: Any) -> float:
            stream = self._keepalive
            if stream is None or stream.done():
                # No deadline on the stream itself: each renewal has its own (``_call``).
                stream = self._keepalive = stub.LeaseKeepAlive(metadata=metadata)
            await stream.write(rpc.LeaseKeepAliveRequest(ID=lease))
            reply = await stream.read()
            if reply is grpc.aio.EOF:
                raise QuorumError(f"etcd {self.endpoint}: keep-alive: the stream ended unanswered")
            if lease != reply.ID:  # never count another request's answer
                raise QuorumError(f"etcd {self.endpoint}: keep-alive: answer for lease {reply.ID}")
            return float(reply.TTL)

        try:
            result: float = await self._call("renew the lease", keep_alive)
        except BaseException:
            self._end_keepalive()  # no late answer may meet the next request
            raise
        return result

    async def release(self, lease: int, revision: int) -> None:
        rpc = self._rpc

        async def delete(kv: Any, _lease: Any, metadata: Any) -> None:
            await kv.Txn(
                rpc.TxnRequest(
                    compare=[self._ours(revision)],
                    success=[
                        rpc.RequestOp(
                            request_delete_range=rpc.DeleteRangeRequest(key=self.leader_key)
                        )
                    ],
                ),
                timeout=self.settings.timeout,
                metadata=metadata,
            )

        try:
            await self._call("delete the leader key", delete)
        finally:
            await self._revoke(lease)

    async def mark(self, alone: bool, revision: int) -> bool:
        rpc = self._rpc
        if alone:
            op = rpc.RequestOp(request_put=rpc.PutRequest(key=self.alone_key, value=b"alone"))
        else:
            op = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self.alone_key))

        async def write(kv: Any, _lease: Any, metadata: Any) -> bool:
            reply = await kv.Txn(
                rpc.TxnRequest(compare=[self._ours(revision)], success=[op]),
                timeout=self.settings.timeout,
                metadata=metadata,
            )
            return bool(reply.succeeded)

        result: bool = await self._call("write the alone mark", write)
        return result

    def _ours(self, revision: int) -> Any:
        rpc = self._rpc
        return rpc.Compare(
            key=self.leader_key,
            target=rpc.Compare.MOD,
            result=rpc.Compare.EQUAL,
            mod_revision=revision,
        )


__all__ = ["EtcdSettings", "EtcdStore", "Grant", "LeaderStore", "Outcome", "QuorumError"]
