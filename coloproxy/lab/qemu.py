"""Where the lab's QEMU and guest image are, and which accelerator to use.

qemu/build.sh and guest/build.sh build into a cache outside the work tree and point
``<cache>/qemu/current`` and ``<cache>/guest/current`` at the latest build. These helpers
only locate what was built and check that it matches the project's files (the patch set, the
guest sources); they never build. A missing or stale build raises `LabNotBuiltError` naming
the command to run.

Why a probe for KVM: on the CI machines /dev/kvm exists but a Linux guest does not boot
under their nested KVM, so "is /dev/kvm there" is not enough. `accelerator()` boots the
guest once with KVM and keeps the answer for the host's boot (``COLOPROXY_ACCEL=kvm|tcg``
skips the probe).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from coloproxy.errors import ColoproxyError

__all__ = [
    "LabNotBuiltError",
    "accelerator",
    "cache_dir",
    "guest_cmdline",
    "guest_dir",
    "guest_initrd",
    "guest_kernel",
    "qemu_binary",
    "qemu_firmware_dir",
    "repo_root",
]

# Kernel messages stay off the console (quiet) so that it carries the guest's own lines;
# panic=0 keeps a panicked guest's message on screen instead of rebooting it.
_BASE_CMDLINE = "console=ttyS0 quiet panic=0"
# A Linux guest reaches "ready" in about 4-20 s under TCG; under working KVM in 1-3 s.
_KVM_PROBE_TIMEOUT_S = 15.0
_READY_LINE = b"coloproxy-guest: ready"
# What guest/init accepts as coloproxy.disk=.
_DISK_NAME = re.compile(r"[a-z0-9]+")


class LabNotBuiltError(ColoproxyError):
    """The lab's QEMU or guest image is missing or older than the project's sources."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    return Path(os.environ.get("COLOPROXY_CACHE", "/var/cache/coloproxy"))


def _read_info(path: Path) -> dict[str, str]:
    info: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            info[key] = value
    return info


def _current_build(kind: str, what: str) -> tuple[Path, dict[str, str]]:
    """``<cache>/<kind>/current`` and its BUILD-INFO; LabNotBuiltError naming the script."""
    current = cache_dir() / kind / "current"
    info_path = current / "BUILD-INFO"
    if not info_path.is_file():
        raise LabNotBuiltError(f"no {what} in {current}: run {kind}/build.sh (as root)")
    return current, _read_info(info_path)


def _qemu_dir() -> Path:
    current, info = _current_build("qemu", "QEMU build")
    series = info.get("patch_series", "")
    patch_dir = repo_root() / "qemu" / "patches" / series
    if patch_dir.is_dir():
        # The patches are the part of the cache key that changes under a developer's
        # hands; a build from other patches is stale.
        recorded = info.get("patch_hash", "")
        if not _patch_hash_matches(patch_dir, recorded):
            raise LabNotBuiltError(
                f"the QEMU in {current.resolve()} was built from other patches or "
                f"configure flags than {patch_dir} and qemu/build.sh have now: "
                "run qemu/build.sh (as root)"
            )
    return current.resolve()


def _patch_hash_matches(patch_dir: Path, recorded: str) -> bool:
    """Compare the patch part of qemu/build.sh's cache key with the recorded one.

    build.sh hashes the patches followed by one line of recipe and configure flags; that
    line lives in build.sh, so this reads it from there rather than repeating it.
    """
    script = (repo_root() / "qemu" / "build.sh").read_text()
    recipe = _shell_value(script, "recipe")
    flags = _shell_array(script, "configure_flags")
    if recipe is None or flags is None:
        return True  # cannot tell; do not block on it
    data = b"".join(p.read_bytes() for p in sorted(patch_dir.glob("*.patch")))
    data += f"recipe={recipe} {' '.join(flags)}\n".encode()
    return hashlib.sha256(data).hexdigest()[:12] == recorded


def _shell_value(script: str, name: str) -> str | None:
    for line in script.splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1].strip()
    return None


def _shell_array(script: str, name: str) -> list[str] | None:
    start = script.find(f"\n{name}=(\n")
    if start < 0:
        return None
    end = script.find("\n)", start)
    body = script[start + len(name) + 4 : end]
    return [word for line in body.splitlines() for word in line.split()]


def qemu_binary() -> Path:
    """The patched qemu-system-x86_64 built by qemu/build.sh."""
    binary = _qemu_dir() / "bin" / "qemu-system-x86_64"
    if not os.access(binary, os.X_OK):
        raise LabNotBuiltError(f"{binary} missing or not executable: run qemu/build.sh")
    return binary


def qemu_firmware_dir() -> Path:
    """The firmware directory to pass as ``-L`` (the binary also finds it by itself)."""
    return _qemu_dir() / "share" / "qemu"


def guest_dir() -> Path:
    current, info = _current_build("guest", "guest image")
    guest_src = repo_root() / "guest"
    data = b"".join((guest_src / name).read_bytes() for name in ("build.sh", "init", "cpx.c"))
    data += (info.get("busybox_static", "") + "\n").encode()
    if hashlib.sha256(data).hexdigest()[:12] != info.get("guest_hash"):
        raise LabNotBuiltError(
            f"the guest image in {current.resolve()} was built from other sources than "
            f"{guest_src}: run guest/build.sh (as root)"
        )
    return current.resolve()


def guest_kernel() -> Path:
    return guest_dir() / "vmlinuz"


def guest_initrd() -> Path:
    return guest_dir() / "initrd.gz"


def guest_cmdline(
    *,
    ip: str | None = None,
    ip6: str | None = None,
    memcheck_mib: int = 32,
    memcheck_rate: int = 1024,
    memcheck_console: bool = True,
    disk: str | None = None,
    disk_rate: int = 65536,
    disk_console: bool = True,
    extra: str = "",
) -> str:
    """The kernel command line for the test guest (see guest/init for the parameters).

    ``disk`` names the guest's virtio disk (``"vda"``): the guest mounts it at /data, making
    a file system on a blank one, and runs the disk checker at ``disk_rate`` bytes per second
    (0: none) with its lines on the console when ``disk_console``. None: no disk words.
    """
    words = [_BASE_CMDLINE]
    if ip:
        words.append(f"coloproxy.ip={ip}")
    if ip6:
        words.append(f"coloproxy.ip6={ip6}")
    words.append(f"coloproxy.memcheck={memcheck_mib}")
    words.append(f"coloproxy.memrate={memcheck_rate}")
    words.append(f"coloproxy.memconsole={1 if memcheck_console else 0}")
    if disk is not None:
        if not _DISK_NAME.fullmatch(disk):
            raise ValueError(f"disk {disk!r}: a block device name like 'vda' wanted")
        if disk_rate < 0:
            raise ValueError(f"disk_rate {disk_rate}: bytes per second >= 0 wanted")
        words.append(f"coloproxy.disk={disk}")
        words.append(f"coloproxy.diskrate={disk_rate}")
        words.append(f"coloproxy.diskconsole={1 if disk_console else 0}")
    if extra:
        words.append(extra)
    return " ".join(words)


def accelerator() -> str:
    """``"kvm"`` where KVM boots the guest, else ``"tcg"``; the probe runs once per host boot."""
    forced = os.environ.get("COLOPROXY_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    memo = cache_dir() / f"accel-{boot_id}"
    try:
        answer = memo.read_text().strip()
        if answer in ("kvm", "tcg"):
            return answer
    except OSError:
        pass
    answer = "kvm" if _kvm_boots_guest() else "tcg"
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(answer + "\n")
    except OSError:
        pass
    return answer


def _kvm_boots_guest() -> bool:
    with tempfile.TemporaryDirectory(prefix="coloproxy-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [
            str(qemu_binary()),
            *("-machine", "pc", "-accel", "kvm", "-m", "256", "-nodefaults"),
            *("-display", "none", "-vga", "none", "-nic", "none"),
            *("-kernel", str(guest_kernel()), "-initrd", str(guest_initrd())),
            *("-append", guest_cmdline(memcheck_mib=0)),
            *("-serial", f"file:{serial}"),
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + _KVM_PROBE_TIMEOUT_S
            while time.monotonic() < deadline and proc.poll() is None:
                if serial.exists() and _READY_LINE in serial.read_bytes():
                    return True
                time.sleep(0.2)
            return False
        finally:
            proc.kill()
            proc.wait()
