#!/usr/bin/env python3
"""Where the lab's CPU goes per HTTP request: both QEMUs and both coloproxy daemons.

Brings up the lab (our proxy, engine-driven), runs ``--clients`` client loops requesting the
guest's ``/index.html`` over new connections for ``--seconds``, and prints requests/s and,
for each process the lab started, its CPU share and CPU milliseconds per request (utime +
stime from /proc). It answers whether the proxy or the guests bound the lab's throughput
(docs/benchmarks.md, section 4). Before the clients start it measures every process for
``--idle`` seconds with no client; after the per-request lines (each process's own CPU, as
bench/lab_cpu_ab.py reads them) it prints each one's figure with the programs it ran (the
daemons run iptables-save every few seconds), its idle CPU, and what the load added per
request. It prints, it never asserts. Needs root (namespaces).
Traffic only goes from the lab's client namespace to the lab's guest.

With ``--pin`` the two daemons (every thread, and the programs they start) run on the last
CPU and everything else the lab started, and this process with the clients, on the others:
how much of a daemon's cost comes from sharing its CPUs with the guests (docs/benchmarks.md,
section 4). The guests then have one CPU less, and serve fewer requests.

    python3 bench/lab_cpu.py [--seconds 15] [--clients 4] [--idle 5] [--pin]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu_colo_compare import process_cpu_seconds

from coloproxy.lab.client import ClientLoop, expected_pages
from coloproxy.lab.lab import Lab

PAGE = "/index.html"


def pin_daemons(pids: dict[str, int]) -> str:
    """Every thread of the ``*_daemon`` processes on the last CPU this process may use, every
    thread of the other processes and this process (its client threads start later and
    inherit it) on the rest; says which CPUs went where."""
    cpus = sorted(os.sched_getaffinity(0))
    daemon_cpus, other_cpus = {cpus[-1]}, set(cpus[:-1])
    for name, pid in pids.items():
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(
                    int(task), daemon_cpus if name.endswith("_daemon") else other_cpus
                )
    os.sched_setaffinity(0, other_cpus)
    others = ", ".join(map(str, sorted(other_cpus)))
    return f"pinned: the daemons on CPU {cpus[-1]}, the rest on CPU {others}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--idle",
        type=float,
        default=5.0,
        help="seconds to measure each process with no client first (0: skip); the load's own"
        " share of the figures is what is above that",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the daemons on the last CPU, the guests, etcd and the clients on the others",
    )
    args = parser.parse_args()
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs at least two CPUs")
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, load {os.getloadavg()}")
    print(
        f"command: python3 bench/lab_cpu.py --seconds {args.seconds} --clients {args.clients}"
        f" --idle {args.idle}{' --pin' if args.pin else ''}"
    )
    lab = Lab("cpcpu", Path("/run/coloproxy-lab-cpu"), say=lambda _text: None)
    try:
        state = lab.up(build=False)
        pids = dict(state.pids)
        if args.pin:
            print(pin_daemons(pids))
        idle: dict[str, float] = {}
        if args.idle > 0:
            quiet = {name: process_cpu_seconds(pid, children=True) for name, pid in pids.items()}
            time.sleep(args.idle)
            for name, pid in pids.items():
                idle[name] = (process_cpu_seconds(pid, children=True) - quiet[name]) / args.idle
        before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        before_all = {name: process_cpu_seconds(pid, children=True) for name, pid in pids.items()}
        pages = {PAGE: expected_pages()[PAGE]}
        loops = [ClientLoop(lab.topology, pages, pause=0).start() for _ in range(args.clients)]
        started = time.monotonic()
        time.sleep(args.seconds)
        attempts = [a for loop in loops for a in loop.stop()]
        elapsed = time.monotonic() - started
        after = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        after_all = {name: process_cpu_seconds(pid, children=True) for name, pid in pids.items()}
    finally:
        lab.down()
    served = sum(1 for a in attempts if a.ok)
    print(f"{served / elapsed:.1f} requests/s ({served} served, {len(attempts) - served} failed)")
    total = 0.0
    for name in pids:
        used = after[name] - before[name]
        total += used
        print(
            f"  {name:18} {used / elapsed * 100:5.1f}% CPU  {used / served * 1e3:5.2f} ms/request"
        )
    share, per_request = total / elapsed * 100, total / served * 1e3
    print(f"  {'all of them':18} {share:5.1f}% CPU  {per_request:5.2f} ms/request")
    # The daemons' own figures above leave out the programs they run (iptables-save, every
    # few seconds); these count them, and split off what the processes use with no client.
    for name in pids:
        used = after_all[name] - before_all[name]
        line = f"  ({name} with its child processes: {used / served * 1e3:.2f} ms/request"
        if name in idle:
            load_share = (used - idle[name] * elapsed) / served * 1e3
            line += f"; idle {idle[name] * 1e3:.1f} ms/s, above idle {load_share:.2f} ms/request"
        print(line + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
