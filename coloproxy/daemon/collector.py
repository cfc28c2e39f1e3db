"""How often the daemon's process runs CPython's cyclic garbage collector.

The per-packet path allocates a few objects the collector tracks for every packet: the held
packet (``compare.state.Held``), a stored chunk (``Stored``), the verdict events
(``Release``, ``Drop``). CPython's default runs a young collection every 700 such
allocations, which is every 150 or so packets: 5-7 % of the comparator's instructions per
packet on 64-byte TCP segments and on UDP datagrams (callgrind, bench/relay_loop.py; figures
in docs/benchmarks.md, "The collector's threshold"), and a walk over objects that are no
longer in the CPU's caches.

``tune()`` raises the young generation's threshold to ``YOUNG_THRESHOLD``; the older
generations keep CPython's default (a middle collection every 10 young ones, a full one
every 10 middle ones). What that costs: cyclic garbage (a flow and its chunks refer to each
other) waits for up to ``YOUNG_THRESHOLD`` allocations before it is freed, a few MiB at most.
Reference counting frees everything else at once, as before.

Called once by ``coloproxy run`` before the event loop starts (daemon/run.py); the
benchmarks that stand for the daemon's per-packet work call it too, so that they measure
what the daemon does.
"""

from __future__ import annotations

import gc
from typing import Final

# Young allocations between two young collections (CPython's default: 700).
YOUNG_THRESHOLD: Final = 50_000


def tune() -> None:
    """Set this process's collector thresholds for the daemon (module doc)."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


__all__ = ["YOUNG_THRESHOLD", "tune"]
