"""The lab guest's disk, seen from the host: its checker's console lines and its HTTP client.

A guest booted with ``coloproxy.disk=vda`` (:func:`coloproxy.lab.qemu.guest_cmdline`) mounts
its virtio disk at /data and runs two things on it (guest/README.md "The disk"):

- ``cpx diskcheck`` writes numbered records into a ring file and reads them back from the
  disk; once a second it prints ``diskcheck seq=N records=R verified=V errors=E`` on the
  console. :func:`diskcheck_lines` and :func:`diskcheck_summary` read those lines, the way
  :func:`coloproxy.lab.console.memcheck_summary` reads the memory checker's.
- ``/cgi-bin/diskwrite?n=K`` appends K records to /data/acked.dat and answers only once they
  are synced (``acked last=SEQ records=N``); ``/cgi-bin/diskverify`` checks every record in
  the file (``verified records=N ok=N corrupt=C first_bad=SEQ|-``). A record the guest
  acknowledged must still be there, intact, after a failover: :func:`disk_write` and
  :func:`disk_verify` are the client. Their answers depend only on the file, so the PVM and
  the SVM answer the same bytes while they are in step.

Both files hold 128-byte records, :func:`record` builds one exactly as the guest does (the
tests find records in a disk image with it).
"""

from __future__ import annotations

import http.client
import re
import struct
from dataclasses import dataclass

from coloproxy.lab import vms
from coloproxy.lab.client import http_get
from coloproxy.lab.vms import LabError
from coloproxy.net import netns as _netns

__all__ = [
    "ACKED_MAGIC",
    "DISKCHECK_MAGIC",
    "DISKWRITE_MAX",
    "RECORD_SIZE",
    "DiskVerify",
    "DiskcheckLine",
    "disk_verify",
    "disk_write",
    "diskcheck_lines",
    "diskcheck_summary",
    "parse_acked",
    "parse_verified",
    "record",
]

RECORD_SIZE = 128
DISKCHECK_MAGIC = b"CPXDCHK1"  # /data/diskcheck.dat
ACKED_MAGIC = b"CPXACKD1"  # /data/acked.dat
DISKWRITE_MAX = 1000  # records per /cgi-bin/diskwrite request

_MASK = (1 << 64) - 1
_PAYLOAD_WORDS = 13
_DISKCHECK = re.compile(rb"diskcheck seq=(\d+) records=(\d+) verified=(\d+) errors=(\d+)")
_DISK_ERROR = re.compile(rb"coloproxy-guest: disk error[^\r\n]*")
_ACKED = re.compile(r"acked last=(\d+) records=(\d+)")
_VERIFIED = re.compile(r"verified records=(\d+) ok=(\d+) corrupt=(\d+) first_bad=(\d+|-)")


def _mix(x: int) -> int:
    """splitmix64's finaliser, as guest/cpx.c's mix()."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _fnv64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & _MASK
    return h


def record(magic: bytes, seq: int) -> bytes:
    """The 128-byte record ``seq`` as the guest writes it: magic, seq, payload, checksum."""
    if len(magic) != 8 or not 0 < seq < 1 << 60:
        raise ValueError(f"record({magic!r}, {seq}): an 8-byte magic and 0 < seq < 2**60")
    words = [_mix((seq << 4) | j) for j in range(_PAYLOAD_WORDS)]
    head = magic + struct.pack(f"<Q{_PAYLOAD_WORDS}Q", seq, *words)
    return head + struct.pack("<Q", _fnv64(head))


# -- the checker's console lines ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskcheckLine:
    """One status line: the last record written, the records the ring holds, the record
    checks done and the records found missing or bad since the checker started."""

    seq: int
    records: int
    verified: int
    errors: int


def diskcheck_lines(console: bytes) -> list[DiskcheckLine]:
    """The disk checker's status lines in a guest's console output, in order."""
    return [
        DiskcheckLine(int(m[1]), int(m[2]), int(m[3]), int(m[4]))
        for m in _DISKCHECK.finditer(console)
    ]


def diskcheck_summary(console: bytes) -> str:
    """What the guest's disk checker printed: lines, records verified, errors."""
    found = diskcheck_lines(console)
    notes = [m[0].decode(errors="replace").removeprefix("coloproxy-guest: ") for m in
             _DISK_ERROR.finditer(console)]  # fmt: skip
    trouble = [word.decode() for word in vms.KERNEL_TROUBLE if word in console]
    if trouble:
        notes.append(f"kernel: {', '.join(trouble)}")
    tail = "".join(f"; {note}" for note in notes)
    if not found:
        return "no status line" + tail
    first, last = found[0], found[-1]
    text = (
        f"seq {first.seq}..{last.seq}, {last.verified - first.verified} more records verified, "
        f"{max(line.errors for line in found)} errors"
    )
    return text + tail


# -- the acknowledged records, over HTTP --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskVerify:
    """/cgi-bin/diskverify's answer; ``first_bad`` is None when no record is corrupt."""

    records: int
    ok: int
    corrupt: int
    first_bad: int | None


def parse_acked(body: bytes) -> tuple[int, int]:
    """``acked last=SEQ records=N`` -> (SEQ, N); anything else raises LabError."""
    text = body.decode(errors="replace").strip()
    match = _ACKED.fullmatch(text)
    if match is None:
        raise LabError(
            f"/cgi-bin/diskwrite answered {text[:200]!r}, not 'acked last=SEQ records=N'"
        )
    return int(match[1]), int(match[2])


def parse_verified(body: bytes) -> DiskVerify:
    """``verified records=N ok=N corrupt=C first_bad=SEQ|-``; anything else raises LabError."""
    text = body.decode(errors="replace").strip()
    match = _VERIFIED.fullmatch(text)
    if match is None:
        raise LabError(
            f"/cgi-bin/diskverify answered {text[:200]!r}, "
            "not 'verified records=N ok=N corrupt=C first_bad=SEQ|-'"
        )
    first_bad = None if match[4] == "-" else int(match[4])
    result = DiskVerify(int(match[1]), int(match[2]), int(match[3]), first_bad)
    if result.ok + result.corrupt != result.records or (result.corrupt > 0) != (
        first_bad is not None
    ):
        raise LabError(f"/cgi-bin/diskverify answered an inconsistent {text!r}")
    return result


def _get(host: str, port: int, path: str, timeout: float, netns: str | None) -> bytes:
    """GET ``path`` with the lab's client (from namespace ``netns``); the body of a 200."""
    try:
        if netns is None:
            status, body = http_get(path, timeout, host=host, port=port)
        else:
            status, body = _netns.run_in(netns, http_get, path, timeout, host=host, port=port)
    except (OSError, http.client.HTTPException) as exc:
        where = f" from namespace {netns}" if netns else ""
        raise LabError(
            f"GET http://{host}:{port}{path}{where}: {type(exc).__name__}: {exc}"
        ) from exc
    if status != 200:
        text = body.decode(errors="replace").strip()[:200]
        raise LabError(f"GET http://{host}:{port}{path}: status {status}: {text}")
    return body


def disk_write(
    host: str, n: int, port: int = 80, timeout: float = 5.0, netns: str | None = None
) -> int:
    """Has the guest append ``n`` records to /data/acked.dat; the last seq it acknowledged.

    The guest answers only after the records and the directory are synced to its disk.
    """
    if not 1 <= n <= DISKWRITE_MAX:
        raise ValueError(f"disk_write: n={n}, 1 <= n <= {DISKWRITE_MAX} wanted")
    last, records = parse_acked(_get(host, port, f"/cgi-bin/diskwrite?n={n}", timeout, netns))
    if last != records:
        raise LabError(f"/cgi-bin/diskwrite answered last={last} but records={records}")
    return last


def disk_verify(
    host: str, port: int = 80, timeout: float = 5.0, netns: str | None = None
) -> DiskVerify:
    """Has the guest check every record of /data/acked.dat (read from its disk)."""
    return parse_verified(_get(host, port, "/cgi-bin/diskverify", timeout, netns))
