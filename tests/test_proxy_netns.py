"""The proxy on real namespaces, NFQUEUE, VXLAN and tc: a client served by a protected pair.

Hosts and guests are network namespaces (tests/pairworld.py). Everything crosses real veth
links, bridges with br_netfilter, a VXLAN tunnel, a tc mirror and three NFQUEUE queues.
"""

from __future__ import annotations

import asyncio
import errno
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coloproxy.capture import read_queue_stats
from coloproxy.control import ControlClient, ControlRefusedError
from coloproxy.lab.topology import CLIENT_IPV4, GUEST_IPV4, GUEST_IPV6
from coloproxy.protocol import AttachLan, ClientRole, Mode
from coloproxy.role import Role
from netfixtures import QUEUES, snapshot, topology_fixture
from pairworld import (
    BIG,
    SPLIT_QUEUE,
    PairWorld,
    arriving,
    http_get,
    http_post,
    receive_exactly,
    sha256_line,
    tcp_echo,
    udp_echo,
)

pytestmark = pytest.mark.root


# guestd's answer to GET /diverge from the PVM: the SVM's differs from "primary" on.
DIVERGE_HEADERS = (
    b"HTTP/1.1 200 OK\r\nServer: guestd \r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 26\r\n\r\n"
)
DIVERGE_BODY = b"variant: primary.........\n"


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


def _retransmitted(world: PairWorld, guest: str) -> int:
    """The guest's retransmission timeouts (TcpExt TCPTimeouts, /proc/net/netstat of its
    namespace): a stalled stream ends in them; a tail-loss probe of a segment held a little
    longer on a loaded machine is no timeout."""
    lines = world.topology.exec(guest, ["cat", "/proc/net/netstat"]).stdout.splitlines()
    names, values = [line.split() for line in lines if line.startswith("TcpExt:")][:2]
    return int(values[names.index("TCPTimeouts")])


def _downloads(count: int, parallel: int) -> list[bytes]:
    """``count`` GETs of /big, ``parallel`` at a time (threads; in the client's namespace)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda _: http_get("/big")[1], range(count)))


def test_bulk_downloads_flow_without_a_checkpoint_or_a_retransmission(world: PairWorld) -> None:
    # A GSO packet of the PVM's (P-out takes them whole, up to 64 KiB) is released only once
    # the SVM sent all of its bytes; the SVM sends the last of them only after the client's
    # ACK of that very packet whenever its congestion window is smaller than the PVM's. The
    # split (CompareConfig.split_after) hands such a packet back to be cut into segments, so
    # the verified part leaves. Without it both guests sat until their retransmission timeout
    # and the proxy until compare_timeout's checkpoint.
    assert world.engine is not None
    before = len(world.engine.requests)
    retransmitted = {guest: _retransmitted(world, guest) for guest in ("pvm", "svm")}
    bodies = world.client(_downloads, 16, 2)
    assert all(body == BIG for body in bodies)
    assert world.engine.requests[before:] == [], world.diagnose()
    after = {guest: _retransmitted(world, guest) for guest in ("pvm", "svm")}
    assert after == retransmitted, (retransmitted, after)
    assert world.status().held_packets == 0


def test_an_injected_divergence_is_one_request_with_flow_and_evidence(world: PairWorld) -> None:
    assert world.engine is not None
    before = len(world.engine.requests)
    status, body, port = world.client(http_get, "/diverge")
    assert status == 200
    assert body == DIVERGE_BODY  # the primary's bytes, after the checkpoint
    requests = world.engine.requests[before:]
    assert [r.reason for r in requests] == ["payload"], world.diagnose()
    (request,) = requests
    assert request.flow == f"tcp {GUEST_IPV4}:80 -> {CLIENT_IPV4}:{port}"
    assert request.evidence is not None
    assert request.evidence.primary[request.evidence.before :].startswith(b"primary")
    assert request.evidence.secondary[request.evidence.before :].startswith(b"secondary")
    # the differing byte's stream offset: the response headers, then "variant: "
    assert request.evidence.offset == len(DIVERGE_HEADERS) + len(b"variant: ")


def test_diverged_output_reaches_the_client_only_after_the_checkpoint(world: PairWorld) -> None:
    """Output commit on the NFQUEUE path (I1): the engine double holds the checkpoint open;
    from the divergence to ``checkpoint-completed`` the client gets nothing of the diverged
    bytes (the headers before them match, and may come), neither while the request waits
    nor while the checkpoint runs; after it, all of the primary's response."""
    engine = world.engine
    assert engine is not None
    before = len(engine.requests)
    connection = world.topology.run_in("client", socket.create_connection, (GUEST_IPV4, 80), 5)
    with connection, engine.holding():
        connection.sendall(b"GET /diverge HTTP/1.1\r\nHost: guest\r\n\r\n")
        engine.wait_for_requests(before + 1)
        assert [r.reason for r in engine.pending] == ["payload"], world.diagnose()
        # The request names a segment compared with the PVM's, which is held by then.
        early = arriving(connection, 1.0)
        assert DIVERGE_HEADERS.startswith(early), f"unverified output reached the client: {early!r}"
        asked = world.status()
        assert (asked.checkpoint_requested, asked.checkpointing) == (True, False)
        assert asked.held_packets > 0
        engine.start()
        early += arriving(connection, 0.5)
        running = world.status()
        assert (running.checkpoint_requested, running.checkpointing) == (True, True)
        assert running.held_packets > 0
        assert DIVERGE_HEADERS.startswith(early), f"unverified output reached the client: {early!r}"
        engine.complete()
        response = DIVERGE_HEADERS + DIVERGE_BODY
        rest = receive_exactly(connection, len(response) - len(early))
    assert early + rest == response


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_udp_and_tcp_echo(world: PairWorld, family: int) -> None:
    assert world.engine is not None
    before = len(world.engine.requests)
    assert world.client(udp_echo, b"datagram " * 50, family) == b"datagram " * 50
    assert world.client(tcp_echo, b"stream " * 5000, family) == b"stream " * 5000
    status, body, _ = world.client(http_get, "/", family)
    assert status == 200 and body == b"hello from the guest\n" * 10
    assert world.engine.requests[before:] == [], world.diagnose()


def test_host_s_refuses_to_join_the_lan_while_protected(world: PairWorld) -> None:
    """``attach-lan`` before ``failover`` would put the SVM's output on the LAN (I3)."""

    async def attach() -> None:
        client = await ControlClient.connect(world.secondary_socket, ClientRole.ENGINE)
        try:
            await client.request(AttachLan())
        finally:
            await client.close()

    with pytest.raises(ControlRefusedError, match="took over"):
        asyncio.run(attach())
    link = world.topology.exec("hs", ["ip", "-o", "link", "show", "guest0"]).stdout
    assert "master br-lan" not in link


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
    """At the stored-bytes bound the proxy asks for a checkpoint and drops nothing: the
    kernel queued every P-out packet once and we accepted each (TCP retransmission would
    repair drops, so the body arriving whole would prove nothing)."""
    assert fresh.engine is not None
    status, body, _ = fresh.client(http_get, "/big")
    assert (status, body == BIG) == (200, True)
    assert "overflow" in fresh.engine.reasons()
    queues = {
        QUEUES.primary_out: "primary-out",
        QUEUES.secondary_out: "secondary-out",
        SPLIT_QUEUE: "primary-split",
    }

    def split() -> int:  # P-out packets handed back to be cut into segments
        return sum(
            int(sample.value)
            for family in text_string_to_metric_families(fresh.scrape())
            for sample in family.samples
            if sample.name == "coloproxy_packets_total"
            and sample.labels["queue"] == "primary-out"
            and sample.labels["verdict"] == "split"
        )

    def settled() -> bool:  # every packet queued on P-out (or the split queue) has its verdict
        stats = read_queue_stats(netns=fresh.topology.ns("hp"))
        out, segments = stats[QUEUES.primary_out], stats.get(SPLIT_QUEUE)
        queued = out.id_sequence - split() + (segments.id_sequence if segments else 0)
        waiting = out.queue_total + (segments.queue_total if segments else 0)
        return waiting == 0 and fresh.status().counters["released"] == queued

    fresh.wait_until(settled, what="a verdict for every P-out packet the kernel queued")
    kernel = read_queue_stats(netns=fresh.topology.ns("hp"))
    assert {
        name: (kernel[number].queue_dropped, kernel[number].user_dropped)
        for number, name in queues.items()
        if number in kernel  # the split queue is listed once a packet went there
    } == {name: (0, 0) for number, name in queues.items() if number in kernel}
    samples = [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(fresh.scrape())
        for sample in family.samples
    ]
    families = ("coloproxy_nfqueue_queue_dropped_total", "coloproxy_nfqueue_user_dropped_total")
    dropped = {(name, labels["name"]): value for name, labels, value in samples if name in families}
    assert sorted(dropped) == sorted(
        (name, queue) for name in families for queue in queues.values()
    )
    assert set(dropped.values()) == {0.0}, dropped
    # The proxy itself never drops a PVM packet: every P-out verdict was an accept (or a split,
    # whose segments were accepted from the split queue: counted in "released" above).
    verdicts = {
        labels["verdict"]
        for name, labels, _ in samples
        if name == "coloproxy_packets_total" and labels["queue"] == "primary-out"
    }
    assert verdicts <= {"accept", "split"} and "accept" in verdicts
    held = fresh.status()
    assert held.held_packets == 0 and held.counters["released"] > len(BIG) // 65536


def test_killed_proxy_stops_output_and_a_restart_holds_everything_until_a_checkpoint(
    fresh: PairWorld,
) -> None:
    """Fail closed while no proxy runs; a restarted proxy asks for a checkpoint first and
    releases nothing, not even output the SVM matches, until it completed (I6)."""
    engine = fresh.engine
    assert engine is not None
    fresh.kill_primary()
    dead = fresh.topology.run_in("client", socket.socket, socket.AF_INET)
    with dead:
        dead.setblocking(False)
        assert dead.connect_ex((GUEST_IPV4, 80)) == errno.EINPROGRESS
        _, connected, _ = select.select([], [dead], [], 1.5)  # the SYN and one retransmission
        assert not connected, "the PVM's answer passed while no proxy runs"
    seen = len(engine.requests)
    connection = fresh.topology.run_in("client", socket.socket, socket.AF_INET)
    with connection:
        with engine.holding():
            fresh.start_primary()
            engine.wait_for_requests(seen + 1, timeout=20)
            assert [r.reason for r in engine.pending] == ["restart"]
            connection.setblocking(False)
            assert connection.connect_ex((GUEST_IPV4, 80)) == errno.EINPROGRESS
            fresh.wait_until(
                lambda: fresh.status().held_packets > 0, timeout=10, what="the PVM's SYN-ACK held"
            )
            _, connected, _ = select.select([], [connection], [], 1.0)
            assert not connected, "the PVM's SYN-ACK reached the client before the checkpoint"
            frozen = fresh.status()
            assert (frozen.checkpoint_requested, frozen.checkpointing, frozen.epoch) == (
                True,
                True,
                0,
            )
            assert frozen.held_packets > 0 and frozen.counters["released"] == 0
            engine.complete()
            _, connected, _ = select.select([], [connection], [], 5.0)
            assert connected and connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        connection.setblocking(True)
        connection.sendall(b"GET / HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n")
        response = receive_exactly(connection, 1 << 16)
    assert response.endswith(b"\r\n\r\n" + b"hello from the guest\n" * 10)
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
    assert (host_s.role, host_s.mode) == (Role.PRIMARY, Mode.UNPROTECTED)
    assert host_s.counters["takeover_rewrites"] > 0, fresh.log("secondary")
    # A connection opened after the takeover is the SVM's own: nothing to shift.
    assert fresh.client(tcp_echo, b"new", socket.AF_INET) == b"new"


def _ss(world: PairWorld, where: str, state: str, port_filter: str) -> str:
    """``ss`` of the TCP sockets in ``state`` matching ``port_filter`` in ``where``."""
    argv = ["ss", "-tnioH", "state", state, f"( {port_filter} )"]
    return world.topology.exec(where, argv).stdout


def _svm_half_open(world: PairWorld, port: int) -> bool:
    """Whether the SVM holds a connection request (SYN-RECEIVED) on its ``port``."""
    return bool(_ss(world, "svm", "syn-recv", f"sport = :{port}").strip())


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_a_connection_half_open_at_the_takeover_is_answered_at_once(
    fresh: PairWorld, family: int
) -> None:
    """The PVM stops answering; the client's SYN still reaches the SVM through host P's
    mirror, and the SVM's SYN-ACK goes to host P (dropped there, I3). Then host P dies, and
    after the takeover host S hands the SVM that SYN once more: the SVM's SYN-ACK reaches the
    client at once.

    Nothing else could complete the handshake here: the client's SYN retransmissions are
    dropped in its own namespace, and the SVM resends no SYN-ACK of its own
    (``tcp_synack_retries`` 0). Without the replay the client would wait for its next SYN
    retransmission, a second or more away (``tcp_syn_linear_timeouts``).
    """
    tables, guest = (
        ("iptables", GUEST_IPV4) if family == socket.AF_INET else ("ip6tables", GUEST_IPV6)
    )
    fresh.topology.exec("pvm", [tables, "-I", "INPUT", "-p", "tcp", "--dport", "7", "-j", "DROP"])
    fresh.topology.exec("svm", ["sysctl", "-qw", "net.ipv4.tcp_synack_retries=0"])
    connection = fresh.topology.run_in("client", socket.socket, family)
    with connection:
        connection.setblocking(False)
        assert connection.connect_ex((guest, 7)) == errno.EINPROGRESS
        fresh.wait_until(lambda: _svm_half_open(fresh, 7), what="the SVM's connection request")
        resent_syn = ["OUTPUT", "-p", "tcp", "--dport", "7", "--syn", "-j", "DROP"]
        fresh.topology.exec("client", [tables, "-I", *resent_syn])
        fresh.take_over()
        _, writable, _ = select.select([], [connection], [], 5.0)
        assert writable, "the handshake did not complete after the takeover"
        assert connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        connection.setblocking(True)
        connection.settimeout(5.0)
        connection.sendall(b"half-open at the takeover")
        assert connection.recv(100) == b"half-open at the takeover"
    host_s = fresh.status("secondary")
    assert host_s.counters["syns_replayed"] == 1, fresh.log("secondary")


def test_a_client_established_with_the_pvm_but_not_the_svm_teaches_the_offset_after_the_replay(
    fresh: PairWorld,
) -> None:
    """The client had the PVM's SYN-ACK, its handshake ACK never reached host S (dropped there
    before S-in, as if it died with host P). The replayed SYN makes the SVM send its SYN-ACK
    to the client, which answers from ESTABLISHED with an ACK of the PVM's ISN + 1: host S
    learns the offset from it before the client sends anything, and the connection goes on.

    Nothing else could teach it here: the SVM resends no SYN-ACK of its own
    (``tcp_synack_retries`` 0), and the client sends nothing until the offset is learnt.
    Without the replay the SVM would resend its SYN-ACK 1 s, 3 s, 7 s after its first.
    """
    fresh.topology.exec("svm", ["sysctl", "-qw", "net.ipv4.tcp_synack_retries=0"])
    drop_acks = ["FORWARD", "-p", "tcp", "--dport", "7", "!", "--syn", "-j", "DROP"]
    fresh.topology.exec("hs", ["iptables", "-t", "mangle", "-I", *drop_acks])
    connection = fresh.topology.run_in("client", socket.socket, socket.AF_INET)
    with connection:
        connection.settimeout(5.0)
        connection.connect((GUEST_IPV4, 7))  # with the PVM
        fresh.wait_until(lambda: _svm_half_open(fresh, 7), what="the SVM's connection request")
        fresh.topology.exec("hs", ["iptables", "-t", "mangle", "-D", *drop_acks])
        learnt = fresh.status("secondary").counters["offsets_learnt"]
        fresh.take_over()
        fresh.wait_until(
            lambda: fresh.status("secondary").counters["offsets_learnt"] == learnt + 1,
            timeout=5.0,
            what="the offset learnt from the client's answer to the SVM's SYN-ACK",
        )
        assert fresh.status("secondary").counters["connections_shifted"] == 1  # not zero
        connection.sendall(b"established before the takeover")
        assert connection.recv(100) == b"established before the takeover"
    host_s = fresh.status("secondary")
    assert host_s.counters["syns_replayed"] == 1, fresh.log("secondary")


def _svm_socket(world: PairWorld, port: int) -> str:
    """``ss`` of the SVM's established socket of the client's ``port``."""
    return _ss(world, "svm", "established", f"dport = :{port}")


def _svm_backoff(world: PairWorld, port: int) -> int:
    """The retransmission backoff of the SVM's socket of the client's ``port``."""
    found = re.search(r"backoff:(\d+)", _svm_socket(world, port))
    return int(found.group(1)) if found else 0


def _svm_retransmissions(world: PairWorld, port: int) -> int:
    """Segments the SVM's socket of the client's ``port`` retransmitted in all (``retrans``
    current/total; absent while there were none)."""
    found = re.search(r"retrans:\d+/(\d+)", _svm_socket(world, port))
    return int(found.group(1)) if found else 0


def _svm_timer_left(world: PairWorld, port: int) -> float:
    """Seconds until the retransmission timer of the SVM's socket of ``port`` fires: its
    current timeout less the time since it last sent (``ss -i``: rto, lastsnd; in ms)."""
    listing = _svm_socket(world, port)
    rto, lastsnd = re.search(r"\brto:(\d+)", listing), re.search(r"\blastsnd:(\d+)", listing)
    assert rto and lastsnd, f"no timer figures for the SVM's socket: {listing}"
    return (int(rto.group(1)) - int(lastsnd.group(1))) / 1000


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_data_the_svm_sent_towards_host_p_is_resent_at_once_after_the_takeover(
    fresh: PairWorld, family: int
) -> None:
    """The PVM's answer never leaves it (as if held for comparison when host P died); the
    SVM's went to host P and was dropped there (I3), and the SVM's retransmission timer has
    backed off three times: its next retransmission is 1.6 s after its third. Right after the
    takeover host S hands the SVM ICMP unreachable messages quoting the client's latest ACK
    (RFC 6069): the SVM undoes its backoff and resends at once, now to the client.

    "At once" is checked against the SVM's own clock: the data reaches the client before the
    retransmission timer the SVM had at the takeover fires (without the messages it comes
    with that timer).
    """
    tables, guest = (
        ("iptables", GUEST_IPV4) if family == socket.AF_INET else ("ip6tables", GUEST_IPV6)
    )
    # The PVM's data segments only: its ACKs still reach the client, which then resends
    # nothing of its own.
    drop = ["OUTPUT", "-p", "tcp", "--sport", "7", "-m", "length", "!", "--length", "0:100"]
    fresh.topology.exec("pvm", [tables, "-I", *drop, "-j", "DROP"])
    message = b"in flight at the takeover " * 10
    connection = fresh.topology.run_in("client", socket.socket, family)
    with connection:
        connection.settimeout(5.0)
        connection.connect((guest, 7))
        port = connection.getsockname()[1]
        connection.sendall(message)
        fresh.wait_until(
            lambda: _svm_backoff(fresh, port) >= 3,
            timeout=5.0,
            what="the SVM's third retransmission timeout",
        )
        timer_fires = time.monotonic() + _svm_timer_left(fresh, port)
        fresh.take_over()
        received = receive_exactly(connection, len(message))
        arrived = time.monotonic()
        assert received == message
        assert arrived < timer_fires, "the data came with the SVM's own timer, not at once"
    host_s = fresh.status("secondary")
    assert host_s.counters["backoff_reverts"] >= 1, fresh.log("secondary")


def _svm_unacked(world: PairWorld, port: int) -> bool:
    """Whether the SVM's socket of the client's ``port`` has data not acknowledged (``ss``)."""
    return "unacked:" in _svm_socket(world, port)


def test_an_ack_the_svm_missed_is_handed_to_it_again_after_the_takeover(fresh: PairWorld) -> None:
    """The client acknowledged the PVM's echo; host S's S-in saw that ACK, but the SVM did not
    take it (dropped in the SVM here; across a checkpoint, shifted with a stale offset), so
    the SVM resends its echo towards host P, backing off. The ICMP errors quote the client's
    ACK, which is not the SVM's oldest unacknowledged byte: only the client's latest segment,
    handed to the SVM again at the takeover, settles it, with no retransmission of the SVM's.

    Without it the SVM waits for its fourth timeout, 1.6 s after its third, retransmits, and
    only then learns from the client's duplicate ACK.
    """
    drop = ["INPUT", "-p", "tcp", "--dport", "7", "--tcp-flags", "ALL", "ACK", "-j", "DROP"]
    fresh.topology.exec("svm", ["iptables", "-I", *drop])
    message = b"acknowledged by the client, not by the SVM " * 5
    connection = fresh.topology.run_in("client", socket.socket, socket.AF_INET)
    with connection:
        connection.settimeout(5.0)
        connection.connect((GUEST_IPV4, 7))
        port = connection.getsockname()[1]
        connection.sendall(message)  # PSH+ACK: it passes, and completes the SVM's handshake
        # the PVM's echo, released by host P
        assert receive_exactly(connection, len(message)) == message
        fresh.wait_until(
            lambda: _svm_backoff(fresh, port) >= 3,
            timeout=5.0,
            what="the SVM's third retransmission timeout",
        )
        fresh.topology.exec("svm", ["iptables", "-D", *drop])
        retransmitted = _svm_retransmissions(fresh, port)
        fresh.take_over()
        fresh.wait_until(
            lambda: not _svm_unacked(fresh, port), timeout=5.0, what="the SVM's echo acknowledged"
        )
        assert _svm_retransmissions(fresh, port) == retransmitted, (
            "the SVM retransmitted before it learnt the client's ACK: the handed segment did"
            " not settle it"
        )
        connection.sendall(b"after")
        assert connection.recv(100) == b"after"


def test_teardown_leaves_nothing(tmp_path: Path) -> None:
    import sys

    with topology_fixture() as topology:
        before = {role: snapshot(topology, role) for role in ("hp", "hs")}
        pair = PairWorld(topology, tmp_path)
        try:
            pair.start()
            status, _, _ = pair.client(http_get, "/")
            assert status == 200
            during = {role: snapshot(topology, role) for role in ("hp", "hs")}
        finally:
            pair.stop()
        # Each daemon set up its host (so the teardown below has something to remove) ...
        assert all(during[role] != before[role] for role in ("hp", "hs"))
        for role, config in (("hp", pair.primary_config), ("hs", pair.secondary_config)):
            topology.exec(role, [sys.executable, "-m", "coloproxy", "teardown", "-c", str(config)])
        # ... and left it in place (fail closed) until `coloproxy teardown` removed it all.
        assert {role: snapshot(topology, role) for role in ("hp", "hs")} == before
