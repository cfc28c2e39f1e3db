"""Helpers for tests that build namespaces: topologies that always go away, listings of a
namespace's network state, packet sniffers, a TCP echo server and an accept-all NFQUEUE
consumer.

Everything here runs traffic only inside namespaces the tests create. Every topology comes
from :func:`topology_fixture`, whose finalizer deletes its namespaces whether the test
passed or not, and each gets a prefix of its own, so parallel runs and other users' namespaces
on the machine never meet.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns as pyroute2_netns

from coloproxy.lab.topology import (
    GUEST_IPV4,
    GUEST_IPV6,
    REPLICATION_IPV4,
    REPLICATION_IPV6,
    GuestMode,
    Topology,
)
from coloproxy.net import netns
from coloproxy.net.host import HostNet
from coloproxy.net.rules import QueueNumbers
from coloproxy.role import Role

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SYN, ACK = 0x02, 0x10

QUEUES = QueueNumbers(
    primary_out=7710, secondary_out=7711, secondary_in=7712, secondary_egress=7713
)
NET_PREFIX = "cp"
PAIR = "t1"
VXLAN_ID = 77

_counter = itertools.count()


def require_root_and_kernel() -> None:
    """Skip, saying why, when the machine cannot run namespace tests at all."""
    require_root_and_netns()
    if not Path("/proc/sys/net/bridge").is_dir():
        pytest.skip("kernel without br_netfilter (/proc/sys/net/bridge is missing)")


def require_root_and_netns() -> None:
    """Skip, saying why, when not root or the kernel has no network namespaces."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    if not Path("/proc/self/ns/net").exists():
        pytest.skip("kernel without network namespaces (/proc/self/ns/net is missing)")


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def own_netns() -> Iterator[None]:
    """The calling thread in a network namespace of its own, loopback up, for the block;
    then back in the one it came from. For tests that run a daemon in-process: what it binds
    (NFQUEUE numbers, UDP ports) cannot meet another run's. The namespace has no name (no
    /run/netns entry to leave behind): it goes with its last socket. Threads and processes
    started inside the block are in it too; only the calling thread comes back."""
    require_root_and_netns()
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"unshare(CLONE_NEWNET): {os.strerror(error)}")
        try:
            netns.run_command(["ip", "link", "set", "lo", "up"])
            yield
        finally:
            # fork=False: setns(2) in this thread; flags=0: never create a namespace
            pyroute2_netns.setns(home, flags=0, fork=False)
    finally:
        os.close(home)


# What iproute2 and iptables print when the kernel lacks what a command needs (a link type,
# an xtables target or match): then the machine cannot run the test. Any other failure of a
# set-up step is the set-up's own error, and fails the test.
MISSING_KERNEL_FEATURE = (
    "Unknown device type",  # ip link add ... type veth|bridge|vxlan
    "No chain/target/match by that name",  # iptables (legacy)
    "Couldn't load target",  # iptables-nft: NFQUEUE
    "Couldn't load match",  # iptables-nft: physdev, multiport
    "missing kernel module",  # iptables-nft: "Extension ... not supported, missing kernel module?"
    "Address family not supported by protocol",
)


def setup_step(*argv: str) -> None:
    """Run one set-up command (as root). A kernel feature it needs is missing: skip, saying
    which; it fails otherwise: raise with its command and output, so that a broken set-up is
    a failed test, never a silent skip."""
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        output = f"{exc.stderr or ''}{exc.stdout or ''}".strip()
        command = " ".join(argv)
        if any(sign in output for sign in MISSING_KERNEL_FEATURE):
            pytest.skip(f"the kernel lacks a feature `{command}` needs: {output}")
        raise RuntimeError(
            f"set-up failed: `{command}` exited {exc.returncode}: {output}"
        ) from None


def unique_prefix() -> str:
    """A topology prefix no other test run uses: "cpt" + pid + a counter, fixed widths (10
    characters: pid 1234 counter 56 and pid 12345 counter 6 must not both be "cpt123456").
    `coloproxy lab` uses "cplab" (coloproxy/lab/lab.py), which this never is."""
    return f"cpt{os.getpid() % 100000:05d}{next(_counter) % 100:02d}"


@contextlib.contextmanager
def topology_fixture(guests: GuestMode = "netns") -> Iterator[Topology]:
    require_root_and_kernel()
    topology = Topology(prefix=unique_prefix(), guests=guests)
    try:
        yield topology.up()
    finally:
        topology.down()
        leftovers = [name for name in topology.namespaces() if Path("/run/netns", name).exists()]
        assert not leftovers, f"namespaces left behind: {leftovers}"


def host_params(role: Role, family: int = 4) -> HostNet:
    """The HostNet of host P (primary) or host S (secondary) of a topology; ``family`` is the
    replication link's address family (the tunnel's underlay)."""
    here, there = ("hp", "hs") if role is Role.PRIMARY else ("hs", "hp")
    addresses = REPLICATION_IPV4 if family == 4 else REPLICATION_IPV6
    local, remote = addresses[here], addresses[there]
    return HostNet(
        prefix=NET_PREFIX,
        pair=PAIR,
        role=role,
        guest_port="guest0",
        local_address=ipaddress.ip_address(local),
        remote_address=ipaddress.ip_address(remote),
        vxlan_id=VXLAN_ID,
        queues=QUEUES,
        lan_bridge="br-lan",
        underlay="repl",
    )


# --------------------------------------------------------------------------------------------
# listings


def _links() -> tuple[list[dict[str, Any]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = list(ipr.get_links())
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        found = []
        for link in links:
            found.append(
                {
                    "name": link.get_attr("IFLA_IFNAME"),
                    "kind": link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
                    "master": names.get(link.get_attr("IFLA_MASTER")),
                    # IFF_UP and IFF_NOARP only: carrier and operstate follow the peer and the
                    # kernel's linkwatch, not our configuration
                    "flags": link["flags"] & (0x1 | 0x80),
                    "mtu": link.get_attr("IFLA_MTU"),
                    "mac": link.get_attr("IFLA_ADDRESS"),
                }
            )
        # Link-local addresses are the kernel's, added when it sees the carrier; the rest
        # are ours.
        addresses = sorted(
            (names.get(a["index"]), a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr()
            if not a.get_attr("IFA_ADDRESS").startswith("fe80:")
        )
        qdiscs = sorted(
            (names.get(q["index"]), q.get_attr("TCA_KIND"), q["handle"], q["parent"])
            for q in ipr.get_qdiscs()
        )
    return sorted(found, key=lambda item: item["name"]), addresses, qdiscs


def normalized_save(text: str) -> str:
    """``iptables-save`` output without comments and counters; a filter table holding only
    empty built-in chains with policy ACCEPT counts as no table (iptables-nft creates the
    table at first use and never removes it, which changes nothing for packets)."""
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    lines = [line.split(" [")[0] if line.startswith(":") else line for line in lines]
    empty_filter = ["*filter", ":INPUT ACCEPT", ":FORWARD ACCEPT", ":OUTPUT ACCEPT", "COMMIT"]
    if lines == empty_filter:
        return ""
    return "\n".join(lines)


def snapshot(topology: Topology, role: str) -> dict[str, Any]:
    """Everything setup may touch in one namespace, in a form that compares exactly."""
    links, addresses, qdiscs = topology.run_in(role, _links)
    filters = {}
    for name in sorted({q[0] for q in qdiscs if q[1] in ("clsact", "ingress")}):
        for hook in ("ingress", "egress"):
            shown = topology.exec(role, ["tc", "filter", "show", "dev", name, hook]).stdout
            filters[f"{name} {hook}"] = shown
    return {
        "links": links,
        "addresses": addresses,
        "qdiscs": qdiscs,
        "filters": filters,
        "iptables": normalized_save(topology.exec(role, ["iptables-save"]).stdout),
        "ip6tables": normalized_save(topology.exec(role, ["ip6tables-save"]).stdout),
    }


# --------------------------------------------------------------------------------------------
# traffic


@dataclass(frozen=True)
class Segment:
    """The TCP header fields a test looks at, from a frame or an IP packet."""

    source: str
    destination: str
    source_port: int
    destination_port: int
    seq: int
    flags: int


def tcp_of_ip(packet: bytes) -> Segment | None:
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        header = (packet[0] & 0x0F) * 4
        if packet[9] != 6:
            return None
        source, destination = packet[12:16], packet[16:20]
    elif version == 6 and len(packet) >= 40:
        header = 40
        if packet[6] != 6:  # no extension headers in these tests
            return None
        source, destination = packet[8:24], packet[24:40]
    else:
        return None
    if len(packet) < header + 14:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", packet, header)
    return Segment(
        str(ipaddress.ip_address(source)),
        str(ipaddress.ip_address(destination)),
        sport,
        dport,
        seq,
        packet[header + 13],
    )


def tcp_of_frame(frame: bytes) -> Segment | None:
    if len(frame) < 14 or frame[12:14] not in (b"\x08\x00", b"\x86\xdd"):
        return None
    return tcp_of_ip(frame[14:])


def ip_source_of_frame(frame: bytes) -> str | None:
    if len(frame) >= 34 and frame[12:14] == b"\x08\x00":
        return str(ipaddress.ip_address(frame[26:30]))
    if len(frame) >= 54 and frame[12:14] == b"\x86\xdd":
        return str(ipaddress.ip_address(frame[22:38]))
    return None


def _packet_socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((interface, ETH_P_ALL))
    sock.settimeout(0.05)
    return sock


class Sniffer:
    """Every frame received on one interface of one namespace (AF_PACKET), in a thread."""

    def __init__(self, topology: Topology, role: str, interface: str) -> None:
        self._sock = topology.run_in(role, _packet_socket, interface)
        self._received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, address = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            if address[2] != PACKET_OUTGOING:
                self._received.append(frame)

    def frames(self) -> list[bytes]:
        """The frames received so far."""
        return list(self._received)

    def stop(self) -> list[bytes]:
        self._stop.set()
        self._thread.join()
        self._sock.close()
        return self._received

    def __enter__(self) -> Sniffer:
        return self

    def __exit__(self, *_: object) -> None:
        if not self._stop.is_set():
            self.stop()


def _listening_socket(family: int, port: int) -> socket.socket:
    address = GUEST_IPV4 if family == 4 else GUEST_IPV6
    return socket.create_server(
        (address, port), family=socket.AF_INET if family == 4 else socket.AF_INET6
    )


class EchoServer:
    """A TCP echo server on the guest address inside a guest namespace (one thread); each
    answer starts with ``banner``, so a test knows which guest answered."""

    def __init__(
        self, topology: Topology, role: str, family: int, port: int, banner: bytes = b""
    ) -> None:
        self._banner = banner
        self._sock = topology.run_in(role, _listening_socket, family, port)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._sock.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2.0)
                with contextlib.suppress(OSError):
                    while data := connection.recv(4096):
                        connection.sendall(self._banner + data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


def client_socket(topology: Topology, family: int) -> socket.socket:
    return topology.run_in(
        "client", socket.socket, socket.AF_INET if family == 4 else socket.AF_INET6
    )


# The accept-all consumer, run as ``python3 -c CONSUMER <queue>...`` in a host's namespace. It
# prints "ready" once bound, then one JSON line per packet: the queue and the TCP fields.
CONSUMER = r"""
import json, select, struct, sys, ipaddress
from netfilterqueue import NetfilterQueue

def tcp(packet):
    version = packet[0] >> 4
    if version == 4:
        header, proto, src, dst = (packet[0] & 15) * 4, packet[9], packet[12:16], packet[16:20]
    else:
        header, proto, src, dst = 40, packet[6], packet[8:24], packet[24:40]
    if proto != 6:
        return {"proto": proto}
    sport, dport, seq = struct.unpack_from("!HHI", packet, header)
    return {"src": str(ipaddress.ip_address(src)), "dst": str(ipaddress.ip_address(dst)),
            "sport": sport, "dport": dport, "seq": seq, "flags": packet[header + 13]}

def handler(number):
    def accept(packet):
        print(json.dumps({"queue": number, **tcp(packet.get_payload())}), flush=True)
        packet.accept()
    return accept

queues = []
for number in map(int, sys.argv[1:]):
    queue = NetfilterQueue()
    queue.bind(number, handler(number))
    queues.append(queue)
print("ready", flush=True)
by_fd = {queue.get_fd(): queue for queue in queues}
while True:
    for fd in select.select(list(by_fd), [], [])[0]:
        by_fd[fd].run(block=False)
"""


class Consumer:
    """The accept-all NFQUEUE consumers as subprocesses: host P's queues in its namespace,
    host S's in its own. What they saw is readable while they run (``records``)."""

    def __init__(self, topology: Topology, queues: QueueNumbers) -> None:
        self._processes: list[subprocess.Popen[str]] = []
        self._records: list[dict[str, Any]] = []
        self._readers: list[threading.Thread] = []
        for where, numbers in (
            ("hp", [queues.primary_out, queues.secondary_out]),
            ("hs", [queues.secondary_in, queues.secondary_egress]),
        ):
            process = topology.popen(
                where,
                [sys.executable, "-c", CONSUMER, *map(str, numbers)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self._processes.append(process)
            assert process.stdout is not None
            first = process.stdout.readline()
            if first.strip() != "ready":
                for started in self._processes:
                    started.kill()
                _, errors = process.communicate()
                raise RuntimeError(f"NFQUEUE consumer did not start in {where}: {first!r} {errors}")
        for process in self._processes:
            reader = threading.Thread(target=self._read, args=(process,), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("{"):
                self._records.append(json.loads(line))

    def records(self) -> list[dict[str, Any]]:
        """The packets accepted so far, as the consumers printed them."""
        return list(self._records)

    def stop(self) -> list[dict[str, Any]]:
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.wait(timeout=5)
        for reader in self._readers:
            reader.join(timeout=5)  # the consumer's stdout ended with it
        for process in self._processes:
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        return self.records()


def wait_for(predicate: Any, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())
