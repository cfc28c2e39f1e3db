"""A host's setup and teardown in a fresh topology, and the data path without coloproxy.

Host P gets the primary's setup and host S the secondary's, each inside its own namespace
(as the daemon will run). The data-path tests put an accept-all NFQUEUE consumer (a tiny
netfilterqueue script) on host P's three queues, or none at all, and send TCP from the
client namespace to the guests' address.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from coloproxy.errors import UsageError
from coloproxy.lab.topology import GUEST_IPV4, GUEST_IPV6, Topology
from coloproxy.net import NetError, host
from coloproxy.net.host import HostNet
from coloproxy.net.netns import read_sysctl, run_command
from coloproxy.net.rules import QueueNumbers
from coloproxy.role import Role
from netfixtures import (
    ACK,
    QUEUES,
    SYN,
    Consumer,
    EchoServer,
    Sniffer,
    client_socket,
    host_params,
    ip_source_of_frame,
    snapshot,
    tcp_of_frame,
    wait_for,
)
from netfixtures import topology_fixture as make_topology

PORT = 7001


@pytest.fixture
def topology() -> Iterator[Topology]:
    with make_topology() as built:
        yield built


def set_up(topology: Topology, family: int = 4) -> tuple[HostNet, HostNet]:
    primary, secondary = host_params(Role.PRIMARY, family), host_params(Role.SECONDARY, family)
    topology.run_in("hp", host.setup, primary)
    topology.run_in("hs", host.setup, secondary)
    return primary, secondary


def links_of(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {link["name"]: link for link in state["links"]}


def without_macs(state: dict[str, Any]) -> dict[str, Any]:
    """A snapshot with random MACs left out: links created anew get new ones."""
    links = [{k: v for k, v in link.items() if k != "mac"} for link in state["links"]]
    return {**state, "links": links}


IFF_UP, IFF_NOARP = 0x1, 0x80


# --------------------------------------------------------------------------------------------
# what setup creates


@pytest.mark.root
def test_primary_setup_creates_tunnel_mirror_bridge_sysctls_and_rules(topology: Topology) -> None:
    primary, _ = set_up(topology)
    state = snapshot(topology, "hp")
    links = links_of(state)
    assert links["cp-brm"]["kind"] == "bridge"
    assert links["cp-vx"]["kind"] == "vxlan"
    assert links["cp-vx"]["master"] == links["cp-mir1"]["master"] == "cp-brm"
    assert links["cp-vx"]["mtu"] == 9000 - 50  # from the replication link
    assert links["cp-mir0"]["master"] is None
    assert links["cp-mir0"]["flags"] == IFF_UP | IFF_NOARP
    assert links["guest0"]["master"] == "br-lan"  # the PVM stays on the LAN
    assert all(links[name]["flags"] & IFF_UP for name in ("cp-brm", "cp-vx", "cp-mir1"))

    details = topology.exec("hp", ["ip", "-d", "-o", "link", "show", "cp-vx"]).stdout
    assert re.search(r"vxlan id 77 remote 10\.255\.77\.2 local 10\.255\.77\.1 dev repl", details)
    assert "dstport 4789" in details

    assert ("guest0", "clsact", 0xFFFF0000, 0xFFFFFFF1) in state["qdiscs"]
    egress = state["filters"]["guest0 egress"]
    assert "filter protocol all pref 49168 u32" in egress
    assert "match 00000000/00000000 at 0" in egress
    assert "mirred (Egress Mirror to device cp-mir0) pipe" in egress
    assert state["filters"]["guest0 ingress"] == ""

    namespace = topology.ns("hp")
    assert read_sysctl("net.bridge.bridge-nf-call-iptables", namespace) == "1"
    assert read_sysctl("net.bridge.bridge-nf-call-ip6tables", namespace) == "1"
    for name in ("cp-mir0", "cp-mir1", "cp-vx", "cp-brm"):
        assert read_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", namespace) == "1"
    assert not [a for a in state["addresses"] if a[0].startswith("cp-")]

    for command in ("iptables", "ip6tables"):
        assert topology.exec("hp", [command, "-S", "CP-T1"]).stdout.splitlines() == [
            "-N CP-T1",
            "-A CP-T1 -m physdev --physdev-in guest0 -j NFQUEUE --queue-num 7710",
            "-A CP-T1 -m physdev --physdev-in cp-vx -j NFQUEUE --queue-num 7711",
            "-A CP-T1 -i cp-mir0 -j DROP",
        ]
        forward = topology.exec("hp", [command, "-S", "FORWARD"]).stdout.splitlines()
        assert forward == ["-P FORWARD ACCEPT", "-A FORWARD -j CP-T1"]
    assert primary.rule_set.chain == "CP-T1"


@pytest.mark.root
def test_secondary_setup_bridges_the_guest_port_with_the_tunnel_only(topology: Topology) -> None:
    # The operator left the SVM's port in the LAN bridge: setup must take it out (I3).
    topology.exec("hs", ["ip", "link", "set", "guest0", "master", "br-lan"])
    set_up(topology)
    state = snapshot(topology, "hs")
    links = links_of(state)
    assert links["cp-brs"]["kind"] == "bridge"
    assert links["guest0"]["master"] == links["cp-vx"]["master"] == "cp-brs"
    assert links["uplink"]["master"] == "br-lan"
    assert "cp-brm" not in links and "cp-mir0" not in links
    details = topology.exec("hs", ["ip", "-d", "-o", "link", "show", "cp-vx"]).stdout
    assert re.search(r"vxlan id 77 remote 10\.255\.77\.1 local 10\.255\.77\.2 dev repl", details)
    assert state["filters"] == {}  # no tc on host S
    # Its two queues: TCP into the SVM, and the SVM's TCP output (SYN-ACKs towards the tunnel).
    for listing in (state["iptables"], state["ip6tables"]):
        assert "--physdev-out guest0 -j NFQUEUE --queue-num 7712" in listing
        assert listing.count("--queue-num 7713") == 2


@pytest.mark.root
def test_setup_twice_gives_the_same_state(topology: Topology) -> None:
    set_up(topology)
    first = {role: snapshot(topology, role) for role in ("hp", "hs")}
    set_up(topology)
    assert {role: snapshot(topology, role) for role in ("hp", "hs")} == first


@pytest.mark.root
def test_setup_for_the_other_role_removes_the_first_roles_objects(topology: Topology) -> None:
    """After a failover the hosts swap roles; a setup yields exactly its own role's state."""
    primary, secondary = set_up(topology)
    as_primary, as_secondary = snapshot(topology, "hp"), snapshot(topology, "hs")
    swapped = dataclasses.replace(secondary, role=Role.PRIMARY, queues=QUEUES)
    topology.exec("hs", ["ip", "link", "set", "guest0", "master", "br-lan"])  # the failover
    topology.run_in("hs", host.setup, swapped)
    assert "cp-brs" not in links_of(snapshot(topology, "hs"))
    topology.run_in("hs", host.setup, secondary)
    assert without_macs(snapshot(topology, "hs")) == without_macs(as_secondary)
    demoted = dataclasses.replace(primary, role=Role.SECONDARY)
    topology.run_in("hp", host.setup, demoted)
    topology.run_in("hp", host.attach_guest_to_lan, demoted)  # the next failover
    topology.run_in("hp", host.setup, primary)
    assert without_macs(snapshot(topology, "hp")) == without_macs(as_primary)


@pytest.mark.root
def test_setup_replaces_links_that_differ_from_the_parameters(topology: Topology) -> None:
    topology.exec("hp", ["ip", "link", "add", "cp-vx", "type", "vxlan", "id", "5", "dstport", "9"])
    topology.exec("hp", ["ip", "link", "add", "cp-mir0", "type", "bridge"])
    set_up(topology)
    details = topology.exec("hp", ["ip", "-d", "-o", "link", "show", "cp-vx"]).stdout
    assert "vxlan id 77 " in details
    assert links_of(snapshot(topology, "hp"))["cp-mir0"]["kind"] == "veth"


@pytest.mark.root
def test_an_ipv6_replication_link_carries_the_tunnel(topology: Topology) -> None:
    set_up(topology, family=6)
    details = topology.exec("hp", ["ip", "-d", "-o", "link", "show", "cp-vx"]).stdout
    assert re.search(r"vxlan id 77 remote fd77:255::2 local fd77:255::1 dev repl", details)
    assert links_of(snapshot(topology, "hp"))["cp-vx"]["mtu"] == 9000 - 70


# --------------------------------------------------------------------------------------------
# teardown


@pytest.mark.root
def test_teardown_leaves_exactly_what_was_there_before(topology: Topology) -> None:
    before = {role: snapshot(topology, role) for role in ("hp", "hs")}
    primary, secondary = set_up(topology)
    assert {role: snapshot(topology, role) for role in ("hp", "hs")} != before
    for _ in range(2):  # the second time finds nothing and must not fail
        topology.run_in("hp", host.teardown, primary)
        topology.run_in("hs", host.teardown, secondary)
        assert {role: snapshot(topology, role) for role in ("hp", "hs")} == before


@pytest.mark.root
def test_teardown_keeps_other_peoples_rules_and_tc_filters(topology: Topology) -> None:
    foreign = "\n".join(
        [
            "*filter",
            ":FOREIGN - [0:0]",
            "-A FORWARD -i uplink -j ACCEPT",
            "-A FORWARD -j FOREIGN",
            "-A FOREIGN -j RETURN",
            "COMMIT",
            "",
        ]
    )
    for command in ("iptables-restore", "ip6tables-restore"):
        topology.exec("hp", [command, "--noflush"], input=foreign)
    topology.exec("hp", ["tc", "qdisc", "add", "dev", "guest0", "clsact"])
    topology.exec(
        "hp",
        [
            *("tc", "filter", "add", "dev", "guest0", "ingress", "pref", "7", "protocol", "ip"),
            *("u32", "match", "ip", "src", "10.9.9.9/32", "flowid", "1:1"),
        ],
    )
    before = snapshot(topology, "hp")
    primary, _ = set_up(topology)
    forward = topology.exec("hp", ["iptables", "-S", "FORWARD"]).stdout.splitlines()
    # Ours first: the ACCEPT after it must not let PVM output bypass the queue.
    assert forward[1:] == [
        "-A FORWARD -j CP-T1",
        "-A FORWARD -i uplink -j ACCEPT",
        "-A FORWARD -j FOREIGN",
    ]
    topology.run_in("hp", host.teardown, primary)
    assert snapshot(topology, "hp") == before


@pytest.mark.root
def test_teardown_with_nothing_set_up_is_harmless(topology: Topology) -> None:
    before = snapshot(topology, "hp")
    topology.run_in("hp", host.teardown, host_params(Role.PRIMARY))
    topology.run_in("hp", host.teardown, host_params(Role.SECONDARY))
    assert snapshot(topology, "hp") == before


# --------------------------------------------------------------------------------------------
# failover and errors


@pytest.mark.root
def test_attach_guest_to_lan_moves_the_svm_port_into_the_lan_bridge(topology: Topology) -> None:
    _, secondary = set_up(topology)
    topology.run_in("hs", host.attach_guest_to_lan, secondary)
    links = links_of(snapshot(topology, "hs"))
    assert links["guest0"]["master"] == "br-lan"
    assert links["cp-vx"]["master"] == "cp-brs"
    # The SVM now answers the client directly, as the surviving VM after failover, through
    # host S's queues (an accept-all consumer here: without one they drop, fail closed).
    topology.run_in("hp", host.teardown, host_params(Role.PRIMARY))
    topology.exec("hp", ["ip", "link", "set", "guest0", "nomaster"])
    server = EchoServer(topology, "svm", 4, PORT, banner=b"svm:")
    consumer = Consumer(topology, QUEUES)
    try:
        with client_socket(topology, 4) as client:
            client.settimeout(3.0)
            client.connect((GUEST_IPV4, PORT))
            client.sendall(b"hi")
            assert client.recv(100) == b"svm:hi"
    finally:
        records = consumer.stop()
        server.close()
    # From the LAN, every TCP segment of the SVM's is queued (to be shifted after a takeover).
    assert {r["queue"] for r in records} == {QUEUES.secondary_in, QUEUES.secondary_egress}
    assert any(r["queue"] == QUEUES.secondary_egress and r["flags"] == ACK | 0x08 for r in records)


def test_attach_guest_to_lan_needs_the_lan_bridge() -> None:
    params = HostNet(
        prefix="cp",
        pair="t1",
        role=Role.SECONDARY,
        guest_port="guest0",
        local_address=ipaddress.ip_address("10.0.0.2"),
        remote_address=ipaddress.ip_address("10.0.0.1"),
        vxlan_id=1,
        queues=QUEUES,
    )
    with pytest.raises(UsageError, match="attach_guest_to_lan needs lan_bridge"):
        host.attach_guest_to_lan(params)


@pytest.mark.root
def test_failures_name_the_object_and_keep_the_cause(topology: Topology) -> None:
    params = host_params(Role.PRIMARY)
    missing_port = dataclasses.replace(params, guest_port="nope0")
    with pytest.raises(NetError, match="guest port nope0 does not exist"):
        topology.run_in("hp", host.setup, missing_port)
    missing_underlay = dataclasses.replace(params, underlay="nope1")
    with pytest.raises(NetError, match="underlay nope1 does not exist"):
        topology.run_in("hp", host.setup, missing_underlay)
    # the kernel refuses a second VXLAN with the same VNI, port and local address
    topology.exec(
        "hp",
        [
            *("ip", "link", "add", "other-vx", "type", "vxlan", "id", "77", "dstport", "4789"),
            *("local", "10.255.77.1", "remote", "10.255.77.2", "dev", "repl"),
        ],
    )
    with pytest.raises(NetError, match=r"creating VXLAN cp-vx .*File exists") as caught:
        topology.run_in("hp", host.setup, params)
    assert isinstance(caught.value.__cause__, NetlinkError)
    with pytest.raises(NetError, match="iptables-restore --noflush failed with exit status 1"):
        run_command(["iptables-restore", "--noflush"], input="*filter\n-A NOCHAIN -j ACCEPT\n")


def test_host_parameters_are_validated() -> None:
    good = {
        "prefix": "cp",
        "pair": "t1",
        "role": "primary",
        "guest_port": "tap0",
        "local_address": ipaddress.ip_address("10.0.0.1"),
        "remote_address": ipaddress.ip_address("10.0.0.2"),
        "vxlan_id": 7,
        "queues": QUEUES,
    }
    assert HostNet(**good).role is Role.PRIMARY  # type: ignore[arg-type]
    with_text = HostNet(**{**good, "local_address": "10.0.0.1"})  # type: ignore[arg-type]
    assert with_text.local_address == ipaddress.ip_address("10.0.0.1")
    bad: list[tuple[dict[str, object], str]] = [
        ({"remote_address": ipaddress.ip_address("fd00::2")}, "different families"),
        ({"local_address": "not-an-address"}, "is not an IP address"),
        ({"vxlan_id": 0}, "is not a VNI"),
        ({"vxlan_id": 1 << 24}, "is not a VNI"),
        ({"vxlan_port": 0}, "is not a UDP port"),
        ({"prefix": "toolong"}, "net prefix"),
        ({"lan_bridge": "br lan"}, "lan bridge"),
        ({"queues": QueueNumbers()}, "needs queue numbers"),
        ({"role": "tertiary"}, "tertiary"),
    ]
    for change, message in bad:
        with pytest.raises(UsageError, match=message):
            HostNet(**{**good, **change})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the data path, without coloproxy


def guest_address(family: int) -> str:
    return GUEST_IPV4 if family == 4 else GUEST_IPV6


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6])
def test_with_an_accept_all_consumer_the_client_reaches_the_pvm_and_the_svm_gets_a_copy(
    topology: Topology, family: int
) -> None:
    """``family`` is the guests' traffic and the replication link's (both tunnel underlays)."""
    set_up(topology, family)
    consumer = Consumer(topology, QUEUES)
    servers = [
        EchoServer(topology, "pvm", family, PORT, banner=b"pvm:"),
        EchoServer(topology, "svm", family, PORT, banner=b"svm:"),
    ]
    try:
        with (
            Sniffer(topology, "svm", "eth0") as at_svm,
            Sniffer(topology, "client", "eth0") as at_client,
        ):
            with client_socket(topology, family) as client:
                client.settimeout(5.0)
                client.connect((guest_address(family), PORT))
                client.sendall(b"ping")
                assert client.recv(100) == b"pvm:ping"
            guest = guest_address(family)

            def svm_isn() -> set[int]:  # the SVM's SYN-ACK, accepted on S-out
                records = consumer.records()
                answers = [r for r in records if r.get("src") == guest and r["flags"] & SYN]
                pvm = {r["seq"] for r in answers if r["queue"] == QUEUES.primary_out}
                return {r["seq"] for r in answers if r["queue"] == QUEUES.secondary_out} - pvm

            assert wait_for(svm_isn, timeout=5.0), "S-out saw no SYN-ACK of the SVM"

            def leaked() -> bool:
                segments = [s for s in map(tcp_of_frame, at_client.frames()) if s is not None]
                return any(s.source == guest and s.seq in svm_isn() for s in segments)

            # Accepted by the consumer, it still never reaches the client (I3): watched.
            assert not wait_for(leaked, timeout=0.3), "the SVM's SYN-ACK reached the client"
            svm_frames, client_frames = at_svm.stop(), at_client.stop()
    finally:
        records = consumer.stop()
        for server in servers:
            server.close()

    def seen(queue: int | None, flags: int, towards_guest: bool) -> list[dict[str, object]]:
        field, port = ("dst", "dport") if towards_guest else ("src", "sport")
        return [
            r
            for r in records
            if r["queue"] == queue
            and r.get(field) == guest
            and r.get(port) == PORT
            and r["flags"] & (SYN | ACK) == flags
        ]

    pvm_syn_ack = seen(QUEUES.primary_out, SYN | ACK, towards_guest=False)
    svm_syn_ack = seen(QUEUES.secondary_out, SYN | ACK, towards_guest=False)
    client_syn_copies = seen(QUEUES.secondary_in, SYN, towards_guest=True)
    svm_syn_ack_on_host_s = seen(QUEUES.secondary_egress, SYN | ACK, towards_guest=False)
    assert svm_syn_ack_on_host_s, f"host S saw no SYN-ACK of the SVM: {records}"
    # Towards the tunnel host S queues the SVM's SYN-ACKs only: host P compares the rest.
    assert all(r["flags"] & (SYN | ACK) == SYN | ACK for r in records if r["queue"] == 7713)
    assert pvm_syn_ack, f"P-out saw no SYN-ACK of the PVM: {records}"
    assert client_syn_copies, f"S-in saw no copy of the client's SYN: {records}"
    assert svm_syn_ack, f"S-out saw no SYN-ACK of the SVM: {records}"
    # The SVM got the mirrored SYN through the tunnel...
    svm_segments = [s for s in map(tcp_of_frame, svm_frames) if s is not None]
    assert any(s.destination_port == PORT and s.flags & SYN for s in svm_segments)
    # ... and its answer, accepted by the consumer, still never reached the client (I3).
    svm_isn = {r["seq"] for r in svm_syn_ack} - {r["seq"] for r in pvm_syn_ack}
    assert svm_isn
    client_segments = [s for s in map(tcp_of_frame, client_frames) if s is not None]
    assert not [s for s in client_segments if s.source == guest and s.seq in svm_isn]


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6])
def test_without_a_consumer_nothing_passes_the_queues(topology: Topology, family: int) -> None:
    """Fail closed: PVM output is dropped, the SVM gets no copy, nothing reaches the client."""
    set_up(topology, family)
    servers = [
        EchoServer(topology, "pvm", family, PORT, banner=b"pvm:"),
        EchoServer(topology, "svm", family, PORT, banner=b"svm:"),
    ]
    try:
        with (
            Sniffer(topology, "svm", "eth0") as at_svm,
            Sniffer(topology, "client", "eth0") as at_client,
        ):
            with client_socket(topology, family) as client:
                client.settimeout(1.0)
                with pytest.raises(OSError):  # TimeoutError, or EHOSTUNREACH when ND fails
                    client.connect((guest_address(family), PORT))
            svm_frames, client_frames = at_svm.stop(), at_client.stop()
    finally:
        for server in servers:
            server.close()
    guest = guest_address(family)
    assert not [f for f in client_frames if ip_source_of_frame(f) == guest]
    svm_segments = [s for s in map(tcp_of_frame, svm_frames) if s is not None]
    assert not [s for s in svm_segments if s.destination_port == PORT]
