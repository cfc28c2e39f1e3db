"""The proxy on real namespaces, NFQUEUE, VXLAN and tc: a client served by a protected pair.

Hosts and guests are network namespaces (tests/pairworld.py). Everything crosses real veth
links, bridges with br_netfilter, a VXLAN tunnel, a tc mirror and three NFQUEUE queues.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from coloproxy.lab.topology import CLIENT_IPV4, GUEST_IPV4
from coloproxy.protocol import Mode, ProxyRole
from netfixtures import snapshot, topology_fixture
from pairworld import BIG, PairWorld, http_get, http_post, sha256_line, tcp_echo, udp_echo

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PairWorld]:
    with topology_fixture() as topology:
        pair = PairWorld(topology, tmp_path_factory.mktemp("pair"))
        try:
            yield pair.start()
        finally:
            pair.stop()


def test_the_first_checkpoint_is_the_restart_request(world: PairWorld) -> None:
    assert world.engine is not None
    assert world.engine.reasons()[0] == "restart"


def test_download_and_upload_get_the_primary_bytes(world: PairWorld) -> None:
    assert world.engine is not None
    before = len(world.engine.requests)
    status, body, _ = world.client(http_get, "/big")
    assert status == 200
    assert body == BIG
    upload = bytes(range(256)) * 1024
    assert world.client(http_post, "/upload", upload) == sha256_line(upload)
    # No divergence: in particular the SVM kept its connections (an RST from it would be a
    # fate divergence), because the client's ACKs reached it shifted by the ISN offset.
    assert world.engine.requests[before:] == [], world.diagnose()
    assert world.status().held_packets == 0
    host_s = world.status("secondary")
    assert host_s.counters["rewrites"] > 0  # shifted on host S, where the SVM runs
    assert host_s.counters["offsets_learnt"] >= 2


def test_an_injected_divergence_is_one_request_with_flow_and_evidence(world: PairWorld) -> None:
    assert world.engine is not None
    before = len(world.engine.requests)
    status, body, port = world.client(http_get, "/diverge")
    assert status == 200
    assert body == b"variant: primary.........\n"  # the primary's bytes, after the checkpoint
    requests = world.engine.requests[before:]
    assert [r.reason for r in requests] == ["payload"], world.diagnose()
    (request,) = requests
    assert request.flow == f"tcp {GUEST_IPV4}:80 -> {CLIENT_IPV4}:{port}"
    assert request.evidence is not None
    assert request.evidence.primary[request.evidence.before :].startswith(b"primary")
    assert request.evidence.secondary[request.evidence.before :].startswith(b"secondary")
    # the differing byte's stream offset: the response headers, then "variant: "
    headers = (
        b"HTTP/1.1 200 OK\r\nServer: guestd \r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 26\r\n\r\n"
    )
    assert request.evidence.offset == len(headers) + len(b"variant: ")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_udp_and_tcp_echo(world: PairWorld, family: int) -> None:
    assert world.engine is not None
    before = len(world.engine.requests)
    assert world.client(udp_echo, b"datagram " * 50, family) == b"datagram " * 50
    assert world.client(tcp_echo, b"stream " * 5000, family) == b"stream " * 5000
    status, body, _ = world.client(http_get, "/", family)
    assert status == 200 and body == b"hello from the guest\n" * 10
    assert world.engine.requests[before:] == [], world.diagnose()


def test_metrics_are_served(world: PairWorld) -> None:
    text = world.scrape()
    assert "coloproxy_packets_total{" in text
    assert "primary-out" in text
    assert "coloproxy_checkpoint_requests_total" in text


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[PairWorld]:
    with topology_fixture() as topology:
        # 4 KiB of stored bytes: a few segments of a download waiting for their match
        pair = PairWorld(topology, tmp_path, max_held_bytes=4096)
        try:
            yield pair.start()
        finally:
            pair.stop()


def test_overflow_is_a_checkpoint_not_a_drop(fresh: PairWorld) -> None:
    assert fresh.engine is not None
    status, body, _ = fresh.client(http_get, "/big")
    assert (status, body == BIG) == (200, True)
    assert "overflow" in fresh.engine.reasons()


def test_killed_proxy_stops_output_and_a_restart_asks_for_a_checkpoint_first(
    fresh: PairWorld,
) -> None:
    assert fresh.engine is not None
    fresh.kill_primary()
    with pytest.raises(OSError):
        fresh.client(http_get, "/", socket.AF_INET, 2.0)  # fail closed: nothing gets through
    seen = len(fresh.engine.requests)
    fresh.start_primary()
    fresh.wait_until(lambda: len(fresh.engine.requests) > seen, what="a request after the restart")
    assert fresh.engine.requests[seen].reason == "restart"
    status, body, _ = fresh.client(http_get, "/")
    assert status == 200 and body == b"hello from the guest\n" * 10


def test_connections_survive_a_takeover_with_the_svms_sequence_numbers_shifted(
    fresh: PairWorld,
) -> None:
    """The namespace guests never share state, so every connection keeps its ISN and TSval
    offsets for good: after the takeover host S must shift the SVM's output into the numbers
    the client knows (the PVM's), or the client drops it and the connection dies."""
    connection = fresh.topology.run_in("client", socket.socket, socket.AF_INET)
    with connection:
        connection.settimeout(5.0)
        connection.connect((GUEST_IPV4, 7))
        connection.sendall(b"before")
        assert connection.recv(100) == b"before"  # the PVM's answer, released by host P
        fresh.take_over()
        connection.sendall(b"after the takeover")
        assert connection.recv(100) == b"after the takeover"  # the SVM's, shifted on host S
        connection.sendall(b"x" * 300_000)  # and a stream of it, acknowledged both ways
        received = 0
        while received < 300_000:
            received += len(connection.recv(65536))
    host_s = fresh.status("secondary")
    assert (host_s.role, host_s.mode) == (ProxyRole.PRIMARY, Mode.UNPROTECTED)
    assert host_s.counters["takeover_rewrites"] > 0, fresh.log("secondary")
    # A connection opened after the takeover is the SVM's own: nothing to shift.
    assert fresh.client(tcp_echo, b"new", socket.AF_INET) == b"new"


def test_teardown_leaves_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    with topology_fixture() as topology:
        before = {role: snapshot(topology, role) for role in ("hp", "hs")}
        pair = PairWorld(topology, tmp_path)
        try:
            pair.start()
            status, _, _ = pair.client(http_get, "/")
            assert status == 200
        finally:
            pair.stop()
        for role, config in (("hp", pair.primary_config), ("hs", pair.secondary_config)):
            topology.exec(role, [sys.executable, "-m", "coloproxy", "teardown", "-c", str(config)])
        assert {role: snapshot(topology, role) for role in ("hp", "hs")} == before
        assert subprocess.run(["true"], check=True).returncode == 0
