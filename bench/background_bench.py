#!/usr/bin/env python3
"""The daemons' background work, piece by piece, in a loop: the leader key's renewal, the
lease gate's kernel updates, the heartbeats' seal and open. CPU per operation (process CPU
clock: gRPC's own threads included), old way and new way alternately in the same run,
median of ``--rounds`` rounds.

- ``renew``: against a one-member etcd this script starts on loopback (needs etcd-server):
  a new keep-alive stream per renewal (the code before 2026-12-06) vs ``EtcdStore.renew``
  (one long-lived stream), each renewal followed by a 5 ms pause like a paced daemon.
- ``gate``: in a network namespace of its own (needs root and libnftables): ``open_for`` at
  every renewal (before) vs ``LeaseGate.hold_until`` (renewals every 100 ms of a simulated
  clock, TTL 1 s, margin 250 ms): CPU per *renewal*, and kernel updates per renewal.
- ``heartbeat``: ``seal_heartbeat`` and ``open_heartbeat`` (JSON body, HMAC-SHA256), and
  their parts: the JSON encode, the HMAC, the JSON decode.

    python3 bench/background_bench.py [--rounds 5] [--only renew,gate,heartbeat]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coloproxy.engine.heartbeat import (  # noqa: E402
    ColoMode,
    Heartbeat,
    QemuState,
    decode_heartbeat,
    open_heartbeat,
    seal_heartbeat,
)
from coloproxy.role import Role  # noqa: E402


def _cpu_per(operation: Callable[[], None], count: int) -> float:
    start = time.process_time()
    for _ in range(count):
        operation()
    return (time.process_time() - start) / count


def _report(name: str, rounds: dict[str, list[float]], unit: float = 1e6) -> None:
    for side, figures in rounds.items():
        print(
            f"  {name} {side:28} median {statistics.median(figures) * unit:8.1f} us"
            f" (spread {min(figures) * unit:.1f}-{max(figures) * unit:.1f})"
        )


# -- heartbeats -------------------------------------------------------------------------------


def heartbeat(rounds: int) -> None:
    key = os.urandom(32)
    beat = Heartbeat(
        pair="web1", role=Role.PRIMARY, boot=1765000000000000, sequence=123456,
        qemu=QemuState.RUNNING, colo=ColoMode.PRIMARY, ready=True, serving=True,
    )  # fmt: skip
    sealed = seal_heartbeat(beat, key)
    body = beat.encode()
    import hashlib
    import hmac

    parts: dict[str, Callable[[], object]] = {
        "seal (encode + HMAC)": lambda: seal_heartbeat(beat, key),
        "open (HMAC + decode)": lambda: open_heartbeat(sealed, key),
        "- JSON encode": beat.encode,
        "- HMAC-SHA256 of the body": lambda: hmac.new(key, body, hashlib.sha256).digest(),
        "- JSON decode and checks": lambda: decode_heartbeat(body),
    }
    results: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(rounds):
        for name, part in parts.items():
            results[name].append(_cpu_per(lambda part=part: part(), 20000))  # type: ignore[misc]
    print(f"heartbeat ({len(sealed)} bytes sealed):")
    _report("", results)


# -- the lease gate ---------------------------------------------------------------------------


def gate(rounds: int) -> None:
    if os.geteuid() != 0:
        print("gate: skipped (needs root: a network namespace of its own)")
        return
    from coloproxy.net import netns
    from coloproxy.net.leasegate import LeaseGate

    name = f"cpbg{os.getpid() % 10000}"
    netns.create(name)
    try:

        def body() -> dict[str, list[float]]:
            results: dict[str, list[float]] = {"every renewal (open_for)": [], "hold_until": []}
            updates: list[float] = []
            lease = LeaseGate("bg", "guest0")
            lease.install()
            renewals = 200
            for _ in range(rounds):
                results["every renewal (open_for)"].append(
                    _cpu_per(lambda: lease.open_for(0.74), renewals)
                )
                lease.install()

                def hold(clock: list[float] = [0.0]) -> None:  # noqa: B006 (the clock)
                    clock[0] += 0.1
                    lease.hold_until(clock[0] - 0.002 + 0.75, clock[0])

                before = lease.updates
                results["hold_until"].append(_cpu_per(hold, renewals))
                updates.append((lease.updates - before) / renewals)
            lease.remove()
            print(f"  hold_until: {statistics.median(updates):.2f} kernel updates per renewal")
            return results

        results = netns.run_in(name, body)
    finally:
        netns.delete(name)
    print("lease gate, CPU per renewal (renewals every 100 ms, TTL 1 s, margin 250 ms):")
    _report("", results)


# -- the key's renewal ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _renew_old(store: Any, lease: int) -> float:
    """The renewal before 2026-12-06: a new LeaseKeepAlive stream each time."""
    rpc = store._rpc

    async def keep_alive(_kv: Any, stub: Any, metadata: Any) -> float:
        stream = stub.LeaseKeepAlive(
            iter([rpc.LeaseKeepAliveRequest(ID=lease)]),
            timeout=store.settings.timeout,
            metadata=metadata,
        )
        try:
            async for reply in stream:
                return float(reply.TTL)
        finally:
            stream.cancel()
        raise RuntimeError("unanswered")

    result: float = await store._call("renew the lease", keep_alive)
    return result


async def _paced(client: int, rounds: int, seconds: float = 8.0) -> dict[str, list[float]]:
    """Like a daemon: a renewal every 100 ms for ``seconds``, a fresh store each side, the
    process CPU per second less that of the same loop without renewals (per renewal)."""
    from coloproxy.engine.quorum import EtcdSettings, EtcdStore

    async def side(kind: str) -> tuple[float, int]:
        store = EtcdStore(EtcdSettings((f"127.0.0.1:{client}",), "/bg", "p", timeout=1.0))
        outcome = await store.acquire(10.0, "bench", unless_alone=False)
        assert outcome.grant is not None
        lease = outcome.grant.lease
        await store.renew(lease)
        start, count, end = time.process_time(), 0, time.monotonic() + seconds
        while time.monotonic() < end:
            if kind == "old":
                await _renew_old(store, lease)
            elif kind == "new":
                await store.renew(lease)
            count += 1
            await asyncio.sleep(0.1)
        used = time.process_time() - start
        await store.release(lease, outcome.grant.revision)
        await store.close()
        return used, count

    results: dict[str, list[float]] = {
        "paced 10/s, new stream each": [],
        "paced 10/s, one stream": [],
    }
    for _ in range(rounds):
        idle, count = await side("none")
        for kind, label in (("old", "paced 10/s, new stream each"),
                            ("new", "paced 10/s, one stream")):  # fmt: skip
            used, count = await side(kind)
            results[label].append((used - idle) / count)
    return results


def renew(rounds: int) -> None:
    if shutil.which("etcd") is None:
        print("renew: skipped (etcd-server is not installed)")
        return
    from coloproxy.engine.quorum import EtcdSettings, EtcdStore

    client, peer = _free_port(), _free_port()
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    data = Path(tempfile.mkdtemp(prefix="coloproxy-bg-etcd-"))
    member = subprocess.Popen(
        ["etcd", "--name", "m", "--data-dir", str(data / "data"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
         "--initial-cluster", f"m={peer_url}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as reply:
                    if b'"true"' in reply.read():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("etcd did not come up")
            time.sleep(0.1)

        async def main() -> dict[str, list[float]]:
            store = EtcdStore(EtcdSettings((f"127.0.0.1:{client}",), "/bg", "b", timeout=1.0))
            outcome = await store.acquire(10.0, "bench", unless_alone=False)
            assert outcome.grant is not None
            lease = outcome.grant.lease
            sides = {
                "new stream per renewal": lambda: _renew_old(store, lease),
                "one keep-alive stream": lambda: store.renew(lease),
            }
            results: dict[str, list[float]] = {side: [] for side in sides}
            count = 200
            for _ in range(rounds):
                for side, call in sides.items():
                    await call()  # warm
                    start = time.process_time()
                    for _ in range(count):
                        assert await call() > 0
                        await asyncio.sleep(0.005)
                    results[side].append((time.process_time() - start) / count)
            idle = time.process_time()
            for _ in range(count):
                await asyncio.sleep(0.005)
            idle = (time.process_time() - idle) / count
            print(f"  (the 5 ms pause alone: {idle * 1e6:.1f} us of CPU, subtracted)")
            await store.release(lease, outcome.grant.revision)
            await store.close()
            back_to_back = {side: [x - idle for x in xs] for side, xs in results.items()}
            paced = await _paced(client, rounds)
            return {**back_to_back, **paced}

        results = asyncio.run(main())
    finally:
        member.kill()
        member.wait(10)
        shutil.rmtree(data, ignore_errors=True)
    print("leader key renewal, CPU per renewal (client process, gRPC threads included):")
    _report("", results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="renew,gate,heartbeat")
    args = parser.parse_args()
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, load {os.getloadavg()}")
    print(f"command: python3 bench/background_bench.py --rounds {args.rounds} --only {args.only}")
    parts = {"renew": renew, "gate": gate, "heartbeat": heartbeat}
    for name in args.only.split(","):
        parts[name](args.rounds)
    print(f"load at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
