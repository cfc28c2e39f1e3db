"""PrimaryProxy and SecondaryProxy with fake queues: verdicts, requests, restart safety (I6)."""

from __future__ import annotations

from coloproxy.compare import Comparator, CompareConfig
from coloproxy.daemon.primary import CheckpointRequest, PrimaryProxy
from coloproxy.daemon.secondary import SecondaryProxy
from coloproxy.rewrite import SecondaryRewriter
from coloproxy.rewrite.secondary import REVERTS_PER_CONNECTION
from craft import ACK, SYN, tcp

P_ISN, S_ISN = 1000, 900_000


class FakeQueue:
    def __init__(self) -> None:
        self.accepted: list[tuple[object, bytes | None]] = []
        self.dropped: list[object] = []

    def accept(self, handle: object, payload: bytes | None = None) -> None:
        self.accepted.append((handle, payload))

    def drop(self, handle: object) -> None:
        self.dropped.append(handle)


class FakeSink:
    def __init__(self) -> None:
        self.requests: list[CheckpointRequest] = []

    def checkpoint_requested(self, request: CheckpointRequest) -> None:
        self.requests.append(request)


def make() -> tuple[PrimaryProxy, FakeQueue, FakeQueue, FakeSink]:
    comparator = Comparator(CompareConfig())
    primary_out, secondary_out, sink = FakeQueue(), FakeQueue(), FakeSink()
    proxy = PrimaryProxy(comparator, primary_out, secondary_out, sink, now=0.0)
    return proxy, primary_out, secondary_out, sink


def test_a_new_proxy_holds_everything_and_asks_for_a_checkpoint_first() -> None:
    proxy, primary_out, secondary_out, sink = make()
    assert [(r.id, r.reason) for r in sink.requests] == [(1, "restart")]
    # Output the secondary matches exactly: a comparing proxy would release it at once.
    proxy.on_primary("p-syn", tcp(P_ISN, flags=SYN | ACK), 0.1)
    proxy.on_secondary("s-syn", tcp(S_ISN, flags=SYN | ACK), 0.1)
    proxy.on_primary("p1", tcp(P_ISN + 1, b"same"), 0.1)
    proxy.on_secondary("s1", tcp(S_ISN + 1, b"same"), 0.1)
    assert primary_out.accepted == []
    assert secondary_out.dropped == ["s-syn", "s1"]
    proxy.handle_timer(50.0)  # long past every timeout: still nothing before a checkpoint
    proxy.checkpoint_started(50.1)
    proxy.on_primary("p2", tcp(P_ISN + 5, b"more"), 50.2)
    assert primary_out.accepted == []
    assert proxy.comparator.stats().held_packets == 3
    proxy.checkpoint_completed(50.3)
    assert [h for h, _ in primary_out.accepted] == ["p-syn", "p1", "p2"]
    assert proxy.outstanding is None


def test_matched_output_is_released_and_divergence_is_one_request() -> None:
    proxy, primary_out, secondary_out, sink = make()
    proxy.checkpoint_completed(0.0)
    proxy.on_primary("p-syn", tcp(P_ISN, flags=SYN | ACK), 1.0)
    proxy.on_secondary("s-syn", tcp(S_ISN, flags=SYN | ACK), 1.0)
    proxy.on_primary("p1", tcp(P_ISN + 1, b"same"), 1.0)
    proxy.on_secondary("s1", tcp(S_ISN + 1, b"same"), 1.0)
    assert [h for h, _ in primary_out.accepted] == ["p-syn", "p1"]
    proxy.on_primary("p2", tcp(P_ISN + 5, b"abc"), 1.1)
    proxy.on_secondary("s2", tcp(S_ISN + 5, b"abd"), 1.1)
    proxy.on_primary("p3", tcp(P_ISN + 1, b"x", sport=81), 1.1)
    proxy.handle_timer(10.0)  # the other flow times out: coalesced with the outstanding request
    assert [(r.id, r.reason, r.flow) for r in sink.requests[1:]] == [
        (2, "payload", "tcp 10.0.0.1:80 -> 10.0.0.9:40000")
    ]
    assert proxy.counters.coalesced["timeout"] == 1
    assert secondary_out.dropped == ["s-syn", "s1", "s2"]
    # Output commit: from the divergence to the checkpoint's completion nothing leaves, the
    # diverged segment and those behind it included.
    assert [h for h, _ in primary_out.accepted] == ["p-syn", "p1"]
    proxy.checkpoint_started(10.1)
    proxy.on_primary("p4", tcp(P_ISN + 8, b"def"), 10.15)
    assert [h for h, _ in primary_out.accepted] == ["p-syn", "p1"]
    assert proxy.comparator.stats().held_packets == 3
    proxy.checkpoint_completed(10.2)
    assert [h for h, _ in primary_out.accepted] == ["p-syn", "p1", "p2", "p3", "p4"]


def test_the_proxy_owns_its_timer_an_unanswered_segment_times_out_at_it() -> None:
    proxy, primary_out, _, sink = make()
    proxy.checkpoint_completed(0.0)
    proxy.on_primary("p-syn", tcp(P_ISN, flags=SYN | ACK), 1.0)  # the secondary never answers
    due = proxy.get_timer()
    assert due is not None and due == proxy.comparator.get_timer()
    proxy.handle_timer(due - 0.001)  # before its deadline: nothing
    assert len(sink.requests) == 1 and primary_out.accepted == []
    proxy.handle_timer(due)
    assert [(r.id, r.reason) for r in sink.requests] == [(1, "restart"), (2, "timeout")]
    assert primary_out.accepted == []  # held for the checkpoint (output commit)


def test_host_s_shifts_ingress_acks_and_after_a_takeover_the_svm_output() -> None:
    to_guest, from_guest = FakeQueue(), FakeQueue()
    proxy = SecondaryProxy(SecondaryRewriter(), to_guest, from_guest)
    proxy.on_from_guest("s-syn", tcp(S_ISN, flags=SYN | ACK), 1.0)
    client_ack = tcp(
        5000, b"", flags=ACK, ack=P_ISN + 1, src="10.0.0.9", dst="10.0.0.1", sport=40000, dport=80
    )
    proxy.on_to_guest("c1", client_ack, 1.1)
    ((handle, payload),) = to_guest.accepted
    assert handle == "c1" and payload is not None
    assert int.from_bytes(payload[28:32], "big") == S_ISN + 1
    assert from_guest.accepted == [("s-syn", None)]
    proxy.on_from_guest("s1", tcp(S_ISN + 1, b"data", flags=ACK), 1.2)
    assert from_guest.accepted[-1] == ("s1", None)  # protected: host P compares it unchanged
    proxy.take_over()
    proxy.on_from_guest("s2", tcp(S_ISN + 5, b"more", flags=ACK), 1.3)
    handle, payload = from_guest.accepted[-1]
    assert handle == "s2" and payload is not None
    assert int.from_bytes(payload[24:28], "big") == P_ISN + 5
    assert proxy.counters.rewrites["shifted"] == 1
    assert proxy.counters.egress_rewrites["shifted"] == 1
    assert proxy.counters.packets["secondary-egress", "accept"] == 3


def test_manual_request_is_coalesced_while_one_is_outstanding() -> None:
    proxy, _, _, sink = make()
    assert proxy.request_manual(0.0) is None  # the restart request is outstanding
    proxy.checkpoint_completed(0.1)
    request = proxy.request_manual(0.2)
    assert request is not None and request.reason == "manual"
    assert [r.reason for r in sink.requests] == ["restart", "manual"]


def test_host_s_hands_the_svm_the_syns_of_half_open_connections_as_frames_to_its_mac() -> None:
    to_guest, from_guest = FakeQueue(), FakeQueue()
    proxy = SecondaryProxy(SecondaryRewriter(), to_guest, from_guest)
    client_syn = tcp(
        5000, b"", flags=SYN, ack=0, src="10.0.0.9", dst="10.0.0.1", sport=40000, dport=80
    )
    proxy.on_to_guest("c-syn", client_syn, 1.0)
    proxy.on_from_guest("s-syn", tcp(S_ISN, flags=SYN | ACK), 1.0)  # answered, to host P
    proxy.take_over()
    guest, port = bytes.fromhex("525400000001"), bytes.fromhex("020000000002")
    assert proxy.syn_replay_frames(1.2, port, [guest]) == (
        1,
        [guest + port + b"\x08\x00" + client_syn],
    )
    assert proxy.syn_replay_frames(1.3, port, [guest]) == (0, [])  # once


def test_host_s_hands_the_svm_icmp_errors_for_connections_the_client_was_heard_on() -> None:
    proxy = SecondaryProxy(SecondaryRewriter(), FakeQueue(), FakeQueue())
    client_ack = tcp(
        5000, b"", flags=ACK, ack=9000, src="10.0.0.9", dst="10.0.0.1", sport=40000, dport=80
    )
    proxy.on_to_guest("c-ack", client_ack, 1.0)
    proxy.take_over()
    guest, port = bytes.fromhex("525400000001"), bytes.fromhex("020000000002")
    connections, frames = proxy.backoff_revert_frames(1.2, port, [guest])
    assert connections == 1 and len(frames) == 1 + REVERTS_PER_CONNECTION
    assert frames[0] == guest + port + b"\x08\x00" + client_ack  # its latest segment again
    assert frames[1][:14] == guest + port + b"\x08\x00"
    assert frames[1][14 + 20] == 3  # ICMP destination unreachable
    assert proxy.backoff_revert_frames(1.3, port, [guest]) == (0, [])  # once


# -- what an engine reports: only a checkpoint this proxy saw start releases -----------------


ENGINE, OTHER_ENGINE = 1, 2  # control connections


def diverged(proxy: PrimaryProxy, now: float) -> None:
    """A connection whose second segment differs: its data is held, a request goes out."""
    proxy.on_primary("p-syn", tcp(P_ISN, flags=SYN | ACK), now)
    proxy.on_secondary("s-syn", tcp(S_ISN, flags=SYN | ACK), now)
    proxy.on_primary("p-bad", tcp(P_ISN + 1, b"abc"), now)
    proxy.on_secondary("s-bad", tcp(S_ISN + 1, b"abd"), now)


def serve(proxy: PrimaryProxy, request: int | None, now: float, source: int = ENGINE) -> None:
    assert proxy.report_started(now, request, source) is None
    assert proxy.report_completed(now, request, source) is None


def test_a_completion_nobody_started_releases_nothing() -> None:
    """The attack: checkpoint-completed for request 987654, never issued, no start first."""
    proxy, primary_out, _, sink = make()
    serve(proxy, 1, 0.1)
    diverged(proxy, 1.0)
    assert [h for h, _ in primary_out.accepted] == ["p-syn"]
    assert [r.reason for r in sink.requests] == ["restart", "payload"]
    refusal = proxy.report_completed(1.1, 987654, ENGINE)
    assert refusal is not None and refusal.reason == "not-started"
    assert refusal.detail == (
        "checkpoint-completed (request 987654) refused: this engine reported no"
        " checkpoint-started since the last completion; nothing released"
    )
    assert [h for h, _ in primary_out.accepted] == ["p-syn"]
    assert proxy.counters.reports_refused == {("completed", "not-started"): 1}
    assert proxy.counters.checkpoints_completed == 1
    assert proxy.outstanding is not None and proxy.outstanding.id == 2


def test_the_restart_hold_is_lifted_only_by_a_checkpoint_that_started_after_it() -> None:
    proxy, primary_out, _, _ = make()
    proxy.on_primary("p1", tcp(P_ISN + 1, b"held since the restart"), 0.1)
    for request in (None, 1):
        refusal = proxy.report_completed(0.2, request, ENGINE)
        assert refusal is not None and refusal.reason == "not-started"
    assert primary_out.accepted == []
    assert proxy.outstanding is not None and proxy.outstanding.reason == "restart"
    serve(proxy, 1, 0.3)
    assert primary_out.accepted == [("p1", None)]
    assert proxy.outstanding is None


def test_a_second_completion_releases_nothing() -> None:
    """The attack: a spurious second checkpoint-completed; a primary frame the secondary never
    sent, and a diverged one, must stay held."""
    proxy, primary_out, _, _ = make()
    serve(proxy, 1, 0.1)
    proxy.on_primary("p-alone", tcp(P_ISN + 1, b"never sent by the secondary", sport=81), 1.0)
    diverged(proxy, 1.0)
    released = list(primary_out.accepted)
    for request in (1, 2, None):
        refusal = proxy.report_completed(1.1, request, ENGINE)
        assert refusal is not None and refusal.reason == "not-started"
    assert primary_out.accepted == released
    assert proxy.counters.reports_refused["completed", "not-started"] == 3


def test_a_start_for_a_request_never_issued_is_refused() -> None:
    proxy, primary_out, _, _ = make()
    serve(proxy, 1, 0.1)
    diverged(proxy, 1.0)
    refusal = proxy.report_started(1.1, 987654, ENGINE)
    assert refusal is not None and refusal.reason == "unknown-request"
    assert refusal.detail == (
        "checkpoint-started refused: request 987654 was never issued by this proxy (its"
        " requests so far: 1 to 2)"
    )
    refusal = proxy.report_completed(1.2, 987654, ENGINE)
    assert refusal is not None and refusal.reason == "not-started"
    assert [h for h, _ in primary_out.accepted] == ["p-syn"]


def test_a_completion_is_taken_only_from_the_engine_that_reported_the_start() -> None:
    proxy, primary_out, _, _ = make()
    serve(proxy, 1, 0.1)
    diverged(proxy, 1.0)
    assert proxy.report_started(1.1, 2, ENGINE) is None
    refusal = proxy.report_started(1.1, 2, OTHER_ENGINE)
    assert refusal is not None and refusal.reason == "already-started"
    refusal = proxy.report_completed(1.2, 2, OTHER_ENGINE)
    assert refusal is not None and refusal.reason == "not-started"
    assert [h for h, _ in primary_out.accepted] == ["p-syn"]
    assert proxy.report_completed(1.3, 2, ENGINE) is None
    assert [h for h, _ in primary_out.accepted] == ["p-syn", "p-bad"]


def test_periodic_checkpoints_and_requests_joining_a_running_one_still_release() -> None:
    """The engine starts periodic checkpoints with request null; a request that reached the
    engine after the STOP but is older than it joins the running checkpoint, so the
    completion may name a request the start did not."""
    proxy, primary_out, _, _ = make()
    serve(proxy, 1, 0.1)
    proxy.on_primary("p1", tcp(P_ISN + 1, b"x"), 1.0)
    serve(proxy, None, 1.1)  # periodic
    assert [h for h, _ in primary_out.accepted] == ["p1"]
    assert proxy.report_started(2.0, None, ENGINE) is None
    request = proxy.request_manual(2.0)
    assert request is not None
    proxy.on_primary("p2", tcp(P_ISN + 2, b"y"), 2.0)
    assert proxy.report_completed(2.1, request.id, ENGINE) is None
    assert [h for h, _ in primary_out.accepted] == ["p1", "p2"]
    assert proxy.counters.reports_refused == {}


def test_an_engine_lost_inside_a_checkpoint_gets_it_asked_for_again() -> None:
    proxy, primary_out, _, sink = make()
    serve(proxy, 1, 0.1)
    proxy.on_primary("p1", tcp(P_ISN + 1, b"x"), 1.0)
    assert proxy.report_started(1.1, None, ENGINE) is None
    proxy.engine_gone(ENGINE, 1.2)
    assert [r.reason for r in sink.requests] == ["restart", "engine-lost"]
    refusal = proxy.report_completed(1.3, None, ENGINE)
    assert refusal is not None and refusal.reason == "not-started"
    assert primary_out.accepted == []
    serve(proxy, 2, 1.4, source=OTHER_ENGINE)  # the engine that came back
    assert primary_out.accepted == [("p1", None)]
    proxy.engine_gone(OTHER_ENGINE, 1.5)  # no checkpoint open: nothing to ask for
    assert len(sink.requests) == 2
