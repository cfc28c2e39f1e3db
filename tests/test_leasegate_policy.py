"""The lease gate's kernel updates (coloproxy.net.leasegate.LeaseGate.hold_until): fewer than
one per renewal, and the kernel's expiry never later than the key's deadline. The nft text is
recorded instead of run here; tests/test_leasegate.py runs the same against the kernel."""

from __future__ import annotations

import math
import random
import re

import pytest

from coloproxy.net import NetError
from coloproxy.net.leasegate import LeaseGate


class Recorded(LeaseGate):
    """The gate with the kernel's state kept from the nft text it would run: when the
    element expires (the caller's clock), -inf without one."""

    def __init__(self, lag: float = 0.5) -> None:
        super().__init__("tp", "tpport", lag=lag)
        self.now = 0.0
        self.kernel = -math.inf
        self.calls = 0
        self.fail = False

    def _run(self, text: str) -> None:
        if self.fail:
            raise NetError("nft (tplease): refused")
        self.calls += 1
        if "flush set" in text:
            self.kernel = -math.inf
        if found := re.search(r"timeout (\d+)ms", text):
            self.kernel = self.now + int(found.group(1)) / 1000


def test_steady_renewals_touch_the_kernel_once_in_four() -> None:
    gate = Recorded()
    for step in range(100):  # renewals every 100 ms, each acknowledged after 2 ms
        gate.now = step * 0.1
        deadline = gate.now - 0.002 + 1.0 - 0.25
        gate.hold_until(deadline, gate.now)
        assert gate.kernel <= deadline + 1e-9
        assert gate.kernel > gate.now, "the gate closed while the key was held"
    assert 20 <= gate.calls <= 30


def test_the_gate_never_stays_open_past_the_deadline() -> None:
    """Random deadlines forward, back, past and -inf (a lost key): after every call the
    kernel's expiry is at or before the deadline, and a closed key closes it at once."""
    rng = random.Random(14)
    for lag in (0.0, 0.3, 0.5, 0.9):
        gate = Recorded(lag)
        deadline = 0.0
        for _ in range(2000):
            gate.now += rng.uniform(0, 0.2)
            choice = rng.random()
            if choice < 0.05:
                deadline = -math.inf
            elif choice < 0.15:
                deadline = gate.now + rng.uniform(-0.5, 0.3)  # moved back, or already past
            else:
                deadline = max(deadline, gate.now) + rng.uniform(0, 0.3)
            gate.hold_until(deadline, gate.now)
            # Open (an element not yet expired) only up to the deadline:
            assert gate.kernel <= max(deadline, gate.now), (lag, gate.now, deadline, gate.kernel)
            assert gate.until == gate.kernel or max(gate.kernel, gate.until) <= gate.now


def test_a_refused_update_keeps_the_kernel_state_it_had() -> None:
    gate = Recorded()
    gate.hold_until(0.75, 0.0)
    gate.fail = True
    gate.now = 0.1
    with pytest.raises(NetError):
        gate.hold_until(-math.inf, 0.1)
    assert gate.until == pytest.approx(0.74)  # 10 ms short (KERNEL_SLACK); next call closes
    gate.fail = False
    gate.hold_until(-math.inf, 0.1)
    assert gate.kernel == -math.inf
    assert gate.until == -math.inf


def test_the_lag_is_a_fraction() -> None:
    with pytest.raises(ValueError, match="fraction"):
        LeaseGate("tp", "tpport", lag=1.0)
