#!/usr/bin/env python3
"""Instructions per primary packet of the real daemon on the chardev transport, under callgrind.

    python3 bench/chardev_daemon_ir.py [--workload NAME] [--vnet] [--packets N] [--base N0]

``coloproxy run`` with a ``chardev:`` section (bench/chardev_bench.py's config) runs under
``valgrind --tool=callgrind``; the harness plays the engine for its restart checkpoint,
probes it, feeds it the workload's framed streams (bench/chardev_bench.py's feeder) and
counts what comes out of outdev, then stops it. Run twice, with N and with N0 packets; the
figure is (instructions of the first - instructions of the second) / (N - N0): what the
daemon does per primary packet (its secondary packet included) between the socket reads and
the outdev write, event loop included, kernel excluded. Where bench/chardev_loop.py
calls the transport's methods in process, this runs what ``coloproxy run`` runs.

CPython's cyclic collector is off in the daemon here (a ``sitecustomize`` on its path): a
young collection is a large step (one per 20 000 packets or so) that lands in one of the two
runs or the other. Under callgrind the daemon is slow, so the feeder is ahead and each read
is larger than in the real benchmark: per-receive costs weigh less. Figures vary by a few
per cent between runs (how the reads fall): compare medians of several.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Final

BENCH_DIR: Final = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT: Final = os.path.dirname(BENCH_DIR)
for _path in (BENCH_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import chardev_bench  # noqa: E402
import qemu_colo_compare  # noqa: E402
from workloads import NAMES, make_workload  # noqa: E402

# Under callgrind the daemon starts in tens of seconds and runs 50 times slower.
for _module in (qemu_colo_compare, chardev_bench):
    _module.STARTUP_TIMEOUT = 600.0  # type: ignore[misc]
    _module.IDLE_TIMEOUT = 60.0  # type: ignore[misc]


def instructions(workload_name: str, packets: int, vnet: bool) -> tuple[int, int]:
    """(instructions of one daemon run fed ``packets`` primary packets, the packets)."""
    directory = tempfile.mkdtemp(prefix="chardev-daemon-ir-")
    try:
        config = os.path.join(directory, "bench.yaml")
        with open(config, "w") as file:
            file.write(chardev_bench.OURS_CONFIG.format(dir=directory, vnet=str(vnet).lower()))
        site = os.path.join(directory, "site")
        os.mkdir(site)
        with open(os.path.join(site, "sitecustomize.py"), "w") as file:
            file.write("import gc\ngc.disable()\n")
        out = os.path.join(directory, "callgrind.out")
        stderr_path = os.path.join(directory, "stderr")
        env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{site}", PYTHONHASHSEED="0")
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                 "-m", "coloproxy", "run", "-c", config, "--no-setup"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
            )  # fmt: skip
        try:
            paths = [os.path.join(directory, name) for name in ("pin", "sin", "out")]
            qemu_colo_compare.wait_for_paths(paths, process)
            chardev_bench.complete_restart_checkpoint(os.path.join(directory, "ctl.sock"))
            primary, secondary, outdev = (qemu_colo_compare.connect_unix(p) for p in paths)
            chardev_bench.probe((primary, secondary, outdev), vnet)
            workload = make_workload(workload_name, packets, secondary_in_primary_seq_space=True)
            feeder = qemu_colo_compare.Feeder(
                primary, secondary, chardev_bench.frame_streams(workload, vnet)
            )
            feeder.start()
            expected = len(workload.primary_frames)
            released, _ = chardev_bench.count_frames(outdev, expected, feeder, vnet)
            feeder.join()
            for sock in (primary, secondary, outdev):
                sock.close()
            if released != expected:
                raise SystemExit(f"the daemon released {released} of {expected} packets")
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        with open(stderr_path, errors="replace") as file:
            collected = re.findall(r"Collected : (\d+)", file.read())
        if not collected:
            raise SystemExit("no callgrind total in the daemon's output")
        return int(collected[-1]), expected
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=NAMES, default="tcp-1")
    parser.add_argument("--vnet", action="store_true", help="vnet header framing")
    parser.add_argument("--packets", type=int, default=20_000)
    parser.add_argument("--base", type=int, default=2_000, help="packets of the second run")
    args = parser.parse_args()
    if not 0 < args.base < args.packets:
        parser.error("--base must be positive and below --packets")
    big, count = instructions(args.workload, args.packets, args.vnet)
    small, base = instructions(args.workload, args.base, args.vnet)
    print(
        f"{args.workload}{' vnet' if args.vnet else ''}: {round((big - small) / (count - base))} "
        f"instructions per primary packet (the daemon, {count:,} minus {base:,} packets)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
