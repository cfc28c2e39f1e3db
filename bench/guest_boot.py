"""Boot time of the lab guest to its ready line, without and with a disk (guest/README.md).

    python3 bench/guest_boot.py [--rounds 5] [--accel tcg|kvm]

Run as root after qemu/build.sh and guest/build.sh. Each round boots a plain QEMU (no COLO,
no NIC, ``-m 256``, memcheck off) three ways, one after the other: no disk (the baseline),
a blank 64 MiB raw image (the guest makes ext4 on it) and that same image again (already
made, journal recovered after the previous SIGKILL). The time is from starting QEMU to
``coloproxy-guest: ready`` in the serial file (polled every 20 ms). Prints the date, the
command, the load average before and after, every run and the median of each way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coloproxy.lab import qemu as lab

READY = b"coloproxy-guest: ready"
TIMEOUT_S = 120.0


def boot(image: Path | None, accel: str, serial: Path) -> float:
    serial.unlink(missing_ok=True)
    argv = [
        str(lab.qemu_binary()),
        *("-machine", "pc", "-accel", accel, "-m", "256", "-nodefaults"),
        *("-display", "none", "-vga", "none", "-nic", "none"),
        *("-kernel", str(lab.guest_kernel()), "-initrd", str(lab.guest_initrd())),
        *("-append", lab.guest_cmdline(memcheck_mib=0, disk="vda" if image else None)),
        *("-serial", f"file:{serial}"),
    ]
    if image is not None:
        argv += ["-drive", f"if=virtio,file={image},format=raw"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while READY not in (serial.read_bytes() if serial.exists() else b""):
            if proc.poll() is not None or time.monotonic() - started > TIMEOUT_S:
                raise SystemExit(f"no ready line: {serial.read_bytes()[-500:]!r}")
            time.sleep(0.02)
        took = time.monotonic() - started
        if image is not None and b"mounted at /data" not in serial.read_bytes():
            raise SystemExit(f"the disk was not mounted: {serial.read_bytes()[-500:]!r}")
        return took
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--accel", default=None, help="default: coloproxy.lab.qemu.accelerator()")
    args = parser.parse_args()
    accel = args.accel or lab.accelerator()
    print(f"date {datetime.now(UTC):%Y-%m-%d %H:%M:%SZ}; command {' '.join(sys.argv)}")
    print(f"accel {accel}; guest {lab.guest_dir()}; load average {os.getloadavg()}")
    ways = ("no disk", "blank disk", "made disk")
    times: dict[str, list[float]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory(prefix="coloproxy-guest-boot-") as tmp:
        serial = Path(tmp) / "serial.log"
        image = Path(tmp) / "disk.img"
        for round_ in range(args.rounds):
            image.unlink(missing_ok=True)
            with image.open("wb") as f:
                f.truncate(64 * 1024 * 1024)
            for way, disk in zip(ways, (None, image, image), strict=True):
                took = boot(disk, accel, serial)
                times[way].append(took)
                print(f"round {round_ + 1} {way:10} {took:.2f} s", flush=True)
    print(f"load average after {os.getloadavg()}")
    for way in ways:
        print(f"median {way:10} {statistics.median(times[way]):.2f} s (of {len(times[way])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
