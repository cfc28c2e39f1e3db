"""A leader key holder or contender against a real etcd, for tests/test_quorum_etcd.py: the
engine's own LeaderKey core and EtcdStore, driven by a loop like the engine's, printing one
JSON line per event with time.monotonic() (comparable across the lab's namespaces: one
machine, one clock).

    python3 tests/quorum_probe.py NAME ENDPOINT[,ENDPOINT...] PREFIX
stdin: "hand-over", "quit"; stdout: {"event": ..., "t": ...}
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from typing import Any

from coloproxy.engine.leader import (
    Acquire,
    Fenced,
    KeyLost,
    LeaderConfig,
    LeaderKey,
    Refused,
    Release,
    Renew,
    Unfenced,
    Won,
)
from coloproxy.engine.quorum import EtcdSettings, EtcdStore, QuorumError


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


async def main(name: str, endpoints: str, prefix: str) -> None:
    store = EtcdStore(EtcdSettings(tuple(endpoints.split(",")), prefix, "probe"))
    key = LeaderKey(LeaderConfig())
    wake = asyncio.Event()
    calls: set[asyncio.Future[None]] = set()

    def call(coroutine: Coroutine[Any, Any, None]) -> None:
        future = asyncio.ensure_future(coroutine)
        calls.add(future)
        future.add_done_callback(calls.discard)

    def act(actions: list[object]) -> None:
        for action in actions:
            if isinstance(action, Acquire):
                call(acquire())
            elif isinstance(action, Renew):
                call(renew(action.lease))
            elif isinstance(action, Release):
                call(store.release(action.lease, action.revision))
            elif isinstance(action, Won):
                say("won", deadline=action.deadline)
            elif isinstance(action, Fenced):
                say("fenced", deadline=key.deadline)
            elif isinstance(action, Unfenced):
                say("unfenced", deadline=action.deadline)
            elif isinstance(action, KeyLost):
                say("lost", reason=action.reason)
            elif isinstance(action, Refused):
                say("refused", reason=action.reason)
        wake.set()

    async def acquire() -> None:
        sent = time.monotonic()
        try:
            outcome = await store.acquire(1.0, name, False)
        except QuorumError:
            act(key.not_acquired(time.monotonic()))
            return
        if outcome.grant is None:
            act(key.not_acquired(time.monotonic(), outcome.alone))
        else:
            grant = outcome.grant
            act(key.acquired(grant.lease, grant.ttl, grant.revision, sent))

    async def renew(lease: int) -> None:
        sent = time.monotonic()
        try:
            ttl = await store.renew(lease)
        except QuorumError:
            act(key.renew_failed(time.monotonic()))
            return
        act(key.renewed(sent, ttl, time.monotonic()))

    async def commands() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"hand-over":
                act(key.hand_over(time.monotonic()))
            elif line.strip() == b"quit":
                break

    act(key.contend(time.monotonic()))
    say("started")
    task = asyncio.ensure_future(commands())
    while not task.done():
        due = key.get_timer()
        wake.clear()
        delay = 0.5 if due is None else max(0.0, due - time.monotonic())
        try:
            await asyncio.wait_for(wake.wait(), delay)
        except TimeoutError:
            act(key.handle_timer(time.monotonic()))
    await store.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
