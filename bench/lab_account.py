#!/usr/bin/env python3
"""Where each lab daemon's CPU goes per HTTP request, by entry point (thread CPU clocks).

Like bench/lab_cpu.py (the lab, ``--clients`` loops requesting ``/index.html`` over new
connections for ``--seconds``), but the daemons run with bench/account_site on their
PYTHONPATH: its sitecustomize wraps the per-packet entry points (queue wake-up, verdict
send, recvmmsg, comparator.feed, proxy events, host S's rewrite) and the background ones
(engine timers, heartbeats, the lease gate), the per-checkpoint ones (QMP events, the
proxy's pushes and report checks) and the garbage collector with ``time.thread_time``
clocks, counted only during the load. Prints, per daemon, its process CPU and main-thread
CPU per request and each entry point's CPU per request, calls per request, CPU per call and
CPU per second. Entry points nest (a wake-up holds its packets' comparator feeds and verdict
sends); what no entry point covers is the event loop itself, the gRPC client of the quorum
and the control/QMP traffic. The wrappers cost about a microsecond a call. Needs root; it
never asserts. ``--pin``: as bench/lab_cpu.py's (the daemons on a CPU of their own).

    python3 bench/lab_account.py [--seconds 12] [--clients 4] [--pin]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab_cpu import pin_daemons  # noqa: E402

from coloproxy.lab.client import ClientLoop, expected_pages  # noqa: E402
from coloproxy.lab.lab import Lab  # noqa: E402

PAGE = "/index.html"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--clients", type=int, default=4)
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
        f"command: python3 bench/lab_account.py --seconds {args.seconds} --clients {args.clients}"
        f"{' --pin' if args.pin else ''}"
    )
    out = Path(tempfile.mkdtemp(prefix="coloproxy-account-")) / "account"
    path = os.pathsep.join(
        [str(ROOT), str(ROOT / "bench" / "account_site"), os.environ.get("PYTHONPATH", "")]
    )
    os.environ["PYTHONPATH"] = path.rstrip(os.pathsep)  # the daemons inherit it
    os.environ["COLOPROXY_BENCH_ACCOUNT"] = str(out)
    lab = Lab("cpacct", Path("/run/coloproxy-lab-account"), say=lambda _text: None)
    try:
        state = lab.up(build=False)
        daemons = {name: pid for name, pid in state.pids.items() if name.endswith("_daemon")}
        if args.pin:
            print(pin_daemons(dict(state.pids)))
        for pid in daemons.values():
            os.kill(pid, signal.SIGUSR1)
        pages = {PAGE: expected_pages()[PAGE]}
        loops = [ClientLoop(lab.topology, pages, pause=0).start() for _ in range(args.clients)]
        started = time.monotonic()
        time.sleep(args.seconds)
        attempts = [a for loop in loops for a in loop.stop()]
        elapsed = time.monotonic() - started
        for pid in daemons.values():
            os.kill(pid, signal.SIGUSR2)
        time.sleep(1.0)
    finally:
        lab.down()
    served = sum(1 for a in attempts if a.ok)
    print(f"{served / elapsed:.1f} requests/s ({served} served, {len(attempts) - served} failed)")
    for role in ("primary", "secondary"):
        try:
            figures = json.loads(Path(f"{out}-{role}.json").read_text())
        except OSError:
            print(f"{role}: no figures (did the daemon get SIGUSR2?)")
            continue
        print(
            f"{role} daemon: process {figures['process'] / served * 1e3:.3f} ms/request"
            f" ({figures['process'] / elapsed * 1e3:.1f} ms/s),"
            f" main thread {figures['main_thread'] / served * 1e3:.3f} ms/request"
        )
        seconds, calls = figures["seconds"], figures["calls"]
        # ms/s: the background (timers, heartbeats, the lease gate) does not depend on the
        # request rate, so per second it compares across runs that served different rates.
        for label in sorted(seconds, key=lambda name: -seconds[name]):
            print(
                f"  {label:32} {seconds[label] / served * 1e3:6.3f} ms/request"
                f" {calls[label] / served:6.1f} calls/request"
                f" {seconds[label] / calls[label] * 1e6:7.1f} us/call"
                f" {seconds[label] / elapsed * 1e3:6.2f} ms/s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
