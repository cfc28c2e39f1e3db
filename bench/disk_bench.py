#!/usr/bin/env python3
"""The guest's disk under COLO: checkpoint pause with and without the replicated disk, and
the guest's write throughput protected vs unprotected, on the lab's VM pair.

Pause. Each run brings the lab up in one of four shapes and records the primary QEMU's
checkpoint pauses (STOP -> RESUME, QEMU's own timestamps on the lab's monitor) for
``--seconds`` at a ``--period-ms`` checkpoint period, while the guest's disk checker writes
at a steady rate (``coloproxy.diskrate``):

- ``diskless``: the guest without a disk, as before the disk existed (the baseline);
- ``disk 0``: the replicated disk, the checker writing nothing;
- ``disk 1M`` and ``disk 10M``: the checker writing 1 MB/s and 10 MB/s.

The shapes alternate within each round (the order rotates round to round), ``--rounds``
rounds; the table gives each shape's median of the per-run medians and the spread.

Throughput. In each ``disk 0`` run, after the pause window: the client has the guest append
records (``/cgi-bin/diskwrite?n=1000``: 128 KB per request, answered once synced to the
guest's disk) for ``--seconds`` or 150 requests, protected; then the secondary QEMU is
killed, the primary leaves COLO (its replication child removed) and the same load runs
unprotected, same lab, same disk. Bytes per second as the client sees them.

Prints load average, date, command. Never asserts. Root (namespaces); traffic only from the
lab's client namespace to the guest. Wrap in ``flock /tmp/bench.lock``.

    python3 bench/disk_bench.py [--rounds 3] [--seconds 20] [--period-ms 1000]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coloproxy.lab import diskcheck, vms
from coloproxy.lab import lab as labmod
from coloproxy.lab.configs import PERIOD_MS
from coloproxy.lab.demo import CheckpointWatch
from coloproxy.lab.topology import GUEST_IPV4

PREFIX = "cpdbench"
RUN_DIR = Path("/run/coloproxy-lab-disk-bench")
SHAPES = {"diskless": None, "disk 0": 0, "disk 1M": 1_000_000, "disk 10M": 10_000_000}
RECORDS_PER_REQUEST = 1000
# Each request appends 128 KB to the guest's /data/acked.dat (60 MiB file system): both
# phases of a run stay under 40 MB.
MAX_REQUESTS = 150


@dataclass
class Run:
    shape: str
    pauses_ms: list[float] = field(default_factory=list)
    written: str = ""  # what the checker wrote in the window (its console lines)
    protected_bps: float | None = None
    unprotected_bps: float | None = None
    sync_s: float | None = None
    error: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.pauses_ms) if self.pauses_ms else None


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def throughput(lab: labmod.Lab, seconds: float) -> float:
    """Bytes per second of acknowledged records, one request at a time (``seconds`` or
    MAX_REQUESTS requests, whichever ends first)."""
    client = lab.topology.ns("client")
    end = time.monotonic() + seconds
    started = time.monotonic()
    records = 0
    while time.monotonic() < end and records < MAX_REQUESTS * RECORDS_PER_REQUEST:
        diskcheck.disk_write(GUEST_IPV4, RECORDS_PER_REQUEST, netns=client, timeout=30)
        records += RECORDS_PER_REQUEST
    return records * diskcheck.RECORD_SIZE / (time.monotonic() - started)


def checker_rate(console: bytes, seconds: float) -> str:
    lines = diskcheck.diskcheck_lines(console)
    if len(lines) < 2:
        return "no checker lines"
    written = (lines[-1].seq - lines[0].seq) * diskcheck.RECORD_SIZE
    return f"{written / seconds / 1e6:.2f} MB/s written, {max(x.errors for x in lines)} errors"


def sync_seconds(lab: labmod.Lab) -> float | None:
    for line in lab.scrape().splitlines():
        if line.startswith("coloproxy_engine_disk_sync_seconds "):
            return float(line.split()[1])
    return None


def measure(shape: str, seconds: float, period_ms: int, with_throughput: bool) -> Run:
    run = Run(shape)
    rate = SHAPES[shape]
    lab = labmod.Lab(
        PREFIX, RUN_DIR, disk=rate is not None, disk_rate=rate or 0, say=lambda _text: None
    )
    print(f"-- {shape}: lab up ({load()})", flush=True)
    try:
        lab.up(build=False)
        if rate is not None:
            run.sync_s = sync_seconds(lab)
        lab.set_period(period_ms)
        time.sleep(2)  # the checker at its rate, the period in force
        mark = len(vms.console(lab.paths, "primary"))
        watch = CheckpointWatch(lab.paths).start()
        time.sleep(seconds)
        run.pauses_ms = watch.stop()
        if rate:
            run.written = checker_rate(vms.console(lab.paths, "primary")[mark:], seconds)
        if with_throughput:
            lab.set_period(PERIOD_MS)
            run.protected_bps = throughput(lab, seconds)
            lab.kill_qemu("secondary")
            deadline = time.monotonic() + 30
            while lab.colo_status("primary")["mode"] != "none":
                if time.monotonic() > deadline:
                    raise vms.LabError("the primary did not leave COLO within 30 s")
                time.sleep(0.1)
            run.unprotected_bps = throughput(lab, seconds)
    except Exception as exc:  # printed, never raised: the other runs go on
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            lab.down()
        except Exception as exc:
            run.error += f" (down: {exc})"
    median = f"{run.median:.1f} ms" if run.median is not None else "n/a"
    print(
        f"   {len(run.pauses_ms)} pauses, median {median}"
        + (f"; checker {run.written}" if run.written else "")
        + (f"; sync {run.sync_s:.2f} s" if run.sync_s is not None else "")
        + (
            f"; diskwrite protected {run.protected_bps / 1e6:.2f} MB/s,"
            f" unprotected {run.unprotected_bps / 1e6:.2f} MB/s"
            if run.protected_bps is not None and run.unprotected_bps is not None
            else ""
        )
        + (f"; ERROR {run.error}" if run.error else ""),
        flush=True,
    )
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--period-ms", type=int, default=1000)
    args = parser.parse_args()
    print(f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    print(f"command: {shlex.join(['python3', *sys.argv])}")
    print(f"host: {platform.node()}, {platform.platform()}, {os.cpu_count()} cpus, {load()}")
    runs: dict[str, list[Run]] = {shape: [] for shape in SHAPES}
    order = list(SHAPES)
    for round_ in range(args.rounds):
        print(f"== round {round_ + 1} ({load()})", flush=True)
        for shape in order[round_ % len(order) :] + order[: round_ % len(order)]:
            runs[shape].append(measure(shape, args.seconds, args.period_ms, shape == "disk 0"))
    print(f"\n== checkpoint pause, period {args.period_ms} ms, {args.seconds:.0f} s per run")
    print("| shape | runs | pauses | median of run medians | run medians |")
    print("|---|---|---|---|---|")
    for shape, found in runs.items():
        medians = [r.median for r in found if r.median is not None]
        shown = ", ".join(f"{m:.1f}" for m in medians)
        mid = f"{statistics.median(medians):.1f} ms" if medians else "n/a"
        pauses = sum(len(r.pauses_ms) for r in found)
        print(f"| {shape} | {len(medians)} | {pauses} | {mid} | {shown} |")
    print("\n== guest write throughput (/cgi-bin/diskwrite, 128 KB synced per request)")
    good = [r for r in runs["disk 0"] if r.protected_bps and r.unprotected_bps]
    for r in good:
        assert r.protected_bps is not None and r.unprotected_bps is not None
        print(
            f"protected {r.protected_bps / 1e6:.2f} MB/s, unprotected"
            f" {r.unprotected_bps / 1e6:.2f} MB/s ({r.protected_bps / r.unprotected_bps:.2f}x)"
        )
    if good:
        p = statistics.median(r.protected_bps or 0 for r in good)
        u = statistics.median(r.unprotected_bps or 0 for r in good)
        print(f"median: protected {p / 1e6:.2f} MB/s, unprotected {u / 1e6:.2f} MB/s")
    syncs = [r.sync_s for rs in runs.values() for r in rs if r.sync_s is not None]
    if syncs:
        print(f"disk sync at bring-up (64 MiB): median {statistics.median(syncs):.2f} s")
    print(f"end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
