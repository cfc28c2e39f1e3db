"""The lab guest's disk: a real QEMU (no COLO) with a virtio disk, the guest's checker and
its acknowledged records, and corruption made on the host found by the guest.

Theory of operation. One plain QEMU per boot runs the lab guest (guest/build.sh) with
``-drive if=virtio`` on a raw image the test makes (64 MiB, blank) and a tap NIC in a
namespace of the test's own: the test talks HTTP to the guest from that namespace with the
lab's client (coloproxy.lab.diskcheck). The guest makes an ext4 file system on the blank
disk, mounts it at /data and runs its disk checker; the checker's status lines come on the
serial console, which goes to a file.

The image outlives the boots, as a VM's disk does: QEMU is SIGKILLed between boots (a crash,
no clean shutdown), then records are corrupted in the image on the host, found by the bytes
:func:`coloproxy.lab.diskcheck.record` makes (the guest's format). The guest must find
every one: the checker at start, its rolling pass while it runs (it reads the disk, not its
page cache), and /cgi-bin/diskverify.

Bounded: each wait has a timeout; every QEMU and the namespace are ended in a ``finally``.
The checker runs at 16 KiB/s here (128 records/s), so its 16384-record ring does not wrap
during the test and a corrupted record stays where the test put it.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coloproxy.lab import qemu as lab
from coloproxy.lab.client import http_get
from coloproxy.lab.diskcheck import (
    ACKED_MAGIC,
    DISKCHECK_MAGIC,
    RECORD_SIZE,
    DiskVerify,
    disk_verify,
    disk_write,
    diskcheck_lines,
    diskcheck_summary,
    record,
)
from coloproxy.lab.vms import LabError
from coloproxy.net import netns

pytestmark = [pytest.mark.qemu, pytest.mark.root]

BOOT_TIMEOUT_S = 120.0
LINES_TIMEOUT_S = 60.0
DISK_RATE = 16384  # bytes per second: 128 records/s, the ring wraps after ~128 s
IMAGE_SIZE = 64 * 1024 * 1024
HOST_IP = "10.98.0.1"
GUEST_IP = "10.98.0.100"
MOUNTED = b"coloproxy-guest: disk /dev/vda mounted at /data"
START_RE = re.compile(rb"diskcheck: start .* resuming after record (\d+) verified=\d+ errors=(\d+)")
_counter = itertools.count()


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[guest disk] {text}")


@pytest.fixture(scope="module")
def built() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, a tap, QEMU; builds with apt and /boot")
    for script in ("qemu/build.sh", "guest/build.sh"):
        # Seconds when cached; the first QEMU build on a fresh machine takes ~5 minutes.
        subprocess.run([str(lab.repo_root() / script)], check=True, stdout=subprocess.DEVNULL)


@pytest.fixture
def namespace(built: None) -> Iterator[str]:
    """A namespace with a tap ``tap0`` (HOST_IP/24) for the guest's NIC."""
    name = f"cpdg{os.getpid() % 10000}{next(_counter)}"
    netns.create(name)
    try:
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"],
            ["ip", "addr", "add", f"{HOST_IP}/24", "dev", "tap0"],
            ["ip", "link", "set", "tap0", "up"],
        ):
            netns.run(name, argv)
        yield name
    finally:
        netns.kill_processes(name)
        netns.delete(name)


@dataclass
class Guest:
    """One boot of the guest: its QEMU in the namespace and its serial console file."""

    proc: subprocess.Popen[bytes]
    serial: Path
    namespace: str
    started: float

    def console(self) -> bytes:
        return self.serial.read_bytes() if self.serial.exists() else b""

    def wait_for(self, what: str, predicate: Callable[[bytes], bool], timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            console = self.console()
            if predicate(console):
                return console
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode}) before {what}:\n"
                                     + console.decode(errors="replace")[-2000:])  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {what} after {timeout:.0f} s; console:\n"
                    + console.decode(errors="replace")[-2000:]
                )
            time.sleep(0.1)

    def wait_ready(self) -> float:
        self.wait_for("ready line", lambda c: b"coloproxy-guest: ready" in c, BOOT_TIMEOUT_S)
        return time.monotonic() - self.started

    def wait_lines(self, count: int, after: int = 0) -> bytes:
        """The console once ``count`` diskcheck status lines came after byte ``after``."""
        return self.wait_for(
            f"{count} diskcheck lines",
            lambda c: len(diskcheck_lines(c[after:])) >= count,
            LINES_TIMEOUT_S,
        )

    def write(self, n: int) -> int:
        return disk_write(GUEST_IP, n, timeout=30.0, netns=self.namespace)

    def verify(self) -> DiskVerify:
        return disk_verify(GUEST_IP, timeout=30.0, netns=self.namespace)

    def kill(self) -> None:
        """SIGKILL: the VM stops as in a crash, nothing flushed by the guest."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def boot(namespace: str, tmp_path: Path) -> Iterator[Callable[..., Guest]]:
    """Boots the guest (one at a time) with the image, if given; kills every QEMU at the end."""
    started: list[Guest] = []

    def start(
        image: Path | None,
        *,
        disk: bool = True,
        disk_rate: int = DISK_RATE,
        disk_console: bool = True,
    ) -> Guest:
        serial = tmp_path / f"serial{len(started)}.log"
        cmdline = lab.guest_cmdline(
            ip=f"{GUEST_IP}/24",
            memcheck_mib=0,
            disk="vda" if disk else None,
            disk_rate=disk_rate,
            disk_console=disk_console,
        )
        argv = [
            str(lab.qemu_binary()),
            *("-machine", "pc", "-accel", lab.accelerator(), "-m", "256", "-nodefaults"),
            *("-display", "none", "-vga", "none"),
            *("-kernel", str(lab.guest_kernel()), "-initrd", str(lab.guest_initrd())),
            *("-append", cmdline),
            *("-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off"),
            *("-device", "virtio-net-pci,netdev=n0,romfile="),
            *("-serial", f"file:{serial}"),
        ]
        if image is not None:
            argv += ["-drive", f"if=virtio,file={image},format=raw"]
        proc = netns.popen(namespace, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        guest = Guest(proc, serial, namespace, time.monotonic())
        started.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in started:
            guest.kill()
            if guest.proc.stderr is not None:
                guest.proc.stderr.close()


def blank_image(tmp_path: Path) -> Path:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return image


def corrupt(image: Path, magic: bytes, seq: int) -> int:
    """Flips a payload byte of record ``seq`` in the image; the record's offset."""
    data = image.read_bytes()
    wanted = record(magic, seq)
    at = data.find(wanted)
    assert at >= 0, f"record {magic!r} {seq} is not in {image}"
    assert data.find(wanted, at + 1) < 0, f"record {magic!r} {seq} is twice in {image}"
    with image.open("r+b") as f:
        f.seek(at + 40)
        f.write(bytes([data[at + 40] ^ 0xFF]))
    return at


def test_a_blank_disk_is_made_checked_and_corruption_found(
    boot: Callable[..., Guest], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = blank_image(tmp_path)

    # -- boot 1: a blank disk ----------------------------------------------------------------
    guest = boot(image)
    ready_s = guest.wait_ready()
    console = guest.wait_lines(3)
    assert b"coloproxy-guest: disk /dev/vda has no ext file system: mkfs.ext4" in console
    assert MOUNTED in console
    assert b"disk=/dev/vda" in console  # the ready line
    lines = diskcheck_lines(console)
    assert all(line.errors == 0 for line in lines), diskcheck_summary(console)
    assert lines[-1].seq > lines[0].seq > 0, diskcheck_summary(console)
    assert lines[-1].verified > lines[0].verified, diskcheck_summary(console)
    report(capsys, f"blank disk: ready in {ready_s:.1f} s; {diskcheck_summary(console)}")

    # The acknowledged records: three requests, then each record checked from the disk.
    assert guest.write(3) == 3
    assert guest.write(1) == 4
    assert guest.write(1000) == 1004
    assert guest.verify() == DiskVerify(records=1004, ok=1004, corrupt=0, first_bad=None)
    # Requests at once: each one's records are its own (flock), none lost.
    answers: list[int] = []
    failures: list[str] = []

    def writer() -> None:
        for _ in range(3):
            try:
                answers.append(guest.write(50))
            except LabError as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert sorted(answers) == [1004 + 50 * k for k in range(1, 13)]
    assert guest.verify() == DiskVerify(records=1604, ok=1604, corrupt=0, first_bad=None)
    # What the guest refuses.
    for query in ("n=0", "n=1001", "n=x", ""):
        status, body = netns.run_in(
            guest.namespace, http_get, f"/cgi-bin/diskwrite?{query}", 30.0, host=GUEST_IP
        )
        assert status == 400, (query, body)
    console = guest.console()
    assert all(line.errors == 0 for line in diskcheck_lines(console)), diskcheck_summary(console)
    guest.kill()
    written = diskcheck_lines(guest.console())[-1].seq

    # -- boot 2: after the kill, everything is there ------------------------------------------
    guest = boot(image)
    ready_s = guest.wait_ready()
    console = guest.wait_lines(2)
    start = START_RE.search(console)
    assert start is not None, console.decode(errors="replace")
    assert int(start[1]) >= written  # every record it had reported as written
    assert int(start[2]) == 0, console.decode(errors="replace")
    assert b"has no ext file system" not in console  # not made again
    assert guest.verify() == DiskVerify(records=1604, ok=1604, corrupt=0, first_bad=None)
    report(capsys, f"second boot: ready in {ready_s:.1f} s; {diskcheck_summary(console)}")
    # A record corrupted on the disk under the running guest: its rolling pass reads the
    # disk, so it finds it (a full pass over a few thousand records takes about a second).
    mark = len(console)
    corrupt(image, DISKCHECK_MAGIC, 20)
    console = guest.wait_for(
        "the checker's error for record 20",
        lambda c: (
            b"diskcheck: error: record 20 " in c[mark:]
            and any(line.errors >= 1 for line in diskcheck_lines(c[mark:]))
        ),
        LINES_TIMEOUT_S,
    )
    assert diskcheck_lines(console[mark:])[-1].errors == 1, diskcheck_summary(console[mark:])
    guest.kill()

    # -- boot 3: records corrupted while the VM was down ---------------------------------------
    corrupt(image, ACKED_MAGIC, 777)
    corrupt(image, DISKCHECK_MAGIC, 500)
    guest = boot(image)
    guest.wait_ready()
    assert guest.verify() == DiskVerify(records=1604, ok=1603, corrupt=1, first_bad=777)
    console = guest.wait_lines(1)
    start = START_RE.search(console)
    assert start is not None, console.decode(errors="replace")
    assert int(start[2]) == 2, console.decode(errors="replace")  # records 20 and 500
    assert b"diskcheck: error: record 20 " in console
    assert b"diskcheck: error: record 500 " in console
    assert all(line.errors == 2 for line in diskcheck_lines(console)), diskcheck_summary(console)
    report(capsys, f"after corruption: {diskcheck_summary(console)}")


def test_without_a_disk_the_guest_says_so_and_serves_on(
    boot: Callable[..., Guest], capsys: pytest.CaptureFixture[str]
) -> None:
    # No disk word: today's guest, no disk line at all.
    guest = boot(None, disk=False)
    ready_s = guest.wait_ready()
    console = guest.console()
    assert b"disk=none" in console
    assert b"coloproxy-guest: disk" not in console
    with pytest.raises(LabError, match="status 503"):
        guest.write(1)
    guest.kill()
    report(capsys, f"no disk: ready in {ready_s:.1f} s")
    # The disk word without a disk: an error line, and the guest still comes up.
    guest = boot(None, disk=True)
    guest.wait_ready()
    console = guest.console()
    assert b"coloproxy-guest: disk error: no /dev/vda" in console
    assert b"disk=error" in console
    assert diskcheck_lines(console) == []
    with pytest.raises(LabError, match="no disk mounted at /data"):
        guest.verify()


def test_the_record_offsets_are_whole_records(tmp_path: Path) -> None:
    """The test's own corrupt(): it finds exactly the record and changes one byte."""
    image = tmp_path / "img"
    payload = b"\0" * 1000 + record(ACKED_MAGIC, 5) + record(ACKED_MAGIC, 6)
    image.write_bytes(payload)
    at = corrupt(image, ACKED_MAGIC, 6)
    assert at == 1000 + RECORD_SIZE
    changed = image.read_bytes()
    assert [i for i in range(len(payload)) if payload[i] != changed[i]] == [at + 40]


def test_the_checker_off_or_off_the_console(boot: Callable[..., Guest], tmp_path: Path) -> None:
    image = blank_image(tmp_path)
    # diskrate=0: no checker, the acknowledged records still work.
    guest = boot(image, disk_rate=0)
    guest.wait_ready()
    assert guest.write(2) == 2
    status, body = netns.run_in(
        guest.namespace, http_get, "/cgi-bin/diskcheck", 30.0, host=GUEST_IP
    )
    assert (status, body) == (200, b"diskcheck not running\n")
    console = guest.console()
    assert MOUNTED in console
    assert b"diskcheck" not in console
    guest.kill()
    # diskconsole=0: the checker runs, its lines go to /run/diskcheck.status only.
    guest = boot(image, disk_console=False)
    guest.wait_ready()
    deadline = time.monotonic() + LINES_TIMEOUT_S
    while True:
        try:
            status, body = netns.run_in(
                guest.namespace, http_get, "/cgi-bin/diskcheck", 30.0, host=GUEST_IP
            )
        except OSError as exc:
            # The same address on a new guest (new MAC) right after the old one was killed:
            # until neighbour discovery settles a connect can fail (EHOSTUNREACH, seen in CI).
            status, body = 0, str(exc).encode()
        lines = diskcheck_lines(body)
        if status == 200 and lines and lines[-1].seq > 0:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
    assert lines[-1].errors == 0
    assert b"diskcheck" not in guest.console()
    assert guest.verify() == DiskVerify(records=2, ok=2, corrupt=0, first_bad=None)
