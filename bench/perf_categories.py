#!/usr/bin/env python3
"""Where a lab daemon's CPU goes, from a ``perf record`` profile with DWARF call graphs.

Python 3.11 has no perf support of its own and Debian's interpreter keeps no frame pointers,
so ``perf record -g`` shows only the leaf; with ``--call-graph dwarf`` the native stack is
whole and each sample can be put where it started: an NFQUEUE wake-up (split into the
verdict send, which runs the kernel's forwarding of the released packet, the receive, and
the rest: parsing, comparing, the proxy, the reader's bookkeeping), a timer, a heartbeat
received, the loop waiting (epoll and the switch back into the process), the lease gate,
the loop's callbacks and coroutines, another thread. A sample in none of them is "other".
It prints shares of the samples; it never asserts.

    perf record -e cpu-clock -F 1000 --call-graph dwarf,16384 -o daemon.data -p PID -- sleep 12
    perf script -i daemon.data > daemon.txt
    python3 bench/perf_categories.py daemon.txt

docs/benchmarks.md, section 4, has a profile of host P's daemon in the lab taken this way
(PID: the ``coloproxy run -c .../lab.yaml`` process while bench/lab_cpu.py's clients run).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

# A sample whose stack holds the NFQUEUE reader is a wake-up's (split by ``category``);
# any other, the first of ``_CATEGORIES`` (label, symbols any of which the stack holds).
_WAKEUP = "NetlinkQueue____on_readable"
_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("timers (the engine's: heartbeats, the key's renewals; the proxy's)", ("TimerPump____fire",)),
    ("heartbeats received (UDP)", ("uv__udp",)),
    ("the loop waiting: epoll and the switch back in (kernel)", ("do_epoll_wait", "epoll_pwait")),
    ("lease gate (libnftables)", ("nft_run_cmd",)),
    ("loop callbacks and coroutines (interpreted)", ("Loop__on_idle", "Handle__run")),
)


def _frames(sample: list[str]) -> list[tuple[str, str]]:
    """A sample's stack, innermost first: (symbol without offset, file name of its DSO)."""
    frames = []
    for line in sample:
        parts = line.strip().split(" ", 1)
        if len(parts) == 2:
            symbol, _, dso = parts[1].rpartition(" (")
            frames.append((symbol.split("+0x")[0], dso.rstrip(")").rsplit("/", 1)[-1]))
    return frames


def category(thread: str, frames: list[tuple[str, str]]) -> str:
    """Where a sample of thread ``thread`` with stack ``frames`` started (module doc)."""
    if thread != "python":
        return f"other threads ({thread})"
    stack = " ".join(symbol for symbol, _ in frames)
    if _WAKEUP in stack:
        if "__send" in stack or "sendto" in stack:
            return "queue wake-up: verdict send (kernel, with the forwarding it runs)"
        if frames[0][1] == "[kernel.kallsyms]" and "recvmmsg" in stack:
            return "queue wake-up: recvmmsg (the kernel's part)"
        if any(dso.startswith(("_ctypes", "libffi")) for _, dso in frames):
            return "queue wake-up: ctypes (the call into recvmmsg, user side)"
        return "queue wake-up: the rest (parse, compare, proxy, bookkeeping)"
    for label, marks in _CATEGORIES:
        if any(mark in stack for mark in marks):
            return label
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", type=Path, help="`perf script` output")
    args = parser.parse_args(argv)
    counts: collections.Counter[str] = collections.Counter()
    for block in args.script.read_text(errors="replace").split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) < 2:
            continue
        counts[category(lines[0].split()[0], _frames(lines[1:]))] += 1
    total = sum(counts.values())
    print(f"{total} samples")
    for label, count in counts.most_common():
        print(f"{100 * count / total:5.1f} %  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
