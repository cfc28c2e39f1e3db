"""The lab topology and the namespace helpers: names, addresses, life cycle, reachability.

Needs root (network namespaces); every topology is deleted by its fixture's finalizer.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coloproxy.errors import UsageError
from coloproxy.lab import topology as lab
from coloproxy.lab.topology import Topology
from coloproxy.net import NetError, netns
from netfixtures import EchoServer, client_socket, require_root_and_kernel, snapshot, unique_prefix
from netfixtures import topology_fixture as make_topology

pytestmark = pytest.mark.root

PORT = 7000


@pytest.fixture
def topology() -> Iterator[Topology]:
    with make_topology() as built:
        yield built


def addresses_of(topology: Topology, role: str, interface: str) -> set[str]:
    shown = topology.exec(role, ["ip", "-o", "addr", "show", "dev", interface]).stdout
    return {line.split()[3] for line in shown.splitlines() if "scope global" in line}


def link_field(topology: Topology, role: str, interface: str, field: str) -> str | None:
    words = topology.exec(role, ["ip", "-o", "link", "show", "dev", interface]).stdout.split()
    return words[words.index(field) + 1] if field in words else None


def test_names_and_addresses_match_the_description(topology: Topology) -> None:
    described = topology.describe()
    assert described["namespaces"] == {
        role: f"{topology.prefix}-{role}" for role in ("lan", "client", "hp", "hs", "pvm", "svm")
    }
    assert set(described["namespaces"].values()) <= set(netns.names())
    assert addresses_of(topology, "client", "eth0") == {"10.77.0.10/24", "fd77::10/64"}
    for guest in ("pvm", "svm"):
        assert addresses_of(topology, guest, "eth0") == {"10.77.0.100/24", "fd77::100/64"}
        assert link_field(topology, guest, "eth0", "link/ether") == described["guest"]["mac"]
    for host, last in (("hp", 1), ("hs", 2)):
        replication = described[host]["replication"]
        assert addresses_of(topology, host, "repl") == {
            f"10.255.77.{last}/30",
            f"fd77:255::{last}/126",
        }
        assert replication["ipv4"] == f"10.255.77.{last}"
        assert link_field(topology, host, "repl", "mtu") == "9000"
        assert link_field(topology, host, "uplink", "master") == "br-lan"
    assert link_field(topology, "hp", "guest0", "master") == "br-lan"
    # host S's guest port is on no bridge: coloproxy's setup decides where it goes
    assert link_field(topology, "hs", "guest0", "master") is None
    for port in ("lan-client", "lan-hp", "lan-hs"):
        assert link_field(topology, "lan", port, "master") == "br-lan"
    # frame-only links carry no IPv6 of ours (no RS or MLD in captures)
    assert netns.read_sysctl("net/ipv6/conf/guest0/disable_ipv6", topology.ns("hp")) == "1"
    assert netns.read_sysctl("net/ipv6/conf/br-lan/disable_ipv6", topology.ns("lan")) == "1"


def test_up_twice_changes_nothing_and_down_twice_is_harmless() -> None:
    require_root_and_kernel()
    topology = Topology(prefix=unique_prefix())
    try:
        topology.up()
        before = {role: snapshot(topology, role) for role in topology.roles()}
        topology.up()
        assert {role: snapshot(topology, role) for role in topology.roles()} == before
    finally:
        topology.down()
    topology.down()
    assert not set(topology.namespaces()) & set(netns.names())


def test_context_manager_deletes_the_namespaces_when_the_body_fails() -> None:
    require_root_and_kernel()
    topology = Topology(prefix=unique_prefix())
    with pytest.raises(RuntimeError, match="boom"), topology:
        assert set(topology.namespaces()) <= set(netns.names())
        raise RuntimeError("boom")
    assert not set(topology.namespaces()) & set(netns.names())


@pytest.mark.parametrize("family", [4, 6])
def test_client_reaches_the_pvm_and_never_the_svm_without_rules(
    topology: Topology, family: int
) -> None:
    servers = [
        EchoServer(topology, "pvm", family, PORT, banner=b"pvm:"),
        EchoServer(topology, "svm", family, PORT, banner=b"svm:"),
    ]
    try:
        with client_socket(topology, family) as client:
            client.settimeout(3.0)
            client.connect((lab.GUEST_IPV4 if family == 4 else lab.GUEST_IPV6, PORT))
            client.sendall(b"hello")
            assert client.recv(100) == b"pvm:hello"
    finally:
        for server in servers:
            server.close()


def test_replication_link_connects_the_hosts(topology: Topology) -> None:
    for address, family in (("10.255.77.2", socket.AF_INET), ("fd77:255::2", socket.AF_INET6)):
        server = topology.run_in("hs", socket.create_server, (address, PORT), family=family)
        with server, topology.run_in("hp", socket.socket, family) as client:
            client.settimeout(3.0)
            client.connect((address, PORT))
            accepted, _ = server.accept()
            accepted.close()


def test_exec_and_popen_run_inside_the_namespace(topology: Topology) -> None:
    shown = topology.exec("client", ["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert "10.77.0.10/24" in shown
    by_name = topology.exec(topology.ns("client"), ["ip", "-o", "addr", "show", "dev", "eth0"])
    assert by_name.stdout == shown  # a namespace's name does as well as its role
    with pytest.raises(NetError, match=r"ip netns exec \S+ false failed with exit status 1"):
        topology.exec("client", ["false"])
    with pytest.raises(UsageError, match="no role 'moon'"):
        topology.exec("moon", ["true"])
    process = topology.popen("client", ["ip", "-o", "link"], stdout=subprocess.PIPE, text=True)
    output, _ = process.communicate(timeout=10)
    assert " eth0@" in output


def test_down_ends_processes_left_inside_and_removes_the_namespaces() -> None:
    require_root_and_kernel()
    topology = Topology(prefix=unique_prefix()).up()
    try:
        sleeper = topology.popen("pvm", [sys.executable, "-c", "import time; time.sleep(60)"])
        deadline = time.monotonic() + 5
        while sleeper.pid not in netns.pids(topology.ns("pvm")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sleeper.pid in netns.pids(topology.ns("pvm"))
    finally:
        topology.down()
    assert sleeper.wait(timeout=5) is not None
    assert not set(topology.namespaces()) & set(netns.names())


def test_tap_guests_are_tap_devices_in_the_host_namespaces() -> None:
    with make_topology(guests="tap") as topology:
        assert topology.roles() == ("lan", "client", "hp", "hs")
        assert "pvm" not in topology.describe()
        for host in ("hp", "hs"):
            details = topology.exec(host, ["ip", "-d", "-o", "link", "show", "guest0"]).stdout
            assert "tun type tap" in details
        assert link_field(topology, "hp", "guest0", "master") == "br-lan"
        assert link_field(topology, "hs", "guest0", "master") is None
        with pytest.raises(UsageError, match="no pvm namespace"):
            topology.ns("pvm")


def test_a_witness_and_the_hosts_own_lan_addresses() -> None:
    """Witness mode (the lab's quorum): a third host on the LAN, and each host's own address
    on a link of its own into the LAN switch, reachable from the others; no witness
    namespace is left behind by a topology that does not know it has one."""
    require_root_and_kernel()
    topology = Topology(prefix=unique_prefix(), guests="tap", witness=True)
    try:
        topology.up()
        assert topology.roles() == ("lan", "client", "hp", "hs", "wit")
        assert topology.describe()["mgmt"]["wit"]["ipv4"] == "10.77.0.3"
        for host, address in lab.MGMT_IPV4.items():
            assert f"{address}/24" in addresses_of(topology, host, "mgmt")
        for source, target in (("wit", "hp"), ("hp", "hs")):
            address = lab.MGMT_IPV4[target]

            def listener(address: str = address) -> socket.socket:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((address, 0))
                sock.settimeout(5)
                return sock

            with topology.run_in(target, listener) as receiver:

                def send(port: int = receiver.getsockname()[1], to: str = address) -> None:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                        sender.sendto(b"quorum", (to, port))

                topology.run_in(source, send)
                assert receiver.recv(16) == b"quorum"
    finally:
        Topology(topology.prefix, guests="tap").down()
    assert not netns.exists(topology.ns("wit"))
    with pytest.raises(UsageError, match="no witness"):
        Topology(guests="tap").ns("wit")


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="topology prefix"):
        Topology(prefix="a/b")
    with pytest.raises(UsageError, match="guests must be"):
        Topology(guests="qemu")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# coloproxy.net.netns


def test_run_in_returns_values_and_raises_errors_of_the_function(topology: Topology) -> None:
    namespace = topology.ns("client")
    inode = netns.run_in(namespace, lambda: Path("/proc/thread-self/ns/net").stat().st_ino)
    assert inode == Path("/run/netns", namespace).stat().st_ino
    assert inode != Path("/proc/self/ns/net").stat().st_ino  # the caller did not move

    def fail() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        netns.run_in(namespace, fail)
    with pytest.raises(NetError, match="opening network namespace cpt-no-such"):
        netns.run_in("cpt-no-such", int)


def test_sysctls_are_per_namespace(topology: Topology) -> None:
    key = "net.ipv4.ip_forward"
    outside = netns.read_sysctl(key)
    netns.write_sysctl(key, 0 if outside == "1" else 1, topology.ns("client"))
    assert netns.read_sysctl(key, topology.ns("client")) != outside
    assert netns.read_sysctl(key) == outside
    with pytest.raises(NetError, match=r"reading sysctl net\.no\.such"):
        netns.read_sysctl("net.no.such")
    with pytest.raises(UsageError):
        netns.read_sysctl("net/../../etc/passwd")


def test_create_and_delete_are_idempotent() -> None:
    require_root_and_kernel()
    name = f"{unique_prefix()}-solo"
    try:
        netns.create(name)
        netns.create(name)
        assert netns.exists(name)
        assert name in netns.names()
    finally:
        netns.delete(name)
    netns.delete(name)
    assert not netns.exists(name)
    assert netns.pids(name) == []
