"""PrimaryProxy per batch: the releases of one comparator answer handed to P-out in one call
where P-out can take them so (``accept_many``: the chardev transport's held frames), the
counters added per batch; the same verdicts, order, counts and requests as one ``accept``
per released packet."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from coloproxy.compare import Comparator, CompareConfig, Framing
from coloproxy.compare.relay import HeldFrames
from coloproxy.daemon.primary import CheckpointRequest, PrimaryProxy
from coloproxy.errors import UsageError
from coloproxy.protocol.colo_frames import FrameDecoder, encode_frames
from craft import ACK, SYN, tcp
from test_daemon_primary import P_ISN, S_ISN, FakeQueue

ETHERNET = bytes(6) + bytes(6) + b"\x08\x00"


class BatchQueue(FakeQueue):
    """P-out with ``accept_many``: each call is one batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[object]] = []

    def accept_many(self, handles: list[object]) -> None:
        self.batches.append(list(handles))
        for handle in handles:
            self.accept(handle)


class WatchingSink:
    """Notes what P-out had been given when each request came."""

    def __init__(self, primary_out: FakeQueue) -> None:
        self.primary_out = primary_out
        self.requests: list[tuple[int, str, int]] = []

    def checkpoint_requested(self, request: CheckpointRequest) -> None:
        self.requests.append((request.id, request.reason, len(self.primary_out.accepted)))


def _run(primary_out: FakeQueue, script: Callable[[PrimaryProxy], None]) -> PrimaryProxy:
    sink = WatchingSink(primary_out)
    proxy = PrimaryProxy(Comparator(CompareConfig()), primary_out, FakeQueue(), sink, 0.0)
    script(proxy)
    return proxy


def _same(script: Callable[[PrimaryProxy], None]) -> tuple[BatchQueue, PrimaryProxy]:
    """Run ``script`` against a per-packet P-out and a batching one: all must be equal."""
    single, batching = FakeQueue(), BatchQueue()
    one = _run(single, script)
    many = _run(batching, script)
    assert batching.accepted == single.accepted
    assert many.counters == one.counters
    assert cast_sink(many).requests == cast_sink(one).requests
    assert many.fenced_packets == one.fenced_packets
    assert many.outstanding == one.outstanding
    return batching, many


def cast_sink(proxy: PrimaryProxy) -> WatchingSink:
    sink = proxy._requests
    assert isinstance(sink, WatchingSink)
    return sink


def _diverging_batch(proxy: PrimaryProxy) -> None:
    proxy.checkpoint_completed(0.0)
    proxy.on_primary_many(
        ["p-syn", "p1", "p2", "p3"],
        [
            tcp(P_ISN, flags=SYN | ACK),
            tcp(P_ISN + 1, b"same"),
            tcp(P_ISN + 5, b"abc"),
            tcp(P_ISN + 1, b"x", sport=81),
        ],
        1.0,
    )
    # One secondary batch: two matches, then a divergence; a later flow's packet is only
    # held. The request comes after the two releases decided before it. (The last segment
    # acknowledges more, so the two data segments are not one run: see
    # test_a_run_that_diverges_releases_its_verified_bytes_after_the_request.)
    proxy.on_secondary_many(
        [None, None, None],
        [
            tcp(S_ISN, flags=SYN | ACK),
            tcp(S_ISN + 1, b"same"),
            tcp(S_ISN + 5, b"abd", ack=1001),
        ],
        1.0,
    )


def test_a_batch_s_releases_go_to_p_out_in_one_call_in_order() -> None:
    batching, proxy = _same(_diverging_batch)
    assert batching.batches == [["p-syn", "p1"]]
    assert cast_sink(proxy).requests == [(1, "restart", 0), (2, "payload", 2)]
    assert proxy.counters.packets["primary-out", "accept-matched"] == 2
    assert proxy.counters.packets["secondary-out", "drop-compared"] == 3
    assert proxy.counters.divergences["tcp", "payload"] == 1


def test_a_run_that_diverges_releases_its_verified_bytes_after_the_request() -> None:
    """The secondary's consecutive segments of a connection in a batch are compared as one
    run (lanes.py): its difference is found before the bytes ahead of it are verified, so the
    request comes first and the primary packet those bytes match goes out after it."""

    def script(proxy: PrimaryProxy) -> None:
        proxy.checkpoint_completed(0.0)
        proxy.on_primary_many(
            ["p-syn", "p1", "p2"],
            [tcp(P_ISN, flags=SYN | ACK), tcp(P_ISN + 1, b"same"), tcp(P_ISN + 5, b"abc")],
            1.0,
        )
        proxy.on_secondary_many(
            [None, None, None],
            [tcp(S_ISN, flags=SYN | ACK), tcp(S_ISN + 1, b"same"), tcp(S_ISN + 5, b"abd")],
            1.0,
        )

    batching, proxy = _same(script)
    assert batching.batches == [["p-syn"], ["p1"]]
    assert cast_sink(proxy).requests == [(1, "restart", 0), (2, "payload", 1)]
    assert proxy.counters.packets["primary-out", "accept-matched"] == 2
    assert proxy.counters.divergences["tcp", "payload"] == 1


def test_a_checkpoint_s_releases_and_later_batches_count_as_per_packet() -> None:
    def script(proxy: PrimaryProxy) -> None:
        _diverging_batch(proxy)
        proxy.handle_timer(10.0)  # the other flow times out: coalesced
        proxy.checkpoint_started(10.1)
        proxy.on_primary_many(["p4"], [tcp(P_ISN + 8, b"def")], 10.15)
        proxy.on_secondary_many([None], [tcp(S_ISN + 8, b"def")], 10.15)  # checkpointing
        proxy.checkpoint_completed(10.2)
        proxy.on_primary_many(["p5", "p6"], [tcp(P_ISN + 11, b"g"), tcp(P_ISN + 12, b"h")], 11)
        # After a checkpoint the secondary's sequence space is the primary's.
        proxy.on_secondary_many([None, None], [tcp(P_ISN + 11, b"g"), tcp(P_ISN + 12, b"h")], 11)

    batching, proxy = _same(script)
    assert batching.batches == [["p-syn", "p1"], ["p2", "p3", "p4"], ["p5", "p6"]]
    packets = proxy.counters.packets
    assert packets["primary-out", "accept-checkpoint"] == 3
    assert packets["primary-out", "accept-matched"] == 4
    assert packets["secondary-out", "drop-checkpointing"] == 1
    assert proxy.counters.coalesced["timeout"] == 1


def test_the_leader_gate_holds_a_batch_decided_past_the_deadline_and_lets_it_go_in_order() -> None:
    def script(proxy: PrimaryProxy) -> None:
        proxy.set_release_until(2.0, 0.0)
        proxy.checkpoint_completed(0.0)
        proxy.on_primary_many(
            ["p-syn", "p1"], [tcp(P_ISN, flags=SYN | ACK), tcp(P_ISN + 1, b"a")], 1
        )
        proxy.on_secondary_many([None], [tcp(S_ISN, flags=SYN | ACK)], 1.0)
        # Past the deadline: matched, not released.
        proxy.on_primary_many(["p2"], [tcp(P_ISN + 2, b"b")], 2.0)
        proxy.on_secondary_many([None, None], [tcp(S_ISN + 1, b"a"), tcp(S_ISN + 2, b"b")], 2.0)
        assert proxy.fenced_packets == 2
        # Back before the deadline, but the fenced ones are still waiting: a new release
        # queues behind them, never ahead.
        proxy.release_until = 5.0
        proxy.on_primary_many(["p3"], [tcp(P_ISN + 3, b"c")], 2.5)
        proxy.on_secondary_many([None], [tcp(S_ISN + 3, b"c")], 2.5)
        assert proxy.fenced_packets == 3
        proxy.set_release_until(6.0, 3.0)

    batching, proxy = _same(script)
    assert [h for h, _ in batching.accepted] == ["p-syn", "p1", "p2", "p3"]
    assert proxy.counters.packets["primary-out", "fenced"] == 3
    assert proxy.counters.packets["primary-out", "accept-matched"] == 4


def test_unprotected_batches_go_in_one_call_and_are_fenced_past_the_deadline() -> None:
    def script(proxy: PrimaryProxy) -> None:
        proxy.set_release_until(1.0, 0.0)
        proxy.on_primary_many(["p0"], [tcp(P_ISN, flags=SYN | ACK)], 0.1)  # held (I6)
        proxy.set_unprotected(0.5)
        proxy.on_primary_many(["p1", "p2"], [b"x", b"y"], 0.6)
        proxy.on_primary_many(["p3", "p4"], [b"z", b"w"], 1.5)

    batching, proxy = _same(script)
    assert batching.batches == [["p0"], ["p1", "p2"]]
    assert proxy.fenced_packets == 2
    assert proxy.counters.packets["primary-out", "accept-unprotected"] == 3
    assert proxy.counters.packets["primary-out", "fenced"] == 2


def test_held_frames_accept_many_releases_in_order_and_refuses_a_frame_not_held() -> None:
    held = HeldFrames()
    tokens = held.hold([b"a", b"b", b"c", b"d"])
    woken: list[int] = []
    held.on_queued = lambda: woken.append(held.queued_frames)
    held.accept_many([tokens[2], tokens[0]])
    assert woken == [1] and held.queued_frames == 2
    with pytest.raises(UsageError):
        held.accept_many([tokens[1], tokens[0], tokens[3]])  # tokens[0] twice
    assert held.take() == encode_frames([b"c", b"a", b"b"])  # up to the refused one
    assert len(held) == 1


def test_the_proxy_behind_held_frames_writes_what_it_would_frame_by_frame() -> None:
    """The chardev transport's P-out: a whole receive released through ``accept_many``
    comes out as the bytes it came as."""
    primary = [ETHERNET + tcp(P_ISN, flags=SYN | ACK)] + [
        ETHERNET + tcp(P_ISN + 1 + i, bytes([i])) for i in range(5)
    ]
    secondary = [ETHERNET + tcp(S_ISN, flags=SYN | ACK)] + [
        ETHERNET + tcp(S_ISN + 1 + i, bytes([i])) for i in range(5)
    ]
    received = encode_frames(primary)
    held = HeldFrames()
    proxy = PrimaryProxy(
        Comparator(CompareConfig(framing=Framing.ETHERNET)), held, FakeQueue(), _Sink(), 0.0
    )
    proxy.checkpoint_completed(0.0)
    frames = FrameDecoder().cut(received)
    proxy.on_primary_many(held.hold_frames(frames), frames, 1.0)
    proxy.on_secondary_many([None] * len(secondary), secondary, 1.0)
    assert held.take() == received
    assert len(held) == 0
    assert proxy.counters.packets["primary-out", "accept-matched"] == 6


class _Sink:
    def checkpoint_requested(self, request: CheckpointRequest) -> None:
        pass
