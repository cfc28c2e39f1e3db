"""The lab's quorum service: one etcd member on each of host P, host S and the witness
(Debian's ``etcd-server`` 3.4, installed by scripts/setup), on the hosts' management addresses
on the LAN (docs/lab.md, "The quorum").

Timing flags: ``--heartbeat-interval 50 --election-timeout 500`` (a cut leader is replaced in
about half a second; etcd's smallest lease is then 1 s) and ``--pre-vote`` (a member that was
cut off and comes back does not disrupt the leader with a higher term).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from coloproxy.errors import ColoproxyError
from coloproxy.lab.topology import MGMT_IPV4, Topology

CLIENT_PORT = 2379
PEER_PORT = 2380
HEARTBEAT_MS = 50
ELECTION_MS = 500
HEALTH_TIMEOUT_S = 20.0


class EtcdError(ColoproxyError):
    """The lab's etcd cluster did not come up."""


def endpoint(host: str) -> str:
    return f"{MGMT_IPV4[host]}:{CLIENT_PORT}"


def endpoints(first: str | None = None) -> list[str]:
    """Every member's client endpoint, ``first``'s (a host's own member) first."""
    hosts = sorted(MGMT_IPV4, key=lambda host: (host != first, host))
    return [endpoint(host) for host in hosts]


def command(host: str, data_dir: Path, token: str) -> list[str]:
    """The member of ``host`` ("hp", "hs", "wit")."""
    address = MGMT_IPV4[host]
    cluster = ",".join(f"{name}=http://{ip}:{PEER_PORT}" for name, ip in MGMT_IPV4.items())
    return [
        etcd_binary(),
        "--name", host,
        "--data-dir", str(data_dir),
        "--listen-client-urls", f"http://{address}:{CLIENT_PORT}",
        "--advertise-client-urls", f"http://{address}:{CLIENT_PORT}",
        "--listen-peer-urls", f"http://{address}:{PEER_PORT}",
        "--initial-advertise-peer-urls", f"http://{address}:{PEER_PORT}",
        "--initial-cluster", cluster,
        "--initial-cluster-state", "new",
        "--initial-cluster-token", token,
        "--heartbeat-interval", str(HEARTBEAT_MS),
        "--election-timeout", str(ELECTION_MS),
        "--pre-vote",
        "--logger", "zap",
    ]  # fmt: skip


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if found is None:
        raise EtcdError("etcd is not installed (Debian's etcd-server; scripts/setup installs it)")
    return found


def wait_healthy(topology: Topology, timeout: float = HEALTH_TIMEOUT_S) -> float:
    """Until every member answers ``etcdctl endpoint health`` (run on the witness); the
    seconds it took."""
    started = time.monotonic()
    argv = [
        "etcdctl", "--endpoints", ",".join(endpoints()), "--command-timeout", "1s",
        "endpoint", "health",
    ]  # fmt: skip
    last = ""
    while time.monotonic() - started < timeout:
        done = topology.exec("wit", argv, check=False, timeout=10.0)
        last = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            return time.monotonic() - started
        time.sleep(0.1)
    raise EtcdError(f"the lab's etcd cluster is not healthy after {timeout:.0f} s: {last}")


def lead_from(topology: Topology, host: str = "wit") -> bool:
    """Move etcd's leadership to ``host``'s member (``etcdctl move-leader``); True when it
    leads afterwards. The lab puts it on the witness: a lost etcd leader costs an election
    (about 0.5-1 s here), during which no lease is renewed and the key's holder fences
    itself for a moment; on the witness, losing host P or host S costs none."""
    base = ["etcdctl", "--endpoints", ",".join(endpoints()), "--command-timeout", "2s"]
    done = topology.exec("wit", [*base, "-w", "json", "endpoint", "status"], check=False)
    if done.returncode != 0:
        return False
    try:
        members = json.loads(done.stdout)
        leader = members[0]["Status"]["leader"]
        wanted = next(
            m["Status"]["header"]["member_id"] for m in members if m["Endpoint"] == endpoint(host)
        )
    except (ValueError, KeyError, IndexError, StopIteration):
        return False
    if leader == wanted:
        return True
    at = next(m["Endpoint"] for m in members if m["Status"]["header"]["member_id"] == leader)
    moved = topology.exec(
        "wit",
        ["etcdctl", "--endpoints", at, "--command-timeout", "2s", "move-leader", f"{wanted:x}"],
        check=False,
    )
    return moved.returncode == 0


def status(topology: Topology) -> str:
    """``etcdctl endpoint status`` of every member (who leads), as a table."""
    done = topology.exec(
        "wit",
        ["etcdctl", "--endpoints", ",".join(endpoints()), "--command-timeout", "1s",
         "-w", "table", "endpoint", "status"],
        check=False,
        timeout=10.0,
    )  # fmt: skip
    return (done.stdout + done.stderr).strip()


def get(topology: Topology, key: str) -> subprocess.CompletedProcess[str]:
    return topology.exec(
        "wit",
        ["etcdctl", "--endpoints", ",".join(endpoints()), "get", "--prefix", key],
        check=False,
        timeout=10.0,
    )


__all__ = ["CLIENT_PORT", "EtcdError", "command", "endpoint", "endpoints", "status", "wait_healthy"]
