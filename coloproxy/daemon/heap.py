"""The daemon's heap: faulted in once at start, and kept (glibc's malloc).

The comparator keeps the verified bytes of every TCP connection for comparing their
retransmissions (compare/kept.py), up to ``compare.max_retransmit_bytes`` over all
connections (64 MiB by default). Under bulk traffic that store grows by a payload a packet,
each a buffer of up to 1.5 KB that CPython takes from malloc (it keeps only objects of up to
512 bytes in its own pools). Growing the heap costs a page fault for every 4 KiB touched
first, dear in a virtual machine; and when a checkpoint or a divergence frees the store at
once, glibc hands the top of the heap back to the kernel (past ``M_TRIM_THRESHOLD``, 128 KiB
by default), so that the next burst faults it all in again. Measured on 16 bulk
connections, that was a fifth of the comparator's CPU per packet (docs/benchmarks.md, "The
heap kept").

``reserve(size)`` raises malloc's trim threshold so that up to ``size`` bytes of freed
memory stay in the heap, and faults them in now: ``size`` bytes allocated in blocks below
malloc's mmap threshold (so that they come from the heap, not from a mapping of their own),
written, and freed. What it costs: the process's resident memory grows by ``size`` at start,
which the daemon reaches under bulk load anyway, and stays there.

Called by ``coloproxy run`` before the event loop starts (daemon/run.py) with the primary's
``compare.max_retransmit_bytes``; a daemon that starts as the secondary only keeps its heap
(it is promoted on a failover, when half a second of page faults up front would delay the
takeover). Where malloc is not glibc's (no ``mallopt``), nothing is done and ``reserve``
says so by returning 0.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

# glibc's malloc.h
_M_TRIM_THRESHOLD: Final = -1
# Blocks for faulting the heap in: below malloc's mmap threshold (128 KiB unless raised;
# setting the trim threshold freezes it there), so each comes from the heap.
_BLOCK: Final = 64 << 10


def _mallopt() -> Callable[[int, ctypes.c_int], int] | None:
    try:
        function: Callable[[int, ctypes.c_int], int] = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    return function


def keep(size: int) -> bool:
    """Keep up to ``size`` bytes of freed memory in the heap; False if not glibc's malloc."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(max(size, 128 << 10) + _BLOCK)))


def reserve(size: int) -> int:
    """Keep ``size`` bytes of the heap and fault them in now; the bytes faulted in (0 when
    malloc is not glibc's, or ``size`` is not positive)."""
    if size <= 0 or not keep(size):
        if size > 0:
            log.debug("heap not reserved: no glibc mallopt")
        return 0
    blocks = []
    for _ in range(-(-size // _BLOCK)):
        block = bytearray(_BLOCK)  # malloc'd, then zeroed: every page written
        blocks.append(block)
    faulted = len(blocks) * _BLOCK
    del blocks  # freed together: they merge into the top of the heap, which now stays
    return faulted


__all__ = ["keep", "reserve"]
