"""The daemon's heap kept and faulted in at start (coloproxy/daemon/heap.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coloproxy.config import load_config
from coloproxy.daemon import heap
from coloproxy.daemon import run as daemon_run
from coloproxy.errors import ColoproxyError
from coloproxy.role import Role

REPO = Path(__file__).resolve().parent.parent

# A store of 1448-byte buffers grows to 32 MiB and is freed at once, three times (as a
# checkpoint frees the kept bytes); prints the page faults of the last two rounds.
_ROUNDS = """
import resource, sys
from coloproxy.daemon import heap
if sys.argv[1] == "reserve":
    assert heap.reserve(40 << 20) >= 40 << 20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(3):
    before = faults()
    store = [bytes(1448) for _ in range((32 << 20) // 1448)]
    del store
    counts.append(faults() - before)
print(sum(counts[1:]))
"""


def _faults(mode: str) -> int:
    completed = subprocess.run(
        [sys.executable, "-c", _ROUNDS, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return int(completed.stdout)


def test_a_reserved_heap_is_not_faulted_in_again() -> None:
    if not heap.keep(0):
        pytest.skip("malloc here is not glibc's (no mallopt): nothing to reserve")
    pages = 2 * (32 << 20) // 4096
    # Without: the freed store goes back to the kernel and comes back a fault a page.
    assert _faults("plain") > pages // 2
    # With: it stays in the heap.
    assert _faults("reserve") < pages // 100


def test_coloproxy_run_reserves_the_primary_heap_before_its_loop_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(heap, "reserve", lambda size: calls.append(("reserve", size)) or size)
    monkeypatch.setattr(heap, "keep", lambda size: calls.append(("keep", size)) or True)

    class Refused:
        def __init__(self, *args: object, **kwargs: object) -> None:
            calls.append(("daemon", 0))
            raise ColoproxyError("stop here")

    monkeypatch.setattr(daemon_run, "Daemon", Refused)
    config = load_config(REPO / "configs" / "lab.yaml")
    assert config.pair.role is Role.PRIMARY
    assert daemon_run.run(config) == 2
    assert calls == [("reserve", config.compare.max_retransmit_bytes), ("daemon", 0)]
