"""The leader key's renewals on one long-lived keep-alive stream (coloproxy.engine.quorum
EtcdStore.renew) against a real one-member etcd on loopback: one stream for many renewals
(counted by etcd's own metrics), a new one after a renewal that timed out (its late answer
must never count for the next request), after etcd restarted, and a revoked lease reads 0."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coloproxy.engine.quorum import EtcdSettings, EtcdStore, QuorumError
from coloproxy.lab import etcd


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Member:
    data: Path
    client: int
    peer: int
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        url, peer = f"http://127.0.0.1:{self.client}", f"http://127.0.0.1:{self.peer}"
        with (self.data.parent / "etcd.log").open("ab") as log:
            self.process = subprocess.Popen(
                [etcd.etcd_binary(), "--name", "m", "--data-dir", str(self.data),
                 "--listen-client-urls", url, "--advertise-client-urls", url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"m={peer}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as reply:
                    if b'"true"' in reply.read():
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "etcd did not come up"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def keepalive_streams(self) -> int:
        """Keep-alive streams etcd has seen opened (its gRPC server metrics)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.client}/metrics", timeout=2) as r:
            text = r.read().decode()
        found = re.search(
            r'grpc_server_started_total\{grpc_method="LeaseKeepAlive",[^}]*\} (\d+)', text
        )
        return int(found.group(1)) if found else 0


@pytest.fixture
def member(tmp_path: Path) -> Iterator[Member]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd-server is not installed (scripts/setup)")
    one = Member(tmp_path / "data", _free_port(), _free_port())
    one.start()
    try:
        yield one
    finally:
        one.stop()


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of ``pid`` is stopped: SIGSTOP's group stop is asynchronous, and a
    thread of etcd still running on the other CPU could answer a request sent meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue  # a thread that ended meanwhile
        if states and all(state in ("T", "t") for state in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"etcd (pid {pid}) not stopped after SIGSTOP: {states}")
        time.sleep(0.001)


def _store(member: Member, timeout: float = 2.0) -> EtcdStore:
    return EtcdStore(EtcdSettings((f"127.0.0.1:{member.client}",), "/t", "ka", timeout=timeout))


def test_renewals_share_one_stream(member: Member) -> None:
    async def main() -> tuple[list[float], int]:
        store = _store(member)
        outcome = await store.acquire(2.0, "host P", unless_alone=False)
        assert outcome.grant is not None
        before = member.keepalive_streams()
        ttls = [await store.renew(outcome.grant.lease) for _ in range(30)]
        opened = member.keepalive_streams() - before
        await store.release(outcome.grant.lease, outcome.grant.revision)
        await store.close()
        return ttls, opened

    ttls, opened = asyncio.run(main())
    assert ttls == [2.0] * 30
    assert opened == 1


def test_a_timed_out_renewal_closes_its_stream(member: Member) -> None:
    """A renewal that times out may still be answered later: that answer belongs to the
    old request, whose send time is earlier, so it must never be read as the answer to the
    next one. etcd is stopped (SIGSTOP) while a renewal on the open stream waits: it times
    out, and after SIGCONT the next renewal runs on a stream of its own."""

    async def main() -> tuple[int, str, float]:
        store = _store(member, timeout=0.3)
        outcome = await store.acquire(5.0, "host P", unless_alone=False)
        assert outcome.grant is not None
        lease = outcome.grant.lease
        assert await store.renew(lease) == 5.0  # the stream is open
        before = member.keepalive_streams()
        assert member.process is not None
        member.process.send_signal(signal.SIGSTOP)
        try:
            _wait_stopped(member.process.pid)
            with pytest.raises(QuorumError) as failed:
                await store.renew(lease)
        finally:
            member.process.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.2)  # etcd answers the old request now, on the old stream
        ttl = await store.renew(lease)
        opened = member.keepalive_streams() - before
        await store.close()
        return opened, str(failed.value), ttl

    opened, failure, ttl = asyncio.run(main())
    assert "no answer in time" in failure
    assert ttl == 5.0
    assert opened == 1


def test_after_etcd_restarts_the_next_renewal_opens_a_new_stream(member: Member) -> None:
    async def main() -> tuple[float, list[str], float]:
        store = _store(member, timeout=1.0)
        outcome = await store.acquire(5.0, "host P", unless_alone=False)
        assert outcome.grant is not None
        lease = outcome.grant.lease
        first = await store.renew(lease)
        member.stop()
        failures = []
        try:
            await store.renew(lease)
        except QuorumError as exc:
            failures.append(str(exc))
        member.start()
        deadline = time.monotonic() + 10
        while True:  # etcd answers again once its member is elected
            try:
                again = await store.renew(lease)
                break
            except QuorumError as exc:
                assert time.monotonic() < deadline, exc
                await asyncio.sleep(0.1)
        await store.close()
        return first, failures, again

    first, failures, again = asyncio.run(main())
    assert first == 5.0
    assert len(failures) == 1
    assert again > 0  # the lease survived the restart (etcd keeps it, TTL renewed)


def test_a_revoked_lease_renews_to_zero(member: Member) -> None:
    async def main() -> tuple[float, float]:
        store = _store(member)
        outcome = await store.acquire(2.0, "host P", unless_alone=False)
        assert outcome.grant is not None
        lease = outcome.grant.lease
        alive = await store.renew(lease)
        await store.release(lease, outcome.grant.revision)  # deletes the key, revokes
        gone = await store.renew(lease)
        await store.close()
        return alive, gone

    alive, gone = asyncio.run(main())
    assert alive == 2.0
    assert gone == 0.0


def test_a_renewal_cut_by_another_calls_failure_is_a_quorum_error(member: Member) -> None:
    """Another call that times out drops the connection (and so the renewal's stream) while
    a renewal waits: the renewal must fail as a QuorumError, which the engine counts as no
    acknowledgement and retries. A bare CancelledError would end the renewal's task without
    telling the engine, which would wait for that renewal's answer for ever (no renewal
    again: the holder fences itself and loses the key)."""

    async def main() -> tuple[str, str, float]:
        store = _store(member, timeout=0.4)
        outcome = await store.acquire(5.0, "host P", unless_alone=False)
        assert outcome.grant is not None
        lease, revision = outcome.grant.lease, outcome.grant.revision
        assert await store.renew(lease) == 5.0
        assert member.process is not None
        member.process.send_signal(signal.SIGSTOP)
        try:
            mark = asyncio.ensure_future(store.mark(True, revision))
            await asyncio.sleep(0.15)
            renewal = asyncio.ensure_future(store.renew(lease))
            results = await asyncio.gather(mark, renewal, return_exceptions=True)
        finally:
            member.process.send_signal(signal.SIGCONT)
        ttl = await store.renew(lease)
        await store.close()
        return repr(results[0]), repr(results[1]), ttl

    marked, renewed, ttl = asyncio.run(main())
    assert "QuorumError" in marked and "no answer in time" in marked
    assert "QuorumError" in renewed, renewed
    assert ttl == 5.0
