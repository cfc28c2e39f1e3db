#!/usr/bin/env python3
"""The lab daemons' CPU with no client at all (their background: heartbeats, engine timers,
the leader key's renewals, the lease gate, checkpoints), for two checkouts alternately.

For each side in turn (old, new, old, new, ...) a child Python with ``PYTHONPATH`` set to
that checkout (the lab's daemons inherit it, so they run its code) brings the lab up, lets
it settle ``--settle`` s, and reads each daemon's CPU (utime + stime, /proc) over
``--seconds``. Prints every run with the load average before it, and the medians. At 100
requests/s, 1 % of a CPU is 0.1 ms per request. Needs root and the lab's QEMU and guest
image; it prints, it never asserts.

    python3 bench/lab_idle_ab.py --old /path/to/base-checkout --new . [--runs 3] [--seconds 20]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, os, sys, time
from pathlib import Path
from coloproxy.lab.lab import Lab

def cpu(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

settle, seconds = float(sys.argv[1]), float(sys.argv[2])
lab = Lab("cpidle", Path("/run/coloproxy-lab-idle"), say=lambda _text: None)
try:
    state = lab.up(build=False)
    pids = {n: p for n, p in state.pids.items() if n.endswith("_daemon")}
    time.sleep(settle)
    before = {n: cpu(p) for n, p in pids.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    after = {n: cpu(p) for n, p in pids.items()}
finally:
    lab.down()
print(json.dumps({n: (after[n] - before[n]) / elapsed * 100 for n in pids}))
"""


def one_run(tree: Path, settle: float, seconds: float) -> dict[str, float] | str:
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, "-c", CHILD, str(settle), str(seconds)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return f"FAILED (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}"
    import json

    figures: dict[str, float] = json.loads(lines[-1])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the baseline checkout")
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=3.0)
    args = parser.parse_args()
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"command: python3 bench/lab_idle_ab.py --old {sides['old']} --new {sides['new']}"
        f" --runs {args.runs} --seconds {args.seconds} --settle {args.settle}"
    )
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for run in range(args.runs):
        for side, tree in sides.items():
            load = os.getloadavg()
            figures = one_run(tree, args.settle, args.seconds)
            head = f"run {run + 1} {side}: load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
            if isinstance(figures, str):
                print(f"{head}: {figures}", flush=True)
                continue
            results[side].append(figures)
            text = ", ".join(f"{name} {share:.2f} %" for name, share in sorted(figures.items()))
            print(f"{head}: {text} of a CPU", flush=True)
    for side, runs in results.items():
        if not runs:
            continue
        for name in sorted(runs[0]):
            shares = [r[name] for r in runs if name in r]
            print(
                f"{side}: {name} median {statistics.median(shares):.2f} % of a CPU"
                f" (spread {min(shares):.2f}-{max(shares):.2f}, {len(shares)} runs)"
            )
    print(f"load at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
