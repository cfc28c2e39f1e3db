"""The primary proxy's leader key gate (quorum mode): past the deadline, by the proxy's own
clock, nothing is released; verdicts wait in order until the deadline moves again."""

from __future__ import annotations

import math

from coloproxy.compare import Comparator, CompareConfig
from coloproxy.daemon.primary import PrimaryProxy
from craft import ACK, SYN, tcp
from test_daemon_primary import P_ISN, S_ISN, FakeQueue, FakeSink


def make() -> tuple[PrimaryProxy, FakeQueue]:
    primary_out = FakeQueue()
    proxy = PrimaryProxy(Comparator(CompareConfig()), primary_out, FakeQueue(), FakeSink(), 0.0)
    return proxy, primary_out


def test_without_quorum_the_gate_is_always_open() -> None:
    proxy, primary_out = make()
    assert proxy.release_until == math.inf
    proxy.set_unprotected(0.0)
    proxy.on_primary("p1", b"x", 1e9)
    assert primary_out.accepted == [("p1", None)]


def test_past_the_deadline_compared_output_waits_and_goes_in_order_once_renewed() -> None:
    proxy, primary_out = make()
    proxy.set_release_until(2.0, 0.0)
    proxy.checkpoint_completed(0.0)
    proxy.on_primary("p-syn", tcp(P_ISN, flags=SYN | ACK), 1.0)
    proxy.on_secondary("s-syn", tcp(S_ISN, flags=SYN | ACK), 1.0)
    assert [h for h, _ in primary_out.accepted] == ["p-syn"]
    # The deadline passes (no renewal acknowledged): matched output is not released.
    proxy.on_primary("p1", tcp(P_ISN + 1, b"same"), 2.0)
    proxy.on_secondary("s1", tcp(S_ISN + 1, b"same"), 2.0)
    proxy.on_primary("p2", tcp(P_ISN + 5, b"more"), 2.1)
    proxy.on_secondary("s2", tcp(S_ISN + 5, b"more"), 2.1)
    assert [h for h, _ in primary_out.accepted] == ["p-syn"]
    assert proxy.fenced_packets == 2
    assert proxy.counters.packets["primary-out", "fenced"] == 2
    # A renewal acknowledged late moves the deadline: held verdicts go, in order.
    proxy.set_release_until(3.0, 2.2)
    assert [h for h, _ in primary_out.accepted] == ["p-syn", "p1", "p2"]
    assert proxy.fenced_packets == 0


def test_a_lost_key_holds_everything_for_good_even_unprotected() -> None:
    proxy, primary_out = make()
    proxy.set_release_until(1.0, 0.0)
    proxy.set_unprotected(0.5)
    proxy.on_primary("p1", b"x", 0.6)
    proxy.set_release_until(-math.inf, 0.7)  # the key is lost
    proxy.on_primary("p2", b"y", 0.8)
    proxy.on_primary_many(["p3", "p4"], [b"z", b"w"], 0.9)
    assert primary_out.accepted == [("p1", None)]
    assert proxy.fenced_packets == 3
