"""The kernel-side gate of the PVM's non-IP frames (coloproxy.net.leasegate) in a namespace:
closed until opened, and closed again by the kernel at the deadline, with no call."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from coloproxy.net import netns
from coloproxy.net.leasegate import LeaseGate

pytestmark = pytest.mark.root


def elements() -> str:
    done = subprocess.run(
        ["nft", "list", "set", "bridge", "tglease", "lease"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout


def test_the_gate_closes_by_itself_at_the_deadline() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace")
    name = f"cplg{os.getpid() % 10000}"
    netns.create(name)
    try:

        def body() -> tuple[str, str, str, str]:
            gate = LeaseGate("tg", "guest0")
            gate.install()
            closed = elements()
            gate.open_for(0.3)
            opened = elements()
            time.sleep(0.5)  # no call: the kernel expires the element
            expired = elements()
            gate.open_for(float("-inf"))
            gate.install()  # again: idempotent
            gate.remove()
            gone = subprocess.run(
                ["nft", "list", "table", "bridge", "tglease"],
                capture_output=True,
                text=True,
                check=False,
            ).returncode
            return closed, opened, expired, str(gone)

        closed, opened, expired, gone = netns.run_in(name, body)
        assert '"guest0"' not in closed
        assert '"guest0" timeout 300ms' in opened
        assert '"guest0"' not in expired
        assert gone != "0"
    finally:
        netns.delete(name)


def test_skipped_updates_close_the_kernel_gate_at_the_deadline_not_after() -> None:
    """Renewals every 100 ms with hold_until: the kernel is updated at only some of them,
    its element's expiry is never after the key's deadline, and when the renewals stop the
    kernel has closed the gate by the deadline (no call)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace")
    name = f"cplh{os.getpid() % 10000}"
    netns.create(name)
    try:

        def body() -> tuple[int, list[tuple[float, float]], str, str, str]:
            gate = LeaseGate("tg", "guest0")
            gate.install()
            checks: list[tuple[float, float]] = []
            deadline = 0.0
            for _ in range(12):
                now = time.monotonic()
                deadline = now + 0.75
                gate.hold_until(deadline, now)
                start = time.monotonic()
                listed = elements()
                found = re.search(r'"guest0" timeout \d+ms expires (\d+)ms', listed)
                assert found, listed
                # The kernel's expiry, from below (it was listed after ``start``):
                checks.append((start + int(found.group(1)) / 1000, deadline))
                time.sleep(0.1)
            before = elements()
            time.sleep(max(0.0, gate.until - time.monotonic()))
            at_kernel = elements()  # the kernel's own expiry, earlier than the deadline
            now = time.monotonic()
            deadline = now + 0.3
            assert gate.hold_until(deadline, now)  # from closed: an update at once
            time.sleep(max(0.0, deadline - time.monotonic()))
            at_deadline = elements()
            gate.remove()
            return gate.updates, checks, before, at_kernel, at_deadline

        updates, checks, before, at_kernel, at_deadline = netns.run_in(name, body)
        assert 2 <= updates <= 6, updates  # 12 renewals, then one
        for expires, deadline in checks:
            assert expires <= deadline, (expires, deadline)
        assert '"guest0"' in before
        assert '"guest0"' not in at_kernel
        assert '"guest0"' not in at_deadline
    finally:
        netns.delete(name)


def test_without_nftables_the_error_names_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Neither libnftables nor the nft command (a machine set up before nftables joined
    # scripts/setup): a clear error the daemon reports, not a FileNotFoundError traceback.
    from coloproxy.net import NetError, leasegate

    monkeypatch.setattr(leasegate, "_lib", False)
    monkeypatch.setenv("PATH", str(tmp_path))
    gate = LeaseGate("tg", "tgport")
    with pytest.raises(NetError, match=r"nftables.*not installed.*scripts/setup"):
        gate.install()
