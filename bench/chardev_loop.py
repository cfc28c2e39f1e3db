#!/usr/bin/env python3
"""The daemon's chardev path per receive, in process, no syscalls: for callgrind.

    python3 bench/chardev_loop.py [--workload NAME] [--packets N] [--vnet]
    valgrind --tool=callgrind python3 bench/chardev_loop.py --workload tcp-1 --runs 1
    valgrind --tool=callgrind python3 bench/chardev_loop.py --workload tcp-1 --setup-only

What ``coloproxy run`` does with a ``chardev:`` section (bench/chardev_bench.py drives the real
daemon over sockets) between the bytes a socket read returns and the bytes written to outdev:
``ChardevTransport``'s input (cut the frames, hold the primary's), the daemon's callback
(``PrimaryProxy.on_primary_many`` / ``on_secondary_many``: ``feed_many``, then ``_act``: the
batch's released frames handed to the held frames in one ``accept_many``, the counters), and
the outdev write's ``take_parts()``. Not included: the event loop, the socket calls, the timer
pump's poke. The workload is chardev_bench's (the secondary in the primary's sequence space,
compared as ``secondary_seq: rewritten``), cut into the feeder's chunks as
bench/relay_loop.py does.
Under callgrind, (instructions of ``--runs 1``) minus (instructions of ``--setup-only``),
divided by the primary packets, is the instructions per primary packet.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Final

BENCH_DIR: Final = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT: Final = os.path.dirname(BENCH_DIR)
for _path in (BENCH_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from chardev_bench import frame_streams  # noqa: E402
from workloads import NAMES, make_workload  # noqa: E402


def chunks(name: str, packets: int, vnet: bool) -> tuple[int, list[tuple[bool, bytes]]]:
    workload = make_workload(name, packets, secondary_in_primary_seq_space=True)
    streams = frame_streams(workload, vnet)
    return len(workload.primary_frames), streams.receives()


class _Requests:
    def checkpoint_requested(self, request: object) -> None:
        pass


async def relay(primary_count: int, received: list[tuple[bool, bytes]], vnet: bool) -> float:
    """CPU seconds for the whole loop; checks every primary frame came out once."""
    from coloproxy.capture.chardev import ChardevTransport
    from coloproxy.compare import Comparator, CompareConfig, Framing, SecondarySeq
    from coloproxy.config import ChardevConfig, ChardevSocket
    from coloproxy.daemon.primary import PrimaryProxy

    comparator = Comparator(
        CompareConfig(framing=Framing.ETHERNET, secondary_seq=SecondarySeq.REWRITTEN)
    )
    unused = ChardevSocket(server=True, path=Path("/nonexistent"))
    config = ChardevConfig(unused, unused, unused, vnet_hdr=vnet)
    proxy: PrimaryProxy | None = None

    def on_primary(tokens: object, packets: object, now: float) -> None:
        assert proxy is not None
        proxy.on_primary_many(tokens, packets, now)  # type: ignore[arg-type]

    def on_secondary(tokens: object, packets: object, now: float) -> None:
        assert proxy is not None
        proxy.on_secondary_many(tokens, packets, now)  # type: ignore[arg-type]

    transport = ChardevTransport(config, on_primary, on_secondary)
    loop = asyncio.get_running_loop()
    proxy = PrimaryProxy(
        comparator, transport.primary_verdicts, transport.secondary_verdicts, _Requests(),
        loop.time(),
    )  # fmt: skip
    proxy.checkpoint_completed(loop.time())  # the restart checkpoint (I6)
    frames = transport._frames
    released = 0
    started = time.process_time()
    for is_primary, data in received:
        if is_primary:
            transport._primary_data(data)
        else:
            transport._secondary_data(data)
        if frames.queued_frames:  # what flush() writes to outdev
            released += frames.queued_frames
            frames.take_parts()  # what flush() hands to a vectored write
    seconds = time.process_time() - started
    if released != primary_count or len(frames):
        raise SystemExit(f"released {released} of {primary_count}, {len(frames)} held")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=NAMES, default="tcp-1")
    parser.add_argument("--packets", type=int, default=50_000)
    parser.add_argument("--vnet", action="store_true", help="vnet header framing")
    parser.add_argument("--runs", type=int, default=3, help="loops, the best is shown")
    parser.add_argument("--setup-only", action="store_true", help="build, do not run the loop")
    args = parser.parse_args()
    from coloproxy import variant

    primary_count, received = chunks(args.workload, args.packets, args.vnet)
    from coloproxy.compare import CompareConfig
    from coloproxy.daemon import collector, heap

    collector.tune()  # as `coloproxy run` does (the same in a --setup-only run)
    heap.reserve(CompareConfig().max_retransmit_bytes)  # as `coloproxy run` does on host P
    if args.setup_only:
        import coloproxy.capture.chardev
        import coloproxy.daemon.primary  # noqa: F401  the same imports as a run

        variant.describe()  # imports every compiled module, as the run's last line does
        return 0
    best = min(
        asyncio.run(relay(primary_count, received, args.vnet)) for _ in range(max(1, args.runs))
    )
    print(
        f"{args.workload}{' vnet' if args.vnet else ''}: {best / primary_count * 1e6:.2f} us CPU "
        f"per primary packet (best of {args.runs}, {primary_count:,} packets; "
        f"{variant.describe()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
