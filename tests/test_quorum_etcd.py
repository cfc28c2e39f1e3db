"""The leader key against a real three-member etcd (Debian's etcd-server 3.4), one member in
each of host P's, host S's and the witness's namespaces, with the lab's partitions: the
holder's own clock fences it before the contender can win, a hand-over is fast, a lost
witness changes nothing. The holder and the contender are tests/quorum_probe.py processes
inside host P's and host S's namespaces (the engine's LeaderKey and EtcdStore)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coloproxy.engine.quorum import EtcdSettings, EtcdStore, QuorumError
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _certificates(directory: Path) -> None:
    """A CA, etcd's server certificate for 127.0.0.1 and a client certificate (openssl)."""

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=directory)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem",
        "-subj", "/CN=coloproxy-test-ca", "-days", "1")  # fmt: skip
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (directory / f"{name}.ext").write_text(extension + "\n")
        run("openssl", "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'web1' if name == 'client' else '127.0.0.1'}")  # fmt: skip
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey",
            "ca.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
            "-extfile", f"{name}.ext")  # fmt: skip
        (directory / f"{name}.key").chmod(0o600)


def test_tls_with_a_client_certificate_and_etcd_users(tmp_path: Path) -> None:
    """etcd's own security from the config: TLS, a client certificate, a user whose role
    may write only under its prefix. One member on loopback."""
    require()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    _certificates(tmp_path)
    client, peer = _free_port(), _free_port()
    url = f"https://127.0.0.1:{client}"
    tls = [f"--cacert={tmp_path / 'ca.pem'}", f"--cert={tmp_path / 'client.pem'}",
           f"--key={tmp_path / 'client.key'}", f"--endpoints={url}"]  # fmt: skip
    with (tmp_path / "etcd.log").open("wb") as log:
        member = subprocess.Popen(
            [etcd.etcd_binary(), "--name", "m", "--data-dir", str(tmp_path / "data"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"m=http://127.0.0.1:{peer}",
             "--cert-file", str(tmp_path / "server.pem"),
             "--key-file", str(tmp_path / "server.key"),
             "--trusted-ca-file", str(tmp_path / "ca.pem"), "--client-cert-auth"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["etcdctl", *tls, "endpoint", "health"], capture_output=True,
                             check=False).returncode != 0:  # fmt: skip
            assert time.monotonic() < deadline, "etcd with TLS did not come up"
            time.sleep(0.1)
        for argv in (
            ["user", "add", "root", "--new-user-password", "rootpw"],
            ["user", "add", "web1", "--new-user-password", "web1pw"],
            ["role", "add", "pairs"],
            ["role", "grant-permission", "pairs", "--prefix=true", "readwrite", "/pairs/"],
            ["user", "grant-role", "web1", "pairs"],
            ["auth", "enable"],
        ):
            subprocess.run(["etcdctl", *tls, *argv], check=True, capture_output=True)

        def store(prefix: str, password: str) -> EtcdStore:
            return EtcdStore(
                EtcdSettings(
                    (f"127.0.0.1:{client}",), prefix, "web1", timeout=2.0,
                    ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "client.pem",
                    key_file=tmp_path / "client.key", user="web1", password=password,
                )
            )  # fmt: skip

        async def main() -> None:
            good = store("/pairs", "web1pw")
            outcome = await good.acquire(1.0, "host P", unless_alone=False)
            assert outcome.grant is not None
            assert await good.renew(outcome.grant.lease) > 0
            assert await good.mark(True, outcome.grant.revision)
            await good.release(outcome.grant.lease, outcome.grant.revision)
            await good.close()
            for prefix, password, why in (
                ("/pairs", "wrong", "authentication failed"),
                ("/elsewhere", "web1pw", "permission denied"),
            ):
                bad = store(prefix, password)
                with pytest.raises(QuorumError, match=why):
                    await bad.acquire(1.0, "host P", unless_alone=False)
                await bad.close()

        asyncio.run(main())
    finally:
        member.kill()
        member.wait(10)
