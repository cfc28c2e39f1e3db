"""Honest figures from repeated runs: the median and the spread, and the load meanwhile.

A shared 2-core machine makes single runs noisy in both directions (another process can slow
either side of a comparison), so every figure is the median of at least 3 runs, printed with
its spread (lowest-highest), and the two sides of a comparison run alternately (ours, theirs,
ours, theirs, ...) so that a burst of load hits both. The 1-minute load average is printed
before each row: a figure taken at a load above about 1 on this machine is not a quiet-machine
figure.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

MIN_RUNS: Final = 3


class Run(Protocol):
    @property
    def packets_per_second(self) -> float: ...

    @property
    def complete(self) -> bool: ...

    released: int
    server_cpu: float | None


@dataclass(frozen=True)
class Figure:
    """pkt/s and CPU per packet over several runs: medians, lowest and highest."""

    runs: int
    rate: float  # median packets per second
    rate_low: float
    rate_high: float
    cpu_us: float | None  # median CPU microseconds per released packet, if measured
    cpu_low: float | None
    cpu_high: float | None
    complete: bool  # every run released every packet

    def rate_text(self) -> str:
        mark = "" if self.complete else "!"
        low, high = self.rate_low / 1e3, self.rate_high / 1e3
        return f"{self.rate / 1e3:,.0f}k{mark} ({low:,.0f}-{high:,.0f})"

    def cpu_text(self) -> str:
        if self.cpu_us is None or self.cpu_low is None or self.cpu_high is None:
            return "-"
        return f"{self.cpu_us:.2f} ({self.cpu_low:.2f}-{self.cpu_high:.2f})"


def figure(runs: Sequence[Run]) -> Figure:
    rates = [run.packets_per_second for run in runs]
    cpus = [
        run.server_cpu / run.released * 1e6
        for run in runs
        if run.server_cpu is not None and run.released
    ]
    return Figure(
        len(runs),
        statistics.median(rates),
        min(rates),
        max(rates),
        statistics.median(cpus) if cpus else None,
        min(cpus) if cpus else None,
        max(cpus) if cpus else None,
        all(run.complete for run in runs),
    )


def ratio(ours: Figure | None, theirs: Figure | None) -> str:
    """Our median pkt/s over theirs."""
    if ours is None or theirs is None or theirs.rate <= 0:
        return "-"
    return f"{ours.rate / theirs.rate:.2f}"


def cpu_ratio(ours: Figure | None, theirs: Figure | None) -> str:
    """Their median CPU per packet over ours (above 1: we need less CPU per packet)."""
    if ours is None or theirs is None or not ours.cpu_us or theirs.cpu_us is None:
        return "-"
    return f"{theirs.cpu_us / ours.cpu_us:.2f}"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def load_one() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def socket_probe(rounds: int = 3, count: int = 20_000) -> str:
    """What a small socket round costs on this machine: a 1500-byte ``send`` and ``recv``
    over an AF_UNIX stream pair in one process, median of ``rounds`` loops, in us. QEMU's
    colo-compare makes several syscalls per packet where our daemon makes a few per receive,
    so on a machine whose syscalls cost more it slows down more than ours does, and the ratio
    rises with nothing of ours faster: compare this figure between machines before the
    ratios (docs/benchmarks.md)."""
    first, second = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    data = bytes(1500)
    times = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(count):
                first.send(data)
                second.recv(2048)
            times.append((time.perf_counter() - started) / count * 1e6)
    finally:
        first.close()
        second.close()
    return f"AF_UNIX 1500-byte send + recv {statistics.median(times):.2f} us (median of {rounds})"
