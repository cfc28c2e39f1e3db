#!/usr/bin/env python3
"""The socket server's per-receive work of bench/compare_bench.py, in process, no syscalls.

    python3 bench/relay_loop.py [--workload NAME] [--packets N]
    valgrind --tool=callgrind python3 bench/relay_loop.py --workload tcp-1 --runs 1
    valgrind --tool=callgrind python3 bench/relay_loop.py --workload tcp-1 --setup-only

Builds a workload, serializes it in colo-compare's framing and cuts it in the feeder's chunks
(64 schedule entries), then does per chunk what the socket server does per receive: cut the
frames in place (``FrameDecoder.cut``), hold the primary's (``HeldFrames.hold_frames``),
``feed_many``, release, join the output. Prints the CPU time per primary packet (best of
``--runs``, default 3).
Under callgrind, the instruction count of a ``--runs 1`` run minus that of ``--setup-only``
(the same start-up and workload, no loop), divided by the primary packets, is the
instructions per primary packet:
independent of the load (docs/benchmarks.md, "Where the time goes now").
``COLOPROXY_PURE=1`` runs the pure variant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Final

BENCH_DIR: Final = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT: Final = os.path.dirname(BENCH_DIR)
for _path in (BENCH_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from compare_bench import NAMES, bench_workload  # noqa: E402
from qemu_colo_compare import frame_streams  # noqa: E402


def chunks(name: str, packets: int) -> tuple[int, list[tuple[bool, bytes]]]:
    workload = bench_workload(name, packets)
    streams = frame_streams(workload)
    return len(workload.primary_frames), streams.receives()


def relay(primary_count: int, received: list[tuple[bool, bytes]]) -> float:
    """CPU seconds for the whole loop; checks every primary frame came out once."""
    from coloproxy.compare import Comparator, CompareConfig, Framing, Side
    from coloproxy.compare.relay import HeldFrames
    from coloproxy.protocol.colo_frames import FrameDecoder

    comparator = Comparator(CompareConfig(framing=Framing.ETHERNET, retransmit_window=int(os.environ.get("RW", 4<<20)), max_retransmit_bytes=int(os.environ.get("MR", 64<<20))))
    decoders = {True: FrameDecoder(), False: FrameDecoder()}
    held = HeldFrames()
    released = others = 0
    started = time.process_time()
    for is_primary, data in received:
        frames = decoders[is_primary].cut(data)
        if is_primary:
            events = comparator.feed_many(Side.PRIMARY, frames, 1.0, held.hold_frames(frames))
        else:
            events = comparator.feed_many(Side.SECONDARY, frames, 1.0, [None] * len(frames))
        others += held.release_events(events)
        if held.queued_frames:
            released += held.queued_frames
            held.take()
    seconds = time.process_time() - started
    if released != primary_count or others or held.unknown:
        raise SystemExit(f"released {released} of {primary_count}, {others} other events")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=NAMES, default="tcp-1")
    parser.add_argument("--packets", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3, help="loops, the best is shown")
    parser.add_argument("--setup-only", action="store_true", help="build, do not run the loop")
    args = parser.parse_args()
    from coloproxy import variant

    primary_count, received = chunks(args.workload, args.packets)
    from coloproxy.compare import CompareConfig
    from coloproxy.daemon import collector, heap

    collector.tune()  # as `coloproxy run` does (the same in a --setup-only run)
    heap.reserve(CompareConfig().max_retransmit_bytes)  # as `coloproxy run` does on host P
    if args.setup_only:
        import coloproxy.compare.relay
        import coloproxy.protocol.colo_frames  # noqa: F401  the same imports as a run

        variant.describe()  # imports every compiled module, as the run's last line does
        return 0
    best = min(relay(primary_count, received) for _ in range(max(1, args.runs)))
    print(
        f"{args.workload}: {best / primary_count * 1e6:.2f} us CPU per primary packet "
        f"(best of {args.runs}, {primary_count:,} packets; {variant.describe()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
