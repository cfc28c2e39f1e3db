#!/usr/bin/env python3
"""bench/lab_cpu.py for two checkouts, alternately: the daemons' CPU per request, old vs new.

Runs ``bench/lab_cpu.py`` of each checkout in turn (old, new, old, new, ...), each with its own
code (``PYTHONPATH`` set to the checkout, so the lab's daemons run it too), ``--runs`` times
each, and prints every run (load average before it, requests/s, each daemon's CPU
milliseconds per request) and the medians of both daemons together. It prints, it never
asserts; like lab_cpu.py it needs root and the lab's QEMU and guest image.

    python3 bench/lab_cpu_ab.py --old /path/to/base --new . [--runs 3] [--seconds 15] [--pin]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

LINE = re.compile(r"^\s+(\w+)\s+([\d.]+)% CPU\s+([\d.]+) ms/request")
RATE = re.compile(r"^([\d.]+) requests/s")


def one_run(
    tree: Path, seconds: float, clients: int, cache: Path | None = None, pin: bool = False
) -> dict[str, float] | str:
    env = dict(os.environ, PYTHONPATH=str(tree))
    if cache is not None:  # that checkout's QEMU and guest builds (COLOPROXY_CACHE)
        env["COLOPROXY_CACHE"] = str(cache)
    command = [sys.executable, str(tree / "bench" / "lab_cpu.py")]
    command += ["--seconds", str(seconds), "--clients", str(clients)]
    if pin:  # both checkouts' lab_cpu.py must have it
        command.append("--pin")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    figures: dict[str, float] = {}
    for line in done.stdout.splitlines():
        if match := RATE.match(line):
            figures["requests/s"] = float(match.group(1))
        elif match := LINE.match(line):
            figures[match.group(1)] = float(match.group(3))
    if done.returncode != 0 or "primary_daemon" not in figures:
        return f"FAILED (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}"
    figures["daemons"] = figures["primary_daemon"] + figures["secondary_daemon"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the baseline checkout")
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument(
        "--old-cache",
        type=Path,
        help="COLOPROXY_CACHE for the old side, when its qemu/ or guest/ sources differ (a"
        " directory with qemu/current and guest/current linked to that checkout's builds)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--pin", action="store_true", help="lab_cpu.py --pin: the daemons on a CPU of their own"
    )
    args = parser.parse_args()
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"command: python3 bench/lab_cpu_ab.py --old {sides['old']} --new {sides['new']}"
        f" --runs {args.runs} --seconds {args.seconds} --clients {args.clients}"
        + (f" --old-cache {args.old_cache}" if args.old_cache else "")
        + (" --pin" if args.pin else "")
    )
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for run in range(args.runs):
        for side, tree in sides.items():
            load = os.getloadavg()
            cache = args.old_cache if side == "old" else None
            figures = one_run(tree, args.seconds, args.clients, cache, args.pin)
            head = f"run {run + 1} {side}: load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
            if isinstance(figures, str):
                print(f"{head}: {figures}", flush=True)
                continue
            results[side].append(figures)
            print(
                f"{head}: {figures['requests/s']:.1f} req/s, host P daemon"
                f" {figures['primary_daemon']:.2f} + host S daemon"
                f" {figures['secondary_daemon']:.2f} = {figures['daemons']:.2f} ms/request",
                flush=True,
            )
    medians = {}
    for side, runs in results.items():
        if runs:
            medians[side] = statistics.median(r["daemons"] for r in runs)
            spread = (min(r["daemons"] for r in runs), max(r["daemons"] for r in runs))
            rate = statistics.median(r["requests/s"] for r in runs)
            print(
                f"{side}: median {medians[side]:.2f} ms/request of both daemons"
                f" (spread {spread[0]:.2f}-{spread[1]:.2f}, {len(runs)} runs),"
                f" median {rate:.1f} requests/s"
            )
    if len(medians) == 2:
        print(f"new/old: {medians['new'] / medians['old']:.2f}")
    print(f"load at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
