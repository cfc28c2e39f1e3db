"""The leader key against a real three-member etcd (Debian's etcd-server 3.4), one member in
each of host P's, host S's and the witness's namespaces, with the lab's partitions: the
holder's own clock fences it before the contender can win, a hand-over is fast, a lost
witness changes nothing. The holder and the contender are tests/quorum_probe.py processes
inside host P's and host S's namespaces (the engine's LeaderKey and EtcdStore)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coloproxy.lab import etcd, partition
from coloproxy.lab.topology import Topology
from coloproxy.net import netns

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parent.parent
MARGIN = 0.25  # LeaderConfig's default


def require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
        pytest.skip("etcd-server and etcd-client are not installed (scripts/setup)")


@dataclass
class Probe:
    name: str
    process: subprocess.Popen[str]
    events: list[dict[str, object]] = field(default_factory=list)

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def wait(self, event: str, timeout: float) -> dict[str, object]:
        """The first ``event`` (reading lines as they come), within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for item in self.events:
                if item["event"] == event:
                    return item
            assert time.monotonic() < deadline, f"{self.name}: no {event} in {self.events}"
            stdout = self.process.stdout
            assert stdout is not None
            os.set_blocking(stdout.fileno(), False)
            line = stdout.readline()
            if line:
                self.events.append(json.loads(line))
            else:
                time.sleep(0.01)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    require()
    topology = Topology(f"cqe{os.getpid() % 1000}", guests="netns", witness=True)
    tmp = tmp_path_factory.mktemp("etcd")
    members: list[subprocess.Popen[bytes]] = []
    try:
        topology.up()
        for host in topology.hosts():
            with (tmp / f"{host}.log").open("wb") as log:
                members.append(
                    topology.popen(
                        host,
                        etcd.command(host, tmp / host, token=topology.prefix),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        etcd.wait_healthy(topology)
        assert etcd.lead_from(topology, "wit")
        yield topology
    finally:
        partition.heal(topology, tmp)
        for member in members:
            member.kill()
            member.wait(10)
        topology.down()


def probe(topology: Topology, host: str, prefix: str) -> Probe:
    argv = [sys.executable, str(ROOT / "tests" / "quorum_probe.py"), host, ",".join(
        etcd.endpoints(host)), prefix]  # fmt: skip
    process = topology.popen(
        host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    started = Probe(host, process)
    started.wait("started", 10)
    return started


def stop(*probes: Probe) -> None:
    for item in probes:
        item.process.kill()
        item.process.wait(5)
        for stream in (item.process.stdin, item.process.stdout):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("cut", ["hp-lan", "hp"])
def test_a_cut_holder_fences_itself_before_the_contender_wins(
    cluster: Topology, tmp_path: Path, cut: str
) -> None:
    holder = probe(cluster, "hp", f"/t-{cut}")
    holder.wait("won", 5)
    contender = probe(cluster, "hs", f"/t-{cut}")
    try:
        time.sleep(0.5)
        assert not [e for e in contender.events if e["event"] == "won"]
        cut_at = time.monotonic()
        partition.cut(cluster, cut, tmp_path)
        fenced = holder.wait("fenced", 5)
        won = contender.wait("won", 10)
        fence_t, win_t = float(fenced["t"]), float(won["t"])  # type: ignore[arg-type]
        print(
            f"\n{cut}: holder fenced {fence_t - cut_at:.3f} s after the cut, contender won"
            f" {win_t - cut_at:.3f} s after it: {win_t - fence_t:.3f} s without a holder"
        )
        assert fence_t < win_t
        partition.heal(cluster, tmp_path)
        assert holder.wait("lost", 10)["reason"] == "lease-gone"
    finally:
        partition.heal(cluster, tmp_path)
        stop(holder, contender)


def test_a_hand_over_lets_the_contender_win_at_once(cluster: Topology) -> None:
    holder = probe(cluster, "hp", "/t-hand")
    holder.wait("won", 5)
    contender = probe(cluster, "hs", "/t-hand")
    try:
        time.sleep(0.3)
        asked = time.monotonic()
        holder.send("hand-over")
        won = contender.wait("won", 5)
        took = float(won["t"]) - asked  # type: ignore[arg-type]
        print(f"\nhand-over: the contender won {took * 1000:.0f} ms after it was asked")
        assert took < 0.2
    finally:
        stop(holder, contender)


@pytest.mark.parametrize("cut", ["hs", "witness"])
def test_losing_another_member_never_takes_the_key_from_its_holder(
    cluster: Topology, tmp_path: Path, cut: str
) -> None:
    """Host S cut off, or the witness (whose member leads etcd here: an election, during
    which no renewal is acknowledged and the holder may fence itself for a moment): the
    holder keeps the key."""
    holder = probe(cluster, "hp", f"/t-{cut}")
    holder.wait("won", 5)
    try:
        partition.cut(cluster, cut, tmp_path)
        time.sleep(2.5)  # two TTLs and a leader election
        partition.heal(cluster, tmp_path)
        time.sleep(1.0)
        holder.send("quit")
        holder.process.wait(5)
        assert holder.process.stdout is not None
        holder.events += [json.loads(line) for line in holder.process.stdout if line.strip()]
        events = [e["event"] for e in holder.events]
        assert "lost" not in events, holder.events
        assert events.count("fenced") == events.count("unfenced")
        fenced = [float(e["t"]) for e in holder.events if e["event"] == "fenced"]  # type: ignore[arg-type]
        unfenced = [float(e["t"]) for e in holder.events if e["event"] == "unfenced"]  # type: ignore[arg-type]
        spans = [round(b - a, 3) for a, b in zip(fenced, unfenced, strict=True)]
        print(f"\n{cut}: fenced for {spans} s")
        if cut == "hs":
            assert fenced == []  # not the etcd leader: nothing to wait for
    finally:
        partition.heal(cluster, tmp_path)
        etcd.lead_from(cluster, "wit")
        stop(holder)


def test_netns_names_are_ours(cluster: Topology) -> None:
    assert all(netns.exists(name) for name in cluster.namespaces())
